"""The per-issuer key cache against a real fake IdP on loopback (which keys of a set are usable:
``test_keyset.py``).

Time that the cache reasons about (TTL, cooldown, backoff, refresh schedule) is moved with
``FakeClock.advance``; the only real waiting is for loopback I/O, bounded by ``eventually``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from jwt import PyJWK
from prometheus_client import CollectorRegistry

from gateway.config import AuthPolicy, IssuerConfig
from gateway.documents import HttpDocumentFetcher
from gateway.errors import Rejection
from gateway.jwks import RETRY_INITIAL_S, JwksCache, discovery_uri
from gateway.metrics import GatewayMetrics
from gateway.reasons import Reason
from gateway.token_cache import TokenCache
from gateway.verifier import Verifier
from tests.conftest import ALL_ALGORITHMS, ISSUER
from tests.fakes import FakeClock, FakeIdP, SigningKey, generate_key, make_token

TTL = 300.0
COOLDOWN = 30.0
AHEAD = 30.0


def make_issuer(jwks_uri: str, **overrides: Any) -> IssuerConfig:
    base = IssuerConfig(
        id="test",
        issuer=ISSUER,
        jwks_uri=jwks_uri,
        algorithms=frozenset(ALL_ALGORITHMS),
        jwks_cache_ttl_s=TTL,
        jwks_refetch_cooldown_s=COOLDOWN,
        jwks_fetch_timeout_s=0.5,
        jwks_refresh_ahead_s=AHEAD,
    )
    return dataclasses.replace(base, **overrides)


def verifies(key: PyJWK, signer: SigningKey) -> bool:
    """Whether ``key`` is the public half of ``signer`` (a token it signs verifies)."""
    token = jwt.encode({"x": 1}, signer.private, algorithm=signer.alg)
    try:
        jwt.decode(token, key, algorithms=[signer.alg])
    except jwt.InvalidSignatureError:
        return False
    return True


async def eventually(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Poll ``predicate`` while loopback I/O completes; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate()


async def settle() -> None:
    """Let ready tasks run without letting real time matter.

    Called after ``settled()`` and before ``clock.advance``: ``FakeClock.sleep`` takes its
    deadline when the sleeping task first runs, so the refresher must be parked first.
    """
    for _ in range(20):
        await asyncio.sleep(0)


@dataclasses.dataclass
class Harness:
    cache: JwksCache
    issuer: IssuerConfig
    registry: CollectorRegistry
    clock: FakeClock
    idp: FakeIdP

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, {"issuer": "test", **labels})
        assert value is not None, (name, labels)
        return value

    def fetches(self, result: str) -> float:
        return self.metric("gateway_jwks_fetches_total", result=result)

    @property
    def suppressed(self) -> float:
        return self.metric("gateway_jwks_refetch_suppressed_total")

    @property
    def misses(self) -> float:
        return self.metric("gateway_jwks_kid_misses_total")

    @property
    def ready_gauge(self) -> float | None:
        return self.registry.get_sample_value("gateway_ready")

    @property
    def state(self) -> dict[str, Any]:
        """The /readyz view of the issuer: keys, ready, stale, failures."""
        status = self.cache.status()["test"]
        return {k: status[k] for k in ("keys", "ready", "stale", "failures")}

    async def key(self, kid: str | None, alg: str = "RS256") -> PyJWK:
        return await self.cache.get_key(self.issuer, kid, alg)

    async def reject(self, kid: str | None, alg: str = "RS256") -> Reason:
        with pytest.raises(Rejection) as caught:
            await self.cache.get_key(self.issuer, kid, alg)
        return caught.value.reason


MakeCache = Callable[..., Harness]


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_cache(
    idp: FakeIdP, http_session: aiohttp.ClientSession, clock: FakeClock
) -> AsyncIterator[MakeCache]:
    caches: list[JwksCache] = []

    def make(
        jwks_uri: str | None = None,
        *,
        discovery: bool = False,
        multiprocess: bool = False,
        **overrides: Any,
    ) -> Harness:
        issuer = make_issuer(jwks_uri or idp.jwks_uri, **overrides)
        if discovery:  # no jwks_uri: found through the IdP's discovery document
            issuer = dataclasses.replace(issuer, issuer=idp.issuer, jwks_uri=None)
        registry = CollectorRegistry()
        # multiprocess: as in a --workers child, the cache's ticker publishes the key gauges.
        metrics = GatewayMetrics(registry, (), [issuer.id], multiprocess=multiprocess)
        fetcher = HttpDocumentFetcher(http_session, clock)
        cache = JwksCache({issuer.id: issuer}, fetcher, metrics, clock)
        caches.append(cache)
        return Harness(cache, issuer, registry, clock, idp)

    yield make
    for cache in caches:
        await cache.close()


@pytest.fixture
def rs(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["RS256"]


# --- fetching and TTL ----------------------------------------------------------------------
async def test_first_get_key_fetches_once_and_serves_every_published_key(
    make_cache: MakeCache, idp: FakeIdP, signing_keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    h = make_cache()
    for signer in signing_keys.values():
        key = await h.key(signer.kid, signer.alg)
        assert verifies(key, signer)
    assert idp.hits == 1
    assert h.fetches("success") == 1
    assert h.metric("gateway_jwks_keys") == len(signing_keys)
    assert h.metric("gateway_jwks_last_success_timestamp_seconds") == clock.time()
    assert h.cache.ready()
    assert h.state == {"keys": len(signing_keys), "ready": True, "stale": False, "failures": 0}
    assert h.cache.status()["test"]["source"] == "jwks_uri"


async def test_ttl_expiry_refetches(make_cache: MakeCache, idp: FakeIdP, clock: FakeClock) -> None:
    h = make_cache()
    await h.key("key-rs256")
    clock.advance(TTL - 1)
    await h.key("key-rs256")
    assert idp.hits == 1
    clock.advance(1)  # exactly ttl: stale, served at once; the refetch runs in the background
    await h.key("key-rs256")
    await eventually(lambda: h.fetches("success") == 2)
    await h.key("key-rs256")
    assert idp.hits == 2


async def test_rotated_key_is_found_after_ttl(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache()
    await h.key(rs.kid)
    rotated = generate_key("ES256", "rotated")
    idp.publish(rotated)
    clock.advance(TTL)
    assert verifies(await h.key("rotated", "ES256"), rotated)
    # The old key left the published set, so it left the cache too.
    clock.advance(COOLDOWN)
    assert await h.reject(rs.kid) is Reason.KEY_NOT_FOUND


# --- unknown kids and the refetch cooldown ----------------------------------------------------------
async def test_unknown_kid_refetches_once_per_cooldown(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, signing_keys: dict[str, SigningKey]
) -> None:
    h = make_cache()
    await h.key("key-rs256")
    assert idp.hits == 1

    # The cooldown counts from the last fetch of any kind: the first fetch just happened.
    assert await h.reject("unknown-0") is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.misses, h.suppressed) == (1, 1, 1)

    clock.advance(COOLDOWN + 1)
    assert await h.reject("unknown-1") is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.misses, h.suppressed) == (2, 2, 1)

    assert await h.reject("unknown-2") is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.misses, h.suppressed) == (2, 3, 2)

    # A key published now is not seen until the cooldown has passed ...
    new = generate_key("ES256", "new")
    idp.publish(*signing_keys.values(), new)
    clock.advance(COOLDOWN - 1)
    assert await h.reject("new", "ES256") is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.suppressed) == (2, 3)

    # ... and then it is, with a single fetch.
    clock.advance(1)
    assert verifies(await h.key("new", "ES256"), new)
    assert idp.hits == 3
    assert h.fetches("success") == 3


async def test_known_kid_with_other_alg_is_not_a_miss(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    h = make_cache()
    await h.key("key-rs256", "RS256")
    clock.advance(COOLDOWN + 1)  # a refetch would be allowed; it must not happen
    assert await h.reject("key-rs256", "PS256") is Reason.ALGORITHM_NOT_ALLOWED
    assert await h.reject("key-es256", "ES384") is Reason.ALGORITHM_NOT_ALLOWED
    assert idp.hits == 1
    assert (h.misses, h.suppressed) == (0, 0)


async def test_fifty_concurrent_unknown_kids_on_a_warm_cache_fetch_once(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    h = make_cache()
    await h.key("key-rs256")
    clock.advance(COOLDOWN + 1)
    results = await asyncio.gather(
        *(h.cache.get_key(h.issuer, f"unknown-{i}", "RS256") for i in range(50)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Rejection) and r.reason is Reason.KEY_NOT_FOUND for r in results)
    assert idp.hits == 2
    assert h.misses == 50


async def test_fifty_concurrent_unknown_kids_on_a_cold_cache_fetch_once(
    make_cache: MakeCache, idp: FakeIdP
) -> None:
    h = make_cache()
    results = await asyncio.gather(
        *(h.cache.get_key(h.issuer, f"unknown-{i}", "RS256") for i in range(50)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Rejection) and r.reason is Reason.KEY_NOT_FOUND for r in results)
    assert idp.hits == 1
    assert h.suppressed == 50


async def test_fifty_concurrent_first_requests_share_one_fetch(
    make_cache: MakeCache, idp: FakeIdP, rs: SigningKey
) -> None:
    h = make_cache()
    keys = await asyncio.gather(*(h.key(rs.kid) for _ in range(50)))
    assert idp.hits == 1
    assert all(k is keys[0] for k in keys)
    assert verifies(keys[0], rs)


# --- failures: stale keys, unavailability, backoff -------------------------------------------------
FAILURES = [
    pytest.param("error", "http_error", id="http-500"),
    pytest.param("garbage", "invalid", id="not-json"),
    pytest.param("empty", "invalid", id="no-keys"),
    pytest.param("huge", "invalid", id="over-size-limit"),
    pytest.param("hang", "timeout", id="hang"),
]


@pytest.mark.parametrize(("mode", "result"), FAILURES)
async def test_failed_refresh_keeps_serving_the_last_good_set(
    mode: str, result: str, make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_fetch_timeout_s=0.2)
    first = await h.key(rs.kid)
    idp.mode = mode
    clock.advance(TTL)
    assert await h.key(rs.kid) is first
    await eventually(lambda: h.fetches(result) == 1)
    assert idp.hits == 2
    assert h.fetches("success") == 1
    assert h.cache.ready()
    assert h.state == {"keys": 10, "ready": True, "stale": True, "failures": 1}
    assert h.metric("gateway_jwks_stale") == 1
    # Backoff: the very next request does not go back to the failing IdP.
    assert await h.key(rs.kid) is first
    assert idp.hits == 2


@pytest.mark.parametrize(("mode", "result"), FAILURES)
async def test_no_key_set_at_all_is_jwks_unavailable(
    mode: str, result: str, make_cache: MakeCache, idp: FakeIdP, rs: SigningKey
) -> None:
    idp.mode = mode
    h = make_cache(jwks_fetch_timeout_s=0.2)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    await eventually(lambda: h.fetches(result) == 1)
    assert not h.cache.ready()
    assert h.state == {"keys": 0, "ready": False, "stale": False, "failures": 1}


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_idp_is_counted_as_unreachable(
    make_cache: MakeCache, rs: SigningKey
) -> None:
    h = make_cache(jwks_uri=f"http://127.0.0.1:{_closed_port()}/jwks.json")
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert h.fetches("unreachable") == 1


async def test_redirects_are_not_followed(
    make_cache: MakeCache, aiohttp_server: Any, idp: FakeIdP, rs: SigningKey
) -> None:
    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound(idp.jwks_uri)

    app = web.Application()
    app.router.add_get("/jwks.json", redirect)
    server = await aiohttp_server(app)
    h = make_cache(jwks_uri=str(server.make_url("/jwks.json")))
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert h.fetches("http_error") == 1
    assert idp.hits == 0


async def test_issuer_size_limit_applies(
    make_cache: MakeCache, idp: FakeIdP, rs: SigningKey
) -> None:
    h = make_cache(jwks_max_bytes=1024)  # the ten published keys are several KB
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert h.fetches("invalid") == 1
    assert idp.hits == 1


async def test_failed_fetches_back_off_exponentially(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    idp.mode = "error"
    h = make_cache()
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert idp.hits == 1

    # Retries wait 1 s after the first failure ...
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    clock.advance(0.5)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert idp.hits == 1
    clock.advance(0.5)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert idp.hits == 2

    # ... then 2 s ...
    clock.advance(1)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert idp.hits == 2
    clock.advance(1)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert idp.hits == 3
    assert h.fetches("http_error") == 3
    assert h.state["failures"] == 3

    # ... then 4 s; once the IdP recovers the next allowed fetch succeeds and resets the count.
    idp.mode = "ok"
    clock.advance(3)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert idp.hits == 3
    clock.advance(1)
    assert verifies(await h.key(rs.kid), rs)
    assert idp.hits == 4
    assert h.state == {"keys": 10, "ready": True, "stale": False, "failures": 0}


async def test_stale_keys_are_served_no_longer_than_max_stale(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_max_stale_s=600)
    await h.key(rs.kid)
    idp.mode = "error"
    clock.advance(TTL + 599)
    assert verifies(await h.key(rs.kid), rs)
    assert h.cache.ready()
    clock.advance(1)
    # A key that may have been retired for compromise is not trusted forever.
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert not h.cache.ready()
    assert h.state["keys"] == 0
    assert h.metric("gateway_jwks_keys") == 0


@pytest.mark.parametrize(
    ("cache_control", "lifetime"),
    [
        pytest.param("max-age=120", 120, id="max-age"),
        pytest.param("public, s-maxage=90, max-age=120", 90, id="s-maxage-wins"),
        pytest.param("max-age=5", 60, id="clamped-to-min"),
        pytest.param("no-store", 60, id="no-store-clamped-to-min"),
        pytest.param("max-age=999999", 3600, id="clamped-to-max"),
    ],
)
async def test_response_lifetime_sets_the_ttl_within_bounds(
    cache_control: str,
    lifetime: int,
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
) -> None:
    idp.headers = {"Cache-Control": cache_control}
    h = make_cache(jwks_cache_min_ttl_s=60, jwks_cache_max_ttl_s=3600)
    await h.key(rs.kid)
    clock.advance(lifetime - 1)
    await h.key(rs.kid)
    assert idp.hits == 1
    clock.advance(1)
    await h.key(rs.kid)
    await eventually(lambda: idp.hits == 2)


async def test_key_gauges_exist_before_any_fetch(make_cache: MakeCache) -> None:
    h = make_cache()
    assert h.metric("gateway_jwks_keys") == 0
    assert h.metric("gateway_jwks_stale") == 0
    assert h.metric("gateway_jwks_age_seconds") == float("inf")  # no set yet: an alert fires
    await h.key("key-rs256")
    assert h.metric("gateway_jwks_keys") == 10


@pytest.mark.parametrize(("mode", "result"), FAILURES[:1])
async def test_key_set_age_grows_while_refreshes_fail_and_resets_on_success(
    mode: str, result: str, make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_fetch_timeout_s=0.2)
    await h.key(rs.kid)
    assert h.metric("gateway_jwks_age_seconds") == 0
    clock.advance(TTL / 2)
    assert h.metric("gateway_jwks_age_seconds") == TTL / 2
    idp.mode = mode
    clock.advance(TTL / 2)
    await h.key(rs.kid)  # past the lifetime: a refresh, which fails
    await eventually(lambda: h.fetches(result) == 1)
    clock.advance(5)
    assert h.metric("gateway_jwks_age_seconds") == TTL + 5  # counted from the last success
    idp.mode = "ok"
    clock.advance(3600)  # past any backoff
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("success") == 2)
    assert h.metric("gateway_jwks_age_seconds") == 0


# --- where the keys come from: discovery, static sets ------------------------------------------------
async def test_discovery_finds_the_jwks_uri(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(discovery=True)
    assert verifies(await h.key(rs.kid), rs)
    assert (idp.discovery_hits, idp.hits) == (1, 1)
    assert h.cache.status()["test"]["source"] == "discovery"
    # The discovery answer is cached like a key set: an unknown-kid refetch does not repeat it.
    clock.advance(COOLDOWN)
    assert await h.reject("unknown") is Reason.KEY_NOT_FOUND
    assert (idp.discovery_hits, idp.hits) == (1, 2)
    # Once its lifetime is over it is asked again, with the next key fetch.
    clock.advance(TTL)
    await h.key(rs.kid)
    await eventually(lambda: (idp.discovery_hits, h.fetches("success")) == (2, 3))
    assert idp.hits == 3


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        ("https://idp.test", "https://idp.test/.well-known/openid-configuration"),
        ("https://idp.test/", "https://idp.test/.well-known/openid-configuration"),
        ("https://idp.test/realmX", "https://idp.test/realmX/.well-known/openid-configuration"),
        ("https://idp.test/tenant/", "https://idp.test/tenant/.well-known/openid-configuration"),
    ],
)
def test_discovery_is_looked_up_under_the_issuer_url(issuer: str, expected: str) -> None:
    # OpenID Connect Discovery 1.0 §4: the issuer, without its trailing slash, then the suffix.
    assert discovery_uri(make_issuer("https://idp.test/jwks.json", issuer=issuer)) == expected


async def test_failed_rediscovery_keeps_the_known_jwks_uri(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(discovery=True, jwks_cache_max_ttl_s=TTL)
    idp.headers = {"Cache-Control": "max-age=60"}  # discovery and keys both live 60 s
    await h.key(rs.kid)
    idp.discovery_mode = "error"
    clock.advance(60)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("success") == 2)
    assert (idp.discovery_hits, idp.hits) == (2, 2)


async def test_validators_are_sent_only_to_the_jwks_uri_they_came_from(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    aiohttp_server: Any,
    signing_keys: dict[str, SigningKey],
) -> None:
    # Two JWKS URLs serving the same keys, so the same ETag: a 304 from the new one to the old
    # one's ETag would hide that the new one was never fetched.
    moved = FakeIdP(etags=True, headers={"Cache-Control": "max-age=60"})
    moved.publish(*signing_keys.values())
    moved.jwks_uri = str((await aiohttp_server(moved.app())).make_url("/jwks.json"))
    idp.etags, idp.headers = True, {"Cache-Control": "max-age=60"}
    idp.last_modified = _LAST_MODIFIED
    h = make_cache(discovery=True, jwks_cache_min_ttl_s=60)
    await h.key(rs.kid)
    assert idp.validators == [(None, None)]
    idp.discovery = {"issuer": idp.issuer, "jwks_uri": moved.jwks_uri}
    clock.advance(60)  # discovery and keys expire together; rediscovery names the new URL
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("success") == 2)
    assert moved.validators == [(None, None)]
    # From then on the new URL's own validators are sent to it.
    clock.advance(60)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("not_modified") == 1)
    assert moved.validators == [(None, None), (moved.etag(), None)]
    assert idp.hits == 1


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(
            {"issuer": "https://evil.example", "jwks_uri": "JWKS"}, id="names-another-issuer"
        ),
        pytest.param(
            {"issuer": "ISSUER", "jwks_uri": "http://evil.example/jwks.json"}, id="plain-http"
        ),
        pytest.param({"issuer": "ISSUER"}, id="no-jwks-uri"),
        pytest.param({"issuer": "ISSUER", "jwks_uri": 7}, id="jwks-uri-not-a-string"),
    ],
)
async def test_untrustworthy_discovery_documents_are_refused(
    document: dict[str, Any], make_cache: MakeCache, idp: FakeIdP, rs: SigningKey
) -> None:
    idp.discovery = {
        k: {"ISSUER": idp.issuer, "JWKS": idp.jwks_uri}.get(v, v) if isinstance(v, str) else v
        for k, v in document.items()
    }
    h = make_cache(discovery=True)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert h.fetches("invalid") == 1
    assert idp.hits == 0  # the JWKS named by a bad document is never fetched


async def test_static_key_set_is_never_fetched(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    static = json.dumps({"keys": [rs.public_jwk()]})
    h = make_cache(static_jwks=static, jwks_uri="https://unused.invalid/jwks.json")
    assert h.cache.ready()
    assert h.cache.status()["test"]["source"] == "static"
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 1)
    assert verifies(await h.key(rs.kid), rs)
    clock.advance(100 * TTL)
    assert verifies(await h.key(rs.kid), rs)
    assert await h.reject("unknown") is Reason.KEY_NOT_FOUND
    assert idp.hits == 0
    assert h.fetches("success") == 0


# --- lifecycle: start, settled, ready, background refresh, close -------------------------------------
async def test_start_fetches_and_becomes_ready(make_cache: MakeCache, idp: FakeIdP) -> None:
    h = make_cache()
    assert not h.cache.ready()
    assert h.state == {"keys": 0, "ready": False, "stale": False, "failures": 0}
    assert h.ready_gauge == 0  # computed at scrape time
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    assert h.cache.ready()
    assert h.ready_gauge == 1
    assert idp.hits == 1
    await h.key("key-rs256")
    assert idp.hits == 1


async def test_settled_returns_even_when_the_first_fetch_fails(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    idp.mode = "error"
    h = make_cache()
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    assert not h.cache.ready()
    assert h.state["failures"] == 1

    # The refresher retries on its own after the backoff, without any request.
    idp.mode = "ok"
    await settle()
    clock.advance(0.5)
    await settle()
    assert idp.hits == 1
    clock.advance(0.5)
    await eventually(h.cache.ready)
    assert idp.hits == 2


async def test_background_refresh_runs_ahead_of_expiry(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    h = make_cache()
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    await settle()
    assert idp.hits == 1

    clock.advance(TTL - AHEAD - 1)
    await settle()
    assert idp.hits == 1

    clock.advance(1)  # now at ttl - refresh_ahead
    await eventually(lambda: idp.hits == 2)
    assert h.fetches("success") == 2
    await settle()

    # The refreshed set lives a full TTL from the refresh: the old expiry costs no request fetch.
    clock.advance(AHEAD)
    await h.key("key-rs256")
    assert idp.hits == 2

    # And the cycle repeats.
    clock.advance(TTL - 2 * AHEAD)
    await eventually(lambda: idp.hits == 3)


def cache_tasks() -> list[asyncio.Task[Any]]:
    """The cache's own pending tasks (refreshers and fetches)."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "").startswith("JwksCache.")
    ]


