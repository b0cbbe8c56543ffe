"""Edges of the upstream hop that a well-behaved upstream never shows: what an upstream's ``101``
may not pass on, bytes a client sends before the ``101``, and a response cut off mid-head.

Raw asyncio upstreams write exactly the bytes each test needs; the client is a raw socket, so
the test reads the gateway's answer byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.logs import REQUEST_LOGGER
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes import EchoUpstream
from tests.integration.authkit import logged
from tests.integration.e2e_helpers import wait_until
from tests.integration.hardening_kit import (
    CHUNKED_FIRST_PART,
    RawBehaviour,
    RawUpstream,
    echo_download_sha256,
    point_routes_at,
    read_all,
    read_first_part,
    read_request_head,
    reset,
    set_limits,
    set_route,
)

WITHIN = 5.0

HANDSHAKE = (
    b"GET /public/ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"X-Request-ID: client-chosen-1\r\n\r\n"
)
UPSTREAM_101 = (  # the reason phrase some servers write (Socket.IO, old Jetty)
    b"HTTP/1.1 101 Web Socket Protocol Handshake\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Request-ID: upstream-chosen\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[list[RawUpstream]]:
    started: list[RawUpstream] = []
    yield started
    for upstream in started:
        await upstream.close()


async def through(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream], behaviour: RawBehaviour
) -> tuple[RunningGateway, asyncio.StreamReader, asyncio.StreamWriter]:
    """A gateway whose routes lead to a raw upstream doing ``behaviour``, and a raw client
    connection to it."""
    upstream = RawUpstream(behaviour)
    raw_upstreams.append(upstream)
    gw = await make_gateway(point_routes_at(await upstream.start()), served=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    return gw, reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def head_fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines if line)
    ]


async def test_a_101_passes_on_no_hop_by_hop_header_and_no_upstream_request_id(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    relayed: list[bytes] = []

    async def accept_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(UPSTREAM_101)
        relayed.append(await asyncio.wait_for(reader.readexactly(5), WITHIN))
        writer.write(b"pong!")
        await writer.drain()
        writer.close()

    _, reader, writer = await through(make_gateway, raw_upstreams, accept_then_echo)
    try:
        writer.write(HANDSHAKE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        fields = head_fields(head)
        # The status line as the upstream wrote it, reason phrase and all.
        assert head.startswith(b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n")
        names = [name for name, _ in fields]
        # The gateway's own Connection and Upgrade, once each; the upstream's connection-level
        # headers and its request id stay on the upstream's side.
        assert [v for n, v in fields if n == "connection"] == ["Upgrade"]
        assert [v for n, v in fields if n == "upgrade"] == ["websocket"]
        assert "keep-alive" not in names
        assert "proxy-authenticate" not in names
        assert [v for n, v in fields if n == "x-request-id"] == ["client-chosen-1"]
        assert ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in fields
        writer.write(b"ping!")
        assert await asyncio.wait_for(reader.readexactly(5), WITHIN) == b"pong!"
        assert relayed == [b"ping!"]
    finally:
        await close(writer)


async def test_a_client_that_drops_its_tunnel_ends_it_as_client_closed(
    make_gateway: GatewayFactory,
    raw_upstreams: list[RawUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No WebSocket close handshake: the client's TCP connection just ends. The tunnel ends
    with it, and the decision line says so."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    upstream_saw_eof = asyncio.Event()

    async def accept_then_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(UPSTREAM_101)
        await writer.drain()
        await reader.read()  # until the gateway closes the tunnel's upstream side
        upstream_saw_eof.set()
        writer.close()

    gw, reader, writer = await through(make_gateway, raw_upstreams, accept_then_wait)
    writer.write(HANDSHAKE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    assert head.startswith(b"HTTP/1.1 101 ")
    await close(writer)
    await asyncio.wait_for(upstream_saw_eof.wait(), WITHIN)
    await wait_until(lambda: gw.metric("gateway_tunnels_open") == 0, what="tunnel closed")
    fields = logged(caplog)
    assert (fields["status"], fields["reason"]) == ("101", "ok")
    assert fields["detail"] == "tunnel_client_closed"


async def test_a_101_with_no_reason_phrase_reaches_the_client_as_switching_protocols(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """RFC 9112 §4 lets the upstream leave the reason phrase empty; the client's status line
    still names one."""

    async def accept_with_no_reason(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 101 \r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        await writer.drain()
        writer.close()

    _, reader, writer = await through(make_gateway, raw_upstreams, accept_with_no_reason)
    try:
        writer.write(HANDSHAKE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    finally:
        await close(writer)


async def test_more_early_bytes_than_the_read_pause_holds_all_reach_the_upstream_after_its_101(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """Past 256 KiB sent before the 101 the gateway stops reading the client; the 101 starts
    reading again, and the tunnel carries every byte in order."""
    early = bytes(range(256)) * 4096  # 1 MiB
    received: list[bytes] = []

    async def accept_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(UPSTREAM_101)
        await writer.drain()
        received.append(await asyncio.wait_for(reader.readexactly(len(early)), WITHIN))
        writer.close()

    _, reader, writer = await through(make_gateway, raw_upstreams, accept_then_read)
    try:
        writer.write(HANDSHAKE + early)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 101 ")
        await wait_until(lambda: bool(received), within=WITHIN)
        assert received == [early]
    finally:
        await close(writer)


async def test_bytes_sent_with_the_handshake_reach_the_upstream_after_its_101(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    received: list[bytes] = []

    async def accept_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request_head(reader)
        assert b"early-frame" not in head  # held by the gateway until the upgrade is accepted
        writer.write(UPSTREAM_101)
        await writer.drain()
        received.append(await asyncio.wait_for(reader.readexactly(11), WITHIN))
        writer.close()

    _, reader, writer = await through(make_gateway, raw_upstreams, accept_then_read)
    try:
        writer.write(HANDSHAKE + b"early-frame")  # one write: the frame follows the head at once
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [b"early-frame"]
    finally:
        await close(writer)


async def test_a_response_cut_off_inside_its_head_on_a_reused_connection_is_not_sent_again(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """A pooled connection that closes before answering is retried once on a new one (the
    upstream never saw the request); one that had begun to answer is not: the upstream may
    have acted on it."""
    heads: list[bytes] = []

    async def answer_once_then_break(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        heads.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        heads.append(await read_request_head(reader))  # the second request, same connection
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        writer.close()

    upstream = RawUpstream(answer_once_then_break)
    raw_upstreams.append(upstream)
    gw = await make_gateway(point_routes_at(await upstream.start()), served=True)
    first = await gw.client.get("/public/one")
    assert first.status == 200
    second = await gw.client.get("/public/two")
    assert second.status == 502
    assert [head.split(b" ")[1] for head in heads] == [b"/public/one", b"/public/two"]
    assert upstream.connections == 1
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_unavailable") == 1


async def test_a_client_that_pauses_reading_then_reads_gets_the_whole_download(
    make_gateway: GatewayFactory, upstream: EchoUpstream
) -> None:
    """The gateway stops writing while the client's socket is full and goes on once the client
    reads again: a slow reader is served, not cut off (only one that stops for longer than
    limits.client_write_timeout_s is)."""
    size = 16 * 1024 * 1024
    upstream.mode = "download"
    upstream.download_bytes = size
    gw = await make_gateway(set_limits(client_write_timeout_s=3), served=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    try:
        writer.write(b"GET /public/download HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.5)  # not reading: the gateway's socket buffer fills, writing pauses
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await read_all(reader, size, WITHIN) == echo_download_sha256(size)
    finally:
        await close(writer)
    await wait_until(
        lambda: gw.metric("gateway_requests_total", route="public", reason="ok") == 1,
        what="the download counted as ok",
    )


def answering_once(raw: bytes) -> RawBehaviour:
    """An upstream that reads one request head, answers ``raw`` and closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(raw)
        await writer.drain()
        writer.close()

    return answer


