"""The README documents every reason and every metric (config keys: test_schema.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.demo import TOKEN_LIFETIME_S, demo_config
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


def test_the_quick_start_names_the_demo_ports_and_token_lifetime() -> None:
    quick_start = README[README.index("## Quick start") : README.index("## How a request flows")]
    demo = demo_config(None)
    (issuer,) = demo.issuers.values()
    upstreams = {route.upstream.port for route in demo.routes if route.upstream is not None}
    for port in (demo.listen.port, demo.admin.port, *upstreams):
        assert f"`127.0.0.1:{port}`" in quick_start, port
    assert f"`{issuer.issuer.removeprefix('http://')}`" in quick_start, issuer.issuer
    assert f"TOKEN=$(curl -s {issuer.issuer}/token)" in quick_start
    assert f"valid for {TOKEN_LIFETIME_S // 60} minutes" in quick_start
