"""Helpers for the deployment tests: a small kustomize renderer, tool lookup and PromQL name checks.

Nothing here talks to a cluster or the network: the kustomization is assembled in Python
(no kubectl), and PromQL expressions are checked against the metrics that
``gateway.metrics.GatewayMetrics`` actually declares.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import JWKS_FETCH_RESULTS, GatewayMetrics
from gateway.reasons import Outcome, Reason

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"

Manifest = dict[str, Any]


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or beside the running interpreter (a venv's bin/, where pip puts it)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


# --- kustomize, the parts deploy/k8s uses -------------------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "labels", "resources", "configMapGenerator"}
# Where kustomize's `labels: [{includeSelectors: true}]` writes selectors, for the kinds we use.
_SELECTOR_MAPS = {"Service": ("spec", "selector")}
_MATCH_LABELS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "PodDisruptionBudget"}


def _merge_labels(node: dict[str, Any], path: tuple[str, ...], labels: dict[str, str]) -> None:
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = {**(node.get(path[-1]) or {}), **labels}


def render_kustomization(directory: Path = K8S) -> list[Manifest]:
    """Assemble a kustomization without kubectl: its resources, generated ConfigMaps and labels.

    Only the features ``deploy/k8s/kustomization.yaml`` uses are supported, and any other key
    fails loudly so that the rendering can never silently diverge from ``kubectl kustomize``.
    ConfigMaps keep their generator name (kustomize would add a content-hash suffix and rewrite
    the references to it; comparing names before the suffix checks the same wiring).
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    assert not unknown, f"kustomization keys this renderer does not support: {sorted(unknown)}"
    assert kustomization["kind"] == "Kustomization"
    manifests: list[Manifest] = []
    for resource in kustomization.get("resources", []):
        text = (directory / resource).read_text(encoding="utf-8")
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "literals"}, generator
        data: dict[str, str] = {}
        for entry in generator.get("files", []):
            key, _, source = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (directory / source).read_text(encoding="utf-8")
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        manifests.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    for entry in kustomization.get("labels", []):
        pairs = {str(k): str(v) for k, v in entry["pairs"].items()}
        for manifest in manifests:
            _merge_labels(manifest, ("metadata", "labels"), pairs)
            if not entry.get("includeSelectors"):
                continue
            kind = manifest["kind"]
            if kind in _SELECTOR_MAPS:
                _merge_labels(manifest, _SELECTOR_MAPS[kind], pairs)
            if kind in _MATCH_LABELS:
                _merge_labels(manifest, ("spec", "selector", "matchLabels"), pairs)
            if "template" in manifest.get("spec", {}):
                _merge_labels(manifest["spec"]["template"], ("metadata", "labels"), pairs)
    return manifests


def one(manifests: list[Manifest], kind: str) -> Manifest:
    """The single manifest of ``kind``."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# --- what gateway/metrics.py declares ------------------------------------------------------


@dataclass(frozen=True)
class DeclaredMetrics:
    """The series names a gateway exposes, each with its label names."""

    labels: dict[str, frozenset[str]]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.labels)

    @property
    def all_labels(self) -> frozenset[str]:
        return frozenset().union(*self.labels.values())


def declared_metrics() -> DeclaredMetrics:
    """Collect from a fresh ``GatewayMetrics`` registry: counters as ``_total``, histograms as
    ``_bucket``/``_sum``/``_count``, gauges by name (each with the labels its samples carry)."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, ["r"], ["i"], ["r"])
    # Gauges that the key cache sets later: give them a series so their labels are collected.
    metrics.jwks_keys.labels("i").set(0)
    metrics.jwks_stale.labels("i").set(0)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    labels: dict[str, set[str]] = {}
    for family in registry.collect():
        wanted = {family.name + suffix for suffix in suffixes[family.type]}
        for sample in family.samples:
            if sample.name in wanted:
                labels.setdefault(sample.name, set()).update(sample.labels)
        for name in wanted:
            labels.setdefault(name, set())
    return DeclaredMetrics({name: frozenset(names) for name, names in labels.items()})


