"""Neighbours that fail: upstreams that refuse, reset, hang, drip, talk garbage or break off;
clients that leave mid-request; an identity provider that goes bad.  After each, nothing leaks.

The gateway is served as ``gateway run`` serves it (``handler_cancellation`` off).  What the
existing flow tests already check (502/504 statuses, a FIN mid-body, FakeIdP outage modes) is
not repeated; these add resets, garbage, leak checks and the cases those tests do not reach.

Leak checks (``LeakProbe``): every asyncio task started during the scenario has ended, and the
gateway's upstream client holds no connection to the upstream any more.  The second is read
from the kernel (the process's sockets whose remote port is the upstream's, /proc/net/tcp +
/proc/self/fd): public and independent of the pool's bookkeeping, which is checked as well
(no connection still counted as in use), to name the culprit if that count ever goes wrong.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ISSUER
from gateway.logs import REQUEST_LOGGER
from tests import conftest
from tests.conftest import Edit, GatewayFactory, RunningGateway
from tests.fakes import SigningKey
from tests.integration.authkit import RawConnection, decision_lines
from tests.integration.e2e_helpers import MIB, free_port, wait_until
from tests.integration.hardening_kit import (
    DECLARED_BODY,
    PARTIAL_BODY,
    LeakProbe,
    RawUpstream,
    SinkUpstream,
    answer_garbage,
    closing_session,
    point_routes_at,
    reset,
    reset_before_answering,
    reset_mid_response,
    reset_transport,
    set_limits,
    set_upstream_defaults,
    slow_body,
    sockets_to,
    start_runner,
)

ISSUER_ID = "test"
TTL = 300.0  # base config jwks_cache_ttl_s
FETCH_TIMEOUT = 0.3


@pytest.fixture
def serve(make_gateway: GatewayFactory) -> GatewayFactory:
    """Gateways (no admin app) on the base config changed by ``edits``, served as ``gateway run``."""
    return functools.partial(make_gateway, served=True, admin=False)


@pytest.fixture
async def sink() -> AsyncIterator[tuple[SinkUpstream, str]]:
    fake = SinkUpstream()
    runner, url = await start_runner(fake.app())
    yield fake, url
    for gate in fake.gates.values():
        gate.set()
    await runner.cleanup()


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[list[RawUpstream]]:
    started: list[RawUpstream] = []
    yield started
    for raw in started:
        await raw.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def get(gw: RunningGateway, path: str, **kwargs: Any) -> tuple[int, bytes]:
    async with closing_session() as session, session.get(gw.url(path), **kwargs) as response:
        return response.status, await response.read()


def reason(body: bytes) -> str:
    value = json.loads(body)["error"]["reason"]
    assert isinstance(value, str)
    return value


# --- upstreams that fail ------------------------------------------------------------------------
async def test_refusing_upstream_is_502_and_leaks_nothing(serve):
    port = free_port()
    gw = await serve(point_routes_at(f"http://127.0.0.1:{port}"))
    probe = LeakProbe.start()
    for _ in range(3):
        status, body = await get(gw, "/public/x")
        assert (status, reason(body)) == (502, "upstream_unavailable")
    await probe.assert_clean(gw.upstream_pools, port)


async def test_upstream_reset_before_answering_is_502_and_leaks_nothing(serve, raw_upstreams):
    raw = RawUpstream(reset_before_answering)
    raw_upstreams.append(raw)
    url = await raw.start()
    gw = await serve(point_routes_at(url))
    probe = LeakProbe.start()
    status, body = await get(gw, "/public/x")
    assert (status, reason(body)) == (502, "upstream_unavailable")
    async with (
        closing_session() as session,
        session.post(gw.url("/public/x"), data=b"payload" * 1000) as response,
    ):
        assert response.status == 502
    assert raw.connections >= 2
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_unavailable") == 2
    await probe.assert_clean(gw.upstream_pools, raw.port)


async def test_hanging_upstream_is_504_and_leaks_nothing(serve, sink):
    fake, url = sink
    gw = await serve(point_routes_at(url), set_upstream_defaults(timeout_s=0.3))
    probe = LeakProbe.start()
    status, body = await get(gw, "/public/hold/h")
    assert (status, reason(body)) == (504, "upstream_timeout")
    # The gateway has given up on its side already ...
    await wait_until(lambda: sockets_to(port_of(url)) == 0, what="upstream socket closed")
    fake.gate("h").set()  # ... the upstream's handler, not ours, was still waiting
    await probe.assert_clean(gw.upstream_pools, port_of(url))


async def test_slow_upstream_within_the_timeout_streams_the_whole_body(serve, sink):
    _, url = sink
    # timeout_s bounds each read, not the response: 8 gaps of 0.15 s take longer than 0.5 s.
    gw = await serve(point_routes_at(url), set_upstream_defaults(timeout_s=0.5))
    probe = LeakProbe.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await get(gw, "/public/slow/8/150")
    assert status == 200
    assert body == slow_body(8)
    assert loop.time() - started > 0.5
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == 1
    await probe.assert_clean(gw.upstream_pools, port_of(url))


async def test_invalid_http_from_upstream_is_502_and_leaks_nothing(serve, raw_upstreams):
    raw = RawUpstream(answer_garbage)
    raw_upstreams.append(raw)
    url = await raw.start()
    gw = await serve(point_routes_at(url))
    probe = LeakProbe.start()
    status, body = await get(gw, "/public/x")
    assert (status, reason(body)) == (502, "upstream_unavailable")
    assert gw.metric("gateway_requests_total", route="public", reason="internal_error") == 0
    await probe.assert_clean(gw.upstream_pools, raw.port)


async def test_upstream_reset_mid_response_cuts_the_client_stream(serve, raw_upstreams):
    raw = RawUpstream(reset_mid_response)
    raw_upstreams.append(raw)
    url = await raw.start()
    gw = await serve(point_routes_at(url))
    probe = LeakProbe.start()
    received = bytearray()

    async def read_all(response: aiohttp.ClientResponse) -> None:
        async for chunk in response.content.iter_any():
            received.extend(chunk)

    async with closing_session() as session, session.get(gw.url("/public/big")) as response:
        assert response.status == 200  # the status line was already relayed
        assert response.headers["Content-Length"] == str(DECLARED_BODY)
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(response)
    assert 0 < len(received) <= PARTIAL_BODY < DECLARED_BODY
    assert bytes(received) == b"p" * len(received)
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == 0
    await probe.assert_clean(gw.upstream_pools, raw.port)


# --- clients that leave -------------------------------------------------------------------------
UPLOAD_HEADS = {
    "content-length": b"POST /public/up HTTP/1.1\r\nHost: gateway.test\r\n"
    + f"Content-Length: {MIB}\r\n\r\n".encode(),
    "chunked": b"POST /public/up HTTP/1.1\r\nHost: gateway.test\r\n"
    + b"Transfer-Encoding: chunked\r\n\r\n",
}


def first_part(framing: str, size: int) -> bytes:
    data = b"u" * size
    return data if framing == "content-length" else f"{size:x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_leaving_mid_upload_aborts_the_upstream_request(serve, sink, framing, how):
    fake, url = sink
    # At once: not when the upstream's response deadline would end the exchange anyway.
    gw = await serve(point_routes_at(url), set_upstream_defaults(timeout_s=30))
    probe = LeakProbe.start()
    conn = await RawConnection.open(gw.port)
    await conn.send(UPLOAD_HEADS[framing] + first_part(framing, 100_000))
    await wait_until(lambda: bool(fake.arrived), what="the upload reached the upstream")
    if how == "reset":
        reset(conn.writer)
    await conn.close()

    # Seen from the upstream: its request body broke off and its handler ended.
    await asyncio.wait_for(fake.ended.wait(), 5)
    [outcome] = fake.outcomes
    assert outcome.error is not None, outcome
    assert outcome.received < MIB
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == 0
    await probe.assert_clean(gw.upstream_pools, port_of(url))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_leaving_mid_upload_is_counted_as_client_disconnected(serve, sink, framing):
    fake, url = sink
    gw = await serve(point_routes_at(url))
    conn = await RawConnection.open(gw.port)
    await conn.send(UPLOAD_HEADS[framing] + first_part(framing, 100_000))
    await wait_until(lambda: bool(fake.arrived), what="the upload reached the upstream")
    await conn.close()
    await asyncio.wait_for(fake.ended.wait(), 5)

    def counted(reason_: str) -> float:
        return float(gw.metric("gateway_requests_total", route="public", reason=reason_))

    await wait_until(
        lambda: counted("client_disconnected") + counted("upstream_unavailable") == 1,
        what="the request counted",
    )
    assert counted("upstream_unavailable") == 0
    assert counted("client_disconnected") == 1


async def test_client_leaving_while_waiting_frees_its_slot_and_upstream_connection(serve, sink):
    fake, url = sink
    gw = await serve(
        point_routes_at(url),
        set_limits(max_concurrent_requests=1, max_queued_requests=0),
        set_upstream_defaults(timeout_s=10),
    )
    conn = await RawConnection.open(gw.port)
    await conn.send(b"GET /public/hold/gone HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
    await wait_until(lambda: bool(fake.arrived), what="the request reached the upstream")
    await conn.close()

    # Well inside timeout_s, the route must take requests again ...
    async def admitted() -> bool:
        status, _ = await get(gw, "/public/next")
        return status == 200

    try:
        await wait_until(admitted, within=3, what="the slot of the departed client freed")
        # ... and the connection the departed request held to the upstream is closed.
        await wait_until(lambda: fake.hung_up("gone"), within=3, what="upstream request ended")
    finally:
        fake.gate("gone").set()


async def test_slow_upload_longer_than_the_upstream_timeout_completes(serve, sink):
    """timeout_s bounds waiting for the upstream, not the client's upload: 1.2 s of a slow body
    under a 0.5 s timeout_s still arrives whole."""
    fake, url = sink
    gw = await serve(point_routes_at(url), set_upstream_defaults(timeout_s=0.5))

    async def body() -> AsyncIterator[bytes]:
        for index in range(8):
            yield bytes([index]) * 1000
            await asyncio.sleep(0.15)

    async with (
        closing_session() as session,
        session.post(gw.url("/public/up"), data=body()) as response,
    ):
        assert response.status == 200
        seen = await response.json()
    assert seen["body_bytes"] == 8000
    assert [o.error for o in fake.outcomes] == [None]


async def test_client_stalling_mid_body_does_not_hold_its_slot_forever(serve, sink):
    fake, url = sink
    gw = await serve(
        point_routes_at(url),
        set_limits(
            max_concurrent_requests=1,
            max_queued_requests=0,
            client_idle_timeout_s=0.5,
            client_body_timeout_s=0.5,
        ),
        set_upstream_defaults(timeout_s=0.5),
    )
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(UPLOAD_HEADS["content-length"] + b"s" * 1000)  # 1 KB of 1 MiB, then nothing
        await wait_until(lambda: bool(fake.arrived), what="the upload reached the upstream")

        async def admitted() -> bool:
            status, _ = await get(gw, "/public/next")
            return status == 200

        # The body timer, with slack, is long past: the stalled upload must have been cut off,
        # answered 408 and counted, and its slot handed on.
        await wait_until(admitted, within=3, what="the stalled upload's slot freed")
        reply = await conn.response(within=3)
        assert reply.status == 408
        assert json.loads(reply.body)["error"]["reason"] == "client_timeout"
    finally:
        await conn.close()


async def test_client_dripping_a_body_is_cut_at_the_body_deadline(serve, sink):
    _, url = sink
    # A byte every 0.1 s never trips the 0.5 s gap timer; only the deadline on the whole body
    # stops it.
    gw = await serve(
        point_routes_at(url),
        set_limits(client_body_timeout_s=0.5, client_body_deadline_s=0.6),
        set_upstream_defaults(timeout_s=5),
    )
    conn = await RawConnection.open(gw.port)

    async def drip() -> None:
        for _ in range(100):  # 10 s at most: far past the deadline
            await conn.send(b"d")
            await asyncio.sleep(0.1)

    dripping = asyncio.ensure_future(drip())
    try:
        await conn.send(UPLOAD_HEADS["content-length"])
        reply = await conn.response(within=4)
        assert reply.status == 408
        assert json.loads(reply.body)["error"]["reason"] == "client_timeout"
        assert not dripping.done()  # answered while the client was still dripping
    finally:
        dripping.cancel()
        await conn.close()
    assert gw.metric("gateway_requests_total", route="public", reason="client_timeout") == 1


async def test_client_that_leaves_while_the_gateway_waits_for_it_to_read_is_let_go_at_once(
    serve, upstream, caplog
):
    """The gateway is waiting for a client's socket to drain when the client resets: that is
    client_disconnected at once, and its connection and slot are free, long before the write
    timeout would have cut it."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    upstream.mode = "download"
    upstream.download_bytes = 256 * MIB
    gw = await serve(
        set_limits(
            max_concurrent_requests=1,
            max_queued_requests=0,
            client_write_timeout_s=60,
            max_connections=1,
        )
    )
    server = gw.runner.server
    assert server is not None
    conn = await RawConnection.open(gw.port)
    await conn.send(b"GET /public/file HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
    await conn.reader.readuntil(b"\r\n\r\n")  # the head arrived; the body is never read
    await wait_until(
        lambda: any(c.writing_paused for c in server.connections), what="the gateway waits"
    )
    reset(conn.writer)

    async def admitted() -> bool:
        upstream.download_bytes = 10
        status, _ = await get(gw, "/public/next")
        return status == 200

    await wait_until(admitted, within=5, what="the leaving client's slot freed")
    assert gw.metric("gateway_requests_total", route="public", reason="client_disconnected") == 1


async def test_client_that_stops_reading_frees_its_slot_and_upstream_connection(
    serve, upstream, caplog
):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    upstream.mode = "download"
    upstream.download_bytes = 256 * MIB  # far more than the kernel buffers on the way hold
    # One client connection at most: the next request is let in only once the stalled
    # connection is gone, not merely closing with its unsent bytes still queued for a
    # client that will never read them.
    gw = await serve(
        set_limits(
            max_concurrent_requests=1,
            max_queued_requests=0,
            client_write_timeout_s=0.3,
            max_connections=1,
        )
    )
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(b"GET /public/file HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        await conn.reader.readuntil(b"\r\n\r\n")  # the head arrived; the body is never read

        async def admitted() -> bool:
            upstream.download_bytes = 10
            status, _ = await get(gw, "/public/next")
            return status == 200

        await wait_until(admitted, within=5, what="the non-reading client's slot freed")
        _, _ = await conn.closed_by_server(within=5)  # the gateway cut the stalled response
    finally:
        await conn.close()
    assert gw.metric("gateway_requests_total", route="public", reason="client_timeout") == 1
    [cut] = [line for line in decision_lines(caplog) if "reason=client_timeout" in line]
    assert "detail=client_stopped_reading" in cut.split()  # not reading, as against a slow upload
    # The cut response's upstream connection was closed, not pooled (its body was unfinished);
    # only the follow-up request's connection stays pooled (the echo upstream, in this process,
    # keeps a task for it, so tasks are not counted here).
    await wait_until(lambda: gw.upstream_pools.in_use == 0, what="no connection left in use")
    await wait_until(lambda: sockets_to(port_of(upstream.url)) <= 1, what="one pooled socket")


# --- an identity provider that goes bad ---------------------------------------------------------
HUGE = 10 * MIB


@dataclass
class FlakyIdP:
    """Serves a good key set until ``mode`` says otherwise.

    ``huge``: 10 MiB of JSON-ish bytes streamed without Content-Length (so only the running
    count can stop it); ``drip``: a valid start, then a byte every 50 ms; ``reset``: a partial
    body, then a TCP reset.  ``sent`` counts the bytes the last bad answer got out.
    """

    keys: list[dict[str, Any]]
    mode: str = "ok"
    hits: int = 0
    sent: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        return app

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "ok":
            return web.json_response({"keys": self.keys})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self.sent = 0
        self.finished.clear()
        try:
            if self.mode == "huge":
                await self._write(response, b'{"keys": [], "pad": "')
                piece = b"x" * (64 * 1024)
                while self.sent < HUGE:
                    await self._write(response, piece)
                await self._write(response, b'"}')
            elif self.mode == "drip":
                await self._write(response, b'{"keys": [')
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    await self._write(response, b" ")
            elif self.mode == "reset":
                await self._write(response, b'{"keys": [' + b" " * 1000)
                assert request.transport is not None
                reset_transport(request.transport)
                return response
            await response.write_eof()
        finally:
            self.finished.set()
        return response

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        await response.write(data)
        self.sent += len(data)


@pytest.fixture
async def flaky_idp(rsa_key: SigningKey) -> AsyncIterator[tuple[FlakyIdP, web.AppRunner, str]]:
    fake = FlakyIdP([rsa_key.public_jwk()])
    runner, url = await start_runner(fake.app())
    yield fake, runner, url
    await runner.cleanup()


def trust(jwks_uri: str) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        document["issuers"]["test"].update(
            jwks_uri=jwks_uri, algorithms=["RS256"], jwks_fetch_timeout_s=FETCH_TIMEOUT
        )

    return edit


async def api(gw: RunningGateway, tok: str) -> int:
    status, _ = await get(gw, "/api/orders", headers=conftest.bearer(tok))
    return status


@pytest.mark.parametrize(
    ("mode", "result"),
    [("huge", "invalid"), ("drip", "timeout"), ("reset", "unreachable"), ("down", "unreachable")],
)
async def test_identity_provider_going_bad_leaves_the_last_good_keys_working(
    serve, flaky_idp, clock, token, mode, result
):
    fake, runner, url = flaky_idp
    gw = await serve(trust(url + "/jwks.json"))
    default = ISSUER.keys["jwks_max_bytes"].default
    assert isinstance(default, int)
    assert gw.config.issuers[ISSUER_ID].jwks_max_bytes == default < HUGE
    assert await api(gw, token()) == 200
    hits = fake.hits
    probe = LeakProbe.start()

    if mode == "down":
        await runner.cleanup()  # the listener is gone: connections are refused
    else:
        fake.mode = mode
    clock.advance(TTL + 1)  # the cached set has expired: the next use refetches

    loop = asyncio.get_running_loop()
    started = loop.time()
    statuses = [await api(gw, token()) for _ in range(10)]
    assert statuses == [200] * 10  # stale-on-error: the last good keys verify
    assert loop.time() - started < FETCH_TIMEOUT * 10  # a bad fetch is waited on once at most
    await wait_until(
        lambda: gw.metric("gateway_jwks_fetches_total", issuer=ISSUER_ID, result=result) == 1,
        what=f"one failed fetch counted as {result}",
    )
    assert gw.metric("gateway_jwks_keys", issuer=ISSUER_ID) == 1
    if mode != "down":
        assert fake.hits == hits + 1  # backoff: not one fetch per request
    if mode == "huge":
        # The gateway hung up instead of reading 10 MiB: the IdP could not send it all.
        await asyncio.wait_for(fake.finished.wait(), 5)
        assert fake.sent < HUGE
    if mode in ("huge", "drip"):
        await asyncio.wait_for(fake.finished.wait(), 15)  # the IdP's handler ends too
    # No fetch task is left behind, and the key-fetching client keeps at most one idle
    # keep-alive connection to the IdP.
    await probe.assert_clean(None, port_of(url), pooled=1)
