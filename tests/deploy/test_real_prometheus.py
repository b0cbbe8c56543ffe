"""A real Prometheus scrapes a real gateway: the counts it stores are the requests that were sent.

The gateway (proxy and admin listeners), the fake identity provider and the echo upstream run
on 127.0.0.1 with the real clock; /usr/bin/prometheus runs as a child process on 127.0.0.1 with
a configuration generated from deploy/prometheus/scrape.yaml (and the alert rules of
deploy/prometheus/alerts.yaml), scraping every second. Only that process is stopped, by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import create_admin_app, create_app, loads_config
from gateway.app import JWKS_KEY, gateway_runner
from tests.conftest import AUDIENCE, ISSUER, base_config, bearer
from tests.deploy.support import PROMETHEUS, declared_metrics, find_tool
from tests.deploy.test_dashboard import dashboard_exprs
from tests.fakes import EchoUpstream, FakeClock, FakeIdP, SigningKey, generate_key, make_token

SCRAPE = PROMETHEUS / "scrape.yaml"
SERIES_WITHIN_S = 25.0  # the first scrape comes ~5 s after start (target discovery is throttled)

N_OK = 7
N_MISSING = 3
N_EXPIRED = 4
N_UNKNOWN_KID = 12


@pytest.fixture
def prometheus_binary() -> str:
    found = find_tool("prometheus")
    if found is None:
        pytest.skip(
            "the prometheus server is not installed (Debian 'prometheus'; .ci/run installs it)"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def serving(app: web.Application, *, proxy: bool = False) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 on a free port (the gateway's own listener when ``proxy``);
    yield the port."""
    runner = gateway_runner(app) if proxy else web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()


