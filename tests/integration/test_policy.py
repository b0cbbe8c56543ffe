"""Route policies end to end, over HTTP only: host/method/path matching, prefix rewrites, token
sources, several issuers on one route, optional and report-only modes, scopes and claim matchers,
claim and payload headers, forward_token, CORS preflights and the config errors of each new key.

Each group adds its routes in front of the base config (``tests/conftest.py``) and asserts what a
user would notice: the status, the reason in the JSON body, the ``WWW-Authenticate`` challenge and
what the echo upstream received (or that it received nothing).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from gateway import ConfigError, loads_config
from gateway.metrics import UNMATCHED_ROUTE
from gateway.reasons import Reason
from gateway.routing import rewritten
from tests.conftest import ISSUER, GatewayFactory, RunningGateway, base_config
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token
from tests.integration.authkit import decision_lines, values_of
from tests.integration.policykit import (
    IDENTITY,
    PARTNER_ISSUER,
    Edit,
    Header,
    add_routes,
    assert_refused,
    auth,
    authz,
    chain,
    decode_segment,
    get,
    one,
    route,
    seen_by_upstream,
)

Mint = Callable[..., str]


def _took(gateway: RunningGateway, route_id: str, reason: str = "ok") -> bool:
    return gateway.metric("gateway_requests_total", route=route_id, reason=reason) == 1


# =================================================================================================
# Route matching: hosts, methods, exact path vs segment-aware prefix, first match wins
# =================================================================================================
HOST_ROUTES = add_routes(
    route("host-exact", {"path_prefix": "/h", "hosts": ["api.example.com"]}),
    route("host-wild", {"path_prefix": "/h", "hosts": ["*.example.com"]}),
    route("host-any", "/h"),
    route("host-only", {"path_prefix": "/only", "hosts": ["Admin.Example.COM"]}),
)


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        pytest.param("/h/x", "api.example.com", "host-exact", id="exact"),
        pytest.param("/h/x", "API.Example.COM", "host-exact", id="exact-any-case"),
        pytest.param("/h/x", "api.example.com:8443", "host-exact", id="exact-with-port"),
        pytest.param("/h/x", "api.example.com.:443", "host-exact", id="exact-trailing-dot"),
        pytest.param("/h/x", "a.example.com", "host-wild", id="wildcard-one-label"),
        pytest.param("/h/x", "A.B.EXAMPLE.com:80", "host-wild", id="wildcard-deeper-any-case"),
        pytest.param("/h/x", "example.com", "host-any", id="wildcard-needs-a-label"),
        pytest.param("/h/x", "notexample.com", "host-any", id="wildcard-is-not-a-suffix"),
        pytest.param("/h/x", "api.example.com.evil.test", "host-any", id="exact-not-a-prefix"),
        pytest.param("/only/x", "admin.example.com:9000", "host-only", id="config-any-case"),
        pytest.param("/only/x", "other.example.com", UNMATCHED_ROUTE, id="other-host-404"),
        pytest.param("/only/x", "example.com", UNMATCHED_ROUTE, id="parent-domain-404"),
    ],
)
async def test_hosts(
    target: str, host: str, expected: str, make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(HOST_ROUTES)

    response = await get(gateway, target, ("Host", host))

    if expected == UNMATCHED_ROUTE:
        assert_refused(response, Reason.ROUTE_NOT_FOUND)
        assert upstream.hits == 0
        assert _took(gateway, UNMATCHED_ROUTE, "route_not_found")
    else:
        assert response.status == 200, response.body
        assert response.json()["path"] == target
        assert _took(gateway, expected)


MATCH_ROUTES = add_routes(
    route("reads", {"path_prefix": "/m", "methods": ["GET", "HEAD"]}),
    route("writes", {"path_prefix": "/m", "methods": ["POST", "PUT"]}),
    route("status", {"path": "/x/status"}),
    route("x-tree", "/x"),
)


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        pytest.param("GET", "/m/a", "reads", id="get"),
        pytest.param("HEAD", "/m/a", "reads", id="head"),
        pytest.param("POST", "/m/a", "writes", id="post"),
        pytest.param("PUT", "/m", "writes", id="put-prefix-itself"),
        pytest.param("DELETE", "/m/a", UNMATCHED_ROUTE, id="method-listed-nowhere"),
        pytest.param("GET", "/x/status", "status", id="exact"),
        pytest.param("GET", "/x/status?verbose=1", "status", id="exact-ignores-query"),
        pytest.param("GET", "/x/status/", "x-tree", id="exact-not-trailing-slash"),
        pytest.param("GET", "/x/status/more", "x-tree", id="exact-not-a-prefix"),
        pytest.param("GET", "/x/statusx", "x-tree", id="prefix-covers-sibling"),
        pytest.param("GET", "/x", "x-tree", id="prefix-itself"),
        pytest.param("GET", "/xy", UNMATCHED_ROUTE, id="prefix-whole-segments"),
    ],
)
async def test_methods_and_paths(
    method: str,
    target: str,
    expected: str,
    make_gateway: GatewayFactory,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(MATCH_ROUTES)

    response = await get(gateway, target, method=method)

    if expected == UNMATCHED_ROUTE:
        assert_refused(response, Reason.ROUTE_NOT_FOUND)
        assert upstream.hits == 0
    else:
        assert response.status == 200, response.body
        assert upstream.hits == 1
        assert _took(gateway, expected)


@pytest.mark.parametrize("public_first", [True, False], ids=["public-listed-first", "api-first"])
async def test_first_match_wins(
    public_first: bool, make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    """``/api/docs`` fits both the public ``docs`` route and the base ``api`` route."""
    gateway = await make_gateway(
        add_routes(route("docs", {"path_prefix": "/api/docs"}), last=not public_first)
    )

    response = await get(gateway, "/api/docs/index.html")

    if public_first:
        assert response.status == 200
        assert _took(gateway, "docs")
    else:
        assert_refused(response, Reason.TOKEN_MISSING)
        assert upstream.hits == 0
        assert _took(gateway, "api", "token_missing")


# =================================================================================================
# Rewrite: strip_prefix, replace_prefix; the query passes raw; unsafe paths refused first
# =================================================================================================
REWRITE_ROUTES = add_routes(
    route("strip", "/svc", rewrite={"strip_prefix": True}),
    route("replace", "/old", rewrite={"replace_prefix": "/v2"}),
    route("deep", "/a/b", rewrite={"replace_prefix": "/c/d"}),
    route("to-root", "/root", rewrite={"replace_prefix": "/"}),
    route(
        "strip-auth",
        "/secure",
        auth(token_from=[{"query": "access_token"}]),
        rewrite={"strip_prefix": True},
        claim_headers=IDENTITY,
    ),
)


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        pytest.param("/svc/orders/1?x=1", "/orders/1?x=1", id="strip"),
        pytest.param("/svc", "/", id="strip-prefix-itself"),
        pytest.param("/svc/", "/", id="strip-prefix-slash"),
        pytest.param("/svc?x=1", "/?x=1", id="strip-prefix-with-query"),
        pytest.param(
            "/svc/a%20b/caf%C3%A9?q=a+b&r=%2F..%2F&e=&e=2",
            "/a%20b/caf%C3%A9?q=a+b&r=%2F..%2F&e=&e=2",
            id="strip-keeps-encoding-and-query",
        ),
        pytest.param("/old/x", "/v2/x", id="replace"),
        pytest.param("/old", "/v2", id="replace-prefix-itself"),
        pytest.param("/old/x/y?z=%41", "/v2/x/y?z=%41", id="replace-with-query"),
        pytest.param("/a/b/c", "/c/d/c", id="replace-multi-segment"),
        pytest.param("/root/x?y=1", "/x?y=1", id="replace-with-slash"),
        pytest.param("/svcx/1", None, id="not-the-prefix"),
    ],
)
async def test_rewrite(
    target: str, forwarded: str | None, make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(REWRITE_ROUTES)

    response = await get(gateway, target)

    if forwarded is None:
        assert_refused(response, Reason.ROUTE_NOT_FOUND)
        assert upstream.hits == 0
    else:
        assert response.status == 200, response.body
        assert response.json()["path"] == forwarded


async def test_rewrite_on_an_authenticated_route(
    make_gateway: GatewayFactory, token: Mint, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(REWRITE_ROUTES)
    minted = token()

    missing = await get(gateway, "/secure/orders?page=2")
    admitted = await get(gateway, f"/secure/orders?page=2&access_token={minted}&sort=id")

    assert_refused(missing, Reason.TOKEN_MISSING)
    assert upstream.hits == 1
    assert admitted.json()["path"] == "/orders?page=2&sort=id"
    assert one(seen_by_upstream(admitted), "X-User-Sub") == "alice"


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/svc/../api/orders", id="dot-dot"),
        pytest.param("/svc/./orders", id="dot"),
        pytest.param("/svc/%2e%2e/api", id="encoded-dot-dot"),
        pytest.param("/svc/%2E%2E/api", id="encoded-dot-dot-upper"),
        pytest.param("/svc/a%2Fb", id="encoded-slash"),
        pytest.param("/svc/a%5cb", id="encoded-backslash"),
        pytest.param("/svc//orders", id="empty-segment"),
        pytest.param("/old/..", id="dot-dot-at-end"),
        pytest.param("/old/%252e", id="double-encoding"),
        pytest.param("/old/x;jsessionid=1", id="path-parameter"),
    ],
)
async def test_unsafe_paths_are_refused_before_any_rewrite(
    target: str, make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(REWRITE_ROUTES)

    response = await get(gateway, target)

    assert_refused(response, Reason.REQUEST_REJECTED)
    assert upstream.hits == 0
    assert _took(gateway, UNMATCHED_ROUTE, "request_rejected")


# =================================================================================================
# Token sources: custom header (with and without prefix), cookie, query; never two
# =================================================================================================
TOKEN_ROUTES = add_routes(
    route("hdr", "/hdr", auth(token_from=[{"header": "X-Api-Token", "prefix": "Token "}]),
          claim_headers=IDENTITY),
    route("raw", "/raw", auth(token_from=[{"header": "X-Api-Key"}]), claim_headers=IDENTITY),
    route("ck", "/ck", auth(token_from=[{"cookie": "access_token"}]), claim_headers=IDENTITY),
    route("ckfwd", "/ckfwd", auth(token_from=[{"cookie": "access_token"}], forward_token=True),
          claim_headers=IDENTITY),
    route("qs", "/qs", auth(token_from=[{"query": "access_token"}]), claim_headers=IDENTITY),
    route(
        "multi", "/multi",
        auth(token_from=[{"header": "Authorization", "prefix": "Bearer "},
                         {"cookie": "access_token"}, {"query": "access_token"}]),
        claim_headers=IDENTITY,
    ),
)  # fmt: skip


def _fill(template: str, minted: str) -> str:
    return template.replace("{t}", minted)


@dataclass(frozen=True)
class Carried:
    """A request carrying the token ``{t}`` somewhere; what the upstream must (not) see."""

    target: str
    headers: tuple[Header, ...]
    forwarded_path: str
    upstream_sees: tuple[tuple[str, tuple[str, ...]], ...] = ()  # name → every value, in order


CARRIED = {
    "header-with-prefix": Carried(
        "/hdr/x", (("X-Api-Token", "Token {t}"),), "/hdr/x", (("X-Api-Token", ()),)
    ),
    "header-prefix-any-case": Carried(
        "/hdr/x", (("x-api-token", "TOKEN {t}"),), "/hdr/x", (("X-Api-Token", ()),)
    ),
    "header-authorization-still-removed": Carried(
        "/hdr/x",
        (("X-Api-Token", "Token {t}"), ("Authorization", "Basic YWxpY2U6cHc=")),
        "/hdr/x",
        (("Authorization", ()),),
    ),
    "header-without-prefix": Carried(
        "/raw/x?k=1", (("X-Api-Key", "{t}"),), "/raw/x?k=1", (("X-Api-Key", ()),)
    ),
    "cookie-among-others": Carried(
        "/ck/x",
        (("Cookie", "theme=dark; access_token={t}; lang=en"),),
        "/ck/x",
        (("Cookie", ("theme=dark; lang=en",)),),
    ),
    "cookie-alone": Carried("/ck/x", (("Cookie", "access_token={t}"),), "/ck/x", (("Cookie", ()),)),
    "cookie-across-headers": Carried(
        "/ck/x",
        (("Cookie", "theme=dark"), ("Cookie", "access_token={t}; lang=en")),
        "/ck/x",
        (("Cookie", ("theme=dark", "lang=en")),),
    ),
    "cookie-kept-with-forward-token": Carried(
        "/ckfwd/x",
        (("Cookie", "theme=dark; access_token={t}"),),
        "/ckfwd/x",
        (("Cookie", ("theme=dark; access_token={t}",)),),
    ),
    "query-among-others": Carried(
        "/qs/items?a=1&access_token={t}&b=%2F+c&a=2", (), "/qs/items?a=1&b=%2F+c&a=2"
    ),
    "query-alone": Carried("/qs/items?access_token={t}", (), "/qs/items"),
    "query-name-percent-encoded": Carried(
        "/qs/items?access%5Ftoken={t}&keep=%5F", (), "/qs/items?keep=%5F"
    ),
    "query-similar-names-kept": Carried(
        "/qs/items?access_token={t}&access_token_hint=x&xaccess_token=y",
        (),
        "/qs/items?access_token_hint=x&xaccess_token=y",
    ),
    "multi-authorization": Carried(
        "/multi/x?keep=1",
        (("Authorization", "Bearer {t}"),),
        "/multi/x?keep=1",
        (("Authorization", ()),),
    ),
    "multi-cookie": Carried(
        "/multi/x", (("Cookie", "access_token={t}; a=b"),), "/multi/x", (("Cookie", ("a=b",)),)
    ),
    "multi-query": Carried("/multi/x?access_token={t}&keep=1", (), "/multi/x?keep=1"),
}


@pytest.mark.parametrize("case", CARRIED.values(), ids=CARRIED.keys())
async def test_token_source_admits_and_hides_the_token(
    case: Carried, make_gateway: GatewayFactory, token: Mint
) -> None:
    gateway = await make_gateway(TOKEN_ROUTES)
    minted = token()
    headers = [(name, _fill(value, minted)) for name, value in case.headers]

    response = await get(gateway, _fill(case.target, minted), *headers)

    seen = seen_by_upstream(response)
    assert response.json()["path"] == case.forwarded_path
    assert one(seen, "X-User-Sub") == "alice"
    for name, values in case.upstream_sees:
        assert values_of(seen, name) == [_fill(v, minted) for v in values], name
    if not case.target.startswith("/ckfwd"):
        assert not [value for _, value in seen if minted in value]


@dataclass(frozen=True)
class Misplaced:
    target: str
    headers: tuple[Header, ...]
    reason: Reason
    route: str


MISPLACED = {
    "header-other-scheme": Misplaced(
        "/hdr/x", (("X-Api-Token", "Bearer {t}"),), Reason.TOKEN_MISSING, "hdr"
    ),
    "authorization-not-a-source": Misplaced(
        "/hdr/x", (("Authorization", "Bearer {t}"),), Reason.TOKEN_MISSING, "hdr"
    ),
    "query-not-configured": Misplaced(
        "/api/orders?access_token={t}", (), Reason.TOKEN_MISSING, "api"
    ),
    "cookie-not-configured": Misplaced(
        "/api/orders", (("Cookie", "access_token={t}"),), Reason.TOKEN_MISSING, "api"
    ),
    "query-on-a-cookie-route": Misplaced("/ck/x?access_token={t}", (), Reason.TOKEN_MISSING, "ck"),
    "other-cookie-name": Misplaced(
        "/ck/x", (("Cookie", "access_token_old={t}"),), Reason.TOKEN_MISSING, "ck"
    ),
    "header-and-cookie": Misplaced(
        "/multi/x",
        (("Authorization", "Bearer {t}"), ("Cookie", "access_token={t}")),
        Reason.INVALID_REQUEST,
        "multi",
    ),
    "cookie-and-query": Misplaced(
        "/multi/x?access_token={t}",
        (("Cookie", "access_token={t}"),),
        Reason.INVALID_REQUEST,
        "multi",
    ),
    "header-and-query": Misplaced(
        "/multi/x?access_token={t}",
        (("Authorization", "Bearer {t}"),),
        Reason.INVALID_REQUEST,
        "multi",
    ),
    "repeated-cookie": Misplaced(
        "/ck/x", (("Cookie", "access_token={t}; access_token={t}"),), Reason.INVALID_REQUEST, "ck"
    ),
    "repeated-cookie-across-headers": Misplaced(
        "/ck/x",
        (("Cookie", "access_token={t}"), ("Cookie", "x=1; access_token={t}")),
        Reason.INVALID_REQUEST,
        "ck",
    ),
    "repeated-query": Misplaced(
        "/qs/x?access_token={t}&access_token={t}", (), Reason.INVALID_REQUEST, "qs"
    ),
    "repeated-query-one-encoded": Misplaced(
        "/qs/x?access_token={t}&access%5ftoken={t}", (), Reason.INVALID_REQUEST, "qs"
    ),
    "repeated-custom-header": Misplaced(
        "/hdr/x",
        (("X-Api-Token", "Token {t}"), ("X-Api-Token", "Token {t}")),
        Reason.INVALID_REQUEST,
        "hdr",
    ),
    "unprefixed-header-with-a-scheme": Misplaced(
        "/raw/x", (("X-Api-Key", "Bearer {t}"),), Reason.INVALID_REQUEST, "raw"
    ),
}


@pytest.mark.parametrize("case", MISPLACED.values(), ids=MISPLACED.keys())
async def test_token_source_refusals(
    case: Misplaced, make_gateway: GatewayFactory, token: Mint, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(TOKEN_ROUTES)
    minted = token()
    headers = [(name, _fill(value, minted)) for name, value in case.headers]

    response = await get(gateway, _fill(case.target, minted), *headers)

    assert_refused(response, case.reason)
    assert upstream.hits == 0
    assert _took(gateway, case.route, case.reason.value)


async def test_token_header_with_underscore_is_not_forwarded(
    make_gateway: GatewayFactory, token: Mint
) -> None:
    gateway = await make_gateway(
        add_routes(route("under", "/under", auth(token_from=[{"header": "X_Api_Token"}])))
    )
    minted = token()

    seen = seen_by_upstream(await get(gateway, "/under/x", ("X_Api_Token", minted)))

    assert not [value for _, value in seen if minted in value]


# =================================================================================================
# Several issuers on one route, each bound to its own key set, algorithms and leeway
# =================================================================================================
@dataclass
class Partner:
    """A second identity provider: its own keys, one of them under a kid the first IdP uses too."""

    idp: FakeIdP
    key: SigningKey  # ES256, kid partner-es256
    shadow: SigningKey  # ES256 under "key-es256", the kid of the first IdP's ES256 key


@pytest.fixture(scope="session")
def partner_keys() -> tuple[SigningKey, SigningKey]:
    return generate_key("ES256", "partner-es256"), generate_key("ES256", "key-es256")


@pytest.fixture
async def partner(
    aiohttp_server: Any, partner_keys: tuple[SigningKey, SigningKey]
) -> AsyncIterator[Partner]:
    fake = FakeIdP()
    fake.publish(*partner_keys)
    server = await aiohttp_server(fake.app())
    fake.jwks_uri = str(server.make_url("/jwks.json"))
    yield Partner(fake, *partner_keys)
    fake.release.set()


def _two_issuers(partner: Partner) -> Edit:
    def add_partner(doc: dict[str, Any]) -> None:
        doc["issuers"]["partner"] = {
            "issuer": PARTNER_ISSUER,
            "jwks_uri": partner.idp.jwks_uri,
            "algorithms": ["ES256"],
            "leeway_s": 120,
            "jwks_refetch_cooldown_s": 30,
            "jwks_fetch_timeout_s": 0.5,
        }

    return chain(
        add_partner,
        add_routes(
            route(
                "both",
                "/both",
                auth("test", "partner"),
                claim_headers={"X-User-Sub": "sub", "X-Issuer": "iss"},
            )
        ),
    )


@dataclass
class Issuers:
    """What a multi-issuer case mints with."""

    first: dict[str, SigningKey]
    partner: Partner
    clock: FakeClock

    @property
    def now(self) -> int:
        return int(self.clock.time())

    def mint(self, key: SigningKey, iss: str, **claims: Any) -> str:
        return make_token(key, self.clock, **{"iss": iss, "aud": "api", "sub": "alice", **claims})


@dataclass(frozen=True)
class IssuerCase:
    build: Callable[[Issuers], str]
    reason: Reason | None  # None: admitted
    issuer: str = ""


ISSUER_CASES = {
    "first-issuer": IssuerCase(lambda k: k.mint(k.first["RS256"], ISSUER), None, ISSUER),
    "first-issuer-es256": IssuerCase(lambda k: k.mint(k.first["ES256"], ISSUER), None, ISSUER),
    "partner": IssuerCase(lambda k: k.mint(k.partner.key, PARTNER_ISSUER), None, PARTNER_ISSUER),
    "claims-first-signed-by-partner-key": IssuerCase(
        lambda k: k.mint(k.partner.key, ISSUER), Reason.KEY_NOT_FOUND
    ),
    "claims-first-partner-key-under-shared-kid": IssuerCase(
        lambda k: k.mint(k.partner.shadow, ISSUER), Reason.SIGNATURE_INVALID
    ),
    "claims-partner-signed-by-first-key": IssuerCase(
        lambda k: k.mint(k.first["ES256"], PARTNER_ISSUER), Reason.SIGNATURE_INVALID
    ),
    "claims-partner-signed-by-first-key-own-kid": IssuerCase(
        lambda k: k.mint(k.first["EdDSA"], PARTNER_ISSUER), Reason.ALGORITHM_NOT_ALLOWED
    ),
    "partner-rs256-not-pinned-for-partner": IssuerCase(
        lambda k: k.mint(k.first["RS256"], PARTNER_ISSUER), Reason.ALGORITHM_NOT_ALLOWED
    ),
    "expired-60s-first-leeway-30": IssuerCase(
        lambda k: k.mint(k.first["RS256"], ISSUER, iat=k.now - 400, exp=k.now - 60),
        Reason.TOKEN_EXPIRED,
    ),
    "expired-60s-partner-leeway-120": IssuerCase(
        lambda k: k.mint(k.partner.key, PARTNER_ISSUER, iat=k.now - 400, exp=k.now - 60),
        None,
        PARTNER_ISSUER,
    ),
    "expired-121s-partner-leeway-120": IssuerCase(
        lambda k: k.mint(k.partner.key, PARTNER_ISSUER, iat=k.now - 400, exp=k.now - 121),
        Reason.TOKEN_EXPIRED,
    ),
    "nbf-90s-ahead-partner": IssuerCase(
        lambda k: k.mint(k.partner.key, PARTNER_ISSUER, nbf=k.now + 90), None, PARTNER_ISSUER
    ),
    "nbf-90s-ahead-first": IssuerCase(
        lambda k: k.mint(k.first["RS256"], ISSUER, nbf=k.now + 90), Reason.TOKEN_NOT_YET_VALID
    ),
}


@pytest.mark.parametrize("case", ISSUER_CASES.values(), ids=ISSUER_CASES.keys())
async def test_several_issuers_on_one_route(
    case: IssuerCase,
    make_gateway: GatewayFactory,
    partner: Partner,
    signing_keys: dict[str, SigningKey],
    clock: FakeClock,
    idp: FakeIdP,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(_two_issuers(partner))
    fetches = (idp.hits, partner.idp.hits)
    minted = case.build(Issuers(signing_keys, partner, clock))

    response = await get(gateway, "/both/x", authz(minted))

    if case.reason is None:
        seen = seen_by_upstream(response)
        assert one(seen, "X-Issuer") == case.issuer
        assert one(seen, "X-User-Sub") == "alice"
    else:
        assert_refused(response, case.reason)
        assert upstream.hits == 0
        assert _took(gateway, "both", case.reason.value)
    assert (idp.hits, partner.idp.hits) == fetches


async def test_partner_token_on_a_route_that_trusts_only_the_first_issuer(
    make_gateway: GatewayFactory,
    partner: Partner,
    clock: FakeClock,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(_two_issuers(partner))
    minted = make_token(partner.key, clock, iss=PARTNER_ISSUER, aud="api", sub="mallory")

    response = await get(gateway, "/api/orders", authz(minted))

    assert_refused(response, Reason.ISSUER_NOT_ALLOWED)
    assert upstream.hits == 0


# =================================================================================================
# Modes: optional and report-only
# =================================================================================================
SPOOFED_IDENTITY: tuple[Header, ...] = (
    ("X-User-Sub", "root"),
    ("x_user_sub", "root"),
    ("X-Gateway-Auth-Outcome", "ok"),
    ("x-gateway-auth-outcome", "ok"),
)
MODE_ROUTES = add_routes(
    route("opt", "/opt", auth(mode="optional"), claim_headers=IDENTITY),
    route("ro", "/ro", auth(mode="report-only", required_scopes=["orders:read"]),
          claim_headers=IDENTITY),
)  # fmt: skip


@dataclass(frozen=True)
class Presented:
    build: Callable[[Mint, int], tuple[Header, ...]]
    outcome: Reason  # what verification says


def _bearer(**claims: Any) -> Callable[[Mint, int], tuple[Header, ...]]:
    def build(mint: Mint, now: int) -> tuple[Header, ...]:
        resolved = {k: now + v if k in ("exp", "iat") else v for k, v in claims.items()}
        return (authz(mint(**resolved)),)

    return build


PRESENTED = {
    "no-token": Presented(lambda m, n: (), Reason.TOKEN_MISSING),
    "other-scheme": Presented(lambda m, n: (("Authorization", "Basic YWxpY2U6cHc="),),
                              Reason.TOKEN_MISSING),
    "valid": Presented(_bearer(scope="orders:read"), Reason.OK),
    "expired": Presented(_bearer(scope="orders:read", iat=-400, exp=-100), Reason.TOKEN_EXPIRED),
    "malformed": Presented(lambda m, n: (authz("not-a-jwt"),), Reason.TOKEN_MALFORMED),
    "wrong-audience": Presented(_bearer(scope="orders:read", aud="other"),
                                Reason.AUDIENCE_NOT_ALLOWED),
    "scope-missing": Presented(_bearer(scope="profile"), Reason.INSUFFICIENT_SCOPE),
    "two-tokens": Presented(
        lambda m, n: (authz(m()), authz(m())), Reason.INVALID_REQUEST
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", PRESENTED.values(), ids=PRESENTED.keys())
async def test_optional_mode(
    case: Presented,
    make_gateway: GatewayFactory,
    token: Mint,
    clock: FakeClock,
    upstream: EchoUpstream,
) -> None:
    """No token: forwarded without identity; a valid one: identity; anything else: refused.
    (The optional route requires no scope, so ``scope-missing`` is admitted there.)"""
    gateway = await make_gateway(MODE_ROUTES)
    outcome = Reason.OK if case.outcome is Reason.INSUFFICIENT_SCOPE else case.outcome

    response = await get(
        gateway, "/opt/x", *case.build(token, int(clock.time())), *SPOOFED_IDENTITY
    )

    if outcome in (Reason.OK, Reason.TOKEN_MISSING):
        seen = seen_by_upstream(response)
        assert values_of(seen, "X-User-Sub") == (["alice"] if outcome is Reason.OK else [])
        assert values_of(seen, "X_User_Sub") == []
        assert values_of(seen, "X-Gateway-Auth-Outcome") == []
        assert values_of(seen, "Authorization") == []
        assert _took(gateway, "opt")
    else:
        assert_refused(response, outcome)
        assert upstream.hits == 0
        assert _took(gateway, "opt", outcome.value)


@pytest.mark.parametrize("case", PRESENTED.values(), ids=PRESENTED.keys())
async def test_report_only_mode(
    case: Presented,
    make_gateway: GatewayFactory,
    token: Mint,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(MODE_ROUTES)
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    response = await get(gateway, "/ro/x", *case.build(token, int(clock.time())), *SPOOFED_IDENTITY)

    seen = seen_by_upstream(response)
    assert values_of(seen, "X-Gateway-Auth-Outcome") == [case.outcome.value]
    assert values_of(seen, "X-User-Sub") == (["alice"] if case.outcome is Reason.OK else [])
    assert values_of(seen, "X_User_Sub") == []
    assert values_of(seen, "Authorization") == []
    decisions = {
        reason.value: gateway.metric(
            "gateway_report_only_decisions_total", route="ro", reason=reason.value
        )
        for reason in Reason
    }
    assert {k: v for k, v in decisions.items() if v} == {case.outcome.value: 1.0}
    assert _took(gateway, "ro", "ok")
    assert gateway.metric("gateway_requests_total", route="ro", reason=case.outcome.value) == (
        1 if case.outcome is Reason.OK else 0
    )
    [line] = decision_lines(caplog)
    fields = line.split()
    assert "reason=ok" in fields
    assert "route=ro" in fields
    would_reject = [f for f in fields if f.startswith("would_reject=")]
    expected = [] if case.outcome is Reason.OK else [f"would_reject={case.outcome.value}"]
    assert would_reject == expected


async def test_report_only_outcomes_accumulate_per_reason(
    make_gateway: GatewayFactory, token: Mint, clock: FakeClock
) -> None:
    gateway = await make_gateway(MODE_ROUTES)
    now = int(clock.time())
    expired = token(scope="orders:read", iat=now - 400, exp=now - 100)

    for headers in [(), (), (authz(expired),), (authz(token(scope="orders:read")),)]:
        assert (await get(gateway, "/ro/x", *headers)).status == 200

    def decisions(reason: str) -> float:
        return gateway.metric("gateway_report_only_decisions_total", route="ro", reason=reason)

    assert (decisions("token_missing"), decisions("token_expired"), decisions("ok")) == (2, 1, 1)
    assert gateway.metric("gateway_requests_total", route="ro", reason="ok") == 4


@pytest.mark.parametrize("target", ["/public/page", "/api/orders", "/opt/x"])
async def test_client_sent_auth_outcome_never_passes_on_other_routes(
    target: str, make_gateway: GatewayFactory, token: Mint
) -> None:
    gateway = await make_gateway(MODE_ROUTES)

    seen = seen_by_upstream(await get(gateway, target, authz(token()), *SPOOFED_IDENTITY))

    assert values_of(seen, "X-Gateway-Auth-Outcome") == []
    assert values_of(seen, "x_gateway_auth_outcome") == []


# =================================================================================================
# Authorization: required scopes (all of / any of) and claim matchers
# =================================================================================================
SCOPE_CASES = [
    pytest.param(["orders:read", "orders:write"], {"scope": "orders:write profile orders:read"},
                 None, id="all-of-scope-string"),
    pytest.param(["orders:read", "orders:write"], {"scp": ["orders:read", "orders:write"]},
                 None, id="all-of-scp-list"),
    pytest.param(["orders:read", "orders:write"], {"scp": "orders:read orders:write"},
                 None, id="all-of-scp-string"),
    pytest.param({"all_of": ["orders:read", "orders:write"]},
                 {"scope": "orders:read orders:write"}, None, id="all-of-mapping"),
    pytest.param(["orders:read", "orders:write"], {"scope": "orders:read"},
                 "orders:read orders:write", id="all-of-one-missing"),
    pytest.param(["orders:read", "orders:write"], {"scp": ["orders:write"]},
                 "orders:read orders:write", id="all-of-scp-one-missing"),
    pytest.param({"all_of": ["orders:read", "orders:write"]}, {"scope": "orders:read"},
                 "orders:read orders:write", id="all-of-mapping-one-missing"),
    pytest.param(["orders:read", "orders:write"], {"scope": "orders:read,orders:write"},
                 "orders:read orders:write", id="comma-is-not-a-separator"),
    pytest.param(["orders:read"], {"scope": "orders:readwrite orders"},
                 "orders:read", id="no-substring-match"),
    pytest.param(["orders:read"], {"scope": "ORDERS:READ"}, "orders:read", id="case-sensitive"),
    pytest.param({"any_of": ["admin", "orders:read"]}, {"scope": "profile orders:read"},
                 None, id="any-of-scope-string"),
    pytest.param({"any_of": ["admin", "orders:read"]}, {"scp": ["admin"]},
                 None, id="any-of-scp-list"),
    pytest.param({"any_of": ["admin", "orders:read"]}, {"scope": "orders:write"},
                 "admin orders:read", id="any-of-none-granted"),
    pytest.param({"any_of": ["admin", "orders:read"]}, {},
                 "admin orders:read", id="any-of-no-scope-claim"),
]  # fmt: skip


@pytest.mark.parametrize(("required", "claims", "challenge_scope"), SCOPE_CASES)
async def test_required_scopes(
    required: Any,
    claims: dict[str, Any],
    challenge_scope: str | None,
    make_gateway: GatewayFactory,
    token: Mint,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(
        add_routes(route("sc", "/sc", auth(required_scopes=required), claim_headers=IDENTITY))
    )

    response = await get(gateway, "/sc/x", authz(token(**claims)))

    if challenge_scope is None:
        assert one(seen_by_upstream(response), "X-User-Sub") == "alice"
    else:
        assert_refused(response, Reason.INSUFFICIENT_SCOPE, scope=challenge_scope)
        assert upstream.hits == 0


URL_ROLES = "https://example.com/roles"
ROLES_ADMIN = {"path": "realm_access.roles", "contains": "admin"}
MATCHER_CASES = [
    pytest.param(ROLES_ADMIN, {"realm_access": {"roles": ["user", "admin"]}}, True,
                 id="contains-in-list"),
    pytest.param(ROLES_ADMIN, {"realm_access": {"roles": "user admin"}}, True,
                 id="contains-in-space-delimited-string"),
    pytest.param(ROLES_ADMIN, {"realm_access": {"roles": ["user"]}}, False, id="contains-absent"),
    pytest.param(ROLES_ADMIN, {"realm_access": {"roles": "administrator"}}, False,
                 id="contains-no-substring"),
    pytest.param(ROLES_ADMIN, {"realm_access": {"roles": ["Admin"]}}, False,
                 id="contains-case-sensitive"),
    pytest.param(ROLES_ADMIN, {"realm_access": {"roles": [["admin"]]}}, False,
                 id="contains-not-nested-list"),
    pytest.param(ROLES_ADMIN, {"realm_access": "admin"}, False, id="contains-parent-not-object"),
    pytest.param(ROLES_ADMIN, {"realm_access.roles": ["admin"]}, False,
                 id="dotted-path-is-nested-not-flat"),
    pytest.param(ROLES_ADMIN, {}, False, id="contains-claim-missing"),
    pytest.param({"path": "tenant", "equals": "acme"}, {"tenant": "acme"}, True, id="equals"),
    pytest.param({"path": "tenant", "equals": "acme"}, {"tenant": "ACME"}, False,
                 id="equals-case-sensitive"),
    pytest.param({"path": "tenant", "equals": "acme"}, {"tenant": ["acme"]}, False,
                 id="equals-not-a-list"),
    pytest.param({"path": "org.tenant", "equals": "acme"}, {"org": {"tenant": "acme"}}, True,
                 id="equals-nested"),
    pytest.param({"path": "tier", "one_of": ["gold", "silver"]}, {"tier": "silver"}, True,
                 id="one-of"),
    pytest.param({"path": "tier", "one_of": ["gold", "silver"]}, {"tier": "bronze"}, False,
                 id="one-of-other"),
    pytest.param({"path": "tier", "one_of": ["gold", "silver"]}, {"tier": ["gold"]}, False,
                 id="one-of-not-a-list"),
    pytest.param({"path": "tier", "one_of": ["gold", "silver"]}, {}, False, id="one-of-missing"),
    pytest.param({"path": [URL_ROLES], "contains": "editor"}, {URL_ROLES: ["viewer", "editor"]},
                 True, id="url-named-claim-list-form"),
    pytest.param({"path": [URL_ROLES], "contains": "editor"},
                 {"https://example": {"com/roles": ["editor"]}}, False,
                 id="url-named-claim-not-split"),
    pytest.param({"path": ["org.acme", "level"], "equals": 3}, {"org.acme": {"level": 3}}, True,
                 id="list-form-name-with-dot-then-nested"),
    pytest.param({"path": "level", "equals": 1}, {"level": 1}, True, id="equals-int"),
    pytest.param({"path": "level", "equals": 1}, {"level": True}, False, id="1-does-not-match-true"),
    pytest.param({"path": "level", "equals": 1}, {"level": "1"}, False,
                 id="1-does-not-match-string"),
    pytest.param({"path": "level", "one_of": [0, 1]}, {"level": False}, False,
                 id="one-of-ints-not-false"),
    pytest.param({"path": "admin", "equals": True}, {"admin": True}, True, id="equals-true"),
    pytest.param({"path": "admin", "equals": True}, {"admin": 1}, False, id="true-does-not-match-1"),
    pytest.param({"path": "admin", "equals": True}, {"admin": "true"}, False,
                 id="true-does-not-match-string"),
    pytest.param({"path": "ids", "contains": 7}, {"ids": [1, 7]}, True, id="contains-int"),
    pytest.param({"path": "ids", "contains": 1}, {"ids": [True]}, False,
                 id="contains-1-not-true"),
    pytest.param({"path": "level", "equals": 1}, {"level": 1.0}, True,
                 id="1-matches-json-number-1.0"),
    pytest.param({"path": "level", "equals": 1}, {"level": 1.5}, False, id="1-not-1.5"),
    pytest.param({"path": "ids", "contains": 2}, {"ids": [1.0, 2.0]}, True,
                 id="contains-2-in-floats"),
]  # fmt: skip


@pytest.mark.parametrize(("matcher", "claims", "admitted"), MATCHER_CASES)
async def test_claim_matchers(
    matcher: dict[str, Any],
    claims: dict[str, Any],
    admitted: bool,
    make_gateway: GatewayFactory,
    token: Mint,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(
        add_routes(route("cm", "/cm", auth(claims=[matcher]), claim_headers=IDENTITY))
    )

    response = await get(gateway, "/cm/x", authz(token(**claims)))

    if admitted:
        assert one(seen_by_upstream(response), "X-User-Sub") == "alice"
    else:
        assert_refused(response, Reason.INSUFFICIENT_SCOPE)  # no scope="..." attribute
        assert upstream.hits == 0
        assert _took(gateway, "cm", "insufficient_scope")


@pytest.mark.parametrize(
    ("claims", "admitted"),
    [
        pytest.param({"scope": "orders:read", "tenant": "acme", "tier": "gold"}, True, id="all"),
        pytest.param({"scope": "orders:read", "tenant": "other", "tier": "gold"}, False,
                     id="second-matcher-fails"),
        pytest.param({"scope": "orders:read", "tenant": "acme"}, False, id="third-matcher-fails"),
    ],
)  # fmt: skip
async def test_matchers_with_scopes_challenge_names_the_scopes(
    claims: dict[str, Any],
    admitted: bool,
    make_gateway: GatewayFactory,
    token: Mint,
    upstream: EchoUpstream,
) -> None:
    policy = auth(
        required_scopes=["orders:read"],
        claims=[
            {"path": "tenant", "equals": "acme"},
            {"path": "tier", "one_of": ["gold", "silver"]},
        ],
    )
    gateway = await make_gateway(add_routes(route("cm", "/cm", policy)))

    response = await get(gateway, "/cm/x", authz(token(**claims)))

    if admitted:
        assert response.status == 200
    else:
        assert_refused(response, Reason.INSUFFICIENT_SCOPE, scope="orders:read")
        assert upstream.hits == 0


# =================================================================================================
# Claim headers and the payload header
# =================================================================================================
HEADER_CASES = [
    pytest.param("org.tenant_id", {"org": {"tenant_id": "acme"}}, "acme", id="nested"),
    pytest.param(["https://example.com/roles"], {"https://example.com/roles": ["a", "b"]}, "a,b",
                 id="url-name-list-form"),
    pytest.param(["org.tenant_id"], {"org.tenant_id": "flat", "org": {"tenant_id": "nested"}},
                 "flat", id="dotted-name-list-form"),
    pytest.param({"claim": ["https://example.com/roles"], "format": "json"},
                 {"https://example.com/roles": ["a", "b"]}, '["a","b"]', id="url-name-json"),
    pytest.param("roles", {"roles": ["admin", "user"]}, "admin,user", id="array-csv-default"),
    pytest.param({"claim": "roles", "format": "csv"}, {"roles": ["admin", "user"]}, "admin,user",
                 id="array-csv-explicit"),
    pytest.param({"claim": "roles", "format": "json"}, {"roles": ["admin", "user"]},
                 '["admin","user"]', id="array-json"),
    pytest.param({"claim": "ra.roles", "format": "json"}, {"ra": {"roles": ["x"]}}, '["x"]',
                 id="nested-array-json"),
    pytest.param("n", {"n": 1.0}, "1", id="integral-float"),
    pytest.param("n", {"n": 1}, "1", id="int"),
    pytest.param("n", {"n": 0.5}, "0.5", id="float"),
    pytest.param("n", {"n": [1.0, 2]}, "1,2", id="array-of-numbers"),
    pytest.param("b", {"b": True}, "true", id="true"),
    pytest.param("b", {"b": False}, "false", id="false"),
    pytest.param("o", {"o": {"z": 1, "a": [True, None]}}, '{"a":[true,null],"z":1}',
                 id="object-as-json"),
    pytest.param({"claim": "o", "format": "json"}, {"o": {"k": "v"}}, '{"k":"v"}',
                 id="object-format-json"),
    pytest.param("s", {"s": "Zoë"}, "Zoë", id="utf8"),
    pytest.param("missing", {}, None, id="absent-left-out"),
    pytest.param("s", {"s": None}, None, id="null-left-out"),
]  # fmt: skip


@pytest.mark.parametrize(("claim", "claims", "expected"), HEADER_CASES)
async def test_claim_headers(
    claim: Any,
    claims: dict[str, Any],
    expected: str | None,
    make_gateway: GatewayFactory,
    token: Mint,
) -> None:
    gateway = await make_gateway(
        add_routes(route("ch", "/ch", auth(), claim_headers={"X-Claim": claim}))
    )

    seen = seen_by_upstream(await get(gateway, "/ch/x", authz(token(**claims))))

    assert values_of(seen, "X-Claim") == ([] if expected is None else [expected])


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        pytest.param("s", "a\nX-Evil: 1", id="lf"),
        pytest.param("s", "a\rb", id="cr"),
        pytest.param("s", "a\x00b", id="nul"),
        pytest.param("s", "a\x1bb", id="escape"),
        pytest.param("s", "a\x7fb", id="del"),
        pytest.param("s", ["ok", "a\nb"], id="in-csv-array"),
        pytest.param("o.deep", {"x": "a\r\nb"}, id="nested-object-value"),
    ],
)
async def test_claim_header_control_characters(
    claim: str, value: Any, make_gateway: GatewayFactory, token: Mint, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(
        add_routes(route("ch", "/ch", auth(), claim_headers={"X-Claim": claim}))
    )
    claims = {"o": {"deep": value}} if claim == "o.deep" else {"s": value}

    response = await get(gateway, "/ch/x", authz(token(**claims)))

    if claim == "o.deep":
        # An object is rendered as JSON, which escapes control characters: harmless.
        assert values_of(seen_by_upstream(response), "X-Claim") == ['{"x":"a\\r\\nb"}']
    else:
        assert_refused(response, Reason.CLAIM_INVALID)
        assert upstream.hits == 0


PAYLOAD_ROUTES = add_routes(
    route("pl", "/pl", auth(), payload_header="X-Jwt-Payload", claim_headers=IDENTITY)
)
SPOOFED_PAYLOAD: tuple[Header, ...] = (
    ("X-Jwt-Payload", "eyJzdWIiOiJyb290In0"),
    ("x-jwt-payload", "eyJzdWIiOiJyb290In0"),
    ("X_Jwt_Payload", "eyJzdWIiOiJyb290In0"),
)


async def test_payload_header_is_the_tokens_payload_segment(
    make_gateway: GatewayFactory, token: Mint
) -> None:
    gateway = await make_gateway(PAYLOAD_ROUTES)
    minted = token(org={"tenant_id": "acme"}, roles=["a", "b"], name="Zoë")

    seen = seen_by_upstream(await get(gateway, "/pl/x", authz(minted), *SPOOFED_PAYLOAD))

    payload = values_of(seen, "X-Jwt-Payload")
    assert payload == [minted.split(".")[1]]
    assert decode_segment(payload[0]) == decode_segment(minted.split(".")[1])
    assert decode_segment(payload[0])["org"] == {"tenant_id": "acme"}
    assert values_of(seen, "X_Jwt_Payload") == []


@pytest.mark.parametrize(
    ("target", "with_token"),
    [("/public/page", False), ("/api/orders", True), ("/scoped/x", False), ("/pl/x", False)],
    ids=["public", "api", "scoped-refused", "payload-route-refused"],
)
async def test_client_sent_payload_header_is_stripped_on_every_route(
    target: str,
    with_token: bool,
    make_gateway: GatewayFactory,
    token: Mint,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(PAYLOAD_ROUTES)
    headers = [*SPOOFED_PAYLOAD, *([authz(token())] if with_token else [])]

    response = await get(gateway, target, *headers)

    if target in ("/public/page", "/api/orders"):
        seen = seen_by_upstream(response)
        assert values_of(seen, "X-Jwt-Payload") == []
        assert values_of(seen, "X_Jwt_Payload") == []
    else:
        assert response.status == 401
        assert upstream.hits == 0


async def test_claim_header_named_with_underscore_is_stripped_in_both_spellings(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(
        add_routes(route("us", "/us", auth(), claim_headers={"X_Tenant": "tenant"}))
    )

    seen = seen_by_upstream(
        await get(gateway, "/public/page", ("X_Tenant", "evil"), ("X-Tenant", "evil"))
    )

    assert [value for _, value in seen if value == "evil"] == []


# =================================================================================================
# forward_token: Authorization reaches the upstream only when a route asks for it
# =================================================================================================
@pytest.mark.parametrize(
    ("edit", "target", "forwarded"),
    [
        pytest.param(None, "/api/orders", False, id="required-default"),
        pytest.param(add_routes(route("fw", "/fw", auth(forward_token=True))), "/fw/x", True,
                     id="forward-token-true"),
        pytest.param(add_routes(route("nf", "/nf", auth(forward_token=False))), "/nf/x", False,
                     id="forward-token-false"),
        pytest.param(add_routes(route("of", "/of", auth(mode="optional"))), "/of/x", False,
                     id="optional"),
        pytest.param(add_routes(route("ro", "/ro", auth(mode="report-only"))), "/ro/x", False,
                     id="report-only"),
        pytest.param(None, "/public/page", False, id="public"),
    ],
)  # fmt: skip
async def test_authorization_forwarded_only_with_forward_token(
    edit: Edit | None, target: str, forwarded: bool, make_gateway: GatewayFactory, token: Mint
) -> None:
    gateway = await make_gateway(edit)
    minted = token()

    seen = seen_by_upstream(await get(gateway, target, authz(minted)))

    assert values_of(seen, "Authorization") == ([f"Bearer {minted}"] if forwarded else [])


# =================================================================================================
# CORS preflight
# =================================================================================================
PREFLIGHT: tuple[Header, ...] = (
    ("Origin", "https://app.example"),
    ("Access-Control-Request-Method", "POST"),
)
CORS_ROUTES = add_routes(
    route("cors", "/cors", auth(), cors_preflight=True, claim_headers=IDENTITY),
    route("nocors", "/nocors", auth(), claim_headers=IDENTITY),
)


@pytest.mark.parametrize(
    ("method", "target", "headers", "with_token", "admitted"),
    [
        pytest.param("OPTIONS", "/cors/x", PREFLIGHT, False, True, id="preflight"),
        pytest.param("OPTIONS", "/cors/x", (*PREFLIGHT, ("X-User-Sub", "root")), False, True,
                     id="preflight-spoofed-identity"),
        pytest.param("OPTIONS", "/cors/x", PREFLIGHT, True, True, id="preflight-token-ignored"),
        pytest.param("OPTIONS", "/cors/x", (), False, False, id="plain-options"),
        pytest.param("OPTIONS", "/cors/x", PREFLIGHT[:1], False, False, id="origin-only"),
        pytest.param("OPTIONS", "/cors/x", PREFLIGHT[1:], False, False, id="request-method-only"),
        pytest.param("GET", "/cors/x", PREFLIGHT, False, False, id="not-options"),
        pytest.param("OPTIONS", "/nocors/x", PREFLIGHT, False, False, id="option-off"),
        pytest.param("OPTIONS", "/cors/x", (), True, True, id="plain-options-with-token"),
    ],
)  # fmt: skip
async def test_cors_preflight(
    method: str,
    target: str,
    headers: tuple[Header, ...],
    with_token: bool,
    admitted: bool,
    make_gateway: GatewayFactory,
    token: Mint,
    upstream: EchoUpstream,
) -> None:
    gateway = await make_gateway(CORS_ROUTES)
    minted = token()
    sent = [*headers, *([authz(minted)] if with_token else [])]

    response = await get(gateway, target, *sent, method=method)

    if not admitted:
        assert_refused(response, Reason.TOKEN_MISSING)
        assert upstream.hits == 0
        return
    seen = seen_by_upstream(response)
    assert response.json()["method"] == method
    is_preflight = headers[:2] == PREFLIGHT
    assert values_of(seen, "X-User-Sub") == ([] if is_preflight else ["alice"])
    assert values_of(seen, "Authorization") == []
    if is_preflight:
        assert values_of(seen, "Origin") == ["https://app.example"]
        assert values_of(seen, "Access-Control-Request-Method") == ["POST"]


# =================================================================================================
# Config errors for each new key, naming the YAML path
# =================================================================================================
def _route_doc(**changes: Any) -> dict[str, Any]:
    """A minimal valid document whose one route is changed by ``changes`` (dotted keys allowed)."""
    doc = base_config(FakeIdP(jwks_uri="https://idp.test/jwks.json"), EchoUpstream(url="http://u"))
    doc["routes"] = [doc["routes"][0]]
    target = doc["routes"][0]
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = target
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return doc


CONFIG_ERRORS = [
    pytest.param({"match": {"path": "/api"}, "rewrite": {"strip_prefix": True}},
                 "routes[0].rewrite: a rewrite needs match.path_prefix; "
                 "expected match.path_prefix, not match.path", id="rewrite-without-path-prefix"),
    pytest.param({"rewrite": {"strip_prefix": True, "replace_prefix": "/v2"}},
                 "routes[0].rewrite: needs exactly one of strip_prefix, replace_prefix",
                 id="rewrite-both"),
    pytest.param({"rewrite": {"strip_prefix": False}},
                 "routes[0].rewrite.strip_prefix: false does nothing; expected true, or no rewrite",
                 id="rewrite-strip-false"),
    pytest.param({"rewrite": {"replace_prefix": "v2/../x"}},
                 "routes[0].rewrite.replace_prefix: invalid path 'v2/../x'; "
                 "expected a plain path starting with '/'", id="rewrite-bad-replacement"),
    pytest.param({"auth.mode": "enforce"},
                 "routes[0].auth.mode: got 'enforce'; expected one of: required, optional, "
                 "report-only", id="unknown-mode"),
    pytest.param({"auth.claims": [{"path": "tenant", "equals": "acme", "one_of": ["x"]}]},
                 "routes[0].auth.claims[0]: needs exactly one comparison; "
                 "expected one of: contains, equals, one_of", id="matcher-two-comparisons"),
    pytest.param({"auth.claims": [{"path": "tenant"}]},
                 "routes[0].auth.claims[0]: needs exactly one comparison; "
                 "expected one of: contains, equals, one_of", id="matcher-no-comparison"),
    pytest.param({"auth.claims": [{"path": "tenant", "equals": 1.5}]},
                 "routes[0].auth.claims[0].equals: got 1.5; "
                 "expected a string, integer or boolean", id="matcher-float"),
    pytest.param({"auth.claims": [{"path": "a..b", "equals": "x"}]},
                 "routes[0].auth.claims[0].path: invalid claim path 'a..b'; expected a dotted "
                 "path such as org.tenant_id (a list of names for names with dots)",
                 id="matcher-bad-path"),
    pytest.param({"auth.required_scopes": {"any_of": ["a"], "all_of": ["b"]}},
                 "routes[0].auth.required_scopes: needs exactly one of all_of, any_of",
                 id="scopes-any-and-all"),
    pytest.param({"auth.token_from": [{"cookie": "a", "query": "b"}]},
                 "routes[0].auth.token_from[0]: needs exactly one of header, cookie, query",
                 id="token-source-two-kinds"),
    pytest.param({"auth.token_from": [{"query": "t", "prefix": "Bearer "}]},
                 "routes[0].auth.token_from[0].prefix: a prefix applies to headers only",
                 id="token-source-prefix-on-query"),
    pytest.param({"auth.token_from": [{"header": "Cookie"}]},
                 "routes[0].auth.token_from[0].header: header 'Cookie' cannot carry a token; "
                 "expected an end-to-end header", id="token-source-cookie-header"),
    pytest.param({"auth.token_from": [{"param": "t"}]},
                 "routes[0].auth.token_from[0].param: unknown key 'param'; "
                 "expected one of: cookie, header, prefix, query", id="token-source-unknown-key"),
    pytest.param({"auth.token_from": [{"cookie": "t"}, {"cookie": "t"}]},
                 "routes[0].auth.token_from: a token source is listed twice",
                 id="token-source-twice"),
    pytest.param({"auth.token_from": []},
                 "routes[0].auth.token_from: empty list; expected at least one entry",
                 id="token-source-empty"),
    pytest.param({"payload_header": "Authorization"},
                 "routes[0].payload_header: header 'Authorization' is reserved; "
                 "expected a header the gateway does not own", id="payload-header-reserved"),
    pytest.param({"payload_header": "X-Gateway-Auth-Outcome"},
                 "routes[0].payload_header: header 'X-Gateway-Auth-Outcome' is reserved; "
                 "expected a header the gateway does not own", id="payload-header-outcome"),
    pytest.param({"payload_header": "X-User-Sub"},
                 "routes[0].payload_header: 'X-User-Sub' is also a claim header",
                 id="payload-header-is-a-claim-header"),
    pytest.param({"payload_header": "X-USER-SUB"},
                 "routes[0].payload_header: 'X-USER-SUB' is also a claim header",
                 id="payload-header-is-a-claim-header-any-case"),
    pytest.param({"claim_headers.X-Roles": {"claim": "roles", "format": "xml"}},
                 "routes[0].claim_headers.X-Roles.format: got 'xml'; expected one of: csv, json",
                 id="claim-header-bad-format"),
    pytest.param({"match": {"path_prefix": "/api", "hosts": ["api.*.com"]}},
                 "routes[0].match.hosts[0]: invalid value 'api.*.com'; "
                 "expected a host name such as api.example.com or *.example.com",
                 id="hosts-bad-wildcard"),
    pytest.param({"cors_preflight": "yes"},
                 "routes[0].cors_preflight: got 'yes'; expected true or false",
                 id="cors-preflight-not-bool"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), CONFIG_ERRORS)
def test_config_errors_name_the_yaml_path(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        loads_config(yaml.safe_dump(_route_doc(**changes)))
    assert str(raised.value) == message


def test_payload_header_on_a_public_route_is_refused() -> None:
    doc = _route_doc(auth="none", payload_header="X-Jwt-Payload")
    del doc["routes"][0]["claim_headers"]
    with pytest.raises(ConfigError) as raised:
        loads_config(yaml.safe_dump(doc))
    assert str(raised.value) == (
        "routes[0].payload_header: payload_header on a route with 'auth: none'; "
        "expected no identity on a public route"
    )


def test_every_new_key_loads_when_valid() -> None:
    """The positive twin of the table above: the same keys, valid, give the expected model."""
    doc = _route_doc(
        **{
            "match": {"path_prefix": "/svc", "hosts": ["API.example.com", "*.example.com"]},
            "rewrite": {"replace_prefix": "/v2"},
            "payload_header": "X-Jwt-Payload",
            "cors_preflight": True,
            "auth.mode": "report-only",
            "auth.token_from": [{"header": "X-Api-Token", "prefix": "Token "}, {"query": "t"}],
            "auth.required_scopes": {"any_of": ["a", "b"]},
            "auth.claims": [{"path": ["https://x.test/roles"], "contains": "admin"}],
        }
    )
    [loaded] = loads_config(yaml.safe_dump(doc)).routes
    assert loaded.match.hosts == frozenset({"api.example.com"})
    assert loaded.match.host_suffixes == (".example.com",)
    assert loaded.rewrite is not None
    assert rewritten(loaded.rewrite, "/svc/x") == "/v2/x"
    assert loaded.auth is not None
    assert loaded.auth.mode.value == "report-only"
    assert loaded.auth.scopes_any_of
    assert [m.path for m in loaded.auth.claim_matchers] == [("https://x.test/roles",)]


# =================================================================================================
# No way around a route's policy: HEAD, encoded unreserved characters, encoded slashes, Host
# =================================================================================================
async def test_head_is_judged_by_the_route_that_judges_get(
    make_gateway: GatewayFactory, upstream: EchoUpstream, token: Mint
) -> None:
    # RFC 9110 §9.3.2. Before, HEAD skipped `methods: [GET]` and fell through to the public
    # catch-all below it.
    gateway = await make_gateway(
        chain(add_routes(route("reads-only", {"path_prefix": "/r", "methods": ["GET"]}, auth())),
              add_routes(route("public-rest", "/"), last=True))
    )  # fmt: skip
    response = await get(gateway, "/r/x", method="HEAD")
    assert response.status == 401
    assert upstream.hits == 0
    assert _took(gateway, "reads-only", "token_missing")
    allowed = await get(gateway, "/r/x", authz(token()), method="HEAD")
    assert allowed.status == 200
    assert _took(gateway, "reads-only")


@pytest.mark.parametrize(
    ("target", "forwarded", "route_id"),
    [
        pytest.param("/public/%7Euser", "/public/~user", "public", id="tilde"),
        pytest.param("/public/%7euser?q=%41", "/public/~user?q=%41", "public", id="query-as-sent"),
        pytest.param("/%61pi/x", "/api/x", "api", id="encoded-letter-reaches-its-route"),
        pytest.param("/public/a%2Djson", "/public/a-json", "public", id="hyphen"),
    ],
)
async def test_encoded_unreserved_characters_are_the_characters(
    target: str,
    forwarded: str,
    route_id: str,
    make_gateway: GatewayFactory,
    upstream: EchoUpstream,
    token: Mint,
) -> None:
    # RFC 3986 §6.2.2.2: matched and forwarded decoded (refused with 400 before).
    gateway = await make_gateway()
    response = await get(gateway, target, authz(token()))
    assert response.status == 200, response.body
    assert response.json()["path"] == forwarded
    assert _took(gateway, route_id)


async def test_encoded_dot_segments_are_still_refused(
    make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway()
    for target in ("/public/%2E%2E/api/x", "/public/.%2e/api", "/public/%2e/api"):
        assert_refused(await get(gateway, target), Reason.REQUEST_REJECTED)
    assert upstream.hits == 0


ESCAPED_SLASH_ROUTES = add_routes(
    route("ids", "/ids", escaped_slashes="keep"),
)


async def test_encoded_slash_is_refused_unless_the_route_keeps_it(
    make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(ESCAPED_SLASH_ROUTES)
    kept = await get(gateway, "/ids/team%2Fproject")
    assert kept.status == 200, kept.body
    assert kept.json()["path"] == "/ids/team%2Fproject"  # forwarded unchanged
    # Every other route still refuses it, before matching decides anything else.
    assert_refused(await get(gateway, "/public/a%2fb"), Reason.REQUEST_REJECTED)
    # No route takes `/api%2Fx` as it stands (it is not under `/api/`): nothing is forwarded.
    assert_refused(await get(gateway, "/api%2Fx"), Reason.ROUTE_NOT_FOUND)
    plain = await make_gateway()
    assert_refused(await get(plain, "/public/a%2Fb"), Reason.REQUEST_REJECTED)
    assert upstream.hits == 1


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("public.example.com:@admin.example.com", id="userinfo-after-port"),
        pytest.param("evil.com/.example.com", id="slash-before-suffix"),
        pytest.param("a.example.com:80x", id="port-not-digits"),
        pytest.param("a.example.com:", id="empty-port"),
        pytest.param("user@a.example.com", id="userinfo"),
        pytest.param("a.example.com,b.example.com", id="comma"),
        pytest.param("[::1", id="open-bracket"),
    ],
)
async def test_a_host_that_is_not_host_and_port_is_400(
    host: str, make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(HOST_ROUTES)
    response = await get(gateway, "/h/x", ("Host", host))
    assert_refused(response, Reason.REQUEST_REJECTED)
    assert upstream.hits == 0


async def test_a_valid_host_becomes_x_forwarded_host(
    make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    gateway = await make_gateway(HOST_ROUTES)
    response = await get(gateway, "/h/x", ("Host", "[2001:db8::1]:8443"))
    assert response.status == 200, response.body
    assert one(seen_by_upstream(response), "X-Forwarded-Host") == "[2001:db8::1]:8443"
