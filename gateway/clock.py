"""The clock the gateway reads: monotonic time for caches, wall time for token claims."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What the gateway needs from time; tests pass a fake that they move by hand."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (cache ages, cooldowns)."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch (``exp``, ``nbf``, ``iat``)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock (background refresh schedules)."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
