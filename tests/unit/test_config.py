"""Config loading: a valid document freezes into typed objects; every mistake names its YAML path."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as cfg
from gateway.config import GatewayConfig, load_config, loads_config
from gateway.errors import ConfigError

JWKS_URI = "https://idp.corp.example/.well-known/jwks.json"

BASE: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8081, "shutdown_timeout_s": 10},
    "admin": {"host": "127.0.0.1", "port": 9101},
    "realm": "example",
    "trusted_proxies": ["10.0.0.0/8", "::1"],
    "upstream_defaults": {"connect_timeout_s": 1, "timeout_s": 5, "max_connections": 10},
    "max_token_bytes": 4096,
    "issuers": {
        "corp": {
            "issuer": "https://idp.corp.example",
            "jwks_uri": JWKS_URI,
            "algorithms": ["RS256", "ES256"],
            "leeway_s": 10,
            "jwks_cache_ttl_s": 600,
            "jwks_refetch_cooldown_s": 60,
            "jwks_fetch_timeout_s": 2,
            "jwks_refresh_ahead_s": 60,
            "jwks_max_bytes": 65536,
        }
    },
    "routes": [
        {
            "id": "orders",
            "match": {"path_prefix": "/orders", "methods": ["GET", "POST"]},
            "upstream": "http://orders.internal:8080",
            "auth": {
                "issuers": ["corp"],
                "audiences": ["orders-api"],
                "required_claims": ["sub"],
                "required_scopes": ["orders:read"],
                "forward_token": True,
            },
            "claim_headers": {"X-User-Sub": "sub", "X-Tenant-Id": "org.tenant_id"},
        },
        {
            "id": "reports",
            "match": {"path": "/reports/daily"},
            "upstream": "https://reports.internal/",
            "auth": {"issuers": ["corp"], "audiences": "any"},
        },
        {
            "id": "health",
            "match": {"path_prefix": "/"},
            "upstream": "http://health.internal",
            "auth": "none",
        },
    ],
}

MINIMAL: dict[str, Any] = {
    "issuers": {
        "corp": {
            "issuer": "https://idp.corp.example",
            "jwks_uri": JWKS_URI,
            "algorithms": ["RS256"],
        }
    },
    "routes": [
        {
            "id": "orders",
            "match": {"path_prefix": "/orders"},
            "upstream": "http://orders.internal",
            "auth": {"issuers": ["corp"], "audiences": ["orders-api"]},
        }
    ],
}

Edit = Callable[[dict[str, Any]], None]


def load(document: dict[str, Any], edit: Edit | None = None) -> GatewayConfig:
    doc = copy.deepcopy(document)
    if edit is not None:
        edit(doc)
    return loads_config(yaml.safe_dump(doc, sort_keys=False))


def issuer(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["issuers"]["corp"]
    return result


def route(doc: dict[str, Any], index: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = doc["routes"][index]
    return result


def setter(*path: str | int, value: Any) -> Edit:
    """An edit that sets ``doc[path...] = value``."""

    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def deleter(*path: str | int) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


# --- the valid document ------------------------------------------------------------
def test_base_config_loads_every_section() -> None:
    config = load(BASE)

    assert config.listen == cfg.ListenConfig(host="127.0.0.1", port=8081, shutdown_timeout_s=10.0)
    assert config.admin == cfg.AdminConfig(host="127.0.0.1", port=9101)
    assert config.realm == "example"
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.upstream_defaults == cfg.UpstreamDefaults(1.0, 5.0, 10)
    assert config.max_token_bytes == 4096

    corp = config.issuers["corp"]
    assert corp == cfg.IssuerConfig(
        id="corp",
        issuer="https://idp.corp.example",
        jwks_uri=JWKS_URI,
        algorithms=frozenset({"RS256", "ES256"}),
        leeway_s=10.0,
        jwks_cache_ttl_s=600.0,
        jwks_refetch_cooldown_s=60.0,
        jwks_fetch_timeout_s=2.0,
        jwks_refresh_ahead_s=60.0,
        jwks_max_bytes=65536,
    )

    orders, reports, health = config.routes
    assert orders.id == "orders"
    # GET brings HEAD along (RFC 9110 §9.3.2): the route that judges GET judges HEAD.
    assert orders.match == cfg.RouteMatch(None, "/orders", frozenset({"GET", "HEAD", "POST"}))
    assert orders.upstream == cfg.Upstream(
        "http://orders.internal:8080", "http", "orders.internal", 8080
    )
    assert orders.auth == cfg.AuthPolicy(
        issuers=(corp,),
        audiences=frozenset({"orders-api"}),
        required_claims=("sub",),
        required_scopes=frozenset({"orders:read"}),
        forward_token=True,
    )
    assert orders.claim_headers == (
        cfg.ClaimHeader("X-User-Sub", ("sub",)),
        cfg.ClaimHeader("X-Tenant-Id", ("org", "tenant_id")),
    )

    assert reports.match == cfg.RouteMatch("/reports/daily", None, frozenset())
    # The trailing slash of an origin is dropped; https defaults to 443.
    assert reports.upstream == cfg.Upstream(
        "https://reports.internal", "https", "reports.internal", 443
    )
    assert reports.auth is not None
    assert reports.auth.audiences is None  # 'any'

    assert health.auth is None
    assert health.match.path_prefix == "/"
    assert health.upstream is not None
    assert health.upstream.port == 80

    assert config.owned_headers == frozenset(
        {"x-user-sub", "x-tenant-id", "x-gateway-auth-outcome"}
    )


def test_defaults_are_applied_when_keys_are_omitted() -> None:
    config = load(MINIMAL)

    assert config.listen == cfg.ListenConfig("0.0.0.0", 8080, 15.0)  # noqa: S104
    assert config.admin == cfg.AdminConfig("127.0.0.1", 9100)
    assert config.realm == "gateway"
    assert config.trusted_proxies == ()
    assert config.upstream_defaults == cfg.UpstreamDefaults(2.0, 30.0, 256)
    assert config.max_token_bytes == 8192
    corp = config.issuers["corp"]
    assert (
        corp.leeway_s,
        corp.jwks_cache_ttl_s,
        corp.jwks_refetch_cooldown_s,
        corp.jwks_fetch_timeout_s,
        corp.jwks_refresh_ahead_s,
        corp.jwks_max_bytes,
    ) == (30.0, 300.0, 30.0, 3.0, 30.0, 512 * 1024)
    assert (corp.jwks_cache_min_ttl_s, corp.jwks_cache_max_ttl_s, corp.jwks_max_stale_s) == (
        60.0,
        3600.0,
        21600.0,
    )
    assert (corp.static_jwks, corp.required_for_readiness, corp.typ) == (None, True, None)
    (orders,) = config.routes
    assert orders.match.methods == frozenset()
    assert orders.claim_headers == ()
    assert orders.auth == cfg.AuthPolicy(
        issuers=(corp,),
        audiences=frozenset({"orders-api"}),
        required_claims=(),
        required_scopes=frozenset(),
        forward_token=False,
    )


@pytest.mark.parametrize(
    ("ttl", "cooldown", "ahead", "min_ttl", "max_ttl"),
    [
        pytest.param(300, 30.0, 30.0, 60.0, 3600.0, id="default-ttl"),
        pytest.param(40, 30.0, 20.0, 40.0, 3600.0, id="short-ttl"),
        pytest.param(20, 20.0, 10.0, 20.0, 3600.0, id="ttl-below-cooldown-default"),
        pytest.param(7200, 30.0, 30.0, 60.0, 7200.0, id="ttl-above-max-default"),
    ],
)
def test_cache_defaults_follow_a_short_or_long_ttl(
    ttl: float, cooldown: float, ahead: float, min_ttl: float, max_ttl: float
) -> None:
    corp = load(MINIMAL, setter("issuers", "corp", "jwks_cache_ttl_s", value=ttl)).issuers["corp"]
    assert (
        corp.jwks_refetch_cooldown_s,
        corp.jwks_refresh_ahead_s,
        corp.jwks_cache_min_ttl_s,
        corp.jwks_cache_max_ttl_s,
    ) == (cooldown, ahead, min_ttl, max_ttl)


def test_loaded_config_is_frozen() -> None:
    config = load(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].auth = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.issuers["corp"].leeway_s = 1e9  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.issuers["evil"] = config.issuers["corp"]  # type: ignore[index]
    assert isinstance(config.routes, tuple)
    assert isinstance(config.issuers["corp"].algorithms, frozenset)


# --- accepted edge cases ------------------------------------------------------------
@pytest.mark.parametrize(
    "jwks_uri",
    [
        "http://127.0.0.1:8080/jwks.json",
        "http://127.0.0.53/jwks.json",
        "http://localhost/jwks.json",
        "http://LOCALHOST:9000/jwks.json",
        "http://[::1]:9000/jwks.json",
        "https://idp.example/jwks.json?tenant=1",
    ],
    ids=[
        "ipv4-loopback",
        "ipv4-loopback-net",
        "localhost",
        "localhost-upper",
        "ipv6-loopback",
        "https-query",
    ],
)
def test_plain_http_jwks_uri_is_accepted_on_loopback_only(jwks_uri: str) -> None:
    config = load(BASE, setter("issuers", "corp", "jwks_uri", value=jwks_uri))
    assert config.issuers["corp"].jwks_uri == jwks_uri


@pytest.mark.parametrize(
    ("edit", "check"),
    [
        pytest.param(
            setter("issuers", "corp", "jwks_refetch_cooldown_s", value=600),
            lambda c: c.issuers["corp"].jwks_refetch_cooldown_s == 600.0,
            id="cooldown-equal-to-ttl",
        ),
        pytest.param(
            setter("issuers", "corp", "jwks_refresh_ahead_s", value=0),
            lambda c: c.issuers["corp"].jwks_refresh_ahead_s == 0.0,
            id="refresh-ahead-zero",
        ),
        pytest.param(
            setter("issuers", "corp", "leeway_s", value=0),
            lambda c: c.issuers["corp"].leeway_s == 0.0,
            id="leeway-zero",
        ),
        pytest.param(
            setter("issuers", "corp", "leeway_s", value=1.5),
            lambda c: c.issuers["corp"].leeway_s == 1.5,
            id="float-seconds",
        ),
        pytest.param(
            setter("routes", 0, "upstream", value="http://10.0.0.1:81/"),
            lambda c: (
                c.routes[0].upstream == cfg.Upstream("http://10.0.0.1:81", "http", "10.0.0.1", 81)
            ),
            id="upstream-ip-trailing-slash",
        ),
        pytest.param(
            setter("routes", 0, "claim_headers", value={"X-Org": "org", "x-ORG-id": "org.id"}),
            lambda c: {"x-org", "x-org-id"} <= c.owned_headers,
            id="claim-header-names-distinct",
        ),
        pytest.param(
            setter("routes", 2, "auth", value="none"),
            lambda c: c.routes[2].auth is None,
            id="public-route",
        ),
    ],
)
def test_edge_values_are_accepted(edit: Edit, check: Callable[[GatewayConfig], bool]) -> None:
    assert check(load(BASE, edit))


# --- every invalid case names its path ----------------------------------------------
ALGS = "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA"


def _duplicate_route_id(doc: dict[str, Any]) -> None:
    route(doc, 2)["id"] = "orders"


def _both_path_kinds(doc: dict[str, Any]) -> None:
    route(doc, 0)["match"]["path"] = "/orders"


def _no_path_kind(doc: dict[str, Any]) -> None:
    del route(doc, 0)["match"]["path_prefix"]


def _claims_on_public_route(doc: dict[str, Any]) -> None:
    route(doc, 2)["claim_headers"] = {"X-User-Sub": "sub"}


def _no_jwks_uri_http_issuer(doc: dict[str, Any]) -> None:
    del issuer(doc)["jwks_uri"]
    issuer(doc)["issuer"] = "http://idp.corp.example"


def _inline_jwks_without_usable_key(doc: dict[str, Any]) -> None:
    del issuer(doc)["jwks_uri"]
    issuer(doc)["jwks"] = {"keys": [{"kty": "oct", "k": "AAAA", "kid": "h"}]}


def _second_issuer_same_url(doc: dict[str, Any]) -> None:
    doc["issuers"]["corp2"] = copy.deepcopy(issuer(doc))


INVALID: list[Any] = [
    # issuers and algorithms
    pytest.param(
        setter("routes", 1, "auth", "issuers", value=["crop"]),
        "routes[1].auth.issuers[0]: unknown issuer 'crop'; expected one of: corp",
        id="unknown-issuer-ref",
    ),
    pytest.param(
        setter("routes", 0, "auth", "issuers", value=["corp", "corp"]),
        "routes[0].auth.issuers[1]: issuer 'corp' listed twice",
        id="issuer-listed-twice",
    ),
    pytest.param(
        setter("routes", 0, "auth", "issuers", value=[]),
        "routes[0].auth.issuers: empty list; expected at least one entry",
        id="no-issuers",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=[]),
        "issuers.corp.algorithms: empty list; expected at least one entry",
        id="empty-algorithms",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=["RS256", "none"]),
        f"issuers.corp.algorithms[1]: unsafe algorithm 'none' for a JWKS issuer; expected one of: {ALGS}",
        id="alg-none",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=["NONE"]),
        f"issuers.corp.algorithms[0]: unsafe algorithm 'NONE' for a JWKS issuer; expected one of: {ALGS}",
        id="alg-none-upper",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=["HS256"]),
        f"issuers.corp.algorithms[0]: unsafe algorithm 'HS256' for a JWKS issuer; expected one of: {ALGS}",
        id="alg-hs256",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=["hs512"]),
        f"issuers.corp.algorithms[0]: unsafe algorithm 'hs512' for a JWKS issuer; expected one of: {ALGS}",
        id="alg-hs512-lower",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=["RS1024"]),
        f"issuers.corp.algorithms[0]: unknown algorithm 'RS1024'; expected one of: {ALGS}",
        id="alg-unknown",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value=["rs256"]),
        f"issuers.corp.algorithms[0]: unknown algorithm 'rs256'; expected one of: {ALGS}",
        id="alg-wrong-case",
    ),
    pytest.param(
        setter("issuers", "corp", "algorithms", value="RS256"),
        "issuers.corp.algorithms: got 'RS256'; expected a list",
        id="algorithms-not-a-list",
    ),
    pytest.param(
        setter("issuers", "Corp", value={}),
        "issuers.Corp: invalid issuer id 'Corp'; expected to match [a-z0-9][a-z0-9_-]{0,62}",
        id="bad-issuer-id",
    ),
    pytest.param(
        _second_issuer_same_url,
        "issuers.corp2.issuer: 'https://idp.corp.example' is already issuer 'corp'; "
        "expected each issuer URL configured once",
        id="issuer-url-twice",
    ),
    pytest.param(
        deleter("issuers", "corp", "algorithms"),
        "issuers.corp.algorithms: missing required key",
        id="missing-algorithms",
    ),
    pytest.param(
        _no_jwks_uri_http_issuer,
        "issuers.corp.issuer: 'http://idp.corp.example' cannot be used for OpenID discovery; "
        "expected an https issuer URL (plain http only for loopback), or jwks_uri/jwks_file/jwks",
        id="discovery-needs-https-issuer",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks", value={"keys": []}),
        "issuers.corp: both 'jwks_uri' and 'jwks' are set; expected at most one of jwks_uri, "
        "jwks_file, jwks (none: OpenID discovery from 'issuer')",
        id="two-key-sources",
    ),
    pytest.param(
        setter("issuers", value={}),
        "issuers: got a mapping; expected a mapping of issuer id to issuer settings",
        id="issuers-empty",
    ),
    # URLs
    pytest.param(
        setter("issuers", "corp", "jwks_uri", value="http://idp.corp.example/jwks.json"),
        "issuers.corp.jwks_uri: 'http://idp.corp.example/jwks.json' is not https; "
        "expected an https URL (plain http only for loopback)",
        id="jwks-uri-http",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_uri", value="http://localhost.evil.example/jwks.json"),
        "issuers.corp.jwks_uri: 'http://localhost.evil.example/jwks.json' is not https; "
        "expected an https URL (plain http only for loopback)",
        id="jwks-uri-http-localhost-lookalike",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_uri", value="http://10.1.2.3/jwks.json"),
        "issuers.corp.jwks_uri: 'http://10.1.2.3/jwks.json' is not https; "
        "expected an https URL (plain http only for loopback)",
        id="jwks-uri-http-private-ip",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_uri", value="ftp://idp.corp.example/jwks.json"),
        "issuers.corp.jwks_uri: invalid URL 'ftp://idp.corp.example/jwks.json'; expected an https URL",
        id="jwks-uri-ftp",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_uri", value="https://u:p@idp.corp.example/jwks"),
        "issuers.corp.jwks_uri: 'https://u:p@idp.corp.example/jwks' carries credentials; "
        "expected a URL without user:password",
        id="jwks-uri-credentials",
    ),
    pytest.param(
        setter("routes", 0, "upstream", value="http://orders.internal:8080/v1"),
        "routes[0].upstream: 'http://orders.internal:8080/v1' has a path, query or fragment; "
        "expected an origin such as http://orders.internal:8080 (the request path is forwarded as is)",
        id="upstream-with-path",
    ),
    pytest.param(
        setter("routes", 0, "upstream", value="http://orders.internal?x=1"),
        "routes[0].upstream: 'http://orders.internal?x=1' has a path, query or fragment",
        id="upstream-with-query",
    ),
    pytest.param(
        setter("routes", 0, "upstream", value="orders.internal:8080"),
        "routes[0].upstream: invalid URL 'orders.internal:8080'; expected an http(s) origin URL",
        id="upstream-without-scheme",
    ),
    pytest.param(
        setter("routes", 0, "upstream", value="http://orders.internal:99999"),
        "routes[0].upstream: invalid URL 'http://orders.internal:99999'; expected an http(s) origin URL",
        id="upstream-bad-port",
    ),
    # claim headers
    pytest.param(
        setter("routes", 0, "claim_headers", value={"X User": "sub"}),
        "routes[0].claim_headers.X User: invalid value 'X User'; expected a valid HTTP header name",
        id="claim-header-space",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"X-User:": "sub"}),
        "routes[0].claim_headers.X-User:: invalid value 'X-User:'; expected a valid HTTP header name",
        id="claim-header-colon",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"Authorization": "sub"}),
        "routes[0].claim_headers.Authorization: header 'Authorization' is reserved; "
        "expected a header the gateway does not own",
        id="claim-header-authorization",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"HOST": "sub"}),
        "routes[0].claim_headers.HOST: header 'HOST' is reserved",
        id="claim-header-host",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"Transfer-Encoding": "sub"}),
        "routes[0].claim_headers.Transfer-Encoding: header 'Transfer-Encoding' is reserved",
        id="claim-header-hop-by-hop",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"Cookie": "sub"}),
        "routes[0].claim_headers.Cookie: header 'Cookie' is reserved",
        id="claim-header-cookie",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"X-Forwarded-For": "sub"}),
        "routes[0].claim_headers.X-Forwarded-For: header 'X-Forwarded-For' is reserved",
        id="claim-header-forwarded",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"X-Gateway-Auth-Outcome": "sub"}),
        "routes[0].claim_headers.X-Gateway-Auth-Outcome: header 'X-Gateway-Auth-Outcome' is reserved",
        id="claim-header-auth-outcome",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"x-request-id": "sub"}),
        "routes[0].claim_headers.x-request-id: header 'x-request-id' is reserved",
        id="claim-header-request-id",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"X-User-Sub": "sub", "x-user-SUB": "email"}),
        "routes[0].claim_headers.x-user-SUB: header 'x-user-SUB' is listed twice "
        "(names are case-insensitive)",
        id="claim-header-duplicate-case-insensitive",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value={"X-Org": "org..id"}),
        "routes[0].claim_headers.X-Org: invalid claim path 'org..id'; expected a dotted path such as org.tenant_id",
        id="claim-path-empty-segment",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", value=["X-User-Sub"]),
        "routes[0].claim_headers: got a list; expected a mapping of header name to claim path",
        id="claim-headers-not-a-mapping",
    ),
    # auth
    pytest.param(
        deleter("routes", 1, "auth"),
        "routes[1].auth: missing required key",
        id="auth-missing",
    ),
    pytest.param(
        setter("routes", 1, "auth", value=None),
        "routes[1].auth: missing; expected 'none' for a public route, "
        "or a mapping with issuers and audiences",
        id="auth-null",
    ),
    pytest.param(
        setter("routes", 1, "auth", value="off"),
        "routes[1].auth: got 'off'; expected a mapping",
        id="auth-unknown-word",
    ),
    pytest.param(
        _claims_on_public_route,
        "routes[2].claim_headers: claim_headers on a route with 'auth: none'; "
        "expected no identity on a public route",
        id="auth-none-with-claim-headers",
    ),
    pytest.param(
        deleter("routes", 0, "auth", "audiences"),
        "routes[0].auth.audiences: missing required key",
        id="audiences-missing",
    ),
    pytest.param(
        setter("routes", 0, "auth", "audiences", value="anything"),
        "routes[0].auth.audiences: got 'anything'; expected a list of audiences, or 'any'",
        id="audiences-string-not-any",
    ),
    pytest.param(
        setter("routes", 0, "auth", "audiences", value=[]),
        "routes[0].auth.audiences: empty list; expected at least one entry",
        id="audiences-empty",
    ),
    pytest.param(
        setter("routes", 0, "auth", "audiences", value=["api", ""]),
        "routes[0].auth.audiences[1]: got ''; expected a non-empty string",
        id="audience-empty-string",
    ),
    pytest.param(
        setter("routes", 0, "auth", "required_scopes", value=["orders read"]),
        "routes[0].auth.required_scopes[0]: invalid value 'orders read'; expected a scope token",
        id="scope-with-space",
    ),
    pytest.param(
        setter("routes", 0, "auth", "forward_token", value="yes"),
        "routes[0].auth.forward_token: got 'yes'; expected true or false",
        id="forward-token-not-bool",
    ),
    # routes and matching
    pytest.param(
        _duplicate_route_id,
        "routes[2].id: duplicate route id 'orders' (first at routes[0]); expected unique route ids",
        id="duplicate-route-id",
    ),
    pytest.param(
        setter("routes", 0, "id", value="Orders"),
        "routes[0].id: invalid value 'Orders'; expected a lower-case id such as orders_read",
        id="route-id-upper",
    ),
    pytest.param(
        setter("routes", 0, "id", value="orders read"),
        "routes[0].id: invalid value 'orders read'; expected a lower-case id such as orders_read",
        id="route-id-space",
    ),
    pytest.param(
        setter("routes", 0, "id", value="-orders"),
        "routes[0].id: invalid value '-orders'; expected a lower-case id such as orders_read",
        id="route-id-leading-dash",
    ),
    pytest.param(
        setter("routes", 0, "id", value="a" * 64),
        f"routes[0].id: invalid value {'a' * 64!r}; expected a lower-case id such as orders_read",
        id="route-id-too-long",
    ),
    pytest.param(
        setter("routes", 0, "id", value=7),
        "routes[0].id: got 7; expected a lower-case id such as orders_read",
        id="route-id-number",
    ),
    pytest.param(
        setter("routes", value=[]),
        "routes: empty list; expected at least one entry",
        id="routes-empty",
    ),
    pytest.param(deleter("routes"), "routes: missing required key", id="routes-missing"),
    pytest.param(
        setter("routes", 0, "match", "path_prefix", value="/orders/"),
        "routes[0].match.path_prefix: '/orders/' ends with '/'; "
        "expected a prefix without a trailing slash (matching is per segment)",
        id="prefix-trailing-slash",
    ),
    pytest.param(
        _both_path_kinds,
        "routes[0].match: exactly one of 'path' or 'path_prefix' must be set",
        id="both-path-and-prefix",
    ),
    pytest.param(
        _no_path_kind,
        "routes[0].match: exactly one of 'path' or 'path_prefix' must be set",
        id="neither-path-nor-prefix",
    ),
    pytest.param(
        setter("routes", 0, "match", "path_prefix", value="orders"),
        "routes[0].match.path_prefix: invalid path 'orders'; expected a plain path starting with '/'",
        id="prefix-without-slash",
    ),
    pytest.param(
        setter("routes", 0, "match", "path_prefix", value="/orders/../admin"),
        "routes[0].match.path_prefix: invalid path '/orders/../admin'; expected a path without dot segments",
        id="prefix-dot-segment",
    ),
    pytest.param(
        setter("routes", 1, "match", "path", value="/a%2fb"),
        "routes[1].match.path: invalid path '/a%2fb'; expected a plain path starting with '/'",
        id="path-percent",
    ),
    pytest.param(
        setter("routes", 0, "match", "path_prefix", value="/a//b"),
        "routes[0].match.path_prefix: invalid path '/a//b'",
        id="prefix-double-slash",
    ),
    pytest.param(
        setter("routes", 0, "match", "methods", value=["get"]),
        "routes[0].match.methods[0]: invalid value 'get'; expected an upper-case HTTP method such as GET",
        id="method-lower-case",
    ),
    pytest.param(
        setter("routes", 0, "match", "methods", value=[]),
        "routes[0].match.methods: empty list; expected at least one entry",
        id="methods-empty",
    ),
    # cache timing
    pytest.param(
        setter("issuers", "corp", "jwks_refetch_cooldown_s", value=601),
        "issuers.corp.jwks_refetch_cooldown_s: 601 is longer than jwks_cache_ttl_s (600); "
        "expected a value <= jwks_cache_ttl_s",
        id="cooldown-over-ttl",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_refresh_ahead_s", value=600),
        "issuers.corp.jwks_refresh_ahead_s: 600 is not shorter than jwks_cache_ttl_s (600); "
        "expected a value < jwks_cache_ttl_s",
        id="refresh-ahead-equal-ttl",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_refresh_ahead_s", value=900),
        "issuers.corp.jwks_refresh_ahead_s: 900 is not shorter than jwks_cache_ttl_s (600)",
        id="refresh-ahead-over-ttl",
    ),
    # numbers
    pytest.param(
        setter("issuers", "corp", "leeway_s", value=-1),
        "issuers.corp.leeway_s: got -1; expected a number >= 0",
        id="leeway-negative",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_cache_ttl_s", value=0),
        "issuers.corp.jwks_cache_ttl_s: got 0; expected a number > 0",
        id="ttl-zero",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_fetch_timeout_s", value=-0.5),
        "issuers.corp.jwks_fetch_timeout_s: got -0.5; expected a number > 0",
        id="fetch-timeout-negative",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_cache_ttl_s", value=True),
        "issuers.corp.jwks_cache_ttl_s: got True; expected a number of seconds",
        id="ttl-bool",
    ),
    pytest.param(
        setter("issuers", "corp", "leeway_s", value="30"),
        "issuers.corp.leeway_s: got '30'; expected a number of seconds",
        id="leeway-string",
    ),
    pytest.param(
        setter("issuers", "corp", "leeway_s", value=float("inf")),
        "issuers.corp.leeway_s: got inf; expected a number of seconds",
        id="leeway-infinite",
    ),
    pytest.param(
        setter("upstream_defaults", "connect_timeout_s", value=0),
        "upstream_defaults.connect_timeout_s: got 0; expected a number > 0",
        id="connect-timeout-zero",
    ),
    pytest.param(
        setter("upstream_defaults", "max_connections", value=0),
        "upstream_defaults.max_connections: got 0; expected an integer from 1 to 100000",
        id="max-connections-zero",
    ),
    pytest.param(
        setter("listen", "port", value=True),
        "listen.port: got True; expected an integer from 0 to 65535",
        id="port-bool",
    ),
    pytest.param(
        setter("listen", "port", value=65536),
        "listen.port: got 65536; expected an integer from 0 to 65535",
        id="port-too-big",
    ),
    pytest.param(
        setter("admin", "port", value=80.5),
        "admin.port: got 80.5; expected an integer from 0 to 65535",
        id="port-float",
    ),
    pytest.param(
        setter("listen", "shutdown_timeout_s", value=False),
        "listen.shutdown_timeout_s: got False; expected a number of seconds",
        id="shutdown-timeout-bool",
    ),
    pytest.param(
        setter("max_token_bytes", value=100),
        "max_token_bytes: got 100; expected an integer from 256 to 65536",
        id="max-token-bytes-too-small",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_max_bytes", value=10),
        "issuers.corp.jwks_max_bytes: got 10; expected an integer from 1024 to 16777216",
        id="jwks-max-bytes-too-small",
    ),
    # route policy features
    pytest.param(
        setter("routes", 0, "match", "hosts", value=["bad host"]),
        "routes[0].match.hosts[0]: invalid value 'bad host'; "
        "expected a host name such as api.example.com or *.example.com",
        id="host-invalid",
    ),
    pytest.param(
        setter("routes", 0, "auth", "mode", value="audit"),
        "routes[0].auth.mode: got 'audit'; expected one of: required, optional, report-only",
        id="mode-unknown",
    ),
    pytest.param(
        setter(
            "routes",
            0,
            "auth",
            "token_from",
            value=[{"header": "Authorization", "prefix": "Bearer "}, {"header": "authorization"}],
        ),
        "routes[0].auth.token_from: a token source is listed twice",
        id="token-source-twice",
    ),
    pytest.param(
        setter("routes", 0, "auth", "token_from", value=[{"header": "Cookie"}]),
        "routes[0].auth.token_from[0].header: header 'Cookie' cannot carry a token; "
        "expected an end-to-end header",
        id="token-source-cookie-header",
    ),
    pytest.param(
        setter("routes", 0, "auth", "token_from", value=[{"header": "X-T", "cookie": "c"}]),
        "routes[0].auth.token_from[0]: needs exactly one of header, cookie, query",
        id="token-source-two-kinds",
    ),
    pytest.param(
        setter("routes", 0, "auth", "token_from", value=[{"cookie": "c", "prefix": "B "}]),
        "routes[0].auth.token_from[0].prefix: a prefix applies to headers only",
        id="token-source-prefix-on-cookie",
    ),
    pytest.param(
        setter("routes", 1, "rewrite", value={"strip_prefix": True}),
        "routes[1].rewrite: a rewrite needs match.path_prefix; expected match.path_prefix, not match.path",
        id="rewrite-on-exact-path",
    ),
    pytest.param(
        setter(
            "routes", 0, "auth", "claims", value=[{"path": "a", "equals": "x", "one_of": ["y"]}]
        ),
        "routes[0].auth.claims[0]: needs exactly one comparison; expected one of: contains, equals, one_of",
        id="claim-matcher-two-ops",
    ),
    pytest.param(
        setter("routes", 0, "auth", "claims", value=[{"path": "a", "equals": 1.5}]),
        "routes[0].auth.claims[0].equals: got 1.5; expected a string, integer or boolean",
        id="claim-matcher-float",
    ),
    pytest.param(
        setter("routes", 0, "auth", "required_scopes", value={"all_of": ["a"], "any_of": ["b"]}),
        "routes[0].auth.required_scopes: needs exactly one of all_of, any_of",
        id="scopes-all-and-any",
    ),
    pytest.param(
        setter("routes", 2, "payload_header", value="X-Jwt"),
        "routes[2].payload_header: payload_header on a route with 'auth: none'; "
        "expected no identity on a public route",
        id="payload-header-on-public-route",
    ),
    pytest.param(
        setter("routes", 0, "claim_headers", "X-Org", value={"claim": "org", "format": "xml"}),
        "routes[0].claim_headers.X-Org.format: got 'xml'; expected one of: csv, json",
        id="claim-header-format",
    ),
    pytest.param(
        setter("issuers", "corp", "typ", value="a b"),
        "issuers.corp.typ: invalid value 'a b'; expected a media type such as at+jwt",
        id="typ-invalid",
    ),
    pytest.param(
        setter("issuers", "corp", "jwks_cache_min_ttl_s", value=700),
        "issuers.corp: cache lifetimes min 700, default 600, max 3600 are out of order; "
        "expected jwks_cache_min_ttl_s <= jwks_cache_ttl_s <= jwks_cache_max_ttl_s",
        id="cache-lifetimes-out-of-order",
    ),
    pytest.param(
        _inline_jwks_without_usable_key,
        "issuers.corp.jwks: no usable signing key; "
        "expected a JWKS with at least one key usable with 'algorithms'",
        id="inline-jwks-unusable",
    ),
    # other sections
    pytest.param(
        setter("trusted_proxies", value=["10.0.0.0/8", "not-an-ip"]),
        "trusted_proxies[1]: invalid network 'not-an-ip'; expected an IP address or CIDR",
        id="trusted-proxy-invalid",
    ),
    pytest.param(
        setter("realm", value='a"b'),
        "realm: invalid value 'a\"b'",
        id="realm-with-quote",
    ),
    pytest.param(
        setter("listen", value=[]),
        "listen: got a list; expected a mapping",
        id="listen-not-a-mapping",
    ),
]


@pytest.mark.parametrize(
    ("edit", "path", "key", "allowed"),
    [
        pytest.param(
            setter("bogus", value=1), "", "bogus", {"issuers", "routes", "listen"}, id="root"
        ),
        pytest.param(
            setter("listen", "hots", value="x"), "listen.", "hots", {"host", "port"}, id="listen"
        ),
        pytest.param(
            setter("admin", "bind", value="x"), "admin.", "bind", {"host", "port"}, id="admin"
        ),
        pytest.param(
            setter("upstream_defaults", "retries", value=3),
            "upstream_defaults.",
            "retries",
            {"connect_timeout_s", "timeout_s", "max_connections"},
            id="upstream-defaults",
        ),
        pytest.param(
            setter("issuers", "corp", "audience", value="x"),
            "issuers.corp.",
            "audience",
            {"issuer", "jwks_uri", "algorithms", "leeway_s", "jwks_cache_ttl_s"},
            id="issuer",
        ),
        pytest.param(
            setter("routes", 1, "timeout", value=3),
            "routes[1].",
            "timeout",
            {"id", "match", "upstream", "auth", "claim_headers"},
            id="route",
        ),
        pytest.param(
            setter("routes", 0, "match", "host", value="x"),
            "routes[0].match.",
            "host",
            {"path", "path_prefix", "methods"},
            id="match",
        ),
        pytest.param(
            setter("routes", 0, "auth", "audience", value=["x"]),
            "routes[0].auth.",
            "audience",
            {"issuers", "audiences", "required_claims", "required_scopes", "forward_token"},
            id="auth",
        ),
        pytest.param(
            setter("routes", 0, "claim_headers", "X-Org", value={"claim": "org", "fmt": "json"}),
            "routes[0].claim_headers.X-Org.",
            "fmt",
            {"claim", "format"},
            id="claim-header-entry",
        ),
    ],
)
def test_unknown_keys_are_rejected_at_every_level(
    edit: Edit, path: str, key: str, allowed: set[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(BASE, edit)
    head = f"{path}{key}: unknown key {key!r}; expected one of: "
    text = str(caught.value)
    assert text.startswith(head)
    listed = text.removeprefix(head).split(", ")
    assert listed == sorted(listed)
    assert allowed <= set(listed)
    assert key not in listed


@pytest.mark.parametrize(("edit", "message"), INVALID)
def test_invalid_config_names_path_and_expectation(edit: Edit, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(BASE, edit)
    text = str(caught.value)
    assert text.startswith(caught.value.path + ": ")
    assert message in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "routes: [\n  - id: x\n    match: {path: /a\n",
            "line 2, column 3: invalid YAML: expected the node content, but found '-'",
            id="unclosed-flow-mapping",
        ),
        pytest.param(
            "a: b: c\n",
            "line 1, column 5: invalid YAML: mapping values are not allowed here",
            id="nested-colon",
        ),
        pytest.param(
            "routes:\n\t- x\n",
            "line 2, column 1: invalid YAML: found character '\\t' that cannot start any token",
            id="tab-indent",
        ),
    ],
)
def test_invalid_yaml_reports_line_and_column(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "<root>: got a list; expected a mapping"),
        ("just a string\n", "<root>: got 'just a string'; expected a mapping"),
        ("", "<root>: got nothing; expected a mapping"),
    ],
    ids=["list", "scalar", "empty-document"],
)
def test_non_mapping_root_is_rejected(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    assert str(caught.value) == message


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False), encoding="utf-8")
    assert load_config(path) == load(BASE)
    assert load_config(str(path)) == load(BASE)


def test_load_config_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == f"cannot read {str(missing)!r}: No such file or directory"


def test_load_config_of_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"realm: caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


DUPLICATE_AUTH = """\
issuers:
  corp:
    issuer: https://idp.corp.example
    jwks_uri: https://idp.corp.example/jwks.json
    algorithms: [RS256]
