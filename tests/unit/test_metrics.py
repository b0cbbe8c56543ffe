"""Metrics: every series exists at zero from the start, and one request moves exactly one series."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import JWKS_FETCH_RESULTS, UNMATCHED_ROUTE, GatewayMetrics
from gateway.reasons import REASON_SPECS, Outcome, Reason

ROUTES = ("orders", "public")
ISSUERS = ("corp", "partner")
ALL_ROUTES = (*ROUTES, UNMATCHED_ROUTE)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> GatewayMetrics:
    return GatewayMetrics(registry, ROUTES, ISSUERS)


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``, keyed by its sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def nonzero(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: v for k, v in samples(registry, name).items() if v}


def test_request_series_exist_at_zero_for_every_route_and_reason(
    metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    series = samples(registry, "gateway_requests_total")
    expected = {(("reason", r.value), ("route", route)) for route in ALL_ROUTES for r in Reason}
    assert set(series) == expected
    assert set(series.values()) == {0.0}
    assert metrics.route_ids == ALL_ROUTES


def test_jwks_series_exist_at_zero_for_every_issuer_and_result(registry: CollectorRegistry) -> None:
    GatewayMetrics(registry, ROUTES, ISSUERS)
    fetches = samples(registry, "gateway_jwks_fetches_total")
    assert set(fetches) == {
        (("issuer", i), ("result", r)) for i in ISSUERS for r in JWKS_FETCH_RESULTS
    }
    assert set(fetches.values()) == {0.0}
    # gateway_jwks_keys and gateway_jwks_stale are computed at scrape time by the key cache,
    # which registers them per issuer when it is built (see test_jwks).
    for name in (
        "gateway_jwks_kid_misses_total",
        "gateway_jwks_refetch_suppressed_total",
        "gateway_jwks_last_success_timestamp_seconds",
    ):
        series = samples(registry, name)
        assert set(series) == {(("issuer", i),) for i in ISSUERS}, name
        assert set(series.values()) == {0.0}, name


def test_upstream_and_duration_series_exist_at_zero(registry: CollectorRegistry) -> None:
    GatewayMetrics(registry, ROUTES, ISSUERS)
    responses = samples(registry, "gateway_upstream_responses_total")
    assert set(responses) == {
        (("code_class", c), ("route", r)) for r in ALL_ROUTES for c in ("2xx", "3xx", "4xx", "5xx")
    }
    durations = samples(registry, "gateway_request_duration_seconds_count")
    assert set(durations) == {
        (("outcome", o.value), ("route", r)) for r in ALL_ROUTES for o in Outcome
    }
    assert set(samples(registry, "gateway_upstream_duration_seconds_count")) == {
        (("route", r),) for r in ALL_ROUTES
    }


def test_jwks_fetch_results_cover_what_the_fetcher_can_report() -> None:
    expected = {"success", "not_modified", "http_error", "timeout", "unreachable", "invalid"}
    assert set(JWKS_FETCH_RESULTS) == expected


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        pytest.param("orders", Reason.OK, id="ok"),
        pytest.param("orders", Reason.TOKEN_EXPIRED, id="rejected"),
        pytest.param("public", Reason.UPSTREAM_TIMEOUT, id="error"),
        pytest.param(UNMATCHED_ROUTE, Reason.ROUTE_NOT_FOUND, id="unmatched"),
    ],
)
def test_observe_request_increments_exactly_one_series(
    route: str, reason: Reason, metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.observe_request(route, reason, 0.003)

    assert nonzero(registry, "gateway_requests_total") == {
        (("reason", reason.value), ("route", route)): 1.0
    }
    outcome = REASON_SPECS[reason].outcome.value
    assert nonzero(registry, "gateway_request_duration_seconds_count") == {
        (("outcome", outcome), ("route", route)): 1.0
    }
    assert registry.get_sample_value(
        "gateway_request_duration_seconds_sum", {"route": route, "outcome": outcome}
    ) == pytest.approx(0.003)
    # The 0.005 s bucket holds it, the 0.0025 s bucket does not.
    bucket = "gateway_request_duration_seconds_bucket"
    assert (
        registry.get_sample_value(bucket, {"route": route, "outcome": outcome, "le": "0.005"})
        == 1.0
    )
    assert (
        registry.get_sample_value(bucket, {"route": route, "outcome": outcome, "le": "0.0025"})
        == 0.0
    )


def test_repeated_requests_accumulate(metrics: GatewayMetrics, registry: CollectorRegistry) -> None:
    for _ in range(3):
        metrics.observe_request("orders", Reason.OK, 0.01)
    metrics.observe_request("orders", Reason.INSUFFICIENT_SCOPE, 0.01)
    assert nonzero(registry, "gateway_requests_total") == {
        (("reason", "ok"), ("route", "orders")): 3.0,
        (("reason", "insufficient_scope"), ("route", "orders")): 1.0,
    }


@pytest.mark.parametrize(
    ("status", "code_class"),
    [
        (200, "2xx"),
        (204, "2xx"),
        (299, "2xx"),
        (301, "3xx"),
        (304, "3xx"),
        (400, "4xx"),
        (404, "4xx"),
        (499, "4xx"),
        (500, "5xx"),
        (503, "5xx"),
        (599, "5xx"),
        # Outside 2xx-5xx the class is clamped so the label set stays bounded.
        (101, "2xx"),
        (999, "5xx"),
    ],
    ids=str,
)
def test_observe_upstream_code_class(
    status: int, code_class: str, metrics: GatewayMetrics, registry: CollectorRegistry
) -> None:
    metrics.observe_upstream("orders", status, 0.02)
    assert nonzero(registry, "gateway_upstream_responses_total") == {
        (("code_class", code_class), ("route", "orders")): 1.0
    }
    assert (
        registry.get_sample_value("gateway_upstream_duration_seconds_count", {"route": "orders"})
        == 1.0
    )


def test_registries_are_independent() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    GatewayMetrics(first, ROUTES, ISSUERS).observe_request("orders", Reason.OK, 0.1)
    GatewayMetrics(second, ROUTES, ISSUERS)
    labels = {"route": "orders", "reason": "ok"}
    assert first.get_sample_value("gateway_requests_total", labels) == 1.0
    assert second.get_sample_value("gateway_requests_total", labels) == 0.0


def test_report_only_series_exist_only_for_report_only_routes(registry: CollectorRegistry) -> None:
    GatewayMetrics(registry, ROUTES, ISSUERS, report_only_route_ids=["public"])
    series = samples(registry, "gateway_report_only_decisions_total")
    assert set(series) == {(("reason", r.value), ("route", "public")) for r in Reason}
    assert set(series.values()) == {0.0}


def test_no_issuers_means_no_issuer_series(registry: CollectorRegistry) -> None:
    GatewayMetrics(registry, ROUTES)
    assert samples(registry, "gateway_jwks_fetches_total") == {}


def test_the_lean_request_histogram_exports_what_prometheus_clients_would() -> None:
    """One process keeps the request-path families itself (no lock per increment); a scrape
    must read exactly what prometheus-client's Histogram and Counter give for the same
    observations, bucket boundaries included (a value equal to a bound is in that bucket)."""
    lean_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    lean = GatewayMetrics(lean_registry, ROUTES)
    reference = GatewayMetrics(reference_registry, ROUTES, multiprocess=True)
    for duration in (0.0, 0.0005, 0.0007, 0.001, 0.3, 2.5, 29.9, 30.0, 31.0, 1e6):
        for metrics in (lean, reference):
            metrics.observe_request("orders", Reason.OK, duration)
            metrics.observe_upstream("orders", 503, duration)
    for name in (
        "gateway_request_duration_seconds_bucket",
        "gateway_request_duration_seconds_sum",
        "gateway_request_duration_seconds_count",
        "gateway_upstream_duration_seconds_bucket",
        "gateway_requests_total",
        "gateway_upstream_responses_total",
    ):
        assert samples(lean_registry, name) == samples(reference_registry, name), name
    assert nonzero(lean_registry, "gateway_requests_total") == {
        (("reason", "ok"), ("route", "orders")): 10.0
    }
