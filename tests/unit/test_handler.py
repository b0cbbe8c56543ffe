"""The request path in proxy mode: what ``Gate.admit`` decides for each kind of request, and that
``GatewayHandler`` forwards exactly what the gate admitted, and nothing it refused.

The gate runs the real route table, extractor and verifier; its keys come from a key set built
in memory (no IdP).  The handler tests put the gate and a real ``Forwarder`` behind the observer on the
gateway's own server and forward to ``EchoUpstream`` on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import yaml
from jwt import PyJWK
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry
from yarl import URL

from gateway import loads_config
from gateway.binding import SenderCheck
from gateway.config import GatewayConfig, IssuerConfig
from gateway.errors import Rejection
from gateway.gate import Admitted, Gate
from gateway.handler import GatewayHandler
from gateway.headers import AUTH_OUTCOME_HEADER
from gateway.jwks import KeySetLease
from gateway.keyset import build_key_set
from gateway.metrics import UNMATCHED_ROUTE, GatewayMetrics
from gateway.middleware import HandlerSlot, Observer, rejection_response
from gateway.proxy import Forwarder
from gateway.reasons import Reason
from gateway.record import RequestRecord
from gateway.server import HttpServer
from gateway.upstream import UpstreamPools
from gateway.verifier import Verifier
from tests.conftest import AUDIENCE, ISSUER, metric_value
from tests.fakes import EchoUpstream, FakeClock, SigningKey

HOST = "api.example.com"
NOWHERE = "http://127.0.0.1:9"  # gate tests never forward


def config_for(upstream: str) -> GatewayConfig:
    auth = {"issuers": ["test"], "audiences": [AUDIENCE]}
    claims = {"X-User-Sub": "sub"}
    return loads_config(
        yaml.safe_dump(
            {
                "issuers": {
                    "test": {
                        "issuer": ISSUER,
                        "jwks_uri": "https://idp.test/jwks.json",
                        "algorithms": ["RS256"],
                    }
                },
                "routes": [
                    {
                        "id": "hosted",
                        "match": {"path_prefix": "/hosted", "hosts": [HOST]},
                        "upstream": upstream,
                        "auth": "none",
                    },
                    {
                        "id": "api",
                        "match": {"path_prefix": "/api"},
                        "upstream": upstream,
                        "auth": auth,
                        "claim_headers": claims,
                    },
                    {
                        "id": "optional",
                        "match": {"path_prefix": "/optional"},
                        "upstream": upstream,
                        "auth": {**auth, "mode": "optional"},
                        "claim_headers": claims,
                    },
                    {
                        "id": "report",
                        "match": {"path_prefix": "/report"},
                        "upstream": upstream,
                        "auth": {**auth, "mode": "report-only"},
                        "claim_headers": claims,
                    },
                    {
                        "id": "cors",
                        "match": {"path_prefix": "/cors"},
                        "upstream": upstream,
                        "cors_preflight": True,
                        "auth": auth,
                        "claim_headers": claims,
                    },
                    {
                        "id": "public",
                        "match": {"path_prefix": "/public"},
                        "upstream": upstream,
                        "auth": "none",
                    },
                ],
            }
        )
    )


class StaticKeys:
    """The verifier's key lookup over an in-memory key set of ``keys``."""

    def __init__(self, *keys: SigningKey) -> None:
        document = {"keys": [key.public_jwk() for key in keys]}
        self._key_set = build_key_set(document, "test", frozenset({"RS256"}))

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        found = self._key_set.lookup(kid, alg)
        if not isinstance(found, PyJWK):
            raise Rejection(found, f"kid {kid!r}")
        return found

    def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None:
        found = self._key_set.lookup(kid, alg)
        return found if isinstance(found, PyJWK) else None

    def lease(self, issuer: IssuerConfig) -> KeySetLease | None:
        return None  # no leases: a cache hit asks current_key


def build_gate(
    config: GatewayConfig, registry: CollectorRegistry, rsa_key: SigningKey, clock: FakeClock
) -> tuple[Gate, GatewayMetrics]:
    metrics = GatewayMetrics(registry, route_ids=[r.id for r in config.routes])
    metrics.add_routes((), ["report"])
    verifier = Verifier(StaticKeys(rsa_key), clock)
    return Gate(config, verifier, metrics, SenderCheck(config, clock)), metrics


