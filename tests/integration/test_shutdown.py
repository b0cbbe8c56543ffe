"""Graceful shutdown with a real AppRunner on loopback: in-flight requests finish, background
tasks end, client sessions close."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

import gateway as gateway_package
from gateway.app import GATEWAY_KEY
from gateway.documents import HttpDocumentFetcher
from gateway.upstream import UpstreamPools
from tests.conftest import RunningGateway
from tests.integration.authkit import RawConnection, refused
from tests.integration.e2e_helpers import echoed_headers, wait_until
from tests.integration.hardening_kit import (
    CHUNKED_FIRST_PART,
    RawUpstream,
    point_routes_at,
    read_first_part,
    read_request_head,
    set_upstream_defaults,
    sockets_to,
)
from tests.integration.test_listener_tls import NAME, client_context, listen_tls, write_pair

GATEWAY_DIR = str(Path(gateway_package.__file__).parent)


def gateway_tasks(tasks: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """The tasks whose coroutine is defined in the gateway package."""
    return {t for t in tasks if t.get_coro().cr_code.co_filename.startswith(GATEWAY_DIR)}  # type: ignore[union-attr]


class JwksSessions:
    """A document-fetcher factory that records the sessions the gateway gives it."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.sessions: list[aiohttp.ClientSession] = []

    def __call__(self, session: aiohttp.ClientSession) -> HttpDocumentFetcher:
        self.sessions.append(session)
        return HttpDocumentFetcher(session, self.clock)


def upstream_pools(gw: RunningGateway) -> UpstreamPools:
    return gw.app[GATEWAY_KEY].upstream_pools


