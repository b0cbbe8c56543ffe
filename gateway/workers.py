"""``--workers N``: a supervisor that runs N worker processes on one port and one admin listener.

Workers share the proxy port with SO_REUSEPORT (the kernel spreads
connections).  Their metrics go to prometheus-client's multiprocess directory;
the supervisor's admin listener serves the sum (counters and histograms summed
across workers, dead ones included, so a restart loses no series), readiness
(every worker alive and holding keys) and liveness.  SIGHUP is validated once
here, counted once, and passed to every worker; SIGTERM drains them all; a
worker that dies is logged and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import tempfile
from multiprocessing.process import BaseProcess
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, multiprocess
from prometheus_client.aiohttp import make_aiohttp_handler

from .config import GatewayConfig, load_config, loads_config
from .dpop import NONCE_KEY_ENV
from .errors import ConfigError
from .logs import kv, setup_logging

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.5


def _worker_main(config_path: str, base_dir: str, log_level: str, log_format: str) -> None:
    """A worker process: load the supervisor's validated copy of the config and serve it."""
    from .service import run_event_loop, serve

    # SIGHUP arrives blocked (see Supervisor._spawn); serve() unblocks it once its reload
    # handler is installed, so a reload sent while this worker starts is delivered, not fatal.
    setup_logging(log_level, log_format)
    config = load_config(config_path, Path(base_dir))
    run_event_loop(
        serve(config, config_path=Path(config_path), worker=True, config_base_dir=Path(base_dir))
    )


class Supervisor:
    """Starts, watches, signals and restarts the worker processes."""

    def __init__(
        self, config_path: Path, config: GatewayConfig, count: int, log_level: str, log_format: str
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.count = count
        self.log_level = log_level
        self.log_format = log_format
        self.metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        # Workers read the last config validated here, never the operator's file directly:
        # a worker started after a refused reload must run what the others run.
        self.validated = Path(self.metrics_dir).parent / "gateway.validated.yaml"
        text = config_path.read_text(encoding="utf-8")
        self.config = loads_config(text, config_path.parent)  # what the workers will run
        self._publish(text)
        self.workers: list[BaseProcess] = []
        self.draining = False
        self._context = multiprocessing.get_context("spawn")
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        # Counted here, once per reload, not once per worker.
        self.reloads = Counter(
            "gateway_config_reloads",
            "Configuration reloads (SIGHUP or a changed file), by result (success, failure).",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)

    def _publish(self, text: str) -> None:
        staging = self.validated.with_suffix(".tmp")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, self.validated)  # atomic: a worker never reads half a file

    def _spawn(self) -> BaseProcess:
        # The child inherits a blocked SIGHUP through fork and exec; were it merely handled
        # here, exec would reset it to "terminate" for the whole start-up of the worker.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            return self._start_worker()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _start_worker(self) -> BaseProcess:
        process = self._context.Process(
            target=_worker_main,
            args=(
                str(self.validated),
                str(self.config_path.parent),
                self.log_level,
                self.log_format,
            ),
            name="gateway-worker",
        )
        process.start()
        log.info(kv(event="worker_started", pid=process.pid))
        return process

    def start(self) -> None:
        self.workers = [self._spawn() for _ in range(self.count)]

    def signal_all(self, sig: int) -> None:
        for process in self.workers:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    async def monitor(self) -> None:
        """Restart any worker that dies while not draining."""
        while not self.draining:
            for index, process in enumerate(self.workers):
                if not process.is_alive() and not self.draining:
                    log.error(kv(event="worker_died", pid=process.pid, exitcode=process.exitcode))
                    if process.pid is not None:
                        multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
                    self.workers[index] = self._spawn()
            await asyncio.sleep(MONITOR_INTERVAL_S)

    async def reload(self) -> None:
        """Validate the file once; if it is good, every worker reloads it."""
        try:
            text = await asyncio.to_thread(self.config_path.read_text, encoding="utf-8")
            self.config = loads_config(text, self.config_path.parent)
        except OSError as exc:
            self.reloads.labels("failure").inc()
            log.error(kv(event="config_reload", result="failure", error=str(exc)))
            return
        except ConfigError as exc:
            self.reloads.labels("failure").inc()
            log.error(kv(event="config_reload", result="failure", error=str(exc)))
            return
        self._publish(text)
        self.reloads.labels("success").inc()
        self.signal_all(signal.SIGHUP)
        log.info(kv(event="config_reload", result="forwarded", workers=len(self.workers)))

    def ready(self) -> bool:
        """Every worker alive and reporting ready (gateway_ready, per process)."""
        if self.draining or not all(p.is_alive() for p in self.workers):
            return False
        pids = {str(p.pid) for p in self.workers}
        reported: dict[str, float] = {}
        for family in self.registry.collect():
            if family.name == "gateway_ready":
                reported = {s.labels.get("pid", ""): s.value for s in family.samples}
        return all(reported.get(pid) == 1.0 for pid in pids)

    async def stop(self) -> None:
        """SIGTERM every worker and wait for their drain (then SIGKILL stragglers)."""
        self.draining = True
        self.signal_all(signal.SIGTERM)
        deadline = self.config.listen.shutdown_timeout_s + 5
        for process in self.workers:
            await asyncio.to_thread(process.join, deadline)
            if process.is_alive():
                log.error(kv(event="worker_killed", pid=process.pid))
                process.kill()
                await asyncio.to_thread(process.join, 5)

    def admin_app(self) -> web.Application:
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            alive = sum(p.is_alive() for p in self.workers)
            return web.json_response({"status": "ok", "workers_alive": alive})

        async def readyz(_: web.Request) -> web.Response:
            if self.draining:
                return web.json_response({"status": "draining"}, status=503)
            ready = self.ready()
            return web.json_response(
                {"status": "ready" if ready else "not_ready", "workers": len(self.workers)},
                status=200 if ready else 503,
            )

        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app


async def _supervise(supervisor: Supervisor, watch: bool) -> None:
    from .service import watch_file

    supervisor.start()
    admin = web.AppRunner(supervisor.admin_app(), access_log=None)
    await admin.setup()
    config = supervisor.config
    await web.TCPSite(admin, config.admin.host, config.admin.port).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(supervisor.monitor())]
    loop.add_signal_handler(
        signal.SIGHUP, lambda: tasks.append(asyncio.create_task(supervisor.reload()))
    )
    if watch:
        tasks.append(asyncio.create_task(watch_file(supervisor.config_path, supervisor.reload)))
    log.info(kv(event="supervisor_listening", admin=f"{config.admin.host}:{config.admin.port}",
                workers=supervisor.count))  # fmt: skip
    try:
        await stop.wait()
        log.info(kv(event="shutdown", workers=len(supervisor.workers)))
        await supervisor.stop()
    finally:
        for task in tasks:
            task.cancel()
        await admin.cleanup()


def run_workers(
    config_path: Path,
    config: GatewayConfig,
    count: int,
    *,
    watch: bool,
    log_level: str,
    log_format: str,
) -> int:
    """Run ``count`` workers under a supervisor until SIGTERM; return the exit code."""
    # The directory must be in the environment before the workers import
    # prometheus_client: spawned processes inherit it.
    state_dir = tempfile.mkdtemp(prefix="gateway-")
    metrics_dir = os.path.join(state_dir, "metrics")
    os.mkdir(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # One DPoP nonce key for every worker: a nonce one issued is good at the others.
    os.environ.setdefault(NONCE_KEY_ENV, secrets.token_hex(32))
    try:
        supervisor = Supervisor(config_path, config, count, log_level, log_format)
        asyncio.run(_supervise(supervisor, watch))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0
