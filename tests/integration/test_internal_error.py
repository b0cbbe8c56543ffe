"""An unexpected exception anywhere on the request path is a 500 ``internal_error``, never a leak."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway import create_app, loads_config
from gateway.app import JWKS_KEY
from tests.conftest import base_config, bearer
from tests.fakes import EchoUpstream, FakeClock, FakeIdP

SECRET_TEXT = "database password is hunter2"


class BreakingClock(FakeClock):
    """A clock collaborator that fails on demand, standing in for any bug on the request path."""

    broken = False

    def time(self) -> float:
        if self.broken:
            raise RuntimeError(SECRET_TEXT)
        return super().time()


async def test_an_unexpected_exception_is_a_fixed_500_logged_with_its_traceback(
    aiohttp_client: Any,
    idp: FakeIdP,
    upstream: EchoUpstream,
    token: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = BreakingClock()
    registry = CollectorRegistry()
    config = loads_config(yaml.safe_dump(base_config(idp, upstream)))
    app = create_app(config, registry=registry, clock=clock)
    client = await aiohttp_client(app)
    await app[JWKS_KEY].settled()
    minted = token()  # minted while the clock still works
    clock.broken = True
    caplog.set_level(logging.INFO)

    response = await client.get("/api/orders", headers=bearer(minted))

    assert response.status == 500
    body = await response.json()
    assert body == {
        "error": {"code": 500, "reason": "internal_error", "message": "Internal error."}
    }
    assert SECRET_TEXT not in await response.text()
    assert "WWW-Authenticate" not in response.headers
    assert upstream.hits == 0
    labels = {"route": "api", "reason": "internal_error"}
    assert registry.get_sample_value("gateway_requests_total", labels) == 1
    tracebacks = [r for r in caplog.records if r.exc_info and "internal_error" in r.getMessage()]
    assert len(tracebacks) == 1
    decisions = [r.getMessage() for r in caplog.records if r.name == "gateway.request"]
    assert any("reason=internal_error" in line and "status=500" in line for line in decisions)
    clock.broken = False  # the gateway goes on serving
    assert (await client.get("/api/orders", headers=bearer(minted))).status == 200