async def test_close_cancels_refresher_and_inflight_fetch(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    idp.mode = "hang"
    h = make_cache(jwks_fetch_timeout_s=30)
    h.cache.start()
    await eventually(lambda: idp.hits == 1)
    assert {t.get_coro().__qualname__ for t in cache_tasks()} == {  # type: ignore[union-attr]
        "JwksCache._refresh_loop",
        "JwksCache._fetch",
    }
    # close() must not wait out the 30 s fetch timeout.
    await asyncio.wait_for(h.cache.close(), 1)
    assert cache_tasks() == []
    assert not h.cache.ready()

    idp.mode = "ok"
    clock.advance(10 * TTL)
    await settle()
    assert idp.hits == 1


async def test_close_of_a_healthy_cache_stops_refreshing(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    h = make_cache()
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    await settle()
    await h.cache.close()
    assert cache_tasks() == []
    clock.advance(TTL)
    await settle()
    assert idp.hits == 1


async def test_a_short_lifetime_is_refreshed_half_way_through(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    idp.headers = {"Cache-Control": "max-age=40"}  # refresh-ahead (30 s) is over half of it
    h = make_cache(jwks_cache_min_ttl_s=10)
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    await settle()
    clock.advance(10)  # 30 s ahead of expiry: too soon for a 40 s lifetime
    await settle()
    clock.advance(9)
    await settle()
    assert idp.hits == 1
    clock.advance(1)  # half-way
    await eventually(lambda: h.fetches("success") == 2)
    await settle()
    assert idp.hits == 2


async def test_with_workers_the_ticker_publishes_the_key_gauges_and_close_stops_it(
    make_cache: MakeCache, rs: SigningKey
) -> None:
    static = json.dumps({"keys": [rs.public_jwk()]})
    h = make_cache(
        static_jwks=static, jwks_uri="https://unused.invalid/jwks.json", multiprocess=True
    )
    # Per-process gauges cannot be computed at scrape time: nothing is published yet.
    assert h.registry.get_sample_value("gateway_jwks_keys", {"issuer": "test"}) is None
    assert h.ready_gauge == 0
    h.cache.start()
    await settle()  # the ticker publishes at once, then every second
    assert h.metric("gateway_jwks_keys") == 1
    assert h.metric("gateway_jwks_stale") == 0
    assert h.metric("gateway_jwks_age_seconds") == 0  # a static set never ages
    assert h.ready_gauge == 1
    assert {t.get_coro().__qualname__ for t in cache_tasks()} == {"JwksCache._tick"}  # type: ignore[union-attr]
    await asyncio.wait_for(h.cache.close(), 1)
    assert cache_tasks() == []


async def test_reconfigure_starts_a_changed_issuer_afresh_and_stops_the_old_schedule(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    h = make_cache()
    longer = dataclasses.replace(h.issuer, jwks_cache_ttl_s=2 * TTL)
    h.cache.reconfigure({"test": longer})  # before start(): nothing is fetched
    await settle()
    assert idp.hits == 0
    h.cache.reconfigure({"test": h.issuer})
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    await settle()
    assert idp.hits == 1

    h.cache.reconfigure({"test": longer})  # changed while running: fetched at once, no request
    await eventually(lambda: h.fetches("success") == 2)
    assert h.cache.ready()
    await settle()
    clock.advance(TTL - AHEAD)  # the replaced issuer's refresh time: its refresher is gone
    await settle()
    assert idp.hits == 2
    clock.advance(TTL)  # the new one refreshes ahead of its own 600 s
    await eventually(lambda: h.fetches("success") == 3)
    await settle()
    assert idp.hits == 3


async def test_backoff_is_capped(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    idp.mode = "error"
    h = make_cache()
    waits = []
    for attempt in range(1, 10):
        assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
        assert idp.hits == attempt
        # Step one second at a time until the IdP is asked again.
        waited = 0
        while idp.hits == attempt:
            clock.advance(1)
            waited += 1
            assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
            assert waited <= 60
        waits.append(waited)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]


async def test_one_malformed_key_in_the_published_set_does_not_break_fetching(
    make_cache: MakeCache, idp: FakeIdP, rs: SigningKey
) -> None:
    idp.keys = [rs.public_jwk(), {**rs.public_jwk(), "kid": "odd", "alg": ["RS256"]}]
    h = make_cache()
    assert verifies(await h.key(rs.kid), rs)


async def test_reconfigure_keeps_unchanged_issuers_and_forgets_removed_ones(
    make_cache: MakeCache, idp: FakeIdP
) -> None:
    h = make_cache()
    await h.key("key-rs256")
    assert idp.hits == 1
    h.cache.reconfigure({"test": h.issuer})  # unchanged: keys kept, no fetch
    await h.key("key-rs256")
    assert idp.hits == 1
    assert h.metric("gateway_jwks_keys") > 0
    h.cache.reconfigure({})  # removed: its gauges stop reporting the old key set
    assert h.registry.get_sample_value("gateway_jwks_keys", {"issuer": "test"}) is None
    assert h.registry.get_sample_value("gateway_jwks_stale", {"issuer": "test"}) is None
    assert await h.reject("key-rs256") is Reason.JWKS_UNAVAILABLE


# --- private key material: dropped on every fetch (which keys: test_keyset.py) --------------
async def test_published_private_key_is_counted_per_fetch_and_never_served(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, signing_keys: dict[str, SigningKey]
) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    idp.keys = [rs.public_jwk(), FakeIdP.private_jwk(es)]
    h = make_cache()
    assert h.metric("gateway_jwks_private_keys_dropped_total") == 0  # pre-created
    assert verifies(await h.key(rs.kid), rs)
    assert h.metric("gateway_jwks_private_keys_dropped_total") == 1
    clock.advance(COOLDOWN)
    assert await h.reject(es.kid, "ES256") is Reason.KEY_NOT_FOUND  # the refetch drops it again
    assert idp.hits == 2
    assert h.metric("gateway_jwks_private_keys_dropped_total") == 2
    assert h.metric("gateway_jwks_keys") == 1


# --- a stale set is served at once, refreshed in the background --------------------------------
async def test_stale_set_is_served_without_waiting_and_refreshed_in_the_background(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_fetch_timeout_s=30, jwks_max_stale_s=600)
    first = await h.key(rs.kid)
    idp.mode = "hang"
    clock.advance(TTL)
    # A request waiting on the hanging refresh would take 30 s.
    assert await asyncio.wait_for(h.key(rs.kid), 1) is first
    await eventually(lambda: idp.hits == 2)
    for _ in range(5):  # later requests join nothing and start nothing
        assert await asyncio.wait_for(h.key(rs.kid), 1) is first
    assert idp.hits == 2
    assert h.state == {"keys": 10, "ready": True, "stale": True, "failures": 0}

    idp.release.set()  # the hanging answer ends as a 500: backoff, still no waiting
    await eventually(lambda: h.fetches("http_error") == 1)
    idp.release.clear()
    clock.advance(RETRY_INITIAL_S)  # every backoff cycle: the retry hangs again
    assert await asyncio.wait_for(h.key(rs.kid), 1) is first
    await eventually(lambda: idp.hits == 3)
    assert await asyncio.wait_for(h.key(rs.kid), 1) is first

    idp.mode = "ok"
    idp.release.set()
    await eventually(lambda: h.fetches("http_error") == 2)
    clock.advance(2 * RETRY_INITIAL_S)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("success") == 2)
    assert h.state == {"keys": 10, "ready": True, "stale": False, "failures": 0}


async def test_past_max_stale_a_request_still_waits_for_the_fetch(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_max_stale_s=0)
    await h.key(rs.kid)
    rotated = generate_key("RS256", "rotated")
    idp.publish(rotated)
    clock.advance(TTL)  # no stale set to serve: the request waits for the fetch
    assert verifies(await h.key("rotated"), rotated)
    assert idp.hits == 2


# --- failed fetches and the unknown-kid cooldown ------------------------------------------------
async def _fail_kid_refetch(h: Harness, idp: FakeIdP, clock: FakeClock, rs: SigningKey) -> None:
    """A fetch fails while the set is still fresh (the IdP restarting): an unknown-kid refetch."""
    await h.key(rs.kid)
    idp.mode = "error"
    clock.advance(COOLDOWN)
    assert await h.reject("unknown-0") is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.fetches("http_error"), h.state["failures"]) == (2, 1, 1)


async def _fail_refresh(h: Harness, idp: FakeIdP, clock: FakeClock) -> None:
    """The background refresh ahead of expiry fails (the IdP restarting); the set is still fresh."""
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    await settle()
    idp.mode = "error"
    clock.advance(TTL - AHEAD)
    await eventually(lambda: h.fetches("http_error") == 1)
    await settle()  # the refresher sleeps until its retry, RETRY_INITIAL_S from now
    assert (idp.hits, h.state["stale"], h.state["failures"]) == (2, False, 1)


def _publish_new(idp: FakeIdP, signing_keys: dict[str, SigningKey]) -> SigningKey:
    new = generate_key("ES256", "new")
    idp.publish(*signing_keys.values(), new)
    idp.mode = "ok"
    return new


async def test_a_failed_fetch_does_not_start_the_unknown_kid_cooldown(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache()
    await _fail_kid_refetch(h, idp, clock, rs)
    new = _publish_new(idp, signing_keys)
    clock.advance(RETRY_INITIAL_S)  # the retry is due (no refresher runs in this harness)
    assert verifies(await h.key(new.kid, "ES256"), new)
    assert idp.hits == 3
    assert (h.suppressed, h.state["failures"]) == (0, 0)
    # The successful fetch does start it.
    assert await h.reject("unknown-1") is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.suppressed) == (3, 1)


async def test_unknown_kid_waits_for_a_retry_due_within_the_fetch_timeout(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache(jwks_fetch_timeout_s=2)
    await _fail_refresh(h, idp, clock)
    new = _publish_new(idp, signing_keys)
    clock.advance(RETRY_INITIAL_S / 2)
    waiting = asyncio.create_task(h.key(new.kid, "ES256"))
    await settle()
    assert not waiting.done(), "refused instead of waiting for the retry"
    assert idp.hits == 2  # the backoff still governs: nothing is fetched early
    clock.advance(RETRY_INITIAL_S / 2)
    assert verifies(await asyncio.wait_for(waiting, 2), new)
    assert idp.hits == 3
    assert h.suppressed == 0


async def test_unknown_kid_does_not_wait_for_a_retry_due_after_the_fetch_timeout(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache(jwks_fetch_timeout_s=0.5)
    await _fail_kid_refetch(h, idp, clock, rs)
    clock.advance(RETRY_INITIAL_S)
    assert await h.reject("unknown-1") is Reason.KEY_NOT_FOUND  # starts the due retry: it fails
    assert (idp.hits, h.state["failures"]) == (3, 2)  # the next retry is 2 s away
    new = _publish_new(idp, signing_keys)
    clock.advance(0.5)  # 1.5 s to the retry: beyond the 0.5 s a request may wait
    assert await asyncio.wait_for(h.reject(new.kid, "ES256"), 1) is Reason.KEY_NOT_FOUND
    assert idp.hits == 3
    clock.advance(1.5)  # due now: an unknown kid may start it
    assert verifies(await h.key(new.kid, "ES256"), new)
    assert idp.hits == 4


async def test_unknown_kid_gives_up_when_the_awaited_retry_fails(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock
) -> None:
    h = make_cache(jwks_fetch_timeout_s=2)
    await _fail_refresh(h, idp, clock)
    clock.advance(RETRY_INITIAL_S / 2)
    waiting = asyncio.create_task(h.reject("new", "ES256"))
    await settle()
    assert not waiting.done()
    clock.advance(RETRY_INITIAL_S / 2)  # the retry runs and fails; the next one is 2 s later
    assert await asyncio.wait_for(waiting, 2) is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.state["failures"]) == (3, 2)


async def test_unknown_kid_does_not_wait_for_a_retry_due_exactly_when_its_budget_ends(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache(jwks_fetch_timeout_s=RETRY_INITIAL_S)
    await _fail_refresh(h, idp, clock)  # the retry is due RETRY_INITIAL_S from now
    new = _publish_new(idp, signing_keys)
    # Sleeping until the retry would leave nothing of the budget to wait for its answer.
    assert await asyncio.wait_for(h.reject(new.kid, "ES256"), 1) is Reason.KEY_NOT_FOUND
    assert idp.hits == 2
    clock.advance(RETRY_INITIAL_S)  # the refresher's retry brings the key for the next request
    await eventually(lambda: h.fetches("success") == 2)
    assert verifies(await h.key(new.kid, "ES256"), new)


async def test_unknown_kid_whose_refetch_fails_waits_for_the_retry_within_the_budget(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache(jwks_fetch_timeout_s=2)
    await h.key(rs.kid)
    idp.mode = "error"
    clock.advance(COOLDOWN)
    new = generate_key("ES256", "new")
    waiting = asyncio.create_task(h.key(new.kid, "ES256"))
    await eventually(lambda: h.fetches("http_error") == 1)  # its refetch failed: retry in 1 s
    await settle()
    assert not waiting.done(), "gave up although the retry is due within the 2 s budget"
    idp.publish(*signing_keys.values(), new)
    idp.mode = "ok"
    clock.advance(RETRY_INITIAL_S)
    assert verifies(await asyncio.wait_for(waiting, 2), new)
    assert idp.hits == 3


async def test_unknown_kid_that_outslept_its_budget_does_not_wait_for_the_retry(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_fetch_timeout_s=30)
    await h.key(rs.kid)
    idp.mode = "error"
    clock.advance(COOLDOWN)
    waiting = asyncio.create_task(h.reject("unknown"))
    await eventually(lambda: h.fetches("http_error") == 1)  # retry in 1 s: within the 30 s
    await settle()
    assert not waiting.done()
    idp.mode = "hang"
    clock.advance(31)  # woken late: the budget is spent by the time the retry is due
    # The retry is started for the cache's sake, but this request does not wait for it (the
    # hanging answer would take the fetch's 30 s).
    assert await asyncio.wait_for(waiting, 0.5) is Reason.KEY_NOT_FOUND
    await eventually(lambda: idp.hits == 3)


async def test_a_set_that_expires_while_an_unknown_kid_waits_answers_key_not_found(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_fetch_timeout_s=2, jwks_max_stale_s=0)
    await h.key(rs.kid)
    idp.mode = "error"
    clock.advance(TTL - RETRY_INITIAL_S / 2)  # fresh for half the first backoff more
    waiting = asyncio.create_task(h.reject("unknown"))
    await eventually(lambda: h.fetches("http_error") == 1)
    await settle()
    assert not waiting.done()
    clock.advance(RETRY_INITIAL_S)  # past expiry, no stale grace; the retry fails too
    assert await asyncio.wait_for(waiting, 2) is Reason.KEY_NOT_FOUND
    assert (idp.hits, h.state["ready"]) == (3, False)
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE


# --- conditional refresh ----------------------------------------------------------------------
_LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize(
    ("etags", "last_modified", "sent"),
    [
        pytest.param(True, None, "etag", id="etag"),
        pytest.param(False, _LAST_MODIFIED, "last-modified", id="last-modified"),
        pytest.param(True, _LAST_MODIFIED, "both", id="both"),
    ],
)
async def test_refresh_is_conditional_and_304_keeps_the_set(
    etags: bool,
    last_modified: str | None,
    sent: str,
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
) -> None:
    idp.etags, idp.last_modified = etags, last_modified
    h = make_cache()
    first = await h.key(rs.kid)
    assert idp.validators == [(None, None)]
    clock.advance(TTL)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("not_modified") == 1)
    expected = {
        "etag": (idp.etag(), None),
        "last-modified": (None, _LAST_MODIFIED),
        "both": (idp.etag(), _LAST_MODIFIED),
    }[sent]
    assert idp.validators[1] == expected
    assert (idp.hits, idp.not_modified_hits, h.fetches("success")) == (2, 1, 1)
    assert await h.key(rs.kid) is first  # the same set: nothing rebuilt, cached tokens stay valid
    assert h.state == {"keys": 10, "ready": True, "stale": False, "failures": 0}
    assert h.metric("gateway_jwks_last_success_timestamp_seconds") == clock.time()

    # A 304 renews the lifetime like a full answer ...
    clock.advance(TTL - 1)
    await h.key(rs.kid)
    assert idp.hits == 2
    # ... and a changed set comes back in full.
    rotated = generate_key("RS256", "rotated")
    idp.publish(rs, rotated)
    if last_modified is not None:
        idp.last_modified = "Mon, 07 Nov 1994 08:49:37 GMT"
    clock.advance(1)
    assert verifies(await h.key("rotated"), rotated)
    assert (idp.hits, h.fetches("success"), h.fetches("not_modified")) == (3, 2, 1)


async def test_304_takes_its_own_lifetime_else_the_stored_one(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    idp.etags = True
    idp.headers = {"Cache-Control": "max-age=120"}
    h = make_cache(jwks_cache_min_ttl_s=60, jwks_cache_max_ttl_s=3600)
    await h.key(rs.kid)
    idp.headers = {}  # the 304 says nothing: the stored response's 120 s still apply
    clock.advance(120)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("not_modified") == 1)
    clock.advance(119)
    assert not h.state["stale"]
    await h.key(rs.kid)
    assert idp.hits == 2
    idp.headers = {"Cache-Control": "max-age=600"}  # a 304 that updates the lifetime
    clock.advance(1)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("not_modified") == 2)
    clock.advance(599)
    assert not h.state["stale"]
    await h.key(rs.kid)
    assert idp.hits == 3
    clock.advance(1)
    assert h.state["stale"]


async def test_a_full_answer_without_a_lifetime_drops_the_previous_answers_lifetime(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    idp.headers = {"Cache-Control": "max-age=120"}
    h = make_cache(jwks_cache_min_ttl_s=60, jwks_cache_max_ttl_s=3600)
    await h.key(rs.kid)
    idp.headers = {}  # no validators either: the refresh is answered in full, without a lifetime
    clock.advance(120)
    await h.key(rs.kid)
    await eventually(lambda: h.fetches("success") == 2)
    clock.advance(TTL - 1)  # the configured TTL now, not the 120 s of the answer before
    assert not h.state["stale"]
    clock.advance(1)
    assert h.state["stale"]


async def test_304_to_an_unconditional_request_is_a_failed_fetch(
    make_cache: MakeCache, idp: FakeIdP, rs: SigningKey
) -> None:
    idp.mode = "not_modified"
    h = make_cache()
    assert await h.reject(rs.kid) is Reason.JWKS_UNAVAILABLE
    assert (h.fetches("http_error"), h.fetches("not_modified")) == (1, 0)


async def test_refresh_interval_revalidates_sooner_than_the_lifetime(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    signing_keys: dict[str, SigningKey],
) -> None:
    idp.etags = True
    h = make_cache(jwks_refresh_interval_s=10)
    h.cache.start()
    await asyncio.wait_for(h.cache.settled(), 2)
    await settle()
    for n in range(1, 4):  # every 10 s a conditional request, answered 304
        clock.advance(9)
        await settle()
        assert idp.hits == n
        clock.advance(1)
        await eventually(lambda n=n: h.fetches("not_modified") == n)  # type: ignore[misc]
        await settle()
    assert h.fetches("success") == 1
    assert verifies(await h.key(rs.kid), rs)

    # A retired key stops verifying at the next interval, not at the end of the 300 s lifetime.
    idp.publish(*(k for k in signing_keys.values() if k.kid != rs.kid))
    clock.advance(10)
    await eventually(lambda: h.fetches("success") == 2)
    assert await h.reject(rs.kid) is Reason.KEY_NOT_FOUND


# --- what a cached token's key is checked against (Verifier._key_current) -----------------------
async def test_current_key_is_the_served_key_until_it_leaves_the_set(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache()
    assert h.cache.current_key(h.issuer, rs.kid, "RS256") is None  # nothing fetched: no fetch
    assert idp.hits == 0
    key = await h.key(rs.kid)
    assert h.cache.current_key(h.issuer, rs.kid, "RS256") is key
    assert h.cache.current_key(h.issuer, rs.kid, "ES256") is None  # bound to RS256
    assert h.cache.current_key(h.issuer, "not-published", "RS256") is None
    assert h.cache.current_key(dataclasses.replace(h.issuer, id="gone"), rs.kid, "RS256") is None
    assert idp.hits == 1
    rotated = generate_key("ES256", "rotated")
    idp.publish(rotated)  # rs retired
    clock.advance(TTL)
    assert h.cache.current_key(h.issuer, rs.kid, "RS256") is key  # stale but servable
    await h.key("rotated", "ES256")  # served stale; the refresh runs in the background
    await eventually(lambda: h.fetches("success") == 2)
    assert h.cache.current_key(h.issuer, rs.kid, "RS256") is None
    found = h.cache.current_key(h.issuer, "rotated", "ES256")
    assert found is not None
    assert verifies(found, rotated)


# --- leases: a cached token's key set, checked by one comparison --------------------------------
def leased(h: Harness) -> tuple[Verifier, AuthPolicy]:
    """A verifier with a token cache over the harness's real key cache, and a policy on it."""
    policy = AuthPolicy(issuers=(h.issuer,), audiences=frozenset({"api"}))
    return Verifier(h.cache, h.clock, TokenCache(100, h.clock)), policy


def long_lived(signer: SigningKey, clock: FakeClock) -> str:
    now = int(clock.time())
    return make_token(signer, clock, iss=ISSUER, aud="api", sub="alice", exp=now + 86_400)


async def refused(verifier: Verifier, token: str, policy: AuthPolicy) -> Reason:
    with pytest.raises(Rejection) as caught:
        await verifier.verify(token, policy)
    return caught.value.reason


async def republish(h: Harness, *keys: SigningKey) -> None:
    """Publish ``keys`` as the issuer's set and let the cache take it: one lifetime later a
    request is served the stale set at once and the refresh lands in the background."""
    done = h.fetches("success")
    h.idp.publish(*keys)
    h.clock.advance(TTL)
    await h.key("key-es256", "ES256")
    await eventually(lambda: h.fetches("success") == done + 1)


async def test_a_cached_token_is_served_until_its_sets_lease_ends_at_expiry_plus_max_stale(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache(jwks_max_stale_s=600)
    verifier, policy = leased(h)
    token = long_lived(rs, clock)
    first = await verifier.verify(token, policy)
    clock.advance(TTL + 600 - 1)  # stale, still servable: the hit needs no key lookup
    assert await verifier.verify(token, policy) is first
    assert idp.hits == 1
    idp.mode = "error"
    clock.advance(1)  # the set is no longer usable: neither is the hit, and nothing else is
    assert await refused(verifier, token, policy) is Reason.JWKS_UNAVAILABLE


async def test_a_refetched_set_ends_the_lease_of_the_set_it_replaces(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache()
    before = h.cache.lease(h.issuer)
    assert before is not None
    assert before.usable_until == float("-inf")  # no set yet: nothing is usable
    verifier, policy = leased(h)
    token = long_lived(rs, clock)
    first = await verifier.verify(token, policy)
    old = h.cache.lease(h.issuer)
    assert old is not before
    assert old is not None
    assert old.usable_until > clock.monotonic()
    await republish(h, *(k for k in signing_keys.values() if k.kid != rs.kid))  # rs retired
    assert old.usable_until == float("-inf")
    assert h.cache.lease(h.issuer) is not old
    assert await refused(verifier, token, policy) is Reason.KEY_NOT_FOUND
    # The same kid back with the same key is a new set: the token verifies anew, once.
    await republish(h, *signing_keys.values())
    again = await verifier.verify(token, policy)
    assert again is not first
    assert await verifier.verify(token, policy) is again


async def test_a_kid_re_published_with_another_key_stops_its_cached_tokens(
    make_cache: MakeCache,
    idp: FakeIdP,
    clock: FakeClock,
    rs: SigningKey,
    signing_keys: dict[str, SigningKey],
) -> None:
    h = make_cache()
    verifier, policy = leased(h)
    token = long_lived(rs, clock)
    await verifier.verify(token, policy)
    impostor = generate_key("RS256", rs.kid)  # the same kid, now naming another key
    await republish(h, *(k for k in signing_keys.values() if k.kid != rs.kid), impostor)
    assert await refused(verifier, token, policy) is Reason.SIGNATURE_INVALID


async def test_a_304_moves_the_lease_and_cached_tokens_stay_cached(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    idp.etags = True
    h = make_cache(jwks_max_stale_s=0)
    verifier, policy = leased(h)
    token = long_lived(rs, clock)
    first = await verifier.verify(token, policy)
    lease = h.cache.lease(h.issuer)
    clock.advance(TTL)  # expired, not servable: the next key lookup waits for the 304
    await h.key(rs.kid)
    assert (h.fetches("not_modified"), h.cache.lease(h.issuer)) == (1, lease)
    assert lease is not None
    assert lease.usable_until == clock.monotonic() + TTL
    clock.advance(TTL - 1)  # past the set's first lifetime, inside the one the 304 gave
    assert await verifier.verify(token, policy) is first
    assert idp.hits == 2


async def test_a_reload_that_changes_an_issuer_ends_the_leases_of_its_set(
    make_cache: MakeCache, idp: FakeIdP, clock: FakeClock, rs: SigningKey
) -> None:
    h = make_cache()
    verifier, policy = leased(h)
    token = long_lived(rs, clock)
    first = await verifier.verify(token, policy)
    lease = h.cache.lease(h.issuer)
    changed = dataclasses.replace(h.issuer, jwks_cache_ttl_s=TTL * 2)
    h.cache.reconfigure({changed.id: changed})
    assert lease is not None
    assert lease.usable_until == float("-inf")
    # A request still judged by the old policy verifies against the issuer's new entry.
    again = await verifier.verify(token, policy)
    assert again is not first
    assert idp.hits == 2
    h.cache.reconfigure({})
    assert h.cache.lease(h.issuer) is None
