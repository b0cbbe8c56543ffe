"""The upstream hop: header hygiene, X-Forwarded-*, streaming both ways, and upstream errors as reasons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .admission import Admission
from .config import GatewayConfig, RouteConfig, Upstream
from .errors import ClientGone, Rejection
from .extractor import cookie_name, query_name
from .headers import (
    CLIENT_ORIGIN_HEADERS,
    CONNECTION,
    FORWARDED_PREFIX,
    METHOD_OVERRIDE_HEADERS,
    PROXY_OWN_HEADERS,
    REQUEST_ID_BYTES,
    REQUEST_ID_HEADER,
    RESPONSE_DROPPED,
    TRACE_CONTEXT_HEADERS,
    TRACEPARENT,
    TRACESTATE,
    UPGRADE,
    X_FORWARDED_FOR,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
    Carriers,
    connection_options,
    header_key,
    headers_to_strip,
    token_carriers,
)
from .metrics import GatewayMetrics
from .reasons import Reason
from .routing import rewritten, valid_host
from .server import HttpRequest, RequestBody
from .tunnel import Tunnel
from .upstream import ResponseHead, UpstreamClosed, UpstreamConnection, UpstreamPool, UpstreamPools

# RFC 9110 §9.2.2: a request of these methods may be sent again when a pooled connection turns
# out to have been closed by the upstream before it answered.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _without_cookies(header: str, names: frozenset[str]) -> str:
    pairs = [p.strip() for p in header.split(";")]
    return "; ".join(p for p in pairs if p and cookie_name(p) not in names)


def _without_params(query: str, names: frozenset[str]) -> str:
    return "&".join(pair for pair in query.split("&") if pair and query_name(pair) not in names)


class _BodyStopped(Exception):
    """Raised inside the upload stream to abort the upstream request; ``reason`` says why."""

    def __init__(self, reason: Reason) -> None:
        self.reason = reason
        super().__init__(reason.value)


class _BodyMeter:
    """Streams a request body upstream, stopping it once it passes ``limit`` bytes (0: no
    limit), when the client sends nothing for ``gap_s``, or when the whole body takes longer
    than ``deadline_s`` (a stalled or dripping upload must not hold an upstream connection and
    an admission slot for ever: a byte every ``gap_s`` would defeat the gap alone).  The
    deadline runs from the first read.  (A method, not an async generator: mypyc compiles no
    async generator.)"""

    __slots__ = ("_content", "_deadline", "_deadline_s", "_gap_s", "_limit", "_seen")

    def __init__(self, content: RequestBody, limit: int, gap_s: float, deadline_s: float) -> None:
        self._content = content
        self._limit = limit
        self._gap_s = gap_s
        self._deadline_s = deadline_s
        self._deadline: float | None = None
        self._seen = 0

    async def next_chunk(self) -> bytes:
        """The next part of the body; ``b""`` once it is complete."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._deadline is None:
            self._deadline = now + self._deadline_s
        try:
            async with asyncio.timeout_at(min(now + self._gap_s, self._deadline)):
                chunk = await self._content.readany()
        except TimeoutError:
            raise _BodyStopped(Reason.CLIENT_TIMEOUT) from None
        self._seen += len(chunk)
        if self._limit and self._seen > self._limit:
            raise _BodyStopped(Reason.PAYLOAD_TOO_LARGE)
        return chunk


def _host_header(upstream: Upstream) -> str:
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    default = 443 if upstream.scheme == "https" else 80
    return host if upstream.port == default else f"{host}:{upstream.port}"


# How many peers, header names and Connection values a forwarder remembers its answers for.
_MEMO_LIMIT: Final = 1024


