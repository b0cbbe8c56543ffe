"""The gateway's own HTTP/1.1 listener (gateway/server.py) through real sockets: what it refuses
before any route and how (status, fixed body, reason, metric, one log line, the connection
closed, nothing forwarded), pipelining, the connection cap, refusals that do not drain a body,
and response framing (chunked to HTTP/1.1, close-delimited to HTTP/1.0) without added headers.

The idle timer (``limits.client_idle_timeout_s``, a head that never completes) is covered in
test_limits.py; a bare upstream answer relayed without added headers in test_proxy_flow.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

import pytest

from gateway.logs import REQUEST_LOGGER
from gateway.metrics import UNMATCHED_ROUTE
from gateway.reasons import REASON_SPECS, Reason
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes import EchoUpstream
from tests.integration.authkit import (
    RawConnection,
    RawResponse,
    assert_not_logged,
    decision_lines,
    echoed,
    logged,
    requests_total,
    send_raw,
    values_of,
)
from tests.integration.e2e_helpers import wait_until
from tests.integration.hardening_kit import (
    RawUpstream,
    point_routes_at,
    read_request_head,
    set_limits,
)

# Put in every refused request: none of the client's bytes may reach a log record.
MARKER = "zq7-client-bytes-marker"
HOST = "Host: gateway.test"
WITHIN = 3.0  # the bound on every wait for the gateway's answer or its close

# Written out by hand, not derived from the gateway's table.
STATUS = {
    Reason.REQUEST_MALFORMED: 400,
    Reason.REQUEST_REJECTED: 400,
    Reason.HEADERS_TOO_LARGE: 431,
    Reason.VERSION_NOT_SUPPORTED: 505,
    Reason.TRANSFER_CODING_NOT_SUPPORTED: 501,
    Reason.TOO_MANY_CONNECTIONS: 503,
}


@pytest.fixture
def serve(make_gateway: GatewayFactory) -> GatewayFactory:
    async def start(*edits: Any) -> RunningGateway:
        return await make_gateway(*edits, served=True, admin=False)

    return start


def request(line: str, *headers: str, body: bytes = b"") -> bytes:
    """A request head made of exactly these lines (CRLF-terminated), then ``body``."""
    return ("\r\n".join((line, *headers)) + "\r\n\r\n").encode("latin-1") + body


def get(path: str, *headers: str) -> bytes:
    return request(f"GET {path} HTTP/1.1", HOST, *headers)


def assert_fixed_answer(reply: RawResponse, reason: Reason) -> None:
    """The listener's own refusal: status, fixed JSON body, ``Connection: close``, no Server."""
    assert reply.status == STATUS[reason], reply
    assert reply.reason == HTTPStatus(STATUS[reason]).phrase  # e.g. "400 Bad Request"
    assert reply.json() == {
        "error": {
            "code": STATUS[reason],
            "reason": reason.value,
            "message": REASON_SPECS[reason].message,
        }
    }
    assert reply.headers.get("Content-Type") == "application/json"
    assert reply.headers.getall("Connection", []) == ["close"]
    assert "Server" not in reply.headers


def assert_counted_and_logged_once(
    gw: RunningGateway, reason: Reason, caplog: pytest.LogCaptureFixture, detail: str
) -> None:
    assert gw.metric("gateway_requests_total", route=UNMATCHED_ROUTE, reason=reason.value) == 1
    assert requests_total(gw) == 1  # under _unmatched only, not under a route as well
    [record] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    line = record.getMessage()
    fields = dict(part.split("=", 1) for part in line.split())
    spec = REASON_SPECS[reason]
    assert record.levelno == spec.log_level
    assert fields["event"] == "request"
    assert fields["route"] == UNMATCHED_ROUTE
    assert fields["reason"] == reason.value
    assert (fields["status"], fields["outcome"]) == (str(STATUS[reason]), spec.outcome.value)
    assert (fields["granted"], fields["peer"]) == ("false", "127.0.0.1")
    assert f"detail={detail}" in line  # refused by the rule under test, not another one
    assert_not_logged(caplog, MARKER)


async def refuse(gw: RunningGateway, data: bytes) -> tuple[RawResponse, bytes]:
    """Send ``data`` on a new connection; the one answer, and what came after it before the
    server closed the connection (fails unless it closes within ``WITHIN``)."""
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(data)
        reply = await conn.response(within=WITHIN)
        _, rest = await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    return reply, rest


async def assert_refused_before_any_route(
    gw: RunningGateway,
    upstream: EchoUpstream,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    reason: Reason,
    detail: str,
) -> None:
    assert MARKER.encode() in data  # the log check below means something
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    reply, rest = await refuse(gw, data)
    assert_fixed_answer(reply, reason)
    assert rest == b""  # nothing after the answer, then the close
    assert_counted_and_logged_once(gw, reason, caplog, detail)
    assert upstream.hits == 0  # decided (answered) above: nothing was forwarded


