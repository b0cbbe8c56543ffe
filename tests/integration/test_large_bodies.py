"""100 MB each way through the gateway: byte-exact (sha256 on both sides, computed as the bytes
stream, never holding the body) with the process's resident memory staying flat.

The gateway, the client and the upstream all run in the test process, so the memory bound
covers all three: a buffering hop anywhere would show.
"""

from __future__ import annotations

import functools
import hashlib

import pytest

from tests.conftest import GatewayFactory
from tests.integration.authkit import RawConnection
from tests.integration.e2e_helpers import MIB
from tests.integration.hardening_kit import (
    MemoryWatch,
    SinkUpstream,
    closing_session,
    echo_download_sha256,
    generated_body,
    point_routes_at,
    set_route,
    start_runner,
)

pytestmark = pytest.mark.slow

SIZE = 100 * MIB
MAX_GROWTH = 30 * MIB  # well under the 100 MB that a buffering hop would cost


@pytest.fixture
def serve(make_gateway: GatewayFactory) -> GatewayFactory:
    """Gateways (no admin app) on the base config changed by ``edits``, served as ``gateway run``."""
    return functools.partial(make_gateway, served=True, admin=False)


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


async def test_100_mb_upload_arrives_byte_exact_in_flat_memory(serve):
    sink = SinkUpstream()
    runner, url = await start_runner(sink.app())
    try:
        gw = await serve(point_routes_at(url), set_route("public", max_body_bytes=SIZE + MIB))
        sent = hashlib.sha256()
        async with (
            MemoryWatch() as memory,
            closing_session() as session,
            session.post(
                gw.url("/public/upload"),
                data=generated_body(SIZE, sent),
                headers={"Content-Length": str(SIZE)},
            ) as response,
        ):
            assert response.status == 200
            seen = await response.json()
    finally:
        await runner.cleanup()
    assert seen == {"body_bytes": SIZE, "body_sha256": sent.hexdigest()}
    assert [(o.received, o.error) for o in sink.outcomes] == [(SIZE, None)]
    assert memory.peak_growth < MAX_GROWTH, (mib(memory.peak_growth), memory.hwm_reset)
    assert memory.end_growth < MAX_GROWTH, mib(memory.end_growth)


async def test_100_mb_download_arrives_byte_exact_in_flat_memory(serve, upstream):
    upstream.mode = "download"
    upstream.download_bytes = SIZE
    gw = await serve()
    received = hashlib.sha256()
    size = 0
    async with (
        MemoryWatch() as memory,
        closing_session() as session,
        session.get(gw.url("/public/download")) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Length"] == str(SIZE)
        async for chunk in response.content.iter_chunked(256 * 1024):
            received.update(chunk)
            size += len(chunk)
    assert size == SIZE
    assert received.hexdigest() == echo_download_sha256(SIZE)
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == 1
    assert memory.peak_growth < MAX_GROWTH, (mib(memory.peak_growth), memory.hwm_reset)
    assert memory.end_growth < MAX_GROWTH, mib(memory.end_growth)


async def test_a_download_on_a_connection_that_closes_after_it_arrives_whole(serve, upstream):
    """The connection closes once the answer is written (Connection: close): the whole body
    arrives before the close. (It does not tell an orderly close from an abort: on loopback
    the kernel has taken every byte by then, so an abort drops nothing here.)"""
    size = 8 * MIB
    upstream.mode = "download"
    upstream.download_bytes = size
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(
            b"GET /public/download HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
        )
        reply = await conn.response(within=30)
        await conn.closed_by_server(within=5)
    finally:
        await conn.close()
    assert reply.status == 200
    assert hashlib.sha256(reply.body).hexdigest() == echo_download_sha256(size)
