"""Forward-auth mode through the gateway's own HTTP surface: each caller's dialect, the decision,
the headers that keep a client's identity headers from the upstream, and the refusals.

The real nginx, Envoy and Traefik in front of it are in test_forward_auth_callers.py.
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
from tests.integration.authkit import (
    expected_body,
    expected_challenge,
    logged,
    send_raw,
)

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


async def test_a_claim_outside_latin_1_reaches_the_caller_in_utf_8_as_an_upstream_gets_it(
    fa, token
):
    """The caller copies the answer's header bytes onto the request it forwards (nginx's
    auth_request_set): they are the claim's UTF-8, as proxy mode sends them upstream."""
    email = "zoë@例え.jp"
    jwt = token(email=email)
    headers = [*nginx_headers("GET", "/api/orders").items(), *bearer(jwt).items()]
    response = await send_raw(fa.client, "GET", NGINX, headers)
    assert response.status == 200
    # RawConnection reads header bytes as Latin-1, one character per byte.
    assert response.headers["X-User-Email"].encode("latin-1").decode("utf-8") == email


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


def hosted(document: dict[str, Any]) -> None:
    """forward_auth, with the api route and a public home page ("/" exactly) on api.example.com."""
    forward_auth(document)
    document["routes"][0]["match"]["hosts"] = ["api.example.com"]
    document["routes"].append(
        {"id": "home", "match": {"path": "/", "hosts": ["api.example.com"]}, "auth": "none"}
    )


@pytest.mark.parametrize(
    ("url", "status", "route"),
    [
        ("https://api.example.com/api/x?q=1", 200, "api"),
        ("http://api.example.com/api/x", 200, "api"),
        ("https://API.example.com:8443/api/x", 200, "api"),
        # A "://" later in the URL (a redirect target in the query) is not the scheme's.
        ("https://api.example.com/api/x?next=https://other.example.com/", 200, "api"),
        # No path: the root; a query straight after the authority is the root's query.
        ("https://api.example.com", 200, "home"),
        ("https://api.example.com?x=1", 200, "home"),
        ("https://api.example.com?x=1?y=2", 200, "home"),
        ("https://other.example.com/api/x", 404, "_unmatched"),
        ("https://other.example.com", 404, "_unmatched"),
    ],
)
async def test_ingress_nginx_x_original_url_gives_host_and_target(
    make_gateway, token, decisions, url, status, route
):
    gw = await make_gateway(hosted)
    headers = {"X-Original-Method": "GET", "X-Original-URL": url} | bearer(token())
    response = await gw.client.get(NGINX, headers=headers)
    assert response.status == status
    assert logged(decisions)["route"] == route


async def test_with_an_x_original_uri_a_client_sent_x_original_url_is_never_read(
    make_gateway, token, decisions
):
    # nginx auth_request sets X-Original-URI and Host but passes a client's X-Original-URL on.
    gw = await make_gateway(hosted)
    headers = {
        "X-Original-Method": "GET",
        "X-Original-URI": "/api/x",
        "X-Original-URL": "https://api.example.com/public/x",
    }
    response = await gw.client.get(NGINX, headers=headers | bearer(token()))
    assert response.status == 404
    assert logged(decisions)["path"] == "/api/x"
    response = await gw.client.get(NGINX, headers=headers | {"Host": "api.example.com"})
    assert response.status == 401
    assert (await response.json())["error"]["reason"] == "token_missing"


async def test_traefik_host_is_x_forwarded_host_else_the_host_header(make_gateway, token):
    gw = await make_gateway(hosted)
    headers = traefik_headers("GET", "/api/x") | bearer(token())
    for host, status in (
        ("api.example.com", 200),
        ("API.example.com:443", 200),
        ("b.example", 404),
    ):
        response = await gw.client.get(TRAEFIK, headers=headers | {"X-Forwarded-Host": host})
        assert response.status == status, host
    # Without X-Forwarded-Host, the check request's own Host names the original host.
    assert (
        await gw.client.get(TRAEFIK, headers=headers | {"Host": "api.example.com"})
    ).status == 200
    assert (await gw.client.get(TRAEFIK, headers=headers)).status == 404


