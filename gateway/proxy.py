"""The upstream hop: header hygiene, X-Forwarded-*, streaming both ways, and upstream errors as reasons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict
from yarl import URL

from .admission import Admission
from .claims import headers_to_strip
from .config import (
    CLIENT_ORIGIN_HEADERS,
    FORWARDED_PREFIX,
    METHOD_OVERRIDE_HEADERS,
    GatewayConfig,
    RouteConfig,
    TokenLocation,
    header_key,
)
from .errors import Rejection
from .extractor import cookie_name, query_name
from .metrics import GatewayMetrics
from .reasons import Reason
from .record import RECORD_KEY, REQUEST_ID_HEADER
from .routing import valid_host

_CHUNK = 64 * 1024
# aiohttp adds these when absent; a proxy must not (an added Accept-Encoding
# would let the upstream compress a response the client never asked to be compressed).
_SKIP_AUTO_HEADERS = ("Accept-Encoding", "User-Agent", "Content-Type")
_RESPONSE_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-authenticate"}
)  # fmt: skip


def create_upstream_session(config: GatewayConfig) -> aiohttp.ClientSession:
    """The one pooled, keep-alive client session every route's upstream traffic shares."""
    defaults = config.upstream_defaults
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=defaults.max_connections)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass through as the upstream encoded them
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies between clients
        # No session timeout: Forwarder passes its own on every request, so a reload's new
        # timeouts apply without a new session.
        skip_auto_headers=_SKIP_AUTO_HEADERS,
    )


@dataclass(frozen=True, slots=True)
class Carriers:
    """Where a route's token may sit, to be removed before forwarding (unless forward_token)."""

    headers: frozenset[str]
    cookies: frozenset[str]
    query: frozenset[str]


_KEEP_ALL: Final = Carriers(frozenset(), frozenset(), frozenset())
_AUTHORIZATION_ONLY: Final = Carriers(frozenset({"authorization"}), frozenset(), frozenset())


# Never copied from the client: Host is the upstream's, Expect was already answered here.
_PROXY_OWN: Final = frozenset({"host", "expect"})


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
    limit) or when the client sends nothing for ``gap_s`` (a stalled upload must not hold an
    upstream connection and an admission slot for ever, like nginx's client_body_timeout)."""

    __slots__ = ("_content", "_gap_s", "_limit", "stopped")

    def __init__(self, content: StreamReader, limit: int, gap_s: float) -> None:
        self._content = content
        self._limit = limit
        self._gap_s = gap_s
        self.stopped: Reason | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                async with asyncio.timeout(self._gap_s):
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


class Forwarder:
    """Sends an admitted request upstream and streams the answer back."""

    def __init__(
        self, config: GatewayConfig, session: aiohttp.ClientSession, metrics: GatewayMetrics
    ) -> None:
        self._session = session
        self._metrics = metrics
        defaults = config.upstream_defaults
        # Per request, so a reload's new timeouts apply without a new session.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=defaults.connect_timeout_s, sock_read=defaults.timeout_s
        )
        self._carriers = {route.id: token_carriers(route) for route in config.routes}
        self._body_gap_s = config.limits.client_body_timeout_s
        self._admission = {
            route.id: Admission(route.max_concurrent_requests, route.max_queued_requests)
            for route in config.routes
        }
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
        """The request headers as the upstream sees them: owned, hop-by-hop and forwarding headers
        removed, verified claims injected, X-Forwarded-* set."""
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
        url = URL(route.upstream.url + target, encoded=True)
        limit = route.max_body_bytes
        declared = request.content_length
        if limit and declared is not None and declared > limit:
            raise Rejection(Reason.PAYLOAD_TOO_LARGE, f"Content-Length {declared} over {limit}")
        meter: _BodyMeter | None = None
        body: Any = None
        if request.body_exists:
            # Counted as it streams (chunked bodies have no length to check up front),
            # and watched for stalls.
            meter = _BodyMeter(request.content, limit, self._body_gap_s)
            body = meter.chunks()
        async with self._admission[route.id]:
            started = time.perf_counter()
            try:
                upstream = await self._session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False,
                    timeout=self._timeout,
                )  # fmt: skip
            except _BodyStopped as stop:
                raise Rejection(stop.reason, "request body stopped") from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if meter is not None and meter.stopped is not None:
                    raise Rejection(meter.stopped, "request body stopped") from None
                if request.transport is None or request.transport.is_closing():
                    # The client left mid-upload: not the upstream's fault.
                    raise Rejection(Reason.CLIENT_DISCONNECTED, type(exc).__name__) from None
                if isinstance(exc, TimeoutError):
                    raise Rejection(Reason.UPSTREAM_TIMEOUT, "no response in time") from None
                raise Rejection(Reason.UPSTREAM_UNAVAILABLE, type(exc).__name__) from None
            async with upstream:
                self._metrics.observe_upstream(
                    route.id, upstream.status, time.perf_counter() - started
                )
                return await self._relay(request, upstream)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        connection = {
            token.strip().lower()
            for value in upstream.headers.getall("Connection", [])
            for token in value.split(",")
        }
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value)
            for name, value in upstream.headers.items()
            if name.lower() not in _RESPONSE_HOP_BY_HOP and name.lower() not in connection
        )
        record = request[RECORD_KEY]
        headers[REQUEST_ID_HEADER] = record.request_id
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        await response.prepare(request)
        record.status = upstream.status
        # From here on the status line is sent: failures are logged and counted,
        # and the connection is closed so the client sees a cut stream, never a
        # complete-looking truncated body.
        try:
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                try:
                    await response.write(chunk)
                except ConnectionError:
                    record.reason = Reason.CLIENT_DISCONNECTED
                    return response
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            record.reason = Reason.UPSTREAM_ABORTED
            record.detail = type(exc).__name__
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
