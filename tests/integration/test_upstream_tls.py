"""Upstream TLS per route: real TLS upstreams on loopback with a throw-away CA (trustme).

The chain and the name are verified by default (against the route's ``ca_file``, else the
system store), ``server_name`` names the certificate to expect, ``cert_file``/``key_file`` make
the hop mutual TLS, and ``verify: false`` is the explicit opt-out.  A failed handshake is a
502 ``upstream_unavailable``, never a request sent in clear or to the wrong server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.logs import REQUEST_LOGGER
from tests.conftest import GatewayFactory
from tests.integration.authkit import logged
from tests.integration.e2e_helpers import reason_of
from tests.integration.hardening_kit import set_upstream_defaults

UPSTREAM_NAME = "orders.internal"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """The CA bundle and a client certificate (issued by the same CA) as files."""
    client = ca.issue_cert("gateway@example.test")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "client.pem", "key": tmp_path / "k.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    return files


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[Callable[..., Any]]:
    """Start an https echo upstream on 127.0.0.1 whose certificate names ``names`` (issued by
    ``issuer``, default ``ca``); ``client_ca`` makes it require a client certificate."""
    runners: list[web.AppRunner] = []

    async def start(
        *names: str, issuer: trustme.CA | None = None, client_ca: trustme.CA | None = None
    ) -> int:
        server_cert = (issuer or ca).issue_cert(*(names or (UPSTREAM_NAME,)))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(context)
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED

        async def echo(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            subject = dict(x[0] for x in peer["subject"]) if peer and peer.get("subject") else {}
            alt = [v for _, v in peer.get("subjectAltName", ())] if peer else []
            return web.json_response(
                {"path": request.path_qs, "client": alt or list(subject.values())}
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server = site._server
        assert server is not None
        port: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def tls_route(port: int, host: str = "127.0.0.1", **tls: Any) -> Callable[[dict[str, Any]], None]:
    """Point the public route at ``https://host:port`` with these ``tls`` settings."""

    def edit(doc: dict[str, Any]) -> None:
        url = f"https://{host}:{port}"
        doc["routes"][2]["upstream"] = {"url": url, "tls": tls} if tls else url

    return edit


async def get_public(gw: Any) -> tuple[int, Any]:
    response = await gw.client.get("/public/orders?id=7")
    body = await response.json()
    return response.status, body


async def test_a_verified_tls_upstream_gets_the_request(
    make_gateway: GatewayFactory, tls_upstream: Any, pem_files: dict[str, Path]
) -> None:
    port = await tls_upstream("127.0.0.1")
    gw = await make_gateway(tls_route(port, ca_file=str(pem_files["ca"])))
    status, body = await get_public(gw)
    assert status == 200
    assert body["path"] == "/public/orders?id=7"


async def test_an_upstream_certificate_the_system_store_does_not_trust_is_refused(
    make_gateway: GatewayFactory, tls_upstream: Any
) -> None:
    port = await tls_upstream("127.0.0.1")
    gw = await make_gateway(tls_route(port))  # no ca_file: the system store knows no test CA
    response = await gw.client.get("/public/orders")
    assert response.status == 502
    assert await reason_of(response) == "upstream_unavailable"


async def test_a_certificate_from_another_ca_is_refused(
    make_gateway: GatewayFactory,
    tls_upstream: Any,
    pem_files: dict[str, Path],
    other_ca: trustme.CA,
) -> None:
    port = await tls_upstream("127.0.0.1", issuer=other_ca)
    gw = await make_gateway(tls_route(port, ca_file=str(pem_files["ca"])))
    response = await gw.client.get("/public/orders")
    assert response.status == 502
    assert await reason_of(response) == "upstream_unavailable"


async def test_server_name_names_the_certificate_to_expect(
    make_gateway: GatewayFactory, tls_upstream: Any, pem_files: dict[str, Path]
) -> None:
    port = await tls_upstream(UPSTREAM_NAME)  # the certificate does not name 127.0.0.1
    wrong = await make_gateway(tls_route(port, ca_file=str(pem_files["ca"])))
    response = await wrong.client.get("/public/orders")
    assert response.status == 502
    assert await reason_of(response) == "upstream_unavailable"
    right = await make_gateway(
        tls_route(port, ca_file=str(pem_files["ca"]), server_name=UPSTREAM_NAME)
    )
    status, _ = await get_public(right)
    assert status == 200


async def test_mutual_tls_presents_the_configured_client_certificate(
    make_gateway: GatewayFactory, tls_upstream: Any, pem_files: dict[str, Path], ca: trustme.CA
) -> None:
    port = await tls_upstream("127.0.0.1", client_ca=ca)
    without = await make_gateway(tls_route(port, ca_file=str(pem_files["ca"])))
    response = await without.client.get("/public/orders")
    assert response.status == 502  # the upstream demands a certificate the gateway lacks
    gw = await make_gateway(
        tls_route(
            port,
            ca_file=str(pem_files["ca"]),
            cert_file=str(pem_files["cert"]),
            key_file=str(pem_files["key"]),
        )
    )
    status, body = await get_public(gw)
    assert status == 200
    assert "gateway@example.test" in body["client"]


async def test_verify_false_is_the_explicit_opt_out(
    make_gateway: GatewayFactory, tls_upstream: Any, other_ca: trustme.CA
) -> None:
    port = await tls_upstream("somewhere.else", issuer=other_ca)
    gw = await make_gateway(tls_route(port, verify=False))
    status, _ = await get_public(gw)
    assert status == 200


async def test_a_tls_handshake_not_finished_in_connect_timeout_s_is_504(
    make_gateway: GatewayFactory, pem_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake is part of the connect: an upstream that accepts the TCP connection and
    never answers the ClientHello is given up after ``connect_timeout_s``, not held for
    asyncio's 60-second handshake timeout."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    try:
        gw = await make_gateway(
            tls_route(port, ca_file=str(pem_files["ca"])),
            set_upstream_defaults(connect_timeout_s=0.2),
        )
        async with asyncio.timeout(5):
            response = await gw.client.get("/public/orders")
        assert response.status == 504
        assert await reason_of(response) == "upstream_timeout"
        assert logged(caplog)["detail"] == "connect_timeout"
        assert held  # the TCP connection was made: it is the handshake that timed out
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("upstream", "where", "expected"),
    [
        ({"url": "http://127.0.0.1:1", "tls": {"verify": True}}, "upstream.tls", "https"),
        ({"url": "https://a.test", "tls": {"cert_file": "CERT"}}, "tls.key_file", "together"),
        ({"url": "https://a.test", "tls": {"ca_file": "missing.pem"}}, "tls.ca_file", "readable"),
        ({"url": "https://a.test", "tls": {"verify": False, "ca_file": "CA"}}, "verify", "true"),
        ({"url": "https://a.test", "tls": {"sni": "x"}}, "tls.sni", "server_name"),
        ({"tls": {}}, "upstream.url", "missing"),
    ],
)
def test_bad_upstream_tls_settings_fail_at_load(
    pem_files: dict[str, Path], upstream: dict[str, Any], where: str, expected: str
) -> None:
    tls = upstream.get("tls", {})
    for key, value in list(tls.items()):
        if value == "CERT":
            tls[key] = str(pem_files["cert"])
        elif value == "CA":
            tls[key] = str(pem_files["ca"])
    document = {
        "routes": [{"id": "r", "match": {"path_prefix": "/"}, "upstream": upstream, "auth": "none"}]
    }
    with pytest.raises(ConfigError) as error:
        parse_config(document, base_dir=pem_files["ca"].parent)
    assert where in str(error.value)
    assert expected in str(error.value)
