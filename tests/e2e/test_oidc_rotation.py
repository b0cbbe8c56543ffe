"""End to end against a certified OpenID Connect provider: a signing-key rotation under load, and
a rotation step that coincides with a provider restart.

panva's oidc-provider (pinned in tests/e2e/oidc/package.json) runs as a real Node.js process on
127.0.0.1 and issues RFC 9068 JWT access tokens through the client_credentials grant; the
resource indicator decides the audience.  Its signing keys come from a JWKS file this test
writes; the provider signs with the first key of the file (see tests/e2e/oidc/provider.mjs).
The gateway finds the keys by OpenID discovery from the issuer URL alone.

While fresh tokens flow through the gateway every ~100 ms, the keys rotate in three steps, the
provider restarting at each (its endpoints are briefly down each time):

  (a) publish the new key      JWKS [old, new]   old still signs
  (b) sign with the new key    JWKS [new, old]
  (c) retire the old key       JWKS [new]

Real processes and real time: every wait is short and bounded.  ``pytest -s`` prints the
measured numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from prometheus_client import CollectorRegistry

from gateway import create_app, loads_config
from gateway.app import JWKS_KEY
from gateway.jwks import RETRY_INITIAL_S
from tests.conftest import GatewayTestServer
from tests.e2e.node import installed
from tests.fakes import EchoUpstream
from tests.integration.e2e_helpers import free_port, wait_until

NODE = shutil.which("node")
if NODE is None:
    pytest.skip(
        "node is not on PATH: the OpenID provider of this test is oidc-provider (Node.js)",
        allow_module_level=True,
    )

OIDC_DIR = Path(__file__).parent / "oidc"
CLIENT_ID = "gateway-e2e"
CLIENT_SECRET = "gateway-e2e-secret"
RESOURCE = "https://orders.api.test/"
SCOPE = "orders:read"
ISSUER_ID = "op"

# The gateway's key-cache settings: short, because this runs on real time.
COOLDOWN_S = 1.0  # jwks_refetch_cooldown_s
TTL_S = 2.0  # jwks_cache_ttl_s = jwks_cache_max_ttl_s: the provider's max-age is clamped to it
PROVIDER_MAX_AGE_S = 300  # what the provider's jwks_uri says in Cache-Control
REFRESH_AHEAD_S = 0.5  # jwks_refresh_ahead_s
FETCH_TIMEOUT_S = 1.0  # jwks_fetch_timeout_s

TICK_S = 0.1  # one minted token and one gateway request per tick
STEP_WAIT_S = COOLDOWN_S + 1.0  # between steps: the README's bound (one cooldown) plus margin
SLACK_S = 0.5  # loopback latency, a polling tick and one fetch, on top of a design bound
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
RESTARTS = 3


# --- the provider process --------------------------------------------------------------------
@pytest.fixture(scope="session")
def oidc_dir() -> Path:
    """tests/e2e/oidc with its node_modules installed (``npm ci`` once if they are missing)."""
    return installed(OIDC_DIR, "oidc-provider")


@dataclass(frozen=True)
class Key:
    """An RSA signing key and its private JWK, as the provider's JWKS file carries it."""

    kid: str
    private: rsa.RSAPrivateKey

    def private_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private, as_dict=True)
        # PyJWT marks a private JWK key_ops ["sign"]; the provider would publish that, and a
        # published key whose key_ops lack "verify" is (rightly) unusable for the gateway.
        jwk.pop("key_ops", None)
        # Every key carries the same fields (alg, use): the provider then signs with the
        # FIRST key of the file, so the order of the file chooses the signing key.
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}