def prometheus_config(admin_port: int) -> dict[str, Any]:
    """deploy/prometheus/scrape.yaml with the target on our admin listener and 1 s intervals."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(SCRAPE.read_text(encoding="utf-8")))
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s",
                        "evaluation_interval": "1s"}  # fmt: skip
    config["rule_files"] = [str(PROMETHEUS / name) for name in config.get("rule_files", [])]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "gateway"
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{admin_port}"]}]
    return config


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to this one PID, then SIGKILL if it has not exited within 10 s."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
    await process.wait()


@contextlib.asynccontextmanager
async def running_prometheus(
    binary: str, config: dict[str, Any], workdir: Path, session: aiohttp.ClientSession
) -> AsyncIterator[str]:
    """Start Prometheus on 127.0.0.1 (a free port; retried if another process took it), wait
    until it is ready, yield its base URL, and stop it by its PID."""
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    for attempt in range(3):
        port = _free_port()
        log_file = workdir / f"prometheus-{attempt}.log"
        with log_file.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / f'tsdb-{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while process.returncode is None and time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/-/ready") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                log_text = log_file.read_text(errors="replace")
                if process.returncode is not None and "address already in use" in log_text:
                    continue  # the port was taken between choosing and binding: try another
                raise AssertionError(f"prometheus did not become ready:\n{log_text[-3000:]}")
            yield url
            return
        finally:
            await _stop(process)
    raise AssertionError("prometheus could not bind a free loopback port in 3 attempts")


async def query(session: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query; fails on any error from Prometheus."""
    async with session.get(f"{url}/api/v1/query", params={"query": promql}) as response:
        body = await response.json()
    assert body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def poll(
    observe: Callable[[], Awaitable[Any]], expected: Any, *, within: float, what: str
) -> None:
    """Call ``observe`` until it returns ``expected``; fail with the last value after ``within`` s."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await observe()
        if last == expected:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what}: expected {expected!r} within {within}s, last saw {last!r}")


async def _send_traffic(
    session: aiohttp.ClientSession, proxy: str, key: SigningKey, clock: FakeClock
) -> None:
    """The requests whose counts Prometheus must report, each checked at the client too."""
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice"}

    async def get(headers: dict[str, str]) -> tuple[int, str]:
        async with session.get(f"{proxy}/api/orders/1", headers=headers) as response:
            body = await response.json()
            reason = "ok" if response.status == 200 else body["error"]["reason"]
            return response.status, reason

    for _ in range(N_OK):
        assert await get(bearer(make_token(key, clock, **claims))) == (200, "ok")
    for _ in range(N_MISSING):
        assert await get({}) == (401, "token_missing")
    now = int(clock.time())
    for _ in range(N_EXPIRED):
        expired = make_token(key, clock, iat=now - 7200, exp=now - 3600, **claims)
        assert await get(bearer(expired)) == (401, "token_expired")
    # A burst of tokens naming key ids the IdP never published, all at once.
    stranger = generate_key("ES256", "stranger")
    burst = [
        make_token(stranger, clock, headers={"kid": f"unpublished-{i}"}, **claims)
        for i in range(N_UNKNOWN_KID)
    ]
    results = await asyncio.gather(*(get(bearer(token)) for token in burst))
    assert results == [(401, "key_not_found")] * N_UNKNOWN_KID


def _series_key(metric: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = {k: v for k, v in metric.items() if k not in {"__name__", "job", "instance"}}
    return metric["__name__"], tuple(sorted(labels.items()))


async def test_prometheus_stores_exactly_what_the_gateway_counted(
    tmp_path: Path,
    prometheus_binary: str,
    idp: FakeIdP,
    upstream: EchoUpstream,
    rsa_key: SigningKey,
) -> None:
    config = loads_config(yaml.safe_dump(base_config(idp, upstream)))
    registry = CollectorRegistry()
    # Not make_gateway: a real Prometheus scrapes on its own real-time schedule, so the real clock.
    app = create_app(config, registry=registry)  # the real clock
    minting_clock = FakeClock()  # only a wall-clock source for the tokens' iat/exp (now)
    async with (
        aiohttp.ClientSession() as session,
        serving(app, proxy=True) as proxy_port,
        serving(create_admin_app(app)) as admin_port,
    ):
        await asyncio.wait_for(app[JWKS_KEY].settled(), 10)
        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
            assert response.status == 200, await response.text()
        async with running_prometheus(
            prometheus_binary, prometheus_config(admin_port), tmp_path, session
        ) as prometheus:
            await _send_traffic(session, f"http://127.0.0.1:{proxy_port}", rsa_key, minting_clock)

            async def counts() -> dict[str, float | None]:
                out: dict[str, float | None] = {}
                for name, promql in {
                    "ok": 'sum(gateway_requests_total{route="api", reason="ok"})',
                    "token_missing": 'sum(gateway_requests_total{reason="token_missing"})',
                    "token_expired": 'sum(gateway_requests_total{reason="token_expired"})',
                    "key_not_found": 'sum(gateway_requests_total{reason="key_not_found"})',
                    "kid_misses": 'sum(gateway_jwks_kid_misses_total{issuer="test"})',
                    "all": "sum(gateway_requests_total)",
                    "up": 'up{job="gateway"}',
                }.items():
                    result = await query(session, prometheus, promql)
                    out[name] = float(result[0]["value"][1]) if result else None
                return out

            await poll(
                counts,
                {
                    "ok": N_OK,
                    "token_missing": N_MISSING,
                    "token_expired": N_EXPIRED,
                    "key_not_found": N_UNKNOWN_KID,
                    "kid_misses": N_UNKNOWN_KID,
                    "all": N_OK + N_MISSING + N_EXPIRED + N_UNKNOWN_KID,
                    "up": 1,
                },
                within=SERIES_WITHIN_S,
                what="series scraped by prometheus",
            )

            # Every gateway series Prometheus holds equals the gateway's own registry, and none
            # is missing (the registry is quiet now: no traffic, no key refresh due).
            declared = declared_metrics().names
            stored = {
                _series_key(series["metric"]): float(series["value"][1])
                for series in await query(session, prometheus, '{__name__=~"gateway_.+"}')
                if series["metric"]["__name__"] in declared
            }
            exported = {
                _series_key({"__name__": sample.name, **sample.labels}): sample.value
                for family in registry.collect()
                for sample in family.samples
                if sample.name in declared
            }
            assert stored.keys() == exported.keys()
            for key, value in exported.items():
                if key[0] == "gateway_jwks_age_seconds":
                    # Real time passes between the scrape and this read: the age grew since.
                    assert 0 <= stored[key] <= value < SERIES_WITHIN_S + 60, key
                    continue
                assert math.isclose(stored[key], value, rel_tol=1e-9), key
            keys = await query(session, prometheus, 'gateway_jwks_keys{issuer="test"}')
            assert float(keys[0]["value"][1]) == len(idp.keys)

            # The alert rules load and evaluate on a real server without error.
            async def rule_health() -> dict[str, str]:
                async with session.get(f"{prometheus}/api/v1/rules") as response:
                    body = await response.json()
                return {
                    rule["name"]: rule["health"] + (rule.get("lastError") or "")
                    for group in body["data"]["groups"]
                    for rule in group["rules"]
                }

            alerts = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text(encoding="utf-8"))
            names = [rule["alert"] for group in alerts["groups"] for rule in group["rules"]]
            await poll(
                rule_health,
                dict.fromkeys(names, "ok"),
                within=10,
                what="alert rules evaluated",
            )

            # Every dashboard query is valid PromQL for this server and the JWKS panels see
            # the issuer (Grafana's variables replaced as Grafana would).
            variables = {"$__rate_interval": "1m", "$__range": "5m", "$route": ".*",
                         "$issuer": ".*"}  # fmt: skip
            issuers_seen = set()
            for _title, expr in dashboard_exprs():
                for variable, replacement in variables.items():
                    expr = expr.replace(variable, replacement)
                for series in await query(session, prometheus, expr):
                    issuers_seen.add(series["metric"].get("issuer"))
            assert "test" in issuers_seen
