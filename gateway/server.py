"""The client-facing HTTP/1.1 server: one ``asyncio.Protocol`` per connection, parsed by llhttp.

The gateway owns every byte here.  httptools (llhttp in strict mode) splits the stream into
requests; this module decides the rest:

- framing: a request's Content-Length or chunked body, nothing else (a transfer coding other
  than ``chunked`` is refused with 501, CL with TE, a repeated Content-Length, bare LF and
  obs-fold are refused by llhttp); HTTP/1.0 and 1.1 only (anything else gets 505);
- requests pipelined on one connection are answered in order, one at a time; reading stops
  while a few wait (so a client cannot queue without bound), and nothing after a refused
  request is read;
- a malformed request gets the gateway's fixed 400 (or 431, 501, 505) body, is counted under
  its reason, logged as one line, and its connection closed;
- a connection with no complete request head for ``limits.client_idle_timeout_s`` (at its start,
  between requests, or while its head trickles in) is closed;
- at most ``limits.max_connections`` client connections; one more is answered 503 and closed;
- the response carries only what the handler set, with the gateway's framing and ``Connection``.

The handler (``Observer`` around the proxy or forward-auth handler) is called once per request
with an ``HttpRequest`` and either returns an ``Answer`` or writes a streamed response itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Limits
from .errors import ClientGone
from .headers import CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING
from .logs import REQUEST_LOGGER, kv
from .metrics import UNMATCHED_ROUTE, GatewayMetrics
from .reasons import REASON_SPECS, Reason
from .record import RequestRecord
from .tunnel import Tunnel, TunnelEnd

log = logging.getLogger(REQUEST_LOGGER)

# Pipelined requests waiting behind the one being served before reading pauses.
_MAX_PIPELINED: Final = 8
# Unread request body bytes buffered before reading pauses.
_BODY_HIGH_WATER: Final = 256 * 1024
# SO_LINGER on, 0 s: closing the socket resets the connection (RST) and drops what is unsent.
_RESET: Final = struct.pack("ii", 1, 0)
_PARSER_DETAIL: Final = re.compile(r"[^A-Za-z0-9 `-]")


def compiled() -> bool:
    """Whether this build runs the request path compiled by mypyc (``GATEWAY_COMPILE=1``,
    setup.py): this module is then an extension module, not its ``.py`` source."""
    return not __file__.endswith(".py")


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete response the gateway itself gives: status, headers and a fixed body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


Handler = Callable[["HttpRequest"], Awaitable[None]]


def local_authority(sockname: object) -> str:
    """The address a connection reached, as an authority (``host:port``, an IPv6 host in
    brackets): the ``X-Forwarded-Host`` of an HTTP/1.0 request without a Host.  ``""`` for a
    socket without one (a Unix socket)."""
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ""


class RequestBody:
    """A request body as it arrives; reading it resumes a connection paused by its size."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "complete")

    def __init__(self, conn: HttpConnection | None = None) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _BODY_HIGH_WATER and self._conn is not None:
            self._conn.pause_for_body(True)
        self._wake()

    def feed_eof(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    async def readany(self) -> bytes:
        """The next part of the body; ``b""`` once it is complete; ``ClientGone`` if cut off."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.pause_for_body(False)
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class HttpRequest:
    """One parsed request head, its body stream, and the way back to its client."""

    __slots__ = (
        "_chunked_out",
        "_close_delimited",
        "_closing",
        "_conn",
        "_pending",
        "body",
        "chunked",
        "content_length",
        "early",
        "expect",
        "headers",
        "host",
        "keep_alive",
        "method",
        "record",
        "remote",
        "response_started",
        "scheme",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: CIMultiDictProxy[str],
        *,
        version: str = "1.1",
        remote: str | None = None,
        scheme: str = "http",
        host: str | None = None,
        content_length: int | None = None,
        chunked: bool = False,
        keep_alive: bool = True,
        conn: HttpConnection | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.version = version
        self.remote = remote
        self.scheme = scheme
        self.host = headers.get(HOST, "") if host is None else host
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect = headers.get(EXPECT)
        self.upgrade = False
        self.body: RequestBody | None = (
            RequestBody(conn) if chunked or (content_length or 0) > 0 else None
        )
        self.record = RequestRecord()
        self.response_started = False
        self.early = b""  # an upgrade request: bytes the client sent after its head
        self._conn = conn
        self._closing = False
        self._chunked_out = False
        self._close_delimited = False  # the response body ends where the connection does
        self._pending = b""  # a response head not yet written: it goes with the first body bytes

    @property
    def body_exists(self) -> bool:
        return self.body is not None

    def peer_certificate(self) -> bytes | None:
        """The DER of the client certificate this TLS connection verified, if any."""
        conn = self._conn
        transport = conn.transport if conn is not None else None
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None
        der: bytes | None = ssl_object.getpeercert(binary_form=True)
        return der

    @property
    def client_gone(self) -> bool:
        conn = self._conn
        return conn is None or conn.transport is None or conn.transport.is_closing()

    @property
    def connection(self) -> HttpConnection:
        assert self._conn is not None, "a request built without a connection cannot answer"
        return self._conn

    # --- answering --------------------------------------------------------------------------
    def send_continue(self) -> None:
        """``100 Continue``: the client may send the body it announced with ``Expect``."""
        self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def respond(self, answer: Answer) -> None:
        """Send a complete response with a fixed body (the gateway's own: it carries a Date)."""
        block = b"Date: %b\r\n%b" % (http_date(), _fixed_lines(answer))
        head = self._head(answer.status, _REASONS.get(answer.status, b""), block)
        # A HEAD is told the length of the body it would have had, and gets none.
        body = b"" if self.method == "HEAD" else answer.body
        self.connection.write(head + body if body else head)
        self.response_started = True

    def start_response(
        self, status: int, reason: bytes, block: bytes, *, bodiless: bool, length_framed: bool
    ) -> None:
        """Send a streamed response's head (``block``: its header lines, each ending in CRLF):
        ``bodiless`` (HEAD, 204, 304), ``length_framed`` (a Content-Length in ``block``), else
        chunked to an HTTP/1.1 client and close-delimited to an HTTP/1.0 one."""
        if not bodiless and not length_framed:
            if self.version == "1.1":
                block += b"Transfer-Encoding: chunked\r\n"
                self._chunked_out = True
            else:
                self._closing = True
                self._close_delimited = True
        # Written with the first body bytes (one send instead of two for a small response).
        self._pending = self._head(status, reason, block)
        self.response_started = True

    def open_tunnel(self, reason: bytes, block: bytes, tunnel: Tunnel) -> None:
        """Send the ``101`` head (``block``: its header lines) and join the client connection
        to ``tunnel``."""
        conn = self.connection
        conn.write(b"HTTP/1.1 101 %b\r\n%b\r\n" % (reason or b"Switching Protocols", block))
        self.response_started = True
        conn.tunnel = tunnel
        conn._upgrading = None
        if conn.transport is not None:
            conn.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if data:
            out = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked_out else data
            if self._pending:
                out = self._pending + out
                self._pending = b""
            self.connection.write(out)

    @property
    def writing_paused(self) -> bool:
        return self.connection.writing_paused

    async def drain(self) -> None:
        """Wait until the client has taken what was written; ``ClientGone`` if it left."""
        await self.connection.drain()

    def end_response(self) -> None:
        """The response is complete: whatever is still unwritten goes out now."""
        out = self._pending + b"0\r\n\r\n" if self._chunked_out else self._pending
        self._pending = b""
        if out:
            self.connection.write(out)

    def close_connection(self, *, abort: bool = False) -> None:
        """Cut the client's connection: a started response must not look complete.  A head
        not yet written is sent first, so the client sees the cut after it; but a body that
        ends with the connection (close-delimited, to an HTTP/1.0 client) would look complete
        after an orderly close, so its connection is reset instead (``abort``)."""
        conn = self.connection
        abort = abort or self._close_delimited
        if self._pending and not abort and not self.client_gone:
            conn.write(self._pending)
        self._pending = b""
        conn.close(abort=abort)

    @property
    def closes_after(self) -> bool:
        """The connection ends with this response."""
        return self._closing or not self.keep_alive or self.connection.closing

    def _head(self, status: int, reason: bytes, block: bytes) -> bytes:
        conn = self.connection
        if self.body is not None and not self.body.complete:
            # Answered before the body arrived (a refusal, or the upstream's early answer):
            # the rest of the body is not read, so the connection cannot carry another request.
            self._closing = True
        if self.closes_after:
            conn.closing = True
            return b"HTTP/1.1 %d %b\r\n%bConnection: close\r\n\r\n" % (status, reason, block)
        return b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, block)


_REASONS: Final = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def _fixed_lines(answer: Answer) -> bytes:
    """The header lines of one of the gateway's own answers: its headers, its Content-Length.
    UTF-8, as the upstream gets the same claim headers in proxy mode (proxy.py): a forward-auth
    caller gets a claim's bytes, not Latin-1 with ``?`` for every other character."""
    text = "".join(f"{name}: {value}\r\n" for name, value in answer.headers)
    return text.encode("utf-8", "surrogateescape") + b"Content-Length: %d\r\n" % len(answer.body)


_date_second = 0
_date_text = b""


def http_date() -> bytes:
    """The current time as an HTTP date, formatted at most once a second."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_text = formatdate(now, usegmt=True).encode("ascii")
    return _date_text


class HttpConnection(asyncio.Protocol):
    """One client connection: parses its requests and serves them one after another."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        limits = server.limits()
        self.keepalive_timeout = limits.client_idle_timeout_s
        self._max_line = limits.max_header_bytes
        self._max_headers = limits.max_headers
        # llhttp buffers a header line until it ends; the whole head is bounded here.
        self._max_head = max(4 * limits.max_header_bytes, 65536)
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[HttpRequest] = deque()
        self._parsing: HttpRequest | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] | None = []
        self._head_bytes = 0
        self._in_head = True
        self._refusal: tuple[Reason, str] | None = None
        self._stopped = False  # nothing more is parsed
        self.closing = False  # no request after the current one
        self.in_flight: HttpRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self.writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_by_body = False
        self._paused_by_queue = False
        self._reading_paused = False
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.remote: str | None = None
        self.tunnel: Tunnel | None = None  # set once an upgrade's 101 joined it to an upstream
        self._upgrading: HttpRequest | None = None
        self.scheme = "http"
        self._local = ""

    # --- transport callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TLS transport is not an asyncio.Transport subclass, but behaves as one.)
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self._local = local_authority(transport.get_extra_info("sockname"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        if not self._server.accept(self):
            return
        self._idle_since = self._loop.time()
        self._timer = self._loop.call_at(
            self._idle_since + self.keepalive_timeout, self._check_idle
        )

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self._upgrading is not None:
            # Sent after an upgrade request's head, before the upstream's 101: kept for the
            # tunnel (bounded: reading pauses).
            self._upgrading.early += data
            if len(self._upgrading.early) > _BODY_HIGH_WATER and self.transport is not None:
                self.transport.pause_reading()
            return
        if self._stopped:
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Upgrade and CONNECT requests: the head was delivered; what follows is not HTTP.
            # The requests pipelined before it are answered as usual; the connection ends
            # with the upgrade request's answer, unless that is a 101.
            self._stopped = True
            if self._refusal is None and self._queue:
                request = self._queue[-1]
                request.upgrade = True
                request._closing = True
                request.early = data[upgrade.args[0] :] if upgrade.args else b""
                self._upgrading = request
            else:
                self.closing = True
        except httptools.HttpParserCallbackError:
            raise  # a bug in a callback below, not the client's fault
        except httptools.HttpParserError as exc:
            detail = _PARSER_DETAIL.sub("", str(exc))[:80] or type(exc).__name__
            self._refuse(Reason.REQUEST_MALFORMED, detail)
        if self._refusal is None and self._in_head and self._head_bytes > self._max_head:
            self._refuse(Reason.HEADERS_TOO_LARGE, "request head too large")
        if self._refusal is not None:
            self._stopped = True
            self._refused()
        self._wake()

    def eof_received(self) -> bool:
        # A client that half-closes is treated as gone (as aiohttp did): the request in flight
        # is cancelled, freeing its admission slot and upstream connection at once, rather
        # than held for an answer nobody may read.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stopped = True
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gone = ClientGone("the client closed the connection")
        for request in (self._parsing, *self._queue):
            if request is not None and request.body is not None:
                request.body.fail(gone)
        self._queue.clear()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(gone)
        if self.tunnel is not None:
            self.tunnel.lost(TunnelEnd.CLIENT_CLOSED)  # the tunnel's normal end
        elif self._task is not None and not self._task.done():
            # A client that leaves frees its admission slot and upstream connection at once.
            self._task.cancel()
        self.transport = None
        self._server.forget(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.tunnel is not None:
            self.tunnel.client_writable(False)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.client_writable(True)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # --- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_line:
            self._refuse(Reason.HEADERS_TOO_LARGE, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if headers is None:
            return  # a trailer: not forwarded
        if len(name) + len(value) + 2 > self._max_line:
            self._refuse(Reason.HEADERS_TOO_LARGE, "header line too long")
        elif len(headers) >= self._max_headers:
            self._refuse(Reason.HEADERS_TOO_LARGE, "too many headers")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        raw = self._headers
        assert raw is not None
        self._headers = None
        self._in_head = False
        if self._refusal is not None:
            return
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._refuse(Reason.VERSION_NOT_SUPPORTED, f"HTTP/{version}")
            return
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            self._refuse(Reason.REQUEST_REJECTED, "CONNECT")
            return
        headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw]
        )
        hosts = headers.getall(HOST, ())
        if len(hosts) > 1 or (not hosts and version == "1.1"):
            self._refuse(Reason.REQUEST_MALFORMED, "not exactly one Host")
            return
        chunked = False
        codings = headers.getall(TRANSFER_ENCODING, ())
        if codings:
            if version != "1.1":
                self._refuse(Reason.REQUEST_MALFORMED, "Transfer-Encoding on HTTP/1.0")
                return
            if ",".join(codings).strip().lower() != "chunked":
                if codings[-1].rsplit(",", 1)[-1].strip().lower() != "chunked":
                    # Chunked is not the final coding: the body has no determinable length
                    # (RFC 9112 §6.3: 400), which llhttp refuses right after this callback.
                    return
                self._refuse(Reason.TRANSFER_CODING_NOT_SUPPORTED, "transfer coding")
                return
            chunked = True
        length = headers.get(CONTENT_LENGTH)
        request = HttpRequest(
            method,
            self._url.decode("utf-8", "surrogateescape"),
            CIMultiDictProxy(headers),
            version=version,
            remote=self.remote,
            scheme=self.scheme,
            host=hosts[0] if hosts else self._local,
            content_length=int(length) if length is not None else None,
            chunked=chunked,
            keep_alive=parser.should_keep_alive(),
            conn=self,
        )
        self._parsing = request
        self._queue.append(request)
        self._idle_since = None
        if len(self._queue) > _MAX_PIPELINED and not self._paused_by_queue:
            self._paused_by_queue = True
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None and request.body is not None and not request.response_started:
            request.body.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        self._in_head = True
        self._head_bytes = 0
        if request is not None and request.body is not None:
            request.body.feed_eof()

    # --- serving ----------------------------------------------------------------------------
    def _refuse(self, reason: Reason, detail: str) -> None:
        if self._refusal is None:
            self._refusal = (reason, detail)

    def _refused(self) -> None:
        """Nothing after a malformed request is read: its refusal is queued behind the requests
        before it, and the connection closes after it."""
        request = self._parsing
        if request is not None:
            # Its head was fine but its body was not: it is not served at all.
            with_body = request.body
            if request in self._queue and request is not self.in_flight:
                self._queue.remove(request)
            elif with_body is not None:
                with_body.fail(ClientGone("malformed request body", Reason.REQUEST_MALFORMED))
            self._parsing = None
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    def _wake(self) -> None:
        if self._queue or self._refusal is not None:
            self._ensure_task()
            waiter = self._wakeup
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _serve(self) -> None:
        server = self._server
        try:
            while True:
                if self._queue:
                    request = self._queue.popleft()
                    if self._paused_by_queue and len(self._queue) <= _MAX_PIPELINED // 2:
                        self._paused_by_queue = False
                        self._update_reading()
                    self.in_flight = request
                    server.requests_count += 1
                    try:
                        await server.handler(request)
                    finally:
                        self.in_flight = None
                    if request.closes_after or not request.response_started:
                        self.close()
                        return
                    if not self._queue:
                        self._idle_since = self._loop.time()
                    continue
                if self._refusal is not None:
                    reason, detail = self._refusal
                    server.refuse_malformed(self, reason, detail)
                    self.close()
                    return
                if self.closing or self.transport is None:
                    self.close()
                    return
                self._wakeup = self._loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
        except asyncio.CancelledError:
            self.close(abort=True)
        finally:
            self._task = None

    def _check_idle(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        since = self._idle_since
        now = self._loop.time()
        if since is not None and now - since >= self.keepalive_timeout:
            self.close()
            return
        due = (since if since is not None else now) + self.keepalive_timeout
        self._timer = self._loop.call_at(due, self._check_idle)

    def pause_for_body(self, paused: bool) -> None:
        if paused != self._paused_by_body:
            self._paused_by_body = paused
            self._update_reading()

    def _update_reading(self) -> None:
        want = self._paused_by_body or self._paused_by_queue
        if want != self._reading_paused and self.transport is not None:
            self._reading_paused = want
            if want:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ClientGone("the client closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        while self.writing_paused:
            if self.transport is None:
                raise ClientGone("the client closed the connection")
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def close(self, *, abort: bool = False) -> None:
        """Close once what is written has gone out; or, ``abort``, reset the connection: what
        is unsent is dropped and the client sees an error, not an end that may look whole."""
        self.closing = True
        self._stopped = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                transport.abort()
            else:
                transport.close()

    def begin_shutdown(self) -> None:
        """Serve no more requests; an idle connection closes now, a busy one after its answer."""
        self.closing = True
        self._stopped = True
        if self.in_flight is None and not self._queue:
            self.close()
        else:
            self._wake()

    async def finish(self, grace_s: float) -> None:
        """Give the request in flight up to ``grace_s`` seconds, then cancel it and close."""
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=1)
        self.close()


class HttpServer:
    """The protocol factory of the proxy listener, its connections and their shutdown."""

    def __init__(
        self,
        handler: Handler,
        limits: Callable[[], Limits],
        metrics: GatewayMetrics,
        answers: Callable[[Reason], Answer],
    ) -> None:
        self.handler = handler
        self.limits = limits
        self._metrics = metrics
        self._answers = answers
        self.loop = asyncio.get_running_loop()
        self._connections: dict[HttpConnection, None] = {}
        self._shutting_down = False
        self.requests_count = 0  # requests handed to the handler so far

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    @property
    def connections(self) -> list[HttpConnection]:
        return list(self._connections)

    def accept(self, conn: HttpConnection) -> bool:
        """Take a new connection unless at the cap (then it gets 503 and is closed)."""
        if self._shutting_down:
            conn.close()
            return False
        if len(self._connections) >= self.limits().max_connections:
            self._answer_and_close(conn, Reason.TOO_MANY_CONNECTIONS, "connection cap")
            return False
        self._connections[conn] = None
        return True

    def forget(self, conn: HttpConnection) -> None:
        self._connections.pop(conn, None)

    def refuse_malformed(self, conn: HttpConnection, reason: Reason, detail: str) -> None:
        self._answer_and_close(conn, reason, detail)

    def _answer_and_close(self, conn: HttpConnection, reason: Reason, detail: str) -> None:
        """A request (or connection) refused before any handler saw it: the fixed answer of
        ``reason``, counted and logged once; client bytes never reach the log."""
        self._metrics.observe_request(UNMATCHED_ROUTE, reason, 0.0)
        spec = REASON_SPECS[reason]
        if log.isEnabledFor(spec.log_level):
            log.log(
                spec.log_level,
                kv(event="request", route=UNMATCHED_ROUTE, status=spec.status,
                   reason=reason.value, outcome=spec.outcome.value, granted="false",
                   peer=conn.remote, detail=detail),
            )  # fmt: skip
        answer = self._answers(reason)
        head = b"HTTP/1.1 %d %b\r\n%bConnection: close\r\n\r\n" % (
            answer.status,
            _REASONS.get(answer.status, b""),
            _fixed_lines(answer),
        )
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(head + answer.body)
        conn.close()

    # The shutdown protocol of aiohttp's runner (``BaseRunner.cleanup``).
    def pre_shutdown(self) -> None:
        self._shutting_down = True
        for conn in list(self._connections):
            conn.begin_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        conns = list(self._connections)
        if conns:
            await asyncio.gather(*(c.finish(timeout or 0.0) for c in conns))
        self._connections.clear()