def new_key(kid: str) -> Key:
    return Key(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


class OidcProvider:
    """``node provider.mjs`` on one loopback port; restarted on the same port with new keys."""

    def __init__(self, directory: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.workdir = workdir
        self.env = dict(env or {})  # on top of the defaults below (MTLS=1, ...)
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_file = workdir / "jwks.json"
        self.process: asyncio.subprocess.Process | None = None
        self.generation = 0
        self._logs: list[IO[bytes]] = []

    def write_keys(self, *keys: Key) -> None:
        """Replace the JWKS file atomically; a (re)start picks it up."""
        tmp = self.jwks_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": [k.private_jwk() for k in keys]}), encoding="utf-8")
        tmp.replace(self.jwks_file)

    async def start(self) -> float:
        """Start the process; return the monotonic time it printed READY (bounded wait)."""
        assert self.process is None
        self.generation += 1
        out_path = self.workdir / f"provider-{self.generation}.out"
        out = out_path.open("wb")
        err = (self.workdir / f"provider-{self.generation}.err").open("wb")
        self._logs += [out, err]
        env = {
            **os.environ,
            "PORT": str(self.port),
            "JWKS_FILE": str(self.jwks_file),
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "RESOURCE": RESOURCE,
            "SCOPE": SCOPE,
            "JWKS_MAX_AGE": str(PROVIDER_MAX_AGE_S),
            **self.env,
        }
        assert NODE is not None
        self.process = await asyncio.create_subprocess_exec(
            NODE, "provider.mjs", cwd=self.directory, env=env, stdout=out, stderr=err
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"READY" not in out_path.read_bytes():
            if self.process.returncode is not None:
                raise AssertionError(f"provider exited {self.process.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"provider not READY in {READY_TIMEOUT_S:g}s:\n{self.stderr()}"
                )
            await asyncio.sleep(0.01)
        return time.monotonic()

    async def stop(self) -> float:
        """SIGTERM our process by its PID and reap it (bounded); return when it was gone."""
        process, self.process = self.process, None
        if process is None:
            return time.monotonic()
        if process.returncode is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            os.kill(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            raise AssertionError(f"provider ignored SIGTERM for {STOP_TIMEOUT_S:g}s") from None
        return time.monotonic()

    async def restart(self, *keys: Key) -> tuple[float, float]:
        """Down, rewrite the JWKS file, up again on the same port: (stopped_at, ready_at)."""
        self.write_keys(*keys)
        stopped = await self.stop()
        ready = await self.start()
        return stopped, ready

    def stderr(self) -> str:
        path = self.workdir / f"provider-{self.generation}.err"
        return path.read_text(encoding="utf-8", errors="replace")[-2000:] if path.exists() else ""

    def close_logs(self) -> None:
        for log in self._logs:
            log.close()
        self._logs.clear()


@pytest.fixture
async def provider(oidc_dir: Path, tmp_path: Path) -> AsyncIterator[OidcProvider]:
    """The provider object (not started); whatever this test started is stopped at the end."""
    op = OidcProvider(oidc_dir, tmp_path)
    try:
        yield op
    finally:
        await op.stop()
        op.close_logs()


class Minter:
    """Mints access tokens with a real client_credentials POST to the provider's token endpoint."""

    def __init__(self, session: aiohttp.ClientSession, token_endpoint: str) -> None:
        self._session = session
        self._endpoint = token_endpoint

    async def mint(self) -> str:
        async with self._session.post(
            self._endpoint,
            headers={"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)},
            data={"grant_type": "client_credentials", "resource": RESOURCE, "scope": SCOPE},
            timeout=aiohttp.ClientTimeout(total=2),
        ) as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["token_type"] == "Bearer"
            token = body["access_token"]
            assert isinstance(token, str)
            return token


@pytest.fixture
async def token_session() -> AsyncIterator[aiohttp.ClientSession]:
    # No keep-alive: a pooled connection to a provider that just restarted is not a test subject.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


def kid_of(token: str) -> str | None:
    kid = jwt.get_unverified_header(token).get("kid")
    return kid if isinstance(kid, str) else None


# --- the gateway -------------------------------------------------------------------------------
def gateway_config(issuer: str, upstream: EchoUpstream) -> dict[str, Any]:
    return {
        "issuers": {
            ISSUER_ID: {
                "issuer": issuer,  # no jwks_uri: OpenID discovery
                "algorithms": ["RS256"],
                "typ": "at+jwt",  # RFC 9068 access tokens only
                "leeway_s": 5,
                "jwks_cache_ttl_s": TTL_S,
                "jwks_cache_min_ttl_s": COOLDOWN_S,
                "jwks_cache_max_ttl_s": TTL_S,
                "jwks_refetch_cooldown_s": COOLDOWN_S,
                "jwks_fetch_timeout_s": FETCH_TIMEOUT_S,
                "jwks_refresh_ahead_s": REFRESH_AHEAD_S,
                "jwks_max_stale_s": 60,
            }
        },
        "upstream_defaults": {"connect_timeout_s": 1, "timeout_s": 2},
        "routes": [
            {
                "id": "orders",
                "match": {"path_prefix": "/api"},
                "upstream": upstream.url,
                "auth": {
                    "issuers": [ISSUER_ID],
                    "audiences": [RESOURCE],
                    "required_scopes": [SCOPE],
                },
            }
        ],
    }


def jwks_fetches(registry: CollectorRegistry) -> dict[str, float]:
    """gateway_jwks_fetches_total of our issuer, by result."""
    out: dict[str, float] = {}
    for metric in registry.collect():
        if metric.name != "gateway_jwks_fetches":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("issuer") == ISSUER_ID:
                out[sample.labels["result"]] = out.get(sample.labels["result"], 0) + sample.value
    return out


async def call_gateway(client: Any, token: str) -> tuple[int, str | None]:
    """(status, error.reason of a rejection) for GET /api/orders with ``token``."""
    response = await client.get("/api/orders", headers={"Authorization": f"Bearer {token}"})
    if response.status == 200:
        await response.read()
        return 200, None
    body = await response.json()
    return response.status, body.get("error", {}).get("reason")


# --- the traffic -----------------------------------------------------------------------------
@dataclass
class Sample:
    at: float  # monotonic
    fresh: bool  # minted this tick; False: the provider was down, the last token was reused
    kid: str | None
    status: int
    reason: str | None


@dataclass
class Traffic:
    """A steady stream: every tick, mint a token and call the gateway with it."""

    minter: Minter
    client: Any
    samples: list[Sample] = field(default_factory=list)
    mint_failures: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, max_ticks: int) -> None:
        last: str | None = None
        for _ in range(max_ticks):  # bounded even if nobody sets stop
            if self.stop.is_set():
                return
            started = time.monotonic()
            fresh = True
            try:
                token = await self.minter.mint()
                last = token
            except (aiohttp.ClientError, TimeoutError):
                self.mint_failures.append(started)
                fresh = False
                if last is None:
                    await asyncio.sleep(TICK_S)
                    continue
                token = last
            status, reason = await call_gateway(self.client, token)
            self.samples.append(Sample(time.monotonic(), fresh, kid_of(token), status, reason))
            await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - started)))


def probe_token(key: Key, issuer: str) -> str:
    """A token the provider would issue, signed by the test with ``key`` (before it signs with it)."""
    now = int(time.time())
    claims = {
        "jti": secrets.token_urlsafe(16),
        "sub": CLIENT_ID,
        "client_id": CLIENT_ID,
        "iat": now,
        "exp": now + 600,
        "scope": SCOPE,
        "iss": issuer,
        "aud": RESOURCE,
    }
    return jwt.encode(
        claims, key.private, algorithm="RS256", headers={"kid": key.kid, "typ": "at+jwt"}
    )


async def first_accepted(client: Any, make_token: Any, within: float) -> tuple[float, str | None]:
    """Poll the gateway with ``make_token()`` until 200; (monotonic time, last rejection reason)."""
    deadline = time.monotonic() + within
    reason: str | None = None
    while time.monotonic() < deadline:
        status, why = await call_gateway(client, make_token())
        if status == 200:
            return time.monotonic(), reason
        reason = why
        await asyncio.sleep(0.05)
    raise AssertionError(f"not accepted within {within:g}s (last reason {reason})")


async def first_rejected(client: Any, token: str, within: float) -> tuple[float, int, str | None]:
    """Poll the gateway with ``token`` until it is refused; (monotonic time, status, reason)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, reason = await call_gateway(client, token)
        if status != 200:
            return time.monotonic(), status, reason
        await asyncio.sleep(0.05)
    raise AssertionError(f"retired key still accepted after {within:g}s")


@contextlib.asynccontextmanager
async def running(traffic: Traffic, max_ticks: int) -> AsyncIterator[asyncio.Task[None]]:
    """Run the traffic in the background; stop it (bounded) on the way out, even on failure."""
    task = asyncio.create_task(traffic.run(max_ticks))
    try:
        yield task
    finally:
        traffic.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 2 * TICK_S + 5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- the test -------------------------------------------------------------------------------
async def test_key_rotation_at_a_real_openid_provider(
    provider: OidcProvider,
    token_session: aiohttp.ClientSession,
    upstream: EchoUpstream,
    aiohttp_client: Any,
) -> None:
    old, new = new_key("rsa-2024-old"), new_key("rsa-2025-new")
    provider.write_keys(old)
    await provider.start()

    # Discovery and the jwks_uri it names work; the provider's tokens are RFC 9068 JWTs.
    async with token_session.get(f"{provider.issuer}/.well-known/openid-configuration") as r:
        assert r.status == 200
        discovery = await r.json()
    assert discovery["issuer"] == provider.issuer
    assert "client_credentials" in discovery["grant_types_supported"]
    async with token_session.get(discovery["jwks_uri"]) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == f"public, max-age={PROVIDER_MAX_AGE_S}"
        published = await r.json()
    assert [k["kid"] for k in published["keys"]] == [old.kid]
    assert not any("d" in k for k in published["keys"])  # public halves only
    minter = Minter(token_session, discovery["token_endpoint"])
    sample_token = await minter.mint()
    header = jwt.get_unverified_header(sample_token)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == old.kid
    assert header["alg"] == "RS256"
    claims = jwt.decode(
        sample_token,
        RSAAlgorithm.from_jwk(json.dumps(published["keys"][0])),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience=RESOURCE,
        issuer=provider.issuer,
    )
    assert claims["scope"] == SCOPE
    assert claims["client_id"] == CLIENT_ID

    # The gateway, configured with the issuer URL only.
    registry = CollectorRegistry()
    config = loads_config(yaml.safe_dump(gateway_config(provider.issuer, upstream)))
    assert config.issuers[ISSUER_ID].jwks_uri is None
    # Not make_gateway: a real IdP on the real clock, its first fetch timed from here.
    app = create_app(config, registry=registry)
    client = await aiohttp_client(GatewayTestServer(app))
    gateway_started = time.monotonic()
    await asyncio.wait_for(app[JWKS_KEY].settled(), READY_TIMEOUT_S)
    assert app[JWKS_KEY].ready()
    assert app[JWKS_KEY].status()[ISSUER_ID]["source"] == "discovery"
    assert await call_gateway(client, sample_token) == (200, None)

    traffic = Traffic(minter, client)
    outages: list[tuple[float, float]] = []
    async with running(traffic, max_ticks=1000):
        await asyncio.sleep(1.0)  # steady state
        rotation_started = time.monotonic()
        fetches_before = sum(jwks_fetches(registry).values())

        # (a) publish the new key; the old one still signs.
        down, published_at = await provider.restart(old, new)
        outages.append((down, published_at))
        # The first token that needs the new key: signed by the test, as the provider will.
        usable_at, probe_reason = await first_accepted(
            client, lambda: probe_token(new, provider.issuer), within=COOLDOWN_S + 3
        )
        old_token = await minter.mint()  # signed with the OLD key, before retirement
        assert kid_of(old_token) == old.kid
        await asyncio.sleep(max(0.0, published_at + STEP_WAIT_S - time.monotonic()))

        # (b) sign with the new key.
        down, signing_at = await provider.restart(new, old)
        outages.append((down, signing_at))
        assert kid_of(await minter.mint()) == new.kid  # the first key of the file signs
        await asyncio.sleep(max(0.0, signing_at + STEP_WAIT_S - time.monotonic()))

        # (c) retire the old key.
        assert await call_gateway(client, old_token) == (200, None)  # still published
        retired_at, up_again = await provider.restart(new)
        outages.append((retired_at, up_again))
        # How long a retired key may still verify, from gateway/jwks.py: until the first
        # successful fetch after retired_at (when the last process publishing it was gone).
        # - Every set holding it was fetched (the fetch *started*) at or before retired_at, so it
        #   expires by retired_at + TTL (the provider's max-age=300 clamped to
        #   jwks_cache_max_ttl_s); the refresher fetches even earlier (refresh-ahead), and once
        #   the set has expired any request fetches too, unless a failure's backoff holds off.
        # - A fetch that failed during the restart (D seconds down) defers the next one by its
        #   backoff: 1 s (RETRY_INITIAL_S, <= one cooldown here), then 2 s, 4 s... if still
        #   down.  The first retry after the provider is back comes within 2 D + 1 s of
        #   retired_at (backoffs sum to 2^k - 1 < 2 D + 1).
        # - An unknown-kid refetch (at most one per cooldown) only ever replaces the set sooner.
        # Bound: retired_at + max(TTL, 2 D + RETRY_INITIAL_S).  For the usual restart (D ~0.4 s
        # < RETRY_INITIAL_S) that is within retired_at + one cooldown + TTL, and even within the
        # README's "no later than the set's lifetime after its removal" when 2 D + 1 s <= TTL.
        retire_bound = max(TTL_S, 2 * (up_again - retired_at) + RETRY_INITIAL_S)
        rejected_at, status, reason = await first_rejected(
            client, old_token, within=retire_bound + SLACK_S + 3
        )
        await asyncio.sleep(1.0)  # new tokens keep flowing after the retirement
        rotation_ended = time.monotonic()
        fetches = jwks_fetches(registry)
    fetches_total = sum(fetches.values())
    elapsed = rotation_ended - gateway_started

    # --- the numbers -------------------------------------------------------------------------
    fresh = [s for s in traffic.samples if s.fresh]
    reused = [s for s in traffic.samples if not s.fresh]
    in_outage = [s for s in traffic.samples if any(a <= s.at <= b for a, b in outages)]
    first_new = next((s for s in fresh if s.kid == new.kid and s.status == 200), None)
    report = {
        "requests (fresh tokens)": len(fresh),
        "statuses (fresh)": sorted({s.status for s in fresh}),
        "kids seen (fresh)": sorted({s.kid or "-" for s in fresh}),
        "provider outages (s)": [round(b - a, 3) for a, b in outages],
        "mint failures (provider down)": len(traffic.mint_failures),
        "requests while provider down": len(in_outage),
        "statuses while provider down": sorted({s.status for s in in_outage}),
        "requests reusing last token (mint failed)": len(reused),
        "new key unusable after publication (s)": round(usable_at - published_at, 3),
        "probe rejection reason before usable": probe_reason,
        "publish -> first accepted provider-minted new-kid token (s)": (
            round(first_new.at - published_at, 3) if first_new else None
        ),
        "retired key still accepted after retirement (s)": round(rejected_at - retired_at, 3),
        "retired key rejection": (status, reason),
        "retired key bound asserted (s)": round(retire_bound + SLACK_S, 3),
        "JWKS fetches during rotation": fetches_total - fetches_before,
        "JWKS fetches since gateway start": fetches_total,
        "JWKS fetches by result": fetches,
        "JWKS fetch bound asserted": math.floor(elapsed / min(TTL_S, COOLDOWN_S)) + 1 + RESTARTS,
        "unknown-kid misses / refetches suppressed": (
            registry.get_sample_value("gateway_jwks_kid_misses_total", {"issuer": ISSUER_ID}),
            registry.get_sample_value(
                "gateway_jwks_refetch_suppressed_total", {"issuer": ISSUER_ID}
            ),
        ),
        "elapsed since gateway start (s)": round(elapsed, 3),
    }
    print("\n--- oidc-provider key rotation ---")
    for name, value in report.items():
        print(f"{name}: {value}")

    # --- the assertions ----------------------------------------------------------------------
    # No valid, freshly minted token was ever refused, at any step.
    rejected = [s for s in fresh if s.status != 200]
    assert not rejected, rejected
    assert len(fresh) >= 50
    assert {old.kid, new.kid} <= {s.kid for s in fresh}
    # While the provider was down, the cached keys kept verifying (stale-on-error).
    assert reused, "no request ran while the provider was down"
    assert all(s.status == 200 for s in [*reused, *in_outage]), [*reused, *in_outage]

    # A new key is usable no later than one cooldown after the first token that needs it
    # (README, "When keys rotate").  A fetch that failed during the restart does not start the
    # cooldown; its retry (RETRY_INITIAL_S <= one cooldown later) is waited for by a token naming
    # the new kid, when due within jwks_fetch_timeout_s (see the next test).
    assert RETRY_INITIAL_S <= COOLDOWN_S
    assert usable_at - published_at <= COOLDOWN_S + SLACK_S

    # The retired key: refused, for the right reason, within the bound derived above.
    assert status == 401
    assert reason in ("key_not_found", "signature_invalid")
    assert rejected_at - retired_at <= retire_bound + SLACK_S
    if up_again - retired_at < RETRY_INITIAL_S:  # a single failed fetch at most, as usual
        assert rejected_at - retired_at <= COOLDOWN_S + TTL_S + SLACK_S

    # Fetches stay bounded: two fetch starts are at least min(TTL - refresh-ahead, cooldown,
    # first retry backoff) apart (scheduled refresh, unknown-kid refetch, retry after a
    # failure), which here is min(TTL, cooldown); plus the start-up fetch and, as margin, one
    # per restart.
    min_gap = min(TTL_S - REFRESH_AHEAD_S, COOLDOWN_S, RETRY_INITIAL_S)
    assert min_gap == min(TTL_S, COOLDOWN_S)
    bound = math.floor(elapsed / min_gap) + 1 + RESTARTS
    assert fetches_total <= bound, (fetches_total, bound)
    # The provider's max-age=300 was clamped to jwks_cache_max_ttl_s: with no traffic at all
    # and no retry pending (failures == 0), the refresher still fetches within TTL.
    await wait_until(
        lambda: app[JWKS_KEY].status()[ISSUER_ID]["failures"] == 0,
        within=READY_TIMEOUT_S,
        what="the key cache recovered from the restarts",
    )
    successes = jwks_fetches(registry).get("success", 0)
    await asyncio.sleep(TTL_S + SLACK_S)
    assert jwks_fetches(registry).get("success", 0) > successes
    assert rotation_ended - rotation_started < 20


# --- a rotation step during a restart ------------------------------------------------------------
RESTART_FETCH_TIMEOUT_S = 3.0  # jwks_fetch_timeout_s here: the default, covering a slow start
AFTER_RESTART_S = 2.5  # how long new-kid tokens flow after the provider is back (> the retry)


def failed_fetches(registry: CollectorRegistry) -> float:
    return sum(v for k, v in jwks_fetches(registry).items() if k not in ("success", "not_modified"))


async def test_rotation_step_during_a_provider_restart_loses_no_valid_token(
    provider: OidcProvider,
    token_session: aiohttp.ClientSession,
    upstream: EchoUpstream,
    aiohttp_client: Any,
) -> None:
    """The incident: the background refresh fell inside a 0.4 s restart and failed; tokens signed
    with the new (already published) key arrived 0.5 s later and were refused, because the
    failed fetch had started the unknown-kid cooldown.  Here the restart is made to coincide
    with the refresh on purpose: the provider goes down, the gateway's refresh fails, and the
    provider comes back signing with a key the gateway has never fetched."""
    old, new = new_key("rsa-2024-old"), new_key("rsa-2025-new")
    provider.write_keys(old)
    await provider.start()
    async with token_session.get(f"{provider.issuer}/.well-known/openid-configuration") as r:
        discovery = await r.json()
    minter = Minter(token_session, discovery["token_endpoint"])

    registry = CollectorRegistry()
    document = gateway_config(provider.issuer, upstream)
    document["issuers"][ISSUER_ID]["jwks_fetch_timeout_s"] = RESTART_FETCH_TIMEOUT_S
    # Not make_gateway: a real IdP restarted under the gateway, on the real clock.
    app = create_app(loads_config(yaml.safe_dump(document)), registry=registry)
    client = await aiohttp_client(GatewayTestServer(app))
    await asyncio.wait_for(app[JWKS_KEY].settled(), READY_TIMEOUT_S)
    assert await call_gateway(client, await minter.mint()) == (200, None)

    # Down; when it comes back it signs with the new key (first in the file), never fetched yet.
    provider.write_keys(new, old)
    before = failed_fetches(registry)
    down_at = await provider.stop()
    await wait_until(  # the refresh every TTL - refresh-ahead (1.5 s) falls inside the restart
        lambda: failed_fetches(registry) > before,
        within=TTL_S + FETCH_TIMEOUT_S + SLACK_S,
        what="a key fetch failing while the provider is down",
    )
    failed_at = time.monotonic()
    ready_at = await provider.start()

    calls: list[tuple[float, bool, asyncio.Task[tuple[int, str | None]]]] = []
    while time.monotonic() < ready_at + AFTER_RESTART_S:
        token = await minter.mint()
        assert kid_of(token) == new.kid
        pending = app[JWKS_KEY].status()[ISSUER_ID]["failures"] > 0  # a retry is still due
        calls.append((time.monotonic(), pending, asyncio.create_task(call_gateway(client, token))))
        await asyncio.sleep(TICK_S)
    results = [(at, pending, await task) for at, pending, task in calls]

    refused = [(round(at - failed_at, 3), got) for at, _, got in results if got[0] != 200]
    while_pending = sum(pending for _, pending, _ in results)
    report = {
        "provider down (s)": round(ready_at - down_at, 3),
        "failed fetch -> provider ready (s)": round(ready_at - failed_at, 3),
        "valid new-kid tokens sent": len(results),
        "... of which while the retry was pending": while_pending,
        "valid tokens refused": len(refused),
        "JWKS fetches by result": jwks_fetches(registry),
        "unknown-kid misses / refetches suppressed": (
            registry.get_sample_value("gateway_jwks_kid_misses_total", {"issuer": ISSUER_ID}),
            registry.get_sample_value(
                "gateway_jwks_refetch_suppressed_total", {"issuer": ISSUER_ID}
            ),
        ),
    }
    print("\n--- oidc-provider rotation step during a restart ---")
    for name, value in report.items():
        print(f"{name}: {value}")

    assert while_pending >= 1, "no token arrived before the retry: the scenario did not happen"
    assert refused == [], refused
    assert len(results) >= 10
