"""The README documents every config key, every reason and every metric."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway import config
from gateway.metrics import GatewayMetrics
from gateway.reasons import Reason

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
EXAMPLE = (Path(__file__).parents[2] / "config" / "gateway.example.yaml").read_text("utf-8")
REFERENCE = README[README.index("## Configuration reference") :]

KEYS = sorted(
    set(config._TOP_KEYS)
    | set(config._ISSUER_KEYS)
    | set(config._ROUTE_KEYS)
    | set(config._AUTH_KEYS)
    | {
        f.name
        for cls in (config.ListenConfig, config.AdminConfig, config.TracingConfig)
        for f in dataclasses.fields(cls)
    }
    | {f.name for f in dataclasses.fields(config.UpstreamDefaults)}
    | {f.name for f in dataclasses.fields(config.Limits)}
    | {"path", "path_prefix", "methods", "hosts", "strip_prefix", "replace_prefix"}
)


@pytest.mark.parametrize("key", KEYS)
def test_every_config_key_is_in_the_readme_reference(key: str) -> None:
    # A reference row names the key inside a dotted path in backquotes.
    assert re.search(rf"`[^`\s]*\b{re.escape(key)}\b[^`\s]*`", REFERENCE), key


@pytest.mark.parametrize("key", KEYS)
def test_every_config_key_is_in_the_example_config(key: str) -> None:
    assert re.search(rf"\b{re.escape(key)}:", EXAMPLE), key


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
