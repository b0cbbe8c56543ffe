"""Operations: config reload (in process, SIGHUP, --watch-config), graceful shutdown, --workers,
log formats and request ids.

In-process tests run the app on the FakeClock; the rest run ``python -m gateway run`` as a real
subprocess on 127.0.0.1 (real time, short bounded waits) against the FakeIdP and EchoUpstream
served by the test's own event loop.  Every process started here is ended by PID in fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway import compiled
from gateway.app import GATEWAY_KEY
from gateway.cli import main as gateway_main
from gateway.logs import KV, kv
from gateway.service import WATCH_INTERVAL_S
from tests.conftest import base_config, bearer, metric_value
from tests.fakes import FakeIdP
from tests.integration.authkit import refused
from tests.integration.e2e_helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
READY_WITHIN_S = 20.0  # a cold interpreter (and, with --workers, two spawned ones)
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
SECRET = "SECRETMARK"  # part of a bogus token: must never reach a log line


# --- config documents -------------------------------------------------------------------------
def extra_route(upstream_url: str, route_id: str = "extra") -> dict[str, Any]:
    return {
        "id": route_id,
        "match": {"path_prefix": f"/{route_id}"},
        "upstream": upstream_url,
        "auth": "none",
    }


def with_extra_route(document: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(document)
    out["routes"].append(extra_route(out["routes"][0]["upstream"]))
    return out


def with_unknown_issuer(document: dict[str, Any]) -> dict[str, Any]:
    """A config check-config refuses: route 0 names an issuer nobody declared."""
    out = copy.deepcopy(document)
    out["routes"][0]["auth"]["issuers"] = ["tset"]
    return out


UNKNOWN_ISSUER_MESSAGE = "routes[0].auth.issuers[0]: unknown issuer 'tset'; expected one of: test"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so a polling watcher never sees a half-written file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def check_config_message(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``gateway check-config path`` says about a bad file, without the ``path: `` prefix."""
    capsys.readouterr()
    assert gateway_main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    prefix = f"{path}: "
    assert err.startswith(prefix), err
    return err[len(prefix) :].rstrip("\n")


def request_log_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg.fields
        for r in caplog.records
        if r.name == "gateway.request" and isinstance(r.msg, KV)
    ]


# --- HTTP against real listeners ------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(url: str, *, headers: Any = None, limit_s: float = 10.0) -> Reply:
    """One GET on a fresh connection (a new session that never reuses connections)."""
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=limit_s),
        ) as session,
        session.get(url, headers=headers) as response,
    ):
        return Reply(response.status, response.headers.copy(), await response.read())


async def status_of(url: str) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        return (await fetch(url, limit_s=2.0)).status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


# --- processes --------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its reaper does not count)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children_of(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def path_exists(path: str) -> bool:
    return Path(path).exists()


