"""Upgraded connections (WebSocket): after the upstream's ``101``, bytes relayed both ways.

The handshake was judged like any request (the route's policy, its claim headers injected).
From the ``101`` on, the client connection and the upstream connection are joined: what one
side sends is written to the other as it arrives, a side that cannot keep up pauses reading
on the other, and the tunnel ends when either side closes, when no byte has moved for the idle
timeout, or at the maximum duration (0: none).  Both connections are then closed.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol


class TunnelEnd(enum.StrEnum):
    """How a tunnel ended (the ``detail`` of its request's log line)."""

    CLIENT_CLOSED = "client_closed"
    UPSTREAM_CLOSED = "upstream_closed"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"


class _Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...


class Tunnel:
    """Relays bytes between a client and an upstream transport until one side ends it."""

    def __init__(
        self,
        client: _Transport,
        upstream: _Transport,
        *,
        idle_timeout_s: float,
        max_duration_s: float,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._loop = asyncio.get_running_loop()
        self._idle_s = idle_timeout_s
        started = self._loop.time()
        self._deadline = started + max_duration_s if max_duration_s > 0 else None
        self._last = started
        self._done: asyncio.Future[TunnelEnd] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None

    # --- called by the two connections' protocols --------------------------------------------
    def from_client(self, data: bytes) -> None:
        self._last = self._loop.time()
        if not self._upstream.is_closing():
            self._upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self._last = self._loop.time()
        if not self._client.is_closing():
            self._client.write(data)

    def client_writable(self, writable: bool) -> None:
        """The client's send buffer filled (or drained): stop (or resume) reading upstream."""
        if not self._upstream.is_closing():
            (self._upstream.resume_reading if writable else self._upstream.pause_reading)()

    def upstream_writable(self, writable: bool) -> None:
        if not self._client.is_closing():
            (self._client.resume_reading if writable else self._client.pause_reading)()

    def lost(self, end: TunnelEnd) -> None:
        self._finish(end)

    # --- the relay ----------------------------------------------------------------------------
    async def run(self, client_early: bytes, upstream_early: bytes) -> TunnelEnd:
        """Relay until the tunnel ends (bytes either side sent before it opened go first)."""
        if upstream_early:
            self.from_upstream(upstream_early)
        if client_early:
            self.from_client(client_early)
        self._arm()
        try:
            return await asyncio.shield(self._done)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for transport in (self._client, self._upstream):
                if not transport.is_closing():
                    transport.close()

    def _arm(self) -> None:
        due = self._last + self._idle_s
        if self._deadline is not None:
            due = min(due, self._deadline)
        self._timer = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._finish(TunnelEnd.MAX_DURATION)
        elif now - self._last >= self._idle_s:
            self._finish(TunnelEnd.IDLE_TIMEOUT)
        else:
            self._arm()

    def _finish(self, end: TunnelEnd) -> None:
        if not self._done.done():
            self._done.set_result(end)
