"""Every client limit through HTTP: a small configured value is enforced, the default comes from
gateway.config, and nothing ends in a 5xx.  The gateway is served as ``gateway run`` serves it.

client_idle_timeout_s is aiohttp's own timer on the event loop's real clock, so those tests wait
real (short, bounded) time; nothing else does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import Limits
from gateway.logs import REQUEST_LOGGER
from tests import conftest
from tests.conftest import GatewayFactory, RunningGateway
from tests.integration.authkit import RawConnection, logged
from tests.integration.e2e_helpers import wait_until
from tests.integration.hardening_kit import (
    SinkUpstream,
    closing_session,
    point_routes_at,
    set_limits,
    set_route,
    start_runner,
)

DEFAULTS = Limits()
DEFAULT_CLIENT_IDLE_TIMEOUT_S = DEFAULTS.client_idle_timeout_s
DEFAULT_MAX_BODY_BYTES = DEFAULTS.max_body_bytes
DEFAULT_MAX_CONCURRENT = DEFAULTS.max_concurrent_requests
DEFAULT_MAX_HEADER_BYTES = DEFAULTS.max_header_bytes
DEFAULT_MAX_HEADERS = DEFAULTS.max_headers
DEFAULT_MAX_QUEUED = DEFAULTS.max_queued_requests

IDLE_S = 0.5  # client_idle_timeout_s where the idle timer is under test
SLACK_S = 1.5  # loopback and scheduling slack on top of it


@pytest.fixture
def serve(make_gateway: GatewayFactory) -> GatewayFactory:
    """Gateways (no admin app) on the base config changed by ``edits``, served as ``gateway run``."""
    return functools.partial(make_gateway, served=True, admin=False)


@pytest.fixture
async def sink() -> AsyncIterator[tuple[SinkUpstream, str]]:
    fake = SinkUpstream()
    # Roomier than aiohttp's defaults, so what is refused is refused by the gateway.
    runner, url = await start_runner(
        fake.app(), max_field_size=65536, max_line_size=65536, max_headers=1000
    )
    yield fake, url
    for gate in fake.gates.values():
        gate.set()
    await runner.cleanup()


def request_head(target: str = "/public/x", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def exchange(gw: RunningGateway, data: bytes) -> tuple[int, RawConnection]:
    """Send ``data`` on a new connection and read one response; the connection stays open."""
    conn = await RawConnection.open(gw.port)
    await conn.send(data)
    reply = await conn.response()
    return reply.status, conn


async def assert_refused_and_closed(gw: RunningGateway, data: bytes) -> int:
    """A clean 4xx from the HTTP parser (400 or 431), then the connection closed."""
    status, conn = await exchange(gw, data)
    try:
        assert status in (400, 431), status
        await conn.closed_by_server(within=2)
    finally:
        await conn.close()
    return status


async def assert_served(gw: RunningGateway, data: bytes) -> None:
    status, conn = await exchange(gw, data)
    await conn.close()
    assert status == 200


async def post(
    gw: RunningGateway, path: str, data: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST on a fresh connection; the status and the JSON body."""
    async with (
        closing_session() as session,
        session.post(gw.url(path), data=data, headers=headers) as response,
    ):
        return response.status, await response.json()


def n_headers(total: int) -> list[tuple[str, str]]:
    """Headers that, with Host, make ``total`` header lines."""
    return [(f"X-Extra-{i}", "v") for i in range(total - 1)]


# --- defaults ----------------------------------------------------------------------------------
async def test_limit_defaults_are_the_documented_constants(serve):
    gw = await serve()
    assert gw.config.limits == Limits()
    assert (
        gw.config.limits.max_header_bytes,
        gw.config.limits.max_headers,
        gw.config.limits.client_idle_timeout_s,
        gw.config.limits.max_body_bytes,
        gw.config.limits.max_concurrent_requests,
        gw.config.limits.max_queued_requests,
    ) == (
        DEFAULT_MAX_HEADER_BYTES,
        DEFAULT_MAX_HEADERS,
        DEFAULT_CLIENT_IDLE_TIMEOUT_S,
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_CONCURRENT,
        DEFAULT_MAX_QUEUED,
    )
    for route in gw.config.routes:
        assert route.max_body_bytes == DEFAULT_MAX_BODY_BYTES
        assert route.max_concurrent_requests == DEFAULT_MAX_CONCURRENT
        assert route.max_queued_requests == DEFAULT_MAX_QUEUED
    # 30 s is too long to wait for here: read it off the connection handler the server made.
    assert await idle_timeout_of_a_connection(gw) == DEFAULT_CLIENT_IDLE_TIMEOUT_S


