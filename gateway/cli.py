"""The command line: ``gateway run``, ``check-config``, ``owned-headers``, ``explain`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from .admin import create_admin_app
from .app import GATEWAY_KEY, Gateway, create_app
from .config import GatewayConfig, file_signature, load_config
from .errors import ConfigError
from .logs import kv, setup_logging
from .tls import ServerTls

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 2.0
GC_GEN0_THRESHOLD = 20_000


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number or 'auto'") from None
    if not 1 <= count <= 256:
        raise argparse.ArgumentTypeError("expected 1 to 256")
    return count


def _header(value: str) -> tuple[str, str]:
    """``explain --header 'Name: value'``."""
    name, colon, text = value.partition(":")
    if not colon or not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError("expected 'Name: value'")
    return name, text.strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve the proxy and the admin listener")
    run.add_argument("--config", "-c", required=True, type=Path, help="the gateway YAML file")
    run.add_argument("--workers", type=_workers, default=1, help="worker processes, or 'auto'")
    run.add_argument(
        "--watch-config", action="store_true", help="reload when the config file changes"
    )
    check = commands.add_parser("check-config", help="validate a config file; exit 0 or 1")
    check.add_argument("file", type=Path)
    check.add_argument(
        "--strict", action="store_true", help="policy shadowing is an error, not a warning"
    )
    owned = commands.add_parser(
        "owned-headers",
        help="print the headers the gateway owns, one per line (for nginx/Envoy/Traefik configs)",
    )
    owned.add_argument("--config", "-c", required=True, type=Path)
    explain = commands.add_parser(
        "explain", help="show what the gateway would do with a request to a route, check by check"
    )
    explain.add_argument("--config", "-c", required=True, type=Path)
    explain.add_argument("--route", "-r", required=True, help="the route id")
    explain.add_argument(
        "token",
        nargs="?",
        default=None,
        help="the token, sent in the route's first token source (default: read stdin; '' for none)",
    )
    explain.add_argument("--method", "-X", help="the request method (default: one the route takes)")
    explain.add_argument("--path", help="path and query (default: the route's path or prefix)")
    explain.add_argument("--host", help="the Host header (default: one the route serves)")
    explain.add_argument(
        "--header", "-H", type=_header, action="append", default=[], metavar="'NAME: VALUE'",
        help="another request header (repeatable), e.g. a second credential",
    )  # fmt: skip
    demo = commands.add_parser(
        "demo", help="run a self-contained demo: identity provider, echo upstream and gateway"
    )
    demo.add_argument("--config", "-c", type=Path, default=None,
                      help="demo YAML (default: the packaged demo.yaml)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` console script and ``python -m gateway``."""
    # A SIGHUP before the reload handler exists must not kill the process (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        from .shadowing import find_shadows

        shadows = find_shadows(config)
        label = "error" if args.strict else "warning"
        for shadow in shadows:
            print(f"{args.file}: {label}: {shadow.describe()}", file=sys.stderr)
        if shadows and args.strict:
            return 1
        print(
            f"{args.file}: ok ({len(config.routes)} routes, {len(config.issuers)} issuers, "
            f"mode {config.mode.value})"
        )
        return 0
    if args.command == "owned-headers":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"{args.config}: {exc}", file=sys.stderr)
            return 1
        # A forward-auth caller must overwrite or remove each of these on every request.
        print("\n".join(sorted(config.owned_headers)))
        return 0
    if args.command == "explain":
        from .explain import explain, read_token

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"{args.config}: {exc}", file=sys.stderr)
            return 2
        setup_logging("WARNING")
        return asyncio.run(
            explain(
                config,
                args.route,
                read_token(args.token),
                sys.stdout,
                method=args.method,
                path=args.path,
                host=args.host,
                headers=args.header,
            )
        )
    setup_logging(args.log_level, args.log_format)
    if args.command == "demo":
        from .demo import run_demo

        return asyncio.run(run_demo(args.config))
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error(kv(event="config_invalid", file=str(args.config), error=str(exc)))
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    log_policy_shadowing(config)
    if args.workers > 1:
        from .workers import run_workers

        return run_workers(args.config, config, args.workers, watch=args.watch_config,
                           log_level=args.log_level, log_format=args.log_format)  # fmt: skip
    run_event_loop(serve(config, config_path=args.config, watch=args.watch_config))
    return 0


def log_policy_shadowing(config: GatewayConfig) -> int:
    """Warn at start-up, as ``check-config`` does, about each route a looser one shadows."""
    from .shadowing import find_shadows

    shadows = find_shadows(config)
    for shadow in shadows:
        log.warning(kv(event="policy_shadowing", problem=shadow.describe()))
    return len(shadows)


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
    # handler_cancellation: a client that leaves frees its admission slot and upstream
    # connection at once instead of when the upstream answers.
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.listen.shutdown_timeout_s,
        handler_cancellation=True,
    )
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
                    routes=len(config.routes), pid=os.getpid()))  # fmt: skip
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
