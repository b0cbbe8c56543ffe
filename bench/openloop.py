"""A small open-loop HTTP/1.1 load generator: requests at a fixed rate, whatever the answers do.

wrk (and bench/loadgen.py) are closed-loop: a connection sends its next request only when the
last one is answered, so a slow server is asked less often and its latency is understated
(coordinated omission).  Here request k is due at ``start + k / rate`` and is sent then on an
idle keep-alive connection (a new one is opened when none is idle), so the load does not depend
on the answers.  Used by bench/forward_auth.py for the added-latency rows.

    python bench/openloop.py --host 127.0.0.1 --port 8080 --path /api/x --rate 2000 \
        --duration 10 [--warmup 1] [--connections 16] [--header 'Name: value'] \
        [--token-file FILE]   # one token per line: request k carries token k mod N as Bearer

Prints one JSON object.  Two latencies per request:
- ``p50_ms`` .. ``max_ms``: from the moment the request was written to the socket to its whole
  answer (what the server and the network path add; the event loop's timer granularity, about
  1 ms, does not enter);
- ``sched_p50_ms`` / ``sched_p99_ms``: from the moment it was due (includes the generator's own
  lateness in sending, reported as ``lag_p99_ms``).
Uses uvloop when installed (named in the output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from loadgen import _percentile, _read_response

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class OpenLoop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        headers = "".join(f"{h}\r\n" for h in args.header)
        head = f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n{headers}"
        tokens = (
            [t for t in Path(args.token_file).read_text().splitlines() if t]
            if args.token_file
            else []
        )
        # Without a token file, one request over and over; with one, a request per token.
        self.requests = [
            f"{head}Authorization: Bearer {token}\r\n\r\n".encode() for token in tokens
        ] or [f"{head}\r\n".encode()]
        self.sent_count = 0
        self.idle: list[Connection] = []
        self.opened = 0
        self.recording = False
        self.latency = array("d")  # written -> answered, seconds
        self.sched_latency = array("d")  # due -> answered, seconds
        self.lag = array("d")  # due -> written, seconds
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self.closed_by_server = 0  # idle connections the server closed, seen before reuse
        self.in_flight: set[asyncio.Task[None]] = set()

    async def connect(self) -> Connection:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def pooled(self) -> Connection | None:
        """An idle connection the server has not closed, as an HTTP client's pool hands out:
        a server may close a keep-alive connection idle past its timeout (the gateway's
        ``client_idle_timeout_s``, 30 s by default), and reusing it would count an error."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof():
                return reader, writer
            writer.close()
            self.closed_by_server += 1
        return None

    async def one(self, due: float) -> None:
        conn = self.pooled() or await self.connect()
        reader, writer = conn
        sent = time.perf_counter()
        request = self.requests[self.sent_count % len(self.requests)]
        self.sent_count += 1
        try:
            writer.write(request)
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            if self.recording:
                self.errors += 1
            return
        done = time.perf_counter()
        self.idle.append(conn)
        if self.recording:
            self.latency.append(done - sent)
            self.sched_latency.append(done - due)
            self.lag.append(sent - due)
            self.statuses[status] += 1

    async def phase(self, rate: float, seconds: float, record: bool) -> tuple[int, float]:
        """Requests due at ``rate`` for ``seconds``; returns (sent, elapsed)."""
        self.recording = record
        interval = 1.0 / rate
        start = time.perf_counter()
        end = start + seconds
        sent = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            while start + sent * interval <= now:
                task = asyncio.create_task(self.one(start + sent * interval))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
                sent += 1
            await asyncio.sleep(max(0.0, start + sent * interval - time.perf_counter()))
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=10)
        return sent, time.perf_counter() - start

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        for task in self.in_flight:
            task.cancel()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    gen = OpenLoop(args)
    gen.idle = [await gen.connect() for _ in range(args.connections)]
    try:
        if args.warmup:
            await gen.phase(args.rate, args.warmup, record=False)
        sent, elapsed = await gen.phase(args.rate, args.duration, record=True)
    finally:
        gen.close()
    lat = sorted(gen.latency)
    sched = sorted(gen.sched_latency)
    lag = sorted(gen.lag)
    answered = len(lat)
    non_2xx = sum(n for status, n in gen.statuses.items() if not 200 <= status < 300)
    return {
        "rate": args.rate,
        "sent": sent,
        "requests": answered,
        "seconds": elapsed,
        "rps": answered / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(lat, 0.50) * 1000,
        "p90_ms": _percentile(lat, 0.90) * 1000,
        "p99_ms": _percentile(lat, 0.99) * 1000,
        "p999_ms": _percentile(lat, 0.999) * 1000,
        "max_ms": (lat[-1] if lat else float("nan")) * 1000,
        "sched_p50_ms": _percentile(sched, 0.50) * 1000,
        "sched_p99_ms": _percentile(sched, 0.99) * 1000,
        "lag_p99_ms": _percentile(lag, 0.99) * 1000,
        "connections_opened": gen.opened,
        "non_2xx": non_2xx,
        "errors": gen.errors,
        "closed_by_server": gen.closed_by_server,
        "statuses": {str(k): v for k, v in gen.statuses.items()},
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds first")
    parser.add_argument("--connections", type=int, default=16, help="opened before the start")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--token-file", default=None, help="tokens, one per line, in rotation")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run(args))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