def answering_in_turn(*answers: bytes) -> RawBehaviour:
    """An upstream that answers each request on a connection with the next of ``answers``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for raw in answers:
            await read_request_head(reader)
            writer.write(raw)
            await writer.drain()
        writer.close()

    return answer


async def test_headers_a_connection_value_names_are_dropped_each_time_and_only_then(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """The drops a Connection value makes are remembered per value: the same value names the
    same headers on the next response (X-Hop is no hop-by-hop name's length, so only the
    value's own names tell it apart), and a response that does not name one keeps it."""
    named = b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
    plain = b"HTTP/1.1 200 OK\r\nX-Hop: 2\r\nContent-Length: 2\r\n\r\nok"
    _, reader, writer = await through(
        make_gateway, raw_upstreams, answering_in_turn(named, named, plain)
    )
    try:
        seen = []
        for _ in range(3):
            writer.write(b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
            await asyncio.wait_for(reader.readexactly(2), WITHIN)
            seen.append(
                [(n, v) for n, v in head_fields(head) if n.startswith("x-") and n != "x-request-id"]
            )
        assert seen == [[("x-kept", "1")], [("x-kept", "1")], [("x-hop", "2")]]
    finally:
        await close(writer)


async def test_an_interim_responses_connection_names_nothing_in_the_final_one(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """A 103 is not relayed, and the headers its Connection names are not the final
    response's: the final one keeps X-Hint."""
    answer = answering_once(
        b"HTTP/1.1 103 Early Hints\r\nConnection: X-Hint\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Hint: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    _, reader, writer = await through(make_gateway, raw_upstreams, answer)
    try:
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert ("x-hint", "1") in head_fields(head)
    finally:
        await close(writer)


async def test_an_upstream_answers_connection_level_headers_stay_on_the_upstreams_side(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """RFC 9110 §7.6.1: the upstream's hop-by-hop headers, those its Connection header names,
    and its framing are not relayed; the gateway frames the answer itself (here: chunked, once)."""

    answer_with_hop_headers = answering_once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n"
        # One list with and without whitespace around its commas (RFC 9110 §5.6.1).
        b"Connection: keep-alive,X-Secret-Hop , X-Other-Hop\r\nX-Secret-Hop: 1\r\n"
        b"X-Other-Hop: 2\r\n"
        b"Proxy-Authenticate: Basic\r\nTrailer: X-Sum\r\nX-Request-ID: upstream-chosen\r\n"
        b"X-Kept: yes\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    _, reader, writer = await through(make_gateway, raw_upstreams, answer_with_hop_headers)
    try:
        writer.write(
            b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\nX-Request-ID: client-chosen-2\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        fields = head_fields(head)
        names = [name for name, _ in fields]
        assert head.startswith(b"HTTP/1.1 200 ")
        hops = ("keep-alive", "x-secret-hop", "x-other-hop", "proxy-authenticate", "trailer")
        for hop in (*hops, "connection"):
            assert hop not in names, hop
        assert [v for n, v in fields if n == "transfer-encoding"] == ["chunked"]
        assert [v for n, v in fields if n == "x-request-id"] == ["client-chosen-2"]
        assert ("x-kept", "yes") in fields
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WITHIN)
        assert body == b"2\r\nok\r\n0\r\n\r\n"
    finally:
        await close(writer)


async def test_a_content_length_the_upstream_calls_hop_by_hop_is_not_the_clients_framing(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """An upstream whose Connection header names Content-Length keeps that length to its own
    hop: the client's answer is framed by the gateway (chunked), not left with no framing."""

    answer_with_hop_length = answering_once(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Content-Length\r\n\r\nok"
    )
    _, reader, writer = await through(make_gateway, raw_upstreams, answer_with_hop_length)
    try:
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        names = [name for name, _ in head_fields(head)]
        assert head.startswith(b"HTTP/1.1 200 ")
        assert "content-length" not in names
        assert [v for n, v in head_fields(head) if n == "transfer-encoding"] == ["chunked"]
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WITHIN)
        assert body == b"2\r\nok\r\n0\r\n\r\n"
    finally:
        await close(writer)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the connection (a hang fails the test)."""
    return await asyncio.wait_for(reader.read(), WITHIN)


async def test_an_upstream_that_closes_right_after_its_101_ends_the_tunnel_and_frees_the_slot(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream writes its 101 and closes in the same breath: the client gets the 101 and
    then a clean close (the tunnel ends as the upstream leaves, or, had the gateway seen the
    close before the tunnel opened, a 502), never a hang or a traceback; the route's only
    admission slot is free again for the next request."""

    async def accept_then_leave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request_head(reader)
        if b"upgrade: websocket" in head.lower():
            writer.write(UPSTREAM_101)  # and the FIN right behind it
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        writer.close()

    upstream = RawUpstream(accept_then_leave)
    raw_upstreams.append(upstream)
    gw = await make_gateway(
        point_routes_at(await upstream.start()),
        set_route("public", max_concurrent_requests=1, max_queued_requests=1),
        served=True,
    )
    caplog.set_level(logging.WARNING)
    for _ in range(2):  # a second tunnel the same way: nothing of the first is left holding
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(HANDSHAKE)
            answer = await read_to_end(reader)
        finally:
            await close(writer)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), answer[:200]
        assert rest == b""  # the upstream sent nothing after its 101
    await wait_until(lambda: gw.metric("gateway_tunnels_open") == 0, what="tunnels closed")
    assert gw.metric("gateway_upgrades_total", route="public") == 2
    plain = await asyncio.wait_for(gw.client.get("/public/after"), WITHIN)
    assert plain.status == 200
    assert await plain.text() == "ok"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_101_without_an_upgrade_header_is_answered_502_not_tunnelled(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """RFC 9110 §7.8: a 101 must name the protocol it switches to.  One that does not is no
    handshake: the client gets 502 upstream_unavailable and a closed connection, and no
    tunnel is opened."""
    upstream_closed = asyncio.Event()

    async def switch_to_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        await writer.drain()
        await asyncio.wait_for(reader.read(), WITHIN)  # until the gateway hangs up
        upstream_closed.set()
        writer.close()

    gw, reader, writer = await through(make_gateway, raw_upstreams, switch_to_nothing)
    try:
        writer.write(HANDSHAKE)
        answer = await read_to_end(reader)
    finally:
        await close(writer)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert json.loads(body)["error"]["reason"] == "upstream_unavailable"
    await asyncio.wait_for(upstream_closed.wait(), WITHIN)
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_unavailable") == 1
    assert gw.metric("gateway_upgrades_total", route="public") == 0
    assert gw.metric("gateway_tunnels_open") == 0


async def test_header_bytes_that_are_not_utf_8_reach_the_upstream_as_sent(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream]
) -> None:
    """A header value with obs-text (RFC 9110 §5.5: bytes 0x80-0xFF, here Latin-1 "café" and a
    lone 0xFF, not UTF-8) is forwarded byte for byte, not refused, re-encoded or replaced."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    _, reader, writer = await through(make_gateway, raw_upstreams, answer)
    try:
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\nX-Name: caf\xe9 \xff\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nX-Name: caf\xe9 \xff\r\n" in heads[0]
    finally:
        await close(writer)


# --- each upstream failure says what went wrong ---------------------------------------------------
SWITCHING_UNASKED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
)
REQUEST = b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "behaviour", "detail"),
    [
        pytest.param(REQUEST, answering_once(b""), "upstream_closed", id="closed-unanswered"),
        pytest.param(
            REQUEST,
            answering_once(b"HTTP/1.1 2x0 OK\r\n\r\n"),
            "malformed_upstream_response",
            id="malformed-status-line",
        ),
        pytest.param(
            REQUEST, answering_once(SWITCHING_UNASKED), "upgrade_not_requested", id="unasked-101"
        ),
        pytest.param(
            HANDSHAKE,
            answering_once(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n"),
            "101_without_Upgrade",
            id="101-naming-no-protocol",
        ),
    ],
)
async def test_an_upstream_failure_is_logged_with_what_went_wrong(
    make_gateway: GatewayFactory,
    raw_upstreams: list[RawUpstream],
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    behaviour: RawBehaviour,
    detail: str,
) -> None:
    """The decision line's detail names the upstream's fault, so an operator can tell a
    closed connection from a reset, a malformed answer or a handshake gone wrong."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    gw, reader, writer = await through(make_gateway, raw_upstreams, behaviour)
    try:
        writer.write(request_bytes)
        answer = await read_to_end(reader)
    finally:
        await close(writer)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    fields = logged(caplog)
    assert (fields["reason"], fields["detail"]) == ("upstream_unavailable", detail)
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_unavailable") == 1
    # A new connection's failure is not retried (only a reused one's may have gone stale).
    assert raw_upstreams[0].connections == 1


@pytest.mark.parametrize("cut", ["close", "reset"])
async def test_a_close_delimited_body_cut_off_upstream_reaches_the_client_as_a_reset(
    make_gateway: GatewayFactory,
    raw_upstreams: list[RawUpstream],
    caplog: pytest.LogCaptureFixture,
    cut: str,
) -> None:
    """An HTTP/1.0 client gets an unframed body that ends with the connection, so an orderly
    close after a cut would read as the whole body: when the upstream's chunked body stops
    short (the upstream closes or resets mid-body), the client's connection is reset, and its
    read fails after the bytes that came, instead of ending cleanly."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    client_has_part = asyncio.Event()

    async def cut_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(CHUNKED_FIRST_PART)
        await writer.drain()
        await asyncio.wait_for(client_has_part.wait(), WITHIN)
        if cut == "reset":
            reset(writer)
        else:
            writer.close()  # an orderly close, with the last chunk never sent

    gw, reader, writer = await through(make_gateway, raw_upstreams, cut_mid_body)
    try:
        writer.write(b"GET /public/x HTTP/1.0\r\nHost: gw.test\r\n\r\n")
        await read_first_part(reader, "1.0", WITHIN)
        client_has_part.set()
        with pytest.raises(ConnectionResetError):
            await read_to_end(reader)
    finally:
        await close(writer)
    fields = logged(caplog)
    assert fields["reason"] == "upstream_aborted"
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1


async def test_an_upstream_reset_mid_body_is_logged_as_a_reset(
    make_gateway: GatewayFactory, raw_upstreams: list[RawUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    """After the status line the client's answer can only be cut; the log still says why."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    client_has_head = asyncio.Event()

    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
        await writer.drain()
        await asyncio.wait_for(client_has_head.wait(), WITHIN)
        reset(writer)  # a reset, not a clean close

    gw, reader, writer = await through(make_gateway, raw_upstreams, reset_mid_body)
    try:
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
        assert head.startswith(b"HTTP/1.1 200 "), head
        client_has_head.set()
        rest = await read_to_end(reader)
    finally:
        await close(writer)
    assert len(rest) < 9  # fewer bytes than declared: a cut stream, not a complete answer
    fields = logged(caplog)
    assert (fields["reason"], fields["detail"]) == ("upstream_aborted", "ConnectionResetError")
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1
