"""The TLS listener, as ``gateway run`` serves it: real handshakes from real TLS clients.

TLS 1.2 or newer only; the certificate is re-read on SIGHUP and when its file changes, without
a restart (new handshakes get the new one); client certificates are verified against
``client_ca_file`` (``required``: no certificate, no handshake); a pair that does not load is
a config error at load, and on a reload the running certificate is kept.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import bearer
from tests.integration.e2e_helpers import wait_until
from tests.integration.test_operations import GatewayRunner

NAME = "gateway.test"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, *names: str) -> trustme.LeafCert:
    """Issue a server certificate for ``names`` and (over)write server.pem / server-key.pem."""
    cert = ca.issue_cert(*(names or (NAME, "127.0.0.1")))
    cert.private_key_pem.write_to_path(str(directory / "server-key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    return cert


def listen_tls(directory: Path, **extra: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        doc.setdefault("listen", {})["tls"] = {
            "cert_file": str(directory / "server.pem"),
            "key_file": str(directory / "server-key.pem"),
            **extra,
        }

    return edit


def client_context(ca: trustme.CA, **options: Any) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if "maximum_version" in options:
        with warnings.catch_warnings():  # an old client on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = options["maximum_version"]
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if "client" in options:
        options["client"].configure_cert(context)
    return context


async def https_get(
    port: int, context: ssl.SSLContext, path: str = "/public/x", headers: Any = None
) -> tuple[int, bytes, bytes]:
    """One request over TLS: status, body and the DER of the server's certificate."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=NAME), 5
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        lines = [f"GET {path} HTTP/1.1", f"Host: {NAME}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    if not data:
        raise ConnectionResetError("closed without an answer")
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, der


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def test_requests_over_tls_are_verified_and_forwarded(
    run_gateway: GatewayRunner, ca: trustme.CA, tmp_path: Path, token: Any
) -> None:
    cert = write_pair(ca, tmp_path)
    gw = await run_gateway(listen_tls(tmp_path))
    status, body, der = await https_get(gw.port, client_context(ca), "/api/x", bearer(token()))
    assert status == 200
    assert der == der_of(cert)
    assert b'["X-Forwarded-Proto", "https"]' in body  # the upstream learns the client used TLS
    status, _, _ = await https_get(gw.port, client_context(ca), "/api/x")
    assert status == 401


async def test_tls_older_than_1_2_is_refused(
    run_gateway: GatewayRunner, ca: trustme.CA, tmp_path: Path
) -> None:
    write_pair(ca, tmp_path)
    gw = await run_gateway(listen_tls(tmp_path))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await https_get(gw.port, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_1))
    status, _, _ = await https_get(
        gw.port, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    )
    assert status == 200


async def test_sighup_and_a_changed_file_load_a_new_certificate_without_a_restart(
    run_gateway: GatewayRunner, ca: trustme.CA, tmp_path: Path
) -> None:
    first = write_pair(ca, tmp_path)
    gw = await run_gateway(listen_tls(tmp_path))
    assert (await https_get(gw.port, client_context(ca)))[2] == der_of(first)

    second = write_pair(ca, tmp_path)
    os.kill(gw.pid, signal.SIGHUP)

    async def serves(cert: trustme.LeafCert) -> bool:
        return (await https_get(gw.port, client_context(ca)))[2] == der_of(cert)

    await wait_until(lambda: serves(second), within=5, what="the certificate after SIGHUP")

    third = write_pair(ca, tmp_path)  # no signal: the file watch notices
    await wait_until(lambda: serves(third), within=8, what="the certificate after a file change")
    assert gw.process.returncode is None


async def test_a_broken_pair_on_reload_keeps_the_running_certificate(
    run_gateway: GatewayRunner, ca: trustme.CA, tmp_path: Path
) -> None:
    first = write_pair(ca, tmp_path)
    gw = await run_gateway(listen_tls(tmp_path))
    (tmp_path / "server.pem").write_text("not a certificate\n")
    os.kill(gw.pid, signal.SIGHUP)
    await wait_until(lambda: "event=tls_reload result=failure" in gw.log(), within=5)
    assert (await https_get(gw.port, client_context(ca)))[2] == der_of(first)


async def test_required_client_certificates_are_verified(
    run_gateway: GatewayRunner, ca: trustme.CA, tmp_path: Path
) -> None:
    write_pair(ca, tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    gw = await run_gateway(
        listen_tls(tmp_path, client_ca_file=str(tmp_path / "clients.pem"), client_cert="required")
    )
    client = ca.issue_cert("service-a@example.test")
    status, _, _ = await https_get(gw.port, client_context(ca, client=client))
    assert status == 200
    stranger = trustme.CA().issue_cert("mallory@example.test")
    for context in (client_context(ca), client_context(ca, client=stranger)):
        # TLS 1.3 reports the refusal on the first read, TLS 1.2 in the handshake.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await https_get(gw.port, context)


@pytest.mark.parametrize(
    ("tls", "where", "expected"),
    [
        ({"cert_file": "server.pem"}, "listen.tls.key_file", "missing required key"),
        ({"cert_file": "nope.pem", "key_file": "server-key.pem"}, "cert_file", "readable"),
        ({"cert_file": "server-key.pem", "key_file": "server-key.pem"}, "cert_file", "pair"),
        ({"cert_file": "server.pem", "key_file": "server-key.pem", "min_version": "1.1"},
         "min_version", "1.2"),
        ({"cert_file": "server.pem", "key_file": "server-key.pem", "client_cert": "required"},
         "client_ca_file", "CA bundle"),
    ],
)  # fmt: skip
def test_bad_listener_tls_settings_fail_at_load(
    ca: trustme.CA, tmp_path: Path, tls: dict[str, Any], where: str, expected: str
) -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    write_pair(ca, tmp_path)
    document = {
        "listen": {"tls": tls},
        "routes": [{"id": "r", "match": {"path_prefix": "/"}, "upstream": "http://a.test",
                    "auth": "none"}],
    }  # fmt: skip
    with pytest.raises(ConfigError) as error:
        parse_config(document, base_dir=tmp_path)
    assert where in str(error.value)
    assert expected in str(error.value)