# --- 1. malformed requests ------------------------------------------------------------------------
# Each case: the bytes, and the logged detail naming the rule that refused it (llhttp's words,
# made one token by the log's escaping; the gateway's own for what it checks itself).
M = MARKER
MALFORMED = {
    "bare-lf": (
        f"GET /public/{M} HTTP/1.1\nHost: gateway.test\nX-Note: {M}\n\n".encode(),
        "Expected_CRLF_after_version",
    ),
    "obs-fold": (
        request(f"GET /public/{M} HTTP/1.1", HOST, "X-Note: a", f" {M}"),
        "Unexpected_whitespace_after_header_value",
    ),
    "space-before-colon": (
        request(f"GET /public/{M} HTTP/1.1", HOST, f"X-Note : {M}"),
        "Invalid_header_token",
    ),
    "nul-in-value": (
        request(f"GET /public/{M} HTTP/1.1", HOST, f"X-Note: a\x00{M}"),
        "Invalid_header_value_char",
    ),
    "content-length-and-chunked": (
        request(
            f"POST /public/{M} HTTP/1.1",
            HOST,
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            body=f"{len(M):x}\r\n{M}\r\n0\r\n\r\n".encode(),
        ),
        "Transfer-Encoding_cant_be_present_with_Content-Length",
    ),
    "two-content-lengths": (
        request(
            f"POST /public/{M} HTTP/1.1",
            HOST,
            f"Content-Length: {len(M)}",
            f"Content-Length: {len(M)}",
            body=M.encode(),
        ),
        "Duplicate_Content-Length",
    ),
    "non-numeric-content-length": (
        request(f"POST /public/{M} HTTP/1.1", HOST, "Content-Length: 1x", body=M.encode()),
        "Invalid_character_in_Content-Length",
    ),
    "lowercase-method": (
        request(f"get /public/{M} HTTP/1.1", HOST),
        "Invalid_method_encountered",
    ),
    "malformed-chunk-size": (
        request(
            f"POST /public/{M} HTTP/1.1",
            HOST,
            "Transfer-Encoding: chunked",
            body=f"zz\r\n{M}\r\n0\r\n\r\n".encode(),
        ),
        "Invalid_character_in_chunk_size",
    ),
}


