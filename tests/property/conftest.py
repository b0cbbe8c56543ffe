"""Hypothesis profiles, and one gateway on loopback shared by every example of a module.

Profiles: ``ci`` (the default: ~150 examples per test, no deadline, derandomized so a run is
reproducible) and ``long`` (20000 examples, random, for an on-demand hunt)::

    HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/property

The gateway (from the tests' one factory, ``tests.conftest.start_gateway``), its fake IdP and
its echo upstream run on their own event loop in a background thread: hypothesis drives plain synchronous tests, which talk to them over real sockets.
That keeps hypothesis and pytest-asyncio apart (no async fixtures across examples) and starts
the servers once per module, not once per example.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry

from gateway import loads_config
from tests.conftest import AUDIENCE, RunningGateway, base_config, start_gateway
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key
from tests.integration.authkit import send_until_closed

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=20000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

T = TypeVar("T")


@dataclass(frozen=True)
class RawReply:
    status: int
    head: bytes
    body: bytes


class ThreadedGateway:
    """A gateway on the base config, with its fake IdP and echo upstream, on a loop of its own."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = keys
        self.idp = FakeIdP()
        self.upstream = EchoUpstream()
        self.registry = CollectorRegistry()
        self.clock = FakeClock()  # never advanced: every example happens at the same instant
        self.port = 0
        self.gateway: RunningGateway | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
            self._loop.close()

    async def _serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    async def _start(self) -> None:
        self.idp.publish(*self.keys)
        idp_port = await self._serve(self.idp.app())
        self.idp.jwks_uri = f"http://127.0.0.1:{idp_port}/jwks.json"
        self.upstream.url = f"http://127.0.0.1:{await self._serve(self.upstream.app())}"
        document = base_config(self.idp, self.upstream)
        # A DPoP route: the DPoP header is fuzzed like Authorization.
        document["routes"].append({
            "id": "dpop", "match": {"path_prefix": "/dpop"}, "upstream": self.upstream.url,
            "auth": {"issuers": ["test"], "audiences": [AUDIENCE], "dpop": "required"},
        })  # fmt: skip
        config = loads_config(yaml.safe_dump(document))
        self.gateway = await start_gateway(
            config, registry=self.registry, clock=self.clock, admin=False
        )
        self.port = self.gateway.port

    async def _stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        self.idp.release.set()
        self.upstream.release.set()
        for runner in reversed(self._runners):
            await runner.cleanup()

    def request(self, head: bytes, timeout: float = 10.0) -> RawReply:
        """Send ``head`` (a complete request head) as is; read the reply until the server closes.

        A timeout raises: a request the gateway neither answers nor closes is a hang.
        """
        data = self.run(send_until_closed(self.port, head, within=timeout), timeout + 5)
        assert data, "the gateway closed the connection without an answer"
        reply_head, _, body = data.partition(b"\r\n\r\n")
        status = int(reply_head.split(b" ", 2)[1])
        return RawReply(status, reply_head, body)


@pytest.fixture(scope="module")
def threaded_gateway() -> Iterator[ThreadedGateway]:
    keys = [generate_key("RS256", "key-rs256"), generate_key("ES256", "key-es256")]
    gateway = ThreadedGateway(keys)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()