routes:
  - id: admin
    match: {path_prefix: /admin}
    upstream: http://admin.internal
    auth:
      issuers: [corp]
      audiences: [admin]
    auth: none
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # PyYAML keeps the last of duplicate keys: a second `auth: none` would make the route public.
        pytest.param(
            DUPLICATE_AUTH,
            "routes[0].auth: key given twice; expected each key once per mapping",
            id="route-auth",
        ),
        pytest.param(
            'issuers: {corp: {issuer: x}}\nissuers: {"corp": {}}\n',
            "issuers: key given twice; expected each key once per mapping",
            id="quoted-spelling-of-the-same-key",
        ),
        pytest.param(
            "routes: []\nissuers: {}\nroutes: []\n",
            "routes: key given twice; expected each key once per mapping",
            id="top-level",
        ),
        pytest.param(
            DUPLICATE_AUTH.replace("    auth: none\n", "").replace(
                "      audiences: [admin]\n", "      audiences: [admin]\n      audiences: any\n"
            ),
            "routes[0].auth.audiences: key given twice; expected each key once per mapping",
            id="nested-audiences",
        ),
    ],
)
def test_duplicate_yaml_keys_are_rejected(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    assert str(caught.value) == message


def test_same_key_in_different_mappings_is_not_a_duplicate() -> None:
    text = DUPLICATE_AUTH.replace("    auth: none\n", "") + (
        "  - id: public\n"
        "    match: {path_prefix: /public}\n"
        "    upstream: http://public.internal\n"
        "    auth: none\n"
    )
    config = loads_config(text)
    assert [r.id for r in config.routes] == ["admin", "public"]
    assert config.routes[0].auth is not None
    assert config.routes[1].auth is None


# --- upstream_defaults.pool_timeout_s ------------------------------------------------
def test_pool_timeout_defaults_to_five_seconds_and_can_be_set() -> None:
    assert load(MINIMAL).upstream_defaults.pool_timeout_s == 5.0
    config = load(BASE, setter("upstream_defaults", "pool_timeout_s", value=0.25))
    assert config.upstream_defaults.pool_timeout_s == 0.25


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(
            0, "upstream_defaults.pool_timeout_s: got 0; expected a number > 0", id="zero"
        ),
        pytest.param(
            -1, "upstream_defaults.pool_timeout_s: got -1; expected a number > 0", id="negative"
        ),
        pytest.param(
            "x",
            "upstream_defaults.pool_timeout_s: got 'x'; expected a number of seconds",
            id="text",
        ),
    ],
)
def test_pool_timeout_must_be_a_positive_number_of_seconds(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(BASE, setter("upstream_defaults", "pool_timeout_s", value=value))
    assert str(caught.value) == message
    assert caught.value.path == "upstream_defaults.pool_timeout_s"
