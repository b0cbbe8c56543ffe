"""Helpers for the key-lifecycle tests: a FakeClock that shows who sleeps on it, a way to wait
until the background refreshers are idle, and reading JSON replies (a gateway started from a
config file is ``make_gateway(path=...)``).

Waiting here is only for loopback I/O and the event loop to catch up (bounded polling); every
duration the gateway measures is moved with ``FakeClock.advance``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse

from tests.fakes import FakeClock
from tests.integration.e2e_helpers import wait_until


class SteppingClock(FakeClock):
    """A FakeClock that reports the deadlines its sleepers (the key refreshers) wait for."""

    def waiting(self) -> list[float]:
        """Monotonic deadlines of the sleeps not yet woken, earliest first."""
        return sorted(deadline for deadline, future in self._sleepers if not future.done())


async def idle(clock: SteppingClock, refreshers: int = 1, *, within: float = 5.0) -> None:
    """Wait until ``refreshers`` background refreshers are asleep on ``clock`` again.

    A refresher computes its next deadline from the clock before it sleeps, so the clock must
    not move between a fetch and that sleep: call this after every ``advance`` that may wake one.
    """
    await wait_until(
        lambda: len(clock.waiting()) >= refreshers,
        within=within,
        what=f"{refreshers} key refresher(s) asleep on the fake clock",
    )


async def advance_idle(clock: SteppingClock, seconds: float, refreshers: int = 1) -> None:
    """Move the clock, then let any fetch it triggered finish."""
    clock.advance(seconds)
    await idle(clock, refreshers)


async def json_of(response: ClientResponse) -> dict[str, Any]:
    body = await response.json()
    assert isinstance(body, dict)
    return body
