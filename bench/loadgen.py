"""A small closed-loop HTTP/1.1 load generator (asyncio, keep-alive, N connections).

Used when ``wrk`` is missing, and for the memory phase (an exact number of distinct tokens).
Prints one JSON object: requests, seconds, rps, p50_ms, p99_ms, non_2xx, errors, statuses.

    python bench/loadgen.py --host 127.0.0.1 --port 8080 --path /api/x --connections 32 \
        --duration 10 [--tokens FILE --offset 0] [--count N] [--header 'Name: value']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from typing import Any


class Shared:
    def __init__(self, tokens: list[str], offset: int, count: int | None, deadline: float) -> None:
        self.tokens = tokens
        self.next = offset
        self.issued = 0
        self.count = count
        self.deadline = deadline
        self.latencies = array("d")
        self.statuses: Counter[int] = Counter()
        self.errors = 0

    def take(self) -> int | None:
        """The index of the next token to send, or None when the run is over."""
        if self.count is not None and self.issued >= self.count:
            return None
        if time.perf_counter() >= self.deadline:
            return None
        index = self.next
        self.next += 1
        self.issued += 1
        return index


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value.strip())
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _connection(
    host: str, port: int, path: str, static_headers: bytes, shared: Shared
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    base = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode() + static_headers
    tokens = shared.tokens
    try:
        while True:
            index = shared.take()
            if index is None:
                return
            if tokens:
                auth = b"Authorization: Bearer " + tokens[index % len(tokens)].encode() + b"\r\n"
            else:
                auth = b""
            started = time.perf_counter()
            writer.write(base + auth + b"\r\n")
            try:
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                shared.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            shared.latencies.append(time.perf_counter() - started)
            shared.statuses[status] += 1
    finally:
        writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def run(args: argparse.Namespace, tokens: list[str]) -> dict[str, Any]:
    headers = b"".join(h.encode() + b"\r\n" for h in args.header)
    started = time.perf_counter()
    deadline = started + args.duration if args.duration else float("inf")
    shared = Shared(tokens, args.offset, args.count, deadline)
    await asyncio.gather(
        *(
            _connection(args.host, args.port, args.path, headers, shared)
            for _ in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - started
    done = len(shared.latencies)
    lat = sorted(shared.latencies)
    non_2xx = sum(n for status, n in shared.statuses.items() if not 200 <= status < 300)
    return {
        "requests": done,
        "seconds": elapsed,
        "rps": done / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(lat, 0.50) * 1000,
        "p99_ms": _percentile(lat, 0.99) * 1000,
        "non_2xx": non_2xx,
        "errors": shared.errors,
        "statuses": {str(k): v for k, v in shared.statuses.items()},
        "next_offset": shared.next,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: until --count)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--tokens", default=None, help="file of tokens, one a line, round-robin")
    parser.add_argument("--offset", type=int, default=0, help="first token index")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args()
    if not args.duration and args.count is None:
        parser.error("give --duration or --count")
    tokens: list[str] = []
    if args.tokens:
        with open(args.tokens) as fh:
            tokens = [line.strip() for line in fh if line.strip()]
    result = asyncio.run(run(args, tokens))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