async def test_inflight_request_completes_during_graceful_shutdown(make_gateway, upstream, clock):
    before = set(asyncio.all_tasks())
    fetcher = JwksSessions(clock)
    gw = await make_gateway(document_fetcher=fetcher, admin=False, served=True)
    refreshers = {
        t
        for t in asyncio.all_tasks() - before
        if t.get_coro().__qualname__ == "JwksCache._refresh_loop"  # type: ignore[union-attr]
    }
    assert len(refreshers) == 1  # one per issuer
    assert not upstream_pools(gw).closed  # open while serving; the shutdown closes them

    # A keep-alive connection with nothing in flight when the shutdown begins.
    idle = await RawConnection.open(gw.port)
    unused = await RawConnection.open(gw.port)  # and one that has sent nothing yet
    await idle.send(b"GET /public/first HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert (await idle.response()).status == 200
    upstream.mode = "stall"
    busy = await RawConnection.open(gw.port)

    async def call() -> tuple[int, dict[str, Any], str | None]:
        await busy.send(
            b"POST /public/slow HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 9\r\n\r\nin flight"
        )
        response = await busy.response(within=10)
        # A client that keeps the connection open anyway: the gateway closes it at once.
        _, after = await busy.closed_by_server(within=2)
        await busy.close()
        assert after == b""
        return response.status, response.json(), response.headers.get("Connection")

    inflight = asyncio.create_task(call())
    await wait_until(lambda: upstream.hits == 2, what="request reached the upstream")

    cleanup = asyncio.create_task(gw.shut_down())
    # Shutdown has begun once the listener stops accepting new connections.
    await wait_until(lambda: refused(gw.port), what="listener closed")
    # The idle connection is closed at once (its client can go elsewhere), not held
    # until the request in flight ends.
    try:
        _, sent = await idle.closed_by_server(within=2)
        _, unused_got = await unused.closed_by_server(within=2)
    finally:
        await idle.close()
        await unused.close()
    assert (sent, unused_got) == (b"", b"")
    assert not inflight.done()
    upstream.release.set()

    status, body, connection = await asyncio.wait_for(inflight, 5)
    assert status == 200
    assert connection == "close"  # the drain serves no more requests on this connection
    assert body["method"] == "POST"
    assert body["body_bytes"] == len(b"in flight")
    assert echoed_headers(body)["X-Forwarded-For"] == "127.0.0.1"
    await asyncio.wait_for(cleanup, 10)

    assert all(t.done() and t.cancelled() for t in refreshers)
    assert len(fetcher.sessions) == 1
    assert all(s.closed for s in fetcher.sessions)
    assert upstream_pools(gw).closed
    assert gateway_tasks(asyncio.all_tasks()) == set()
    current = asyncio.current_task()
    await wait_until(
        lambda: asyncio.all_tasks() - before - {current} == set(), what="no leaked tasks"
    )


async def test_shutdown_cancels_a_hanging_jwks_fetch(make_gateway, idp, clock):
    idp.mode = "hang"

    def slow_fetch(doc: dict[str, Any]) -> None:
        # Would outlive the test if not cancelled.
        doc["issuers"]["test"]["jwks_fetch_timeout_s"] = 30

    before = set(asyncio.all_tasks())
    fetcher = JwksSessions(clock)
    gw = await make_gateway(
        slow_fetch, document_fetcher=fetcher, settle=False, admin=False, served=True
    )
    await wait_until(lambda: idp.hits == 1, what="the first fetch reached the IdP")
    assert len(gateway_tasks(asyncio.all_tasks() - before)) == 2  # refresher + fetch in flight

    await asyncio.wait_for(gw.shut_down(), 5)
    assert gateway_tasks(asyncio.all_tasks()) == set()
    assert all(s.closed for s in fetcher.sessions)
    assert upstream_pools(gw).closed


async def test_a_request_still_in_flight_when_the_drain_ends_is_cut_off(make_gateway, upstream):
    def patient(doc: dict[str, Any]) -> None:
        doc["upstream_defaults"]["timeout_s"] = 30  # the upstream outlasts the drain

    gw = await make_gateway(patient, admin=False, served=True)  # shutdown_timeout 5 s, as served
    upstream.mode = "stall"  # never answers within the drain
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as client:

            async def call() -> int:
                async with client.get(f"http://127.0.0.1:{gw.port}/public/stuck") as response:
                    return response.status

            inflight = asyncio.create_task(call())
            await wait_until(lambda: upstream.hits == 1, what="request reached the upstream")
            started = loop.time()
            await asyncio.wait_for(gw.shut_down(), 15)
            drained = loop.time() - started
            outcome = await asyncio.gather(inflight, return_exceptions=True)
    finally:
        upstream.release.set()
    # The drain waited its 5 s for the request, then cut it off: not for ever.
    assert 4.5 <= drained < 10
    assert isinstance(outcome[0], aiohttp.ClientError)
    cut = gw.metric("gateway_requests_total", route="public", reason="client_disconnected")
    cut += gw.metric("gateway_requests_total", route="public", reason="request_cancelled")
    assert cut == 1


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_a_response_cut_off_by_the_drain_ends_in_a_reset(make_gateway, version):
    """When the drain's end cuts a response off, the connection is reset, so the client's read
    fails after the bytes that came. For an HTTP/1.0 client, whose body ends with its
    connection, an orderly close would read as if the body were whole; an HTTP/1.1 client's
    chunked body is cut the same way."""
    release = asyncio.Event()

    async def first_chunk_then_wait(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request_head(reader)
        writer.write(CHUNKED_FIRST_PART)
        await writer.drain()
        await release.wait()  # the rest never comes within the drain
        writer.close()

    upstream = RawUpstream(first_chunk_then_wait)
    url = await upstream.start()
    try:
        gw = await make_gateway(
            point_routes_at(url), set_upstream_defaults(timeout_s=30), admin=False, served=True
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(f"GET /public/long HTTP/{version}\r\nHost: gw.test\r\n\r\n".encode())
            await read_first_part(reader, version, 5)
            await asyncio.wait_for(gw.shut_down(), 15)  # the drain's 5 s, then the cut
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    finally:
        release.set()
        await upstream.close()
    cut = gw.metric("gateway_requests_total", route="public", reason="client_disconnected")
    cut += gw.metric("gateway_requests_total", route="public", reason="request_cancelled")
    assert cut == 1


async def test_a_tls_handshake_finished_after_the_shutdown_began_is_closed_not_served(
    make_gateway, tmp_path
):
    """A TLS connection reaches the listener only once its handshake is done, so one the
    gateway accepted before its shutdown can arrive after the listener's socket closed: it
    is closed, not served."""
    ca = trustme.CA()
    write_pair(ca, tmp_path)
    gw = await make_gateway(listen_tls(tmp_path), admin=False, served=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)  # no ClientHello yet
    try:
        client_port = writer.get_extra_info("sockname")[1]
        await wait_until(lambda: sockets_to(client_port) == 1, what="the gateway accepted it")
        await asyncio.wait_for(gw.shut_down(), 10)
        answer = b""
        try:
            await asyncio.wait_for(writer.start_tls(client_context(ca), server_hostname=NAME), 5)
            writer.write(b"GET /api/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
        except (ssl.SSLError, ConnectionError):
            pass  # closed during or right after the handshake: not served either way
        assert answer == b""  # (served, it would have had its 401 at once)
    finally:
        writer.close()
