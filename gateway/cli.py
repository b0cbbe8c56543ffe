"""The command line: ``gateway run``, ``check-config``, ``owned-headers``, ``explain``, ``schema`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import GatewayConfig, load_config
from .errors import ConfigError
from .logs import kv, setup_logging
from .service import run_event_loop, serve

log = logging.getLogger(__name__)


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


def _port(value: str) -> int:
    """A TCP port to listen on, 1 to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("expected 1 to 65535")
    return port


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
    schema = commands.add_parser(
        "schema",
        help="print the config file's JSON Schema (draft 2020-12; the package ships it as "
        "config.schema.json)",
    )
    schema.add_argument(
        "--markdown", action="store_true", help="print the README's configuration reference instead"
    )
    demo = commands.add_parser(
        "demo", help="run a self-contained demo: identity provider, echo upstream and gateway"
    )
    demo.add_argument("--config", "-c", type=Path, default=None,
                      help="demo YAML (default: the packaged demo.yaml)")  # fmt: skip
    demo.add_argument("--port", type=_port, default=None,
                      help="the gateway's port (default: the demo YAML's listen.port, 8080)")  # fmt: skip
    demo.add_argument("--admin-port", type=_port, default=None,
                      help="the admin port (default: the demo YAML's admin.port, 9100)")  # fmt: skip
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
    if args.command == "schema":
        from .config import config_reference, config_schema

        print(config_reference() + "\n" if args.markdown else schema_text(config_schema()), end="")
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

        return asyncio.run(run_demo(args.config, port=args.port, admin_port=args.admin_port))
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


def schema_text(schema: dict[str, object]) -> str:
    """The schema as the shipped file holds it: indented JSON, one trailing newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def log_policy_shadowing(config: GatewayConfig) -> int:
    """Warn at start-up, as ``check-config`` does, about each route a looser one shadows."""
    from .shadowing import find_shadows

    shadows = find_shadows(config)
    for shadow in shadows:
        log.warning(kv(event="policy_shadowing", problem=shadow.describe()))
    return len(shadows)
