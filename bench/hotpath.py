"""The data path's own Python cost per request, with no sockets: a steady figure to optimise by.

    .venv/bin/python bench/hotpath.py [--requests N] [--connections N] [--rounds N]

The real listener (``HttpServer`` and its ``HttpConnection``s), observer, gate, verifier and
forwarder run on the real event loop (uvloop when installed); only the two kernels are
replaced: each client connection and each pooled upstream connection gets an in-memory
transport whose ``write`` hands the peer's next bytes back through ``loop.call_soon``, as a
socket's readiness would.  What is left is the gateway's per-request Python work and the loop's
callback dispatch, without the ~20 µs of loopback syscalls a real run adds (bench/run.py
measures that).  Rows: passthrough, one warm RS256 token, 5,000 warm RS256 tokens, and a never-seen RS256
token on every request (each used once; ``--cold-requests`` per round), beside PyJWT's
``jwt.decode`` of the same tokens timed in the same process.  Printed:
process CPU µs per request (median of the rounds) and the request rate that cost alone would
allow.  On a shared VM the rounds swing by ±20%; for A/B steps count instructions instead
(deterministic): ``valgrind --tool=cachegrind --cache-sim=no`` on an 8,000- and a 2,000-request
run (``--rounds 1 --only ROW``), their difference over 6,000.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import builds  # noqa: E402

# --build, read before the gateway is imported: the source tree (the default, for A/B counts of
# an edit) or the compiled build the Dockerfile ships (bench/builds.py).
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--build", choices=builds.CHOICES, default=builds.PYTHON)
BUILD_LABEL = builds.use(_pre.parse_known_args()[0].build)[1]

import yaml  # noqa: E402
from aiohttp import web  # noqa: E402
from tokens import AUDIENCE, ISSUER, jwks_document, load_keys, prepare_tokens, read_tokens  # noqa: E402

from gateway.app import GATEWAY_KEY, create_app, http_server  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.documents import FetchedDocument  # noqa: E402
from gateway.service import run_event_loop, tune_garbage_collector  # noqa: E402
from gateway.upstream import UpstreamConnection  # noqa: E402

CONFIG = f"""
listen: {{host: 127.0.0.1, port: 1}}
issuers:
  bench:
    issuer: {ISSUER}
    jwks_uri: http://127.0.0.1:9/jwks.json
    algorithms: [RS256, ES256]
routes:
  - id: public
    match: {{path_prefix: /public}}
    upstream: http://127.0.0.1:9
    auth: none
  - id: api
    match: {{path_prefix: /api}}
    upstream: http://127.0.0.1:9
    auth:
      issuers: [bench]
      audiences: [{AUDIENCE}]
