"""End to end, over HTTP only: every authentication and routing rejection, accepted tokens,
header hygiene, routing, claim rendering, and what is (never) logged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest

from gateway.metrics import UNMATCHED_ROUTE
from gateway.reasons import Reason
from tests.conftest import ALL_ALGORITHMS, GatewayFactory, RunningGateway, bearer
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey
from tests.integration.authkit import (
    EXPECTED,
    LIBRARY_TEXT,
    RawResponse,
    assert_not_logged,
    decision_lines,
    default_claims,
    echoed,
    expected_body,
    expected_challenge,
    hs256_with_public_pem,
    rekeyed,
    requests_total,
    send_raw,
    tamper_payload,
    tamper_signature,
    unsigned_token,
    values_of,
)

Headers = tuple[tuple[str, str], ...]
Edit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Req:
    """One request as sent on the wire; ``token`` is the secret that must never be logged."""

    target: str = "/api/orders"
    headers: Headers = ()
    method: str = "GET"
    token: str | None = None


def with_token(token: str, target: str = "/api/orders") -> Req:
    return Req(target, (("Authorization", f"Bearer {token}"),), token=token)


@dataclass
class Kit:
    """What a case may use to build its request: the token minter, every key, the clock."""

    mint: Callable[..., str]
    keys: dict[str, SigningKey]
    clock: FakeClock

    @property
    def now(self) -> int:
        return int(self.clock.time())

    @property
    def rsa(self) -> SigningKey:
        return self.keys["RS256"]


@dataclass(frozen=True)
class Refused:
    """A request the gateway must refuse with ``reason`` before anything reaches the upstream."""

    id: str
    reason: Reason
    build: Callable[[Kit], Req]
    route: str = "api"
    edit: Edit | None = None
    jwks_fetches: int = 0  # how many key-set fetches the request itself may cause
    scope: str | None = None


def _pin_only_es256(doc: dict[str, Any]) -> None:
    doc["issuers"]["test"]["algorithms"] = ["ES256"]


def _small_token_limit(doc: dict[str, Any]) -> None:
    doc["max_token_bytes"] = 256


def _foreign_issuer(kit: Kit, **claims: Any) -> Req:
    # Unknown kid and the refetch cooldown over: had the gateway looked for a key before
    # checking iss, the IdP would see a fetch.
    kit.clock.advance(31)
    return with_token(kit.mint(key=rekeyed(kit.rsa, kid="kid-from-elsewhere"), **claims))


def _unknown_kid_after_refetch(kit: Kit) -> Req:
    kit.clock.advance(31)  # past jwks_refetch_cooldown_s: one refetch is allowed
    return with_token(kit.mint(key=rekeyed(kit.rsa, kid="retired-key")))


def _two_authorization_headers(kit: Kit) -> Req:
    first, second = kit.mint(), kit.mint(sub="bob")
    return Req(
        headers=(("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")),
        token=first,
    )


def _unsigned(alg: str) -> Callable[[Kit], Req]:
    def build(kit: Kit) -> Req:
        return with_token(unsigned_token(alg, default_claims(kit.now)))

    return build


def _signature_stripped(kit: Kit) -> Req:
    head, payload, _ = kit.mint().split(".")
    return with_token(f"{head}.{payload}.")


CASES: tuple[Refused, ...] = (
    # --- routing -------------------------------------------------------------------------------
    Refused("unknown-path", Reason.ROUTE_NOT_FOUND, lambda k: Req("/nowhere"), UNMATCHED_ROUTE),
    Refused(
        "prefix-not-a-segment", Reason.ROUTE_NOT_FOUND, lambda k: Req("/apix"), UNMATCHED_ROUTE
    ),
    Refused(
        "method-not-allowed-on-public",
        Reason.ROUTE_NOT_FOUND,
        lambda k: Req("/public/page", method="DELETE"),
        UNMATCHED_ROUTE,
    ),
    Refused(
        "dot-segment", Reason.REQUEST_REJECTED, lambda k: Req("/public/../api"), UNMATCHED_ROUTE
    ),
    Refused(
        "encoded-dot-segment",
        Reason.REQUEST_REJECTED,
        lambda k: Req("/api/%2e%2e/x"),
        UNMATCHED_ROUTE,
    ),
    Refused(
        "encoded-dot-segment-upper",
        Reason.REQUEST_REJECTED,
        lambda k: Req("/public/%2E%2E/api/orders"),
        UNMATCHED_ROUTE,
    ),
    Refused(
        "encoded-slash",
        Reason.REQUEST_REJECTED,
        lambda k: Req("/public%2F..%2Fapi/orders"),
        UNMATCHED_ROUTE,
    ),
    Refused(
        "encoded-slash-lower",
        Reason.REQUEST_REJECTED,
        lambda k: Req("/api%2forders"),
        UNMATCHED_ROUTE,
    ),
    # --- the Authorization header ----------------------------------------------------------------
    Refused("two-authorization-headers", Reason.INVALID_REQUEST, _two_authorization_headers),
    Refused(
        "two-credentials",
        Reason.INVALID_REQUEST,
        lambda k: Req(headers=(("Authorization", "Bearer a b"),)),
    ),
    Refused(
        "token-over-max-token-bytes",
        Reason.INVALID_REQUEST,
        lambda k: Req(headers=(("Authorization", "Bearer " + "a" * 300),)),
        edit=_small_token_limit,
    ),
    Refused("no-authorization", Reason.TOKEN_MISSING, lambda k: Req()),
    Refused(
        "basic-scheme",
        Reason.TOKEN_MISSING,
        lambda k: Req(headers=(("Authorization", "Basic YWxpY2U6c2VjcmV0"),)),
    ),
    # --- the token -----------------------------------------------------------------------------
    Refused("not-a-jwt", Reason.TOKEN_MALFORMED, lambda k: with_token("not-a-jwt")),
    Refused(
        "bad-base64",
        Reason.TOKEN_MALFORMED,
        lambda k: with_token("eyJhbGciOiJSUzI1NiJ9x.e30.c2ln"),
    ),
    *(
        Refused(f"alg-{alg}", Reason.ALGORITHM_NOT_ALLOWED, _unsigned(alg))
        for alg in ("none", "None", "NONE")
    ),
    Refused(
        "hs256-keyed-with-rsa-public-pem",
        Reason.ALGORITHM_NOT_ALLOWED,
        lambda k: with_token(hs256_with_public_pem(k.rsa, default_claims(k.now))),
    ),
    Refused(
        "rs256-on-es256-only-issuer",
        Reason.ALGORITHM_NOT_ALLOWED,
        lambda k: with_token(k.mint()),
        edit=_pin_only_es256,
    ),
    Refused(
        "wrong-iss",
        Reason.ISSUER_NOT_ALLOWED,
        lambda k: _foreign_issuer(k, iss="https://evil.test"),
    ),
    Refused(
        "iss-with-trailing-slash",
        Reason.ISSUER_NOT_ALLOWED,
        lambda k: _foreign_issuer(k, iss="https://idp.test/"),
    ),
    Refused("missing-iss", Reason.ISSUER_NOT_ALLOWED, lambda k: _foreign_issuer(k, omit=("iss",))),
    Refused(
        "unknown-kid-after-refetch",
        Reason.KEY_NOT_FOUND,
        _unknown_kid_after_refetch,
        jwks_fetches=1,
    ),
    Refused(
        "unknown-kid-in-cooldown",
        Reason.KEY_NOT_FOUND,
        lambda k: with_token(k.mint(key=rekeyed(k.rsa, kid="retired-key"))),
    ),
    Refused(
        "tampered-signature",
        Reason.SIGNATURE_INVALID,
        lambda k: with_token(tamper_signature(k.mint())),
    ),
    Refused(
        "tampered-payload",
        Reason.SIGNATURE_INVALID,
        lambda k: with_token(tamper_payload(k.mint(), sub="admin")),
    ),
    Refused(
        "right-kid-other-key",
        Reason.SIGNATURE_INVALID,
        lambda k: with_token(k.mint(key=rekeyed(k.rsa, private=k.keys["RS384"].private))),
    ),
    Refused("signature-stripped", Reason.SIGNATURE_INVALID, _signature_stripped),
    Refused(
        "exp-beyond-leeway",
        Reason.TOKEN_EXPIRED,
        lambda k: with_token(k.mint(iat=k.now - 400, exp=k.now - 31)),
    ),
    Refused(
        "exp-at-leeway-boundary",
        Reason.TOKEN_EXPIRED,
        lambda k: with_token(k.mint(iat=k.now - 400, exp=k.now - 30)),
    ),
    Refused(
        "nbf-beyond-leeway",
        Reason.TOKEN_NOT_YET_VALID,
        lambda k: with_token(k.mint(nbf=k.now + 31)),
    ),
    Refused(
        "iat-in-future",
        Reason.TOKEN_NOT_YET_VALID,
        lambda k: with_token(k.mint(iat=k.now + 31)),
    ),
    Refused("missing-exp", Reason.CLAIM_MISSING, lambda k: with_token(k.mint(omit=("exp",)))),
    Refused("missing-sub", Reason.CLAIM_MISSING, lambda k: with_token(k.mint(omit=("sub",)))),
    Refused(
        "exp-as-string",
        Reason.CLAIM_INVALID,
        lambda k: with_token(k.mint(exp=str(k.now + 300))),
    ),
    Refused("exp-as-bool", Reason.CLAIM_INVALID, lambda k: with_token(k.mint(exp=True))),
    Refused("nbf-as-string", Reason.CLAIM_INVALID, lambda k: with_token(k.mint(nbf="yesterday"))),
    Refused(
        "claim-header-value-with-crlf",
        Reason.CLAIM_INVALID,
        lambda k: with_token(k.mint(email="a\r\nX-Evil: 1")),
    ),
    Refused("wrong-aud", Reason.AUDIENCE_NOT_ALLOWED, lambda k: with_token(k.mint(aud="other"))),
    Refused(
        "aud-list-without-ours",
        Reason.AUDIENCE_NOT_ALLOWED,
        lambda k: with_token(k.mint(aud=["other", "another"])),
    ),
    Refused(
        "missing-aud", Reason.AUDIENCE_NOT_ALLOWED, lambda k: with_token(k.mint(omit=("aud",)))
    ),
    Refused(
        "other-scope",
        Reason.INSUFFICIENT_SCOPE,
        lambda k: with_token(k.mint(scope="orders:write profile"), "/scoped/orders"),
        route="scoped",
        scope="orders:read",
    ),
    Refused(
        "no-scope-claim",
        Reason.INSUFFICIENT_SCOPE,
        lambda k: with_token(k.mint(), "/scoped/orders"),
        route="scoped",
        scope="orders:read",
    ),
)


def test_every_auth_and_routing_reason_is_covered() -> None:
    assert {case.reason for case in CASES} == set(EXPECTED)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.reason.value}:{c.id}")
async def test_rejection(
    case: Refused,
    make_gateway: GatewayFactory,
    token: Callable[..., str],
    signing_keys: dict[str, SigningKey],
    clock: FakeClock,
    idp: FakeIdP,
    upstream: EchoUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(case.edit)
    fetches = idp.hits
    request = case.build(Kit(token, signing_keys, clock))
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    response = await send_raw(gateway.client, request.method, request.target, request.headers)

    assert response.status == EXPECTED[case.reason][0], response.body
    assert response.headers.getall("WWW-Authenticate", []) == (
        [challenge] if (challenge := expected_challenge(case.reason, case.scope)) else []
    )
    assert response.headers.get("Cache-Control") == "no-store"
    assert response.headers["Content-Type"].partition(";")[0] == "application/json"
    assert response.json() == expected_body(case.reason)
    for fragment in LIBRARY_TEXT:
        assert fragment not in response.body.decode()
    assert upstream.hits == 0
    assert idp.hits - fetches == case.jwks_fetches
    assert gateway.metric("gateway_requests_total", route=case.route, reason=case.reason) == 1
    assert requests_total(gateway) == 1
    [line] = decision_lines(caplog)
    assert f"reason={case.reason.value}" in line.split()
    assert f"route={case.route}" in line.split()
    if request.token is not None and request.token.count(".") == 2:
        assert_not_logged(caplog, request.token)
        signature = request.token.rsplit(".", 1)[1]
        if signature:
            assert_not_logged(caplog, signature)


# --- accepted tokens ----------------------------------------------------------------------------
async def _get(gateway: RunningGateway, target: str, *headers: tuple[str, str]) -> RawResponse:
    return await send_raw(gateway.client, "GET", target, headers)


def _auth(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


@pytest.mark.parametrize("alg", ALL_ALGORITHMS)
async def test_every_pinned_algorithm_is_accepted(
    alg: str,
    gateway: RunningGateway,
    token: Callable[..., str],
    signing_keys: dict[str, SigningKey],
    upstream: EchoUpstream,
) -> None:
    minted = token(key=signing_keys[alg])
    assert jwt.get_unverified_header(minted) == {
        "alg": alg,
        "kid": f"key-{alg.lower()}",
        "typ": "JWT",
    }

    seen = echoed(await _get(gateway, "/api/orders", _auth(minted)))

    assert values_of(seen, "X-User-Sub") == ["alice"]
    assert upstream.hits == 1
    assert gateway.metric("gateway_requests_total", route="api", reason="ok") == 1
    assert requests_total(gateway) == 1


async def test_expiry_leeway_follows_the_gateway_clock(
    gateway: RunningGateway, token: Callable[..., str], clock: FakeClock, upstream: EchoUpstream
) -> None:
    minted = token(exp=int(clock.time()) + 10)
    clock.advance(35)  # exp is 25 s in the past: inside the 30 s leeway

    inside = await _get(gateway, "/api/orders", _auth(minted))
    clock.advance(6)  # now 31 s past exp
    outside = await _get(gateway, "/api/orders", _auth(minted))

    assert inside.status == 200
    assert outside.status == 401
    assert outside.json() == expected_body(Reason.TOKEN_EXPIRED)
    assert upstream.hits == 1


ACCEPTED_EDGES: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("nbf-inside-leeway", {"nbf": 25}, "Bearer"),
    ("iat-inside-leeway", {"iat": 25}, "Bearer"),
    ("aud-list-containing-ours", {"aud": ["other", "api"]}, "Bearer"),
    ("scheme-lower-case", {}, "bearer"),
    ("scheme-upper-case", {}, "BEARER"),
)


@pytest.mark.parametrize(
    ("claims", "scheme"), [c[1:] for c in ACCEPTED_EDGES], ids=[c[0] for c in ACCEPTED_EDGES]
)
async def test_accepted_edges(
    claims: dict[str, Any],
    scheme: str,
    gateway: RunningGateway,
    token: Callable[..., str],
    clock: FakeClock,
) -> None:
    now = int(clock.time())
    resolved = {k: now + v if k in ("nbf", "iat") else v for k, v in claims.items()}
    minted = token(**resolved)

    response = await _get(gateway, "/api/orders", ("Authorization", f"{scheme} {minted}"))

    assert response.status == 200, response.body
    assert gateway.metric("gateway_requests_total", route="api", reason="ok") == 1


async def test_scope_granted_is_forwarded(
    gateway: RunningGateway, token: Callable[..., str]
) -> None:
    minted = token(scope="profile orders:read")
    seen = echoed(await _get(gateway, "/scoped/orders", _auth(minted)))
    assert values_of(seen, "X-Scope") == ["profile orders:read"]
    assert gateway.metric("gateway_requests_total", route="scoped", reason="ok") == 1


# --- header hygiene -----------------------------------------------------------------------------
SPOOFED: Headers = (
    ("X-User-Sub", "root"),
    ("x-user-sub", "root"),
    ("X-USER-SUB", "root"),
    ("x-user-email", "evil@example.com"),
    ("X-TENANT-ID", "evil-tenant"),
    ("X-Tenant-Id", "evil-tenant"),
    ("x-scope", "admin"),  # owned by the scoped route: stripped on every route
)


@pytest.mark.parametrize("route", ["api", "public"])
async def test_client_copies_of_claim_headers_never_reach_upstream(
    route: str, gateway: RunningGateway, token: Callable[..., str]
) -> None:
    headers = list(SPOOFED)
    if route == "api":
        headers.append(_auth(token()))  # the token carries no email, tenant or scope
    target = "/api/orders" if route == "api" else "/public/page"

    seen = echoed(await send_raw(gateway.client, "GET", target, headers))

    assert values_of(seen, "X-User-Sub") == (["alice"] if route == "api" else [])
    for name in ("X-User-Email", "X-Tenant-Id", "X-Scope"):
        assert values_of(seen, name) == []
    spoofed_values = {value for _, value in SPOOFED}
    assert not [value for _, value in seen if value in spoofed_values]


HOP_BY_HOP: Headers = (
    ("Connection", "X-Secret"),
    ("X-Secret", "1"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("TE", "trailers"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Upgrade", "websocket"),
    ("Proxy-Connection", "keep-alive"),
    ("X-Kept", "yes"),
)


@pytest.mark.parametrize("route", ["api", "public"])
async def test_hop_by_hop_and_connection_named_headers_are_stripped(
    route: str, gateway: RunningGateway, token: Callable[..., str]
) -> None:
    headers = list(HOP_BY_HOP)
    if route == "api":
        headers.append(_auth(token()))
    target = "/api/orders" if route == "api" else "/public/page"

    seen = echoed(await send_raw(gateway.client, "GET", target, headers))

    assert values_of(seen, "X-Kept") == ["yes"]
    for name in ("X-Secret", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert values_of(seen, name) == [], name
    assert values_of(seen, "Proxy-Connection") == []
    assert not [v for v in values_of(seen, "Connection") if "x-secret" in v.lower()]


FORWARDING_SPOOF: Headers = (
    ("Host", "gw.example:8443"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-For", "198.51.100.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "for=203.0.113.9;proto=https;host=evil.example"),
    ("X-Real-IP", "203.0.113.9"),
)


async def test_forwarding_headers_of_an_untrusted_peer_are_replaced(
    gateway: RunningGateway, upstream: EchoUpstream
) -> None:
    seen = echoed(await send_raw(gateway.client, "GET", "/public/page", FORWARDING_SPOOF))

    assert values_of(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values_of(seen, "X-Forwarded-Proto") == ["http"]
    assert values_of(seen, "X-Forwarded-Host") == ["gw.example:8443"]
    assert values_of(seen, "Forwarded") == []
    assert values_of(seen, "X-Real-IP") == []
    assert values_of(seen, "Host") == [urlsplit(upstream.url).netloc]


async def test_forwarding_chain_of_a_trusted_proxy_is_kept_and_extended(
    make_gateway: GatewayFactory,
) -> None:
    def trust_loopback(doc: dict[str, Any]) -> None:
        doc["trusted_proxies"] = ["127.0.0.1/32"]

    gateway = await make_gateway(trust_loopback)

    seen = echoed(await send_raw(gateway.client, "GET", "/public/page", FORWARDING_SPOOF))

    assert values_of(seen, "X-Forwarded-For") == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
    assert values_of(seen, "X-Forwarded-Proto") == ["https"]
    assert values_of(seen, "X-Forwarded-Host") == ["evil.example"]


@pytest.mark.parametrize("forward_token", [False, True], ids=["default", "forward_token"])
async def test_authorization_is_removed_unless_forward_token(
    forward_token: bool,
    make_gateway: GatewayFactory,
    token: Callable[..., str],
    upstream: EchoUpstream,
) -> None:
    def edit(doc: dict[str, Any]) -> None:
        if forward_token:
            doc["routes"][0]["auth"]["forward_token"] = True

    gateway = await make_gateway(edit)
    minted = token()

    seen = echoed(await _get(gateway, "/api/orders", _auth(minted)))

    assert values_of(seen, "Authorization") == ([f"Bearer {minted}"] if forward_token else [])
    assert values_of(seen, "X-User-Sub") == ["alice"]
    assert values_of(seen, "Host") == [urlsplit(upstream.url).netloc]


# --- routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/api", "api"),
        ("/api/", "api"),
        ("/api/orders/1", "api"),
        ("/scoped", "scoped"),
        ("/public", "public"),
        ("/publicity", UNMATCHED_ROUTE),
        ("/API/orders", UNMATCHED_ROUTE),
        ("/", UNMATCHED_ROUTE),
    ],
)
async def test_prefixes_match_whole_segments(
    target: str, route: str, gateway: RunningGateway, token: Callable[..., str]
) -> None:
    response = await _get(gateway, target, _auth(token(scope="orders:read")))

    if route == UNMATCHED_ROUTE:
        assert response.status == 404
        assert response.json() == expected_body(Reason.ROUTE_NOT_FOUND)
        assert gateway.metric("gateway_requests_total", route=route, reason="route_not_found") == 1
    else:
        assert response.json()["path"] == target
        assert gateway.metric("gateway_requests_total", route=route, reason="ok") == 1


@pytest.mark.parametrize(
    ("method", "status"), [("GET", 200), ("POST", 200), ("DELETE", 404), ("PUT", 404)]
)
async def test_method_filter_on_public_route(
    method: str, status: int, gateway: RunningGateway, upstream: EchoUpstream
) -> None:
    response = await send_raw(gateway.client, method, "/public/page", body=b"x")
    assert response.status == status
    assert upstream.hits == (1 if status == 200 else 0)
    if status == 200:
        assert response.json()["method"] == method


@pytest.mark.parametrize(
    "target",
    [
        "/api/a%20b?x=1&y=%2F",
        "/api/orders?q=a+b&q=c&empty=&next=..%2F..%2Fadmin",
        "/api/caf%C3%A9/%E2%82%AC?%7E=1",
        "/public/a%20b?x=1&y=%2F",
    ],
)
async def test_raw_path_and_query_are_forwarded_unchanged(
    target: str, gateway: RunningGateway, token: Callable[..., str]
) -> None:
    response = await _get(gateway, target, _auth(token()))
    assert response.status == 200, response.body
    assert response.json()["path"] == target


async def test_public_route_needs_no_token(
    gateway: RunningGateway, upstream: EchoUpstream, idp: FakeIdP
) -> None:
    fetches = idp.hits
    response = await _get(gateway, "/public/page")
    assert response.status == 200
    assert upstream.hits == 1
    assert idp.hits == fetches
    assert gateway.metric("gateway_requests_total", route="public", reason="ok") == 1


# --- claim rendering ----------------------------------------------------------------------------
ABSENT = object()
RENDERED: tuple[tuple[str, object, str | None], ...] = (
    ("string", "plain text", "plain text"),
    ("int", 42, "42"),
    ("negative-int", -7, "-7"),
    ("bool-true", True, "true"),
    ("bool-false", False, "false"),
    ("integral-float", 3.0, "3"),
    ("float", 2.5, "2.5"),
    ("list-of-strings", ["a", "b", "c"], "a,b,c"),
    ("list-of-ints", [1, 2], "1,2"),
    ("object", {"b": 1, "a": "x"}, '{"a":"x","b":1}'),
    ("utf8", "Zoë", "Zoë"),
    ("null", None, None),
    ("absent", ABSENT, None),
)


@pytest.mark.parametrize(
    ("value", "expected"), [r[1:] for r in RENDERED], ids=[r[0] for r in RENDERED]
)
async def test_claim_values_as_headers(
    value: object, expected: str | None, make_gateway: GatewayFactory, token: Callable[..., str]
) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["routes"][0]["claim_headers"]["X-Claim"] = "c"

    gateway = await make_gateway(edit)
    minted = token() if value is ABSENT else token(c=value)

    response = await gateway.client.get("/api/orders", headers=bearer(minted))

    assert response.status == 200
    seen = [(k, v) for k, v in (await response.json())["headers"]]
    assert values_of(seen, "X-Claim") == ([] if expected is None else [expected])


async def test_one_cached_token_earns_each_routes_own_claim_headers(
    make_gateway: GatewayFactory, token: Callable[..., str]
) -> None:
    """The headers a cached token earns are remembered per route: another route sharing the
    token gets its own mapping, never the first route's, in whatever order they are asked."""

    def edit(doc: dict[str, Any]) -> None:
        doc["routes"][1]["claim_headers"] = {"X-Scope": "scope", "X-Caller": "sub"}

    gateway = await make_gateway(edit)
    minted = token(sub="alice", email="a@example.com", scope="orders:read")
    for _ in range(2):
        api = echoed(await _get(gateway, "/api/orders", _auth(minted)))
        scoped = echoed(await _get(gateway, "/scoped/x", _auth(minted)))
        assert (values_of(api, "X-User-Sub"), values_of(api, "X-User-Email")) == (
            ["alice"],
            ["a@example.com"],
        )
        assert values_of(api, "X-Scope") == values_of(api, "X-Caller") == []
        assert (values_of(scoped, "X-Scope"), values_of(scoped, "X-Caller")) == (
            ["orders:read"],
            ["alice"],
        )
        assert values_of(scoped, "X-User-Sub") == values_of(scoped, "X-User-Email") == []