def request_head(
    method: str, target: str, host: str, headers: list[tuple[str, str]], framing: str
) -> bytes:
    """The request head the upstream receives, written by the gateway byte for byte."""
    parts = [method, " ", target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
    # One append per piece: compiled, a list append is a C call, where `+=` a tuple is not.
    for name, value in headers:
        parts.append(name)
        parts.append(": ")
        parts.append(value)
        parts.append("\r\n")
    if framing:
        parts.append(framing)
        parts.append("\r\n")
    parts.append("\r\n")
    text = "".join(parts)
    lines = len(headers) + (4 if framing else 3)  # request line, Host, headers, blank line
    if text.count("\n") != lines or text.count("\r") != lines:
        # Parsed client headers and checked claim values cannot hold CR or LF; never send one.
        raise Rejection(Reason.INTERNAL_ERROR, "line break in an upstream header")
    # Header values were decoded with surrogateescape: the client's bytes go on unchanged.
    return text.encode("utf-8", "surrogateescape")


def name_lengths(names: frozenset[bytes]) -> int:
    """A bit set of the lengths of ``names``: bit n is set when one of them is n bytes long
    (-1, every bit, when one is longer than 63: a small int either way)."""
    lengths = 0
    for name in names:
        if len(name) > 63:
            return -1
        lengths |= 1 << len(name)
    return lengths


_RESPONSE_DROPPED_LENGTHS: Final = name_lengths(RESPONSE_DROPPED)


def response_block(
    headers: list[tuple[bytes, bytes]], dropped: frozenset[bytes], lengths: int = -1
) -> bytes:
    """An upstream response's header lines as the client gets them (each ending in CRLF),
    without the names in ``dropped`` (lower-cased).  llhttp refused any CR or LF in them.
    ``lengths`` (``name_lengths(dropped)``; -1: every length) spares the lower-casing of a
    name no dropped name is as long as (Server, Date, Content-Length...)."""
    parts: list[bytes] = []
    for name, value in headers:
        if not (lengths >> len(name)) & 1 or name.lower() not in dropped:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class RouteHop:
    """One proxy route compiled at load: everything its hop needs, so a request costs one
    lookup (by route id) instead of one per setting."""

    carriers: Carriers
    strip: frozenset[str]  # names never copied upstream from a trusted proxy
    strip_untrusted: frozenset[str]  # ... and from anyone else
    host: str  # the upstream's Host header
    pool: UpstreamPool
    admission: Admission


class Forwarder:
    """Sends an admitted request upstream and streams the answer back."""

    def __init__(
        self,
        config: GatewayConfig,
        pools: UpstreamPools,
        metrics: GatewayMetrics,
        admissions: Mapping[str, Admission] | None = None,
    ) -> None:
        self._metrics = metrics
        defaults = config.upstream_defaults
        self._connect_timeout = defaults.connect_timeout_s
        self._read_timeout = defaults.timeout_s
        self._pool_timeout = defaults.pool_timeout_s
        self._body_gap_s = config.limits.client_body_timeout_s
        self._body_deadline_s = config.limits.client_body_deadline_s
        self._write_timeout_s = config.limits.client_write_timeout_s
        self._tunnel_idle_s = config.limits.tunnel_idle_timeout_s
        self._tunnel_max_s = config.limits.tunnel_max_duration_s
        admission = dict(admissions) if admissions is not None else admissions_for(config)
        # Per route: every name never copied upstream, so a request needs one set lookup
        # per header (a Connection header adds the names it lists).
        # The client's trace context is replaced by the gateway's (gateway/tracing.py).
        base = (
            headers_to_strip(config.owned_headers, ())
            | PROXY_OWN_HEADERS
            | METHOD_OVERRIDE_HEADERS
            | TRACE_CONTEXT_HEADERS
        )
        # From a peer that is not a trusted proxy, also every name that claims to say who the
        # client is or what it asked for (X-Forwarded-* goes by prefix, in upstream_headers).
        untrusted = CLIENT_ORIGIN_HEADERS | config.strip_untrusted_headers
        if config.client_cert_header is not None:
            # Only a trusted proxy may say which certificate the client showed.
            untrusted = untrusted | {header_key(config.client_cert_header.name)}
        self._hops: dict[str, RouteHop] = {}
        for route in config.routes:
            # Proxy mode (the only one with a forwarder): the config requires every upstream.
            assert route.upstream is not None
            carriers = token_carriers(route)
            strip = base | carriers.headers
            self._hops[route.id] = RouteHop(
                carriers,
                strip,
                strip | untrusted,
                _host_header(route.upstream),
                pools.pool(route.upstream),
                admission[route.id],
            )
        self._trusts = config.trusts
        # Whether a peer is a trusted proxy, by address (a handful behind a load balancer): the
        # config's check parses the address on every call.  Bounded; past it, asked each time.
        self._trusted_peers: dict[str | None, bool] = {}
        # Each header name as header_key spells it: clients send the same few names.
        self._header_keys: dict[str, str] = {}
        # A response's Connection header values -> what the client is not sent (and the bit set
        # of those names' lengths), and whether the values name Content-Length: the same few
        # values ("keep-alive") nearly every time.
        self._connection_drops: dict[tuple[bytes, ...], tuple[frozenset[bytes], int, bool]] = {}

    def upstream_headers(
        self, request: HttpRequest, route: RouteConfig, injected: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        """The request headers as the upstream sees them, in order: owned, hop-by-hop, framing
        and forwarding headers removed, verified claims injected, X-Forwarded-* set.  A plain
        list: every name the gateway adds was stripped from what it copied (the strip sets
        hold the injected, request-id, trace and X-Forwarded names), so nothing needs
        replacing, and a list costs a fraction of a multidict's case-folding inserts."""
        inbound = request.headers
        peer = request.remote
        trusted = self._trusted_peers.get(peer)
        if trusted is None:
            trusted = self._trusts(peer)
            if len(self._trusted_peers) < _MEMO_LIMIT:
                self._trusted_peers[peer] = trusted
        hop = self._hops[route.id]
        strip = hop.strip if trusted else hop.strip_untrusted
        connection = inbound.getall(CONNECTION, ())
        if connection:
            strip = strip | headers_to_strip(frozenset(), connection)
        out: list[tuple[str, str]] = []
        hidden = hop.carriers
        keys = self._header_keys
        for name, value in inbound.items():
            key = keys.get(name)
            if key is None:
                key = header_key(name)
                if len(keys) < _MEMO_LIMIT:
                    keys[name] = key
            if key in strip or (not trusted and key.startswith(FORWARDED_PREFIX)):
                continue
            if key == "cookie" and hidden.cookies:
                value = _without_cookies(value, hidden.cookies)
                if not value:
                    continue
            out.append((name, value))
        out.extend(injected.items())
        record = request.record
        out.append((REQUEST_ID_HEADER, record.request_id))
        trace = record.trace
        if trace is not None:
            # The client's were stripped above: the upstream gets exactly one of each.
            out.append((TRACEPARENT, trace.traceparent()))
            if trace.tracestate is not None:
                out.append((TRACESTATE, trace.tracestate))
        prior_for = ", ".join(inbound.getall(X_FORWARDED_FOR, ())) if trusted else ""
        out.append((X_FORWARDED_FOR, f"{prior_for}, {peer}" if prior_for else (peer or "unknown")))
        proto = inbound.get(X_FORWARDED_PROTO, request.scheme) if trusted else request.scheme
        out.append((X_FORWARDED_PROTO, proto))
        # request.host passed the gate's check; a trusted proxy's X-Forwarded-Host must too.
        forwarded_host = inbound.get(X_FORWARDED_HOST) if trusted else None
        if forwarded_host is None or not valid_host(forwarded_host):
            forwarded_host = request.host
        out.append((X_FORWARDED_HOST, forwarded_host))
        return out

    async def forward(
        self,
        request: HttpRequest,
        route: RouteConfig,
        target: str,
        injected: Mapping[str, str],
    ) -> None:
        """Forward ``request`` to ``route``'s upstream: method, ``target`` (the path as the gate
        matched it, the query as received), except a configured prefix rewrite and a
        query-parameter token, which is removed."""
        hop = self._hops[route.id]
        span = request.record.span
        if span is not None:
            # Before the headers are built: the traceparent forwarded names this client span.
            span.upstream(route.id, hop.pool.origin.host, hop.pool.origin.port)
        headers = self.upstream_headers(request, route, injected)
        hidden = hop.carriers
        if route.rewrite is not None or hidden.query:
            path, sep, query = target.partition("?")
            if route.rewrite is not None:
                path = rewritten(route.rewrite, path)
            if hidden.query:
                query = _without_params(query, hidden.query)
            target = path + (sep + query if query else "")
        limit = route.max_body_bytes
        declared = request.content_length
        if limit and declared is not None and declared > limit:
            raise Rejection(Reason.PAYLOAD_TOO_LARGE, f"Content-Length {declared} over {limit}")
        meter: _BodyMeter | None = None
        chunked = False
        framing = ""
        if declared is not None:
            framing = f"Content-Length: {declared}"
        elif request.chunked:
            chunked = True
            framing = "Transfer-Encoding: chunked"
        if request.body is not None:
            # Counted as it streams (chunked bodies have no length to check up front),
            # and watched for stalls.
            meter = _BodyMeter(request.body, limit, self._body_gap_s, self._body_deadline_s)
        expect = request.expect
        if expect is not None and expect.lower() != "100-continue":
            raise Rejection(Reason.REQUEST_REJECTED, "unsupported Expect")
        # A WebSocket handshake keeps its Connection and Upgrade (hop-by-hop otherwise); any
        # other upgrade is served as a plain request, and its connection then closed.
        upgrade = (
            request.upgrade
            and request.method == "GET"
            and request.headers.get(UPGRADE, "").strip().lower() == "websocket"
        )
        if upgrade:
            headers.append((CONNECTION, "Upgrade"))
            headers.append((UPGRADE, request.headers[UPGRADE]))
        head = request_head(request.method, target, hop.host, headers, framing)
        async with hop.admission:
            started = time.perf_counter()
            conn, response = await self._exchange(request, hop.pool, head, meter, chunked, upgrade)
            if span is not None:
                span.upstream_answered(response.status)
            self._metrics.observe_upstream(route.id, response.status, time.perf_counter() - started)
            if not conn.upgraded:
                try:
                    await self._relay(request, conn, response)
                finally:
                    conn.finish()
                return
        # The upstream accepted the upgrade: the route's admission slot is free again (a
        # tunnel is bounded by the connection cap and the upstream pool), the tunnel holds
        # the upstream connection until it ends.
        try:
            await self._tunnel(request, route.id, conn, response)
        finally:
            conn.discard()

    async def _exchange(
        self,
        request: HttpRequest,
        pool: UpstreamPool,
        head: bytes,
        meter: _BodyMeter | None,
        chunked: bool,
        upgrade: bool,
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send the request; the connection and response head.  A bodiless idempotent request
        that finds its pooled connection closed before any answer is sent once more, on a new
        connection; every other failure is a ``Rejection`` naming whose fault it was.  (A
        client that leaves mid-exchange cancels this task: server.py's ``connection_lost``.
        An upstream failure seen here is the upstream's.)"""
        method = request.method
        retry = meter is None and method in _IDEMPOTENT
        fresh = False
        while True:
            try:
                conn = await pool.acquire(
                    connect_timeout=self._connect_timeout,
                    pool_timeout=self._pool_timeout,
                    fresh=fresh,
                )
            except TimeoutError:
                raise Rejection(Reason.UPSTREAM_TIMEOUT, "connect timeout") from None
            except OSError as exc:
                raise Rejection(Reason.UPSTREAM_UNAVAILABLE, type(exc).__name__) from None
            try:
                conn.begin(head, head_only=method == "HEAD", upgrade=upgrade)
                if meter is not None:
                    await self._upload(request, conn, meter, chunked)
                return conn, await conn.read_head(self._read_timeout)
            except _BodyStopped as stop:
                conn.discard()
                raise Rejection(stop.reason, "request body stopped") from None
            except UpstreamClosed as closed:
                conn.finish()  # failed: closed, not pooled
                if retry and not fresh and conn.reused and not closed.responded:
                    fresh = True
                    continue
                raise Rejection(Reason.UPSTREAM_UNAVAILABLE, closed.detail) from None
            except ClientGone as gone:
                # The client left mid-upload, or its chunked body broke the framing rules.
                conn.discard()
                raise Rejection(gone.reason, "request body cut off") from None
            except TimeoutError:
                # Nothing else is raised here: the connection's own failures are UpstreamClosed,
                # and the client's (ClientGone, an OSError) are caught above.
                conn.discard()
                raise Rejection(Reason.UPSTREAM_TIMEOUT, "no response in time") from None
            except BaseException:
                conn.discard()
                raise

    async def _upload(
        self, request: HttpRequest, conn: UpstreamConnection, meter: _BodyMeter, chunked: bool
    ) -> None:
        if request.version == "1.1" and request.expect is not None:
            # The client waits for this before sending the body: only now, with the policy
            # passed and the declared length within the limit, is the body worth receiving.
            request.send_continue()
        # The upstream may answer before taking the whole body (a 413, say), also while this
        # task waits for the client's next chunk: the answer interrupts that wait, the upload
        # stops, and the connection cannot carry another exchange.
        task = asyncio.current_task()
        assert task is not None
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        conn.on_answer = interrupt
        try:
            while chunk := await meter.next_chunk():
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain(self._read_timeout)
            if chunked:
                conn.write(b"0\r\n\r\n")
            return
        except asyncio.CancelledError:
            if not interrupted or task.uncancel() > 0:
                raise  # a real cancellation (the client left, or shutdown)
        finally:
            conn.on_answer = None
        conn.spoiled = True

    async def _tunnel(
        self, request: HttpRequest, route_id: str, conn: UpstreamConnection, upstream: ResponseHead
    ) -> None:
        """Answer the client's handshake with the upstream's 101 and relay bytes both ways."""
        record = request.record
        # RFC 9110 §7.8: a 101 names the protocol switched to; one that does not is no
        # handshake the client could go on with.
        protocol = next((v for n, v in upstream.headers if n.lower() == b"upgrade"), b"").strip()
        if not protocol:
            raise Rejection(Reason.UPSTREAM_UNAVAILABLE, "101 without Upgrade")
        # Neither connection can have closed yet: this task runs on the 101's arrival, before
        # the loop reads either side's close, and a client that left cancelled the task.
        client_transport = request.connection.transport
        assert conn.transport is not None
        assert client_transport is not None
        block = response_block(upstream.headers, RESPONSE_DROPPED, _RESPONSE_DROPPED_LENGTHS)
        block += b"Connection: Upgrade\r\nUpgrade: %b\r\n%b: %b\r\n" % (
            protocol,
            REQUEST_ID_BYTES,
            record.request_id.encode("ascii"),
        )
        tunnel = Tunnel(
            client_transport,
            conn.transport,
            idle_timeout_s=self._tunnel_idle_s,
            max_duration_s=self._tunnel_max_s,
        )
        conn.tunnel = tunnel
        request.open_tunnel(upstream.reason, block, tunnel)
        record.status = 101
        self._metrics.upgrades.labels(route_id).inc()
        self._metrics.tunnels_open.inc()
        try:
            end = await tunnel.run(request.early, conn.early)
        finally:
            self._metrics.tunnels_open.dec()
        record.detail = f"tunnel {end.value}"

    async def _relay(
        self, request: HttpRequest, conn: UpstreamConnection, upstream: ResponseHead
    ) -> None:
        dropped = RESPONSE_DROPPED
        lengths = _RESPONSE_DROPPED_LENGTHS
        length_framed = upstream.length_framed
        if upstream.connection:
            drops = self._connection_drops.get(upstream.connection)
            if drops is None:
                named = connection_options((b"connection", v) for v in upstream.connection)
                union = dropped | named
                drops = (union, name_lengths(union), b"content-length" in named)
                if len(self._connection_drops) < _MEMO_LIMIT:
                    self._connection_drops[upstream.connection] = drops
            dropped, lengths, names_length = drops
            length_framed = length_framed and not names_length
        record = request.record
        block = response_block(upstream.headers, dropped, lengths)
        block += b"%b: %b\r\n" % (REQUEST_ID_BYTES, record.request_id.encode("ascii"))
        status = upstream.status
        bodiless = request.method == "HEAD" or status in (204, 304) or status < 200
        request.start_response(
            status, upstream.reason, block, bodiless=bodiless, length_framed=length_framed
        )
        record.status = status
        # From here on the status line is sent: failures are logged and counted, and the
        # connection is closed so the client sees a cut stream, never a complete-looking
        # truncated body.  When the client goes or stalls, the upstream connection goes back
        # to the pool only if its response was read whole (``finish`` judges that).
        while True:
            try:
                chunk = await conn.read_body(self._read_timeout)
            except (UpstreamClosed, TimeoutError) as exc:
                record.reason = Reason.UPSTREAM_ABORTED
                # The upstream's own failure (closed, reset, malformed...), as for a 502.
                record.detail = (
                    exc.detail if isinstance(exc, UpstreamClosed) else "upstream body timed out"
                )
                request.close_connection()
                return
            if not chunk:
                break
            try:
                request.write(chunk)
                if request.writing_paused:
                    # A client that stops reading must not hold the upstream connection and
                    # the route's admission slot: the wait gets a deadline, and the
                    # connection is closed when it passes.
                    async with asyncio.timeout(self._write_timeout_s):
                        await request.drain()
            except ConnectionError:
                record.reason = Reason.CLIENT_DISCONNECTED
                return
            except TimeoutError:
                record.reason = Reason.CLIENT_TIMEOUT
                record.detail = "client stopped reading"
                request.close_connection(abort=True)
                return
        try:
            request.end_response()
        except ConnectionError:
            record.reason = Reason.CLIENT_DISCONNECTED


def admissions_for(
    config: GatewayConfig, previous: Mapping[str, Admission] | None = None
) -> dict[str, Admission]:
    """Each route's admission bound; a route that keeps its id keeps its ``Admission`` (resized
    to the new limits), so requests in flight across a reload still count against the bound."""
    admissions: dict[str, Admission] = {}
    for route in config.routes:
        kept = previous.get(route.id) if previous is not None else None
        if kept is not None:
            kept.resize(route.max_concurrent_requests, route.max_queued_requests)
            admissions[route.id] = kept
        else:
            admissions[route.id] = Admission(
                route.max_concurrent_requests, route.max_queued_requests
            )
    return admissions
