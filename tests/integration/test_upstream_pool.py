"""The upstream hop's own HTTP/1.1 client, seen from outside: keep-alive reuse, the connection
bound and its bounded wait, a stale pooled connection, HEAD, interim responses, close-delimited
bodies, a request head with nothing added, an upstream that answers before the body is in,
route bounds across reloads, and upstream timeouts as reasons.

Every upstream here is a raw ``asyncio.start_server`` on 127.0.0.1 (``RawUpstream``) driven by a
script: it reads each request off the wire and writes the exact bytes the test chose, so what
the gateway sent and how many connections it opened are read on the upstream's side.  The
gateway is served as ``gateway run`` serves it.  Nothing mocks the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDictProxy

from gateway import loads_config
from gateway.app import GATEWAY_KEY
from gateway.logs import REQUEST_LOGGER
from gateway.upstream import UpstreamPool
from tests.conftest import Edit, GatewayFactory, RunningGateway, base_config
from tests.fakes import EchoUpstream, FakeIdP
from tests.integration.authkit import RawConnection, logged
from tests.integration.e2e_helpers import MIB, free_port, wait_until
from tests.integration.hardening_kit import (
    RawUpstream,
    closing_session,
    point_routes_at,
    read_request_head,
    set_limits,
    set_route,
    set_upstream_defaults,
)

HELLO = b"hello"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)  # a gateway that hangs fails the test, not CI


# --- a scripted raw upstream ---------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One request as the upstream read it off the wire."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # 1 for the upstream's first accepted connection, 2 for the next...
    order: int  # 0 for the first request on its connection, 1 for the next...

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass(frozen=True)
class Reply:
    """Bytes the upstream writes as is; ``close``: it closes the connection afterwards."""

    data: bytes
    close: bool = False


Answer = Callable[[Seen], Awaitable[Reply | None]]  # None: close without answering


def response(
    body: bytes = HELLO,
    *,
    status: str = "200 OK",
    headers: tuple[str, ...] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{version} {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = []
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    return method, target, headers


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    for _ in range(100_000):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            assert await reader.readuntil(b"\r\n") == b"\r\n", "no trailers expected"
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    raise AssertionError("too many chunks")


async def read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    framing = {name.lower(): value for name, value in headers}
    if "content-length" in framing:
        return await reader.readexactly(int(framing["content-length"]))
    if framing.get("transfer-encoding", "").lower() == "chunked":
        return await read_chunked(reader)
    return b""


class ScriptedUpstream:
    """On each connection, reads requests one after another (head and body) and writes what
    ``answer`` returns for each; every request is recorded in ``seen``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self.raw = RawUpstream(self._serve)
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.url = ""

    @property
    def connections(self) -> int:
        return self.raw.connections

    async def start(self) -> str:
        self.url = await self.raw.start()
        return self.url

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.raw.connections
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        for order in range(1000):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except asyncio.IncompleteReadError:
                writer.close()  # the gateway closed its side
                return
            method, target, headers = parse_head(head)
            body = await asyncio.wait_for(read_body(reader, headers), 10)
            seen = Seen(method, target, headers, body, number, order)
            self.seen.append(seen)
            reply = await self.answer(seen)
            if reply is None:
                writer.close()
                return
            writer.write(reply.data)
            await writer.drain()
            if reply.close:
                writer.close()
                return

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.raw.close()


async def always_hello(seen: Seen) -> Reply:
    return Reply(response())


