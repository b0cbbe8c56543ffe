"""The upstream hop: header hygiene, X-Forwarded-*, streaming both ways, and upstream errors as reasons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict

from .admission import Admission
from .claims import headers_to_strip
from .config import (
    CLIENT_ORIGIN_HEADERS,
    FORWARDED_PREFIX,
    METHOD_OVERRIDE_HEADERS,
    GatewayConfig,
    RouteConfig,
    TokenLocation,
    Upstream,
    header_key,
)
from .errors import Rejection
from .extractor import cookie_name, query_name
from .metrics import GatewayMetrics
from .reasons import Reason
from .record import RECORD_KEY, REQUEST_ID_HEADER
from .routing import valid_host
from .upstream import ResponseHead, UpstreamClosed, UpstreamConnection, UpstreamPool, UpstreamPools

_RESPONSE_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-authenticate"}
)  # fmt: skip
# Headers aiohttp's server fills in when a response lacks them.  On a relayed response the
# names the upstream did not send are set here, and the app's response-prepare hook removes
# them again: the client gets what the upstream said, nothing added.
DEFAULTED_HEADERS: Final = frozenset({"Content-Type", "Server", "Date"})
UNSENT_KEY: Final = web.RequestKey("gateway_unsent_headers", frozenset)
# RFC 9110 §9.2.2: a request of these methods may be sent again when a pooled connection turns
# out to have been closed by the upstream before it answered.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class Carriers:
    """Where a route's token may sit, to be removed before forwarding (unless forward_token)."""

    headers: frozenset[str]
    cookies: frozenset[str]
    query: frozenset[str]


_KEEP_ALL: Final = Carriers(frozenset(), frozenset(), frozenset())
_AUTHORIZATION_ONLY: Final = Carriers(frozenset({"authorization"}), frozenset(), frozenset())


# Never copied from the client: Host is the upstream's, Expect was already answered here, and
# the body's framing is the gateway's (it writes its own Content-Length or chunked coding).
_PROXY_OWN: Final = frozenset({"host", "expect", "content-length", "transfer-encoding"})


def token_carriers(route: RouteConfig) -> Carriers:
    # Authorization never reaches an upstream unless a route forwards its token on
    # purpose: a compromised or logging upstream must not be able to replay it.
    if route.auth is None:
        return _AUTHORIZATION_ONLY
    if route.auth.forward_token:
        return _KEEP_ALL
    sources = route.auth.token_sources
    return Carriers(
        frozenset(
            {"authorization"}
            | {header_key(s.name) for s in sources if s.location is TokenLocation.HEADER}
        ),
        frozenset(s.name for s in sources if s.location is TokenLocation.COOKIE),
        frozenset(s.name for s in sources if s.location is TokenLocation.QUERY),
    )


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
    an admission slot for ever: a byte every ``gap_s`` would defeat the gap alone)."""

    __slots__ = ("_content", "_deadline_s", "_gap_s", "_limit", "stopped")

    def __init__(self, content: StreamReader, limit: int, gap_s: float, deadline_s: float) -> None:
        self._content = content
        self._limit = limit
        self._gap_s = gap_s
        self._deadline_s = deadline_s
        self.stopped: Reason | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline_s
        while True:
            try:
                async with asyncio.timeout_at(min(loop.time() + self._gap_s, deadline)):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.stopped = Reason.CLIENT_TIMEOUT
                raise _BodyStopped(Reason.CLIENT_TIMEOUT) from None
            if not chunk:
                return
            seen += len(chunk)
            if self._limit and seen > self._limit:
                self.stopped = Reason.PAYLOAD_TOO_LARGE
                raise _BodyStopped(Reason.PAYLOAD_TOO_LARGE)
            yield chunk


def _host_header(upstream: Upstream) -> str:
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    default = 443 if upstream.scheme == "https" else 80
    return host if upstream.port == default else f"{host}:{upstream.port}"


def request_head(
    method: str, target: str, host: str, headers: CIMultiDict[str], framing: str
) -> bytes:
    """The request head the upstream receives, written by the gateway byte for byte."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if framing:
        lines.append(framing)
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        # Parsed client headers and checked claim values cannot hold CR or LF; never send one.
        raise Rejection(Reason.INTERNAL_ERROR, "line break in an upstream header")
    return (text + "\r\n\r\n").encode("utf-8")


