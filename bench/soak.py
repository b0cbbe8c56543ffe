"""Soak test: the gateway under steady load for N minutes, with key rotation and an IdP outage.

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --minutes 1     # quick check
    options: --clients N  --rps R  --outage-s S  --rotate-s S  --cooldown-s S  --keep-logs

What runs (all on 127.0.0.1):

* the gateway: a real ``python -m gateway run`` subprocess (one process, log level WARNING);
* a test identity provider (an aiohttp app in this script) serving ``/jwks.json`` and a token
  mint ``/token``.  It rotates keys every ``--rotate-s`` (first after a quarter of that):
  publish the new key, sign with it once it has been fetchable for one refetch cooldown (plus
  2 s), retire the old key once it has not signed anything for two token-refresh periods
  (plus 5 s) of uptime.  Every wait counts only time the IdP is reachable, as a real IdP's
  "published" means "could be fetched";
* an upstream (an aiohttp app in this script) answering 200 with the identity it was given;
* ``--clients`` clients sending ``--rps`` requests per second in total, each with a token from
  the mint that it refreshes every 5 s (and keeps using while the mint is unreachable).

In the middle of the run the identity provider is unreachable for ``--outage-s`` (default 60 s,
at most half the run): its listener and connections are closed, then it listens again on the
same port.

Printed at the end: requests, 5xx responses, valid tokens rejected (401/403 for a token whose
key the IdP still publishes and which has not expired), the gateway's resident memory and open
file descriptors at start (after warm-up, under load) and at the end (still under load), from
/proc/<pid>.  Targets: 0 5xx, 0 valid tokens rejected, memory growth under 10 %.  The exit
status is 0 when every target is met, 1 otherwise.

Only the gateway process this script started is signalled, by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://idp.soak.test"
AUDIENCE = "soak-api"
TOKEN_LIFETIME_S = 300
TOKEN_REFRESH_S = 5.0
SIGN_MARGIN_S = 2.0
RETIRE_AFTER_S = 2 * TOKEN_REFRESH_S + 5.0
JWKS_CACHE_TTL_S = 60
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
MEMORY_TARGET = 0.10


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the identity provider ------------------------------------------------------------------------
@dataclass(eq=False)
class Key:
    kid: str
    private: rsa.RSAPrivateKey
    created_at: float
    superseded_at: float | None = None

    @property
    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": "RS256", "use": "sig"}


def new_key(serial: int) -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Key(f"soak-{serial}", private, time.monotonic())


class IdentityProvider:
    """JWKS and a token mint, with rotation timed on reachable time only."""

    def __init__(self, cooldown_s: float) -> None:
        self.cooldown_s = cooldown_s
        self.serial = 0
        self.keys: list[Key] = [self._next_key()]
        self.signing = self.keys[0]
        self.port = 0
        self.up_since: float | None = None
        self.runner: web.AppRunner | None = None
        self.events: list[str] = []
        self.jwks_hits = 0
        self.tokens_minted = 0
        self.started = time.monotonic()

    def _next_key(self) -> Key:
        self.serial += 1
        return new_key(self.serial)

    def make_key(self) -> Key:
        """A new key, not yet published (RSA generation: may run in a thread)."""
        return self._next_key()

    def note(self, event: str) -> None:
        line = f"t={time.monotonic() - self.started:6.1f}s {event}"
        self.events.append(line)
        log(f"idp: {event}")

    def published(self, kid: str) -> bool:
        return any(key.kid == kid for key in self.keys)

    # The HTTP side.
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_post("/token", self._token)
        return app

    async def _jwks(self, _: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response({"keys": [key.jwk for key in self.keys]})

    async def _token(self, request: web.Request) -> web.Response:
        sub = request.query.get("sub", "client")
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now,
                  "exp": now + TOKEN_LIFETIME_S}  # fmt: skip
        token = jwt.encode(
            claims, self.signing.private, algorithm="RS256", headers={"kid": self.signing.kid}
        )
        self.tokens_minted += 1
        return web.json_response(
            {"access_token": token, "kid": self.signing.kid, "exp": claims["exp"]}
        )

    async def listen(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        for attempt in range(50):  # the port is ours; a just-closed socket may linger briefly
            try:
                await site.start()
                break
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        self.port = runner.addresses[0][1]
        self.runner = runner
        self.up_since = time.monotonic()

    async def go_down(self) -> None:
        """Stop listening and close every connection: fetches are refused."""
        self.up_since = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # Rotation.
    def _reachable_since(self, moment: float) -> float | None:
        """Seconds the IdP has been reachable continuously since ``moment`` (None: it is down)."""
        if self.up_since is None:
            return None
        return time.monotonic() - max(moment, self.up_since)

    def publish(self, key: Key) -> None:
        self.keys.append(key)
        self.note(f"published {key.kid}" + ("" if self.up_since else " (while unreachable)"))

    def tick(self) -> None:
        """Switch signing to the newest key fetchable for a cooldown; retire superseded keys."""
        ready = [
            key
            for key in self.keys
            if (age := self._reachable_since(key.created_at)) is not None
            and age >= self.cooldown_s + SIGN_MARGIN_S
        ]
        newest = max(ready, key=lambda k: k.created_at, default=None)
        if newest is not None and newest.created_at > self.signing.created_at:
            now = time.monotonic()
            for key in self.keys:
                if key.created_at < newest.created_at and key.superseded_at is None:
                    key.superseded_at = now
            self.signing = newest
            self.note(f"signing with {newest.kid}")
        for key in list(self.keys):
            if key.superseded_at is None:
                continue
            idle = self._reachable_since(key.superseded_at)
            if idle is not None and idle >= RETIRE_AFTER_S:
                self.keys.remove(key)
                self.note(f"retired {key.kid}")


async def rotation_loop(idp: IdentityProvider, first_s: float, every_s: float) -> None:
    next_at = time.monotonic() + first_s
    while True:
        if time.monotonic() >= next_at:
            idp.publish(await asyncio.to_thread(idp.make_key))  # RSA generation off the loop
            next_at += every_s
        idp.tick()
        await asyncio.sleep(0.25)


async def outage(idp: IdentityProvider, start_s: float, length_s: float) -> None:
    await asyncio.sleep(start_s)
    await idp.go_down()
    idp.note(f"unreachable for {length_s:.0f} s")
    await asyncio.sleep(length_s)
    await idp.listen()
    idp.note("reachable again")


# --- the upstream ---------------------------------------------------------------------------------
async def start_upstream() -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"sub": request.headers.get("X-User-Sub"), "bytes": len(body)},
            headers={"Cache-Control": "no-store"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


# --- load ---------------------------------------------------------------------------------------
@dataclass
class Token:
    value: str
    kid: str
    exp: float
    fetched_at: float


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    server_errors: int = 0
    valid_rejected: int = 0
    retired_rejected: int = 0
    identity_mismatch: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    five_xx_reasons: Counter[str] = field(default_factory=Counter)
    client_errors: Counter[str] = field(default_factory=Counter)
    mint_failures: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def mint(session: aiohttp.ClientSession, idp: IdentityProvider, sub: str) -> Token:
    async with session.post(
        f"http://127.0.0.1:{idp.port}/token",
        params={"sub": sub},
        timeout=aiohttp.ClientTimeout(total=2),
    ) as response:
        response.raise_for_status()
        body = await response.json()
    return Token(body["access_token"], body["kid"], float(body["exp"]), time.monotonic())


async def client(
    index: int,
    gateway_port: int,
    idp: IdentityProvider,
    interval_s: float,
    offset_s: float,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    sub = f"client-{index}"
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as minting,
    ):
        token: Token | None = None
        while token is None and not stop.is_set():
            try:
                token = await mint(minting, idp, sub)
            except (aiohttp.ClientError, TimeoutError):
                tally.mint_failures += 1
                await asyncio.sleep(0.5)
        next_at = time.monotonic() + offset_s  # clients spread over one interval
        count = 0
        while not stop.is_set() and token is not None:
            now = time.monotonic()
            if now - token.fetched_at >= TOKEN_REFRESH_S:
                try:
                    token = await mint(minting, idp, sub)
                except (aiohttp.ClientError, TimeoutError):
                    tally.mint_failures += 1  # keep the current, still valid token
                    token.fetched_at = now  # and try again one refresh period later
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            count += 1
            # The token is valid if its key is still published and it has not expired.
            valid = idp.published(token.kid) and token.exp > time.time() + 1
            headers = {"Authorization": f"Bearer {token.value}"}
            started = time.perf_counter()
            try:
                if count % 10 == 0:
                    request = session.post(
                        f"http://127.0.0.1:{gateway_port}/api/orders",
                        data=os.urandom(4096),
                        headers=headers,
                        timeout=timeout,
                    )
                else:
                    request = session.get(
                        f"http://127.0.0.1:{gateway_port}/api/orders/{count}",
                        headers=headers,
                        timeout=timeout,
                    )
                async with request as response:
                    body = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.requests += 1
                tally.client_errors[type(exc).__name__] += 1
                continue
            tally.requests += 1
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
            tally.statuses[status] += 1
            if status == 200:
                tally.ok += 1
                if json.loads(body).get("sub") != sub:
                    tally.identity_mismatch += 1
            elif status >= 500:
                tally.server_errors += 1
                tally.five_xx_reasons[_reason(body)] += 1
            elif status in (401, 403):
                if valid:
                    tally.valid_rejected += 1
                else:
                    tally.retired_rejected += 1


def _reason(body: bytes) -> str:
    try:
        reason = json.loads(body)["error"]["reason"]
    except (ValueError, KeyError, TypeError):
        return "not-a-gateway-error"
    return str(reason)


# --- the gateway process ----------------------------------------------------------------------------
def proc_status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    at_s: float
    rss_kib: int
    fds: int


def sample(pid: int, started: float) -> Sample:
    return Sample(time.monotonic() - started, proc_status_kib(pid, "VmRSS"), open_fds(pid))


def gateway_config(port: int, admin_port: int, idp_port: int, upstream_port: int,
                   cooldown_s: float) -> dict[str, Any]:  # fmt: skip
    return {
        "listen": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 5},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "issuers": {
            "soak": {
                "issuer": ISSUER,
                "jwks_uri": f"http://127.0.0.1:{idp_port}/jwks.json",
                "algorithms": ["RS256"],
                "jwks_cache_ttl_s": JWKS_CACHE_TTL_S,
                "jwks_refetch_cooldown_s": cooldown_s,
                "jwks_fetch_timeout_s": 2,
            }
        },
        "routes": [
            {
                "id": "api",
                "match": {"path_prefix": "/api"},
                "upstream": f"http://127.0.0.1:{upstream_port}",
                "auth": {"issuers": ["soak"], "audiences": [AUDIENCE], "required_claims": ["sub"]},
                "claim_headers": {"X-User-Sub": "sub"},
            }
        ],
    }


async def wait_ready(process: asyncio.subprocess.Process, admin_port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"the gateway exited with {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    f"http://127.0.0.1:{admin_port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
                ) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the gateway was not ready within {READY_TIMEOUT_S:.0f} s")


async def stop_gateway(process: asyncio.subprocess.Process) -> int | None:
    """SIGTERM the gateway we started (by PID), then SIGKILL it if it does not stop in time."""
    if process.returncode is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        log(f"gateway pid {process.pid} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s: SIGKILL")
        process.kill()
        return await process.wait()


async def scrape(admin_port: int) -> dict[str, float]:
    """Counters from the gateway's /metrics: fetch results and request reasons."""
    wanted = re.compile(r"^(gateway_jwks_fetches_total|gateway_requests_total)\{([^}]*)\} (\S+)$")
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{admin_port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as response,
        ):
            text = await response.text()
        for line in text.splitlines():
            match = wanted.match(line)
            if match is None:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            key = (
                f"jwks_fetch[{labels.get('result')}]"
                if match.group(1) == "gateway_jwks_fetches_total"
                else f"requests[{labels.get('reason')}]"
            )
            out[key] = out.get(key, 0.0) + float(match.group(3))
    return out


