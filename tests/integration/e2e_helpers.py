"""Helpers for the end-to-end tests: bounded polling, response decoding, free ports and a
scriptable upstream (real aiohttp server on loopback, never a mock of the network)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientResponse, web

MIB = 1024 * 1024


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], *, within: float = 5.0, what: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) until it holds; fail after ``within`` real seconds.

    This waits for *asynchronous work on loopback* to land (a background fetch, a socket
    closing); it never stands in for a duration the gateway measures (those use FakeClock).
    """
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s: {what}")
        await asyncio.sleep(0.01)


async def reason_of(response: ClientResponse) -> str:
    """The ``reason`` of a gateway rejection body."""
    body = await response.json()
    reason = body["error"]["reason"]
    assert isinstance(reason, str)
    return reason


def echoed_headers(body: dict[str, Any]) -> dict[str, str]:
    """The EchoUpstream's ``headers`` ([[k, v], ...]) as a dict."""
    return {k: v for k, v in body["headers"]}


def free_port() -> int:
    """A loopback TCP port with nothing listening on it (bound to port 0, noted, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def download_payload(size: int) -> bytes:
    """Exactly what ``EchoUpstream`` in ``download`` mode streams for ``size`` bytes."""
    block = hashlib.sha256(b"block").digest() * 2048  # 64 KiB
    out = bytearray()
    while len(out) < size:
        out += block[: min(len(block), size - len(out))]
    return bytes(out)


@dataclass
class Seen:
    """One request as the scripted upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]


@dataclass
class ScriptedUpstream:
    """An upstream whose behaviour is chosen by the last segments of the path (any prefix).

    * ``.../status/<code>``: answers ``<code>`` with ``X-Upstream: yes``, two ``Set-Cookie``
      headers, a ``Location`` for 3xx, and the body ``upstream says <code>`` (none for 204/304);
    * ``.../fixed``: ``hello head`` (10 bytes) for GET and HEAD alike;
    * ``.../reset``: closes the connection before any response byte;
    * ``.../short``: announces ``Content-Length: 1000``, sends 10 bytes, closes the connection;
    * ``.../stream-up``: sets ``got_first_bytes`` as soon as body bytes arrive, then reads the
      rest and answers ``{"body_bytes", "body_sha256"}``;
    * ``.../stream-down``: sends one MiB, waits (at most 5 s) for ``client_has_first``, then
      sends ``stream_rest`` more bytes.
    """

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    got_first_bytes: asyncio.Event = field(default_factory=asyncio.Event)
    client_has_first: asyncio.Event = field(default_factory=asyncio.Event)
    stream_rest: int = 4 * MIB

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        handlers = {
            "fixed": self._fixed,
            "reset": self._reset,
            "short": self._short,
            "stream-up": self._stream_up,
            "stream-down": self._stream_down,
        }

        async def dispatch(request: web.Request) -> web.StreamResponse:
            # The gateway forwards the raw path, so behaviour is picked by its last segments.
            self._record(request)
            segments = request.path.split("/")
            if len(segments) >= 3 and segments[-2] == "status":
                return await self._status(request, int(segments[-1]))
            return await handlers[segments[-1]](request)

        app.router.add_route("*", "/{tail:.*}", dispatch)
        return app

    def _record(self, request: web.Request) -> None:
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items())))

    async def _status(self, request: web.Request, code: int) -> web.StreamResponse:
        response = web.Response(status=code)
        response.headers["X-Upstream"] = "yes"
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        if 300 <= code < 400:
            response.headers["Location"] = "/elsewhere"
        if code not in (204, 304):
            response.text = f"upstream says {code}"
        return response

    async def _fixed(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"hello head", content_type="text/plain")

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()  # never reaches the closed connection

    async def _short(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"0123456789")
        assert request.transport is not None
        request.transport.close()
        return response

    async def _stream_up(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            if chunk:
                self.got_first_bytes.set()
            digest.update(chunk)
            size += len(chunk)
        return web.Response(
            text=json.dumps({"body_bytes": size, "body_sha256": digest.hexdigest()}),
            content_type="application/json",
        )

    async def _stream_down(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = MIB + self.stream_rest
        await response.prepare(request)
        await response.write(b"a" * MIB)
        await asyncio.wait_for(self.client_has_first.wait(), 5)
        await response.write(b"b" * self.stream_rest)
        await response.write_eof()
        return response
