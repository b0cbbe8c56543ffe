"""The README documents every reason and every metric (config keys: test_schema.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from gateway.reasons import Reason

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("reason", [r.value for r in Reason])
def test_every_reason_is_in_the_readme_table(reason: str) -> None:
    assert f"| `{reason}`" in README, reason


def _metric_names() -> list[str]:
    registry = CollectorRegistry()
    GatewayMetrics(registry, ["r"], ["i"])
    return sorted(
        family.name + ("_total" if family.type == "counter" else "")
        for family in registry.collect()
    )


@pytest.mark.parametrize("name", _metric_names())
def test_every_metric_is_in_the_readme_table(name: str) -> None:
    assert f"| `{name}` |" in README, name