# Every label value a query may name, by label: the public contract of README "Reasons" etc.
LABEL_VALUES: dict[str, frozenset[str]] = {
    "reason": frozenset(reason.value for reason in Reason),
    "result": frozenset(JWKS_FETCH_RESULTS),
    "outcome": frozenset(outcome.value for outcome in Outcome),
    "code_class": frozenset({"2xx", "3xx", "4xx", "5xx"}),
}
# Labels Prometheus itself attaches (target labels) or that histograms carry.
TARGET_LABELS = frozenset({"job", "instance", "le"})

# --- PromQL, enough to find names in our own expressions -----------------------------------

PROMQL_FUNCTIONS = frozenset(
    {
        "abs",
        "absent",
        "absent_over_time",
        "avg",
        "avg_over_time",
        "bottomk",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "count",
        "count_over_time",
        "count_values",
        "day_of_month",
        "day_of_week",
        "delta",
        "deriv",
        "exp",
        "floor",
        "group",
        "histogram_quantile",
        "holt_winters",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max",
        "max_over_time",
        "min",
        "min_over_time",
        "predict_linear",
        "present_over_time",
        "quantile",
        "quantile_over_time",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev",
        "stddev_over_time",
        "stdvar",
        "sum",
        "sum_over_time",
        "time",
        "timestamp",
        "topk",
        "vector",
        "label_values",
    }
)
PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_:][\w:]*")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")


@dataclass(frozen=True)
class Selector:
    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]


def selectors(expr: str) -> Iterator[Selector]:
    """Each ``metric{...}`` (or bare ``{...}``) of ``expr`` with its label matchers."""
    for match in _SELECTOR.finditer(expr):
        yield Selector(match.group(1), tuple(_MATCHER.findall(match.group(2))))


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (every identifier that is not a function call,
    keyword, label list, label matcher, range, string or Grafana variable)."""
    text = _GRAFANA_VARIABLE.sub("", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (may hold strings)
    text = _STRING.sub(" ", text)  # e.g. label_replace's arguments
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries
    text = _GROUPING.sub(" ", text)  # by (...), on (...), group_left (...)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names: set[str] = set()
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0].isdigit() or token in PROMQL_KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            assert token in PROMQL_FUNCTIONS, f"unknown PromQL function {token!r} in {expr!r}"
            continue
        names.add(token)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Label names in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    return {
        label.strip()
        for clause in _GROUPING.findall(_GRAFANA_VARIABLE.sub("", expr))
        for label in clause.split(",")
        if label.strip()
    }


def contract_problems(expr: str, declared: DeclaredMetrics) -> list[str]:
    """Every way ``expr`` names a metric, label or label value the gateway does not expose."""
    problems: list[str] = []
    names = metric_names(expr)
    if not names:
        problems.append("reads no metric")
    problems += [f"unknown metric {name}" for name in sorted(names - declared.names)]
    known_labels = declared.all_labels | TARGET_LABELS
    problems += [
        f"unknown grouping label {label}" for label in sorted(grouping_labels(expr) - known_labels)
    ]
    for selector in selectors(expr):
        if selector.metric is not None and selector.metric not in declared.names:
            continue  # already reported as an unknown metric
        metric_labels = (
            declared.labels.get(selector.metric, frozenset()) if selector.metric else known_labels
        )
        for label, op, value in selector.matchers:
            if label not in metric_labels | TARGET_LABELS:
                problems.append(f"{selector.metric} has no label {label}")
            allowed = LABEL_VALUES.get(label)
            if allowed is None or _GRAFANA_VARIABLE.search(value) or value == ".*":
                continue
            values = value.split("|") if op in ("=~", "!~") else [value]
            problems += [
                f"{label}={v!r} is not a value the gateway emits"
                for v in values
                if v not in allowed
            ]
    return problems
