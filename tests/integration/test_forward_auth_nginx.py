"""Forward-auth mode behind a REAL nginx running the shipped deploy/forward-auth/nginx.conf.

client --> nginx (auth_request) --> gateway /auth/nginx, then nginx --> EchoUpstream.

The gateway runs deploy/forward-auth/gateway.yaml in the test's event loop (an aiohttp test
server on 127.0.0.1, FakeClock for its time) with only the JWKS address and trusted_proxies
pointed at the test's loopback. nginx (/usr/sbin/nginx, Debian package ``nginx``) runs as a
child process on 127.0.0.1 from the shipped config, rewritten only where it names addresses,
the listen port, ``user``, ``worker_processes`` and file paths. Only that process is stopped,
by its PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from gateway.config import GatewayConfig, IssuerConfig, RouteConfig, header_key
from gateway.reasons import REASON_SPECS, Reason, www_authenticate
from tests.conftest import GatewayFactory, RunningGateway
from tests.deploy.support import DEPLOY
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token
from tests.integration.authkit import refused, send_until_closed
from tests.integration.e2e_helpers import echoed_headers, free_port

FORWARD_AUTH = DEPLOY / "forward-auth"
NGINX_CONF = FORWARD_AUTH / "nginx.conf"
GATEWAY_YAML = FORWARD_AUTH / "gateway.yaml"
START_WITHIN_S = 10.0

# Keys the IdP never publishes: one signs under a published kid (a forged signature), the
# other under random kids (the kid flood).
_FORGER = generate_key("RS256", "forger")
_IMPOSTOR = generate_key("ES256", "impostor")


def _nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").is_file():
        found = "/usr/sbin/nginx"
    return found


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    found = _nginx_binary()
    if found is None:
        pytest.skip("nginx is not installed (Debian package 'nginx'; .ci/run installs it)")
    built = subprocess.run(  # noqa: S603 - a fixed tool, no shell
        [found, "-V"], capture_output=True, text=True, check=True
    ).stderr
    assert "--with-http_auth_request_module" in built, (
        f"{found} lacks ngx_http_auth_request_module, which deploy/forward-auth/nginx.conf needs"
    )
    return found


# --- the shipped configs, pointed at loopback --------------------------------------------------
def _replace_once(text: str, pattern: str, replacement: str) -> str:
    """Replace the one line matching ``pattern`` (a whole line, indentation kept)."""
    regex = re.compile(rf"^(?P<indent>[ \t]*){pattern}[ \t]*$", re.MULTILINE)
    found = regex.findall(text)
    assert len(found) == 1, f"nginx.conf should have exactly one line matching {pattern!r}"
    return regex.sub(lambda m: m.group("indent") + replacement, text)


def render_nginx_conf(
    text: str, *, listen_port: int, gateway_port: int, upstream_port: int, prefix: Path
) -> str:
    """The shipped nginx.conf with loopback addresses and every file inside ``prefix``."""
    temp_paths = "".join(
        f"\n    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # A root master would switch its workers to www-data, which cannot enter pytest's tmp_path.
    user = "user root;" if os.geteuid() == 0 else "# user: the workers run as the test's user"
    edits = [
        (r"user \S+;", user),
        (r"worker_processes \S+;", "worker_processes 1;"),
        (r"pid \S+;", f"pid {prefix / 'nginx.pid'};"),
        (r"error_log \S+ (\w+);", f"error_log {prefix / 'error.log'} info;"),
        (r"access_log \S+ (\w+);", f"access_log {prefix / 'access.log'} forward_auth;"),
        (r"server gateway:8081;", f"server 127.0.0.1:{gateway_port};"),
        (r"server app:8080;", f"server 127.0.0.1:{upstream_port};"),
        (r"listen 80;", f"listen 127.0.0.1:{listen_port};"),
        (r"http \{", "http {" + temp_paths),
    ]
    for pattern, replacement in edits:
        text = _replace_once(text, pattern, replacement)
    return text


def gateway_document(idp: FakeIdP) -> dict[str, Any]:
    """deploy/forward-auth/gateway.yaml with the test IdP's key set and nginx's address trusted."""
    document: dict[str, Any] = yaml.safe_load(GATEWAY_YAML.read_text(encoding="utf-8"))
    assert document["mode"] == "forward_auth"
    document["trusted_proxies"] = ["127.0.0.1/32"]
    for issuer in document["issuers"].values():
        issuer["jwks_uri"] = idp.jwks_uri
        issuer["jwks_fetch_timeout_s"] = 0.5
    return document


# --- nginx as a child process -------------------------------------------------------------------
class NginxProcess:
    """One nginx master (and its worker) on 127.0.0.1, started from a rendered config."""

    def __init__(self, binary: str, directory: Path, conf: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.conf = directory / "nginx.conf"
        self.conf.write_text(conf, encoding="utf-8")
        self._output = (directory / "nginx.out").open("wb")
        argv = [binary, "-p", str(directory), "-c", str(self.conf), "-e", "stderr"]
        self.proc = subprocess.Popen(  # noqa: S603 - a fixed tool and our own config, no shell
            [*argv, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    async def wait_listening(self, port: int) -> None:
        """Bounded polling until nginx accepts on ``port`` (or fail with its log)."""
        deadline = time.monotonic() + START_WITHIN_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}\n{self.logs()}")
            if not await refused(port):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx not listening within {START_WITHIN_S}s\n"
                                     f"{self.logs()}")  # fmt: skip
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown) to this master by its PID; SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._output.close()


@dataclass
class Stack:
    """The gateway, nginx in front of it, and a client session for nginx."""

    gateway: RunningGateway
    nginx: NginxProcess
    port: int
    session: aiohttp.ClientSession

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.config

    @property
    def issuer(self) -> IssuerConfig:
        [issuer] = self.config.issuers.values()
        return issuer

    def route(self, route_id: str) -> RouteConfig:
        [route] = [r for r in self.config.routes if r.id == route_id]
        return route

    def path(self, route_id: str, rest: str = "") -> str:
        prefix = self.route(route_id).match.path_prefix
        assert prefix is not None
        return prefix + rest

    def url(self, target: str) -> URL:
        """``target`` on nginx, sent exactly as written (no re-quoting by the client)."""
        return URL(f"http://127.0.0.1:{self.port}{target}", encoded=True)

    def request(self, method: str, target: str, **kwargs: Any) -> Any:
        return self.session.request(method, self.url(target), **kwargs)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    make_gateway: GatewayFactory,
    idp: FakeIdP,
    upstream: EchoUpstream,
    tmp_path: Path,
    nginx_binary: str,
) -> AsyncIterator[StackFactory]:
    """Start the gateway (``edit`` may change its document) and nginx in front of it."""
    started: list[NginxProcess] = []
    sessions: list[aiohttp.ClientSession] = []
    upstream_port = int(upstream.url.rsplit(":", 1)[1])

    async def start(
        edit: Callable[[dict[str, Any]], None] | None = None, *, gateway_port: int | None = None
    ) -> Stack:
        gateway = await make_gateway(edit, document=gateway_document(idp))
        text = NGINX_CONF.read_text(encoding="utf-8")
        for attempt in range(3):  # a free port can be taken between its choice and nginx's bind
            port = free_port()
            conf = render_nginx_conf(
                text,
                listen_port=port,
                gateway_port=gateway_port or gateway.port,
                upstream_port=upstream_port,
                prefix=tmp_path / f"nginx-{len(started)}",
            )
            nginx = NginxProcess(nginx_binary, tmp_path / f"nginx-{len(started)}", conf)
            started.append(nginx)
            try:
                await nginx.wait_listening(port)
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in nginx.logs():
                    raise
                continue
            break
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        sessions.append(session)
        return Stack(gateway, nginx, port, session)

    yield start
    for session in sessions:
        await session.close()
    for nginx in started:
        nginx.stop()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


# --- helpers --------------------------------------------------------------------------------------
def mint(stack: Stack, key: SigningKey, clock: FakeClock, **claims: Any) -> str:
    """A token from the stack's issuer for audience ``api`` (``claims`` override)."""
    defaults: dict[str, Any] = {"iss": stack.issuer.issuer, "aud": "api", "sub": "alice"}
    return make_token(key, clock, **{**defaults, **claims})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def owned_copies(headers: list[list[str]], owned: frozenset[str]) -> dict[str, list[str]]:
    """Every header the upstream received that is an owned header in any spelling."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        if header_key(name) in owned:
            found.setdefault(header_key(name), []).append(value)
    return found


def expected_body(reason: Reason) -> dict[str, Any]:
    spec = REASON_SPECS[reason]
    return {"error": {"code": spec.status, "reason": reason.value, "message": spec.message}}


async def assert_gateway_answer(
    response: aiohttp.ClientResponse, stack: Stack, reason: Reason, *, scope: str | None = None
) -> None:
    """The client got the gateway's own status, challenge, JSON body and no-store."""
    spec = REASON_SPECS[reason]
    assert response.status == spec.status, await response.text()
    challenge = www_authenticate(reason, stack.config.realm, scope)
    assert response.headers.getall("WWW-Authenticate", []) == ([challenge] if challenge else [])
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert json.loads(await response.read()) == expected_body(reason)
    assert response.headers.get("X-Request-ID"), "the gateway's request id reaches the client"