class Judge:
    """A gate over ``config_for(NOWHERE)``, asked about one request at a time."""

    def __init__(self, rsa_key: SigningKey, clock: FakeClock) -> None:
        self.registry = CollectorRegistry()
        self.gate, _ = build_gate(config_for(NOWHERE), self.registry, rsa_key, clock)
        self.record = RequestRecord(request_id="rid")

    async def admit(
        self,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        method: str = "GET",
        host: str = HOST,
    ) -> Admitted:
        self.record = RequestRecord(request_id="rid")
        inbound = CIMultiDictProxy(CIMultiDict(headers or {}))
        return await self.gate.admit(method, target, host, inbound, self.record)

    async def refuse(
        self, target: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> Rejection:
        with pytest.raises(Rejection) as caught:
            await self.admit(target, headers, **kw)
        return caught.value

    def report_only(self, reason: Reason) -> float:
        labels = {"route": "report", "reason": reason.value}
        return metric_value(self.registry, "gateway_report_only_decisions_total", **labels)


@pytest.fixture
def judge(rsa_key: SigningKey, clock: FakeClock) -> Judge:
    return Judge(rsa_key, clock)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


Mint = Callable[..., str]


# --- Gate.admit ------------------------------------------------------------------------------------
async def test_a_request_no_route_takes_is_route_not_found(judge: Judge) -> None:
    rejection = await judge.refuse("/nowhere")
    assert rejection.reason is Reason.ROUTE_NOT_FOUND
    assert judge.record.route == UNMATCHED_ROUTE


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("public.example.com:@admin.example.com", id="userinfo"),
        pytest.param("evil.com/.example.com", id="slash"),
        pytest.param("api.example.com:80:80", id="two-ports"),
        pytest.param("api.example.com:http", id="named-port"),
        pytest.param("api example.com", id="space"),
        pytest.param("[::1", id="unclosed-ipv6"),
        pytest.param("[fe80::1%25eth0]", id="ipv6-zone"),
        pytest.param("", id="empty"),
    ],
)
async def test_an_invalid_host_is_refused_before_routing(judge: Judge, host: str) -> None:
    rejection = await judge.refuse("/public/x", host=host)
    assert (rejection.reason, rejection.detail) == (Reason.REQUEST_REJECTED, "invalid Host")
    assert judge.record.route == UNMATCHED_ROUTE


@pytest.mark.parametrize(
    ("host", "route"),
    [
        pytest.param(HOST, "hosted", id="exact"),
        pytest.param("API.Example.COM:8443", "hosted", id="case-and-port"),
        pytest.param("api.example.com.", "hosted", id="trailing-dot"),
        pytest.param("other.example.com", None, id="another-host"),
        pytest.param("[::1]:8080", None, id="ipv6-literal"),
        pytest.param("127.0.0.1", None, id="ipv4"),
    ],
)
async def test_a_valid_host_is_matched_by_name(judge: Judge, host: str, route: str | None) -> None:
    if route is None:
        assert (await judge.refuse("/hosted/x", host=host)).reason is Reason.ROUTE_NOT_FOUND
    else:
        assert (await judge.admit("/hosted/x", host=host)).route.id == route


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-authorization"),
        pytest.param({"Authorization": "Basic YWxpY2U6cHc="}, id="another-scheme"),
        pytest.param({"X-Token": "abc"}, id="a-header-the-route-does-not-read"),
    ],
)
async def test_a_required_route_without_a_token_is_token_missing(
    judge: Judge, headers: dict[str, str]
) -> None:
    rejection = await judge.refuse("/api/orders", headers)
    assert rejection.reason is Reason.TOKEN_MISSING
    assert judge.record.route == "api"


async def test_a_valid_token_earns_its_identity_headers(
    judge: Judge, token: Mint, rsa_key: SigningKey
) -> None:
    admitted = await judge.admit("/api/orders?page=2", bearer(token(sub="alice")))
    assert admitted.route.id == "api"
    assert admitted.injected == {"X-User-Sub": "alice"}
    assert admitted.target == "/api/orders?page=2"
    assert (judge.record.route, judge.record.issuer, judge.record.kid) == (
        "api",
        "test",
        rsa_key.kid,
    )


