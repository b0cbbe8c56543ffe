"""Per-route admission to the upstream: a bound on requests in flight, with a bounded queue."""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

from .errors import Rejection
from .reasons import Reason


class Admission:
    """At most ``limit`` requests in flight and ``queue`` waiting; beyond that, refuse at once.

    Refusing (503 ``upstream_overloaded``) rather than queueing without bound keeps
    memory and latency bounded when an upstream slows down.
    """

    __slots__ = ("_in_flight", "_limit", "_queue", "_waiters")

    def __init__(self, limit: int, queue: int) -> None:
        self._limit = limit
        self._queue = queue
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def resize(self, limit: int, queue: int) -> None:
        """New bounds (a reload): requests in flight keep counting against the new limit."""
        self._limit = limit
        self._queue = queue
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return
        if len(self._waiters) >= self._queue:
            raise Rejection(Reason.UPSTREAM_OVERLOADED, "in-flight and queue limits reached")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot is handed over by __aexit__, already counted
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters and self._in_flight <= self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over; _in_flight is unchanged
                return
        self._in_flight -= 1
