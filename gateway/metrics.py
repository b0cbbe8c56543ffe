"""Every Prometheus metric the gateway exposes, declared against an injected registry."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .reasons import REASON_SPECS, Reason

# No ``_created`` companion series: a timestamp per counter and histogram child that no alert
# or dashboard reads, and as many series again as the counts themselves.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNMATCHED_ROUTE: Final = "_unmatched"
"""The ``route`` label of requests no route matched."""

JWKS_FETCH_RESULTS: Final = (
    "success",
    "not_modified",
    "http_error",
    "timeout",
    "unreachable",
    "invalid",
)
"""The bounded ``result`` label values of ``gateway_jwks_fetches_total`` (``not_modified``: a
conditional refresh answered 304, the cached set confirmed)."""

_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _LeanCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LeanHistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound holds the value (the last bound is +Inf).
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class _LeanFamily(Collector):
    """A labelled counter or histogram of the request path, in one process.

    prometheus-client's own take a lock per increment and per bucket and check on every
    observation whether they may be observed: two histograms and two counters per request
    cost the proxy hop several per cent of its throughput.  These children are plain
    attributes of a single-threaded event loop, read whole at scrape time.  With ``--workers``
    (multiprocess mode) prometheus-client's classes are used instead: their values go to the
    shared files the supervisor aggregates.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] | None = None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = (*buckets, float("inf")) if buckets is not None else None
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            child = (
                _LeanCounterChild() if self._bounds is None else _LeanHistogramChild(self._bounds)
            )
            self._children[values] = child
        return child

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._children)

    def _families(self, children: dict[tuple[str, ...], Any]) -> Iterator[Metric]:
        labels = self._labelnames
        if self._bounds is None:
            counter = CounterMetricFamily(self._name, self._documentation, labels=labels)
            for values, child in list(children.items()):
                counter.add_metric(values, child.value)
            yield counter
            return
        histogram = HistogramMetricFamily(self._name, self._documentation, labels=labels)
        bounds = [str(b) if b != float("inf") else "+Inf" for b in self._bounds]
        for values, child in list(children.items()):
            running = 0
            cumulative = []
            for bound, count in zip(bounds, child.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric(values, cumulative, child.sum)
        yield histogram


class GatewayMetrics:
    """The gateway's metrics; labels are route ids, reason values, issuer ids and status classes only."""

    def __init__(
        self,
        registry: CollectorRegistry,
        route_ids: Iterable[str] = (),
        issuer_ids: Iterable[str] = (),
        report_only_route_ids: Iterable[str] = (),
        *,
        multiprocess: bool = False,
    ) -> None:
        self.registry = registry
        # With --workers, gauges are per process; the admin listener aggregates them
        # (prometheus-client multiprocess mode): keys by the least-served worker,
        # staleness and last success by the worst and latest one.
        self.multiprocess = multiprocess
        # The four families every request touches: lean in one process (see _LeanFamily).
        counter: Any = Counter if multiprocess else _LeanFamily
        histogram: Any = Histogram if multiprocess else _LeanFamily
        self.requests = counter(
            "gateway_requests",
            "Requests handled, by route and by the reason they ended with (ok when forwarded).",
            ["route", "reason"],
            registry=registry,
        )
        self.request_duration = histogram(
            "gateway_request_duration_seconds",
            "Time from receiving a request to the end of its response, by route and outcome.",
            ["route", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = histogram(
            "gateway_upstream_duration_seconds",
            "Time from sending a request upstream to receiving the upstream's response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_responses = counter(
            "gateway_upstream_responses",
            "Responses received from upstreams, by route and status class (2xx, 3xx, 4xx, 5xx).",
            ["route", "code_class"],
            registry=registry,
        )
        self.report_only = Counter(
            "gateway_report_only_decisions",
            "Verification outcomes on report-only routes, whose requests were forwarded regardless.",
            ["route", "reason"],
            registry=registry,
        )
        self.jwks_fetches = Counter(
            "gateway_jwks_fetches",
            "Key-set fetches from identity providers, by issuer and result.",
            ["issuer", "result"],
            registry=registry,
        )
        self.jwks_kid_misses = Counter(
            "gateway_jwks_kid_misses",
            "Tokens whose key id was not in the issuer's cached key set.",
            ["issuer"],
            registry=registry,
        )
        self.jwks_refetch_suppressed = Counter(
            "gateway_jwks_refetch_suppressed",
            "Unknown-key-id refetches refused because the issuer's cooldown had not passed.",
            ["issuer"],
            registry=registry,
        )
        self.jwks_private_keys_dropped = Counter(
            "gateway_jwks_private_keys_dropped",
            "Published keys dropped because they carried private-key members (d, p, q, dp, dq, "
            "qi, k, oth), counted per fetch; the identity provider exposes private keys.",
            ["issuer"],
            registry=registry,
        )
        self.jwks_keys = Gauge(
            "gateway_jwks_keys",
            "Usable signing keys in the issuer's current key set.",
            ["issuer"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.jwks_stale = Gauge(
            "gateway_jwks_stale",
            "1 while the issuer's key set is past its lifetime because fetches fail (gateway_jwks_keys "
            "says whether it is still served).",
            ["issuer"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.jwks_age = Gauge(
            "gateway_jwks_age_seconds",
            "Seconds since the issuer's key set was last fetched or confirmed (+Inf before the "
            "first success, 0 for a static jwks); alert when it passes the cache lifetime.",
            ["issuer"],
            registry=registry,
            multiprocess_mode="livemax",  # the worker whose set is oldest
        )
        self.jwks_last_success = Gauge(
            "gateway_jwks_last_success_timestamp_seconds",
            "Unix time of the issuer's last successful key-set fetch (0 if none yet).",
            ["issuer"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.upgrades = Counter(
            "gateway_upgrades",
            "WebSocket upgrades the upstream accepted (101), by route.",
            ["route"],
            registry=registry,
        )
        self.tunnels_open = Gauge(
            "gateway_tunnels_open",
            "Upgraded connections (WebSocket tunnels) open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.forward_auth_decisions = Counter(
            "gateway_forward_auth_decisions",
            "Decisions answered in forward_auth mode, by caller (nginx, traefik, envoy) and "
            "decision (allow, deny).",
            ["caller", "decision"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Configuration reloads (SIGHUP or a changed file), by result (success, failure).",
            ["result"],
            registry=registry,
        )
        self.dpop_replay_entries = Gauge(
            "gateway_dpop_replay_cache_entries",
            "DPoP proofs remembered to refuse their replay (at most dpop.replay_cache_size).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.dpop_replay_evictions = Counter(
            "gateway_dpop_replay_evictions",
            "DPoP proofs forgotten before their window closed because the replay cache was full "
            "(raise dpop.replay_cache_size when this grows).",
            registry=registry,
        )
        self.ready = Gauge(
            "gateway_ready",
            "1 while the gateway is ready: every issuer that gates readiness has keys.",
            registry=registry,
            multiprocess_mode="liveall",  # per worker: the supervisor needs each one ready
        )
        if not multiprocess:  # with --workers the supervisor counts reloads, once
            for result in ("success", "failure"):
                self.config_reloads.labels(result)
        self.route_ids: tuple[str, ...] = ()
        # Label children resolved once: .labels() takes a lock and builds a key per call.
        self._request_children: dict[tuple[str, Reason], tuple[Any, Any]] = {}
        self._upstream_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._decision_children: dict[tuple[str, bool], Any] = {}
        self.add_routes(route_ids, report_only_route_ids)
        self.add_issuers(issuer_ids)

    def watch_replay_cache(self, cache: Any) -> None:
        """Count the DPoP replay cache's size and early evictions."""
        cache.observe(self.dpop_replay_entries.set, self.dpop_replay_evictions.inc)

    def add_routes(
        self, route_ids: Iterable[str], report_only_route_ids: Iterable[str] = ()
    ) -> None:
        """Pre-create every series of these routes, so dashboards and rate() see zeros, not gaps."""
        new = [r for r in (*route_ids, UNMATCHED_ROUTE) if r not in self.route_ids]
        self.route_ids = (*self.route_ids, *new)
        outcomes = {spec.outcome.value for spec in REASON_SPECS.values()}
        for route in new:
            for reason in Reason:
                self.requests.labels(route, reason.value)
            self.upstream_duration.labels(route)
            self.upgrades.labels(route)
            for code_class in ("2xx", "3xx", "4xx", "5xx"):
                self.upstream_responses.labels(route, code_class)
            for outcome in outcomes:
                self.request_duration.labels(route, outcome)
        for route in report_only_route_ids:
            for reason in Reason:
                self.report_only.labels(route, reason.value)

    def add_issuers(self, issuer_ids: Iterable[str]) -> None:
        """Pre-create every series of these issuers."""
        for issuer in issuer_ids:
            for result in JWKS_FETCH_RESULTS:
                self.jwks_fetches.labels(issuer, result)
            self.jwks_kid_misses.labels(issuer)
            self.jwks_refetch_suppressed.labels(issuer)
            self.jwks_private_keys_dropped.labels(issuer)
            self.jwks_last_success.labels(issuer)

    def observe_request(self, route: str, reason: Reason, duration_s: float) -> None:
        """Count one finished request; called exactly once per request."""
        children = self._request_children.get((route, reason))
        if children is None:
            outcome = REASON_SPECS[reason].outcome.value
            children = (
                self.requests.labels(route, reason.value),
                self.request_duration.labels(route, outcome),
            )
            self._request_children[(route, reason)] = children
        children[0].inc()
        children[1].observe(duration_s)

    def add_forward_auth_callers(self, callers: Iterable[str]) -> None:
        """Pre-create the decision series of forward_auth mode."""
        for caller in callers:
            for decision in ("allow", "deny"):
                self.forward_auth_decisions.labels(caller, decision)

    def forward_auth_decision(self, caller: str, *, allowed: bool) -> None:
        """Count one forward-auth answer."""
        key = (caller, allowed)
        child = self._decision_children.get(key)
        if child is None:
            child = self.forward_auth_decisions.labels(caller, "allow" if allowed else "deny")
            self._decision_children[key] = child
        child.inc()

    def observe_upstream(self, route: str, status: int, duration_s: float) -> None:
        """Record the upstream's answer (status class and time to headers)."""
        code_class = min(max(status // 100, 2), 5)
        children = self._upstream_children.get((route, code_class))
        if children is None:
            children = (
                self.upstream_duration.labels(route),
                self.upstream_responses.labels(route, f"{code_class}xx"),
            )
            self._upstream_children[(route, code_class)] = children
        children[0].observe(duration_s)
        children[1].inc()
