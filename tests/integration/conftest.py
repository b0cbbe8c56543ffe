"""Fixtures shared by integration test files: ``run_gateway`` (``gateway run`` as a process) and ``decisions`` (the decision log)."""

from __future__ import annotations

import logging

import pytest

from tests.integration.test_operations import run_gateway

__all__ = ["run_gateway"]


@pytest.fixture
def decisions(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog`` recording the gateway's decision lines."""
    caplog.set_level(logging.DEBUG, logger="gateway.request")
    return caplog
