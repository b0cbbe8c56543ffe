"""Forward-auth benchmark (issue 12): nginx ``auth_request`` asking the gateway, against nginx
alone and against the gateway's own proxy mode, in one command.

    .venv/bin/python bench/forward_auth.py          # 3 rounds x (2 s warm-up + 10 s) a row (~6 min)
    .venv/bin/python bench/forward_auth.py --quick  # 3 rounds x (1 s + 3 s) a row (~2 min)
    options: --duration S  --warmup S  --rounds N (3)  --connections N (32)  --rate R (open-loop
             req/s; default 25% of the lower of rows a and b)  --latency-duration S
             --nice N  --gateway-log-level LEVEL (WARNING)  --output FILE

Rows, measured in interleaved rounds (a, b, b', c, c', then again), medians reported:
  (a)  nginx alone: wrk -> nginx (front) -> nginx upstream;
  (b)  nginx + auth_request: wrk -> nginx (front) -> subrequest to the gateway's /auth/nginx in
       ``mode: forward_auth`` (X-Original-URI / X-Original-Method, no body) -> nginx upstream;
       one repeated RS256 token, and (b') 5,000 distinct RS256 tokens in rotation;
  (c)  the gateway's proxy mode: wrk -> gateway -> nginx upstream, same token(s).
The gateway's CPU time comes from /proc: (b) gives auth decisions per gateway CPU-second, (c)
requests per gateway CPU-second; their ratio is the issue's figure (target >= 2).
  (d)  added latency: an open-loop generator (bench/openloop.py, fixed request rate, 25% of the
       lower capacity of (a) and (b)) against (a), (b) and (c): p50 / p99 of (b) minus (a); and,
       as a cross-check, wrk with one connection (closed loop, no queueing).

Pinning as in bench/run.py: both gateways (forward_auth and proxy, one process each) on CPU 0;
wrk, the open-loop generator, the front nginx (of rows a and b) and the nginx upstream + JWKS
on CPU 1.  nginx alone (a) runs on CPU 1 as well, so the rows compare; it shares that core
with wrk and the upstream, which bounds its req/s.  Keys and tokens come from bench/.cache via
bench/tokens.py; scratch files go to bench/.cache/forward_auth/.  Results: printed, and
written as markdown to bench/results/forward_auth.md.  Every process started is stopped by PID
at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import run as harness  # noqa: E402
from run import (  # noqa: E402
    CLK_TCK,
    GATEWAY_CPU,
    GATEWAY_YAML,
    LOAD_CPU,
    Bench,
    Load,
    LoadGen,
    Processes,
    Row,
    _fmt,
    _git_rev,
    _loadavg,
    check_tools,
    children,
    cpu_times,
    free_port,
    launch_gateway,
    log,
    pinned,
    prepare_run_dir,
    proc_cpu,
    start_upstream,
    tool_version,
    wait_for,
)
from tokens import (  # noqa: E402
    AUDIENCE,
    ISSUER,
    WARM_SET_SIZE,
    forged,
    load_keys,
    prepare_tokens,
    read_tokens,
)

RUN_DIR = BENCH / ".cache" / "forward_auth"
RESULTS = BENCH / "results" / "forward_auth.md"
CLAIM_HEADERS = {"X-User-Sub": "sub"}  # on the api route, in both modes
FALLBACK_OWNED = ["X-User-Sub", "X-Gateway-Auth-Outcome"]  # if `gateway owned-headers` fails
DECISIONS = "gateway_forward_auth_decisions_total"

# The front nginx: (a) a plain reverse proxy; (b) the same with auth_request to the gateway,
# mirroring deploy/forward-auth/nginx.conf (its subrequest headers, its auth_request_set /
# proxy_set_header pairs for every owned header, its error pages) without the access log, and
# with keep-alive pools of 64 (above the 32 connections) to the gateway and the upstream.
FRONT_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/front.pid;
error_log {dir}/front-error.log warn;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log off;
    underscores_in_headers off;
    client_body_temp_path {dir}/nginx-tmp/front-body;
    proxy_temp_path {dir}/nginx-tmp/front-proxy;
    fastcgi_temp_path {dir}/nginx-tmp/front-fastcgi;
    uwsgi_temp_path {dir}/nginx-tmp/front-uwsgi;
    scgi_temp_path {dir}/nginx-tmp/front-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    upstream gateway {{
        server 127.0.0.1:{gateway};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{plain_port} backlog=4096;
        location / {{
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Connection "";
            proxy_http_version 1.1;
            proxy_pass http://backend;
        }}
    }}
    server {{
        listen 127.0.0.1:{auth_port} backlog=4096;
        location / {{
            auth_request /_gateway/auth;
            auth_request_set $gw_status $upstream_status;
            auth_request_set $gw_error $upstream_http_x_gateway_error;
            auth_request_set $gw_www_authenticate $upstream_http_www_authenticate;
            auth_request_set $gw_request_id $upstream_http_x_request_id;
{owned}
            proxy_set_header Authorization "";
            proxy_set_header X-Request-ID $gw_request_id;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Connection "";
            proxy_http_version 1.1;
            proxy_pass http://backend;
            error_page 401 = @gateway_401;
            error_page 403 = @gateway_403;
        }}
        location = /_gateway/auth {{
            internal;
            proxy_pass http://gateway/auth/nginx;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-URL $scheme://$host$request_uri;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Transfer-Encoding "";
            proxy_set_header Connection "";
            proxy_http_version 1.1;
        }}
        location @gateway_401 {{
            types {{ }}
            default_type application/json;
            add_header Cache-Control "no-store" always;
            return 401 $gw_error;
        }}
        location @gateway_403 {{
            types {{ }}
            default_type application/json;
            add_header Cache-Control "no-store" always;
            add_header WWW-Authenticate $gw_www_authenticate always;
            return 403 $gw_error;
        }}
    }}
}}
"""


