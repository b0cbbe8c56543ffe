"""Forward-auth mode through the gateway's own HTTP surface: each caller's dialect, the decision,
the headers that keep a client's identity headers from the upstream, and the refusals.

The real nginx and Envoy in front of it are in test_forward_auth_nginx.py and _envoy.py.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import yaml

from gateway import loads_config
from gateway.app import GATEWAY_KEY
from gateway.errors import ConfigError
from gateway.reasons import REASON_SPECS, Reason
from tests.conftest import GatewayFactory, RunningGateway, base_config, bearer
from tests.integration.authkit import expected_body, expected_challenge, send_raw

NGINX = "/auth/nginx"
TRAEFIK = "/auth/traefik"
ENVOY = "/auth/envoy"


def forward_auth(document: dict[str, Any]) -> None:
    document["mode"] = "forward_auth"
    document["trusted_proxies"] = ["127.0.0.1/32"]


@pytest.fixture
async def fa(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway(forward_auth)


def nginx_headers(method: str, uri: str, **extra: str) -> dict[str, str]:
    return {"X-Original-Method": method, "X-Original-URI": uri, **extra}


def traefik_headers(method: str, uri: str, **extra: str) -> dict[str, str]:
    return {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **extra}


# --- allow ------------------------------------------------------------------------------------
async def test_nginx_allow_answers_200_with_the_claim_headers_and_never_calls_the_upstream(
    fa, token, upstream
):
    jwt = token(email="alice@example.com", org={"tenant_id": "t1"})
    response = await fa.client.get(
        NGINX, headers=nginx_headers("GET", "/api/orders?x=1") | bearer(jwt)
    )
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"
    assert response.headers["X-User-Email"] == "alice@example.com"
    assert response.headers["X-Tenant-Id"] == "t1"
    assert await response.read() == b""
    assert upstream.hits == 0
    assert fa.metric("gateway_requests_total", route="api", reason="ok") == 1
    assert fa.metric("gateway_forward_auth_decisions_total", caller="nginx", decision="allow") == 1


async def test_traefik_dialect_reads_the_forwarded_method_uri_and_host(fa, token):
    headers = traefik_headers("GET", "/api/x", **{"X-Forwarded-Host": "a.example"}) | bearer(
        token()
    )
    response = await fa.client.get(TRAEFIK, headers=headers)
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"
    assert (
        fa.metric("gateway_forward_auth_decisions_total", caller="traefik", decision="allow") == 1
    )


async def test_envoy_dialect_takes_the_path_after_the_prefix_and_the_checks_own_method(fa, token):
    # POST /public is a public route; DELETE /public is not matched by any route (methods GET, POST).
    assert (await fa.client.post(f"{ENVOY}/public/x?y=1")).status == 200
    response = await fa.client.delete(f"{ENVOY}/public/x")
    assert response.status == 404
    assert await response.json() == expected_body(Reason.ROUTE_NOT_FOUND)
    allowed = await fa.client.get(f"{ENVOY}/api/x", headers=bearer(token()))
    assert allowed.status == 200
    assert allowed.headers["X-User-Sub"] == "alice"


async def test_envoy_is_told_to_remove_every_owned_header_the_answer_does_not_set(fa, token):
    response = await fa.client.get(f"{ENVOY}/api/x", headers=bearer(token()))
    removed = response.headers["x-envoy-auth-headers-to-remove"].split(",")
    # The token has sub but no email or tenant: those, every other route's claim headers, the
    # report-only outcome header and the token itself (the route does not forward it).
    assert sorted(removed) == sorted(
        ["x-user-email", "x-tenant-id", "x-scope", "x-gateway-auth-outcome", "authorization"]
    )
    assert "x-user-sub" not in removed


async def test_envoy_keeps_the_token_when_the_route_forwards_it(make_gateway, token):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["auth"]["forward_token"] = True

    gw = await make_gateway(edit)
    response = await gw.client.get(f"{ENVOY}/api/x", headers=bearer(token()))
    assert "authorization" not in response.headers["x-envoy-auth-headers-to-remove"].split(",")


async def test_public_route_needs_no_token_in_every_dialect(fa):
    assert (await fa.client.get(NGINX, headers=nginx_headers("GET", "/public/a"))).status == 200
    assert (await fa.client.get(TRAEFIK, headers=traefik_headers("GET", "/public/a"))).status == 200
    envoy = await fa.client.get(f"{ENVOY}/public/a")
    assert envoy.status == 200
    # A public route still owns no identity: a client's copies are removed.
    assert "x-user-sub" in envoy.headers["x-envoy-auth-headers-to-remove"].split(",")


async def test_ingress_nginx_x_original_url_gives_host_and_target(make_gateway, token):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["match"]["hosts"] = ["api.example.com"]

    gw = await make_gateway(edit)
    good = {"X-Original-Method": "GET", "X-Original-URL": "https://api.example.com/api/x?q=1"}
    assert (await gw.client.get(NGINX, headers=good | bearer(token()))).status == 200
    other = {"X-Original-Method": "GET", "X-Original-URL": "https://other.example.com/api/x"}
    assert (await gw.client.get(NGINX, headers=other | bearer(token()))).status == 404


async def test_report_only_route_allows_and_says_what_verification_found(make_gateway, token):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["auth"]["mode"] = "report-only"

    gw = await make_gateway(edit)
    response = await gw.client.get(
        NGINX, headers=nginx_headers("GET", "/api/x") | bearer(token(exp=1))
    )
    assert response.status == 200
    assert response.headers["X-Gateway-Auth-Outcome"] == "token_expired"
    assert "X-User-Sub" not in response.headers


async def test_a_query_token_is_read_from_the_original_target(make_gateway, token):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["auth"]["token_from"] = [{"query": "access_token"}]

    gw = await make_gateway(edit)
    uri = f"/api/x?access_token={token()}"
    response = await gw.client.get(NGINX, headers=nginx_headers("GET", uri))
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"


# --- deny -------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", [NGINX, TRAEFIK, ENVOY])
async def test_denial_has_the_proxy_modes_status_challenge_and_fixed_body(fa, token, where):
    headers = bearer(token(exp=1))
    if where == NGINX:
        headers |= nginx_headers("GET", "/api/x")
    elif where == TRAEFIK:
        headers |= traefik_headers("GET", "/api/x")
    path = f"{ENVOY}/api/x" if where == ENVOY else where
    response = await fa.client.get(path, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == expected_challenge(Reason.TOKEN_EXPIRED)
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body == expected_body(Reason.TOKEN_EXPIRED)
    # nginx drops the subrequest's body; only its answer carries a copy in a header.
    assert (response.headers.get("X-Gateway-Error") is not None) is (where == NGINX)
    if where == NGINX:
        assert json.loads(response.headers["X-Gateway-Error"]) == body
    caller = where.rsplit("/", 1)[1]
    assert fa.metric("gateway_forward_auth_decisions_total", caller=caller, decision="deny") == 1
    assert fa.metric("gateway_requests_total", route="api", reason="token_expired") == 1


async def test_insufficient_scope_is_403_with_the_scope_challenge(fa, token):
    response = await fa.client.get(
        NGINX, headers=nginx_headers("GET", "/scoped/x") | bearer(token(scope="other"))
    )
    assert response.status == 403
    assert response.headers["WWW-Authenticate"] == expected_challenge(
        Reason.INSUFFICIENT_SCOPE, "orders:read"
    )


async def test_missing_token_gets_the_bare_challenge(fa):
    response = await fa.client.get(NGINX, headers=nginx_headers("GET", "/api/x"))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == expected_challenge(Reason.TOKEN_MISSING)


async def test_wrong_audience_and_forged_signature_are_refused(fa, token):
    wrong = await fa.client.get(
        NGINX, headers=nginx_headers("GET", "/api/x") | bearer(token(aud="other"))
    )
    assert (await wrong.json())["error"]["reason"] == "audience_not_allowed"
    jwt = token()
    forged = jwt[:-4] + ("AAAA" if not jwt.endswith("AAAA") else "BBBB")
    response = await fa.client.get(NGINX, headers=nginx_headers("GET", "/api/x") | bearer(forged))
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "signature_invalid"


async def test_a_peer_outside_trusted_proxies_is_refused_whatever_it_says(make_gateway, token):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["trusted_proxies"] = ["192.0.2.0/24"]

    gw = await make_gateway(edit)
    for path, headers in (
        (NGINX, nginx_headers("GET", "/public/x")),
        (TRAEFIK, traefik_headers("GET", "/public/x")),
        (f"{ENVOY}/public/x", {}),
    ):
        response = await gw.client.get(path, headers=headers | bearer(token()))
        assert response.status == 403, path
        assert "WWW-Authenticate" not in response.headers
        assert await response.json() == {
            "error": {
                "code": 403,
                "reason": "caller_untrusted",
                "message": REASON_SPECS[Reason.CALLER_UNTRUSTED].message,
            }
        }
        assert "X-User-Sub" not in response.headers
    assert gw.metric("gateway_requests_total", route="_unmatched", reason="caller_untrusted") == 3


@pytest.mark.parametrize(
    ("path", "headers", "why"),
    [
        (NGINX, {"X-Original-URI": "/api/x"}, "no method"),
        (NGINX, {"X-Original-Method": "GET"}, "no target"),
        (NGINX, {"X-Original-Method": "get me", "X-Original-URI": "/api"}, "bad method"),
        (NGINX, {"X-Original-Method": "GET", "X-Original-URI": "/public/../api"}, "dot segment"),
        (NGINX, {"X-Original-Method": "GET", "X-Original-URI": "http://a/api"}, "absolute form"),
        (NGINX, {"X-Original-Method": "GET", "X-Original-URL": "ftp://a/api"}, "not http"),
        (NGINX, {"X-Original-Method": "GET", "X-Original-URL": "http://u@a/api"}, "userinfo"),
        (TRAEFIK, {"X-Forwarded-Method": "GET"}, "no uri"),
        (TRAEFIK, {"X-Forwarded-Uri": "/public/%2e%2e/api"}, "no method"),
        (
            TRAEFIK,
            {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/public/%2e%2e/api"},
            "encoded dots",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else "",
)
async def test_an_undescribed_or_ambiguous_original_request_is_400(fa, path, headers, why):
    response = await fa.client.get(path, headers=headers)
    assert response.status == 400, why
    assert (await response.json())["error"]["reason"] == "request_rejected"


async def test_a_repeated_original_uri_is_refused(fa):
    response = await send_raw(
        fa.client,
        "GET",
        NGINX,
        [("X-Original-Method", "GET"), ("X-Original-URI", "/public/x"), ("X-Original-URI", "/api")],
    )
    assert response.status == 400
    assert response.json()["error"]["reason"] == "request_rejected"


async def test_other_paths_on_the_listener_are_404(fa):
    for path in ("/", "/api/x", "/auth/nginxx", "/auth/envoyx/api"):
        response = await fa.client.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["reason"] == "route_not_found"


# --- logs, config, reload ---------------------------------------------------------------------
async def test_the_decision_line_names_the_caller_and_the_original_request(fa, token, caplog):
    caplog.set_level(logging.INFO, logger="gateway.request")
    await fa.client.get(
        TRAEFIK, headers=traefik_headers("DELETE", "/api/items/7?x=1") | bearer(token())
    )
    line = next(r.getMessage() for r in caplog.records if "event=request" in r.getMessage())
    assert "caller=traefik" in line
    assert "method=DELETE" in line
    assert "path=/api/items/7 " in line
    assert "route=api" in line


def test_forward_auth_mode_needs_trusted_proxies_and_no_upstreams() -> None:
    routes = "routes: [{id: p, match: {path_prefix: /}, auth: none}]\n"
    with pytest.raises(ConfigError, match=r"trusted_proxies: forward_auth mode needs"):
        loads_config("mode: forward_auth\n" + routes)
    config = loads_config("mode: forward_auth\ntrusted_proxies: [10.0.0.0/8]\n" + routes)
    assert config.routes[0].upstream is None
    with pytest.raises(ConfigError, match=r"routes\[0\]\.upstream: missing required key"):
        loads_config(routes)
    with pytest.raises(
        ConfigError, match=r"mode: got 'forward'; expected one of: proxy, forward_auth"
    ):
        loads_config("mode: forward\n" + routes)


async def test_a_reload_cannot_switch_the_mode(fa, tmp_path, idp, upstream):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config(idp, upstream)))  # proxy mode
    assert await fa.app[GATEWAY_KEY].reload(path) is False
    assert fa.metric("gateway_config_reloads_total", result="failure") == 1
    # Still answering decisions, not proxying.
    assert (await fa.client.get(f"{ENVOY}/public/x")).status == 200
    assert upstream.hits == 0