async def test_configured_idle_timeout_reaches_the_connection_handler(serve):
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S))
    assert await idle_timeout_of_a_connection(gw) == IDLE_S


async def idle_timeout_of_a_connection(gw: RunningGateway) -> float:
    server = gw.runner.server
    assert server is not None
    conn = await RawConnection.open(gw.port)
    try:
        await wait_until(lambda: len(server.connections) == 1, what="connection accepted")
        return server.connections[0].keepalive_timeout
    finally:
        await conn.close()


# --- header size and count -----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["header-value", "request-line"])
async def test_header_line_over_max_header_bytes_is_a_clean_4xx(serve, sink, where):
    fake, url = sink
    gw = await serve(point_routes_at(url), set_limits(max_header_bytes=2048))
    if where == "header-value":
        small = request_head(headers=[("X-Big", "a" * 1000)])
        big = request_head(headers=[("X-Big", "a" * 3000)])
    else:
        small, big = request_head("/public/" + "a" * 1000), request_head("/public/" + "a" * 3000)
    await assert_served(gw, small)
    await assert_refused_and_closed(gw, big)
    assert len(fake.arrived) == 1  # the refused one was not forwarded


async def test_max_header_bytes_default_applies_not_aiohttps_8190(serve, sink):
    fake, url = sink
    gw = await serve(point_routes_at(url))
    # Over aiohttp's own 8190-byte default, under the gateway's default: accepted.
    await assert_served(gw, request_head(headers=[("X-Big", "a" * 12_000)]))
    await assert_refused_and_closed(
        gw, request_head(headers=[("X-Big", "a" * (DEFAULT_MAX_HEADER_BYTES + 100))])
    )
    assert len(fake.arrived) == 1


@pytest.mark.parametrize(("limit", "configured"), [(10, True), (DEFAULT_MAX_HEADERS, False)])
async def test_more_than_max_headers_is_a_clean_4xx(serve, sink, limit, configured):
    fake, url = sink
    edits = [point_routes_at(url)] + ([set_limits(max_headers=limit)] if configured else [])
    gw = await serve(*edits)
    await assert_served(gw, request_head(headers=n_headers(limit)))
    await assert_refused_and_closed(gw, request_head(headers=n_headers(limit + 1)))
    await assert_refused_and_closed(gw, request_head(headers=n_headers(limit * 3)))
    assert len(fake.arrived) == 1


# --- body size ---------------------------------------------------------------------------------
LIMIT = 100_000


async def test_content_length_over_max_body_bytes_is_413_with_nothing_forwarded(serve, upstream):
    gw = await serve(set_limits(max_body_bytes=LIMIT))
    status, body = await post(gw, "/public/up", b"x" * (LIMIT + 1))
    assert (status, body["error"]["reason"]) == (413, "payload_too_large")
    assert upstream.hits == 0
    assert gw.metric("gateway_requests_total", route="public", reason="payload_too_large") == 1


async def test_declared_length_over_the_default_is_refused_before_the_body_is_read(serve, upstream):
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        # Only the head: the refusal must not wait for 10 MiB that never come.
        await conn.send(
            b"POST /public/up HTTP/1.1\r\nHost: gateway.test\r\n"
            + f"Content-Length: {DEFAULT_MAX_BODY_BYTES + 1}\r\n\r\n".encode()
        )
        reply = await conn.response(within=3)
    finally:
        await conn.close()
    assert reply.status == 413
    assert b"payload_too_large" in reply.body
    assert upstream.hits == 0


async def test_body_of_exactly_the_default_limit_passes(serve, upstream):
    gw = await serve()
    data = os.urandom(DEFAULT_MAX_BODY_BYTES)
    status, seen = await post(gw, "/public/up", io.BytesIO(data))
    assert status == 200
    assert seen["body_bytes"] == DEFAULT_MAX_BODY_BYTES
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()