@pytest.mark.parametrize(("data", "detail"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_400_counted_logged_once_and_closed(
    serve, upstream, caplog, data, detail
):
    gw = await serve()
    await assert_refused_before_any_route(
        gw, upstream, caplog, data, Reason.REQUEST_MALFORMED, detail
    )


# --- 2. versions, transfer codings, Host ------------------------------------------------------
CHUNKED_X = b"1\r\nx\r\n0\r\n\r\n"
FRAMING = {
    # llhttp reads a request line without a version as HTTP/0.9; the gateway refuses it.
    "http-0.9": (
        f"GET /public/{M}\r\n\r\n".encode(),
        Reason.VERSION_NOT_SUPPORTED,
        "HTTP/0.9",
    ),
    "http-2.0": (
        request(f"GET /public/{M} HTTP/2.0", HOST),
        Reason.VERSION_NOT_SUPPORTED,
        "HTTP/2.0",
    ),
    # llhttp itself refuses versions other than 0.9, 1.0, 1.1 and 2.0.
    "http-1.2": (
        request(f"GET /public/{M} HTTP/1.2", HOST),
        Reason.REQUEST_MALFORMED,
        "Invalid_HTTP_version",
    ),
    "http-3.0": (
        request(f"GET /public/{M} HTTP/3.0", HOST),
        Reason.REQUEST_MALFORMED,
        "Invalid_HTTP_version",
    ),
    "gzip-then-chunked": (
        request(
            f"POST /public/{M} HTTP/1.1", HOST, "Transfer-Encoding: gzip, chunked", body=CHUNKED_X
        ),
        Reason.TRANSFER_CODING_NOT_SUPPORTED,
        "transfer_coding",
    ),
    "gzip-then-chunked-without-spaces": (
        request(
            f"POST /public/{M} HTTP/1.1", HOST, "Transfer-Encoding: gzip,chunked", body=CHUNKED_X
        ),
        Reason.TRANSFER_CODING_NOT_SUPPORTED,
        "transfer_coding",
    ),
    "two-codings-then-chunked": (
        request(
            f"POST /public/{M} HTTP/1.1",
            HOST,
            "Transfer-Encoding: gzip, deflate, chunked",
            body=CHUNKED_X,
        ),
        Reason.TRANSFER_CODING_NOT_SUPPORTED,
        "transfer_coding",
    ),
    # A target byte outside ASCII (here Latin-1 "é"): llhttp refuses it, so the target the
    # gateway decodes is ASCII.
    "non-ascii-target": (
        request(f"GET /public/{M}/caf\u00e9 HTTP/1.1", HOST),
        Reason.REQUEST_MALFORMED,
        "Invalid_char_in_url_path",
    ),
    # CONNECT asks for a tunnel to any host: refused at its head, before any route.
    "connect": (
        request(f"CONNECT {M}.test:443 HTTP/1.1", f"Host: {M}.test:443"),
        Reason.REQUEST_REJECTED,
        "CONNECT",
    ),
    "two-te-headers": (
        request(
            f"POST /public/{M} HTTP/1.1",
            HOST,
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: chunked",
            body=CHUNKED_X,
        ),
        Reason.TRANSFER_CODING_NOT_SUPPORTED,
        "transfer_coding",
    ),
    "te-on-http-1.0": (
        request(f"POST /public/{M} HTTP/1.0", HOST, "Transfer-Encoding: chunked", body=CHUNKED_X),
        Reason.REQUEST_MALFORMED,
        "Transfer-Encoding_on_HTTP/1.0",
    ),
    "no-host-on-1.1": (
        request(f"GET /public/{M} HTTP/1.1", "X-Note: no host"),
        Reason.REQUEST_MALFORMED,
        "not_exactly_one_Host",
    ),
    "two-hosts": (
        request(f"GET /public/{M} HTTP/1.1", HOST, "Host: other.test"),
        Reason.REQUEST_MALFORMED,
        "not_exactly_one_Host",
    ),
}
FRAMING_CASES = [pytest.param(*case, id=name) for name, case in FRAMING.items()]
FRAMING_CASES.append(
    # RFC 9112 6.3: a request whose final coding is not chunked has no determinable length:
    # 400 and close (llhttp: "Request has invalid `Transfer-Encoding`").  501 is for a coding
    # not understood in a request that is otherwise framed (the two cases above).
    pytest.param(
        request(f"POST /public/{M} HTTP/1.1", HOST, "Transfer-Encoding: gzip", body=b"x"),
        Reason.REQUEST_MALFORMED,
        "Request_has_invalid_",
        id="gzip-alone",
    )
)


@pytest.mark.parametrize(("data", "reason", "detail"), FRAMING_CASES)
async def test_version_coding_and_host_refusals(serve, upstream, caplog, data, reason, detail):
    gw = await serve()
    await assert_refused_before_any_route(gw, upstream, caplog, data, reason, detail)


async def test_the_framings_next_to_the_refused_ones_are_served(serve, upstream):
    """The controls of the two tests above: each refusal is of its case, not of the request."""
    gw = await serve()
    close = "Connection: close"
    served = [
        request("GET /public/a HTTP/1.0"),  # HTTP/1.0 needs no Host
        request(
            "POST /public/b HTTP/1.1", HOST, close, "Transfer-Encoding: chunked", body=CHUNKED_X
        ),
        request("POST /public/c HTTP/1.1", HOST, close, "Content-Length: 1", body=b"x"),
        request("GET /public/d HTTP/1.1", HOST, close, "X-Note: a b\tc"),
        # A trailer section is read and not forwarded.
        request(
            "POST /public/e HTTP/1.1",
            HOST,
            close,
            "Transfer-Encoding: chunked",
            body=b"1\r\nx\r\n0\r\nX-Trailer: t\r\n\r\n",
        ),
    ]
    for data in served:
        reply, _ = await refuse(gw, data)
        assert reply.status == 200, (data, reply)
    assert upstream.hits == len(served)


async def test_the_upstream_is_told_the_host_the_client_named(serve, upstream):
    gw = await serve()
    reply, _ = await refuse(gw, get("/public/x", "Connection: close"))
    assert values_of(echoed(reply), "X-Forwarded-Host") == ["gateway.test"]
    assert values_of(echoed(reply), "X-Forwarded-Proto") == ["http"]  # a plain listener
    # An HTTP/1.0 request may name no host: the address it reached stands in.
    bare, _ = await refuse(gw, request("GET /public/x HTTP/1.0"))
    assert values_of(echoed(bare), "X-Forwarded-Host") == [f"127.0.0.1:{gw.port}"]


# --- 3. header limits -------------------------------------------------------------------------
LIMITED = {
    "header-line": (get(f"/public/{M}", "X-Big: " + "a" * 3000), "header_line_too_long"),
    "request-line": (get(f"/public/{M}/" + "a" * 3000), "request_line_too_long"),
    "header-line-one-over": (get(f"/public/{M}", "X-Big: " + "a" * 2042), "header_line_too_long"),
    "request-target-one-over": (
        get(f"/public/{M}/" + "a" * (2049 - len(f"/public/{M}/"))),
        "request_line_too_long",
    ),
    "too-many-headers": (
        get(f"/public/{M}", *(f"X-Extra-{i}: v" for i in range(10))),  # 11 with Host
        "too_many_headers",
    ),
    # An upgrade request is refused like any other (llhttp still reports the upgrade after
    # the head: nothing of it was queued, so there is no request to upgrade).
    "upgrade-with-a-header-line-too-long": (
        get(f"/public/{M}", "Upgrade: websocket", "Connection: Upgrade", "X-Big: " + "a" * 3000),
        "header_line_too_long",
    ),
}


@pytest.mark.parametrize(("data", "detail"), LIMITED.values(), ids=LIMITED.keys())
async def test_head_over_the_header_limits_is_431_and_closed(serve, upstream, caplog, data, detail):
    gw = await serve(set_limits(max_header_bytes=2048, max_headers=10))
    await assert_refused_before_any_route(
        gw, upstream, caplog, data, Reason.HEADERS_TOO_LARGE, detail
    )


# Lines each under max_header_bytes, fewer than max_headers, 80 KB in all and no end: a head
# still unfinished past the bound on what one may buffer (4 x max_header_bytes, at least
# 64 KiB). A finished one is held to max_headers lines of max_header_bytes.
WIDE_HEAD = get(f"/public/{M}", *(f"X-Wide-{i:02}: " + "w" * 1980 for i in range(40)))[:-2]


async def test_an_unfinished_head_over_the_head_bound_is_431_and_closed(serve, upstream, caplog):
    gw = await serve(set_limits(max_header_bytes=2048, max_headers=100))
    assert len(WIDE_HEAD) > 65536
    await assert_refused_before_any_route(
        gw, upstream, caplog, WIDE_HEAD, Reason.HEADERS_TOO_LARGE, "request_head_too_large"
    )


async def test_an_unfinished_head_over_the_head_bound_in_two_reads_is_431(serve, upstream):
    """The bound counts the whole unfinished head, not the last read of it."""
    gw = await serve(set_limits(max_header_bytes=2048, max_headers=100))
    half = len(WIDE_HEAD) // 2
    assert half < 65536
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(WIDE_HEAD[:half])
        await asyncio.sleep(0.05)  # a separate read
        await conn.send(WIDE_HEAD[half:])
        reply = await conn.response(within=WITHIN)
        await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert_fixed_answer(reply, Reason.HEADERS_TOO_LARGE)
    assert upstream.hits == 0


def wide_head(total: int) -> bytes:
    """A GET whose header lines (20,000 bytes each) make a head of about ``total`` bytes."""
    lines = [f"X-Wide-{i:02}: " + "w" * 19988 for i in range(total // 20002)]
    return get("/public/wide", *lines, "Connection: close")


async def test_the_head_bound_is_four_times_max_header_bytes_when_that_is_over_64_kib(
    serve, upstream
):
    gw = await serve(set_limits(max_header_bytes=32768, max_headers=100))  # bound: 128 KiB
    under = wide_head(110_000)  # 100 KB: under the bound, though over 64 KiB
    assert 65536 < len(under) < 131072
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(under[:-2])  # unfinished ...
        await asyncio.sleep(0.05)
        await conn.send(under[-2:])  # ... then finished
        await conn.response(within=WITHIN)
    finally:
        await conn.close()
    # Routed and passed on (the echo upstream, aiohttp, then refuses lines this long itself).
    assert gw.metric("gateway_requests_total", route="public") == 1
    unfinished = wide_head(160_000)[:-2]  # 140 KB, over the bound, and never finished
    assert len(unfinished) > 131072
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(unfinished)
        reply = await conn.response(within=WITHIN)
        await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert_fixed_answer(reply, Reason.HEADERS_TOO_LARGE)
    assert gw.metric("gateway_requests_total", route=UNMATCHED_ROUTE) == 1


async def test_the_head_bound_holds_for_each_request_on_a_kept_alive_connection(serve, upstream):
    gw = await serve(set_limits(max_header_bytes=2048, max_headers=100))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/first"))
        assert (await conn.response(within=WITHIN)).status == 200
        await conn.send(WIDE_HEAD)  # one write: the count starts again after each request
        reply = await conn.response(within=WITHIN)
        await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert_fixed_answer(reply, Reason.HEADERS_TOO_LARGE)
    assert upstream.hits == 1


async def test_head_at_the_header_limits_is_served(serve, upstream):
    gw = await serve(set_limits(max_header_bytes=2048, max_headers=10))
    # The limit counts a header line without its CRLF ("X-Big: " + value), and the target:
    # each 2048 bytes exactly here (one more is refused: LIMITED's "one-over" cases).
    for data in (
        get("/public/x", "X-Big: " + "a" * (2048 - len("X-Big: ")), "Connection: close"),
        get("/public/" + "a" * (2048 - len("/public/")), "Connection: close"),
        get("/public/x", *(f"X-Extra-{i}: v" for i in range(8)), "Connection: close"),
    ):
        reply, _ = await refuse(gw, data)
        assert reply.status == 200
    assert upstream.hits == 3


# --- 4. pipelining ----------------------------------------------------------------------------
async def test_pipelined_requests_are_answered_in_order_on_one_connection(serve, upstream, caplog):
    caplog.set_level(logging.WARNING)
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/one") + get("/public/two") + get("/public/three"))
        replies = [await conn.response(within=WITHIN) for _ in range(3)]
        # Still open and serving: a fourth on the same connection, after it waited idle.
        await conn.send(get("/public/four", "Connection: close"))
        last = await conn.response(within=WITHIN)
    finally:
        await conn.close()
    assert [r.status for r in replies] == [200, 200, 200]
    assert [r.json()["path"] for r in replies] == ["/public/one", "/public/two", "/public/three"]
    assert all("Connection" not in r.headers for r in replies)
    assert last.json()["path"] == "/public/four"
    assert upstream.hits == 4
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_request_sent_while_one_is_in_flight_after_an_idle_wait_is_answered(
    serve, upstream, caplog
):
    """A kept-alive connection waits idle, its next request wakes it, and a third request
    arrives while that one is in flight: it is read, queued and answered after it."""
    caplog.set_level(logging.WARNING)
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/first"))
        assert (await conn.response(within=WITHIN)).json()["path"] == "/public/first"
        upstream.mode = "stall"
        await conn.send(get("/public/held"))  # wakes the connection from its idle wait
        await wait_until(lambda: upstream.hits == 2, what="the held request reached the upstream")
        await conn.send(get("/public/behind"))
        await asyncio.sleep(0.1)  # the gateway reads it while /held is in flight
        upstream.release.set()
        held = await conn.response(within=WITHIN)
        behind = await conn.response(within=WITHIN)
    finally:
        await conn.close()
    assert [held.json()["path"], behind.json()["path"]] == ["/public/held", "/public/behind"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_more_pipelined_requests_than_reading_holds_are_all_answered(serve, upstream):
    """Past 8 queued requests the connection stops reading; answering them reads on."""
    gw = await serve()
    paths = [f"/public/p{i}" for i in range(30)]
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(b"".join(get(path) for path in paths))
        replies = [await conn.response(within=WITHIN) for _ in paths]
        await conn.send(get("/public/after"))  # reading resumed: this one is read too
        after = await conn.response(within=WITHIN)
    finally:
        await conn.close()
    assert [r.json()["path"] for r in replies] == paths
    assert after.json()["path"] == "/public/after"


async def test_a_target_split_across_reads_is_read_whole(serve, upstream):
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(b"GET /public/first-half")
        await asyncio.sleep(0.05)  # a separate read: llhttp hands the target over in parts
        await conn.send(b"-second-half HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        reply = await conn.response(within=WITHIN)
    finally:
        await conn.close()
    assert reply.json()["path"] == "/public/first-half-second-half"


async def test_a_valid_request_before_a_malformed_one_is_answered_then_the_400(
    serve, upstream, caplog
):
    gw = await serve()
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/first") + MALFORMED["space-before-colon"][0])
        first = await conn.response(within=WITHIN)
        second = await conn.response(within=WITHIN)
        _, rest = await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert first.status == 200
    assert first.json()["path"] == "/public/first"
    assert "Connection" not in first.headers  # kept alive: the refusal is of the next one
    assert_fixed_answer(second, Reason.REQUEST_MALFORMED)
    assert rest == b""
    assert upstream.hits == 1  # the valid one only
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == 1
    assert (
        gw.metric("gateway_requests_total", route=UNMATCHED_ROUTE, reason="request_malformed") == 1
    )
    served, refused = decision_lines(caplog)  # one line each, in order
    assert "reason=ok" in served
    assert f"route={UNMATCHED_ROUTE}" in refused
    assert "reason=request_malformed" in refused
    assert_not_logged(caplog, MARKER)


async def test_an_upgrade_refused_for_its_head_upgrades_no_request_queued_before_it(
    serve: GatewayFactory, upstream: EchoUpstream
) -> None:
    """Pipelined in one send: a GET naming ``Upgrade: websocket`` without ``Connection:
    Upgrade`` (no handshake: served plain, its Upgrade dropped as hop-by-hop), then a real
    handshake whose head is too large.  The refused handshake upgrades nothing: the GET before
    it still goes upstream as the plain request it was, never as a WebSocket handshake."""
    gw = await serve(set_limits(max_header_bytes=2048))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(
            get("/public/first", "Upgrade: websocket")
            + get("/public/ws", "Upgrade: websocket", "Connection: Upgrade", "X-Big: " + "a" * 3000)
        )
        first = await conn.response(within=WITHIN)
        await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert first.json()["path"] == "/public/first"
    assert values_of(echoed(first), "Upgrade") == []
    assert values_of(echoed(first), "Connection") == []
    assert upstream.hits == 1


async def test_requests_pipelined_before_a_handshake_are_all_answered_then_its_refusal(
    serve: GatewayFactory, upstream: EchoUpstream
) -> None:
    """Two GETs, then a WebSocket handshake without a token, in one send: both GETs are
    answered as usual (keep-alive), then the handshake's 401, which ends the connection (what
    the client sent after its head is not HTTP)."""
    gw = await serve()
    handshake = get(
        "/api/ws", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    )  # fmt: skip
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/a") + get("/public/b") + handshake)
        first = await conn.response(within=WITHIN)
        second = await conn.response(within=WITHIN)
        refused = await conn.response(within=WITHIN)
        await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert [first.json()["path"], second.json()["path"]] == ["/public/a", "/public/b"]
    assert "close" not in first.headers.get("Connection", "")
    assert "close" not in second.headers.get("Connection", "")
    assert refused.status == 401
    assert refused.json()["error"]["reason"] == "token_missing"
    assert refused.headers["Connection"] == "close"
    assert upstream.hits == 2


async def test_a_request_pipelined_after_a_malformed_one_is_never_forwarded(serve, upstream):
    gw = await serve()
    reply, rest = await refuse(gw, MALFORMED["nul-in-value"][0] + get("/public/after"))
    assert_fixed_answer(reply, Reason.REQUEST_MALFORMED)
    assert rest == b""  # no second answer
    assert upstream.hits == 0


async def test_a_request_after_a_401_with_an_unread_body_is_never_forwarded(serve, upstream):
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(
            request("POST /api/upload HTTP/1.1", HOST, "Content-Length: 2000", body=b"b" * 1000)
        )
        reply = await conn.response(within=WITHIN)
        # The rest of the body and a request after it: the gateway closes instead of reading.
        with contextlib.suppress(ConnectionError):
            await conn.send(b"b" * 1000 + get("/public/after"))
        _, rest = await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert reply.status == 401
    assert reply.json()["error"]["reason"] == "token_missing"
    assert reply.headers.getall("Connection", []) == ["close"]
    assert rest == b""
    assert upstream.hits == 0
    assert gw.metric("gateway_requests_total", route="public") == 0


# --- 5. the connection cap --------------------------------------------------------------------
async def test_a_connection_over_max_connections_gets_503_and_is_closed(serve, upstream, caplog):
    gw = await serve(set_limits(max_connections=2))
    server = gw.runner.server
    assert server is not None
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    first = await RawConnection.open(gw.port)
    second = await RawConnection.open(gw.port)
    try:
        await wait_until(lambda: len(server.connections) == 2, what="two connections accepted")
        third = await RawConnection.open(gw.port)
        try:
            # It sends nothing: the answer is the gateway's at accept.
            reply = await third.response(within=WITHIN)
            _, rest = await third.closed_by_server(within=WITHIN)
        finally:
            await third.close()
        assert_fixed_answer(reply, Reason.TOO_MANY_CONNECTIONS)
        assert rest == b""
        assert gw.metric("gateway_requests_total", route=UNMATCHED_ROUTE) == 1
        assert (
            gw.metric(
                "gateway_requests_total", route=UNMATCHED_ROUTE, reason="too_many_connections"
            )
            == 1
        )
        [line] = decision_lines(caplog)
        assert "reason=too_many_connections" in line

        # The two held ones are still served.
        await second.send(get("/public/held"))
        assert (await second.response(within=WITHIN)).status == 200

        await first.close()
        await wait_until(lambda: len(server.connections) == 1, what="one connection left")
        again = await RawConnection.open(gw.port)
        try:
            await again.send(get("/public/again", "Connection: close"))
            served = await again.response(within=WITHIN)
        finally:
            await again.close()
        assert served.status == 200
        assert served.json()["path"] == "/public/again"
    finally:
        await first.close()
        await second.close()
    assert gw.metric("gateway_requests_total", route=UNMATCHED_ROUTE) == 1
    assert upstream.hits == 2
    # The refused connection was never counted, so its end forgets nothing (and fails nothing).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- 6. a refusal does not drain the body -----------------------------------------------------
@pytest.mark.parametrize("expect", [False, True], ids=["body-sent", "expect-100-continue"])
async def test_a_401_on_a_huge_body_closes_without_draining_it(serve, upstream, expect):
    gw = await serve()
    headers = [HOST, "Content-Length: 10000000"] + (["Expect: 100-continue"] if expect else [])
    # With Expect the client waits for 100 Continue before sending any of the body.
    body = b"" if expect else b"b" * 4096
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(request("POST /api/upload HTTP/1.1", *headers, body=body))
        _, received = await conn.closed_by_server(within=WITHIN)  # 10 MB never sent
    finally:
        await conn.close()
    assert b"100 Continue" not in received
    head, _, payload = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line == "HTTP/1.1 401 Unauthorized"
    assert "Connection: close" in lines
    assert json.loads(payload)["error"]["reason"] == "token_missing"
    assert upstream.hits == 0
    assert gw.metric("gateway_requests_total", route="api", reason="token_missing") == 1


# --- 7. nothing added upstream ----------------------------------------------------------------
async def test_the_upstream_request_gets_no_header_the_client_did_not_send(gateway):
    bare = echoed(await send_raw(gateway.client, "GET", "/public/bare"))
    for name in ("Accept", "User-Agent", "Accept-Encoding", "Content-Type"):
        assert values_of(bare, name) == [], name
    sent = [("Accept", "text/x-mine"), ("User-Agent", "mine/1"), ("Accept-Encoding", "br")]
    own = echoed(await send_raw(gateway.client, "GET", "/public/own", sent))
    for name, value in sent:
        assert values_of(own, name) == [value], name


# --- 8. a chunked upstream response, re-framed per client version ------------------------------
PIECES = [b"\x00\xff\r\n0\r\n\r\n", b"x" * 70_000, b"\r\nend"]
BODY = b"".join(PIECES)
CHUNKED_ANSWER = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Upstream: raw\r\n\r\n"
    + b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in PIECES)
    + b"0\r\n\r\n"
)


async def answer_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:  # keep-alive: one chunked answer per request head
        await read_request_head(reader)
        writer.write(CHUNKED_ANSWER)
        await writer.drain()


@pytest.fixture
async def chunked_upstream() -> AsyncIterator[str]:
    raw = RawUpstream(answer_chunked)
    url = await raw.start()
    yield url
    await raw.close()


async def test_a_chunked_answer_reaches_an_http11_client_chunked(serve, chunked_upstream):
    gw = await serve(point_routes_at(chunked_upstream))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/chunked"))
        first = await conn.response(within=WITHIN)
        await conn.send(get("/public/chunked", "Connection: close"))  # the same connection
        second = await conn.response(within=WITHIN)
    finally:
        await conn.close()
    for reply in (first, second):
        assert reply.status == 200
        assert reply.headers.getall("Transfer-Encoding") == ["chunked"]
        assert "Content-Length" not in reply.headers
        assert reply.headers["X-Upstream"] == "raw"
        assert reply.body == BODY
    assert "Connection" not in first.headers


@pytest.mark.parametrize("asks", [(), ("Connection: keep-alive",)], ids=["plain", "keep-alive"])
async def test_a_chunked_answer_reaches_an_http10_client_close_delimited(
    serve, chunked_upstream, asks
):
    """An HTTP/1.0 client cannot read chunked: the body ends with the connection, even when
    the client asked to keep it alive."""
    gw = await serve(point_routes_at(chunked_upstream))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(request("GET /public/chunked HTTP/1.0", HOST, *asks))
        received = await asyncio.wait_for(conn.reader.read(), WITHIN)  # up to the server's close
    finally:
        await conn.close()
    head, _, payload = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[1] == "200"
    names = [line.partition(":")[0].lower() for line in lines]
    assert "transfer-encoding" not in names
    assert "content-length" not in names
    assert "Connection: close" in lines
    assert payload == BODY  # byte-exact, ended by the close


async def test_an_own_answer_to_head_has_its_length_and_no_body(
    serve: GatewayFactory, upstream: EchoUpstream
) -> None:
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        # Two requests in one write: a body after the HEAD's 401 would be read as the second
        # answer's status line.
        await conn.send(
            b"HEAD /api/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
            b"GET /public/after HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
        )
        head = await conn.response(method="HEAD")
        after = await conn.response()
    finally:
        await conn.close()
    reason = Reason.TOKEN_MISSING
    body = {"error": {"code": 401, "reason": reason.value, "message": REASON_SPECS[reason].message}}
    get_length = len(json.dumps(body).encode())
    assert (head.status, head.body) == (401, b"")
    assert int(head.headers["Content-Length"]) == get_length
    assert after.status == 200
    assert upstream.hits == 1


async def test_an_own_answer_carries_the_current_date_once(
    serve: GatewayFactory,
) -> None:
    gw = await serve()
    before = time.time()
    own = await send_raw(gw.client, "GET", "/api/x")  # 401 from the gateway itself
    after = time.time()
    assert own.status == 401
    sent = parsedate_to_datetime(own.headers["Date"])
    assert sent.tzinfo is not None
    assert own.headers["Date"].endswith(" GMT")
    assert int(before) - 1 <= sent.timestamp() <= after + 1
    assert own.headers.getall("Date") == [own.headers["Date"]]


async def head_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A response head promising a body, then the connection closed before any of it."""
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Upstream: raw\r\n\r\n")
    await writer.drain()
    writer.close()


async def test_an_upstream_that_breaks_right_after_its_head_leaves_the_client_a_cut_stream(
    serve: GatewayFactory,
) -> None:
    raw = RawUpstream(head_then_close)
    gw = await serve(point_routes_at(await raw.start()))
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(get("/public/cut"))
        received = await asyncio.wait_for(conn.reader.read(), WITHIN)  # up to the server's close
    finally:
        await conn.close()
        await raw.close()
    head, _, body = received.partition(b"\r\n\r\n")
    # The status line and headers arrived (the head is sent before the stream is cut), then
    # the connection closed short of the declared length: never a complete-looking answer.
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 10" in head
    assert body == b""
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1


async def test_a_chunked_body_that_turns_malformed_mid_upload_is_400_and_aborted(
    serve: GatewayFactory, upstream: EchoUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, REQUEST_LOGGER)
    gw = await serve()
    conn = await RawConnection.open(gw.port)
    try:
        await conn.send(
            b"POST /public/up HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        # The request is in flight: its head and first chunk reached the upstream.
        await wait_until(lambda: upstream.hits == 1, what="the upload reached the upstream")
        await conn.send(b"zz-not-a-chunk-size\r\n")
        reply = await conn.response(within=WITHIN)  # not after the 30 s body-gap timeout
        await conn.closed_by_server(within=WITHIN)
    finally:
        await conn.close()
    assert reply.status == 400
    assert reply.json()["error"]["reason"] == Reason.REQUEST_MALFORMED.value
    assert gw.metric("gateway_requests_total", route="public", reason="request_malformed") == 1
    assert requests_total(gw) == 1  # counted once, under its route
    assert logged(caplog)["detail"] == "request_body_cut_off"  # refused mid-upload


# --- 8. what a refusal leaves behind --------------------------------------------------------------
async def test_a_connection_refused_for_its_body_is_forgotten_and_its_place_taken(
    serve: GatewayFactory, upstream: EchoUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose head was fine and whose chunked body was not is refused with 400, and
    its closed connection no longer counts against ``limits.max_connections``: the next client
    is served, not turned away with 503; nothing is logged as an error on the way."""
    caplog.set_level(logging.WARNING)
    gw = await serve(set_limits(max_connections=1))
    server = gw.runner.server
    assert server is not None
    reply, _ = await refuse(
        gw,
        request(
            "POST /public/up HTTP/1.1",
            HOST,
            "Transfer-Encoding: chunked",
            body=b"5\r\nhello\r\nzz-not-a-chunk-size\r\n",
        ),
    )
    assert reply.status == 400
    assert reply.json()["error"]["reason"] == Reason.REQUEST_MALFORMED.value
    await wait_until(lambda: not server.connections, what="the refused connection forgotten")
    served, _ = await refuse(gw, get("/public/next", "Connection: close"))
    assert served.status == 200
    assert served.json()["path"] == "/public/next"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_refusal_before_any_route_is_timed_in_the_lowest_duration_bucket(
    serve: GatewayFactory, upstream: EchoUpstream
) -> None:
    """The listener answers a malformed request (400) or an oversized head (431) on its own, at
    once: each is one observation of gateway_request_duration_seconds under the unmatched
    route, in its lowest bucket, not a second's worth of latency."""
    gw = await serve(set_limits(max_header_bytes=2048))
    for data in (request("get /public/x HTTP/1.1", HOST), get("/public/x", "X-Big: " + "a" * 3000)):
        reply, _ = await refuse(gw, data)
        assert reply.status in (400, 431)
    name = "gateway_request_duration_seconds"
    labels = {"route": UNMATCHED_ROUTE, "outcome": "rejected"}
    assert gw.metric(f"{name}_count", **labels) == 2
    assert gw.metric(f"{name}_bucket", le="0.0005", **labels) == 2
    assert gw.metric(f"{name}_sum", **labels) < 0.001
