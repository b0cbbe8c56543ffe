"""The admin listener end to end: Prometheus exposition, label hygiene, liveness and readiness."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import prometheus_client
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import Reason, create_admin_app, create_app, loads_config
from gateway.app import JWKS_KEY, METRICS_KEY
from gateway.metrics import JWKS_FETCH_RESULTS, UNMATCHED_ROUTE
from gateway.reasons import Outcome
from tests import conftest
from tests.conftest import AUDIENCE, ISSUER
from tests.fakes import generate_key, make_token
from tests.integration.e2e_helpers import wait_until

EXPECTED_FAMILIES = {
    "gateway_requests": "counter",
    "gateway_request_duration_seconds": "histogram",
    "gateway_upstream_duration_seconds": "histogram",
    "gateway_upstream_responses": "counter",
    "gateway_report_only_decisions": "counter",
    "gateway_forward_auth_decisions": "counter",
    "gateway_upgrades": "counter",
    "gateway_tunnels_open": "gauge",
    "gateway_dpop_replay_cache_entries": "gauge",
    "gateway_dpop_replay_evictions": "counter",
    "gateway_jwks_fetches": "counter",
    "gateway_jwks_kid_misses": "counter",
    "gateway_jwks_refetch_suppressed": "counter",
    "gateway_jwks_private_keys_dropped": "counter",
    "gateway_jwks_keys": "gauge",
    "gateway_jwks_stale": "gauge",
    "gateway_config_reloads": "counter",
    "gateway_ready": "gauge",
    "gateway_jwks_last_success_timestamp_seconds": "gauge",
    "gateway_jwks_age_seconds": "gauge",
}


async def scrape(gw: conftest.RunningGateway) -> str:
    response = await gw.admin.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


async def test_metrics_is_prometheus_text_with_every_family(gateway, token):
    assert (await gateway.client.get("/api/x", headers=conftest.bearer(token()))).status == 200
    text = await scrape(gateway)
    for name in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_jwks_fetches_total",
        "gateway_jwks_kid_misses_total",
        "gateway_jwks_refetch_suppressed_total",
        "gateway_jwks_keys",
        "gateway_jwks_last_success_timestamp_seconds",
    ):
        assert f"\n{name}{{" in text, name
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == EXPECTED_FAMILIES
    assert "_created" not in text  # no creation-time companion series
    assert 'gateway_requests_total{reason="ok",route="api"} 1.0' in text
    assert 'gateway_jwks_fetches_total{issuer="test",result="success"} 1.0' in text


def _series_cost_in_readme() -> tuple[int, int, int]:
    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"each route adds (\d+) series\*\* \((\d+) on a\s+report-only route\) and "
        r"\*\*each issuer (\d+)\*\*",
        text,
    )
    assert found is not None, "the README's Metrics section states the series count"
    route, report_only, issuer = (int(n) for n in found.groups())
    return route, report_only, issuer


async def test_each_route_and_issuer_costs_the_series_the_readme_states(
    make_gateway, token, idp, upstream
):
    route_cost, report_only_cost, issuer_cost = _series_cost_in_readme()
    config = conftest.base_config(idp, upstream)
    shadow = copy.deepcopy(config["routes"][0])
    shadow.update(id="shadow", match={"path_prefix": "/shadow"})
    shadow["auth"] = {**shadow["auth"], "mode": "report-only"}
    config["routes"].append(shadow)
    gateway = await make_gateway(document=config)
    # Traffic does not add series: a few requests of every kind first.
    for path, headers in (("/api/x", conftest.bearer(token())), ("/api/x", {}),
                          ("/shadow/x", {}), ("/nowhere", {})):  # fmt: skip
        await gateway.client.get(path, headers=headers)
    text = await scrape(gateway)
    by_route: Counter[str] = Counter()
    by_issuer: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "route" in sample.labels:
                by_route[sample.labels["route"]] += 1
            if "issuer" in sample.labels:
                by_issuer[sample.labels["issuer"]] += 1
    routes = [r["id"] for r in config["routes"]]
    assert set(by_route) == {*routes, UNMATCHED_ROUTE}
    for route in (*routes, UNMATCHED_ROUTE):
        assert by_route[route] == (report_only_cost if route == "shadow" else route_cost), route
    assert set(by_issuer) == set(config["issuers"])
    assert all(count == issuer_cost for count in by_issuer.values()), by_issuer


async def test_metric_labels_never_carry_paths_kids_subjects_or_tokens(gateway, token, clock):
    secret_kid = "kid-secret-7f3a"
    secret_sub = "subject-secret-55c1"
    impostor = generate_key("ES256", secret_kid)
    forged = make_token(impostor, clock, iss=ISSUER, aud=AUDIENCE, sub=secret_sub)
    valid = token(sub=secret_sub, email="secret-mail@x.test")
    requests: list[tuple[str, dict[str, str]]] = [
        ("/api/secret-path-91?q=secret-query", conftest.bearer(valid)),
        ("/api/secret-path-92", conftest.bearer(forged)),
        ("/api/secret-path-93", conftest.bearer("secret.token-value.xyz")),
        ("/api/secret-path-94", {}),
        ("/nowhere-secret-path-95", {}),
        ("/public/secret-path-96", {}),
    ]
    for path, headers in requests:
        await gateway.client.get(path, headers=headers)
    text = await scrape(gateway)
    for needle in (
        "secret",
        secret_kid,
        secret_sub,
        valid,
        forged,
        valid.split(".")[2],
        "/api",
        "/nowhere",
        "/public",
        "alice",
    ):
        assert needle not in text, needle

    allowed = {
        "route": {r.id for r in gateway.config.routes} | {UNMATCHED_ROUTE},
        "reason": {r.value for r in Reason},
        "outcome": {o.value for o in Outcome},
        "issuer": set(gateway.config.issuers),
        "result": set(JWKS_FETCH_RESULTS) | {"failure"},  # gateway_config_reloads_total
        "code_class": {"2xx", "3xx", "4xx", "5xx"},
    }
    seen_reasons = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                assert label in allowed, (sample.name, label)
                assert value in allowed[label], (sample.name, label, value)
            if sample.name == "gateway_requests_total" and sample.value:
                seen_reasons.add((sample.labels["route"], sample.labels["reason"]))
    assert seen_reasons == {
        ("api", "ok"),
        ("api", "key_not_found"),
        ("api", "token_malformed"),
        ("api", "token_missing"),
        (UNMATCHED_ROUTE, "route_not_found"),
        ("public", "ok"),
    }


async def test_healthz_is_200_while_the_idp_is_down(make_gateway, idp):
    idp.mode = "error"
    gw = await make_gateway()
    health = await gw.admin.get("/healthz")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    assert (await gw.admin.get("/readyz")).status == 503


async def test_readyz_is_503_before_the_first_good_fetch_and_200_after(
    make_gateway, idp, clock, signing_keys
):
    idp.mode = "error"
    gw = await make_gateway()
    ready = await gw.admin.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["status"] == "waiting_for_keys"
    assert body["issuers"]["test"] == {
        "keys": 0,
        "ready": False,
        "failures": 1,
        "stale": False,
        "source": "jwks_uri",
        "required_for_readiness": True,
    }
    assert gw.metric("gateway_jwks_keys", issuer="test") == 0
    assert gw.metric("gateway_jwks_last_success_timestamp_seconds", issuer="test") == 0
    assert gw.metric("gateway_jwks_fetches_total", issuer="test", result="http_error") == 1

    idp.mode = "ok"
    clock.advance(1)  # the first retry is due

    async def ready_now() -> bool:
        return bool((await gw.admin.get("/readyz")).status == 200)

    await wait_until(ready_now, what="/readyz 200")
    body = await (await gw.admin.get("/readyz")).json()
    assert body == {
        "status": "ready",
        "issuers": {
            "test": {
                "keys": len(signing_keys),
                "ready": True,
                "failures": 0,
                "stale": False,
                "source": "jwks_uri",
                "required_for_readiness": True,
            }
        },
    }
    assert gw.metric("gateway_jwks_keys", issuer="test") == len(signing_keys)
    assert gw.metric("gateway_jwks_last_success_timestamp_seconds", issuer="test") == clock.time()


async def test_two_gateways_in_one_process_have_independent_registries(
    aiohttp_client: Any, idp, upstream, token
):
    config = loads_config(yaml.safe_dump(copy.deepcopy(conftest.base_config(idp, upstream))))
    # Not make_gateway (which always passes a registry): this tests create_app's default.
    first = create_app(config)  # default: a fresh registry each
    second = create_app(config)  # a shared registry would raise "Duplicated timeseries"
    assert first[METRICS_KEY].registry is not second[METRICS_KEY].registry
    clients = [await aiohttp_client(conftest.GatewayTestServer(app)) for app in (first, second)]
    admins = [await aiohttp_client(create_admin_app(app)) for app in (first, second)]
    await first[JWKS_KEY].settled()
    await second[JWKS_KEY].settled()

    for _ in range(3):
        response = await clients[0].get("/api/x", headers=conftest.bearer(token()))
        assert response.status == 200
    texts = [await (await admin.get("/metrics")).text() for admin in admins]
    assert 'gateway_requests_total{reason="ok",route="api"} 3.0' in texts[0]
    assert 'gateway_requests_total{reason="ok",route="api"} 0.0' in texts[1]
    # Nothing lands in prometheus_client's global default registry.
    assert prometheus_client.REGISTRY.get_sample_value("gateway_requests_total", {}) is None
    assert "gateway_" not in prometheus_client.generate_latest().decode()
