"""Helpers for the key-lifecycle tests: a FakeClock that shows who sleeps on it, a way to wait
until the background refreshers are idle, and a gateway started from a config file.

Waiting here is only for loopback I/O and the event loop to catch up (bounded polling); every
duration the gateway measures is moved with ``FakeClock.advance``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from prometheus_client import CollectorRegistry

from gateway import create_admin_app, create_app, load_config
from gateway.app import JWKS_KEY
from tests.conftest import RunningGateway
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


async def start_from_file(aiohttp_client: Any, path: Path, clock: FakeClock) -> RunningGateway:
    """A gateway (and its admin app) for the YAML file at ``path``, loaded with ``load_config``."""
    config = load_config(path)
    registry = CollectorRegistry()
    app = create_app(config, registry=registry, clock=clock)
    client = await aiohttp_client(app)
    await app[JWKS_KEY].settled()
    admin = await aiohttp_client(create_admin_app(app))
    return RunningGateway(client, admin, app, registry, config)