async def raw_exchange(port: int, head: str) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, unnormalised) and read the whole answer."""
    data = await send_until_closed(
        port, head.encode("latin-1") + b"Connection: close\r\n\r\n", within=10
    )
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


# --- allowed ----------------------------------------------------------------------------------------
async def test_a_valid_token_reaches_the_upstream_with_its_claim_headers(
    stack, upstream, rsa_key, clock
):
    token = mint(stack, rsa_key, clock, email="alice@example.com")
    target = stack.path("api", "/orders?page=2&q=a%2Fb")
    async with stack.request("GET", target, headers=bearer(token)) as response:
        assert response.status == 200
        body = await response.json()
    assert body["path"] == target, "nginx forwards the raw target"
    headers = echoed_headers(body)
    assert owned_copies(body["headers"], stack.config.owned_headers) == {
        "x-user-sub": ["alice"],
        "x-user-email": ["alice@example.com"],
    }
    assert "Authorization" not in headers, "the token stays at the edge"
    assert headers["X-Request-ID"], "the upstream gets the id of the gateway's decision"
    assert upstream.hits == 1
    gw = stack.gateway
    assert gw.metric("gateway_forward_auth_decisions_total", caller="nginx", decision="allow") == 1
    assert gw.metric("gateway_requests_total", route="api", reason="ok") == 1


async def test_a_request_body_goes_to_the_upstream_only(stack, upstream, rsa_key, clock):
    token = mint(stack, rsa_key, clock)
    payload = secrets.token_bytes(256 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    for data in (payload, chunks()):  # a Content-Length body, then a chunked one
        async with stack.request(
            "POST", stack.path("api", "/upload"), headers=bearer(token), data=data
        ) as response:
            assert response.status == 200
            body = await response.json()
        assert body["method"] == "POST"
        assert body["body_bytes"] == len(payload)
        assert echoed_headers(body)["X-User-Sub"] == "alice"
    assert upstream.hits == 2


async def test_a_public_route_needs_no_token(stack, upstream):
    async with stack.request("GET", stack.path("public", "/status")) as response:
        assert response.status == 200
        body = await response.json()
    assert owned_copies(body["headers"], stack.config.owned_headers) == {}
    assert upstream.hits == 1


async def test_a_scoped_route_passes_with_the_scope(stack, upstream, rsa_key, clock):
    scope = " ".join(sorted(stack.route("reports").auth.required_scopes))
    token = mint(stack, rsa_key, clock, scope=f"{scope} profile")
    async with stack.request("GET", stack.path("reports", "/daily"), headers=bearer(token)) as r:
        assert r.status == 200
        body = await r.json()
    assert owned_copies(body["headers"], stack.config.owned_headers) == {
        "x-user-sub": ["alice"],
        "x-scope": [f"{scope} profile"],
    }


# --- client-sent identity never arrives -----------------------------------------------------------
FORGED_IDENTITY = [
    ("X-User-Sub", "mallory"),
    ("x-user-sub", "mallory-again"),
    ("X_User_Sub", "mallory-underscore"),
    ("X-User-Email", "mallory@evil.example"),
    ("X_User_Email", "mallory@evil.example"),
    ("X-Scope", "reports:read admin"),
    ("X-Gateway-Auth-Outcome", "ok"),
]


@pytest.mark.parametrize("route_id", ["api", "public"])
async def test_client_sent_owned_headers_never_reach_the_upstream(
    stack, upstream, rsa_key, clock, route_id
):
    headers = list(FORGED_IDENTITY)
    if route_id == "api":
        # No email claim: the answer has no X-User-Email, and the client's must not survive.
        headers.append(("Authorization", f"Bearer {mint(stack, rsa_key, clock)}"))
    async with stack.request("GET", stack.path(route_id, "/x"), headers=headers) as response:
        assert response.status == 200
        body = await response.json()
    copies = owned_copies(body["headers"], stack.config.owned_headers)
    assert copies == ({"x-user-sub": ["alice"]} if route_id == "api" else {})
    assert upstream.hits == 1


async def test_client_sent_original_request_headers_are_overwritten(stack, upstream):
    # nginx states the original request itself: a client naming the public route in the
    # headers that describe it still gets the protected route's answer.
    spoof = {
        "X-Original-URI": stack.path("public", "/x"),
        "X-Original-URL": "http://shop.example.com" + stack.path("public", "/x"),
        "X-Original-Method": "GET",
    }
    async with stack.request("DELETE", stack.path("api", "/orders/1"), headers=spoof) as r:
        await assert_gateway_answer(r, stack, Reason.TOKEN_MISSING)
    assert upstream.hits == 0


async def test_the_host_is_the_one_nginx_served_not_one_the_client_names(make_stack, upstream):
    # The gateway takes the host from X-Original-URL: nginx must state it, or a client could
    # pick a route meant for another virtual host.
    def public_on_one_host(document: dict[str, Any]) -> None:
        [public] = [r for r in document["routes"] if r["id"] == "public"]
        public["match"]["hosts"] = ["status.example.com"]

    stack = await make_stack(public_on_one_host)
    target = stack.path("public", "/x")
    spoof = {"Host": "shop.example.com", "X-Original-URL": "http://status.example.com" + target}
    async with stack.request("GET", target, headers=spoof) as response:
        await assert_gateway_answer(response, stack, Reason.ROUTE_NOT_FOUND)
    assert upstream.hits == 0
    async with stack.request("GET", target, headers={"Host": "status.example.com"}) as response:
        assert response.status == 200
    assert upstream.hits == 1


# --- denied: the gateway's answer reaches the client -------------------------------------------------
DENIALS = [
    ("forged_signature", Reason.SIGNATURE_INVALID),
    ("expired", Reason.TOKEN_EXPIRED),
    ("wrong_audience", Reason.AUDIENCE_NOT_ALLOWED),
    ("no_token", Reason.TOKEN_MISSING),
    ("no_sub", Reason.CLAIM_MISSING),
]


@pytest.mark.parametrize(("case", "reason"), DENIALS, ids=[c for c, _ in DENIALS])
async def test_an_invalid_token_gets_the_gateway_401(stack, upstream, rsa_key, clock, case, reason):
    now = int(clock.time())
    tokens = {
        "forged_signature": lambda: mint(
            stack, SigningKey(rsa_key.kid, "RS256", _FORGER.private), clock
        ),
        "expired": lambda: mint(stack, rsa_key, clock, iat=now - 3600, exp=now - 600),
        "wrong_audience": lambda: mint(stack, rsa_key, clock, aud="billing"),
        "no_token": lambda: None,
        "no_sub": lambda: make_token(rsa_key, clock, iss=stack.issuer.issuer, aud="api"),
    }
    token = tokens[case]()
    headers = bearer(token) if token else {}
    async with stack.request("GET", stack.path("api", "/orders"), headers=headers) as response:
        await assert_gateway_answer(response, stack, reason)
    assert upstream.hits == 0
    gw = stack.gateway
    assert gw.metric("gateway_forward_auth_decisions_total", caller="nginx", decision="deny") == 1
    assert gw.metric("gateway_requests_total", route="api", reason=reason.value) == 1


async def test_insufficient_scope_gets_the_403_scope_challenge(stack, upstream, rsa_key, clock):
    scope = " ".join(sorted(stack.route("reports").auth.required_scopes))
    token = mint(stack, rsa_key, clock, scope="profile")
    async with stack.request("GET", stack.path("reports", "/daily"), headers=bearer(token)) as r:
        await assert_gateway_answer(r, stack, Reason.INSUFFICIENT_SCOPE, scope=scope)
    assert upstream.hits == 0


async def test_other_statuses_are_mapped_back_from_nginx_500(stack, upstream):
    # auth_request turns every status but 401 and 403 into 500; the config maps them back.
    async with stack.request("GET", "/nowhere") as response:
        await assert_gateway_answer(response, stack, Reason.ROUTE_NOT_FOUND)
    # The route's methods are matched on the original method.
    async with stack.request("DELETE", stack.path("public", "/status")) as response:
        await assert_gateway_answer(response, stack, Reason.ROUTE_NOT_FOUND)
    # Dot segments, plain and encoded, sent raw: the gateway checks the target exactly as the
    # client sent it (nginx would pass /public/%2e%2e/api on to the application unchanged).
    for rest in ("/../api/orders", "/%2e%2e/api/orders"):
        target = stack.path("public", rest)
        status, body = await raw_exchange(stack.port, f"GET {target} HTTP/1.1\r\nHost: a.test\r\n")
        assert status == 400, target
        assert json.loads(body) == expected_body(Reason.REQUEST_REJECTED)
    assert upstream.hits == 0


async def test_unavailable_keys_answer_503(make_stack, idp, upstream, rsa_key, clock):
    idp.mode = "error"  # the start-up fetch fails: no key set at all
    stack = await make_stack()
    async with stack.request("GET", stack.path("api"), headers=bearer(mint(stack, rsa_key, clock))) as r:  # fmt: skip
        await assert_gateway_answer(r, stack, Reason.JWKS_UNAVAILABLE)
    assert upstream.hits == 0


async def test_an_untrusted_caller_is_refused(make_stack, upstream, rsa_key, clock):
    def distrust_loopback(document: dict[str, Any]) -> None:
        document["trusted_proxies"] = ["10.0.0.0/8"]

    stack = await make_stack(distrust_loopback)
    async with stack.request("GET", stack.path("api"), headers=bearer(mint(stack, rsa_key, clock))) as r:  # fmt: skip
        await assert_gateway_answer(r, stack, Reason.CALLER_UNTRUSTED)
    assert upstream.hits == 0


async def test_no_decision_fails_closed(make_stack, upstream, rsa_key, clock):
    stack = await make_stack(gateway_port=free_port())  # nothing listens there
    async with stack.request("GET", stack.path("public", "/status")) as response:
        assert response.status == 502
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["reason"] == "auth_unavailable"
    assert upstream.hits == 0


async def test_the_auth_location_is_not_reachable_from_outside(stack, upstream):
    async with stack.request("GET", "/_gateway/auth") as response:
        assert response.status == 404
    assert upstream.hits == 0
    assert stack.gateway.metric("gateway_forward_auth_decisions_total", caller="nginx",
                                decision="allow") == 0  # fmt: skip


# --- key cache under a kid flood through nginx ---------------------------------------------------------
async def test_an_unknown_kid_flood_costs_one_key_fetch_per_cooldown(stack, idp, upstream, clock):
    cooldown = stack.issuer.jwks_refetch_cooldown_s
    clock.advance(cooldown)  # leave the window opened by the start-up fetch
    hits = idp.hits
    target = stack.path("api", "/orders")

    async def flood(count: int) -> None:
        for _ in range(count):
            token = make_token(
                _IMPOSTOR,
                clock,
                headers={"kid": secrets.token_hex(8)},
                iss=stack.issuer.issuer,
                aud="api",
                sub="eve",
            )
            async with stack.request("GET", target, headers=bearer(token)) as response:
                assert response.status == 401
                assert (await response.json())["error"]["reason"] == "key_not_found"

    await flood(50)
    assert idp.hits - hits == 1
    clock.advance(cooldown)  # the next window allows exactly one more
    await flood(25)
    assert idp.hits - hits == 2
    assert upstream.hits == 0
    assert stack.gateway.metric("gateway_requests_total", route="api",
                                reason="key_not_found") == 75  # fmt: skip


async def test_a_concurrent_kid_flood_shares_one_key_fetch(stack, idp, upstream, clock):
    clock.advance(stack.issuer.jwks_refetch_cooldown_s)
    hits = idp.hits

    async def one(kid: str) -> int:
        token = make_token(
            _IMPOSTOR, clock, headers={"kid": kid}, iss=stack.issuer.issuer, aud="api", sub="eve"
        )
        async with stack.request("GET", stack.path("api"), headers=bearer(token)) as response:
            return int(response.status)

    statuses = await asyncio.gather(*(one(secrets.token_hex(8)) for _ in range(50)))
    assert statuses == [401] * 50
    assert idp.hits - hits == 1
    assert upstream.hits == 0


# --- the shapes ingress-nginx sends ----------------------------------------------------------------------
async def test_the_ingress_nginx_subrequest_shape_is_understood(stack, rsa_key, clock):
    # ingress-nginx sends X-Original-URL (absolute) and X-Original-Method, with Host set to the
    # auth service; this talks to the gateway directly, as the controller would.
    token = mint(stack, rsa_key, clock, email="alice@example.com")
    headers = {
        "Host": "gateway-forward-auth.gateway.svc.cluster.local:8081",
        "X-Original-URL": "https://shop.example.com" + stack.path("api", "/orders?x=1"),
        "X-Original-Method": "GET",
        **bearer(token),
    }
    response = await stack.gateway.client.get("/auth/nginx", headers=headers)
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"
    assert response.headers["X-User-Email"] == "alice@example.com"
    headers["X-Original-URL"] = "https://shop.example.com" + stack.path("reports", "/daily")
    response = await stack.gateway.client.get("/auth/nginx", headers=headers)
    assert response.status == 403
    assert json.loads(response.headers["X-Gateway-Error"]) == expected_body(
        Reason.INSUFFICIENT_SCOPE
    )