async def test_chunked_body_over_the_limit_is_413_and_the_upstream_request_aborted(
    serve, sink, caplog
):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake, url = sink
    gw = await serve(point_routes_at(url), set_limits(max_body_bytes=LIMIT))

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 60_000
        # Wait until the upstream is reading: the abort must reach a request in progress.
        await wait_until(lambda: bool(fake.arrived), what="upstream reading the body")
        for _ in range(10):
            yield b"b" * 60_000

    status, answer = await post(gw, "/public/up", body())
    assert (status, answer["error"]["reason"]) == (413, "payload_too_large")
    await asyncio.wait_for(fake.ended.wait(), 5)
    [outcome] = fake.outcomes
    assert outcome.error is not None, outcome  # the upstream saw its body cut off, not an end
    assert outcome.received <= LIMIT
    assert gw.metric("gateway_requests_total", route="public", reason="payload_too_large") == 1
    assert logged(caplog)["detail"] == "request_body_stopped"  # mid-stream, not declared


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_of_exactly_max_body_bytes_passes_byte_exact(serve, sink, framing):
    fake, url = sink
    gw = await serve(point_routes_at(url), set_limits(max_body_bytes=LIMIT))
    data = os.urandom(LIMIT)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, LIMIT, 30_000):
            yield data[start : start + 30_000]

    payload: Any = data if framing == "content-length" else chunked()
    status, seen = await post(gw, "/public/up", payload)
    assert status == 200
    assert seen == {"body_bytes": LIMIT, "body_sha256": hashlib.sha256(data).hexdigest()}
    assert [o.error for o in fake.outcomes] == [None]


async def test_route_max_body_bytes_overrides_the_global_limit(serve, upstream, token):
    gw = await serve(
        set_limits(max_body_bytes=1000),
        set_route("public", max_body_bytes=5000),  # raised above the global value
        set_route("scoped", max_body_bytes=500),  # lowered below it
    )
    data = b"x" * 3000
    auth = conftest.bearer(token(scope="orders:read"))
    async with closing_session() as session:
        async with session.post(gw.url("/public/up"), data=data) as response:
            assert response.status == 200
        async with session.post(gw.url("/api/up"), data=data, headers=auth) as response:
            assert response.status == 413  # no override: the global 1000
        async with session.post(gw.url("/scoped/up"), data=b"x" * 800, headers=auth) as response:
            assert response.status == 413
        async with session.post(gw.url("/api/up"), data=b"x" * 800, headers=auth) as response:
            assert response.status == 200
    assert upstream.hits == 2


# --- idle connections --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "partial",
    [b"GET /public/x HTT", b"GET /public/x HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: 1"],
    ids=["partial-request-line", "partial-headers"],
)
async def test_slowloris_client_is_disconnected_within_the_idle_timeout(serve, upstream, partial):
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(partial)
        took, sent = await conn.closed_by_server(within=IDLE_S + SLACK_S)
    finally:
        await conn.close()
    assert took >= IDLE_S * 0.8  # the configured timer closed it, not an immediate refusal
    assert not sent.startswith(b"HTTP/1.1 5")
    assert upstream.hits == 0


async def test_trickling_header_bytes_do_not_extend_the_idle_timeout(serve):
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S))
    conn = await RawConnection.open(gw.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await conn.send(b"GET /public/x HTTP/1.1\r\nHost: gateway.test\r\n")

        async def trickle() -> None:
            for _ in range(50):
                await asyncio.sleep(0.1)
                await conn.send(b"X")

        trickler = asyncio.create_task(trickle())
        try:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(trickler, IDLE_S + SLACK_S)
        finally:
            trickler.cancel()
    finally:
        await conn.close()
    assert loop.time() - started < IDLE_S + SLACK_S


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(serve):
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(request_head())
        reply = await conn.response()
        assert reply.status == 200
        assert reply.headers.get("connection", "").lower() != "close"  # kept alive ...
        took, sent = await conn.closed_by_server(within=IDLE_S + SLACK_S)  # ... until idle
    finally:
        await conn.close()
    assert took >= IDLE_S * 0.8
    assert sent == b""


async def test_connection_in_use_is_not_closed_by_the_idle_timeout(serve):
    """The timer is for idleness: requests on one connection spaced under it all succeed."""
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S))
    conn = await RawConnection.open(gw.port)
    try:
        for _ in range(4):
            await conn.send(request_head())
            reply = await conn.response()
            assert reply.status == 200
            await asyncio.sleep(IDLE_S / 2)
    finally:
        await conn.close()


async def test_a_connection_idle_after_its_last_request_is_closed_and_frees_its_place(serve):
    """The idle timer re-arms past each check that finds the connection in use and runs from
    its last request; a connection it closes no longer counts against limits.max_connections."""
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S, max_connections=1))
    conn = await RawConnection.open(gw.port)
    try:
        for _ in range(3):  # spaced under the timeout: each check finds a recent request
            await conn.send(request_head())
            assert (await conn.response()).status == 200
            await asyncio.sleep(IDLE_S / 2)
        _, sent = await conn.closed_by_server(within=IDLE_S + SLACK_S)
    finally:
        await conn.close()
    assert sent == b""
    again = await RawConnection.open(gw.port)
    try:
        await again.send(request_head())
        assert (await again.response()).status == 200  # not 503 too_many_connections
    finally:
        await again.close()


