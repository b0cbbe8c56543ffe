"""The upstream pool and connection, driven directly against raw servers on 127.0.0.1.

The pool's promises: at most ``max_connections`` open, a released connection handed to the
oldest waiter, a closed connection's slot handed on, a waiter that leaves (cancelled, timed
out) never taking a connection or a slot with it, an idle connection that the upstream closed
or that is too old never handed out, and ``close`` refusing whoever still waits.  The
connection's: one exchange at a time, parsed by llhttp, HEAD and interim responses understood,
and reusable only after a clean, kept-alive exchange.

The servers are ``asyncio.start_server`` on loopback; nothing mocks the network.  Where a test
needs two loop callbacks to fall in one iteration (a hand-over racing a cancellation or a
timeout), it schedules them with ``call_soon`` or holds the loop with a blocking sleep, as a
busy event loop would; no test sleeps to wait for state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import Upstream
from gateway.errors import Rejection
from gateway.reasons import Reason
from gateway.tunnel import Tunnel
from gateway.upstream import (
    _HIGH_WATER,
    DEFAULT_IDLE_S,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamPool,
)
from tests.integration.e2e_helpers import free_port, wait_until

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CONNECT_S = 2.0
WAIT_S = 2.0

# What the server writes for a request, by its path; absent: OK.  None: close unanswered.
ANSWERS: dict[str, bytes | None] = {
    "/close": None,
    "/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
    "/interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
    "/interim-chunked": b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n"
    b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "/until-close": b"HTTP/1.0 200 OK\r\n\r\nall of it",
    "/connection-close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "/extra": OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno",
    "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
    "/not-modified-length": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "/manual": b"",  # the test writes the answer itself (RawServer.send), piece by piece
    "/sink": b"",  # nothing: the server reads nothing more until ``sinking`` is set, then all
}

CLOSE_AFTER = frozenset({"/until-close"})


class RawServer:
    """Answers each request head on a connection by its path (``ANSWERS``); counts connections
    and keeps their writers so a test can close one from the server's side."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.paths: list[tuple[int, str]] = []  # (connection number from 1, path)
        self.sinking = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def connections(self) -> int:
        return len(self.writers)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.writers.append(writer)
        number = len(self.writers)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            for _ in range(1000):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                path = head.split(b" ", 2)[1].decode()
                self.paths.append((number, path))
                answer = ANSWERS.get(path, OK)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if path in CLOSE_AFTER:
                    break
                if path == "/sink":
                    await self.sinking.wait()
                    while await reader.read(1 << 20):
                        pass
                    break
        writer.close()

    def send(self, number: int, data: bytes) -> None:
        """Write ``data`` on connection ``number`` (from 1), asked or not."""
        self.writers[number - 1].write(data)

    def reset_connection(self, number: int) -> None:
        """Reset connection ``number`` (from 1) from the server's side (an RST, not a FIN)."""
        transport = self.writers[number - 1].transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def close_connection(self, number: int) -> None:
        """Close connection ``number`` (from 1) from the server's side (a FIN)."""
        self.writers[number - 1].close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def origin(port: int) -> Upstream:
    return Upstream(f"http://127.0.0.1:{port}", "http", "127.0.0.1", port)


PoolFactory = Callable[..., UpstreamPool]


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    raw = RawServer()
    await raw.start()
    yield raw
    await raw.close()


@pytest.fixture
async def pools(server: RawServer) -> AsyncIterator[PoolFactory]:
    """Pools on ``server`` (``max_connections`` and ``idle_s`` as given), closed at the end."""
    made: list[UpstreamPool] = []

    def make(max_connections: int = 1, idle_s: float = DEFAULT_IDLE_S) -> UpstreamPool:
        pool = UpstreamPool(origin(server.port), max_connections, idle_s=idle_s)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


async def acquire(
    pool: UpstreamPool, *, pool_timeout: float = WAIT_S, fresh: bool = False
) -> UpstreamConnection:
    return await pool.acquire(connect_timeout=CONNECT_S, pool_timeout=pool_timeout, fresh=fresh)