@pytest.mark.parametrize(
    "host", ["public.example.com:@api.example.com", "api.example.com/x", "api.example.com:port"]
)
async def test_a_described_host_that_is_no_host_is_refused(make_gateway, token, decisions, host):
    gw = await make_gateway(hosted)
    headers = traefik_headers("GET", "/api/x", **{"X-Forwarded-Host": host}) | bearer(token())
    response = await gw.client.get(TRAEFIK, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "request_rejected"
    assert logged(decisions)["detail"] == "invalid_Host"


async def test_nginx_host_without_x_original_url_is_the_host_header(make_gateway, token):
    gw = await make_gateway(hosted)
    headers = nginx_headers("GET", "/api/x") | bearer(token())
    assert (await gw.client.get(NGINX, headers=headers | {"Host": "api.example.com"})).status == 200
    assert (await gw.client.get(NGINX, headers=headers)).status == 404


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


async def test_a_query_token_is_found_when_a_later_parameter_holds_a_question_mark(
    make_gateway, token
):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["auth"]["token_from"] = [{"query": "access_token"}]

    gw = await make_gateway(edit)
    uri = f"/api/x?access_token={token()}&next=/a?b"
    response = await gw.client.get(NGINX, headers=nginx_headers("GET", uri))
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"


async def test_report_only_route_reads_a_query_token_too(make_gateway, token):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["auth"]["mode"] = "report-only"
        document["routes"][0]["auth"]["token_from"] = [{"query": "access_token"}]

    gw = await make_gateway(edit)
    uri = f"/api/x?access_token={token()}"
    response = await gw.client.get(NGINX, headers=nginx_headers("GET", uri))
    assert response.status == 200
    assert response.headers["X-Gateway-Auth-Outcome"] == "ok"
    assert response.headers["X-User-Sub"] == "alice"


async def test_report_only_route_without_a_token_allows_and_logs_what_was_missing(
    make_gateway, decisions
):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"][0]["auth"]["mode"] = "report-only"

    gw = await make_gateway(edit)
    response = await gw.client.get(NGINX, headers=nginx_headers("GET", "/api/x"))
    assert response.status == 200
    assert response.headers["X-Gateway-Auth-Outcome"] == "token_missing"
    line = logged(decisions)
    assert (line["reason"], line["would_reject"], line["detail"]) == (
        "ok",
        "token_missing",
        "no_token",
    )
    assert (
        gw.metric("gateway_report_only_decisions_total", route="api", reason="token_missing") == 1
    )


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


async def test_missing_token_gets_the_bare_challenge(fa, decisions):
    response = await fa.client.get(NGINX, headers=nginx_headers("GET", "/api/x"))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == expected_challenge(Reason.TOKEN_MISSING)
    line = logged(decisions)
    assert (line["reason"], line["detail"]) == ("token_missing", "no_token")


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


async def test_a_peer_outside_trusted_proxies_is_refused_whatever_it_says(
    make_gateway, token, decisions
):
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
        assert logged(decisions)["detail"] == "peer_not_in_trusted_proxies"
        decisions.clear()
    assert gw.metric("gateway_requests_total", route="_unmatched", reason="caller_untrusted") == 3


@pytest.mark.parametrize(
    ("path", "headers", "detail"),
    [
        pytest.param(
            NGINX,
            {"X-Original-URI": "/api/x"},
            "no X-Original-Method from the caller",
            id="no method",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "", "X-Original-URI": "/api/x"},
            "no X-Original-Method from the caller",
            id="empty method",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET"},
            "no X-Original-URI or X-Original-URL from nginx",
            id="no target",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "get me", "X-Original-URI": "/api"},
            "invalid original method",
            id="bad method",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET", "X-Original-URI": "/public/../api"},
            "ambiguous path",
            id="dot segment",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET", "X-Original-URI": "http://a/api"},
            "path is not origin-form",
            id="absolute form",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET", "X-Original-URL": "ftp://a/api"},
            "X-Original-URL is not an absolute http(s) URL",
            id="not http",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET", "X-Original-URL": "/api/x"},
            "X-Original-URL is not an absolute http(s) URL",
            id="not absolute",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET", "X-Original-URL": "http://u@a/api"},
            "X-Original-URL has no plain authority",
            id="userinfo",
        ),
        pytest.param(
            NGINX,
            {"X-Original-Method": "GET", "X-Original-URL": "https:///api/x"},
            "X-Original-URL has no plain authority",
            id="no authority",
        ),
        pytest.param(
            TRAEFIK,
            {"X-Forwarded-Method": "GET"},
            "no X-Forwarded-Uri from the caller",
            id="no uri",
        ),
        pytest.param(
            TRAEFIK,
            {"X-Forwarded-Uri": "/public/%2e%2e/api"},
            "no X-Forwarded-Method from the caller",
            id="traefik no method",
        ),
        pytest.param(
            TRAEFIK,
            {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/public/%2e%2e/api"},
            "ambiguous path",
            id="encoded dots",
        ),
    ],
)
async def test_an_undescribed_or_ambiguous_original_request_is_400_and_the_log_says_why(
    fa, decisions, path, headers, detail
):
    response = await fa.client.get(path, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "request_rejected"
    # The operator fixing the caller's config reads what it left out in the decision line.
    assert logged(decisions)["detail"] == detail.replace(" ", "_")


@pytest.mark.parametrize(
    ("path", "headers", "repeated"),
    [
        pytest.param(
            NGINX,
            [
                ("X-Original-Method", "GET"),
                ("X-Original-URI", "/public/x"),
                ("X-Original-URI", "/api"),
            ],
            "X-Original-URI",
            id="X-Original-URI",
        ),
        pytest.param(
            NGINX,
            [
                ("X-Original-Method", "GET"),
                ("X-Original-URL", "https://a/public/x"),
                ("X-Original-URL", "https://b/api"),
            ],
            "X-Original-URL",
            id="X-Original-URL",
        ),
        pytest.param(
            NGINX,
            [
                ("X-Original-Method", "GET"),
                ("X-Original-Method", "POST"),
                ("X-Original-URI", "/public/x"),
            ],
            "X-Original-Method",
            id="X-Original-Method",
        ),
        pytest.param(
            TRAEFIK,
            [
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/public/x"),
                ("X-Forwarded-Host", "a.example"),
                ("X-Forwarded-Host", "b.example"),
            ],
            "X-Forwarded-Host",
            id="X-Forwarded-Host",
        ),
        pytest.param(
            TRAEFIK,
            [
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/public/x"),
                ("X-Forwarded-Uri", "/api"),
            ],
            "X-Forwarded-Uri",
            id="X-Forwarded-Uri",
        ),
    ],
)
async def test_a_repeated_description_header_is_refused(fa, decisions, path, headers, repeated):
    response = await send_raw(fa.client, "GET", path, headers)
    assert response.status == 400
    assert response.json()["error"]["reason"] == "request_rejected"
    assert logged(decisions)["detail"] == f"{repeated}_given_2_times"


async def test_other_paths_on_the_listener_are_404(fa, decisions):
    for path in ("/", "/api/x", "/auth/nginxx", "/auth/envoyx/api", "/auth/traefik/x"):
        decisions.clear()
        response = await fa.client.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["reason"] == "route_not_found"
        assert logged(decisions)["detail"] == "not_a_forward-auth_endpoint", path
    assert fa.metric("gateway_forward_auth_decisions_total", caller="nginx", decision="deny") == 0


async def test_an_endpoint_called_with_a_query_string_is_still_that_endpoint(fa, token):
    # ingress-nginx's auth-url may carry a query of its own; the original request is in the headers.
    response = await fa.client.get(
        f"{NGINX}?from=ingress", headers=nginx_headers("GET", "/api/x") | bearer(token())
    )
    assert response.status == 200
    assert response.headers["X-User-Sub"] == "alice"
    response = await fa.client.get(
        f"{TRAEFIK}?x=1", headers=traefik_headers("GET", "/api/x") | bearer(token())
    )
    assert response.status == 200


async def test_envoy_with_nothing_after_the_prefix_asks_about_the_root(make_gateway, decisions):
    def edit(document: dict[str, Any]) -> None:
        forward_auth(document)
        document["routes"].append({"id": "home", "match": {"path": "/"}, "auth": "none"})

    gw = await make_gateway(edit)
    response = await gw.client.get(ENVOY)
    assert response.status == 200
    assert logged(decisions)["route"] == "home"
    # "/auth/envoy?x=1" is the Envoy endpoint too, asking about "/?x=1".
    decisions.clear()
    assert (await gw.client.get(f"{ENVOY}?x=1")).status == 200
    line = logged(decisions)
    assert line["caller"] == "envoy"
    assert line["route"] == "home"


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
    assert "status=200 " in line
    # Which issuer and key vouched for the caller's user.
    assert "issuer=test " in line
    assert "kid=key-rs256 " in line


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