async def test_the_idle_timeout_counts_from_the_end_of_the_last_request(serve):
    """The timer's first check (the timeout after the connection opened) finds the request
    answered a quarter of the timeout before; the connection is then closed the timeout
    after that answer, not a whole timeout after the check (1.75 times as long).  (Were the
    request answered at once, the check, a few milliseconds late, could find it idle for
    the whole timeout already, and either rule would close it then.)"""
    idle_s = 2.0
    gw = await serve(set_limits(client_idle_timeout_s=idle_s))
    conn = await RawConnection.open(gw.port)
    try:
        await asyncio.sleep(idle_s / 4)  # the request comes a while after the connection opened
        await conn.send(request_head())
        assert (await conn.response()).status == 200
        took, _ = await conn.closed_by_server(within=idle_s * 3)
    finally:
        await conn.close()
    assert idle_s * 0.8 <= took < idle_s * 1.6


async def test_a_request_in_flight_past_the_idle_timeout_keeps_its_connection_then_idles_out(
    serve, upstream
):
    """A check that finds a request in flight re-arms the timer (no idle start to count from):
    the answer arrives, and the connection is closed once it has been idle for the timeout."""
    gw = await serve(set_limits(client_idle_timeout_s=IDLE_S))
    upstream.mode = "stall"
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(request_head())
        await wait_until(lambda: upstream.hits == 1, what="the request reached the upstream")
        await asyncio.sleep(IDLE_S * 1.5)  # the idle check runs while the request is in flight
        upstream.release.set()
        assert (await conn.response()).status == 200
        _, sent = await conn.closed_by_server(within=IDLE_S + SLACK_S)
    finally:
        await conn.close()
    assert sent == b""


# --- concurrency and queueing ------------------------------------------------------------------
async def test_in_flight_and_queue_limits_shed_the_excess_at_once(serve, sink):
    fake, url = sink
    gw = await serve(
        point_routes_at(url), set_limits(max_concurrent_requests=2, max_queued_requests=1)
    )
    assert gw.runner.server is not None
    handled = gw.runner.server.requests_count
    loop = asyncio.get_running_loop()
    async with closing_session() as session:

        async def get(name: str) -> tuple[int, dict[str, Any]]:
            async with session.get(gw.url(f"/public/hold/{name}")) as response:
                return response.status, await response.json()

        first = asyncio.create_task(get("a"))
        second = asyncio.create_task(get("b"))
        await wait_until(lambda: len(fake.arrived) == 2, what="two requests in flight")
        third = asyncio.create_task(get("c"))
        # The third is in the gateway (its handler started, nothing awaited before the queue) ...
        await wait_until(lambda: gw.runner.server.requests_count == handled + 3, what="queued")
        assert fake.arrived == ["/public/hold/a", "/public/hold/b"]  # ... but not upstream

        started = loop.time()
        status, body = await get("d")
        assert (status, body["error"]["reason"]) == (503, "upstream_overloaded")
        assert loop.time() - started < 1.0  # refused at once, not after a wait
        assert "/public/hold/d" not in fake.arrived

        fake.gate("a").set()  # one slot frees: the queued request takes it
        assert (await asyncio.wait_for(first, 5))[0] == 200
        await wait_until(lambda: "/public/hold/c" in fake.arrived, what="queued request ran")
        assert not second.done()
        fake.gate("b").set()
        fake.gate("c").set()
        results = await asyncio.wait_for(asyncio.gather(second, third), 5)
    assert [status for status, _ in results] == [200, 200]
    assert fake.arrived == ["/public/hold/a", "/public/hold/b", "/public/hold/c"]
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == 3
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_overloaded") == 1


async def test_freed_slots_admit_new_requests_again(serve, sink):
    """After an overload the route recovers: no slot is lost to a refused request."""
    fake, url = sink
    gw = await serve(
        point_routes_at(url), set_limits(max_concurrent_requests=1, max_queued_requests=0)
    )
    async with closing_session() as session:
        held = asyncio.create_task(session.get(gw.url("/public/hold/x")))
        await wait_until(lambda: len(fake.arrived) == 1, what="one in flight")
        for _ in range(3):
            async with session.get(gw.url("/public/y")) as response:
                assert response.status == 503
        fake.gate("x").set()
        async with await asyncio.wait_for(held, 5) as response:
            assert response.status == 200
        for _ in range(3):
            async with session.get(gw.url("/public/y")) as response:
                assert response.status == 200