class Hold:
    """An answer that keeps requests whose path contains ``/hold`` until ``release`` is set;
    every other request is answered at once."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.held = 0

    async def __call__(self, seen: Seen) -> Reply:
        if "/hold" in seen.target:
            self.held += 1
            self.entered.set()
            await asyncio.wait_for(self.release.wait(), 10)
        return Reply(response())

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self.entered.wait(), 5)


UpstreamFactory = Callable[[Answer], Awaitable[ScriptedUpstream]]


@pytest.fixture
async def scripted() -> AsyncIterator[UpstreamFactory]:
    started: list[ScriptedUpstream] = []

    async def start(answer: Answer) -> ScriptedUpstream:
        upstream = ScriptedUpstream(answer)
        started.append(upstream)
        await upstream.start()
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


@pytest.fixture
def serve(make_gateway: GatewayFactory) -> GatewayFactory:
    """Gateways (no admin app) on the base config changed by ``edits``, served as ``gateway run``."""
    return functools.partial(make_gateway, served=True, admin=False)


def add_public_route(route_id: str, prefix: str) -> Edit:
    """A public route; put it before ``point_routes_at`` so that it names the same upstream."""

    def edit(document: dict[str, Any]) -> None:
        document["routes"].append(
            {
                "id": route_id,
                "match": {"path_prefix": prefix},
                "upstream": "http://x",
                "auth": "none",
            }
        )

    return edit


# --- the client side -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Got:
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    @property
    def reason(self) -> str:
        """The reason of a gateway rejection; for anything else, what the body was."""
        try:
            value = json.loads(self.body)["error"]["reason"]
        except (ValueError, KeyError, TypeError):
            return f"not a rejection: {self.body[:60]!r}"
        assert isinstance(value, str)
        return value


async def call(gw: RunningGateway, path: str, method: str = "GET", **kwargs: Any) -> Got:
    """One request on a connection of its own (so client keep-alive plays no part)."""
    async with (
        closing_session() as session,
        session.request(method, gw.url(path), timeout=CLIENT_TIMEOUT, **kwargs) as answer,
    ):
        return Got(answer.status, await answer.read(), answer.headers)


def only_pool(gw: RunningGateway) -> UpstreamPool:
    pools = gw.upstream_pools.pools()
    assert len(pools) == 1, pools
    return pools[0]


# --- 1. reuse ------------------------------------------------------------------------------------
async def test_sequential_requests_share_one_upstream_connection(serve, scripted):
    upstream = await scripted(always_hello)
    gw = await serve(point_routes_at(upstream.url))
    for index in range(5):
        got = await call(gw, f"/public/{index}")
        assert (got.status, got.body) == (200, HELLO)
    assert upstream.connections == 1
    assert [(s.connection, s.order) for s in upstream.seen] == [(1, n) for n in range(5)]


async def test_a_response_saying_connection_close_is_not_reused(serve, scripted):
    # The upstream says close but leaves the socket open: only the gateway can honour it.
    async def answer(seen: Seen) -> Reply:
        return Reply(response(headers=("Connection: close",)))

    upstream = await scripted(answer)
    gw = await serve(point_routes_at(upstream.url))
    for index in range(3):
        got = await call(gw, f"/public/{index}")
        assert (got.status, got.body) == (200, HELLO)
    assert upstream.connections == 3
    assert [s.order for s in upstream.seen] == [0, 0, 0]
    await wait_until(lambda: only_pool(gw).open == 0, what="no upstream connection kept")


# --- 2. the connection bound and the pool wait ---------------------------------------------------
async def test_a_full_pool_refuses_another_route_after_pool_timeout_instead_of_hanging(
    serve, scripted
):
    hold = Hold()
    upstream = await scripted(hold)
    gw = await serve(
        add_public_route("other", "/other"),
        point_routes_at(upstream.url),
        set_upstream_defaults(max_connections=1, pool_timeout_s=0.2),
    )
    first = asyncio.create_task(call(gw, "/public/hold"))
    try:
        await hold.wait_entered()
        started = time.monotonic()
        got = await call(gw, "/other/x")
        waited = time.monotonic() - started
        assert (got.status, got.reason) == (503, "upstream_overloaded")
        assert 0.15 <= waited < 2.0, waited  # about pool_timeout_s: a bounded wait, not a hang
        assert upstream.connections == 1  # the bound held: no second connection was opened
    finally:
        hold.release.set()
    assert (await first).status == 200
    for _ in range(2):  # and once the first is done, requests flow again
        got = await call(gw, "/other/x")
        assert (got.status, got.body) == (200, HELLO)
    assert upstream.connections == 1


async def test_waiters_get_the_connection_as_it_is_released(serve, scripted):
    hold = Hold()
    upstream = await scripted(hold)
    gw = await serve(
        point_routes_at(upstream.url),
        set_upstream_defaults(max_connections=1, pool_timeout_s=5),
    )
    first = asyncio.create_task(call(gw, "/public/hold"))
    await hold.wait_entered()
    others = [asyncio.create_task(call(gw, f"/public/{n}")) for n in range(2)]
    await wait_until(lambda: only_pool(gw).waiting == 2, what="two requests wait for the pool")
    started = time.monotonic()
    hold.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *others), 10)
    assert [(got.status, got.body) for got in results] == [(200, HELLO)] * 3
    assert time.monotonic() - started < 2.5  # handed over, not refused after pool_timeout_s
    assert upstream.connections == 1
    assert sorted(s.order for s in upstream.seen) == [0, 1, 2]


# --- 3. a pooled connection the upstream closed ----------------------------------------------------
async def first_only(seen: Seen) -> Reply | None:
    """Answers the first request on each connection; closes the connection on the second."""
    return Reply(response()) if seen.order == 0 else None


async def test_a_get_on_a_pooled_connection_closed_unanswered_is_retried_on_a_new_one(
    serve, scripted
):
    upstream = await scripted(first_only)
    gw = await serve(point_routes_at(upstream.url))
    assert (await call(gw, "/public/a")).status == 200
    got = await call(gw, "/public/b")
    assert (got.status, got.body) == (200, HELLO)
    assert [(s.target, s.connection) for s in upstream.seen] == [
        ("/public/a", 1),
        ("/public/b", 1),  # the pooled connection: closed without an answer
        ("/public/b", 2),  # sent once more, on a fresh connection
    ]


async def test_the_retry_takes_a_new_connection_not_another_pooled_one_and_comes_once(
    serve, scripted
):
    """Two connections are pooled when the upstream closes both unanswered: the GET that found
    the first closed is sent again on a new connection (the other pooled one may be as stale),
    and only once."""
    hold = Hold()

    async def answer(seen: Seen) -> Reply | None:
        if seen.connection <= 2 and seen.order > 0:
            return None  # the first two connections: closed at their second request
        return await hold(seen)

    upstream = await scripted(answer)
    gw = await serve(point_routes_at(upstream.url))
    both = [asyncio.ensure_future(call(gw, f"/public/hold/{n}")) for n in (1, 2)]
    await wait_until(lambda: hold.held == 2, what="two requests on two connections")
    hold.release.set()
    assert [(await done).status for done in both] == [200, 200]
    await wait_until(lambda: only_pool(gw).idle == 2, what="two connections pooled")
    got = await call(gw, "/public/again")
    assert (got.status, got.body) == (200, HELLO)
    tries = [s.connection for s in upstream.seen if s.target == "/public/again"]
    assert tries in ([1, 3], [2, 3])  # then a new connection, not the other pooled one


async def test_a_post_on_a_pooled_connection_closed_unanswered_is_502_and_sent_once(
    serve, scripted
):
    upstream = await scripted(first_only)
    gw = await serve(point_routes_at(upstream.url))
    assert (await call(gw, "/public/a")).status == 200
    got = await call(gw, "/public/b", "POST", data=b"pay once")
    assert (got.status, got.reason) == (502, "upstream_unavailable")
    posts = [s for s in upstream.seen if s.method == "POST"]
    assert [(s.body, s.connection) for s in posts] == [(b"pay once", 1)]
    assert upstream.connections == 1


async def test_a_bodiless_post_on_a_pooled_connection_closed_unanswered_is_not_retried(
    serve, scripted
):
    """Only an idempotent method is sent again: a POST with no body (nothing to replay either)
    is answered 502 after its one attempt."""
    upstream = await scripted(first_only)
    gw = await serve(point_routes_at(upstream.url))
    assert (await call(gw, "/public/a")).status == 200
    got = await call(gw, "/public/b", "POST")
    assert (got.status, got.reason) == (502, "upstream_unavailable")
    assert [(s.method, s.connection) for s in upstream.seen] == [("GET", 1), ("POST", 1)]
    assert upstream.connections == 1


# --- 4. HEAD -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("framing", "length"),
    [("Content-Length: 1000", "1000"), ("Transfer-Encoding: chunked", None)],
    ids=["length", "chunked"],  # chunked: a GET's answer would have been chunked
)
async def test_head_answer_has_the_length_but_no_body_and_the_connection_is_reused(
    serve, scripted, framing, length
):
    async def answer(seen: Seen) -> Reply:
        if seen.method == "HEAD":  # the framing a GET would have, and no body
            return Reply(
                f"HTTP/1.1 200 OK\r\n{framing}\r\nContent-Type: text/plain\r\n\r\n".encode()
            )
        return Reply(response(b"g" * 1000, headers=("Content-Type: text/plain",)))

    upstream = await scripted(answer)
    gw = await serve(point_routes_at(upstream.url))
    client = await RawConnection.open(gw.port)
    try:
        await client.send(b"HEAD /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        head = await client.response(method="HEAD", within=2)
        assert (head.status, head.headers.get("Content-Length"), head.body) == (200, length, b"")
        # The next answer on the same client connection parses: no stray bytes after the HEAD.
        await client.send(b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        got = await client.response(within=2)
        assert (got.status, got.body) == (200, b"g" * 1000)
    finally:
        await client.close()
    assert [(s.method, s.connection) for s in upstream.seen] == [("HEAD", 1), ("GET", 1)]
    assert upstream.connections == 1


# --- 5. interim responses --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "interim",
    [
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n", id="103"
        ),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="100"),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\n\r\n",
            id="100-then-103",
        ),
    ],
)
async def test_interim_responses_are_skipped_and_the_final_one_relayed(serve, scripted, interim):
    async def answer(seen: Seen) -> Reply:
        return Reply(interim + response(headers=("Content-Type: text/plain", "X-Final: yes")))

    upstream = await scripted(answer)
    gw = await serve(point_routes_at(upstream.url))
    for _ in range(2):
        got = await call(gw, "/public/x")
        assert (got.status, got.body, got.headers.get("X-Final")) == (200, HELLO, "yes")
        assert "Link" not in got.headers  # the interim response's headers are not the final's
    assert upstream.connections == 1  # and the connection stays good for the next exchange


# --- 6. a body delimited by the connection's close -----------------------------------------------
async def test_a_close_delimited_body_arrives_whole_and_the_connection_is_not_pooled(
    serve, scripted
):
    body = bytes(range(256)) * 1024  # 256 KiB: several reads, past the reading high-water mark

    async def answer(seen: Seen) -> Reply:
        return Reply(
            b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + body, True
        )

    upstream = await scripted(answer)
    gw = await serve(point_routes_at(upstream.url))
    for _ in range(2):
        got = await call(gw, "/public/x")
        assert (got.status, len(got.body), got.body == body) == (200, len(body), True)
    assert upstream.connections == 2
    pool = only_pool(gw)
    await wait_until(lambda: (pool.open, pool.idle) == (0, 0), what="nothing pooled")


# --- 7. nothing added to the request ---------------------------------------------------------------
async def raw_exchange(gw: RunningGateway, data: bytes) -> int:
    client = await RawConnection.open(gw.port)
    try:
        await client.send(data)
        return (await client.response(within=5)).status
    finally:
        await client.close()


def names(seen: Seen) -> list[str]:
    return sorted(name.lower() for name, _ in seen.headers)


# The gateway adds these to every request (traceparent: the W3C trace context it continues).
FORWARDING = [
    "traceparent",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
]


async def test_a_bare_get_reaches_the_upstream_with_only_host_and_forwarding_headers(
    serve, scripted
):
    upstream = await scripted(always_hello)
    gw = await serve(point_routes_at(upstream.url))
    assert await raw_exchange(gw, b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n") == 200
    (seen,) = upstream.seen
    # Compared as sorted names: the order the gateway writes them in does not matter.
    assert names(seen) == sorted(["host", *FORWARDING])
    assert seen.values("Host") == [f"127.0.0.1:{upstream.raw.port}"]
    assert seen.values("X-Forwarded-Host") == ["gw.test"]
    assert (seen.method, seen.target, seen.body) == ("GET", "/public/x", b"")


async def test_a_post_with_content_length_arrives_with_exactly_one_content_length(serve, scripted):
    upstream = await scripted(always_hello)
    gw = await serve(point_routes_at(upstream.url))
    request = b"POST /public/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 7\r\n\r\npayload"
    assert await raw_exchange(gw, request) == 200
    (seen,) = upstream.seen
    assert names(seen) == sorted(["host", "content-length", *FORWARDING])
    assert seen.values("Content-Length") == ["7"]
    assert seen.body == b"payload"


async def test_a_chunked_post_arrives_chunked_with_the_same_bytes(serve, scripted):
    upstream = await scripted(always_hello)
    gw = await serve(point_routes_at(upstream.url))
    request = (
        b"POST /public/x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    )
    assert await raw_exchange(gw, request) == 200
    (seen,) = upstream.seen
    assert names(seen) == sorted(["host", "transfer-encoding", *FORWARDING])
    assert seen.values("Transfer-Encoding") == ["chunked"]
    assert seen.body == b"hello, world"


# --- 8. an upstream that answers before taking the body ------------------------------------------
TOO_LARGE = b"too large"


class EarlyAnswer:
    """Reads the head of a POST, answers 413 (after ``latency`` seconds: how long it takes to
    decide) and reads nothing more of that connection; a GET is answered normally."""

    def __init__(self) -> None:
        self.latency = 0.0
        self.on_cue = False  # a POST waits in ``held`` for the test to answer it
        self.held: list[asyncio.StreamWriter] = []
        self.raw = RawUpstream(self._serve)
        self.methods: list[tuple[str, int]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.raw.connections
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        for _ in range(100):
            try:
                head = await read_request_head(reader)
            except asyncio.IncompleteReadError:
                writer.close()
                return
            method, _, headers = parse_head(head)
            self.methods.append((method, number))
            if method == "POST":
                if self.on_cue:
                    self.held.append(writer)
                else:
                    if self.latency:
                        await asyncio.sleep(self.latency)  # the upstream's own latency
                    writer.write(response(TOO_LARGE, status="413 Content Too Large"))
                    await writer.drain()
                # Never read the body; wait for the gateway to drop the connection.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 10)
                return
            await read_body(reader, headers)
            writer.write(response())
            await writer.drain()

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.raw.close()


async def pieces(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b"u" * size


@pytest.fixture
async def early() -> AsyncIterator[EarlyAnswer]:
    upstream = EarlyAnswer()
    yield upstream
    await upstream.close()


async def test_an_upstream_answering_before_the_body_is_relayed_and_not_reused(serve, early):
    url = await early.raw.start()
    gw = await serve(point_routes_at(url), set_upstream_defaults(timeout_s=5))
    started = time.monotonic()
    got = await call(
        gw, "/public/upload", "POST", data=pieces(2 * MIB), headers={"Content-Length": str(2 * MIB)}
    )
    assert (got.status, got.body) == (413, TOO_LARGE)  # the upstream's answer, as it sent it
    assert time.monotonic() - started < 3  # at once, not after timeout_s
    got = await call(gw, "/public/next")
    assert (got.status, got.body) == (200, HELLO)
    assert early.methods == [("POST", 1), ("GET", 2)]  # the next request: a new connection


async def test_an_early_answer_reaches_a_client_still_holding_back_its_body(serve, early):
    """The client sends the head and 64 KiB of a 2 MiB body, then waits: the upstream's 413
    reaches it without the gateway waiting for the rest (nor for client_body_timeout_s)."""
    url = await early.raw.start()
    gw = await serve(
        point_routes_at(url),
        set_upstream_defaults(timeout_s=5),
        set_limits(client_body_timeout_s=3),
    )
    client = await RawConnection.open(gw.port)
    try:
        await client.send(
            b"POST /public/upload HTTP/1.1\r\nHost: gw.test\r\n"
            + f"Content-Length: {2 * MIB}\r\n\r\n".encode()
            + b"u" * (64 * 1024)
        )
        got = await client.response(within=1.5)
        assert (got.status, got.body) == (413, TOO_LARGE)
    finally:
        await client.close()


def half_close(client: RawConnection) -> None:
    """The client's FIN, sent now (a StreamWriter's close waits for the loop to run)."""
    client.writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)


def hold_the_loop() -> None:
    """Block the event loop: what was just sent reaches the gateway's sockets before its loop
    polls them again, so it handles all of it in one turn (as a busy loop would)."""
    time.sleep(0.05)  # blocking the loop is the point


async def counted_client_disconnected(gw: RunningGateway) -> None:
    """The request is counted once, as client_disconnected and not as served."""

    def counted(reason: str) -> float:
        return float(gw.metric("gateway_requests_total", route="public", reason=reason))

    await wait_until(lambda: counted("client_disconnected") == 1, what="the request counted")
    assert counted("ok") == 0


async def test_a_client_leaving_as_the_early_answer_arrives_is_not_answered(serve, early):
    """The client leaves in the same turn of the event loop as the upstream's early 413
    arrives: the upload stops for both reasons at once, and the client's leaving wins (the
    request is cancelled, counted as client_disconnected, with no upstream answer relayed)."""
    early.on_cue = True
    url = await early.raw.start()
    gw = await serve(point_routes_at(url), set_upstream_defaults(timeout_s=5))
    client = await RawConnection.open(gw.port)
    await client.send(
        b"POST /public/upload HTTP/1.1\r\nHost: gw.test\r\n"
        + f"Content-Length: {2 * MIB}\r\n\r\n".encode()
        + b"u" * (64 * 1024)
    )
    await wait_until(lambda: bool(early.held), what="the upload's head reached the upstream")
    # The client's close first, then the answer: the gateway's next poll sees both sockets
    # ready, in this order, and handles them in one turn.
    half_close(client)
    early.held[0].write(response(TOO_LARGE, status="413 Content Too Large"))
    hold_the_loop()
    try:
        await counted_client_disconnected(gw)
        # The 413 was read but never relayed: no upstream answer is recorded for the route.
        assert gw.metric("gateway_upstream_responses_total", route="public", code_class="4xx") == 0
    finally:
        await client.close()


class Cued:
    """Reads one request head per connection and answers only when the test writes to
    ``held`` (its writers, in order); then waits for the gateway to close."""

    def __init__(self) -> None:
        self.held: list[asyncio.StreamWriter] = []
        self.raw = RawUpstream(self._serve)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        self.held.append(writer)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()

    async def close(self) -> None:
        for writer in self.held:
            writer.transport.abort()
        await self.raw.close()


@pytest.fixture
async def cued() -> AsyncIterator[Cued]:
    upstream = Cued()
    yield upstream
    await upstream.close()


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [response(), CHUNKED + b"5\r\nhello\r\n0\r\n\r\n", CHUNKED + b"0\r\n\r\n"],
    ids=["length", "chunked", "empty-chunked"],  # the last: found at the response's end
)
async def test_a_client_leaving_as_the_answer_arrives_is_counted_client_disconnected(
    serve, cued, answer
):
    """The whole answer arrives in the same turn of the event loop as the client's close:
    the relay finds the client's connection closing before it is lost, and the request is
    counted as client_disconnected, not as served."""
    url = await cued.raw.start()
    gw = await serve(point_routes_at(url))
    client = await RawConnection.open(gw.port)
    await client.send(b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    await wait_until(lambda: bool(cued.held), what="the request reached the upstream")
    # The answer first, then the client's close: handled in this order, in one turn.
    cued.held[0].write(answer)
    half_close(client)
    hold_the_loop()
    try:
        await counted_client_disconnected(gw)
    finally:
        await client.close()


async def test_an_answer_given_after_the_upload_stalled_is_relayed(serve, early):
    """The upstream reads none of a 32 MiB body and answers 413 half a second later, when every
    buffer between them is full and the gateway waits for it to take more."""
    early.latency = 0.5
    url = await early.raw.start()
    gw = await serve(
        point_routes_at(url),
        set_upstream_defaults(timeout_s=3),
        set_route("public", max_body_bytes=64 * MIB),
    )
    started = time.monotonic()
    got = await call(
        gw,
        "/public/upload",
        "POST",
        data=pieces(32 * MIB),
        headers={"Content-Length": str(32 * MIB)},
    )
    assert (got.status, got.body) == (413, TOO_LARGE)
    assert time.monotonic() - started < 2.5  # not after timeout_s


# --- 9. route bounds across reloads ----------------------------------------------------------------
def reloaded(idp: FakeIdP, echo: EchoUpstream, *edits: Edit) -> Any:
    document = base_config(idp, echo)
    for edit in edits:
        edit(document)
    return loads_config(yaml.safe_dump(document))


async def test_a_reload_keeps_the_in_flight_bound_of_an_unchanged_route(
    serve, scripted, idp, upstream
):
    hold = Hold()
    raw = await scripted(hold)
    bound = (
        point_routes_at(raw.url),
        set_route("public", max_concurrent_requests=1, max_queued_requests=0),
    )
    gw = await serve(*bound)
    first = asyncio.create_task(call(gw, "/public/hold"))
    try:
        await hold.wait_entered()
        # An unrelated change: one route more.  "public" keeps its id and its limits.
        gw.app[GATEWAY_KEY].apply(
            reloaded(idp, upstream, add_public_route("other", "/other"), *bound)
        )
        got = await call(gw, "/public/x")
        assert (got.status, got.reason) == (503, "upstream_overloaded")
        assert (await call(gw, "/other/x")).status == 200  # the reload did take effect
    finally:
        hold.release.set()
    assert (await first).status == 200
    assert (await call(gw, "/public/x")).status == 200
    assert hold.held == 1


async def test_a_reload_raising_the_bound_admits_a_second_request_at_once(
    serve, scripted, idp, upstream
):
    hold = Hold()
    raw = await scripted(hold)
    gw = await serve(
        point_routes_at(raw.url),
        set_route("public", max_concurrent_requests=1, max_queued_requests=0),
    )
    first = asyncio.create_task(call(gw, "/public/hold"))
    try:
        await hold.wait_entered()
        assert (await call(gw, "/public/x")).status == 503
        gw.app[GATEWAY_KEY].apply(
            reloaded(
                idp,
                upstream,
                point_routes_at(raw.url),
                set_route("public", max_concurrent_requests=2, max_queued_requests=0),
            )
        )
        got = await call(gw, "/public/x")
        assert (got.status, got.body) == (200, HELLO)
        assert not first.done()  # admitted beside the first, which is still in flight
    finally:
        hold.release.set()
    assert (await first).status == 200


async def test_a_reload_raising_the_queue_bound_queues_what_it_refused(
    serve, scripted, idp, upstream
):
    hold = Hold()
    raw = await scripted(hold)
    gw = await serve(
        point_routes_at(raw.url),
        set_route("public", max_concurrent_requests=1, max_queued_requests=0),
    )
    assert gw.runner.server is not None
    first = asyncio.create_task(call(gw, "/public/hold"))
    queued: list[asyncio.Task[Got]] = []
    try:
        await hold.wait_entered()
        assert (await call(gw, "/public/x")).status == 503  # no queue yet
        gw.app[GATEWAY_KEY].apply(
            reloaded(
                idp,
                upstream,
                point_routes_at(raw.url),
                set_route("public", max_concurrent_requests=1, max_queued_requests=2),
            )
        )
        handled = gw.runner.server.requests_count
        queued = [asyncio.create_task(call(gw, f"/public/q{n}")) for n in range(2)]
        await wait_until(
            lambda: gw.runner.server.requests_count == handled + 2, what="two requests queued"
        )
        got = await call(gw, "/public/full")  # the new queue of two is full
        assert (got.status, got.reason) == (503, "upstream_overloaded")
        assert not any(task.done() for task in queued)
    finally:
        hold.release.set()
    assert (await first).status == 200
    assert [(await task).status for task in queued] == [200, 200]


async def test_a_route_a_reload_adds_has_its_own_bounds_from_the_first_request(
    serve, scripted, idp, upstream
):
    hold = Hold()
    raw = await scripted(hold)
    gw = await serve(point_routes_at(raw.url))
    gw.app[GATEWAY_KEY].apply(
        reloaded(
            idp,
            upstream,
            add_public_route("added", "/added"),
            point_routes_at(raw.url),
            set_route("added", max_concurrent_requests=1, max_queued_requests=0),
        )
    )
    first = asyncio.create_task(call(gw, "/added/hold"))
    try:
        await hold.wait_entered()
        got = await call(gw, "/added/x")  # its one slot is taken and it has no queue
        assert (got.status, got.reason) == (503, "upstream_overloaded")
    finally:
        hold.release.set()
    assert (await first).status == 200


# --- 10. upstream failures as reasons --------------------------------------------------------------
async def test_a_response_head_later_than_timeout_s_is_504(serve, scripted, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    hold = Hold()
    raw = await scripted(hold)
    gw = await serve(point_routes_at(raw.url), set_upstream_defaults(timeout_s=0.3))
    try:
        started = time.monotonic()
        got = await call(gw, "/public/hold")
        assert (got.status, got.reason) == (504, "upstream_timeout")
        assert time.monotonic() - started < 2.5
        assert logged(caplog)["detail"] == "no_response_in_time"
    finally:
        hold.release.set()


async def test_a_refused_connection_is_502(serve, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    gw = await serve(point_routes_at(f"http://127.0.0.1:{free_port()}"))
    got = await call(gw, "/public/x")
    assert (got.status, got.reason) == (502, "upstream_unavailable")
    assert logged(caplog)["detail"] == "ConnectionRefusedError"


@contextlib.contextmanager
def unaccepting_listener() -> Any:
    """A loopback port whose accept queue is full (backlog 0, one connection never accepted):
    the kernel drops further SYNs, so a connect there neither succeeds nor fails."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.settimeout(2)
        filler.connect(("127.0.0.1", port))
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel accepts past a full backlog: no connect timeout to provoke")
        finally:
            probe.close()
        yield port
    finally:
        filler.close()
        listener.close()


async def test_a_connect_not_completed_in_connect_timeout_s_is_504(serve, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    with unaccepting_listener() as port:
        gw = await serve(
            point_routes_at(f"http://127.0.0.1:{port}"),
            set_upstream_defaults(connect_timeout_s=0.2),
        )
        started = time.monotonic()
        got = await call(gw, "/public/x")
        assert (got.status, got.reason) == (504, "upstream_timeout")
        assert time.monotonic() - started < 2
        assert logged(caplog)["detail"] == "connect_timeout"  # not a slow answer
        pool = only_pool(gw)
        assert (pool.open, pool.waiting) == (0, 0)  # the slot of the failed connect came back