# --- the run ------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace) -> int:
    duration = args.minutes * 60.0
    outage_s = min(args.outage_s, duration / 2)
    outage_start = (duration - outage_s) / 2
    warmup_s = max(10.0, duration * 0.05)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    log_path = workdir / "gateway.log"

    idp = IdentityProvider(args.cooldown_s)
    await idp.listen()
    upstream_runner, upstream_port = await start_upstream()
    port, admin_port = free_port(), free_port()
    config_path = workdir / "gateway.yaml"
    config_path.write_text(
        yaml.safe_dump(gateway_config(port, admin_port, idp.port, upstream_port, args.cooldown_s))
    )
    log(f"{args.minutes:g} min, {args.clients} clients at {args.rps:g} req/s in total; IdP "
        f"outage {outage_s:.0f} s from t={outage_start:.0f} s; rotation every {args.rotate_s:g} s; "
        f"work dir {workdir}")  # fmt: skip

    log_file = log_path.open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--log-level", "WARNING", "run", "--config",
        str(config_path), cwd=ROOT, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in this terminal reaches only this script
    )  # fmt: skip
    log(f"gateway pid {process.pid}")
    tally = Tally()
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    samples: list[Sample] = []
    code = 1
    try:
        await wait_ready(process, admin_port)
        started = time.monotonic()
        idle = sample(process.pid, started)
        log(f"gateway ready: RSS {idle.rss_kib / 1024:.1f} MiB, {idle.fds} fds (before load)")
        background.append(asyncio.create_task(
            rotation_loop(idp, args.rotate_s / 4, args.rotate_s)))  # fmt: skip
        background.append(asyncio.create_task(outage(idp, outage_start, outage_s)))
        interval = args.clients / args.rps
        clients = [
            asyncio.create_task(
                client(i, port, idp, interval, interval * i / args.clients, stop, tally)
            )
            for i in range(args.clients)
        ]
        await asyncio.sleep(warmup_s)
        start = sample(process.pid, started)
        samples.append(start)
        log(f"start (after {warmup_s:.0f} s warm-up): RSS {start.rss_kib / 1024:.1f} MiB, "
            f"{start.fds} fds, {tally.requests} requests so far")  # fmt: skip
        step = max(10.0, duration / 20)
        while time.monotonic() - started < duration:
            await asyncio.sleep(min(step, duration - (time.monotonic() - started)))
            if process.returncode is not None:
                raise RuntimeError(f"the gateway exited with {process.returncode}")
            samples.append(sample(process.pid, started))
            log(f"t={samples[-1].at_s:5.0f}s requests={tally.requests} 5xx={tally.server_errors} "
                f"valid_rejected={tally.valid_rejected} "
                f"rss={samples[-1].rss_kib / 1024:.1f}MiB fds={samples[-1].fds}")  # fmt: skip
        end = samples[-1]
        metrics = await scrape(admin_port)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)

        growth = (end.rss_kib - start.rss_kib) / start.rss_kib
        latencies = sorted(tally.latencies_ms)
        p50 = statistics.median(latencies) if latencies else 0.0
        p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
        print()
        print("=== soak results ===")
        print(f"duration                  {duration / 60:g} min ({args.clients} clients, "
              f"{args.rps:g} req/s target)")  # fmt: skip
        print(f"requests                  {tally.requests} ({tally.ok} x 200; "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms)")  # fmt: skip
        print(f"5xx                       {tally.server_errors} {dict(tally.five_xx_reasons)}")
        print(f"valid tokens rejected     {tally.valid_rejected}")
        print(f"statuses                  {dict(sorted(tally.statuses.items()))}")
        print(f"client errors             {dict(tally.client_errors) or 0}")
        print(f"identity mismatches       {tally.identity_mismatch}")
        print(f"retired-key rejections    {tally.retired_rejected} (not counted as valid)")
        print(f"gateway RSS               before load {idle.rss_kib / 1024:.1f} MiB; "
              f"start {start.rss_kib / 1024:.1f} MiB -> end {end.rss_kib / 1024:.1f} MiB "
              f"({growth:+.1%})")  # fmt: skip
        print(f"gateway RSS min/max       {min(s.rss_kib for s in samples) / 1024:.1f} / "
              f"{max(s.rss_kib for s in samples) / 1024:.1f} MiB over {len(samples)} samples")  # fmt: skip
        print(f"gateway open fds          before load {idle.fds}; start {start.fds} -> "
              f"end {end.fds}")  # fmt: skip
        print(f"IdP                       {idp.jwks_hits} JWKS fetches served, "
              f"{idp.tokens_minted} tokens minted, {tally.mint_failures} mint failures "
              f"(clients kept their tokens)")  # fmt: skip
        print(f"gateway counters          {({k: v for k, v in metrics.items() if v}) or 'n/a'}")
        print("IdP events:")
        for event in idp.events:
            print(f"  {event}")
        met = tally.server_errors == 0 and tally.valid_rejected == 0 and growth < MEMORY_TARGET
        print(f"targets (0 5xx, 0 valid rejected, RSS growth < {MEMORY_TARGET:.0%}): "
              f"{'MET' if met else 'MISSED'}")  # fmt: skip
        code = 0 if met else 1
    finally:
        stop.set()
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        status = await stop_gateway(process)
        log_file.close()
        log(f"gateway pid {process.pid} stopped with status {status}")
        await idp.go_down()
        await upstream_runner.cleanup()
        if not args.keep_logs and code == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"gateway log kept: {log_path}")
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            if tail:
                print("gateway log (last lines):")
                for line in tail:
                    print(f"  {line}")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rps", type=float, default=200.0, help="requests per second, in total")
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--rotate-s", type=float, default=60.0)
    parser.add_argument("--cooldown-s", type=float, default=10.0,
                        help="the gateway's jwks_refetch_cooldown_s, which the IdP honours")  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients < 1 or args.rps <= 0:
        parser.error("--minutes, --clients and --rps must be positive")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