async def test_an_invalid_token_on_a_required_route_is_refused_with_its_reason(
    judge: Judge, token: Mint, clock: FakeClock
) -> None:
    stale = token(exp=int(clock.time()) - 3600)
    assert (await judge.refuse("/api/orders", bearer(stale))).reason is Reason.TOKEN_EXPIRED
    assert (await judge.refuse("/api/orders", bearer("x.y.z"))).reason is Reason.TOKEN_MALFORMED


async def test_an_optional_route_without_a_token_passes_without_identity(judge: Judge) -> None:
    admitted = await judge.admit("/optional/feed")
    assert (admitted.route.id, admitted.injected) == ("optional", {})


async def test_an_optional_route_with_a_valid_token_passes_with_identity(
    judge: Judge, token: Mint
) -> None:
    admitted = await judge.admit("/optional/feed", bearer(token(sub="bob")))
    assert admitted.injected == {"X-User-Sub": "bob"}


async def test_an_optional_route_refuses_an_invalid_token(
    judge: Judge, token: Mint, clock: FakeClock
) -> None:
    stale = token(exp=int(clock.time()) - 3600)
    # Not downgraded to anonymous: a client sending a bad token learns it is bad.
    assert (await judge.refuse("/optional/feed", bearer(stale))).reason is Reason.TOKEN_EXPIRED


@pytest.mark.parametrize(
    ("credential", "outcome", "identity"),
    [
        pytest.param(None, Reason.TOKEN_MISSING, None, id="no-token"),
        pytest.param("valid", Reason.OK, "alice", id="valid-token"),
        pytest.param("expired", Reason.TOKEN_EXPIRED, None, id="expired-token"),
        pytest.param("x.y.z", Reason.TOKEN_MALFORMED, None, id="malformed-token"),
    ],
)
async def test_report_only_admits_whatever_the_outcome_and_says_which(
    judge: Judge,
    token: Mint,
    clock: FakeClock,
    credential: str | None,
    outcome: Reason,
    identity: str | None,
) -> None:
    tokens = {"valid": token(sub="alice"), "expired": token(exp=int(clock.time()) - 3600)}
    headers = {} if credential is None else bearer(tokens.get(credential, credential))
    admitted = await judge.admit("/report/daily", headers)
    expected = {AUTH_OUTCOME_HEADER: outcome.value}
    if identity is not None:
        expected["X-User-Sub"] = identity
    assert admitted.injected == expected
    assert judge.record.auth_outcome is outcome
    assert judge.report_only(outcome) == 1
    assert sum(judge.report_only(r) for r in Reason) == 1


CORS = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}


async def test_a_cors_preflight_passes_without_a_token_where_the_route_allows_it(
    judge: Judge,
) -> None:
    admitted = await judge.admit("/cors/items", CORS, method="OPTIONS")
    assert (admitted.route.id, admitted.injected) == ("cors", {})


@pytest.mark.parametrize(
    ("target", "method", "headers"),
    [
        pytest.param("/api/items", "OPTIONS", CORS, id="route-without-cors-preflight"),
        pytest.param("/cors/items", "OPTIONS", {"Origin": "https://a.example"}, id="no-acrm"),
        pytest.param(
            "/cors/items",
            "OPTIONS",
            {"Access-Control-Request-Method": "POST"},
            id="no-origin",
        ),
        pytest.param("/cors/items", "POST", CORS, id="not-options"),
    ],
)
async def test_anything_short_of_a_preflight_on_a_preflight_route_needs_a_token(
    judge: Judge, target: str, method: str, headers: dict[str, str]
) -> None:
    rejection = await judge.refuse(target, headers, method=method)
    assert rejection.reason is Reason.TOKEN_MISSING


async def test_a_public_route_needs_no_token_and_earns_no_identity(
    judge: Judge, token: Mint
) -> None:
    admitted = await judge.admit("/public/x", bearer(token()))
    assert (admitted.route.id, admitted.injected) == ("public", {})


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("/public/%7Euser", "/public/~user", id="tilde-decoded"),
        pytest.param("/public/%41%62c?q=%41", "/public/Abc?q=%41", id="query-as-received"),
        pytest.param("/api/x", None, id="matched-after-decoding-so-needs-a-token"),
    ],
)
async def test_the_target_is_the_path_as_matched_and_the_query_as_received(
    judge: Judge, target: str, expected: str | None
) -> None:
    if expected is None:
        assert (await judge.refuse("/%61pi/x")).reason is Reason.TOKEN_MISSING
    else:
        assert (await judge.admit(target)).target == expected