class Forwarder:
    """Sends an admitted request upstream and streams the answer back."""

    def __init__(
        self,
        config: GatewayConfig,
        pools: UpstreamPools,
        metrics: GatewayMetrics,
        admissions: Mapping[str, Admission] | None = None,
    ) -> None:
        self._pools = pools
        self._metrics = metrics
        defaults = config.upstream_defaults
        self._connect_timeout = defaults.connect_timeout_s
        self._read_timeout = defaults.timeout_s
        self._pool_timeout = defaults.pool_timeout_s
        self._carriers = {route.id: token_carriers(route) for route in config.routes}
        self._hosts = {
            route.id: _host_header(route.upstream)
            for route in config.routes
            if route.upstream is not None
        }
        self._body_gap_s = config.limits.client_body_timeout_s
        self._body_deadline_s = config.limits.client_body_deadline_s
        self._write_timeout_s = config.limits.client_write_timeout_s
        self._admission = dict(admissions) if admissions is not None else admissions_for(config)
        self._owned = config.owned_headers
        # Per route: every name never copied upstream, so a request needs one set lookup
        # per header (a Connection header adds the names it lists).
        base = headers_to_strip(self._owned, ()) | _PROXY_OWN | METHOD_OVERRIDE_HEADERS
        self._strip = {r.id: base | self._carriers[r.id].headers for r in config.routes}
        # From a peer that is not a trusted proxy, also every name that claims to say who the
        # client is or what it asked for (X-Forwarded-* goes by prefix, in upstream_headers).
        untrusted = CLIENT_ORIGIN_HEADERS | config.strip_untrusted_headers
        self._strip_untrusted = {rid: strip | untrusted for rid, strip in self._strip.items()}
        self._trusts = config.trusts

    def upstream_headers(
        self, request: web.Request, route: RouteConfig, injected: Mapping[str, str]
    ) -> CIMultiDict[str]:
        """The request headers as the upstream sees them: owned, hop-by-hop, framing and
        forwarding headers removed, verified claims injected, X-Forwarded-* set."""
        inbound = request.headers
        peer = request.remote
        trusted = self._trusts(peer)
        strip = (self._strip if trusted else self._strip_untrusted)[route.id]
        connection = inbound.getall("Connection", [])
        if connection:
            strip = strip | headers_to_strip(frozenset(), connection)
        out: CIMultiDict[str] = CIMultiDict()
        hidden = self._carriers[route.id]
        for name, value in inbound.items():
            key = header_key(name)
            if key in strip or (not trusted and key.startswith(FORWARDED_PREFIX)):
                continue
            if key == "cookie" and hidden.cookies:
                value = _without_cookies(value, hidden.cookies)
                if not value:
                    continue
            out.add(name, value)
        out.update(injected)
        out[REQUEST_ID_HEADER] = request[RECORD_KEY].request_id
        prior_for = ", ".join(inbound.getall("X-Forwarded-For", [])) if trusted else ""
        out["X-Forwarded-For"] = f"{prior_for}, {peer}" if prior_for else (peer or "unknown")
        out["X-Forwarded-Proto"] = (
            inbound.get("X-Forwarded-Proto", request.scheme) if trusted else request.scheme
        )
        # request.host passed the gate's check; a trusted proxy's X-Forwarded-Host must too.
        forwarded_host = inbound.get("X-Forwarded-Host") if trusted else None
        out["X-Forwarded-Host"] = (
            forwarded_host
            if forwarded_host is not None and valid_host(forwarded_host)
            else request.host
        )
        return out

    async def forward(
        self,
        request: web.Request,
        route: RouteConfig,
        target: str,
        injected: Mapping[str, str],
    ) -> web.StreamResponse:
        """Forward ``request`` to ``route``'s upstream: method, ``target`` (the path as the gate
        matched it, the query as received), except a configured prefix rewrite and a
        query-parameter token, which is removed."""
        headers = self.upstream_headers(request, route, injected)
        hidden = self._carriers[route.id]
        if route.rewrite is not None or hidden.query:
            path, sep, query = target.partition("?")
            if route.rewrite is not None:
                path = route.rewrite.apply(path)
            if hidden.query:
                query = _without_params(query, hidden.query)
            target = path + (sep + query if query else "")
        assert route.upstream is not None, "proxy mode routes always have an upstream"
        limit = route.max_body_bytes
        declared = request.content_length
        if limit and declared is not None and declared > limit:
            raise Rejection(Reason.PAYLOAD_TOO_LARGE, f"Content-Length {declared} over {limit}")
        meter: _BodyMeter | None = None
        chunked = False
        framing = ""
        if declared is not None:
            framing = f"Content-Length: {declared}"
        elif request.body_exists:
            chunked = True
            framing = "Transfer-Encoding: chunked"
        if request.body_exists:
            # Counted as it streams (chunked bodies have no length to check up front),
            # and watched for stalls.
            meter = _BodyMeter(request.content, limit, self._body_gap_s, self._body_deadline_s)
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise Rejection(Reason.REQUEST_REJECTED, "unsupported Expect")
        head = request_head(request.method, target, self._hosts[route.id], headers, framing)
        pool = self._pools.pool(route.upstream)
        async with self._admission[route.id]:
            started = time.perf_counter()
            conn, response = await self._exchange(request, pool, head, meter, chunked)
            try:
                self._metrics.observe_upstream(
                    route.id, response.status, time.perf_counter() - started
                )
                return await self._relay(request, conn, response)
            finally:
                conn.finish()

    async def _exchange(
        self,
        request: web.Request,
        pool: UpstreamPool,
        head: bytes,
        meter: _BodyMeter | None,
        chunked: bool,
    ) -> tuple[UpstreamConnection, ResponseHead]:
        """Send the request; the connection and response head.  A bodiless idempotent request
        that finds its pooled connection closed before any answer is sent once more, on a new
        connection; every other failure is a ``Rejection`` naming whose fault it was."""
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
                conn.begin(head, head_only=method == "HEAD")
                if meter is not None:
                    await self._upload(request, conn, meter, chunked)
                return conn, await conn.read_head(self._read_timeout)
            except _BodyStopped as stop:
                conn.spoiled = True
                conn.finish()
                raise Rejection(stop.reason, "request body stopped") from None
            except UpstreamClosed as closed:
                conn.finish()
                if retry and not fresh and conn.reused and not closed.responded:
                    fresh = True
                    continue
                if request.transport is None or request.transport.is_closing():
                    raise Rejection(Reason.CLIENT_DISCONNECTED, closed.detail) from None
                raise Rejection(Reason.UPSTREAM_UNAVAILABLE, closed.detail) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                conn.spoiled = True
                conn.finish()
                if meter is not None and meter.stopped is not None:
                    raise Rejection(meter.stopped, "request body stopped") from None
                if request.transport is None or request.transport.is_closing():
                    # The client left mid-upload: not the upstream's fault.
                    raise Rejection(Reason.CLIENT_DISCONNECTED, type(exc).__name__) from None
                if isinstance(exc, TimeoutError):
                    raise Rejection(Reason.UPSTREAM_TIMEOUT, "no response in time") from None
                raise Rejection(Reason.UPSTREAM_UNAVAILABLE, type(exc).__name__) from None
            except BaseException:
                conn.spoiled = True
                conn.finish()
                raise

    async def _upload(
        self, request: web.Request, conn: UpstreamConnection, meter: _BodyMeter, chunked: bool
    ) -> None:
        if request.version >= (1, 1) and "Expect" in request.headers:
            # The client waits for this before sending the body: only now, with the policy
            # passed and the declared length within the limit, is the body worth receiving.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response itself has not started
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
            async for chunk in meter.chunks():
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain(self._read_timeout)
                if conn.answered:
                    break
            else:
                if chunked:
                    conn.write(b"0\r\n\r\n")
                return
        except asyncio.CancelledError:
            if not interrupted or task.uncancel() > 0:
                raise  # a real cancellation (the client left, or shutdown)
        finally:
            conn.on_answer = None
        conn.spoiled = True

    async def _relay(
        self, request: web.Request, conn: UpstreamConnection, upstream: ResponseHead
    ) -> web.StreamResponse:
        connection = {
            token.strip().lower()
            for name, value in upstream.headers
            if name.lower() == "connection"
            for token in value.split(",")
        }
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in upstream.headers
            if name.lower() not in _RESPONSE_HOP_BY_HOP and name.lower() not in connection
        )
        record = request[RECORD_KEY]
        headers[REQUEST_ID_HEADER] = record.request_id
        request[UNSENT_KEY] = frozenset(n for n in DEFAULTED_HEADERS if n not in headers)
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        await response.prepare(request)
        record.status = upstream.status
        # From here on the status line is sent: failures are logged and counted,
        # and the connection is closed so the client sees a cut stream, never a
        # complete-looking truncated body.
        while True:
            try:
                chunk = await conn.read_body(self._read_timeout)
            except (UpstreamClosed, TimeoutError) as exc:
                record.reason = Reason.UPSTREAM_ABORTED
                record.detail = type(exc).__name__
                if request.transport is not None:
                    request.transport.close()
                return response
            if not chunk:
                break
            try:
                # A client that stops reading must not hold the upstream connection and the
                # route's admission slot: the write (which waits while its buffer is full)
                # gets a deadline, and the connection is closed when it passes.
                async with asyncio.timeout(self._write_timeout_s):
                    await response.write(chunk)
            except ConnectionError:
                conn.spoiled = True
                record.reason = Reason.CLIENT_DISCONNECTED
                return response
            except TimeoutError:
                conn.spoiled = True
                record.reason = Reason.CLIENT_TIMEOUT
                record.detail = "client stopped reading"
                if request.transport is not None:
                    request.transport.abort()
                return response
        await response.write_eof()
        return response


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