async def exchange(
    conn: UpstreamConnection, path: str = "/", method: str = "GET"
) -> tuple[int, bytes]:
    """One request on ``conn``: its status and whole body (the exchange is left unfinished)."""
    conn.begin(f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode(), head_only=method == "HEAD")
    head = await conn.read_head(WAIT_S)
    body = b""
    for _ in range(1000):
        piece = await conn.read_body(WAIT_S)
        if not piece:
            return head.status, body
        body += piece
    raise AssertionError("endless body")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def arrived(server: RawServer, number: int) -> None:
    """What the server wrote on connection ``number`` has left it, and the loop read it."""
    writer = server.writers[number - 1]
    await wait_until(lambda: writer.transport.get_write_buffer_size() == 0, what="sent")
    for _ in range(20):
        await asyncio.sleep(0)


async def manual(
    server: RawServer,
    pool: UpstreamPool,
    request: bytes = b"GET /manual HTTP/1.1\r\nHost: t\r\n\r\n",
    *,
    upgrade: bool = False,
) -> UpstreamConnection:
    """A connection whose first exchange, a request for ``/manual``, has reached the server:
    the test writes the answer itself (``server.send``)."""
    conn = await acquire(pool)
    conn.begin(request, head_only=False, upgrade=upgrade)
    await wait_until(lambda: server.paths == [(1, "/manual")], what="the request arrived")
    return conn


def waiter(pool: UpstreamPool, pool_timeout: float = WAIT_S) -> asyncio.Task[UpstreamConnection]:
    return asyncio.create_task(acquire(pool, pool_timeout=pool_timeout))


async def used(pool: UpstreamPool, path: str = "/") -> UpstreamConnection:
    """A connection of ``pool`` after one clean exchange, still in use."""
    conn = await acquire(pool)
    assert await exchange(conn, path) == (200, b"ok")
    return conn


# --- reuse and hand-over -------------------------------------------------------------------------
async def test_a_finished_exchange_returns_the_connection_for_the_next(server, pools):
    pool = pools(max_connections=4)
    first = await used(pool)
    first.finish()
    assert (pool.open, pool.idle) == (1, 1)
    again = await used(pool)
    assert again is first
    assert again.reused
    assert server.connections == 1
    again.finish()