NESTED: tuple[tuple[str, dict[str, Any], str | None], ...] = (
    ("nested-string", {"org": {"tenant_id": "acme"}}, "acme"),
    ("nested-int", {"org": {"tenant_id": 7}}, "7"),
    ("parent-missing", {}, None),
    ("parent-not-an-object", {"org": "acme"}, None),
    ("leaf-missing", {"org": {"name": "Acme"}}, None),
    ("dotted-name-is-not-a-path", {"org.tenant_id": "flat"}, None),
)


@pytest.mark.parametrize(
    ("claims", "expected"), [n[1:] for n in NESTED], ids=[n[0] for n in NESTED]
)
async def test_nested_claim_path(
    claims: dict[str, Any],
    expected: str | None,
    gateway: RunningGateway,
    token: Callable[..., str],
) -> None:
    seen = echoed(await _get(gateway, "/api/orders", _auth(token(**claims))))
    assert values_of(seen, "X-Tenant-Id") == ([] if expected is None else [expected])


# --- logging ------------------------------------------------------------------------------------
async def test_accepted_request_logs_one_line_and_never_the_token(
    gateway: RunningGateway, token: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    minted = token()
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    response = await _get(gateway, "/api/orders", _auth(minted))

    assert response.status == 200
    [line] = decision_lines(caplog)
    assert "reason=ok" in line.split()
    assert "route=api" in line.split()
    assert "kid=key-rs256" in line.split()
    assert_not_logged(caplog, minted)
    assert_not_logged(caplog, minted.rsplit(".", 1)[1])


CLIENT_CLAIMS: Headers = (
    ("Host", "gw.example"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Forwarded-Server", "internal"),
    ("X-Forwarded-Uri", "/admin/reset"),
    ("X_Forwarded_Prefix", "/admin"),
    ("X-Original-URL", "/admin/reset"),
    ("X-Rewrite-URL", "/admin/reset"),
    ("X-Original-Forwarded-For", "10.0.0.1"),
    ("True-Client-IP", "10.0.0.1"),
    ("CF-Connecting-IP", "10.0.0.1"),
    ("X-Client-IP", "10.0.0.1"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Tenant-Override", "evil"),
    ("X-Kept", "yes"),
)
_METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method")


async def test_every_header_that_claims_who_the_client_is_goes_from_an_untrusted_peer(
    make_gateway: GatewayFactory,
) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["strip_untrusted_headers"] = ["X-Tenant-Override"]

    gateway = await make_gateway(edit)
    seen = echoed(await send_raw(gateway.client, "GET", "/public/page", CLIENT_CLAIMS))

    assert values_of(seen, "X-Kept") == ["yes"]
    gone = [name for name, _ in CLIENT_CLAIMS if name not in ("Host", "X-Kept")]
    assert [name for name, _ in seen if name in gone] == []
    assert values_of(seen, "X-Forwarded-Host") == ["gw.example"]


async def test_a_trusted_proxy_keeps_its_forwarded_names_but_never_a_method_override(
    make_gateway: GatewayFactory,
) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["trusted_proxies"] = ["127.0.0.1/32"]

    gateway = await make_gateway(edit)
    sent = (*CLIENT_CLAIMS, ("X-Forwarded-Host", "evil.com/.example.com"))
    seen = echoed(await send_raw(gateway.client, "GET", "/public/page", sent))

    assert values_of(seen, "X-Forwarded-Prefix") == ["/admin"]
    assert values_of(seen, "True-Client-IP") == ["10.0.0.1"]
    for name in _METHOD_OVERRIDES:  # they would change the method the route judged
        assert values_of(seen, name) == [], name
    # Only a valid host[:port] becomes X-Forwarded-Host, from a trusted proxy too.
    assert values_of(seen, "X-Forwarded-Host") == ["gw.example"]


async def test_dotted_spellings_of_claim_headers_are_stripped(
    gateway: RunningGateway, token: Callable[..., str]
) -> None:
    sent = (("X.User.Sub", "root"), ("x.user.email", "evil@example.com"), _auth(token()))
    seen = echoed(await send_raw(gateway.client, "GET", "/api/orders", sent))
    assert [value for _, value in seen if value in ("root", "evil@example.com")] == []
    assert values_of(seen, "X-User-Sub") == ["alice"]