def owned_directives(headers: Sequence[str]) -> str:
    lines = []
    for i, name in enumerate(headers):
        var = "upstream_http_" + name.lower().replace("-", "_")
        lines.append(f"            auth_request_set $gw_owned_{i} ${var};")
        lines.append(f"            proxy_set_header {name} $gw_owned_{i};")
    return "\n".join(lines)


def gateway_config(mode: str, port: int, admin: int, upstream: int) -> str:
    """run.py's bench config (same issuer, routes and policies), plus a claim header on the
    api route; forward_auth mode adds the mode and the trusted callers."""
    text = GATEWAY_YAML.format(
        port=port, admin=admin, upstream=upstream, issuer=ISSUER, audience=AUDIENCE
    )
    claims = ", ".join(f"{h}: {c}" for h, c in CLAIM_HEADERS.items())
    text += f"    claim_headers: {{{claims}}}\n"
    if mode == "forward_auth":
        text = "mode: forward_auth\ntrusted_proxies: [127.0.0.1/32]\n" + text
    return text


# --- small HTTP helpers -------------------------------------------------------------------------


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback http
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def decisions(admin: int) -> float:
    """The gateway's own count of nginx allow decisions (NaN if it has no such metric)."""
    _, _, body = get(f"http://127.0.0.1:{admin}/metrics")
    total = math.nan
    for line in body.decode().splitlines():
        if (
            line.startswith(DECISIONS + "{")
            and 'caller="nginx"' in line
            and 'decision="allow"' in line
        ):
            total = (0.0 if math.isnan(total) else total) + float(line.rsplit(" ", 1)[1])
    return total


def check(label: str, got: object, want: object) -> None:
    if got != want:
        raise RuntimeError(f"sanity check failed: {label}: got {got!r}, want {want!r}")


def sanity(fa: str, front_auth: str, plain: str, px: str, token: str) -> None:
    """A benchmark of a check that allows everything, or nothing, measures nothing."""
    auth = {"Authorization": f"Bearer {token}"}
    bad = {"Authorization": f"Bearer {forged(token)}"}
    original = {"X-Original-URI": "/api/x?q=1", "X-Original-Method": "GET"}
    status, headers, _ = get(f"{fa}/auth/nginx", {**original, **auth})
    check("forward_auth allow", status, 200)
    check("forward_auth claim header", headers.get("x-user-sub"), "user-0")
    status, headers, _ = get(f"{fa}/auth/nginx", original)
    check("forward_auth no token", status, 401)
    check("forward_auth X-Gateway-Error on a deny", "x-gateway-error" in headers, True)
    check("forward_auth forged", get(f"{fa}/auth/nginx", {**original, **bad})[0], 401)
    no_method = {"X-Original-URI": "/api/x", **auth}
    check("forward_auth without X-Original-Method", get(f"{fa}/auth/nginx", no_method)[0], 400)
    check("nginx+auth allow", get(f"{front_auth}/api/x", auth)[:3:2], (200, b"ok\n"))
    status, _, body = get(f"{front_auth}/api/x")
    check("nginx+auth no token", (status, body[:9]), (401, b'{"error":'))
    check("nginx+auth forged", get(f"{front_auth}/api/x", bad)[0], 401)
    check("nginx+auth public", get(f"{front_auth}/public/x")[0], 200)
    check("nginx alone", get(f"{plain}/api/x")[:3:2], (200, b"ok\n"))
    check("gateway proxy allow", get(f"{px}/api/x", auth)[:3:2], (200, b"ok\n"))
    check("gateway proxy no token", get(f"{px}/api/x")[0], 401)
    check("gateway proxy forged", get(f"{px}/api/x", bad)[0], 401)


