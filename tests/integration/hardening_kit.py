"""Helpers for the limits, failing-neighbour and large-body tests: edits of the base config (the
gateway itself comes from ``make_gateway(..., served=True)``, served as ``gateway run`` serves
it), upstreams that record how a request body ended, raw-socket upstreams
that misbehave below HTTP, and probes for leaked tasks, sockets and memory.

Everything is a real server on 127.0.0.1; nothing mocks the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.upstream import UpstreamPools
from tests.conftest import Edit
from tests.integration.e2e_helpers import wait_until


# --- edits of the base config, for ``make_gateway(*edits, served=True)`` ------------------------
def point_routes_at(url: str) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        for route in document["routes"]:
            route["upstream"] = url

    return edit


def set_limits(**limits: Any) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        document.setdefault("limits", {}).update(limits)

    return edit


def set_route(route_id: str, **settings: Any) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        for route in document["routes"]:
            if route["id"] == route_id:
                route.update(settings)
                return
        raise AssertionError(f"no route {route_id}")

    return edit


def set_upstream_defaults(**settings: Any) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        document["upstream_defaults"].update(settings)

    return edit


@contextlib.asynccontextmanager
async def closing_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection per request and closes it after the response, so
    no keep-alive connection (and no server task serving it) outlives a request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


async def start_runner(app: web.Application, **handler_args: Any) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on an ephemeral loopback port (aiohttp's defaults unless ``handler_args``
    say otherwise, e.g. ``max_field_size`` for an upstream that takes the gateway's headers)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, **handler_args)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


# --- an upstream that records how each request body ended ---------------------------------------
@dataclass
class BodyOutcome:
    """What an upstream handler saw of one request body before it ended."""

    path: str
    received: int
    sha256: str
    error: str | None  # the exception type that ended the read, None for a clean end of body


@dataclass
class SinkUpstream:
    """Reads each request body to its end (or failure), recording a ``BodyOutcome``.

    Paths ending in ``/hold/<name>`` wait, before reading, until ``gates[<name>]`` is set (at
    most 10 s): a test releases requests one at a time.  ``/slow/<n>/<gap_ms>`` answers 200
    with ``n`` 1 KiB pieces, one every ``gap_ms``, and closes the connection afterwards.
    """

    outcomes: list[BodyOutcome] = field(default_factory=list)
    arrived: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    held: dict[str, web.Request] = field(default_factory=dict)

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def hung_up(self, name: str) -> bool:
        """Whether the client of the held request ``name`` (the gateway) closed its connection."""
        transport = self.held[name].transport
        return transport is None or transport.is_closing()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append(request.path)
        segments = request.path.split("/")
        if len(segments) >= 3 and segments[-2] == "hold":
            self.held[segments[-1]] = request
            await asyncio.wait_for(self.gate(segments[-1]).wait(), 10)
        if len(segments) >= 4 and segments[-3] == "slow":
            return await self._slow(request, int(segments[-2]), int(segments[-1]) / 1000)
        digest = hashlib.sha256()
        received = 0
        error: str | None = None
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                received += len(chunk)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            self.outcomes.append(BodyOutcome(request.path, received, digest.hexdigest(), error))
            self.ended.set()
        return web.json_response({"body_bytes": received, "body_sha256": digest.hexdigest()})

    async def _slow(self, request: web.Request, pieces: int, gap_s: float) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = pieces * 1024
        response.force_close()  # nothing pooled: the leak check then expects no socket at all
        await response.prepare(request)
        for index in range(pieces):
            await asyncio.sleep(gap_s)
            await response.write(bytes([index % 256]) * 1024)
        await response.write_eof()
        return response


def slow_body(pieces: int) -> bytes:
    return b"".join(bytes([index % 256]) * 1024 for index in range(pieces))


# --- upstreams that misbehave below HTTP ---------------------------------------------------------
def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not an orderly FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert isinstance(transport, asyncio.Transport)
    transport.abort()


def reset(writer: asyncio.StreamWriter) -> None:
    reset_transport(writer.transport)


RawBehaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


# An upstream answer cut short: the head and a first chunk, and never the last chunk.
CHUNKED_FIRST_PART = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"


async def read_first_part(reader: asyncio.StreamReader, version: str, within: float) -> None:
    """What a client of HTTP ``version`` gets of ``CHUNKED_FIRST_PART``: its head and its first
    chunk, relayed chunked to HTTP/1.1 and close-delimited (unframed) to HTTP/1.0."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    assert head.startswith(b"HTTP/1.1 200 "), head
    chunked = b"transfer-encoding: chunked" in head.lower()
    assert chunked == (version == "1.1"), head
    part = b"5\r\nfirst\r\n" if chunked else b"first"
    assert await asyncio.wait_for(reader.readexactly(len(part)), within) == part


async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\x01\x02\r\n\r\n")
    await writer.drain()
    writer.close()


