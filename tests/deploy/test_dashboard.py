"""deploy/grafana: the dashboard parses, covers what operators need, and every PromQL expression
reads only metric names, labels and label values that gateway/metrics.py declares."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy.support import (
    DASHBOARD,
    contract_problems,
    declared_metrics,
    metric_names,
)


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside (collapsed) rows


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) for every query target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def _variable_queries() -> list[str]:
    out = []
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_the_dashboard_parses_and_is_importable() -> None:
    dashboard = _dashboard()
    assert dashboard["title"]
    assert dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            assert target["expr"].strip(), panel["title"]
            assert target["refId"], panel["title"]


@pytest.mark.parametrize(("title", "expr"), dashboard_exprs(), ids=lambda v: str(v)[:60])
def test_dashboard_expressions_read_only_what_the_gateway_exports(title: str, expr: str) -> None:
    assert contract_problems(expr, declared_metrics()) == [], title


def test_template_variables_read_declared_metrics() -> None:
    declared = declared_metrics()
    queries = _variable_queries()
    assert queries
    for query in queries:
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, query
        metric, label = match.groups()
        assert metric in declared.names, query
        assert label in declared.labels[metric], query


def test_the_dashboard_covers_requests_latency_and_key_health() -> None:
    exprs = [expr for _, expr in dashboard_exprs()]
    read = set().union(*(metric_names(expr) for expr in exprs))
    # Requests and rejections by reason, per route.
    assert any(
        "gateway_requests_total" in e and "route" in e and "reason" in e and 'reason!="ok"' in e
        for e in exprs
    )
    # Latency quantiles from the request histogram.
    quantiles = {
        q
        for e in exprs
        for q in re.findall(
            r"histogram_quantile\(([\d.]+),.*gateway_request_duration_seconds_bucket", e
        )
    }
    assert {"0.5", "0.99"} <= quantiles
    # JWKS health per issuer: keys, stale, last success age, fetch results, misses, suppressed.
    assert {
        "gateway_jwks_keys",
        "gateway_jwks_stale",
        "gateway_jwks_last_success_timestamp_seconds",
        "gateway_jwks_fetches_total",
        "gateway_jwks_kid_misses_total",
        "gateway_jwks_refetch_suppressed_total",
    } <= read
    assert any(
        "time() -" in e and "gateway_jwks_last_success_timestamp_seconds" in e for e in exprs
    )
    assert any("by (issuer, result)" in e for e in exprs)


def test_the_name_check_catches_a_typo() -> None:
    # The check must not pass vacuously: a misspelt metric, label or reason is reported.
    declared = declared_metrics()
    assert contract_problems('rate(gateway_request_total{reason="ok"}[5m])', declared) == [
        "unknown metric gateway_request_total"
    ]
    assert contract_problems('sum by (reson) (gateway_jwks_keys{issuer="x"})', declared) == [
        "unknown grouping label reson"
    ]
    assert contract_problems('gateway_requests_total{reason=~"ok|token_expird"}', declared) == [
        "reason='token_expird' is not a value the gateway emits"
    ]
    assert contract_problems('gateway_jwks_keys{route="x"}', declared) == [
        "gateway_jwks_keys has no label route"
    ]
