"""An unexpected exception anywhere on the request path is a 500 ``internal_error``, never a leak."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import GatewayFactory, bearer
from tests.fakes import EchoUpstream, FakeClock

SECRET_TEXT = "database password is hunter2"


class BreakingClock(FakeClock):
    """A clock collaborator that fails on demand, standing in for any bug on the request path."""

    broken = False

    def time(self) -> float:
        if self.broken:
            raise RuntimeError(SECRET_TEXT)
        return super().time()


async def test_an_unexpected_exception_is_a_fixed_500_logged_with_its_traceback(
    make_gateway: GatewayFactory,
    upstream: EchoUpstream,
    token: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = BreakingClock()
    gw = await make_gateway(clock=clock, admin=False)
    client = gw.client
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
    assert gw.metric("gateway_requests_total", **labels) == 1
    tracebacks = [r for r in caplog.records if r.exc_info and "internal_error" in r.getMessage()]
    assert len(tracebacks) == 1
    decisions = [r.getMessage() for r in caplog.records if r.name == "gateway.request"]
    assert any("reason=internal_error" in line and "status=500" in line for line in decisions)
    clock.broken = False  # the gateway goes on serving
    assert (await client.get("/api/orders", headers=bearer(minted))).status == 200
