"""Graceful shutdown with a real AppRunner on loopback: in-flight requests finish, background
tasks end, client sessions close."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

import gateway as gateway_package
from gateway import create_app, loads_config
from gateway.app import GATEWAY_KEY, JWKS_KEY
from gateway.documents import HttpDocumentFetcher
from tests import conftest
from tests.integration.e2e_helpers import echoed_headers, wait_until

GATEWAY_DIR = str(Path(gateway_package.__file__).parent)


def gateway_tasks(tasks: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """The tasks whose coroutine is defined in the gateway package."""
    return {t for t in tasks if t.get_coro().cr_code.co_filename.startswith(GATEWAY_DIR)}  # type: ignore[union-attr]


async def refused(port: int) -> bool:
    """Whether nothing accepts connections on 127.0.0.1:port any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


class Started:
    """A gateway on a real TCPSite, with the sessions its JWKS fetcher was given."""

    def __init__(self, config_doc: dict[str, Any], clock: Any) -> None:
        self.jwks_sessions: list[aiohttp.ClientSession] = []

        def fetcher(session: aiohttp.ClientSession) -> HttpDocumentFetcher:
            self.jwks_sessions.append(session)
            return HttpDocumentFetcher(session, clock)

        config = loads_config(yaml.safe_dump(config_doc))
        self.app = create_app(config, clock=clock, document_fetcher=fetcher)
        self.runner = web.AppRunner(self.app, shutdown_timeout=5)
        self.port = 0

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def upstream_session(self) -> aiohttp.ClientSession:
        session: aiohttp.ClientSession = self.app[GATEWAY_KEY].upstream_session
        return session


async def test_inflight_request_completes_during_graceful_shutdown(idp, upstream, clock):
    before = set(asyncio.all_tasks())
    gw = Started(copy.deepcopy(conftest.base_config(idp, upstream)), clock)
    await gw.start()
    await gw.app[JWKS_KEY].settled()
    refreshers = {
        t
        for t in asyncio.all_tasks() - before
        if t.get_coro().__qualname__ == "JwksCache._refresh_loop"  # type: ignore[union-attr]
    }
    assert len(refreshers) == 1  # one per issuer

    upstream.mode = "stall"
    async with aiohttp.ClientSession() as client:

        async def call() -> tuple[int, dict[str, Any]]:
            async with client.post(
                f"http://127.0.0.1:{gw.port}/public/slow", data=b"in flight"
            ) as response:
                return response.status, await response.json()

        inflight = asyncio.create_task(call())
        await wait_until(lambda: upstream.hits == 1, what="request reached the upstream")

        cleanup = asyncio.create_task(gw.runner.cleanup())
        # Shutdown has begun once the listener stops accepting new connections.
        await wait_until(lambda: refused(gw.port), what="listener closed")
        assert not inflight.done()
        upstream.release.set()

        status, body = await asyncio.wait_for(inflight, 5)
        assert status == 200
        assert body["method"] == "POST"
        assert body["body_bytes"] == len(b"in flight")
        assert echoed_headers(body)["X-Forwarded-For"] == "127.0.0.1"
        await asyncio.wait_for(cleanup, 10)

    assert all(t.done() and t.cancelled() for t in refreshers)
    assert len(gw.jwks_sessions) == 1
    assert all(s.closed for s in gw.jwks_sessions)
    assert gw.upstream_session.closed
    assert gateway_tasks(asyncio.all_tasks()) == set()
    current = asyncio.current_task()
    await wait_until(
        lambda: asyncio.all_tasks() - before - {current} == set(), what="no leaked tasks"
    )


async def test_shutdown_cancels_a_hanging_jwks_fetch(idp, upstream, clock):
    idp.mode = "hang"
    doc = copy.deepcopy(conftest.base_config(idp, upstream))
    doc["issuers"]["test"]["jwks_fetch_timeout_s"] = 30  # would outlive the test if not cancelled
    before = set(asyncio.all_tasks())
    gw = Started(doc, clock)
    await gw.start()
    await wait_until(lambda: idp.hits == 1, what="the first fetch reached the IdP")
    assert len(gateway_tasks(asyncio.all_tasks() - before)) == 2  # refresher + fetch in flight

    await asyncio.wait_for(gw.runner.cleanup(), 5)
    assert gateway_tasks(asyncio.all_tasks()) == set()
    assert all(s.closed for s in gw.jwks_sessions)
    assert gw.upstream_session.closed
