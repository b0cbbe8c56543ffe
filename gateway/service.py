"""The serving process: the proxy and admin listeners, signals, reloads, drain and stop.

``gateway run`` (``cli``) and each ``--workers`` process (``workers``) call ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from .admin import create_admin_app
from .app import GATEWAY_KEY, Gateway, create_app, gateway_runner
from .config import GatewayConfig, file_signature
from .logs import kv
from .server import compiled
from .tls import ServerTls

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 2.0
GC_GEN0_THRESHOLD = 20_000


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the serving coroutine on uvloop when it is installed (``pip install
    'gateway[fast]'``), else on asyncio's own loop; the behaviour is the same."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the request path as far as is safe.

    Everything alive after start-up (modules, config, keys) is frozen out of collection, and
    the youngest generation is collected less often: a request allocates hundreds of objects,
    almost all freed by reference counting, and the default threshold (700) ran a collection
    every few requests (7% of a verifying gateway's time in a profile).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def watch_file(path: Path, on_change: Callable[[], Awaitable[object]]) -> None:
    """Call ``on_change()`` whenever ``path``'s signature changes (polled; no inotify needed)."""
    seen = file_signature(path)
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        now = file_signature(path)
        if now != seen and now is not None:
            seen = now
            await on_change()


async def watch_certificate(server_tls: ServerTls) -> None:
    """Load the listener's certificate again whenever its file or key file changes."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        if server_tls.changed():
            server_tls.reload()


async def serve(
    config: GatewayConfig,
    *,
    config_path: Path | None = None,
    watch: bool = False,
    on_ready: str | None = None,
    worker: bool = False,
    config_base_dir: Path | None = None,
) -> None:
    """Serve ``config`` until SIGINT or SIGTERM, then drain and stop.

    SIGHUP (and, with ``watch``, a changed file) reloads ``config_path``.  On
    SIGTERM, /readyz turns 503 at once, the listener stops accepting, and requests
    in flight get up to ``listen.shutdown_timeout_s`` to finish.  A ``worker``
    (``--workers``) shares the port with its siblings and leaves the admin
    listener and the counting of reloads to the supervisor.
    """
    app = create_app(config, multiprocess=worker)
    gateway: Gateway = app[GATEWAY_KEY]
    runner = gateway_runner(app, shutdown_timeout=config.listen.shutdown_timeout_s)
    admin_runner = None if worker else web.AppRunner(create_admin_app(app), access_log=None)
    await runner.setup()
    if admin_runner is not None:
        await admin_runner.setup()
    tasks: list[asyncio.Task[object]] = []
    server_tls = ServerTls(config.listen.tls) if config.listen.tls is not None else None
    try:
        await web.TCPSite(
            runner, config.listen.host, config.listen.port, reuse_port=worker or None,
            ssl_context=server_tls.context if server_tls is not None else None,
        ).start()  # fmt: skip
        if admin_runner is not None:
            await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
        log.info(kv(event="listening", proxy=f"{config.listen.host}:{config.listen.port}",
                    admin=None if worker else f"{config.admin.host}:{config.admin.port}",
                    routes=len(config.routes), pid=os.getpid(),
                    build="compiled" if compiled() else "python"))  # fmt: skip
        tune_garbage_collector()
        if on_ready:
            print(on_ready, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if config_path is not None:
            path = config_path

            async def reload() -> None:
                await gateway.reload(path, count=not worker, base_dir=config_base_dir)
                tls = gateway.config.listen.tls
                if server_tls is not None and tls is not None:
                    server_tls.reload(tls)

            loop.add_signal_handler(
                signal.SIGHUP, lambda: tasks.append(asyncio.ensure_future(reload()))
            )
            # A worker starts with SIGHUP blocked; a reload sent meanwhile is delivered now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            if watch:
                tasks.append(asyncio.ensure_future(watch_file(path, reload)))
        if server_tls is not None:
            tasks.append(asyncio.ensure_future(watch_certificate(server_tls)))
        await stop.wait()
        # Readiness turns false first, so load balancers stop sending while we drain.
        gateway.draining = True
        log.info(kv(event="shutdown", drain_s=gateway.config.listen.shutdown_timeout_s))
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
