"""The command line: ``gateway run``, ``gateway check-config`` and ``gateway demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from .admin import create_admin_app
from .app import DRAINING_KEY, create_app
from .config import GatewayConfig, load_config
from .errors import ConfigError
from .logs import kv, setup_logging

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve the proxy and the admin listener")
    run.add_argument("--config", "-c", required=True, type=Path, help="the gateway YAML file")
    check = commands.add_parser("check-config", help="validate a config file; exit 0 or 1")
    check.add_argument("file", type=Path)
    explain = commands.add_parser(
        "explain", help="show how a route would judge a token, check by check"
    )
    explain.add_argument("--config", "-c", required=True, type=Path)
    explain.add_argument("--route", "-r", required=True, help="the route id")
    explain.add_argument("token", nargs="?", default=None, help="the token (default: read stdin)")
    demo = commands.add_parser(
        "demo", help="run a self-contained demo: identity provider, echo upstream and gateway"
    )
    demo.add_argument("--config", "-c", type=Path, default=None,
                      help="demo YAML (default: the packaged demo.yaml)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` console script and ``python -m gateway``."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.file}: ok ({len(config.routes)} routes, {len(config.issuers)} issuers)")
        return 0
    if args.command == "explain":
        from .explain import explain, read_token

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"{args.config}: {exc}", file=sys.stderr)
            return 2
        setup_logging("WARNING")
        return asyncio.run(explain(config, args.route, read_token(args.token), sys.stdout))
    setup_logging(args.log_level)
    if args.command == "demo":
        from .demo import run_demo

        return asyncio.run(run_demo(args.config))
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error(kv(event="config_invalid", file=str(args.config)) + f" error={exc}")
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    asyncio.run(serve(config))
    return 0


async def serve(config: GatewayConfig, *, on_ready: str | None = None) -> None:
    """Serve ``config`` until SIGINT or SIGTERM, then drain and stop.

    On the signal, /readyz turns 503 at once, the listener stops accepting, and
    requests in flight get up to ``listen.shutdown_timeout_s`` to finish.
    """
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.listen.shutdown_timeout_s)
    admin_runner = web.AppRunner(create_admin_app(app), access_log=None)
    await runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(runner, config.listen.host, config.listen.port).start()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
        log.info(kv(event="listening", proxy=f"{config.listen.host}:{config.listen.port}",
                    admin=f"{config.admin.host}:{config.admin.port}",
                    routes=len(config.routes)))  # fmt: skip
        if on_ready:
            print(on_ready, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(kv(event="shutdown", drain_s=config.listen.shutdown_timeout_s))
        app[DRAINING_KEY][0] = True
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await admin_runner.cleanup()
