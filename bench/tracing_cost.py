"""What tracing costs: trace propagation with no ``tracing:`` block against the same gateway
before it (a baseline git ref), and with a ``tracing:`` block (spans exported to a local sink).

    .venv/bin/python bench/tracing_cost.py                  # 5 rounds x 2 rows x 3 gateways, 5 s each
    .venv/bin/python bench/tracing_cost.py --quick          # 3 rounds, 3 s each (~2 min)
    .venv/bin/python bench/tracing_cost.py --micro          # the per-request work alone, in ns
    options: --baseline REF (default: the merge-base with main)  --rounds N  --duration S
             --no-tracing-on (skip the gateway with a tracing block)

The machine is shared and noisy, so the gateways run side by side (all pinned to CPU 0; wrk,
nginx and the span sink to CPU 1) and are measured in interleaved rounds, each round in another
order; the figures are per-round ratios against the baseline of the same round, then medians.
Rows: passthrough (``auth: none``) and warm verification (one RS256 token, a token-cache hit).
The baseline is ``git archive REF`` unpacked into bench/.cache/baseline-<sha> and run from
there.  Needs wrk and nginx as bench/run.py does (it falls back the same way).  Every process
started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import timeit
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from run import (  # noqa: E402
    GATEWAY_CPU,
    GATEWAY_YAML,
    LOAD_CPU,
    LoadGen,
    Processes,
    find_nginx,
    free_port,
    log,
    pinned,
    prepare_run_dir,
    start_upstream,
    wait_for,
)
from tokens import AUDIENCE, ISSUER, load_keys, prepare_tokens, read_tokens  # noqa: E402

RUN_DIR = BENCH / ".cache" / "tracing"

SINK = """\
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def micro() -> dict[str, float]:
    """Nanoseconds per call of the work propagation adds to a request (best of 5 repeats)."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.tracing import incoming

    plain = [("Host", "127.0.0.1:8080"), ("User-Agent", "wrk"), ("Accept", "*/*")]
    bare = CIMultiDictProxy(CIMultiDict(plain))
    traced = CIMultiDictProxy(
        CIMultiDict([*plain, ("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-01")])
    )
    trace = incoming(traced)

    def headers_only() -> CIMultiDict[str]:
        return CIMultiDict(plain)

    def with_trace() -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict(plain)
        out.add("traceparent", trace.traceparent())
        if trace.tracestate is not None:
            out.add("tracestate", trace.tracestate)
        return out

    def ns(fn: object, number: int = 200_000) -> float:
        best = min(timeit.repeat(fn, number=number, repeat=5))  # type: ignore[arg-type]
        return best / number * 1e9

    forward_ns = ns(with_trace) - ns(headers_only)
    return {
        "incoming_no_traceparent_ns": ns(lambda: incoming(bare)),
        "incoming_with_traceparent_ns": ns(lambda: incoming(traced)),
        "forward_headers_ns": forward_ns,
        "log_field_lookup_ns": ns(lambda: trace.trace_id if trace is not None else None),
    }


def git(*args: str) -> bytes:
    """The output of ``git ARGS`` in this checkout."""
    command = [shutil.which("git") or "/usr/bin/git", *args]
    return subprocess.run(command, cwd=ROOT, check=True, capture_output=True).stdout  # noqa: S603


def baseline_tree(ref: str) -> Path:
    sha = git("rev-parse", ref).decode().strip()
    tree = BENCH / ".cache" / f"baseline-{sha[:12]}"
    if not (tree / "gateway" / "__init__.py").exists():
        data = git("archive", sha, "gateway")
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            archive.extractall(tree, filter="data")
    return tree


def start_gateway(
    procs: Processes, name: str, config: str, admin: int, tree: Path, cpu: int | None
) -> subprocess.Popen[bytes]:
    """``python -m gateway run`` from ``tree`` (its package first on the path), ready."""
    path = RUN_DIR / f"{name}.yaml"
    path.write_text(config)
    argv = [sys.executable, "-m", "gateway", "--log-level", "WARNING"]
    argv += ["run", "--config", str(path), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log_file = (RUN_DIR / f"{name}.log").open("wb")
    procs.logs.append(log_file)
    proc = subprocess.Popen(  # noqa: S603 - our own argv
        pinned(cpu, argv), stdout=log_file, stderr=subprocess.STDOUT, cwd=tree, env=env,
        start_new_session=True,
    )  # fmt: skip
    procs.running.append((name, proc))
    wait_for(f"http://127.0.0.1:{admin}/readyz", proc, name)
    return proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-tracing-on", action="store_true")
    args = parser.parse_args(argv)
    if args.micro:
        for key, value in micro().items():
            print(f"{key:32s} {value:8.0f}")
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    duration = args.duration or (3.0 if args.quick else 5.0)
    ref = args.baseline
    if ref is None:
        ref = git("merge-base", "HEAD", "main").decode().strip()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    try:
        return run(procs, ref, rounds, duration, args)
    finally:
        procs.stop_all()


def run(procs: Processes, ref: str, rounds: int, duration: float, args: argparse.Namespace) -> int:
    keys = load_keys()
    tokens = prepare_tokens(keys, 0, log)
    prepare_run_dir(RUN_DIR, keys)
    token = read_tokens(tokens.one["RS256"])[0]
    wrk = shutil.which("wrk")
    upstream, up_port, label = start_upstream(procs, find_nginx(), LOAD_CPU, RUN_DIR)
    log(f"upstream: {label}; load: {'wrk' if wrk else 'bench/loadgen.py'}; baseline {ref[:12]}")
    loadgen = LoadGen(procs, wrk, args.connections, LOAD_CPU)
    trees = {"baseline": baseline_tree(ref), "off": ROOT}
    gateways: dict[str, str] = {}
    sink_port = free_port()
    if not args.no_tracing_on:
        trees["on"] = ROOT
        sink = [sys.executable, "-c", SINK, str(sink_port)]
        procs.start("sink", pinned(LOAD_CPU, sink), RUN_DIR / "sink.log")
    for name, tree in trees.items():
        port, admin = free_port(), free_port()
        config = GATEWAY_YAML.format(
            port=port, admin=admin, upstream=up_port, issuer=ISSUER, audience=AUDIENCE
        )
        if name == "on":
            config += f"tracing: {{endpoint: 'http://127.0.0.1:{sink_port}/v1/traces'}}\n"
        start_gateway(procs, f"gateway-{name}", config, admin, tree, GATEWAY_CPU)
        gateways[name] = f"http://127.0.0.1:{port}"
    rows = {"passthrough": ("/public/x", None), "warm verify": ("/api/x", token)}
    results: dict[tuple[str, str], list[float]] = {}
    names = list(gateways)
    for base in gateways.values():  # warm-up: token cache, pools, JIT-less caches
        for path, jwt in rows.values():
            header = f"Authorization: Bearer {jwt}" if jwt else None
            loadgen.run(base + path, 1.0, header=header)
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        if index % 2:
            order.reverse()
        for row, (path, jwt) in rows.items():
            header = f"Authorization: Bearer {jwt}" if jwt else None
            for name in order:
                load = loadgen.run(gateways[name] + path, duration, header=header)
                results.setdefault((name, row), []).append(load.rps)
        log(f"round {index + 1}/{rounds}: " + ", ".join(
            f"{n} {r} {results[(n, r)][-1]:,.0f}" for r in rows for n in names
        ))  # fmt: skip
    summary: dict[str, object] = {"baseline": ref, "rounds": rounds, "duration_s": duration}
    print()
    print("| row | gateway | median req/s | median ratio to baseline (per round) |")
    print("|---|---|---:|---:|")
    for row in rows:
        base_runs = results[("baseline", row)]
        for name in names:
            runs = results[(name, row)]
            ratio = statistics.median(r / b for r, b in zip(runs, base_runs, strict=True))
            print(f"| {row} | {name} | {statistics.median(runs):,.0f} | {ratio:.3f} |")
            summary[f"{row}/{name}"] = {"rps": runs, "ratio_median": ratio}
    print()
    print(json.dumps(summary))
    del upstream
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
