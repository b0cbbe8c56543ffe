"""The upstream side of the hop: keep-alive HTTP/1.1 connections per origin, parsed by llhttp.

Each origin (scheme, host, port) has one ``UpstreamPool``, shared by every route that names it
and surviving reloads, so a reload never doubles an upstream's connection bound.  A pool opens
at most ``max_connections``; a request that finds none free waits at most ``pool_timeout_s``
and is then refused (503 ``upstream_overloaded``) instead of hanging every route behind it.

An ``UpstreamConnection`` carries one exchange at a time (no upstream pipelining).  The
gateway writes the request head itself, so nothing reaches the upstream that the gateway did
not decide (no ``Accept``, ``User-Agent`` or ``Accept-Encoding`` of a client library).
Responses are parsed by httptools (llhttp, strict mode: its lenient flags are never set);
what llhttp cannot know is handled here: a response to ``HEAD`` has no body whatever its
``Content-Length``, interim ``1xx`` responses are skipped, and a body without framing ends
when the upstream closes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final, cast

import httptools

from .config import Upstream, UpstreamTls
from .errors import Rejection
from .reasons import Reason
from .tls import client_tls_context
from .tunnel import Tunnel, TunnelEnd

# Reading pauses when this much response body waits for a slow client, and resumes below half.
_HIGH_WATER: Final = 256 * 1024
# An idle pooled connection older than this is closed rather than reused: upstream servers
# close idle keep-alive connections after their own timeout (nginx 75 s, Node 5 s, Go 90 s),
# and a request sent just as they do fails.
DEFAULT_IDLE_S: Final = 4.0


class ResponseHead:
    """The status line and headers of an upstream response, as received (bytes, not decoded:
    they go on to the client unchanged).  A plain class, not a frozen dataclass: one is made
    per exchange, and a dataclass's generated ``__init__`` is interpreted even when this module
    is compiled (setup.py); ``Final`` keeps the fields read-only to mypy."""

    __slots__ = ("connection", "headers", "keep_alive", "length_framed", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        length_framed: bool,
        connection: tuple[bytes, ...],
    ) -> None:
        self.status: Final = status
        self.reason: Final = reason
        self.headers: Final = headers
        self.keep_alive: Final = keep_alive
        self.length_framed: Final = length_framed  # a Content-Length header is among ``headers``
        self.connection: Final = connection  # the values of its Connection headers


class UpstreamClosed(Exception):
    """The connection failed; ``responded`` says whether any response byte had arrived."""

    def __init__(self, detail: str, *, responded: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.responded = responded


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream, carrying one request/response exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._status_text = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing = 0  # bit 1: Content-Length, bit 2: Transfer-Encoding
        self._connection: list[bytes] = []  # the values of the response's Connection headers
        self._parser_reusable = False  # the parser stands at a message boundary
        self._idle_parser: httptools.HttpResponseParser | None = None  # kept for the next
        self._head: ResponseHead | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._until_close = False
        self._complete = False
        self._failure: UpstreamClosed | None = None
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self.responded = False  # a response byte arrived in this exchange
        self.spoiled = False  # the request was not sent whole: the framing is lost
        self.on_answer: Callable[[], None] | None = None  # called once the response head is in
        self.reused = False  # the connection carried an exchange before this one
        self.idle_since = 0.0
        self._upgrade = False  # this exchange asks for an upgrade: a 101 is its final answer
        self.upgraded = False  # the upstream answered 101: what follows is the tunnel's
        self.early = b""  # tunnel bytes that arrived before the tunnel opened
        self.tunnel: Tunnel | None = None

    # --- transport callbacks --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        if self.upgraded:
            self.early += data
            return
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for (a body after a HEAD answer, or a second response):
            # the connection can no longer be trusted to frame the next exchange.
            self._fail("unsolicited upstream bytes")
            return
        self.responded = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.upgraded:
                self.early = data[upgrade.args[0] :]  # httptools: the offset after the head
            else:
                self._fail("upgrade not requested")
        except httptools.HttpParserError:
            self._fail("malformed upstream response")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.tunnel is not None:
            self.tunnel.lost(TunnelEnd.UPSTREAM_CLOSED)
        if self._parser is not None and not self._complete:
            if self._until_close and self._failure is None and exc is None:
                self._complete = True  # a body delimited by the connection's close
                self._wake_body()
            else:
                self._fail(type(exc).__name__ if exc is not None else "upstream closed")
        self._pool.lost(self)
        self._wake_drain()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.tunnel is not None:
            self.tunnel.upstream_writable(False)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.tunnel is not None:
            self.tunnel.upstream_writable(True)
        self._wake_drain()

    # --- parser callbacks -----------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self._status_text += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (10, 14, 17):
            key = name.lower()
            if key == b"content-length":
                self._framing |= 1
            elif key == b"transfer-encoding":
                self._framing |= 2
            elif key == b"connection":
                self._connection.append(value)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status == 101 and self._upgrade:
            # The upgrade was accepted: this is the final answer, and the tunnel follows.
            self.upgraded = True
        elif 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            self._status_text = b""
            self._headers = []
            self._framing = 0
            self._connection = []
            return
        head = ResponseHead(
            status,
            self._status_text,
            self._headers,
            self._parser.should_keep_alive(),
            bool(self._framing & 1),
            tuple(self._connection),
        )
        self._head = head
        self._wake_drain()  # an upload waiting for the upstream to read stops: it answered
        if self.on_answer is not None:
            self.on_answer()
        if self._head_only or status in (101, 204, 304):
            self._complete = True
        else:
            self._until_close = not self._framing & 3
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._fail("body after the end of the response")
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of an interim response
        # llhttp read the whole message itself: the same parser can read the next exchange's
        # response.  (It never gets here for a HEAD's answer with a length, whose body it still
        # expects: the gateway ended that exchange at its head, so the parser is not kept.)
        self._parser_reusable = True
        self._complete = True
        self._wake_body()

    # --- the exchange -----------------------------------------------------------------------
    def begin(self, head: bytes, *, head_only: bool, upgrade: bool = False) -> None:
        """Start an exchange: send the request head (and whatever body bytes it carries)."""
        kept, self._idle_parser = self._idle_parser, None
        # A kept parser stands at a message boundary; llhttp knows nothing of HEAD either way.
        self._parser = kept if kept is not None else httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._upgrade = upgrade
        self._status_text = b""
        self._headers = []
        self._framing = 0
        self._connection = []
        self._head = None
        self._chunks.clear()
        self._buffered = 0
        self._until_close = False
        self._complete = False
        self.responded = False
        self.spoiled = False
        if self.transport is None:
            self._fail("upstream closed")  # read_head raises it: nothing was sent
            return
        self.transport.write(head)

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self, wait_s: float) -> None:
        """Wait until the upstream has taken what was written (at most ``wait_s`` seconds)."""
        while self._writing_paused and self._failure is None and self._head is None:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._within(self._drain_waiter, wait_s)
            finally:
                self._drain_waiter = None
        if self._failure is not None:
            raise self._failure

    async def read_head(self, wait_s: float) -> ResponseHead:
        """The final response head; ``TimeoutError`` after ``wait_s`` seconds without it."""
        if self._head is None and self._failure is None:
            self._head_waiter = self._loop.create_future()
            try:
                await self._within(self._head_waiter, wait_s)
            finally:
                self._head_waiter = None
        if self._head is not None:
            return self._head
        assert self._failure is not None
        raise self._failure

    async def read_body(self, wait_s: float) -> bytes:
        """The next piece of the response body; ``b""`` once it is complete.  ``TimeoutError``
        when ``wait_s`` seconds pass with nothing, ``UpstreamClosed`` when the upstream cuts it."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._failure is not None:
                raise self._failure
            self._body_waiter = self._loop.create_future()
            try:
                await self._within(self._body_waiter, wait_s)
            finally:
                self._body_waiter = None
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def _within(self, waiter: asyncio.Future[None], wait_s: float) -> None:
        """Wait for ``waiter``; ``TimeoutError`` after ``wait_s`` seconds.  A bare timer handle
        per wait: ``asyncio.timeout`` costs several times more, on every exchange."""
        handle = self._loop.call_later(wait_s, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly and the upstream keeps the connection open (never after
        a ``101``: the connection then belongs to the tunnel)."""
        return (
            self._complete
            and not self.spoiled
            and not self.upgraded
            and self._failure is None
            and not self._until_close
            and self._head is not None
            and self._head.keep_alive
            and not self.closed
        )

    def finish(self) -> None:
        """End the exchange: back to the pool when reusable, else closed."""
        if self.reusable:
            # Idle: any byte the upstream sends now is unsolicited (no parser to take it).
            self._idle_parser = self._parser if self._parser_reusable else None
            self._parser = None
        self._parser_reusable = False
        self._pool.release(self)

    def discard(self) -> None:
        """End an exchange that broke off (its request not sent whole, or its response not read
        whole): the connection is closed, never pooled."""
        self.abort()
        self.finish()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- internals ------------------------------------------------------------------------
    def _fail(self, detail: str) -> None:
        if self._failure is None:
            self._failure = UpstreamClosed(detail, responded=self.responded)
        if self.transport is not None:
            self.transport.abort()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(None)
        self._wake_body()
        self._wake_drain()

    def _wake_body(self) -> None:
        if self._body_waiter is not None and not self._body_waiter.done():
            self._body_waiter.set_result(None)

    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)


class UpstreamPool:
    """At most ``max_connections`` keep-alive connections to one origin, reused newest first."""

    def __init__(
        self,
        origin: Upstream,
        max_connections: int,
        *,
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.max_connections = max_connections
        # https: the route's CA bundle, server name and client certificate (else the system store).
        self._ssl = client_tls_context(origin.tls) if origin.scheme == "https" else None
        self._server_name = (
            origin.tls.server_name if origin.tls is not None and origin.tls.server_name else None
        ) or origin.host
        self._idle_s = idle_s
        self._idle: list[UpstreamConnection] = []
        self._open = 0  # connections open or being opened, idle ones included
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._closed = False

    @property
    def open(self) -> int:
        return self._open

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(
        self, *, connect_timeout: float, pool_timeout: float, fresh: bool
    ) -> UpstreamConnection:
        """A connection ready for an exchange: a pooled idle one (unless ``fresh``), a new one
        while under the bound, or the first one released within ``pool_timeout``."""
        conn = None if fresh else self._take_idle()
        if conn is not None:
            return conn
        if self._open >= self.max_connections and fresh:
            self._close_one_idle()
        if self._open < self.max_connections:
            self._open += 1
            return await self._connect(connect_timeout)
        waiter: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(pool_timeout):
                handed = await waiter
        except TimeoutError:
            if not waiter.done() or waiter.cancelled():
                self._forget(waiter)
                raise Rejection(
                    Reason.UPSTREAM_OVERLOADED, "no upstream connection free in time"
                ) from None
            handed = waiter.result()  # handed over in the very turn the wait ran out: use it
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())  # handed over just as we were cancelled
            else:
                self._forget(waiter)
            raise
        if handed is not None:
            return handed
        # A slot was handed over (a connection closed): open a new one in it.
        return await self._connect(connect_timeout)

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection after its exchange: pooled if reusable, else closed."""
        if not conn.reusable or self._closed:
            conn.abort()
            return  # lost() gives its slot back
        conn.reused = True
        conn.idle_since = self.loop.time()
        self._pass_on(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """``conn`` closed (either side): its slot is free."""
        if conn in self._idle:
            self._idle.remove(conn)
        self._open -= 1
        self._pass_on(None)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    Rejection(Reason.UPSTREAM_UNAVAILABLE, "the gateway is shutting down")
                )

    # --- internals ------------------------------------------------------------------------
    def _take_idle(self) -> UpstreamConnection | None:
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_s:
                return conn
            conn.close()  # too old to trust; lost() frees its slot
        return None

    def _forget(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _give_back(self, handed: UpstreamConnection | None) -> None:
        """Return what a waiter was handed but will not use: a connection, or a counted slot."""
        if handed is None:
            self._open -= 1
        self._pass_on(handed)

    def _close_one_idle(self) -> None:
        if self._idle:
            self._idle.pop(0).close()

    def _pass_on(self, conn: UpstreamConnection | None) -> None:
        """Hand ``conn`` (or, for None, a free slot) to the first live waiter, else keep it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                if conn is None:
                    self._open += 1  # the waiter opens a connection in this slot
                return
        if conn is not None:
            self._idle.append(conn)

    async def _connect(self, wait_s: float) -> UpstreamConnection:
        """Open a connection in a slot already counted in ``_open``."""
        origin = self.origin
        try:
            async with asyncio.timeout(wait_s):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=self._server_name if self._ssl is not None else None,
                )
        except BaseException:
            self._open -= 1
            self._pass_on(None)
            raise
        return conn


class UpstreamPools:
    """Every origin's pool, created on first use; the gateway keeps one for its lifetime."""

    def __init__(self, max_connections: int) -> None:
        self._max = max_connections
        self._pools: dict[tuple[str, str, int, UpstreamTls | None], UpstreamPool] = {}
        self.closed = False

    def pool(self, origin: Upstream) -> UpstreamPool:
        # Routes naming one origin with the same TLS settings share its connections.
        key = (origin.scheme, origin.host, origin.port, origin.tls)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = UpstreamPool(origin, self._max)
        return pool

    def pools(self) -> list[UpstreamPool]:
        return list(self._pools.values())

    @property
    def in_use(self) -> int:
        """Connections carrying an exchange (or being opened for one) now, over every origin."""
        return sum(pool.open - pool.idle for pool in self._pools.values())

    async def close(self) -> None:
        self.closed = True
        for pool in self._pools.values():
            await pool.close()