async def reset_before_answering(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request_head(reader)
    reset(writer)


PARTIAL_BODY = 64 * 1024
DECLARED_BODY = 1024 * 1024


async def reset_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {DECLARED_BODY}\r\n\r\n".encode()
        + b"p" * PARTIAL_BODY
    )
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


@dataclass
class RawUpstream:
    """An ``asyncio.start_server`` upstream that runs ``behaviour`` on every connection."""

    behaviour: RawBehaviour
    connections: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.behaviour(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# --- leak probes ---------------------------------------------------------------------------------
def _socket_inodes_of_this_process() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def sockets_to(port: int) -> int:
    """Open TCP sockets of this process whose *remote* port is ``port`` (IPv4 loopback).

    Read from the kernel (/proc/net/tcp joined with /proc/self/fd): a stable, public signal
    that counts connections the gateway's upstream client still holds, whatever aiohttp does
    inside.  The upstream server's own accepted sockets have ``port`` as their *local* port
    and are not counted.
    """
    mine = _socket_inodes_of_this_process()
    count = 0
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[9] in mine:
                count += 1
    return count


@dataclass
class LeakProbe:
    """Snapshot the tasks alive now; later, wait until no more tasks are alive than then and
    the upstream pools hold no more than ``pooled`` connections to ``upstream_port``."""

    tasks: set[asyncio.Task[Any]]

    @classmethod
    def start(cls) -> LeakProbe:
        return cls(set(asyncio.all_tasks()))

    def new_tasks(self) -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() - self.tasks if t is not asyncio.current_task()}

    async def assert_clean(
        self,
        pools: UpstreamPools | None,
        upstream_port: int,
        *,
        pooled: int = 0,
        within: float = 5.0,
    ) -> None:
        # The count, not the set: a key refresher replaces its own sleeper tasks as it cycles.
        try:
            await wait_until(lambda: len(asyncio.all_tasks()) <= len(self.tasks), within=within)
        except AssertionError:
            raise AssertionError(
                f"{len(asyncio.all_tasks())} tasks alive, {len(self.tasks)} before; "
                f"new since: {describe(self.new_tasks())}"
            ) from None
        await wait_until(
            lambda: pools is None or pools.in_use == 0,
            within=within,
            what="every upstream connection released to its pool",
        )
        await wait_until(
            lambda: sockets_to(upstream_port) <= pooled,
            within=within,
            what=f"at most {pooled} socket(s) to the upstream port {upstream_port}",
        )


def describe(tasks: set[asyncio.Task[Any]]) -> list[str]:
    return sorted(repr(task.get_coro()) for task in tasks)


# --- memory --------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size (the gateway runs in the test process)."""
    return _status_kib("VmRSS") * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return True


class MemoryWatch:
    """The peak resident memory over a stretch of work, relative to its start.

    The kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs where allowed;
    a sampler every 20 ms backs it up where it is not.
    """

    def __init__(self) -> None:
        self.hwm_reset = False
        self.baseline = 0
        self.sampled_peak = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MemoryWatch:
        self.hwm_reset = _reset_peak_rss()
        self.baseline = self.sampled_peak = rss_bytes()
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self.sampled_peak = max(self.sampled_peak, rss_bytes())
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sampled_peak = max(self.sampled_peak, rss_bytes())

    @property
    def peak(self) -> int:
        kernel = _status_kib("VmHWM") * 1024 if self.hwm_reset else 0
        return max(kernel, self.sampled_peak)

    @property
    def peak_growth(self) -> int:
        return self.peak - self.baseline

    @property
    def end_growth(self) -> int:
        return rss_bytes() - self.baseline


# --- bodies too big to hold ----------------------------------------------------------------------
def block(index: int, size: int = 64 * 1024) -> bytes:
    """Deterministic, incompressible-looking pieces of a generated body."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def generated_body(total: int, digest: Any, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``total`` bytes made of ``block``s, fed into ``digest`` as they are produced."""
    sent = 0
    index = 0
    while sent < total:
        chunk = block(index, min(piece, total - sent))
        digest.update(chunk)
        sent += len(chunk)
        index += 1
        yield chunk


def echo_download_sha256(size: int) -> str:
    """sha256 of what ``EchoUpstream`` in ``download`` mode streams, computed in 64 KiB steps."""
    piece = hashlib.sha256(b"block").digest() * 2048
    digest = hashlib.sha256()
    remaining = size
    while remaining > 0:
        digest.update(piece[: min(len(piece), remaining)])
        remaining -= min(len(piece), remaining)
    return digest.hexdigest()


async def read_all(reader: asyncio.StreamReader, size: int, within: float) -> str:
    """Read exactly ``size`` bytes (each read bounded by ``within``); their SHA-256 hex."""
    digest = hashlib.sha256()
    received = 0
    while received < size:
        chunk = await asyncio.wait_for(reader.read(256 * 1024), within)
        assert chunk, f"cut off after {received} of {size} bytes"
        digest.update(chunk)
        received += len(chunk)
    assert received == size
    return digest.hexdigest()