"""

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 09:46:06 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


def request_bytes(path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:18000\r\n{auth}\r\n".encode()


class Fetcher:
    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    async def fetch(self, url: str, **_: Any) -> FetchedDocument:
        return FetchedDocument(self._document, 3600.0)


class Transport:
    """In-memory transport: ``write`` schedules ``on_write`` the way a socket's readiness would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_write: Any) -> None:
        self._loop = loop
        self._on_write = on_write
        self._closing = False

    def write(self, data: bytes) -> None:
        self._loop.call_soon(self._on_write, data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Client:
    """One keep-alive client connection sending its requests one after another."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: Any, requests: list[bytes]):
        self._requests = requests
        self._index = 0
        self.answered = 0
        self.budget = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.conn = server()
        self._loop = loop
        self.conn.connection_made(Transport(loop, self._received))

    def start(self, budget: int) -> None:
        self.budget = budget
        self._send()

    def _send(self) -> None:
        request = self._requests[self._index % len(self._requests)]
        self._index += 1
        self._loop.call_soon(self.conn.data_received, request)

    def _received(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected answer: {data[:200]!r}")
        self.answered += 1
        if self.answered >= self.budget:
            self.done.set_result(None)
        else:
            self._send()


def seed_pool(pool: Any, count: int, loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(count):
        conn = UpstreamConnection(pool)

        def answer(_data: bytes, conn: UpstreamConnection = conn) -> None:
            loop.call_soon(conn.data_received, RESPONSE)

        conn.connection_made(Transport(loop, answer))  # type: ignore[arg-type]
        conn.idle_since = loop.time()
        pool._open += 1
        pool._idle.append(conn)


PASSTHROUGH_ROW = "passthrough (auth: none)"
COLD_ROW = "RS256, every token new"


def _wanted(args: argparse.Namespace, label: str) -> bool:
    return not args.only or args.only in label


async def measure(args: argparse.Namespace) -> None:
    keys = load_keys()
    cold_per_round = min(args.requests, args.cold_requests)
    # Each cold token is used once: the warm-up's and every round's.
    cold_needed = cold_per_round * args.rounds + 20 * args.connections
    sets = prepare_tokens(keys, cold_needed if _wanted(args, COLD_ROW) else 0)
    one = read_tokens(sets.one["RS256"])[0]
    warm = read_tokens(sets.warm["RS256"])
    config = parse_config(yaml.safe_load(CONFIG))
    document = jwks_document(keys)
    app = create_app(config, document_fetcher=lambda _session: Fetcher(document))
    runner = web.AppRunner(app)
    await runner.setup()
    loop = asyncio.get_running_loop()
    gateway = app[GATEWAY_KEY]
    server = http_server(app)
    route = config.routes[0]
    assert route.upstream is not None
    seed_pool(gateway.upstream_pools.pool(route.upstream), args.connections + 4, loop)
    rows = [
        (PASSTHROUGH_ROW, [request_bytes("/public/x", None)]),
        ("RS256, 1 token", [request_bytes("/api/x", one)]),
        ("RS256, 5,000 tokens", [request_bytes("/api/x", t) for t in warm]),
    ]
    cold: list[str] = []
    if _wanted(args, COLD_ROW):
        cold = read_tokens(sets.cold)[:cold_needed]
        rows.append((COLD_ROW, [request_bytes("/api/x", t) for t in cold]))
    medians: dict[str, float] = {}
    tune_garbage_collector()
    print(f"gateway: {BUILD_LABEL}; loop: {type(loop).__module__}; {args.connections} connections, "
          f"{args.requests:,} requests per round, {args.rounds} rounds", flush=True)  # fmt: skip
    for label, requests in rows:
        if not _wanted(args, label):
            continue
        n = args.connections
        share = [requests[i::n] if len(requests) >= n else requests for i in range(n)]
        clients = [Client(loop, server, share[i]) for i in range(n)]
        # Warm-up: keys fetched, every token verified once (cached); a cold row's warm-up
        # uses its first 20 tokens per connection, and each round the next ones.
        per = 20 if label == COLD_ROW else max(len(requests) // args.connections + 1, 20)
        for c in clients:
            c.start(per)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), 60)
        costs = []
        for _ in range(args.rounds):
            for c in clients:
                c.answered = 0
                c.done = loop.create_future()
            per = (cold_per_round if label == COLD_ROW else args.requests) // args.connections
            started = time.process_time()
            for c in clients:
                c.start(per)
            await asyncio.gather(*(c.done for c in clients))
            elapsed = time.process_time() - started
            costs.append(elapsed / (per * args.connections) * 1e6)
        cost = statistics.median(costs)
        medians[label] = cost
        print(f"  {label:28s} {cost:6.1f} µs/request  ({1e6 / cost:,.0f} req/s of Python alone)"
              f"  rounds: {', '.join(f'{c:.1f}' for c in costs)}")  # fmt: skip
    await runner.cleanup()
    if COLD_ROW in medians and PASSTHROUGH_ROW in medians:
        decode = pyjwt_decode_cost(document, cold[:cold_per_round], args.rounds)
        extra = medians[COLD_ROW] - medians[PASSTHROUGH_ROW]
        print(f"  PyJWT jwt.decode RS256 (this process, the same tokens) {decode:.1f} µs; a "
              f"never-seen token's extra over passthrough {extra:.1f} µs = {extra / decode:.2f} "
              "decodes")  # fmt: skip


def pyjwt_decode_cost(document: dict[str, Any], tokens: list[str], rounds: int) -> float:
    """µs of process CPU per ``jwt.decode`` (signature, exp, iss, aud) of each token, median
    of ``rounds``: the yardstick of the cold row, timed beside it."""
    import jwt

    jwk = next(k for k in document["keys"] if k.get("kty") == "RSA")
    key = jwt.PyJWK(jwk, algorithm="RS256")
    costs = []
    for _ in range(rounds):
        started = time.process_time()
        for token in tokens:
            jwt.decode(token, key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
        costs.append((time.process_time() - started) / len(tokens) * 1e6)
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build",
        choices=builds.CHOICES,
        default=builds.PYTHON,
        help="the source tree (default) or the mypyc-compiled build (bench/builds.py)",
    )
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cold-requests", type=int, default=5_000, help="requests per round of the cold row"
    )
    parser.add_argument("--only", help="run only the rows whose label contains this")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the run to FILE")
    args = parser.parse_args()
    if args.profile:
        import cProfile

        with cProfile.Profile() as profile:
            run_event_loop(measure(args))
        profile.dump_stats(args.profile)
    else:
        run_event_loop(measure(args))


if __name__ == "__main__":
    main()
