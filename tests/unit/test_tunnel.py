"""The WebSocket tunnel on its own: relay order, back-pressure, and each way it ends.

Two recording transports stand in for the client and upstream connections (the end-to-end
relay with a real WebSocket client and server is tests/integration/test_websocket.py); the
timers are the event loop's own, with short timeouts and bounded waits.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.tunnel import Tunnel, TunnelEnd

WITHIN = 5.0


class Recorder:
    """A transport that records what the tunnel does to it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.paused = False
        self.closed = False
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.paused = True
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.events.append("resume")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def tunnel(idle_s: float = 30.0, max_s: float = 0.0) -> tuple[Tunnel, Recorder, Recorder]:
    client, upstream = Recorder(), Recorder()
    return Tunnel(client, upstream, idle_timeout_s=idle_s, max_duration_s=max_s), client, upstream


async def test_early_bytes_go_first_then_each_side_reaches_the_other() -> None:
    relay, client, upstream = tunnel()
    running = asyncio.create_task(relay.run(b"client-early", b"upstream-early"))
    await asyncio.sleep(0)  # the task starts: the early bytes are written before anything else
    relay.from_client(b"ping")
    relay.from_upstream(b"pong")
    relay.lost(TunnelEnd.CLIENT_CLOSED)
    assert await asyncio.wait_for(running, WITHIN) is TunnelEnd.CLIENT_CLOSED
    assert upstream.written == [b"client-early", b"ping"]
    assert client.written == [b"upstream-early", b"pong"]


async def test_no_early_bytes_write_nothing() -> None:
    relay, client, upstream = tunnel()
    running = asyncio.create_task(relay.run(b"", b""))
    await asyncio.sleep(0)
    relay.lost(TunnelEnd.UPSTREAM_CLOSED)
    assert await asyncio.wait_for(running, WITHIN) is TunnelEnd.UPSTREAM_CLOSED
    assert (client.written, upstream.written) == ([], [])


async def test_either_end_closes_both_connections() -> None:
    relay, client, upstream = tunnel()
    running = asyncio.create_task(relay.run(b"", b""))
    await asyncio.sleep(0)
    assert (client.closed, upstream.closed) == (False, False)
    relay.lost(TunnelEnd.UPSTREAM_CLOSED)
    relay.lost(TunnelEnd.CLIENT_CLOSED)  # the second end is not the one reported
    assert await asyncio.wait_for(running, WITHIN) is TunnelEnd.UPSTREAM_CLOSED
    assert (client.closed, upstream.closed) == (True, True)


async def test_bytes_for_a_closing_side_are_dropped() -> None:
    relay, client, upstream = tunnel()
    upstream.closed = True
    relay.from_client(b"late")
    client.closed = True
    relay.from_upstream(b"late")
    assert (client.written, upstream.written) == ([], [])


async def test_a_full_side_pauses_reading_on_the_other_until_it_drains() -> None:
    relay, client, upstream = tunnel()
    relay.client_writable(False)  # the client stopped reading: stop reading the upstream
    assert (upstream.paused, client.paused) == (True, False)
    relay.client_writable(True)
    assert upstream.events == ["pause", "resume"]
    relay.upstream_writable(False)  # the upstream stopped reading: stop reading the client
    assert (client.paused, upstream.paused) == (True, False)
    relay.upstream_writable(True)
    assert client.events == ["pause", "resume"]


async def test_back_pressure_leaves_a_closing_side_alone() -> None:
    relay, client, upstream = tunnel()
    client.closed = upstream.closed = True
    relay.client_writable(False)
    relay.upstream_writable(False)
    assert (client.events, upstream.events) == ([], [])


async def test_a_silent_tunnel_ends_at_its_idle_timeout() -> None:
    loop = asyncio.get_running_loop()
    relay, client, upstream = tunnel(idle_s=0.1)
    started = loop.time()
    assert await asyncio.wait_for(relay.run(b"", b""), WITHIN) is TunnelEnd.IDLE_TIMEOUT
    assert 0.1 <= loop.time() - started < 1.0
    assert (client.closed, upstream.closed) == (True, True)


@pytest.mark.parametrize("direction", ["from_client", "from_upstream"])
async def test_traffic_either_way_keeps_it_from_idling_until_the_maximum_duration(
    direction: str,
) -> None:
    loop = asyncio.get_running_loop()
    relay, _, _ = tunnel(idle_s=0.15, max_s=0.6)
    started = loop.time()
    running = asyncio.create_task(relay.run(b"", b""))
    while not running.done() and loop.time() - started < WITHIN:
        getattr(relay, direction)(b"x")
        await asyncio.sleep(0.03)
    assert running.result() is TunnelEnd.MAX_DURATION
    assert 0.6 <= loop.time() - started < 2.0


async def test_without_a_maximum_duration_only_idleness_ends_it() -> None:
    loop = asyncio.get_running_loop()
    relay, _, _ = tunnel(idle_s=0.3, max_s=0.0)
    started = loop.time()
    running = asyncio.create_task(relay.run(b"", b""))
    while loop.time() - started < 0.6:  # twice the idle timeout of traffic
        relay.from_client(b"x")
        await asyncio.sleep(0.03)
    assert not running.done()
    assert await asyncio.wait_for(running, WITHIN) is TunnelEnd.IDLE_TIMEOUT


async def test_a_deadline_before_the_idle_timeout_is_kept() -> None:
    loop = asyncio.get_running_loop()
    relay, _, _ = tunnel(idle_s=5.0, max_s=0.1)
    started = loop.time()
    assert await asyncio.wait_for(relay.run(b"", b""), WITHIN) is TunnelEnd.MAX_DURATION
    assert loop.time() - started < 1.0
