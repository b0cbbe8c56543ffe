"""Certificate-bound tokens (RFC 8705): a token whose ``cnf["x5t#S256"]`` names a client
certificate passes only over a connection that showed that certificate, taken from the
gateway's own TLS listener or, behind a TLS-terminating proxy, from a trusted proxy's header."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme

from gateway import ConfigError, loads_config
from tests.conftest import GatewayFactory, RunningGateway, base_config, bearer
from tests.fakes import EchoUpstream, FakeIdP, generate_key
from tests.integration.e2e_helpers import wait_until
from tests.integration.hardening_kit import sockets_to
from tests.integration.senderkit import b64url
from tests.integration.test_listener_tls import (
    NAME,
    client_context,
    https_get,
    listen_tls,
    write_pair,
)

XFCC = "X-Forwarded-Client-Cert"


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def x5t(cert: trustme.LeafCert) -> str:
    return b64url(hashlib.sha256(der(cert)).digest())


def bound(mode: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["routes"][0]["auth"]["certificate_bound"] = mode

    return edit


def from_header(fmt: str, trusted: bool = True) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["client_cert_header"] = {"name": XFCC, "format": fmt}
        doc["trusted_proxies"] = ["127.0.0.1/32"] if trusted else ["10.0.0.0/8"]

    return edit


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def reason_of(gw: RunningGateway, headers: dict[str, str]) -> tuple[int, str]:
    async with gw.client.get("/api/orders", headers=headers) as response:
        body = await response.read()
        if response.status == 200:
            return 200, "ok"
        return response.status, json.loads(body)["error"]["reason"]


# --- the gateway's own TLS listener -----------------------------------------------------------
async def test_over_the_listener_a_bound_token_needs_its_own_certificate(
    make_gateway: GatewayFactory, ca: trustme.CA, tmp_path: Path, token: Any
) -> None:
    write_pair(ca, tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    tls = listen_tls(tmp_path, client_ca_file=str(tmp_path / "clients.pem"))
    # Served in this process (the listener's TLS context as ``gateway run`` builds it), so a
    # mutation run sees which listener code decides (a subprocess's would be hidden from it).
    gw = await make_gateway(tls, bound("required"), served=True, admin=False)
    owner = ca.issue_cert("service-a@example.test")
    other = ca.issue_cert("service-b@example.test")  # same CA: a valid handshake, not the owner
    access = bearer(token(cnf={"x5t#S256": x5t(owner)}))

    status, body, _ = await https_get(gw.port, client_context(ca, client=owner), "/api/x", access)
    assert status == 200, body
    assert b'["X-Forwarded-Proto", "https"]' in body  # the upstream learns the client used TLS
    for context in (client_context(ca, client=other), client_context(ca)):
        status, body, _ = await https_get(gw.port, context, "/api/x", access)
        assert (status, json.loads(body)["error"]["reason"]) == (401, "cert_binding_mismatch")
    # A required route takes no unbound token, whatever the certificate.
    status, body, _ = await https_get(
        gw.port, client_context(ca, client=owner), "/api/x", bearer(token())
    )
    assert (status, json.loads(body)["error"]["reason"]) == (401, "cert_binding_mismatch")


async def test_a_client_gone_while_its_key_is_fetched_is_not_an_internal_error(
    make_gateway: GatewayFactory,
    ca: trustme.CA,
    tmp_path: Path,
    token: Any,
    idp: FakeIdP,
    clock: Any,
    signing_keys: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The certificate binding is checked after the signature, which may wait for a key
    fetch: a client that leaves meanwhile ends its request as ``client_disconnected`` once
    the keys come, with no error logged (no 500, no traceback)."""
    caplog.set_level(logging.INFO)
    write_pair(ca, tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    tls = listen_tls(tmp_path, client_ca_file=str(tmp_path / "clients.pem"))
    gw = await make_gateway(tls, bound("required"), served=True, admin=False)
    fresh = generate_key("RS256", "fresh-rs256")  # not yet in the gateway's key cache
    idp.publish(*signing_keys.values(), fresh)
    clock.advance(31)  # past the refetch cooldown (30 s): a kid miss fetches the keys
    idp.mode = "slow"
    owner = ca.issue_cert("service-a@example.test")
    access = bearer(token(key=fresh, cnf={"x5t#S256": x5t(owner)}))
    hits = idp.hits
    _, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=client_context(ca, client=owner), server_hostname=NAME
    )
    client_port = writer.get_extra_info("sockname")[1]
    lines = ["GET /api/x HTTP/1.1", f"Host: {NAME}", *(f"{k}: {v}" for k, v in access.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await wait_until(lambda: idp.hits > hits, what="the key fetch began")
    writer.transport.abort()  # the client leaves while the gateway waits for the keys
    await wait_until(lambda: sockets_to(client_port) == 0, what="the gateway saw it leave")
    idp.release.set()

    def ended() -> float:
        return gw.metric("gateway_requests_total", route="api")

    await wait_until(lambda: ended() == 1, what="the request ended")
    # Its request is cut where the client left (the wait for the keys), before any
    # certificate is asked for: not a binding mismatch, not a 500.
    assert gw.metric("gateway_requests_total", route="api", reason="client_disconnected") == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- behind a TLS-terminating proxy ---------------------------------------------------------
@pytest.mark.parametrize("fmt", ["xfcc", "pem"])
async def test_behind_a_proxy_the_trusted_header_names_the_certificate(
    make_gateway: GatewayFactory, ca: trustme.CA, token: Any, fmt: str
) -> None:
    owner, other = ca.issue_cert("a@example.test"), ca.issue_cert("b@example.test")
    gw = await make_gateway(bound("required"), from_header(fmt))

    def header(cert: trustme.LeafCert) -> dict[str, str]:
        pem = cert.cert_chain_pems[0].bytes().decode()
        if fmt == "pem":  # nginx $ssl_client_escaped_cert
            return {XFCC: quote(pem)}
        # Envoy SANITIZE_SET: one element, with the hash and the URL-encoded certificate.
        digest = hashlib.sha256(der(cert)).hexdigest()
        return {XFCC: f'Hash={digest};Cert="{quote(pem)}";Subject="CN=x"'}

    access = bearer(token(cnf={"x5t#S256": x5t(owner)}))
    assert await reason_of(gw, {**access, **header(owner)}) == (200, "ok")
    assert await reason_of(gw, {**access, **header(other)}) == (401, "cert_binding_mismatch")
    assert await reason_of(gw, access) == (401, "cert_binding_mismatch")
    # A required route takes no unbound token, whatever certificate the proxy names.
    assert await reason_of(gw, {**bearer(token()), **header(owner)}) == (
        401,
        "cert_binding_mismatch",
    )


async def test_an_xfcc_chain_of_several_elements_is_not_trusted(
    make_gateway: GatewayFactory, ca: trustme.CA, token: Any
) -> None:
    # With APPEND_FORWARD the first element may be the client's own forgery.
    owner = ca.issue_cert("a@example.test")
    gw = await make_gateway(bound("required"), from_header("xfcc"))
    digest = hashlib.sha256(der(owner)).hexdigest()
    chain = f'Hash={digest};Subject="CN=a",Hash={"0" * 64}'
    access = bearer(token(cnf={"x5t#S256": x5t(owner)}))
    assert await reason_of(gw, {**access, XFCC: chain}) == (401, "cert_binding_mismatch")


async def test_the_header_counts_only_from_trusted_proxies_and_is_stripped_from_others(
    make_gateway: GatewayFactory, ca: trustme.CA, token: Any
) -> None:
    owner = ca.issue_cert("a@example.test")
    gw = await make_gateway(bound("allowed"), from_header("xfcc", trusted=False))
    digest = hashlib.sha256(der(owner)).hexdigest()
    forged = {XFCC: f"Hash={digest}"}
    stolen = bearer(token(cnf={"x5t#S256": x5t(owner)}))
    assert await reason_of(gw, {**stolen, **forged}) == (401, "cert_binding_mismatch")
    # An unbound token passes an allowed route; the forged header never reaches the upstream.
    async with gw.client.get("/api/orders", headers={**bearer(token()), **forged}) as response:
        assert response.status == 200
        names = {name.lower() for name, _ in (await response.json())["headers"]}
    assert XFCC.lower() not in names


async def test_a_bound_token_is_refused_on_a_route_that_does_not_ask_for_binding(
    make_gateway: GatewayFactory, ca: trustme.CA, token: Any
) -> None:
    # No certificate to check it against is not a pass: a thief would send exactly this.
    gw = await make_gateway()
    stolen = bearer(token(cnf={"x5t#S256": x5t(ca.issue_cert("a@example.test"))}))
    assert await reason_of(gw, stolen) == (401, "cert_binding_mismatch")
    assert await reason_of(gw, bearer(token())) == (200, "ok")


async def test_in_forward_auth_mode_the_callers_header_names_the_certificate(
    make_gateway: GatewayFactory, ca: trustme.CA, token: Any
) -> None:
    # nginx asks about the original request; the certificate it terminated comes as its header.
    def forward_auth(doc: dict[str, Any]) -> None:
        doc["mode"] = "forward_auth"
        bound("required")(doc)
        from_header("pem")(doc)

    gw = await make_gateway(forward_auth)
    owner, other = ca.issue_cert("a@example.test"), ca.issue_cert("b@example.test")
    access = bearer(token(cnf={"x5t#S256": x5t(owner)}))
    asked = {"X-Original-Method": "GET", "X-Original-URI": "/api/orders", **access}

    async def status(cert: trustme.LeafCert) -> int:
        shown = {XFCC: quote(cert.cert_chain_pems[0].bytes().decode())}
        async with gw.client.get("/auth/nginx", headers={**asked, **shown}) as response:
            return response.status

    assert await status(owner) == 200
    assert await status(other) == 401


async def test_a_report_only_route_reports_what_the_binding_check_found(
    make_gateway: GatewayFactory, ca: trustme.CA, token: Any
) -> None:
    def report_only(doc: dict[str, Any]) -> None:
        doc["routes"][0]["auth"]["mode"] = "report-only"

    gw = await make_gateway(report_only)
    stolen = bearer(token(cnf={"x5t#S256": x5t(ca.issue_cert("a@example.test"))}))
    async with gw.client.get("/api/orders", headers=stolen) as response:
        assert response.status == 200
        seen = {name.lower(): value for name, value in (await response.json())["headers"]}
    assert seen["x-gateway-auth-outcome"] == "cert_binding_mismatch"
    assert "x-user-sub" not in seen


def test_a_certificate_bound_route_needs_a_certificate_source(
    idp: FakeIdP, upstream: EchoUpstream
) -> None:
    doc = base_config(idp, upstream)
    bound("required")(doc)
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.auth\.certificate_bound: no client"):
        loads_config(json.dumps(doc))