def is_spawned_child(pid: int) -> bool:
    """A multiprocessing child (worker or resource tracker) of a supervisor we started."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return alive(pid) and b"multiprocessing" in cmdline


def metrics_dir_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return item.partition(b"=")[2].decode()
    return None


def tcp_socket_inodes(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    out.add(target[len("socket:[") : -1])
    return out


def tcp_table() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every IPv4/IPv6 TCP socket."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local = int(cols[1].rpartition(":")[2], 16)
                remote = int(cols[2].rpartition(":")[2], 16)
                rows.append((local, remote, cols[3], cols[9]))
    return rows


LISTEN, ESTABLISHED = "0A", "01"


@dataclass
class GatewayProcess:
    """``python -m gateway run`` on loopback ports of its own, its config file and its stderr."""

    process: asyncio.subprocess.Process
    config_path: Path
    log_path: Path
    document: dict[str, Any]
    port: int
    admin_port: int
    metrics_dirs: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.strip()]

    def rewrite(self, document: dict[str, Any]) -> None:
        write_atomically(self.config_path, yaml.safe_dump(document))

    def started_worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"event=worker_started pid=(\d+)", self.log())]

    async def metrics(self) -> list[Sample]:
        reply = await fetch(self.admin_url("/metrics"))
        assert reply.status == 200
        return [
            sample
            for family in text_string_to_metric_families(reply.body.decode())
            for sample in family.samples
        ]

    async def metric(self, name: str, **labels: str) -> float:
        return metric_value(await self.metrics(), name, **labels)

    async def worker_pids(self) -> set[int]:
        """The workers that report gateway_ready (one series per live worker pid)."""
        return {int(s.labels["pid"]) for s in await self.metrics() if s.name == "gateway_ready"}

    async def wait_ready(self, within: float = READY_WITHIN_S) -> None:
        async def ready() -> bool:
            assert self.process.returncode is None, f"gateway exited early:\n{self.log()}"
            return await status_of(self.admin_url("/readyz")) == 200

        await wait_until(ready, within=within, what=f"/readyz 200; log:\n{self.log()}")

    async def wait_exit(self, within: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            raise AssertionError(f"still running after {within}s; log:\n{self.log()}") from None

    async def cleanup(self) -> None:
        """End this process and every process it spawned, by PID, whatever the test did."""
        pids = set(self.started_worker_pids())
        if self.process.returncode is None:
            # Frozen first, so it spawns nothing new while its children are ended.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGSTOP)
            pids |= children_of(self.pid)
        for pid in pids:
            directory = metrics_dir_of(pid)
            if directory:
                self.metrics_dirs.add(directory)
        for pid in pids:
            if is_spawned_child(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
        for directory in self.metrics_dirs:
            if Path(directory).name.startswith("gateway-metrics-"):
                shutil.rmtree(directory, ignore_errors=True)


GatewayRunner = Callable[..., Awaitable[GatewayProcess]]


async def spawn_gateway(
    document: dict[str, Any],
    config_path: Path,
    *,
    options: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
) -> GatewayProcess:
    """``python -m gateway [options] run --config F [args]`` on ``document`` written to
    ``config_path``, its stderr beside it; not waited for (``wait_ready``)."""
    config_path.write_text(yaml.safe_dump(document))  # noqa: ASYNC240 - a small file, written once
    log_path = config_path.with_suffix(".stderr")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *options,
            "run",
            "--config",
            str(config_path),
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    port, admin_port = document["listen"]["port"], document["admin"]["port"]
    return GatewayProcess(process, config_path, log_path, document, port, admin_port)


@pytest.fixture
async def run_gateway(idp, upstream, tmp_path) -> AsyncIterator[GatewayRunner]:
    """Start ``python -m gateway [options] run --config F [args]`` on free loopback ports."""
    started: list[GatewayProcess] = []

    async def start(
        edit: Callable[[dict[str, Any]], None] | None = None,
        *,
        options: tuple[str, ...] = (),
        args: tuple[str, ...] = (),
        shutdown_timeout_s: float = 3.0,
    ) -> GatewayProcess:
        document = copy.deepcopy(base_config(idp, upstream))
        port, admin_port = free_port(), free_port()
        document["listen"] = {
            "host": "127.0.0.1",
            "port": port,
            "shutdown_timeout_s": shutdown_timeout_s,
        }
        document["admin"] = {"host": "127.0.0.1", "port": admin_port}
        # A stalled upstream must outlast every drain here (base config: 1 s).
        document["upstream_defaults"]["timeout_s"] = 30
        if edit is not None:
            edit(document)
        gateway = await spawn_gateway(
            document, tmp_path / f"gateway{len(started)}.yaml", options=options, args=args
        )
        started.append(gateway)
        await gateway.wait_ready()
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            await gateway.cleanup()


async def hit_all(urls: list[str], **kwargs: Any) -> list[Reply]:
    """GET every url, each on a fresh connection, ten at a time."""
    out: list[Reply] = []
    for i in range(0, len(urls), 10):
        out += await asyncio.gather(*(fetch(u, **kwargs) for u in urls[i : i + 10]))
    return out


async def answers(url: str, status: int) -> bool:
    return await status_of(url) == status


def without_route(document: dict[str, Any], route_id: str) -> dict[str, Any]:
    out = copy.deepcopy(document)
    out["routes"] = [r for r in out["routes"] if r["id"] != route_id]
    return out


def broken_variant(document: dict[str, Any], upstream_url: str) -> dict[str, Any]:
    """Would drop 'public' and add 'later' if applied, but refers to an unknown issuer."""
    out = with_unknown_issuer(without_route(document, "public"))
    out["routes"].append(extra_route(upstream_url, "later"))
    return out


# === reload in process ========================================================================
async def test_reload_adds_and_removes_routes_at_once(make_gateway, idp, upstream, tmp_path):
    rg = await make_gateway()
    gateway = rg.app[GATEWAY_KEY]
    path = tmp_path / "gateway.yaml"
    path.write_text(
        yaml.safe_dump(without_route(with_extra_route(base_config(idp, upstream)), "public"))
    )
    assert (await rg.client.get("/public/x")).status == 200
    assert (await rg.client.get("/extra/x")).status == 404

    assert await gateway.reload(path) is True

    # No wait of any kind: the next request already sees the new config.
    response = await rg.client.get("/extra/x")
    assert response.status == 200
    assert (await response.json())["path"] == "/extra/x"
    response = await rg.client.get("/public/x")
    assert response.status == 404
    assert (await response.json())["error"]["reason"] == "route_not_found"
    assert [r.id for r in gateway.config.routes] == ["api", "scoped", "extra"]
    assert rg.metric("gateway_config_reloads_total", result="success") == 1
    assert rg.metric("gateway_config_reloads_total", result="failure") == 0
    assert rg.metric("gateway_requests_total", route="extra", reason="ok") == 1


@pytest.mark.parametrize("bad", ["unknown_issuer", "invalid_yaml", "missing_file"])
async def test_bad_reload_is_refused_with_the_check_config_message_counted_and_harmless(
    make_gateway, idp, upstream, tmp_path, token, caplog, capsys, bad
):
    rg = await make_gateway()
    gateway = rg.app[GATEWAY_KEY]
    config, handler = gateway.config, gateway.handler
    path = tmp_path / "gateway.yaml"
    if bad == "unknown_issuer":
        path.write_text(yaml.safe_dump(broken_variant(base_config(idp, upstream), upstream.url)))
    elif bad == "invalid_yaml":
        path.write_text("routes: [\n  - id: x\n")
    message = check_config_message(path, capsys)
    if bad == "unknown_issuer":
        assert message == UNKNOWN_ISSUER_MESSAGE
    caplog.clear()

    assert await gateway.reload(path) is False

    records = [
        r
        for r in caplog.records
        if isinstance(r.msg, KV) and r.msg.fields.get("event") == "config_reload"
    ]
    assert len(records) == 1
    record = records[0]
    assert isinstance(record.msg, KV)
    assert record.levelno == logging.ERROR
    assert record.msg.fields["result"] == "failure"
    assert record.msg.fields["file"] == str(path)
    assert record.msg.fields["error"] == message  # word for word what check-config says
    assert str(kv(error=message)) in record.getMessage()
    if bad == "unknown_issuer":
        assert "error=routes[0].auth.issuers[0]:" in record.getMessage()
    assert rg.metric("gateway_config_reloads_total", result="failure") == 1
    assert rg.metric("gateway_config_reloads_total", result="success") == 0
    # The running config stays, whole.
    assert gateway.config is config
    assert gateway.handler is handler
    assert (await rg.client.get("/public/x")).status == 200
    assert (await rg.client.get("/api/x", headers=bearer(token()))).status == 200
    assert (await rg.client.get("/later/x")).status == 404


OTHER_ISSUER = "https://other.test"


@pytest.mark.parametrize("change", ["nothing", "leeway_s", "jwks_uri"])
async def test_reload_keeps_keys_of_unchanged_issuers_and_refetches_changed_ones(
    make_gateway, aiohttp_server, idp, upstream, tmp_path, token, rsa_key, change
):
    other = FakeIdP()
    other.publish(rsa_key)
    server = await aiohttp_server(other.app())
    other.jwks_uri = str(server.make_url("/jwks.json"))

    def add_other(document: dict[str, Any]) -> None:
        document["issuers"]["other"] = {
            **document["issuers"]["test"],
            "issuer": OTHER_ISSUER,
            "jwks_uri": other.jwks_uri,
        }
        document["routes"].append(
            {
                "id": "other",
                "match": {"path_prefix": "/other"},
                "upstream": upstream.url,
                "auth": {"issuers": ["other"], "audiences": ["api"]},
            }
        )

    rg = await make_gateway(add_other)
    gateway = rg.app[GATEWAY_KEY]
    assert (await rg.client.get("/api/x", headers=bearer(token()))).status == 200
    assert (await rg.client.get("/other/x", headers=bearer(token(iss=OTHER_ISSUER)))).status == 200
    assert (idp.hits, other.hits) == (1, 1)

    document = base_config(idp, upstream)
    add_other(document)
    document["routes"].append(extra_route(upstream.url))  # the reload changes something
    if change == "leeway_s":
        document["issuers"]["other"]["leeway_s"] = 5
    elif change == "jwks_uri":
        document["issuers"]["other"]["jwks_uri"] = other.jwks_uri + "?rotated=1"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    assert await gateway.reload(path) is True

    expected_other_hits = 1 if change == "nothing" else 2
    await wait_until(lambda: other.hits == expected_other_hits, what="changed issuer refetched")
    assert (await rg.client.get("/api/x", headers=bearer(token()))).status == 200
    assert (await rg.client.get("/other/x", headers=bearer(token(iss=OTHER_ISSUER)))).status == 200
    assert (await rg.client.get("/extra/x")).status == 200
    await asyncio.sleep(0.1)  # room for any stray background fetch to show up
    assert idp.hits == 1  # the unchanged issuer's key set survived: no fetch at all
    assert other.hits == expected_other_hits
    assert rg.metric("gateway_jwks_fetches_total", issuer="test", result="success") == 1
    assert (
        rg.metric("gateway_jwks_fetches_total", issuer="other", result="success")
        == expected_other_hits
    )
    assert rg.jwks.status()["test"]["keys"] > 0


async def test_request_in_flight_finishes_on_the_config_it_started_with(
    make_gateway, idp, upstream, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="gateway.request")

    def patient(document: dict[str, Any]) -> None:
        document["upstream_defaults"]["timeout_s"] = 30  # the stall outlasts nothing here

    rg = await make_gateway(patient)
    gateway = rg.app[GATEWAY_KEY]
    document = without_route(base_config(idp, upstream), "public")
    patient(document)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    upstream.mode = "stall"

    async def call() -> tuple[int, Any]:
        async with rg.client.get("/public/slow", headers={"X-Request-ID": "inflight-1"}) as r:
            return r.status, await r.json()

    inflight = asyncio.create_task(call())
    await wait_until(lambda: upstream.hits == 1, what="the request reached the upstream")
    assert await gateway.reload(path) is True
    response = await rg.client.get("/public/new")
    assert response.status == 404  # new requests see the route gone at once
    assert upstream.hits == 1
    assert not inflight.done()

    upstream.release.set()
    status, body = await asyncio.wait_for(inflight, 5)
    assert status == 200
    assert body["path"] == "/public/slow"
    (line,) = [f for f in request_log_fields(caplog) if f["request_id"] == "inflight-1"]
    assert (line["route"], line["reason"], line["status"]) == ("public", "ok", 200)
    assert rg.metric("gateway_requests_total", route="public", reason="ok") == 1


# === request ids ==============================================================================
SANE_IDS = ["abc-123", "req.1:2@host+x=y/z", "x" * 128]
INSANE_IDS = [None, "two words", "x" * 500, "x" * 129, "", "semi;colon", 'quo"te']


def upstream_request_ids(body: dict[str, Any]) -> list[str]:
    return [v for k, v in body["headers"] if k.lower() == "x-request-id"]


@pytest.mark.parametrize("request_id", SANE_IDS, ids=["plain", "punctuated", "max_length"])
async def test_client_request_id_is_forwarded_returned_and_logged(
    gateway, token, caplog, request_id
):
    caplog.set_level(logging.INFO, logger="gateway.request")
    for path, headers in (("/public/x", {}), ("/api/x", bearer(token()))):
        response = await gateway.client.get(path, headers={**headers, "X-Request-ID": request_id})
        assert response.status == 200
        assert response.headers["X-Request-ID"] == request_id
        assert upstream_request_ids(await response.json()) == [request_id]
        assert request_log_fields(caplog)[-1]["request_id"] == request_id


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/x", {}, 401),
        ("/api/x", {"Authorization": f"Bearer a.{SECRET}.b"}, 401),
        ("/nowhere", {}, 404),
    ],
    ids=["token_missing", "token_malformed", "route_not_found"],
)
async def test_client_request_id_is_returned_on_rejections(
    gateway, upstream, caplog, path, headers, status
):
    caplog.set_level(logging.INFO, logger="gateway.request")
    response = await gateway.client.get(path, headers={**headers, "X-Request-ID": "rej-7"})
    assert response.status == status
    assert response.headers["X-Request-ID"] == "rej-7"
    assert request_log_fields(caplog)[-1]["request_id"] == "rej-7"
    assert upstream.hits == 0


@pytest.mark.parametrize(
    "request_id",
    INSANE_IDS,
    ids=["absent", "spaces", "500_chars", "129_chars", "empty", "semicolon", "quote"],
)
async def test_absent_or_insane_request_id_is_replaced_by_a_generated_one(
    gateway, caplog, request_id
):
    caplog.set_level(logging.INFO, logger="gateway.request")
    headers = {} if request_id is None else {"X-Request-ID": request_id}

    response = await gateway.client.get("/public/x", headers=headers)
    assert response.status == 200
    generated = response.headers["X-Request-ID"]
    assert GENERATED_ID.fullmatch(generated)
    assert upstream_request_ids(await response.json()) == [generated]
    assert request_log_fields(caplog)[-1]["request_id"] == generated

    rejected = await gateway.client.get("/api/x", headers=headers)
    assert rejected.status == 401
    second = rejected.headers["X-Request-ID"]
    assert GENERATED_ID.fullmatch(second)
    assert second != generated  # fresh per request
    assert request_log_fields(caplog)[-1]["request_id"] == second


async def test_a_repeated_request_id_header_reaches_the_upstream_once(gateway):
    headers: CIMultiDict[str] = CIMultiDict([("X-Request-ID", "first"), ("X-Request-ID", "2nd")])
    response = await gateway.client.get("/public/x", headers=headers)
    assert response.status == 200
    assert response.headers.getall("X-Request-ID") == ["first"]
    assert upstream_request_ids(await response.json()) == ["first"]


# === SIGHUP and --watch-config on a real process =============================================
async def test_sighup_reloads_a_changed_file_and_keeps_the_running_config_on_a_bad_one(
    run_gateway: GatewayRunner, upstream, token
):
    gw = await run_gateway()
    assert await status_of(gw.url("/extra/x")) == 404
    gw.rewrite(with_extra_route(gw.document))
    gw.process.send_signal(signal.SIGHUP)
    await wait_until(lambda: answers(gw.url("/extra/x"), 200), within=5, what="route added")
    assert await gw.metric("gateway_config_reloads_total", result="success") == 1

    gw.rewrite(broken_variant(with_extra_route(gw.document), upstream.url))
    gw.process.send_signal(signal.SIGHUP)

    async def failure_counted() -> bool:
        return await gw.metric("gateway_config_reloads_total", result="failure") == 1

    await wait_until(failure_counted, within=5, what="failed reload counted")
    assert await status_of(gw.url("/extra/x")) == 200
    assert await status_of(gw.url("/public/x")) == 200
    assert await status_of(gw.url("/later/x")) == 404
    assert (await fetch(gw.url("/api/x"), headers=bearer(token()))).status == 200
    assert await gw.metric("gateway_config_reloads_total", result="success") == 1
    assert f"event=config_reload result=failure file={gw.config_path}" in gw.log()

    gw.process.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(8) == 0


async def test_watch_config_reloads_a_changed_file_within_the_poll_interval(
    run_gateway: GatewayRunner, upstream
):
    gw = await run_gateway(args=("--watch-config",))
    changed = time.monotonic()
    gw.rewrite(with_extra_route(gw.document))
    await wait_until(
        lambda: answers(gw.url("/extra/x"), 200),
        within=WATCH_INTERVAL_S + 3,
        what="the watcher applied the new file",
    )
    assert time.monotonic() - changed < WATCH_INTERVAL_S + 3

    gw.rewrite(broken_variant(with_extra_route(gw.document), upstream.url))

    async def failure_counted() -> bool:
        return await gw.metric("gateway_config_reloads_total", result="failure") == 1

    await wait_until(failure_counted, within=WATCH_INTERVAL_S + 3, what="bad file refused")
    assert await status_of(gw.url("/extra/x")) == 200
    assert await status_of(gw.url("/public/x")) == 200
    assert await status_of(gw.url("/later/x")) == 404
    assert await gw.metric("gateway_config_reloads_total", result="success") == 1


# === graceful shutdown ========================================================================
async def test_sigterm_turns_unready_refuses_new_connections_and_drains_in_flight_requests(
    run_gateway: GatewayRunner, upstream
):
    drain_s = 4.0
    gw = await run_gateway(shutdown_timeout_s=drain_s)
    upstream.mode = "stall"
    inflight = asyncio.create_task(
        fetch(gw.url("/public/slow"), headers={"X-Request-ID": "slow-1"})
    )
    await wait_until(lambda: upstream.hits == 1, what="the request reached the upstream")

    signalled = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: answers(gw.admin_url("/readyz"), 503), within=1, what="unready")
    assert (await fetch(gw.admin_url("/readyz"))).json()["status"] == "draining"
    await wait_until(lambda: refused(gw.port), within=2, what="listener closed")
    assert not inflight.done()

    upstream.release.set()
    reply = await asyncio.wait_for(inflight, 5)
    assert reply.status == 200
    assert reply.json()["path"] == "/public/slow"
    assert await gw.wait_exit(drain_s + 2 - (time.monotonic() - signalled)) == 0
    log = gw.log()
    assert "event=shutdown" in log
    assert re.search(
        r"event=request request_id=slow-1 trace_id=[0-9a-f]{32} route=public .*status=200 reason=ok",
        log,
    )


async def test_sigterm_ends_a_request_that_never_finishes_at_the_shutdown_timeout(
    run_gateway: GatewayRunner, upstream
):
    drain_s = 1.5
    gw = await run_gateway(shutdown_timeout_s=drain_s)
    upstream.mode = "stall"
    inflight = asyncio.create_task(fetch(gw.url("/public/stuck")))
    await wait_until(lambda: upstream.hits == 1, what="the request reached the upstream")

    signalled = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(drain_s + 3) == 0
    assert time.monotonic() - signalled >= drain_s - 0.2  # it did wait for the request
    (outcome,) = await asyncio.wait_for(asyncio.gather(inflight, return_exceptions=True), 5)
    assert isinstance(outcome, aiohttp.ClientError) or (
        isinstance(outcome, Reply) and outcome.status >= 500
    ), outcome


async def test_a_request_cut_at_the_drain_deadline_is_still_logged(
    run_gateway: GatewayRunner, upstream
):
    gw = await run_gateway(shutdown_timeout_s=1.0)
    upstream.mode = "stall"
    inflight = asyncio.create_task(
        fetch(gw.url("/public/stuck"), headers={"X-Request-ID": "cut-1"})
    )
    await wait_until(lambda: upstream.hits == 1, what="the request reached the upstream")
    gw.process.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(4) == 0
    await asyncio.gather(inflight, return_exceptions=True)
    lines = [line for line in gw.log_lines() if "event=request request_id=cut-1 " in line]
    assert len(lines) == 1, gw.log()
    assert "route=public" in lines[0]
    assert "reason=request_cancelled" in lines[0]


# === --workers ================================================================================
def listens_and_forwards(pid: int, port: int, upstream_port: int) -> tuple[bool, bool]:
    """Whether ``pid`` holds a listening socket on ``port`` and a connection to the upstream."""
    inodes = tcp_socket_inodes(pid)
    rows = [row for row in tcp_table() if row[3] in inodes]
    listening = any(local == port and state == LISTEN for local, _, state, _ in rows)
    forwarding = any(
        remote == upstream_port and state == ESTABLISHED for _, remote, state, _ in rows
    )
    return listening, forwarding


async def test_workers_share_the_port_sum_their_metrics_and_replace_a_killed_worker(
    run_gateway: GatewayRunner, upstream, idp
):
    gw = await run_gateway(args=("--workers", "2"))
    pids = await gw.worker_pids()
    assert len(pids) == 2
    assert pids == set(gw.started_worker_pids())
    assert pids <= children_of(gw.pid)
    assert idp.hits == 2  # each worker fetched the keys once

    sent = 40
    replies = await hit_all([gw.url(f"/public/{i}") for i in range(sent)])
    assert [r.status for r in replies] == [200] * sent
    assert upstream.hits == sent

    async def counted(expected: int) -> bool:
        return await gw.metric("gateway_requests_total") == expected

    await wait_until(lambda: counted(sent), what="every request counted once")
    samples = await gw.metrics()
    assert metric_value(samples, "gateway_requests_total", route="public", reason="ok") == sent
    assert metric_value(samples, "gateway_request_duration_seconds_count") == sent
    assert metric_value(samples, "gateway_upstream_responses_total", code_class="2xx") == sent
    # Both workers listen on the one port, and both took connections and forwarded them.
    upstream_port = int(upstream.url.rpartition(":")[2])
    for pid in pids:
        assert listens_and_forwards(pid, gw.port, upstream_port) == (True, True), pid

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: answers(gw.admin_url("/readyz"), 503), within=2, what="unready")
    await wait_until(
        lambda: f"event=worker_died pid={victim} exitcode=-9" in gw.log(),
        within=5,
        what="worker_died logged",
    )
    await wait_until(lambda: len(gw.started_worker_pids()) == 3, within=5, what="respawned")
    await gw.wait_ready()
    now = await gw.worker_pids()
    assert len(now) == 2
    assert victim not in now
    assert pids - {victim} < now
    assert not alive(victim)
    assert await gw.metric("gateway_requests_total") == sent  # the dead worker's count stays

    more = 20
    replies = await hit_all([gw.url(f"/public/more/{i}") for i in range(more)])
    assert [r.status for r in replies] == [200] * more
    await wait_until(lambda: counted(sent + more), what="new requests counted on top")


async def test_workers_reload_once_validated_on_sighup_and_all_stop_on_sigterm(
    run_gateway: GatewayRunner, upstream
):
    gw = await run_gateway(args=("--workers", "2"), shutdown_timeout_s=3.0)
    pids = await gw.worker_pids()
    assert len(pids) == 2

    gw.rewrite(with_extra_route(gw.document))
    gw.process.send_signal(signal.SIGHUP)

    async def every_worker_serves(path: str, status: int) -> bool:
        replies = await hit_all([gw.url(path)] * 20)
        return all(r.status == status for r in replies)

    await wait_until(lambda: every_worker_serves("/extra/x", 200), within=8, what="all reloaded")
    await wait_until(
        lambda: len(re.findall(r" gateway\.app event=config_reload result=success", gw.log())) == 2,
        within=3,
        what="each worker logged its reload",
    )
    assert "event=config_reload result=forwarded workers=2" in gw.log()
    samples = await gw.metrics()
    reload_samples = [s for s in samples if s.name == "gateway_config_reloads_total"]
    assert sorted((s.labels["result"], s.value) for s in reload_samples) == [
        ("failure", 0.0),
        ("success", 1.0),
    ]  # counted once by the supervisor, not once per worker

    gw.rewrite(broken_variant(with_extra_route(gw.document), upstream.url))
    gw.process.send_signal(signal.SIGHUP)

    async def failure_counted() -> bool:
        return await gw.metric("gateway_config_reloads_total", result="failure") == 1

    await wait_until(failure_counted, within=5, what="bad file refused by the supervisor")
    assert await every_worker_serves("/extra/x", 200)
    assert await every_worker_serves("/public/x", 200)
    assert await every_worker_serves("/later/x", 404)
    assert " gateway.app event=config_reload result=failure" not in gw.log()  # not forwarded
    assert await gw.metric("gateway_config_reloads_total", result="success") == 1

    # SIGTERM: all unready at once, in-flight work drained, every process gone, exit 0.
    family = children_of(gw.pid)
    assert pids <= family
    metrics_dir = metrics_dir_of(min(pids))
    assert metrics_dir is not None
    gw.metrics_dirs.add(metrics_dir)
    upstream.mode = "stall"
    hits = upstream.hits
    inflight = asyncio.create_task(fetch(gw.url("/public/slow")))
    await wait_until(lambda: upstream.hits == hits + 1, what="the request reached the upstream")
    gw.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: answers(gw.admin_url("/readyz"), 503), within=1, what="unready")
    upstream.release.set()
    reply = await asyncio.wait_for(inflight, 5)
    assert reply.status == 200
    assert await gw.wait_exit(3.0 + 5) == 0
    await wait_until(
        lambda: not any(alive(pid) for pid in family), within=3, what="no process left"
    )
    assert not any(alive(pid) for pid in gw.started_worker_pids())
    assert not path_exists(metrics_dir)


async def test_a_worker_respawned_after_a_refused_reload_serves_the_running_config(
    run_gateway: GatewayRunner, upstream
):
    gw = await run_gateway(args=("--workers", "2"))
    pids = await gw.worker_pids()
    gw.rewrite(broken_variant(gw.document, upstream.url))
    gw.process.send_signal(signal.SIGHUP)

    async def failure_counted() -> bool:
        return await gw.metric("gateway_config_reloads_total", result="failure") == 1

    await wait_until(failure_counted, within=5, what="bad file refused by the supervisor")
    os.kill(min(pids), signal.SIGKILL)

    async def settled() -> bool:
        # Ready again, or a second replacement (the first one died too).
        if len(gw.started_worker_pids()) > 3:
            return True
        return len(gw.started_worker_pids()) == 3 and await answers(gw.admin_url("/readyz"), 200)

    await wait_until(settled, within=10, what="a replacement ready, or dead")
    assert len(gw.started_worker_pids()) == 3, gw.log()  # one replacement, no crash loop
    replies = await hit_all([gw.url("/public/x")] * 20)
    assert all(r.status == 200 for r in replies)  # the running config, on every worker
    assert all(r.status == 404 for r in await hit_all([gw.url("/later/x")] * 20))


async def test_sighup_while_a_worker_is_being_replaced_does_not_kill_it(
    run_gateway: GatewayRunner, upstream
):
    gw = await run_gateway(args=("--workers", "2"))
    pids = await gw.worker_pids()
    gw.rewrite(with_extra_route(gw.document))
    os.kill(min(pids), signal.SIGKILL)
    await wait_until(lambda: len(gw.started_worker_pids()) >= 3, within=5, what="respawned")
    replacement = gw.started_worker_pids()[2]
    gw.process.send_signal(signal.SIGHUP)  # the replacement is still importing the gateway

    async def settled() -> bool:
        if f"event=worker_died pid={replacement}" in gw.log():
            return True
        return await answers(gw.admin_url("/readyz"), 200)

    await wait_until(settled, within=10, what="the replacement ready, or dead")
    assert f"event=worker_died pid={replacement}" not in gw.log()
    assert replacement in await gw.worker_pids()
    replies = await hit_all([gw.url("/extra/x")] * 20)
    assert all(r.status == 200 for r in replies)


# === log formats ==============================================================================
async def test_json_log_format_writes_json_objects_only_and_never_a_token(
    run_gateway: GatewayRunner, token
):
    gw = await run_gateway(options=("--log-format", "json"))
    good = token()
    bogus = f"eyJhbGciOiJSUzI1NiJ9.{SECRET}.{SECRET}"
    assert (
        await fetch(gw.url("/api/x"), headers={**bearer(good), "X-Request-ID": "j-ok"})
    ).status == 200
    assert (
        await fetch(gw.url("/api/x"), headers={**bearer(bogus), "X-Request-ID": "j-bad"})
    ).status == 401
    assert (await fetch(gw.url("/api/x"), headers={"X-Request-ID": "j-none"})).status == 401
    assert (await fetch(gw.url("/public/x"), headers={"X-Request-ID": "two words"})).status == 200
    gw.rewrite(with_unknown_issuer(gw.document))
    gw.process.send_signal(signal.SIGHUP)

    async def failure_counted() -> bool:
        return await gw.metric("gateway_config_reloads_total", result="failure") == 1

    await wait_until(failure_counted, within=5, what="bad file refused")
    gw.process.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(8) == 0

    text = gw.log()
    entries = []
    for line in gw.log_lines():
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger"} <= entry.keys(), line
        entries.append(entry)
    requests = [e for e in entries if e.get("event") == "request"]
    by_id = {e["request_id"]: e for e in requests}
    assert len(requests) == 4
    ok, bad, none = by_id["j-ok"], by_id["j-bad"], by_id["j-none"]
    assert (ok["reason"], ok["route"], ok["status"], ok["logger"]) == (
        "ok",
        "api",
        200,
        "gateway.request",
    )
    assert (bad["reason"], bad["route"], bad["status"]) == ("token_malformed", "api", 401)
    assert (none["reason"], none["detail"]) == ("token_missing", "no token")
    (generated,) = set(by_id) - {"j-ok", "j-bad", "j-none"}
    assert GENERATED_ID.fullmatch(generated)
    (failure,) = [e for e in entries if e.get("event") == "config_reload"]
    assert failure["error"] == UNKNOWN_ISSUER_MESSAGE  # JSON keeps the message as it is
    assert failure["file"] == str(gw.config_path)
    assert failure["level"] == "error"
    assert {"listening", "jwks_fetch", "shutdown"} <= {e.get("event") for e in entries}
    (listening,) = [e for e in entries if e.get("event") == "listening"]
    # Which build serves: the process imports the gateway the way this test run does
    # (test_build.py holds compiled() to the module's loader).
    assert listening["build"] == ("compiled" if compiled() else "python")
    assert good not in text
    assert good.split(".")[2] not in text  # not even the signature
    assert SECRET not in text
    assert "Bearer" not in text


TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ (?P<kv>.+)"
)


async def test_text_log_lines_are_key_value_pairs_without_spaces_in_values(
    run_gateway: GatewayRunner, token
):
    gw = await run_gateway()
    good = token()
    assert (
        await fetch(gw.url("/api/x"), headers={**bearer(good), "X-Request-ID": "t-ok"})
    ).status == 200
    assert (await fetch(gw.url("/api/x"), headers={"X-Request-ID": "t-none"})).status == 401
    assert (
        await fetch(gw.url("/public/a%20b"), headers={"X-Request-ID": "two words"})
    ).status == 200
    gw.rewrite(with_unknown_issuer(gw.document))
    gw.process.send_signal(signal.SIGHUP)

    async def failure_counted() -> bool:
        return await gw.metric("gateway_config_reloads_total", result="failure") == 1

    await wait_until(failure_counted, within=5, what="bad file refused")
    gw.process.send_signal(signal.SIGTERM)
    assert await gw.wait_exit(8) == 0

    lines = []
    for line in gw.log_lines():
        match = TEXT_LINE.fullmatch(line)
        assert match, f"not a log line: {line!r}"
        pairs = match["kv"].split(" ")
        assert all(re.fullmatch(r"[a-z_]+=\S+", p) for p in pairs), line
        lines.append(dict(p.split("=", 1) for p in pairs))
    by_id = {f["request_id"]: f for f in lines if f.get("event") == "request"}
    assert (by_id["t-ok"]["reason"], by_id["t-ok"]["route"]) == ("ok", "api")
    assert (by_id["t-none"]["reason"], by_id["t-none"]["detail"]) == ("token_missing", "no_token")
    (failure,) = [f for f in lines if f.get("event") == "config_reload"]
    assert failure["error"] == UNKNOWN_ISSUER_MESSAGE.replace(" ", "_")
    assert good not in gw.log()
