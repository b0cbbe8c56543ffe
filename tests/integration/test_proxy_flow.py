"""End to end through HTTP: bodies streamed byte-exact both ways, upstream failures as reasons,
and upstream answers passed through untouched."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.logs import REQUEST_LOGGER
from tests import conftest
from tests.integration.authkit import RawConnection, logged, send_raw
from tests.integration.e2e_helpers import (
    MIB,
    ScriptedUpstream,
    download_payload,
    echoed_headers,
    free_port,
    reason_of,
)

BODY_SIZE = 5 * MIB


@pytest.fixture(scope="module")
def big_body() -> bytes:
    return os.urandom(BODY_SIZE)


@pytest.fixture
async def scripted(aiohttp_server: Any) -> ScriptedUpstream:
    fake = ScriptedUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


def point_routes_at(url: str):
    def edit(doc: dict[str, Any]) -> None:
        for route in doc["routes"]:
            route["upstream"] = url

    return edit


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --- bodies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/public/upload", "/api/upload"])
async def test_large_request_body_arrives_byte_exact(
    gateway, token, upstream, big_body, framing, path
):
    headers = conftest.bearer(token()) if path.startswith("/api") else {}
    data: Any = io.BytesIO(big_body) if framing == "content-length" else chunks(big_body)
    response = await gateway.client.post(path, data=data, headers=headers)
    assert response.status == 200
    seen = await response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == path
    assert seen["body_bytes"] == BODY_SIZE
    assert seen["body_sha256"] == hashlib.sha256(big_body).hexdigest()
    upstream_headers = {k.lower(): v for k, v in echoed_headers(seen).items()}
    if framing == "content-length":
        assert upstream_headers["content-length"] == str(BODY_SIZE)
    else:
        assert "content-length" not in upstream_headers
    assert upstream.hits == 1


async def test_large_download_streams_byte_exact(gateway, upstream):
    upstream.mode = "download"
    upstream.download_bytes = BODY_SIZE
    response = await gateway.client.get("/public/file")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(BODY_SIZE)
    body = await response.read()
    assert len(body) == BODY_SIZE
    assert hashlib.sha256(body).digest() == hashlib.sha256(download_payload(BODY_SIZE)).digest()
    assert gateway.metric("gateway_requests_total", route="public", reason="ok") == 1


async def test_request_body_is_streamed_not_buffered(make_gateway, scripted, token, big_body):
    gw = await make_gateway(point_routes_at(scripted.url))

    async def body() -> AsyncIterator[bytes]:
        yield big_body[:MIB]
        # The upstream must see bytes before the client has sent the whole body.
        await asyncio.wait_for(scripted.got_first_bytes.wait(), 5)
        yield big_body[MIB:]

    response = await gw.client.post("/api/stream-up", data=body(), headers=conftest.bearer(token()))
    assert response.status == 200
    seen = await response.json()
    assert seen == {"body_bytes": BODY_SIZE, "body_sha256": hashlib.sha256(big_body).hexdigest()}


async def test_response_body_is_streamed_not_buffered(make_gateway, scripted):
    gw = await make_gateway(point_routes_at(scripted.url))
    response = await asyncio.wait_for(gw.client.get("/public/stream-down"), 5)
    assert response.status == 200
    first = await asyncio.wait_for(response.content.readexactly(MIB), 5)
    scripted.client_has_first.set()  # only now does the upstream send the rest
    rest = await response.read()
    assert first == b"a" * MIB
    assert rest == b"b" * scripted.stream_rest


# --- upstream failures ----------------------------------------------------------------------
async def test_upstream_refusing_connections_is_502(make_gateway):
    port = free_port()
    gw = await make_gateway(point_routes_at(f"http://127.0.0.1:{port}"))
    response = await gw.client.get("/public/x")
    assert response.status == 502
    assert await reason_of(response) == "upstream_unavailable"
    assert "WWW-Authenticate" not in response.headers
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_unavailable") == 1
    for code_class in ("2xx", "3xx", "4xx", "5xx"):
        assert (
            gw.metric("gateway_upstream_responses_total", route="public", code_class=code_class)
            == 0
        )


async def test_upstream_resetting_before_headers_is_502(make_gateway, scripted):
    gw = await make_gateway(point_routes_at(scripted.url))
    response = await gw.client.get("/public/reset")
    assert response.status == 502
    assert await reason_of(response) == "upstream_unavailable"
    # aiohttp retries an idempotent request once on a reset (RFC 9112 section 9.3.1.1) ...
    assert [s.method for s in scripted.seen] in (["GET"], ["GET", "GET"])
    scripted.seen.clear()
    # ... but a POST is never replayed.
    response = await gw.client.post("/public/reset", data=b"payload")
    assert response.status == 502
    assert await reason_of(response) == "upstream_unavailable"
    assert [s.method for s in scripted.seen] == ["POST"]
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_unavailable") == 2


async def test_upstream_stall_beyond_timeout_is_504(make_gateway, upstream):
    def small_timeout(doc: dict[str, Any]) -> None:
        doc["upstream_defaults"]["timeout_s"] = 0.3

    gw = await make_gateway(small_timeout)
    upstream.mode = "stall"
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await gw.client.get("/public/slow")
    elapsed = loop.time() - started
    assert response.status == 504
    assert await reason_of(response) == "upstream_timeout"
    assert 0.25 <= elapsed < 3
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_timeout") == 1
    upstream.release.set()


async def test_upstream_cut_mid_body_is_a_broken_stream_for_the_client(gateway, upstream):
    upstream.mode = "cut"
    response = await gateway.client.get("/public/cut")
    assert response.status == 200  # the status line was already relayed
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert gateway.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1
    assert gateway.metric("gateway_requests_total", route="public", reason="ok") == 0


async def test_upstream_short_content_length_body_is_a_broken_stream(make_gateway, scripted):
    gw = await make_gateway(point_routes_at(scripted.url))
    response = await gw.client.get("/public/short")
    assert response.status == 200
    assert response.headers["Content-Length"] == "1000"
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1


async def test_upstream_stall_mid_body_is_upstream_aborted(make_gateway, scripted, caplog):
    def small_timeout(doc: dict[str, Any]) -> None:
        point_routes_at(scripted.url)(doc)
        doc["upstream_defaults"]["timeout_s"] = 0.3

    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    gw = await make_gateway(small_timeout)
    response = await gw.client.get("/public/stream-down")  # 1 MiB, then silence
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    scripted.client_has_first.set()
    assert gw.metric("gateway_requests_total", route="public", reason="upstream_aborted") == 1
    assert logged(caplog)["detail"] == "upstream_body_timed_out"  # a stall, not a cut


# --- pass-through ---------------------------------------------------------------------------
async def test_head_request_is_forwarded_as_head(make_gateway, scripted, token):
    gw = await make_gateway(point_routes_at(scripted.url))
    response = await gw.client.head("/api/fixed", headers=conftest.bearer(token()))
    assert response.status == 200
    assert response.headers["Content-Length"] == "10"
    assert await response.read() == b""
    assert [s.method for s in scripted.seen] == ["HEAD"]
    # The connection is still usable: a GET on it gets the full body.
    again = await gw.client.get("/api/fixed", headers=conftest.bearer(token()))
    assert await again.read() == b"hello head"
    assert gw.metric("gateway_requests_total", route="api", reason="ok") == 2


STATUSES = [200, 201, 204, 302, 304, 404, 500, 503]


async def test_upstream_statuses_and_headers_pass_through_untouched(make_gateway, scripted):
    gw = await make_gateway(point_routes_at(scripted.url))
    began = time.perf_counter()
    for code in STATUSES:
        response = await gw.client.get(f"/public/status/{code}", allow_redirects=False)
        assert response.status == code
        assert response.headers["X-Upstream"] == "yes"
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert "WWW-Authenticate" not in response.headers
        assert response.headers.get("Cache-Control") != "no-store"  # not a gateway rejection
        body = await response.read()
        if code in (204, 304):
            assert body == b""
        else:
            assert body == f"upstream says {code}".encode()
        if code == 302:
            assert response.headers["Location"] == "/elsewhere"
    assert len(scripted.seen) == len(STATUSES)  # one upstream request each, redirects not followed
    assert gw.metric("gateway_requests_total", route="public", reason="ok") == len(STATUSES)
    assert gw.metric("gateway_requests_total", route="public", reason="internal_error") == 0
    expected = {"2xx": 3, "3xx": 2, "4xx": 1, "5xx": 2}
    for code_class, count in expected.items():
        assert (
            gw.metric("gateway_upstream_responses_total", route="public", code_class=code_class)
            == count
        )
    assert gw.metric("gateway_upstream_responses_total", route="api", code_class="2xx") == 0
    # Each answer's time to headers, on its route: together no longer than the loop took.
    took = time.perf_counter() - began
    duration = "gateway_upstream_duration_seconds"
    assert gw.metric(f"{duration}_count", route="public") == len(STATUSES)
    assert 0 < gw.metric(f"{duration}_sum", route="public") < took


# --- Expect: 100-continue is the gateway's decision, after the route's policy ----------------------
def expecting_head(path: str, length: int, port: int, *headers: tuple[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Expect: 100-continue",
             f"Content-Length: {length}", "Connection: close"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_100_continue_is_sent_only_after_the_policy_passed(gateway, token):
    body = b"hello world"
    refused = await RawConnection.open(gateway.port)
    try:
        await refused.send(expecting_head("/api/upload", len(body), gateway.port))
        answer = await refused.response()  # the first thing back is the refusal, not a 100
        assert answer.status == 401
        assert answer.json()["error"]["reason"] == "token_missing"
    finally:
        await refused.close()

    admitted = await RawConnection.open(gateway.port)
    try:
        authorization = ("Authorization", f"Bearer {token()}")
        await admitted.send(expecting_head("/api/upload", len(body), gateway.port, authorization))
        interim = await asyncio.wait_for(admitted.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await admitted.send(body)
        answer = await admitted.response(method="POST")
        assert answer.status == 200
        assert answer.json()["body_bytes"] == len(body)
        assert "Expect" not in echoed_headers(answer.json())
    finally:
        await admitted.close()


async def test_100_continue_is_not_sent_for_a_body_over_the_limit(make_gateway, token):
    gw = await make_gateway(lambda doc: doc["routes"][0].update(max_body_bytes=10))
    conn = await RawConnection.open(gw.port)
    try:
        authorization = ("Authorization", f"Bearer {token()}")
        await conn.send(expecting_head("/api/upload", 11, gw.port, authorization))
        answer = await conn.response()
        assert answer.status == 413
        assert answer.json()["error"]["reason"] == "payload_too_large"
    finally:
        await conn.close()


async def test_an_unknown_expectation_is_refused(gateway, upstream, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    answer = await send_raw(gateway.client, "POST", "/public/x", [("Expect", "magic")], body=b"x")
    assert answer.status == 400
    assert answer.json()["error"]["reason"] == "request_rejected"
    assert logged(caplog)["detail"] == "unsupported_Expect"  # a 400 of the gateway's, named
    assert upstream.hits == 0


async def test_the_gateways_own_answers_name_no_software_version(gateway, upstream):
    refused = await gateway.client.get("/api/x")
    assert refused.status == 401
    assert "Server" not in refused.headers
    async with aiohttp.ClientSession() as session, session.get(upstream.url + "/x") as direct:
        upstream_server = direct.headers["Server"]
    relayed = await gateway.client.get("/public/x")
    assert relayed.status == 200
    assert relayed.headers["Server"] == upstream_server  # the upstream's own, relayed as sent


async def test_a_bare_upstream_answer_gets_no_header_added(make_gateway):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    raw = await asyncio.start_server(lambda r, w: _answer_once(r, w, answer), "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(
            lambda doc: doc["routes"][2].update(upstream=f"http://127.0.0.1:{port}")
        )
        response = await gw.client.get("/public/bare")
        assert response.status == 200
        assert await response.read() == b"hello"
        for added in ("Content-Type", "Server", "Date"):  # none sent, none added
            assert added not in response.headers
    finally:
        raw.close()
        await raw.wait_closed()


async def _answer_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(answer)
    await writer.drain()
    writer.close()
