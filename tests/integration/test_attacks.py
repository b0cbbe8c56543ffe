"""End to end, over HTTP only: attacks on the verifier and on the trusted identity headers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.logs import REQUEST_LOGGER
from gateway.reasons import Reason
from tests.conftest import ISSUER, GatewayFactory, RunningGateway
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key
from tests.integration.authkit import (
    RawResponse,
    decision_lines,
    default_claims,
    echoed,
    expected_body,
    expected_challenge,
    rekeyed,
    send_raw,
    unsigned_token,
    values_of,
)


def _auth(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def assert_refused(response: RawResponse, reason: Reason, upstream: EchoUpstream) -> None:
    assert response.json() == expected_body(reason), response.body
    assert response.headers.get("WWW-Authenticate") == expected_challenge(reason)
    assert upstream.hits == 0


@pytest.fixture(scope="module")
def attacker_key() -> SigningKey:
    return generate_key("RS256", "attacker")


# --- identity headers ---------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["api", "public"])
async def test_underscore_spellings_of_claim_headers_never_reach_upstream(
    route: str, gateway: RunningGateway, token: Callable[..., str]
) -> None:
    headers = [("X_User_Sub", "root"), ("x_tenant_id", "evil-tenant"), ("X-User_Email", "evil@x")]
    if route == "api":
        headers.append(_auth(token()))
    target = "/api/orders" if route == "api" else "/public/page"

    seen = echoed(await send_raw(gateway.client, "GET", target, headers))

    owned = {"x-user-sub", "x-user-email", "x-tenant-id", "x-scope"}
    smuggled = [(k, v) for k, v in seen if k.lower().replace("_", "-") in owned and "_" in k]
    assert smuggled == []


async def test_connection_header_cannot_remove_injected_claims(
    gateway: RunningGateway, token: Callable[..., str]
) -> None:
    headers = [("Connection", "X-User-Sub, X-Tenant-Id"), _auth(token(org={"tenant_id": "acme"}))]

    seen = echoed(await send_raw(gateway.client, "GET", "/api/orders", headers))

    assert values_of(seen, "X-User-Sub") == ["alice"]
    assert values_of(seen, "X-Tenant-Id") == ["acme"]


@pytest.mark.parametrize(
    "email",
    ["a\nX-Evil: 1", "a\rX-Evil: 1", "a\x00b", "a\x7fb", "a\x1bb"],
    ids=["lf", "cr", "nul", "del", "esc"],
)
async def test_control_characters_in_claim_header_values_are_refused(
    email: str, gateway: RunningGateway, token: Callable[..., str], upstream: EchoUpstream
) -> None:
    response = await send_raw(gateway.client, "GET", "/api/orders", [_auth(token(email=email))])
    assert_refused(response, Reason.CLAIM_INVALID, upstream)


async def test_authorization_is_not_forwarded_to_a_public_route(
    gateway: RunningGateway, token: Callable[..., str]
) -> None:
    """README: Authorization is removed on every route unless the route sets forward_token."""
    minted = token()
    seen = echoed(await send_raw(gateway.client, "GET", "/public/page", [_auth(minted)]))
    assert values_of(seen, "Authorization") == []


# --- request targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["/public/..#x", "/public/.#", "/public/page/..#"])
async def test_fragment_cannot_hide_a_dot_segment(
    target: str, gateway: RunningGateway, upstream: EchoUpstream
) -> None:
    """The path matched must be the path forwarded; here the upstream would resolve it to /."""
    response = await send_raw(gateway.client, "GET", target)
    assert_refused(response, Reason.REQUEST_REJECTED, upstream)
    assert (
        gateway.metric("gateway_requests_total", route="_unmatched", reason="request_rejected") == 1
    )


@pytest.mark.parametrize(
    ("method", "target"),
    [("OPTIONS", "*"), ("CONNECT", "example.com:443")],
    ids=["asterisk", "authority"],
)
async def test_non_origin_form_targets_are_rejected_not_internal_errors(
    method: str, target: str, gateway: RunningGateway, upstream: EchoUpstream
) -> None:
    response = await send_raw(gateway.client, method, target)
    assert_refused(response, Reason.REQUEST_REJECTED, upstream)
    assert (
        gateway.metric("gateway_requests_total", route="_unmatched", reason="internal_error") == 0
    )


# --- forged keys and issuers ----------------------------------------------------------------------
async def test_embedded_jwk_header_is_not_trusted(
    gateway: RunningGateway,
    token: Callable[..., str],
    attacker_key: SigningKey,
    upstream: EchoUpstream,
) -> None:
    """CVE-2018-0114 style: the token carries its own public key under a known kid."""
    forged = token(
        key=rekeyed(attacker_key, kid="key-rs256"),
        headers={"jwk": attacker_key.public_jwk(kid="key-rs256")},
    )
    response = await send_raw(gateway.client, "GET", "/api/orders", [_auth(forged)])
    assert_refused(response, Reason.SIGNATURE_INVALID, upstream)


@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_key_urls_in_the_token_are_never_fetched(
    header: str,
    aiohttp_server: Any,
    gateway: RunningGateway,
    token: Callable[..., str],
    attacker_key: SigningKey,
    clock: FakeClock,
    idp: FakeIdP,
    upstream: EchoUpstream,
) -> None:
    hits: list[str] = []

    async def jwks(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [attacker_key.public_jwk()]})

    evil = web.Application()
    evil.router.add_get("/jwks.json", jwks)
    server = await aiohttp_server(evil)
    clock.advance(31)  # a refetch from the configured IdP is allowed; from anywhere else never
    fetches = idp.hits
    forged = token(key=attacker_key, headers={header: str(server.make_url("/jwks.json"))})

    response = await send_raw(gateway.client, "GET", "/api/orders", [_auth(forged)])

    assert_refused(response, Reason.KEY_NOT_FOUND, upstream)
    assert hits == []
    assert idp.hits == fetches + 1


async def test_kid_of_a_key_pinned_to_another_algorithm_is_not_used(
    gateway: RunningGateway,
    token: Callable[..., str],
    signing_keys: dict[str, SigningKey],
    upstream: EchoUpstream,
) -> None:
    """The PS256 JWK names its alg; an RS256 token under its kid is refused even if signed by it."""
    ps_key = signing_keys["PS256"]
    forged = token(key=SigningKey(kid=ps_key.kid, alg="RS256", private=ps_key.private))
    response = await send_raw(gateway.client, "GET", "/api/orders", [_auth(forged)])
    assert_refused(response, Reason.ALGORITHM_NOT_ALLOWED, upstream)


async def test_token_of_another_configured_issuer_is_refused_without_a_fetch(
    make_gateway: GatewayFactory,
    token: Callable[..., str],
    clock: FakeClock,
    idp: FakeIdP,
    upstream: EchoUpstream,
) -> None:
    """Cross-tenant: the 'partner' issuer is configured, but not trusted on /api."""

    def add_partner(doc: dict[str, Any]) -> None:
        doc["issuers"]["partner"] = {**doc["issuers"]["test"], "issuer": "https://partner.test"}

    gateway = await make_gateway(add_partner)
    clock.advance(31)
    fetches = idp.hits

    response = await send_raw(
        gateway.client, "GET", "/api/orders", [_auth(token(iss="https://partner.test"))]
    )

    assert_refused(response, Reason.ISSUER_NOT_ALLOWED, upstream)
    assert idp.hits == fetches


async def test_unknown_critical_header_is_refused(
    gateway: RunningGateway, token: Callable[..., str], upstream: EchoUpstream
) -> None:
    """RFC 7515 §4.1.11: a crit extension the recipient does not understand invalidates the JWS."""
    forged = token(headers={"crit": ["urn:example:bind"], "urn:example:bind": "x"})
    response = await send_raw(gateway.client, "GET", "/api/orders", [_auth(forged)])
    assert_refused(response, Reason.TOKEN_MALFORMED, upstream)


# --- credentials elsewhere and logs ---------------------------------------------------------------
@pytest.mark.parametrize(
    "where",
    ["query", "cookie", "form"],
)
async def test_token_outside_the_authorization_header_is_not_read(
    where: str,
    gateway: RunningGateway,
    token: Callable[..., str],
    upstream: EchoUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    minted = token()
    target, headers, body = "/api/orders", [], b""
    if where == "query":
        target = f"/api/orders?access_token={minted}"
    elif where == "cookie":
        headers = [("Cookie", f"access_token={minted}")]
    else:
        headers = [("Content-Type", "application/x-www-form-urlencoded")]
        body = f"access_token={minted}".encode()
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    response = await send_raw(gateway.client, "POST", target, headers, body=body)

    assert_refused(response, Reason.TOKEN_MISSING, upstream)
    for record in caplog.records:
        if record.name.startswith("gateway"):
            assert minted not in record.getMessage()


async def test_attacker_controlled_text_cannot_forge_log_fields(
    gateway: RunningGateway, upstream: EchoUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    forged = unsigned_token("x reason=ok", default_claims(0))
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    response = await send_raw(gateway.client, "GET", "/api/orders", [_auth(forged)])

    assert_refused(response, Reason.ALGORITHM_NOT_ALLOWED, upstream)
    [line] = decision_lines(caplog)
    fields = [f for f in line.split() if f.startswith(("reason=", "granted=", "outcome="))]
    assert fields == ["reason=algorithm_not_allowed", "outcome=rejected", "granted=false"]
    [record] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert record.levelno == logging.WARNING


async def test_issuer_constant_matches_the_gateway_config(gateway: RunningGateway) -> None:
    """Guards the forged-issuer tests: they are only meaningful if ISSUER is the trusted one."""
    assert [i.issuer for i in gateway.config.issuers.values()] == [ISSUER]


async def test_a_header_named_in_connection_is_stripped_in_either_spelling(
    gateway: RunningGateway,
) -> None:
    """``Connection: X_Secret`` declares X-Secret hop-by-hop for a CGI/WSGI upstream too."""
    headers = [("Connection", "X_Secret"), ("X-Secret", "1"), ("X_Secret", "2")]
    seen = echoed(await send_raw(gateway.client, "GET", "/public/page", headers))
    assert values_of(seen, "X-Secret") == []
    assert values_of(seen, "X_Secret") == []
