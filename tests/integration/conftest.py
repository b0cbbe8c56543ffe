"""Fixtures shared by integration test files: ``run_gateway`` (``gateway run`` as a process)."""

from tests.integration.test_operations import run_gateway

__all__ = ["run_gateway"]
