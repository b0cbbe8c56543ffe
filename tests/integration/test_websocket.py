"""WebSocket through the gateway: the handshake judged by the route's policy, then a tunnel.

A real aiohttp WebSocket server is the upstream and a real aiohttp WebSocket client talks to
the gateway: the handshake needs the route's token and carries its claim headers upstream;
after the upstream's 101 the frames flow both ways until a side closes, the tunnel idles out,
or it reaches its maximum duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, RunningGateway, bearer
from tests.integration.e2e_helpers import wait_until
from tests.integration.hardening_kit import closing_session, set_limits, start_runner

WITHIN = 5.0


@dataclass
class WsUpstream:
    """An echoing WebSocket server that records each handshake's headers."""

    url: str = ""
    handshakes: list[dict[str, str]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def ws(request: web.Request) -> web.StreamResponse:
            self.handshakes.append(dict(request.headers))
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            await socket.send_str(json.dumps({"sub": request.headers.get("X-User-Sub")}))
            async for message in socket:
                if message.type is aiohttp.WSMsgType.TEXT:
                    await socket.send_str("echo:" + message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await socket.send_bytes(message.data[::-1])
            self.closed.set()
            return socket

        async def refuse(request: web.Request) -> web.StreamResponse:
            self.handshakes.append(dict(request.headers))
            return web.Response(status=403, text="no upgrade here")

        app = web.Application()
        app.router.add_get("/api/ws", ws)
        app.router.add_get("/api/refuse", refuse)
        app.router.add_get("/public/ws", ws)
        return app


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    fake = WsUpstream()
    runner, fake.url = await start_runner(fake.app())
    yield fake
    await runner.cleanup()


def to_ws_upstream(fake: WsUpstream) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for route in doc["routes"]:
            route["upstream"] = fake.url

    return edit


@pytest.fixture
def serve_ws(make_gateway: GatewayFactory, ws_upstream: WsUpstream) -> Callable[..., Any]:
    async def start(*edits: Any) -> RunningGateway:
        return await make_gateway(to_ws_upstream(ws_upstream), *edits)

    return start


async def test_a_websocket_with_a_valid_token_is_relayed_both_ways_with_its_claims(
    serve_ws: Any, ws_upstream: WsUpstream, token: Callable[..., str]
) -> None:
    gw = await serve_ws()
    headers = {**bearer(token(sub="alice")), "X-User-Sub": "mallory"}
    async with (
        closing_session() as session,
        session.ws_connect(gw.url("/api/ws"), headers=headers) as ws,
    ):
        greeting = json.loads((await ws.receive(WITHIN)).data)
        await ws.send_str("hello")
        text = (await ws.receive(WITHIN)).data
        await ws.send_bytes(b"\x00\x01\x02")
        binary = (await ws.receive(WITHIN)).data
        assert gw.metric("gateway_tunnels_open") == 1
    # The upstream saw the verified subject, not the spoofed one, and never the token.
    assert greeting == {"sub": "alice"}
    assert (text, binary) == ("echo:hello", b"\x02\x01\x00")
    (handshake,) = ws_upstream.handshakes
    assert "Authorization" not in handshake
    assert handshake["Upgrade"].lower() == "websocket"
    await asyncio.wait_for(ws_upstream.closed.wait(), WITHIN)
    await wait_until(lambda: gw.metric("gateway_tunnels_open") == 0, what="tunnel closed")
    assert gw.metric("gateway_upgrades_total", route="api") == 1
    assert gw.metric("gateway_requests_total", route="api", reason="ok") == 1


async def test_a_websocket_handshake_without_a_token_is_refused_before_the_upstream(
    serve_ws: Any, ws_upstream: WsUpstream
) -> None:
    gw = await serve_ws()
    async with closing_session() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(gw.url("/api/ws"))
    assert refused.value.status == 401
    assert refused.value.headers is not None
    assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert ws_upstream.handshakes == []
    assert gw.metric("gateway_requests_total", route="api", reason="token_missing") == 1
    assert gw.metric("gateway_upgrades_total", route="api") == 0


async def test_an_upstream_that_refuses_the_upgrade_has_its_answer_relayed(
    serve_ws: Any, ws_upstream: WsUpstream, token: Callable[..., str]
) -> None:
    gw = await serve_ws()
    async with closing_session() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(gw.url("/api/refuse"), headers=bearer(token()))
    assert refused.value.status == 403
    assert len(ws_upstream.handshakes) == 1
    assert gw.metric("gateway_upgrades_total", route="api") == 0
    assert gw.metric("gateway_tunnels_open") == 0


async def test_an_idle_tunnel_is_closed_after_the_idle_timeout(
    serve_ws: Any, ws_upstream: WsUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.request")
    gw = await serve_ws(set_limits(tunnel_idle_timeout_s=0.3))
    async with closing_session() as session, session.ws_connect(gw.url("/public/ws")) as ws:
        await ws.receive(WITHIN)  # the greeting; then nothing moves
        closing = await ws.receive(WITHIN)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await wait_until(lambda: gw.metric("gateway_tunnels_open") == 0, what="tunnel closed")
    lines = [r.getMessage() for r in caplog.records if "route=public" in r.getMessage()]
    assert len(lines) == 1
    assert "status=101" in lines[0]
    assert "tunnel_idle_timeout" in lines[0]


async def test_a_busy_tunnel_still_ends_at_its_maximum_duration(
    serve_ws: Any, ws_upstream: WsUpstream
) -> None:
    gw = await serve_ws(set_limits(tunnel_idle_timeout_s=5, tunnel_max_duration_s=0.5))
    loop = asyncio.get_running_loop()
    async with closing_session() as session, session.ws_connect(gw.url("/public/ws")) as ws:
        await ws.receive(WITHIN)
        opened = loop.time()
        ended = None
        # Traffic every 50 ms keeps it from idling; only the maximum duration can end it.
        while loop.time() - opened < WITHIN:
            try:
                await ws.send_str("tick")
            except ConnectionError:
                ended = loop.time()
                break
            message = await ws.receive(WITHIN)
            if message.type is not aiohttp.WSMsgType.TEXT:
                ended = loop.time()
                break
            await asyncio.sleep(0.05)
    assert ended is not None, "the tunnel outlived its maximum duration"
    assert 0.4 <= ended - opened < 2.0