async def test_a_released_connection_is_handed_to_the_waiter(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    waiting = waiter(pool)
    await settle()
    assert pool.waiting == 1
    held.finish()
    handed = await asyncio.wait_for(waiting, WAIT_S)
    assert handed is held  # the same connection, not a new one
    assert (pool.open, pool.idle, pool.waiting) == (1, 0, 0)
    assert await exchange(handed) == (200, b"ok")
    handed.finish()
    assert server.connections == 1


async def test_waiters_are_served_oldest_first(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    served: list[str] = []

    async def wait_then_release(name: str) -> None:
        conn = await acquire(pool)
        served.append(name)
        conn.finish()

    tasks = [asyncio.create_task(wait_then_release(name)) for name in ("a", "b", "c")]
    await settle()
    assert pool.waiting == 3
    held.finish()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert served == ["a", "b", "c"]
    assert (pool.open, server.connections) == (1, 1)


async def test_at_the_bound_a_request_is_refused_after_pool_timeout(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    started = time.monotonic()
    with pytest.raises(Rejection) as caught:
        await acquire(pool, pool_timeout=0.1)
    assert time.monotonic() - started >= 0.09
    assert caught.value.reason is Reason.UPSTREAM_OVERLOADED
    assert caught.value.detail == "no upstream connection free in time"
    assert (pool.open, server.connections) == (1, 1)
    held.finish()
    assert await acquire(pool) is held  # the refused waiter took nothing with it


async def test_a_request_refused_after_pool_timeout_leaves_the_queue(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    for _ in range(3):
        with pytest.raises(Rejection):
            await acquire(pool, pool_timeout=0.05)
    assert pool.waiting == 0
    held.finish()


# --- a lost connection's slot ----------------------------------------------------------------------
async def test_a_connection_closed_in_use_gives_its_slot_to_a_waiter(server, pools):
    pool = pools(max_connections=1)
    held = await acquire(pool)
    waiting = waiter(pool)
    await settle()
    held.begin(b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    with pytest.raises(UpstreamClosed) as caught:
        await held.read_head(WAIT_S)
    assert not caught.value.responded
    fresh = await asyncio.wait_for(waiting, WAIT_S)  # opened in the freed slot
    assert fresh is not held
    held.finish()  # the failed exchange ends: nothing to give back twice
    assert await exchange(fresh) == (200, b"ok")
    fresh.finish()
    assert (pool.open, pool.idle, server.connections) == (1, 1, 2)


async def test_a_slot_freed_beside_a_busy_connection_is_counted_once_for_its_waiter(server, pools):
    pool = pools(max_connections=2)
    busy = await acquire(pool)
    dropped = await acquire(pool)
    waiting = waiter(pool)
    await settle()
    dropped.abort()  # its slot goes to the waiter, which opens a connection in it
    fresh = await asyncio.wait_for(waiting, WAIT_S)
    assert fresh is not dropped
    assert (pool.open, pool.waiting, server.connections) == (2, 0, 3)
    with pytest.raises(Rejection):  # still at the bound: two open, none idle
        await acquire(pool, pool_timeout=0.05)
    for conn in (busy, fresh):
        assert await exchange(conn) == (200, b"ok")
        conn.finish()
    assert (pool.open, pool.idle) == (2, 2)


async def test_a_failed_connect_gives_its_slot_back():
    pool = UpstreamPool(origin(free_port()), 1)
    try:
        for _ in range(2):  # refused each time: the first failure did not keep the only slot
            with pytest.raises(ConnectionRefusedError):
                await pool.acquire(connect_timeout=CONNECT_S, pool_timeout=0.1, fresh=False)
            assert (pool.open, pool.waiting) == (0, 0)
    finally:
        await pool.close()


async def test_a_connection_that_is_not_reusable_is_closed_and_frees_its_slot(server, pools):
    pool = pools(max_connections=1)
    conn = await acquire(pool)
    assert await exchange(conn, "/connection-close") == (200, b"ok")
    assert not conn.reusable
    waiting = waiter(pool)
    await settle()
    conn.finish()
    fresh = await asyncio.wait_for(waiting, WAIT_S)
    assert fresh is not conn
    assert conn.closed
    assert (pool.open, server.connections) == (1, 2)
    fresh.finish()


# --- waiters that leave --------------------------------------------------------------------------
async def test_a_waiter_cancelled_in_the_queue_takes_nothing(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    leaver = waiter(pool)
    await settle()
    leaver.cancel()
    await settle()
    assert pool.waiting == 0
    held.finish()
    assert (pool.open, pool.idle) == (1, 1)
    assert await acquire(pool) is held


async def test_a_waiter_cancelled_as_it_is_handed_a_connection_passes_it_on(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    unlucky = waiter(pool)
    next_in_line = waiter(pool)
    await settle()
    assert pool.waiting == 2
    held.finish()  # hands the connection to `unlucky` (no suspension)...
    unlucky.cancel()  # ...which is cancelled before it could run
    assert await asyncio.wait_for(next_in_line, WAIT_S) is held
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert (pool.open, pool.waiting, server.connections) == (1, 0, 1)


async def test_a_connection_handed_to_a_cancelled_last_waiter_is_kept_idle(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    unlucky = waiter(pool)
    await settle()
    held.finish()
    unlucky.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert (pool.open, pool.idle) == (1, 1)
    assert await acquire(pool) is held


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_gives_the_slot_back(server, pools):
    pool = pools(max_connections=1)
    held = await acquire(pool)
    unlucky = waiter(pool)
    await settle()
    loop = asyncio.get_running_loop()
    held.abort()  # connection_lost, and so the slot's hand-over to `unlucky`, runs next...
    loop.call_soon(unlucky.cancel)  # ...and right after it, before `unlucky` can run
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    conn = await acquire(pool, pool_timeout=0.2)  # the one slot is free: not refused
    assert (pool.open, server.connections) == (1, 2)
    conn.finish()


async def test_a_slot_passed_on_by_a_cancelled_waiter_is_counted_once(server, pools):
    pool = pools(max_connections=1)
    held = await acquire(pool)
    unlucky = waiter(pool)
    next_in_line = waiter(pool)
    await settle()
    loop = asyncio.get_running_loop()
    held.abort()
    loop.call_soon(unlucky.cancel)
    fresh = await asyncio.wait_for(next_in_line, WAIT_S)
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    assert fresh is not held
    assert pool.open == 1  # one connection open, counted once
    fresh.finish()


async def test_a_connection_handed_as_the_pool_timeout_expires_is_not_lost(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    late = waiter(pool, pool_timeout=0.2)
    await asyncio.sleep(0)  # `late` runs up to its wait
    assert pool.waiting == 1
    asyncio.get_running_loop().call_soon(held.finish)  # the release, queued...
    # ...while the loop is busy past `late`'s deadline, so both fall due in one iteration.
    time.sleep(0.3)  # noqa: ASYNC251 (blocking the loop is the point)
    # The connection arrived in the turn the wait ran out: the waiter uses it rather than
    # refusing the request and stranding the connection.
    assert await late is held
    held.finish()
    assert await acquire(pool, pool_timeout=0.2) is held
    assert pool.open == 1


# --- idle connections that must not be handed out -------------------------------------------------
async def test_an_idle_connection_the_upstream_closed_is_not_handed_out(server, pools):
    pool = pools(max_connections=1)
    first = await used(pool)
    first.finish()
    assert pool.idle == 1
    server.close_connection(1)  # the upstream's keep-alive timeout, say
    await wait_until(lambda: pool.idle == 0, what="the closed connection left the pool")
    assert pool.open == 0
    second = await used(pool)
    assert second is not first
    assert server.connections == 2
    second.finish()


async def test_an_idle_connection_already_closing_is_not_handed_out(server, pools):
    """Closed (by the upstream's FIN or a failure) in the loop iteration the next request
    asks for a connection, before the close has run its course: it is not handed out."""
    pool = pools(max_connections=1)
    first = await used(pool)
    first.finish()
    first.close()  # closing; connection_lost, and so lost(), runs only later
    assert pool.idle == 1
    second = await acquire(pool)
    assert second is not first
    assert await exchange(second) == (200, b"ok")
    assert (pool.open, server.connections) == (1, 2)
    second.finish()


async def test_an_idle_connection_older_than_idle_s_is_closed_not_handed_out(server, pools):
    pool = pools(max_connections=1, idle_s=0.0)  # every idle connection is too old
    first = await used(pool)
    first.finish()
    second = await acquire(pool)
    assert second is not first
    await wait_until(lambda: first.closed, what="the old connection closed")
    assert await exchange(second) == (200, b"ok")
    assert (pool.open, server.connections) == (1, 2)
    second.finish()


async def test_unsolicited_bytes_on_an_idle_connection_close_it(server, pools, caplog):
    caplog.set_level(logging.WARNING)
    pool = pools(max_connections=1)
    conn = await used(pool)
    conn.finish()
    assert pool.idle == 1
    server.send(1, OK)  # a response nobody asked for: the framing can no longer be trusted
    await wait_until(lambda: (pool.open, pool.idle) == (0, 0), what="the connection dropped")
    assert caplog.records == []  # closed by the gateway's decision, not by a failing callback


async def test_an_upstream_that_talks_before_any_request_is_dropped_quietly(server, pools, caplog):
    caplog.set_level(logging.WARNING)
    pool = pools(max_connections=1)
    conn = await acquire(pool)  # opened, no exchange begun on it yet
    await wait_until(lambda: server.connections == 1, what="the server accepted")
    server.send(1, OK)
    await wait_until(lambda: conn.closed, what="the connection dropped")
    await wait_until(lambda: pool.open == 0, what="its slot freed")
    assert caplog.records == []
    assert conn.closed
    fresh = await used(pool)
    assert fresh is not conn
    fresh.finish()


async def test_a_second_response_glued_to_the_first_makes_the_connection_unusable(server, pools):
    pool = pools(max_connections=1)
    conn = await acquire(pool)
    assert await exchange(conn, "/extra") == (200, b"ok")  # the first answer is whole...
    assert not conn.reusable  # ...but what followed it was not asked for
    conn.finish()
    await wait_until(lambda: (pool.open, pool.idle) == (0, 0), what="the connection dropped")
    assert await acquire(pool) is not conn


async def test_a_fresh_acquire_at_the_bound_replaces_an_idle_connection(server, pools):
    pool = pools(max_connections=1)
    first = await used(pool)
    first.finish()
    second = await acquire(pool, fresh=True)
    assert second is not first
    assert first.closed
    assert await exchange(second) == (200, b"ok")
    assert (pool.open, server.connections) == (1, 2)
    second.finish()


async def test_a_fresh_acquire_under_the_bound_leaves_the_idle_connections_alone(server, pools):
    pool = pools(max_connections=2)
    first = await used(pool)
    first.finish()
    second = await acquire(pool, fresh=True)  # room for one more: no idle one need go
    assert second is not first
    assert not first.closed
    assert (pool.open, pool.idle, server.connections) == (2, 1, 2)
    second.close()
    await wait_until(lambda: pool.open == 1, what="the fresh connection closed")
    assert await acquire(pool) is first  # the idle one is still there to reuse


# --- close ---------------------------------------------------------------------------------------
async def test_close_refuses_waiters_and_closes_what_comes_back(server, pools):
    pool = pools(max_connections=1)
    held = await used(pool)
    waiting = waiter(pool)
    await settle()
    await pool.close()
    with pytest.raises(Rejection) as caught:
        await asyncio.wait_for(waiting, WAIT_S)
    assert caught.value.reason is Reason.UPSTREAM_UNAVAILABLE
    assert caught.value.detail == "the gateway is shutting down"
    held.finish()  # a connection in use at shutdown is closed when its exchange ends
    await wait_until(lambda: held.closed and pool.open == 0, what="the connection closed")
    assert pool.idle == 0


async def test_close_closes_idle_connections(server, pools):
    pool = pools(max_connections=2)
    conns = [await used(pool, "/a"), await used(pool, "/b")]
    for conn in conns:
        conn.finish()
    assert pool.idle == 2
    await pool.close()
    await wait_until(lambda: all(c.closed for c in conns) and pool.open == 0, what="all closed")
    assert pool.idle == 0


# --- what one exchange leaves the connection fit for ------------------------------------------------
@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        pytest.param("/head", "HEAD", 200, id="head"),
        # Without framing a 200 would run until the close; a 304 ends at its head, whatever
        # Content-Length it declares (the length of the resource it did not send).
        pytest.param("/not-modified", "GET", 304, id="304"),
        pytest.param("/not-modified-length", "GET", 304, id="304-with-a-length"),
    ],
)
async def test_an_answer_without_a_body_ends_at_its_head_and_the_connection_is_reusable(
    server, pools, path, method, status
):
    pool = pools()
    conn = await acquire(pool)
    assert await exchange(conn, path, method) == (status, b"")
    assert conn.reusable
    conn.finish()
    assert await exchange(await acquire(pool)) == (200, b"ok")
    assert server.connections == 1


async def test_interim_responses_are_skipped(server, pools):
    pool = pools()
    conn = await acquire(pool)
    conn.begin(b"GET /interim HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    head = await conn.read_head(WAIT_S)
    assert (head.status, head.reason, head.headers) == (200, b"OK", [(b"Content-Length", b"2")])
    assert head.length_framed
    assert await conn.read_body(WAIT_S) == b"ok"
    assert await conn.read_body(WAIT_S) == b""
    assert conn.reusable
    conn.finish()


async def test_a_body_delimited_by_close_is_whole_and_not_reusable(server, pools):
    pool = pools()
    conn = await acquire(pool)
    assert await exchange(conn, "/until-close") == (200, b"all of it")
    assert not conn.reusable
    conn.finish()
    await wait_until(lambda: pool.open == 0, what="the connection's slot freed")


async def test_a_204_has_no_body_and_keeps_the_connection(server, pools):
    pool = pools()
    conn = await acquire(pool)
    assert await exchange(conn, "/no-content") == (204, b"")
    assert conn.reusable
    conn.finish()
    assert pool.idle == 1


async def test_an_exchange_abandoned_midway_is_not_reusable(server, pools):
    pool = pools()
    conn = await acquire(pool)
    conn.begin(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    await conn.read_head(WAIT_S)  # the body is never read
    conn.spoiled = True
    assert not conn.reusable
    conn.finish()
    await wait_until(lambda: pool.open == 0, what="the connection closed")


async def test_a_head_between_two_gets_leaves_the_next_get_a_parser_at_its_start(server, pools):
    # The HEAD's answer declared 1,000 bytes it never sent: its parser, still waiting for
    # them, must not read the third exchange's answer.
    pool = pools()
    for path, method, answer in [
        ("/", "GET", (200, b"ok")),
        ("/head", "HEAD", (200, b"")),
        ("/", "GET", (200, b"ok")),
    ]:
        conn = await acquire(pool)
        assert await exchange(conn, path, method) == answer
        assert conn.reusable
        conn.finish()
    assert server.connections == 1


async def test_a_response_after_the_answer_in_a_read_of_its_own_spoils_the_connection(
    server, pools
):
    pool = pools()
    conn = await manual(server, pool)
    server.send(1, OK)
    await conn.read_head(WAIT_S)
    assert await conn.read_body(WAIT_S) == b"ok"
    assert await conn.read_body(WAIT_S) == b""
    server.send(1, b"HTTP/1.1 204 No Content\r\n\r\n")  # whole, well-formed, and unasked for
    await arrived(server, 1)
    assert not conn.reusable
    conn.finish()
    await wait_until(lambda: pool.open == 0, what="the connection closed")


async def test_only_a_content_length_makes_a_response_length_framed(server, pools):
    pool = pools()
    conn = await acquire(pool)
    conn.begin(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    assert (await conn.read_head(WAIT_S)).length_framed
    assert await conn.read_body(WAIT_S) == b"ok"
    assert await conn.read_body(WAIT_S) == b""
    conn.finish()
    conn = await acquire(pool)
    conn.begin(b"GET /chunked HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    assert not (await conn.read_head(WAIT_S)).length_framed
    assert await conn.read_body(WAIT_S) == b"ok"
    assert await conn.read_body(WAIT_S) == b""
    assert conn.reusable  # framed by its chunks, not by the connection's close
    conn.finish()
    assert (server.connections, pool.idle) == (1, 1)


async def test_a_status_line_split_across_reads_keeps_its_whole_reason(server, pools):
    pool = pools()
    conn = await manual(server, pool)
    server.send(1, b"HTTP/1.1 404 Not Fo")
    await wait_until(lambda: conn.responded, what="the first piece arrived")
    server.send(1, b"und\r\nContent-Length: 0\r\n\r\n")
    head = await conn.read_head(WAIT_S)
    assert (head.status, head.reason) == (404, b"Not Found")


async def read_exactly(conn: UpstreamConnection, size: int, transport: Any) -> bytes:
    """``size`` body bytes; reading is on again after each piece is taken."""
    body = b""
    while len(body) < size:
        body += await conn.read_body(WAIT_S)
        assert transport.is_reading()  # what waited was taken: reading goes on
    return body


async def test_reading_pauses_past_the_high_water_mark_until_the_body_is_read(server, pools):
    # A slow client must not make the gateway buffer the upstream's whole body.
    pool = pools()
    conn = await acquire(pool)
    over, under = _HIGH_WATER + 40_000, _HIGH_WATER - 60_000
    conn.begin(b"GET /manual HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    await wait_until(lambda: server.paths == [(1, "/manual")], what="the request arrived")
    server.send(1, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * over + under))
    server.send(1, b"a" * over)
    await conn.read_head(WAIT_S)
    transport = conn.transport
    assert transport is not None
    await wait_until(lambda: not transport.is_reading(), what="reading paused")
    assert await read_exactly(conn, over, transport) == b"a" * over
    # Less than the mark arrives next: counted afresh, it does not pause reading.
    server.send(1, b"b" * under)
    await arrived(server, 1)
    assert transport.is_reading()
    assert await read_exactly(conn, under, transport) == b"b" * under
    # More than the mark again: reading pauses again.
    server.send(1, b"c" * over)
    await wait_until(lambda: not transport.is_reading(), what="reading paused again")
    assert await read_exactly(conn, over, transport) == b"c" * over
    assert await conn.read_body(WAIT_S) == b""
    assert conn.reusable
    conn.finish()


async def test_a_connection_lost_while_reading_is_paused_still_yields_what_it_buffered(
    server, pools
):
    # Paused past the mark, then the connection goes (an abort): what arrived is read, and
    # then the body is cut; nothing tries to resume reading a transport that is gone.
    pool = pools()
    conn = await acquire(pool)
    over = _HIGH_WATER + 40_000
    conn.begin(b"GET /manual HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    await wait_until(lambda: server.paths == [(1, "/manual")], what="the request arrived")
    server.send(1, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * over))
    server.send(1, b"a" * over)
    await conn.read_head(WAIT_S)
    transport = conn.transport
    assert transport is not None
    await wait_until(lambda: not transport.is_reading(), what="reading paused")
    conn.abort()
    await wait_until(lambda: conn.transport is None, what="the connection lost")
    buffered = await conn.read_body(WAIT_S)
    assert 0 < len(buffered) <= over
    assert set(buffered) == {ord("a")}
    with pytest.raises(UpstreamClosed) as cut:
        await conn.read_body(WAIT_S)
    assert cut.value.responded
    assert not conn.reusable
    conn.finish()


async def test_a_reset_during_a_close_delimited_body_cuts_it_rather_than_ending_it(server, pools):
    # Only a clean close ends a body without framing; a reset means some of it is missing.
    pool = pools()
    conn = await manual(server, pool)
    server.send(1, b"HTTP/1.0 200 OK\r\n\r\npart")
    await conn.read_head(WAIT_S)
    assert await conn.read_body(WAIT_S) == b"part"
    server.reset_connection(1)
    with pytest.raises(UpstreamClosed) as cut:
        await conn.read_body(WAIT_S)
    assert cut.value.responded
    assert not conn.reusable
    conn.finish()


def upgrade_request() -> bytes:
    return b"GET /manual HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


async def test_bytes_after_a_101_wait_in_order_for_the_tunnel(server, pools):
    pool = pools()
    conn = await manual(server, pool, upgrade_request(), upgrade=True)
    server.send(1, SWITCHING + b"first")  # a frame in the same read as the head
    head = await conn.read_head(WAIT_S)
    assert (head.status, conn.upgraded) == (101, True)
    await wait_until(lambda: conn.early == b"first", what="the glued frame kept")
    server.send(1, b"second")  # a frame in a read of its own, before the tunnel opened
    await wait_until(lambda: conn.early == b"firstsecond", what="the next frame kept after it")
    assert not conn.reusable


async def test_an_upgrade_the_request_did_not_ask_for_fails_the_exchange(server, pools):
    pool = pools()
    conn = await manual(server, pool)
    server.send(1, SWITCHING + b"frame")
    with pytest.raises(UpstreamClosed):
        await conn.read_head(WAIT_S)
    assert (conn.upgraded, conn.early) == (False, b"")
    conn.finish()
    await wait_until(lambda: pool.open == 0, what="the connection closed")


class Reading:
    """The client side of a tunnel: records whether the tunnel paused reading it."""

    def __init__(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_an_upstream_that_stops_reading_a_tunnel_pauses_the_client_until_it_reads(
    server, pools
):
    pool = pools()
    conn = await acquire(pool)
    conn.begin(b"GET /sink HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False, upgrade=True)
    transport = conn.transport
    assert transport is not None
    client = Reading()
    conn.tunnel = Tunnel(client, transport, idle_timeout_s=30.0, max_duration_s=0.0)
    for _ in range(64):  # the upstream reads nothing: its buffers fill, then the gateway's
        transport.write(b"x" * (1 << 20))
        if client.paused:
            break
    assert client.paused
    server.sinking.set()  # the upstream reads again
    await wait_until(lambda: not client.paused, what="the client read again")
    conn.close()


async def test_an_exchange_begun_on_a_lost_connection_fails_with_nothing_sent(server, pools):
    pool = pools()
    conn = await acquire(pool)
    await wait_until(lambda: server.connections == 1, what="the server accepted")
    server.close_connection(1)
    await wait_until(lambda: conn.transport is None, what="the connection lost")
    conn.begin(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    with pytest.raises(UpstreamClosed) as failed:
        await conn.read_head(WAIT_S)
    assert not failed.value.responded  # nothing reached the upstream: it may be sent again
    assert failed.value.detail == "upstream closed"
    conn.finish()
    assert (pool.open, pool.idle) == (0, 0)


async def test_an_interim_response_leaves_nothing_of_itself_in_the_final_one(server, pools):
    # The 103's Content-Length and reason are its own: the final answer is chunked, "Fine".
    pool = pools()
    conn = await acquire(pool)
    conn.begin(b"GET /interim-chunked HTTP/1.1\r\nHost: t\r\n\r\n", head_only=False)
    head = await conn.read_head(WAIT_S)
    assert (head.status, head.reason) == (200, b"Fine")
    assert head.headers == [(b"Transfer-Encoding", b"chunked")]
    assert not head.length_framed
    assert await conn.read_body(WAIT_S) == b"ok"
    assert await conn.read_body(WAIT_S) == b""
    assert conn.reusable
    conn.finish()
