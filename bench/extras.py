"""The sections of bench/run.py beyond closed-loop throughput: open-loop latency at a quarter of
the gateway's capacity, ``--workers 2`` against one worker, and memory per idle connection.

Called by ``run.py`` at the points where the processes they need are running; each returns what
``render_extras`` prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
IDLE_CONNECTIONS = 1000
OPEN_LOOP_SHARE = 0.25


@dataclass
class OpenLoopRow:
    name: str
    result: dict[str, Any]

    @property
    def valid(self) -> bool:
        return not (self.result.get("errors") or self.result.get("non_2xx"))


@dataclass
class Extras:
    """What the extra sections measured (filled in as the run goes)."""

    rate: float = math.nan
    open_loop: list[OpenLoopRow] = field(default_factory=list)
    workers: dict[str, float] = field(default_factory=dict)  # row key -> req/s
    idle: dict[str, float] = field(default_factory=dict)


def open_loop(
    run_tool: Callable[[str, Sequence[str], float], str],
    pin: Callable[[list[str]], list[str]],
    port: int,
    path: str,
    rate: float,
    seconds: float,
    warmup: float,
    token_file: Path | None = None,
) -> dict[str, Any]:
    """bench/openloop.py at ``rate`` against ``127.0.0.1:port``; its JSON result."""
    argv = [sys.executable, str(BENCH / "openloop.py"), "--port", str(port), "--path", path]
    argv += ["--rate", f"{rate:.0f}", "--duration", str(seconds), "--warmup", str(warmup)]
    argv += ["--connections", "16"]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    out = run_tool("openloop", pin(argv), seconds + warmup + 60)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def raise_file_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def idle_connections(
    port: int, path: str, rss_mb: Callable[[], float], count: int = IDLE_CONNECTIONS
) -> dict[str, float]:
    """Open ``count`` keep-alive connections that each got one answer, then sit idle; the
    server's VmRSS before and with them open."""
    raise_file_limit(count + 500)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    time.sleep(0.5)
    before = rss_mb()
    sockets: list[socket.socket] = []
    answered = 0
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(sock)
            sock.sendall(request)
            if b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]:
                answered += 1
        time.sleep(1.0)
        during = rss_mb()
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    per_1000 = (during - before) / (answered / 1000) if answered else math.nan
    return {"before": before, "during": during, "answered": answered, "per_1000": per_1000}


def launch_workers(
    start: Callable[[str, list[str], Path], subprocess.Popen[bytes]],
    gateway_argv: list[str],
    wait_ready: Callable[[str, subprocess.Popen[bytes], str], None],
    config: str,
    admin_port: int,
    log_level: str,
    run_dir: Path,
) -> subprocess.Popen[bytes]:
    """``python -m gateway run --workers 2`` on ``config``, unpinned, ready on its admin port."""
    path = run_dir / "gateway-workers.yaml"
    path.write_text(config)
    argv = [*gateway_argv, "--log-level", log_level]
    argv += ["run", "--config", str(path), "--workers", "2"]
    proc = start("gateway-workers", argv, run_dir / "gateway-workers.log")
    wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc, "gateway --workers 2")
    return proc


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def render_extras(extras: Extras, one_worker: dict[str, float], seconds: float) -> list[str]:
    """The markdown of the extra sections."""
    lines: list[str] = []
    if extras.open_loop:
        direct = next((r for r in extras.open_loop if r.name == "upstream direct"), None)
        lines += [
            "",
            f"## Open-loop latency at {OPEN_LOOP_SHARE:.0%} of the gateway's passthrough "
            f"capacity ({extras.rate:,.0f} req/s, {seconds:.0f} s, bench/openloop.py, 16 "
            "connections, on CPU 1)",
            "",
            "| row | req/s | p50 ms | p99 ms | p50 added over direct ms | "
            "p99 added over direct ms | notes |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in extras.open_loop:
            r = row.result
            added50 = added99 = math.nan
            if direct is not None and direct.valid and row.valid and row is not direct:
                added50 = r["p50_ms"] - direct.result["p50_ms"]
                added99 = r["p99_ms"] - direct.result["p99_ms"]
            note = (
                ""
                if row.valid
                else f"INVALID: {r.get('non_2xx', 0)} non-2xx, {r.get('errors', 0)} errors"
            )
            if r.get("closed_by_server"):
                # Idle past the server's keep-alive timeout: replaced, as a client's pool would.
                note = (
                    f"{note} {r['closed_by_server']} idle connections closed by the server".strip()
                )
            lines.append(
                f"| {row.name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{_fmt(added50)} | {_fmt(added99)} | {note} |"
            )
    if extras.workers:
        lines += [
            "",
            "## `--workers 2` (two processes on both CPUs, unpinned: wrk and nginx share them)",
            "",
            "| row | req/s, 2 workers | req/s, 1 worker (pinned, above) | ratio |",
            "|---|---:|---:|---:|",
        ]
        for key, name in (
            ("gw_pass", "gateway passthrough"),
            ("gw_warm_RS256", "gateway RS256, 5,000 tokens"),
        ):
            two = extras.workers.get(key, math.nan)
            one = one_worker.get(key, math.nan)
            lines.append(f"| {name} | {_fmt(two, 0)} | {_fmt(one, 0)} | {_fmt(two / one, 2)} |")
    if extras.idle:
        idle = extras.idle
        lines += [
            "",
            "## Memory per idle client connection (one worker, a fresh process)",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| VmRSS before | {idle['before']:.1f} MB |",
            f"| VmRSS with {idle['answered']:.0f} idle keep-alive connections (each answered "
            f"once) | {idle['during']:.1f} MB |",
            f"| **per 1,000 idle connections** | **{_fmt(idle['per_1000'])} MB** |",
        ]
    return lines