# --- measurements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    key: str
    name: str
    url: str
    server: list[int]  # the PIDs whose CPU time is "server CPU"
    tokens: Path | None = None
    header: str | None = None
    counts_decisions: bool = False


@dataclass
class Sample:
    row: Row
    front_cpu_s: float  # the front nginx (master + worker) during the row
    counted: float  # decisions the gateway counted during the row (NaN: not a forward-auth row)
    others: list[tuple[str, float]]  # (command, % of a core) of the busiest processes not ours

    @property
    def rps(self) -> float:
        return self.row.load.rps if self.row.load else math.nan


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    latency: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    closed1: dict[str, list[Load]] = field(default_factory=dict)
    rate: float = math.nan


def all_cpu() -> dict[int, tuple[str, float]]:
    """Every process: (command, utime + stime in seconds)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (entry / "stat").read_text()
                comm = text[text.index("(") + 1 : text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                out[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def busiest_others(
    before: dict[int, tuple[str, float]], ours: set[int], wall_s: float
) -> list[tuple[str, float]]:
    """The three busiest commands (>= 2% of a core) that are not this benchmark's, since
    ``before``: who else used the machine during a row."""
    busy: dict[str, float] = {}
    for pid, (comm, cpu_s) in all_cpu().items():
        if pid not in ours and pid != os.getpid():
            used = cpu_s - before.get(pid, (comm, 0.0))[1]
            busy[comm] = busy.get(comm, 0.0) + 100 * used / wall_s
    return sorted(((c, v) for c, v in busy.items() if v >= 2), key=lambda cv: -cv[1])[:3]


def others_text(others: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{c} {v:.0f}%" for c, v in others)


def measure(
    bench: Bench, spec: Spec, round_no: int, front: Sequence[int], admin: int, ours: set[int]
) -> Sample:
    mark: dict[str, float] = {}
    everyone: dict[int, tuple[str, float]] = {}

    def on_warm(_: Load, __: int) -> None:  # just before the CPU snapshot of the row
        everyone.update(all_cpu())
        mark["front"] = proc_cpu(front)
        mark["counted"] = decisions(admin) if spec.counts_decisions else math.nan

    row = bench.measure(
        f"{spec.key}#{round_no}",
        f"{spec.name} [round {round_no}]",
        spec.url,
        spec.server,
        tokens=spec.tokens,
        header=spec.header,
        on_warm=on_warm,
    )
    front_cpu = proc_cpu(front) - mark["front"]
    counted = decisions(admin) - mark["counted"] if spec.counts_decisions else math.nan
    others = busiest_others(everyone, ours, row.wall_s)
    if others:
        row.notes.append("others: " + others_text(others))
    return Sample(row, front_cpu, counted, others)


def openloop(
    procs: Processes,
    cpu: int | None,
    url: str,
    rate: float,
    seconds: float,
    header: str,
    ours: set[int],
) -> dict[str, Any]:
    """One open-loop row (bench/openloop.py, 1 s unrecorded warm-up first); its JSON, plus
    how busy CPU 0 was and who else ran meanwhile."""
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
    assert match, url
    argv = [sys.executable, str(BENCH / "openloop.py"), "--host", match.group(1)]
    argv += ["--port", match.group(2), "--path", match.group(3), "--rate", f"{rate:.0f}"]
    argv += ["--duration", str(seconds), "--warmup", "1", "--header", header]
    everyone, stat_before, wall_before = all_cpu(), cpu_times(), time.monotonic()
    out: dict[str, Any] = json.loads(procs.run("openloop", pinned(cpu, argv), seconds + 60))
    stat_after = cpu_times()
    others = busiest_others(everyone, ours, time.monotonic() - wall_before)
    out["others"] = others_text(others)
    if "cpu0" in stat_before:
        busy = stat_after["cpu0"][0] - stat_before["cpu0"][0]
        total = stat_after["cpu0"][1] - stat_before["cpu0"][1]
        out["cpu0_busy"] = 100 * busy / total if total else math.nan
    else:
        out["cpu0_busy"] = math.nan
    return out


# --- the run ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Forward-auth benchmark (see the top of bench/forward_auth.py)."
    )
    parser.add_argument("--quick", action="store_true", help="3 s rows, 1 s warm-up (~2 min)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per row (10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up per row (2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=None, help="open-loop req/s")
    parser.add_argument(
        "--latency-duration", type=float, default=None, help="seconds per latency row"
    )
    parser.add_argument("--gateway-log-level", default="WARNING")
    parser.add_argument("--nice", type=int, default=0, help="niceness of every process")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.latency_duration is None:
        args.latency_duration = args.duration
    # what run.py's helpers read
    args.loadgen, args.upstream, args.no_envoy = "auto", "auto", True
    harness.NICE = args.nice
    command = shlex.join([".venv/bin/python", "bench/forward_auth.py", *sys.argv[1:]])

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes()
    started = time.monotonic()
    try:
        return run(args, procs, command)
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    except RuntimeError as exc:
        log(f"\nFAILED: {exc}")
        for name in ("gateway-fa", "gateway-proxy"):
            path = RUN_DIR / f"{name}.log"
            if path.exists() and path.stat().st_size:
                tail = path.read_text(errors="replace").splitlines()[-15:]
                log(f"--- last lines of {path}:\n" + "\n".join(tail))
        return 1
    finally:
        procs.stop_all()
        log(f"all started processes stopped ({time.monotonic() - started:.0f} s in all)")


def run(args: argparse.Namespace, procs: Processes, command: str) -> int:
    loadavg_start = _loadavg()
    wrk, _, nginx, pin = check_tools(args)
    if not nginx:
        raise RuntimeError("nginx (with auth_request) is needed: apt-get install -y nginx-light")
    gw_cpu = GATEWAY_CPU if pin else None
    load_cpu = LOAD_CPU if pin else None
    keys = load_keys()
    tokens = prepare_tokens(keys, 0, log)
    prepare_run_dir(RUN_DIR, keys)
    one = read_tokens(tokens.one["RS256"])[0]
    auth = {"Authorization": f"Bearer {one}"}
    header = f"Authorization: Bearer {one}"

    upstream, up_port, upstream_label = start_upstream(procs, nginx, load_cpu, RUN_DIR)
    log(f"upstream + JWKS (pid {upstream.pid}, CPU {load_cpu}): {upstream_label}")

    fa_port, fa_admin, px_port, px_admin = (free_port() for _ in range(4))
    level = args.gateway_log_level
    fa_conf = gateway_config("forward_auth", fa_port, fa_admin, up_port)
    gw_fa = launch_gateway(procs, "gateway-fa", fa_conf, fa_admin, gw_cpu, level, RUN_DIR)
    px_conf = gateway_config("proxy", px_port, px_admin, up_port)
    gw_px = launch_gateway(procs, "gateway-proxy", px_conf, px_admin, gw_cpu, level, RUN_DIR)
    log(f"gateway forward_auth (pid {gw_fa.pid}, CPU {gw_cpu}): :{fa_port}")
    log(f"gateway proxy        (pid {gw_px.pid}, CPU {gw_cpu}): :{px_port}")

    try:
        out = procs.run(
            "owned-headers",
            [
                sys.executable,
                "-m",
                "gateway",
                "owned-headers",
                "--config",
                str(RUN_DIR / "gateway-fa.yaml"),
            ],
            30,
        )
        owned = [line.strip() for line in out.splitlines() if line.strip()]
        owned_source = "`gateway owned-headers`"
    except RuntimeError:
        owned, owned_source = FALLBACK_OWNED, "fallback list (`gateway owned-headers` failed)"
    if not owned or not all(re.fullmatch(r"[A-Za-z0-9-]+", h) for h in owned):
        raise RuntimeError(f"unexpected owned headers: {owned!r}")
    log(f"owned headers ({owned_source}): {', '.join(owned)}")

    plain_port, auth_port = free_port(), free_port()
    conf = RUN_DIR / "front.conf"
    conf.write_text(
        FRONT_CONF.format(
            dir=RUN_DIR,
            user="user root;" if os.geteuid() == 0 else "",
            upstream=up_port,
            gateway=fa_port,
            plain_port=plain_port,
            auth_port=auth_port,
            owned=owned_directives(owned),
        )
    )
    front_argv = [nginx, "-p", str(RUN_DIR), "-e", str(RUN_DIR / "front-error.log")]
    front_argv += ["-c", str(conf)]
    front = procs.start("nginx-front", pinned(load_cpu, front_argv), RUN_DIR / "front.log")
    wait_for(f"http://127.0.0.1:{plain_port}/", front, "nginx front")
    front_pids = [front.pid, *children(front.pid)]
    log(f"nginx front (pid {front.pid}, CPU {load_cpu}): plain :{plain_port}, auth :{auth_port}")

    fa = f"http://127.0.0.1:{fa_port}"
    front_auth = f"http://127.0.0.1:{auth_port}"
    px = f"http://127.0.0.1:{px_port}"
    sanity(fa, front_auth, f"http://127.0.0.1:{plain_port}", px, one)
    before = decisions(fa_admin)
    for _ in range(3):
        get(f"{front_auth}/api/x", auth)
    counted_ok = decisions(fa_admin) - before == 3
    log(
        "sanity ok; the gateway counts one decision per nginx request: "
        f"{'yes' if counted_ok else 'NO (or no ' + DECISIONS + ' metric)'}"
    )

    loadgen = LoadGen(procs, wrk, args.connections, load_cpu)
    bench = Bench(args, procs, loadgen, tokens)
    warm = tokens.warm["RS256"]
    plain = f"http://127.0.0.1:{plain_port}/api/x"
    specs = [
        Spec("a", "(a) nginx alone", plain, front_pids, header=header),
        Spec(
            "b1",
            "(b) nginx + auth_request, RS256 1 token",
            f"{front_auth}/api/x",
            [gw_fa.pid],
            header=header,
            counts_decisions=True,
        ),
        Spec(
            "bN",
            f"(b) nginx + auth_request, RS256 {WARM_SET_SIZE:,} tokens",
            f"{front_auth}/api/x",
            [gw_fa.pid],
            tokens=warm,
            counts_decisions=True,
        ),
        Spec(
            "c1", "(c) gateway proxy mode, RS256 1 token", f"{px}/api/x", [gw_px.pid], header=header
        ),
        Spec(
            "cN",
            f"(c) gateway proxy mode, RS256 {WARM_SET_SIZE:,} tokens",
            f"{px}/api/x",
            [gw_px.pid],
            tokens=warm,
        ),
    ]
    results = Results()
    ours = {upstream.pid, *children(upstream.pid), gw_fa.pid, gw_px.pid, *front_pids}
    ours |= {c for pid in (gw_fa.pid, gw_px.pid) for c in children(pid)}
    log(
        f"throughput: {args.rounds} interleaved rounds x {len(specs)} rows, "
        f"{args.warmup:.0f} s warm-up + {args.duration:.0f} s each, {loadgen.label}"
    )
    for round_no in range(1, args.rounds + 1):
        for spec in specs:
            sample = measure(bench, spec, round_no, front_pids, fa_admin, ours)
            if sample.others:
                log(f"    {sample.row.notes[-1]}")
            results.samples.setdefault(spec.key, []).append(sample)

    capacity = min(median(results, "a", lambda s: s.rps), median(results, "b1", lambda s: s.rps))
    results.rate = args.rate or max(100.0, math.floor(capacity * 0.25 / 50) * 50)
    loadgen1 = LoadGen(procs, wrk, 1, load_cpu)
    lat_specs = [s for s in specs if s.key in ("a", "b1", "c1")]
    log(
        f"latency: open loop at {results.rate:.0f} req/s (25% of {capacity:,.0f}), "
        f"{args.rounds} rounds x {args.latency_duration:.0f} s; then wrk -c1 "
        f"{min(args.latency_duration, 5):.0f} s"
    )
    for round_no in range(1, args.rounds + 1):
        for spec in lat_specs:
            out = openloop(
                procs, load_cpu, spec.url, results.rate, args.latency_duration, header, ours
            )
            results.latency.setdefault(spec.key, []).append(out)
            log(
                f"  {spec.name} [round {round_no}] open loop: {out['rps']:.0f} req/s "
                f"p50 {out['p50_ms']:.3f} ms p99 {out['p99_ms']:.3f} ms "
                f"(lag p99 {out['lag_p99_ms']:.2f} ms, {out['non_2xx']} non-2xx, "
                f"{out['errors']} errors, {out['connections_opened']} connections; "
                f"CPU0 busy {out['cpu0_busy']:.0f}%"
                + (f"; others: {out['others']}" if out["others"] else "")
                + ")"
            )
        for spec in lat_specs:
            load = loadgen1.run(spec.url, min(args.latency_duration, 5), header=header)
            results.closed1.setdefault(spec.key, []).append(load)
            log(
                f"  {spec.name} [round {round_no}] wrk -c1: {load.rps:.0f} req/s "
                f"p50 {load.p50_ms:.3f} ms p99 {load.p99_ms:.3f} ms"
            )

    env = {
        "command": command,
        "loadavg_start": loadavg_start,
        "pinned": pin,
        "upstream": upstream_label,
        "nginx": tool_version([nginx, "-v"]),
        "loadgen": loadgen.label,
        "owned": owned,
        "owned_source": owned_source,
        "counted_ok": counted_ok,
        "loop": results.latency["a"][0].get("loop", "?"),
    }
    report = render(args, specs, results, env)
    print()
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"written to {args.output}")
    valid = all(s.row.valid for samples in results.samples.values() for s in samples)
    valid = valid and all(
        o["non_2xx"] == 0 and o["errors"] == 0 for outs in results.latency.values() for o in outs
    )
    return 0 if valid else 1


# --- report -------------------------------------------------------------------------------------


def median(results: Results, key: str, value: Callable[[Sample], float]) -> float:
    values = [value(s) for s in results.samples.get(key, []) if s.row.valid]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def per_cpu(sample: Sample) -> float:
    """(b): nginx requests (one auth decision each) per gateway CPU-second; (c): proxied
    requests per gateway CPU-second; (a): requests per front-nginx CPU-second."""
    return sample.row.per_cpu_s


def spread(values: Sequence[float], digits: int = 0) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    return f"{_fmt(min(values), digits)} to {_fmt(max(values), digits)}"


def render(
    args: argparse.Namespace, specs: Sequence[Spec], results: Results, env: dict[str, Any]
) -> str:
    rounds = args.rounds
    pinning = (
        f"both gateways (forward_auth and proxy mode, one process each) on CPU {GATEWAY_CPU}; "
        f"wrk, the open-loop generator, the front nginx (rows a and b) and the nginx upstream "
        f"+ JWKS on CPU {LOAD_CPU}. nginx alone (a) runs on CPU {LOAD_CPU} too, so the rows "
        "compare: it shares that core with wrk and the upstream, which bounds its req/s"
        if env["pinned"]
        else "NONE (taskset or a second CPU missing)"
    )
    lines = [
        "# forward-auth benchmark (issue 12)",
        "",
        f"- command: `{env['command']}`",
        f"- run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {_git_rev()}, "
        f"{'quick' if args.quick else 'full'}: {rounds} interleaved rounds, "
        f"{args.warmup:.0f} s warm-up + {args.duration:.0f} s per row and round, "
        f"{args.connections} connections; medians over the rounds",
        f"- machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, load average at "
        f"start {env['loadavg_start']}, at end {_loadavg()} (shared machine: see the CPU columns)",
        f"- pinning: {pinning}; niceness of every benchmark process: {args.nice}",
        f"- load generator: {env['loadgen']}; latency rows: bench/openloop.py (open loop, "
        f"{env['loop']} event loop) and wrk -t1 -c1",
        f"- front nginx: {env['nginx']}, 1 worker, no access log, keep-alive pools of 64 to "
        "the gateway and the upstream; (b) mirrors deploy/forward-auth/nginx.conf: "
        "`auth_request` to `/auth/nginx` with `X-Original-Method`, `X-Original-URI "
        "$request_uri`, `X-Original-URL`, `proxy_pass_request_body off`, and `auth_request_set` "
        f"+ `proxy_set_header` for every owned header ({env['owned_source']}: "
        f"{', '.join(env['owned'])}); (a) is the same proxy location without the auth lines",
        f"- upstream + JWKS: {env['upstream']}",
        f"- gateways: `python -m gateway --log-level {args.gateway_log_level} run --workers 1`, "
        "run.py's bench config (RS256/ES256 issuer, `/api` verified, `/public` open) plus "
        f"`claim_headers: {{{', '.join(f'{h}: {c}' for h, c in CLAIM_HEADERS.items())}}}` on "
        "/api; forward_auth adds `mode: forward_auth`, `trusted_proxies: [127.0.0.1/32]`",
        "- gateway counted one decision per nginx request in the sanity check: "
        f"{'yes' if env['counted_ok'] else 'NO'}",
        "",
        f"## Throughput (median of {rounds} rounds)",
        "",
        "| row | req/s | req/s range | p50 ms | p99 ms | gateway CPU % | per gateway CPU-s "
        "| front nginx CPU % | CPU0 busy % | CPU0 not the gateway % | CPU1 busy % | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for spec in specs:
        samples = results.samples.get(spec.key, [])
        on_gateway = spec.key != "a"

        def med(value: Callable[[Sample], float], digits: int = 0, key: str = spec.key) -> str:
            return _fmt(median(results, key, value), digits)

        notes = sorted(
            {n for s in samples for n in s.row.notes if not n.startswith(("others", "CPU0 steal"))}
        )
        steal = [s.row.steal for s in samples]
        if max(steal, default=0) >= 1:
            notes.append(f"CPU0 steal {spread(steal)}%")
        if spec.counts_decisions:
            counted = [s.counted / s.row.load.requests for s in samples if s.row.load]
            notes.append(f"gateway-counted decisions / wrk requests: {spread(counted, 3)}")
        if not on_gateway:
            notes.append("no gateway; server CPU = the front nginx")
        cells = [
            spec.name,
            med(lambda s: s.rps),
            spread([s.rps for s in samples]),
            med(lambda s: s.row.load.p50_ms if s.row.load else math.nan, 2),
            med(lambda s: s.row.load.p99_ms if s.row.load else math.nan, 2),
            med(lambda s: s.row.server_cpu) if on_gateway else "—",
            med(per_cpu) if on_gateway else "—",
            med(lambda s: 100 * s.front_cpu_s / s.row.wall_s),
            med(lambda s: s.row.cpu0_busy),
            med(lambda s, g=on_gateway: s.row.cpu0_busy - (s.row.server_cpu if g else 0)),
            med(lambda s: s.row.cpu1_busy),
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    def paired(num: str, den: str, value: Callable[[Sample], float]) -> list[float]:
        out = []
        for a, b in zip(results.samples.get(num, []), results.samples.get(den, []), strict=False):
            if a.row.valid and b.row.valid:
                out.append(value(a) / value(b))
        return out

    lines += [
        "",
        "## Ratios (per round, then the median)",
        "",
        "| ratio | median | per round |",
        "|---|---:|---|",
    ]
    ratio_rows = [
        (
            "**auth decisions per gateway CPU-s (b) / requests per gateway CPU-s (c)**, 1 token",
            "b1",
            "c1",
            per_cpu,
        ),
        (f"**the same, {WARM_SET_SIZE:,} tokens**", "bN", "cN", per_cpu),
        ("req/s (b) / req/s (c), 1 token", "b1", "c1", lambda s: s.rps),
        (f"req/s (b) / req/s (c), {WARM_SET_SIZE:,} tokens", "bN", "cN", lambda s: s.rps),
        ("req/s (b) / req/s (a), 1 token", "b1", "a", lambda s: s.rps),
        (
            "requests per (gateway + front nginx) CPU-s (b) / per gateway CPU-s (c), 1 token",
            "b1",
            "c1",
            lambda s: (
                s.row.load.requests / (s.row.server_cpu_s + s.front_cpu_s)
                if s.row.load
                else math.nan
            ),
        ),
    ]
    headline: list[float] = []
    for label, num, den, value in ratio_rows:
        values = paired(num, den, value)
        if num in ("b1", "bN") and value is per_cpu:
            headline += values
        med = statistics.median(values) if values else math.nan
        lines.append(
            f"| {label} | {_fmt(med, 2)} | {', '.join(_fmt(v, 2) for v in values) or '—'} |"
        )
    target = (
        "met" if headline and min(headline) >= 2 else "NOT met in every round" if headline else "?"
    )
    lines += ["", f"Issue 12's target, decisions per CPU-s >= 2x proxy mode's requests: {target}."]

    # --- latency
    lat = results.latency

    def lat_med(key: str, field_name: str) -> float:
        values = [o[field_name] for o in lat.get(key, []) if not (o["non_2xx"] or o["errors"])]
        return statistics.median(values) if values else math.nan

    def lat_diff(field_name: str) -> list[float]:
        return [
            b[field_name] - a[field_name]
            for a, b in zip(lat.get("a", []), lat.get("b1", []), strict=False)
        ]

    lines += [
        "",
        f"## Added latency at a fixed open-loop rate: {results.rate:,.0f} req/s "
        f"(median of {rounds} rounds x {args.latency_duration:.0f} s, one RS256 token)",
        "",
        'Latency from the write of the request to the whole answer; "due p99" counts from '
        "the moment the request was due (adds the generator's own sending lag, up to its ~1 ms "
        "timer granularity).",
        "",
        "| row | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | due p99 ms "
        "| generator lag p99 ms | CPU0 busy % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec in specs:
        if spec.key not in lat:
            continue
        lines.append(
            f"| {spec.name} | {_fmt(lat_med(spec.key, 'rps'))} "
            f"| {_fmt(lat_med(spec.key, 'p50_ms'), 3)} | {_fmt(lat_med(spec.key, 'p90_ms'), 3)} "
            f"| {_fmt(lat_med(spec.key, 'p99_ms'), 3)} | {_fmt(lat_med(spec.key, 'p999_ms'), 3)} "
            f"| {_fmt(lat_med(spec.key, 'sched_p99_ms'), 3)} "
            f"| {_fmt(lat_med(spec.key, 'lag_p99_ms'), 3)} "
            f"| {_fmt(lat_med(spec.key, 'cpu0_busy'))} |"
        )
    d50, d99 = lat_diff("p50_ms"), lat_diff("p99_ms")
    lines += [
        "",
        "| added by nginx auth_request + gateway, (b) - (a) | median | per round |",
        "|---|---:|---|",
        f"| **p50** | **{_fmt(statistics.median(d50) if d50 else math.nan, 3)} ms** "
        f"| {', '.join(_fmt(v, 3) for v in d50)} |",
        f"| **p99** | **{_fmt(statistics.median(d99) if d99 else math.nan, 3)} ms** "
        f"| {', '.join(_fmt(v, 3) for v in d99)} |",
        "",
        f"Cross-check, closed loop with one connection (wrk -t1 -c1 --latency, "
        f"{min(args.latency_duration, 5):.0f} s, no queueing; median of {rounds}):",
        "",
        "| row | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    c1 = results.closed1
    for spec in specs:
        if spec.key not in c1:
            continue
        loads = c1[spec.key]
        lines.append(
            f"| {spec.name} | {_fmt(statistics.median(x.rps for x in loads))} "
            f"| {_fmt(statistics.median(x.p50_ms for x in loads), 3)} "
            f"| {_fmt(statistics.median(x.p99_ms for x in loads), 3)} |"
        )
    if "a" in c1 and "b1" in c1:
        w50 = [b.p50_ms - a.p50_ms for a, b in zip(c1["a"], c1["b1"], strict=False)]
        w99 = [b.p99_ms - a.p99_ms for a, b in zip(c1["a"], c1["b1"], strict=False)]
        d50, d99 = statistics.median(w50), statistics.median(w99)
        lines.append(f"| (b) - (a) | | {_fmt(d50, 3)} | {_fmt(d99, 3)} |")

    lines += [
        "",
        "Every open-loop round (who else ran: the busiest other commands, % of a core):",
        "",
        "| round | row | p50 ms | p99 ms | CPU0 busy % | others |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for round_index in range(rounds):
        for spec in specs:
            outs = lat.get(spec.key, [])
            if round_index < len(outs):
                o = outs[round_index]
                lines.append(
                    f"| {round_index + 1} | {spec.name} | {_fmt(o['p50_ms'], 3)} "
                    f"| {_fmt(o['p99_ms'], 3)} | {_fmt(o['cpu0_busy'])} | {o['others']} |"
                )
    lines += [
        "",
        "## Every round",
        "",
        "| row | round | req/s | p99 ms | server CPU % | per server CPU-s | front nginx CPU % "
        "| CPU0 busy % | CPU1 busy % | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for round_index in range(rounds):
        for spec in specs:
            samples = results.samples.get(spec.key, [])
            if round_index >= len(samples):
                continue
            s = samples[round_index]
            load = s.row.load
            lines.append(
                f"| {spec.name} | {round_index + 1} | {_fmt(s.rps)} "
                f"| {_fmt(load.p99_ms if load else math.nan, 2)} | {_fmt(s.row.server_cpu)} "
                f"| {_fmt(s.row.per_cpu_s)} | {_fmt(100 * s.front_cpu_s / s.row.wall_s)} "
                f"| {_fmt(s.row.cpu0_busy)} | {_fmt(s.row.cpu1_busy)} | {'; '.join(s.row.notes)} |"
            )
    lines += [
        "",
        "gateway CPU % = CPU time of the measured gateway process over the row's wall time "
        "(100 = one core); per gateway CPU-s = requests (in (b): nginx requests, one auth "
        "decision each) / that CPU time, what it would do with a core to itself. In (a) the "
        "server CPU is the front nginx's (master + worker). CPU0/CPU1 busy % count every "
        "process on that CPU; the idle second gateway also sits on CPU 0. Throughput-row "
        "latencies are closed-loop (32 connections; coordinated omission applies). A row with "
        "any non-2xx answer or socket error is marked INVALID and left out of the medians.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