async def test_an_encoded_slash_is_refused(judge: Judge) -> None:
    assert (await judge.refuse("/public/a%2Fb")).reason is Reason.REQUEST_REJECTED


# --- GatewayHandler: what reaches the upstream ---------------------------------------------------------
class ProxyClient:
    """Requests to the gateway's own server on loopback, bodies read."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self._session = session
        self._base = URL(f"http://127.0.0.1:{port}")

    async def get(self, target: str | URL, **kwargs: Any) -> aiohttp.ClientResponse:
        url = (
            self._base.join(target)
            if isinstance(target, URL)
            else URL(f"{self._base}{target}", encoded=True)
        )
        response = await self._session.get(url, **kwargs)
        await response.read()
        return response


@pytest.fixture
async def proxy(
    upstream: EchoUpstream, rsa_key: SigningKey, clock: FakeClock
) -> AsyncIterator[ProxyClient]:
    """The gate and a real forwarder behind the observer, forwarding to the echo."""
    config = config_for(upstream.url)
    gate, metrics = build_gate(config, CollectorRegistry(), rsa_key, clock)
    pools = UpstreamPools(config.upstream_defaults.max_connections)
    handler = GatewayHandler(gate, Forwarder(config, pools, metrics))
    observer = Observer(metrics, HandlerSlot(handler), lambda: "gw", lambda: False)
    server = HttpServer(
        observer, lambda: config.limits, metrics, lambda reason: rejection_response(reason, "gw")
    )
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as session:
        yield ProxyClient(session, port)
    listener.close()
    server.pre_shutdown()
    await server.shutdown(1)
    await pools.close()


def received(echo: dict[str, Any]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in echo["headers"])


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        pytest.param("/nowhere", {}, 404, id="route-not-found"),
        pytest.param("/api/orders", {}, 401, id="token-missing"),
        pytest.param("/api/orders", {"Authorization": "Bearer x.y.z"}, 401, id="bad-token"),
        pytest.param("/public/a%2Fb", {}, 400, id="encoded-slash"),
    ],
)
async def test_a_refused_request_never_reaches_the_upstream(
    proxy: ProxyClient, upstream: EchoUpstream, target: str, headers: dict[str, str], status: int
) -> None:
    response = await proxy.get(target, headers={"X-User-Sub": "admin", **headers})
    assert response.status == status
    assert upstream.hits == 0


async def test_an_admitted_request_reaches_the_upstream_with_the_gates_identity_only(
    proxy: ProxyClient, upstream: EchoUpstream, token: Mint
) -> None:
    response = await proxy.get(
        "/api/orders?page=2", headers={**bearer(token(sub="alice")), "X_User_Sub": "admin"}
    )
    assert response.status == 200
    echo = await response.json()
    seen = received(echo)
    assert (echo["method"], echo["path"]) == ("GET", "/api/orders?page=2")
    assert seen.getall("X-User-Sub") == ["alice"]
    assert "X_User_Sub" not in seen
    assert "Authorization" not in seen
    assert upstream.hits == 1


async def test_the_upstream_gets_the_path_the_gate_matched(
    proxy: ProxyClient, upstream: EchoUpstream
) -> None:
    # encoded=True: yarl would otherwise decode the escapes before they left the client.
    response = await proxy.get(URL("/public/%7Euser?x=%7E", encoded=True))
    assert (await response.json())["path"] == "/public/~user?x=%7E"


async def test_a_report_only_refusal_is_forwarded_with_its_outcome_and_no_identity(
    proxy: ProxyClient, upstream: EchoUpstream
) -> None:
    response = await proxy.get(
        "/report/daily",
        headers={"Authorization": "Bearer x.y.z", AUTH_OUTCOME_HEADER: "ok", "X-User-Sub": "a"},
    )
    assert response.status == 200
    seen = received(await response.json())
    assert seen.getall(AUTH_OUTCOME_HEADER) == ["token_malformed"]
    assert "X-User-Sub" not in seen
