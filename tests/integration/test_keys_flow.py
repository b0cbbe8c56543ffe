"""End to end through HTTP: the per-issuer key cache under kid floods, new keys, rotation and
identity-provider outages.  Time is moved with FakeClock.advance only."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from tests import conftest
from tests.conftest import AUDIENCE, ISSUER
from tests.fakes import generate_key, make_token
from tests.integration.e2e_helpers import echoed_headers, reason_of, wait_until

TTL = 300.0  # base config jwks_cache_ttl_s
COOLDOWN = 30.0  # base config jwks_refetch_cooldown_s
ISSUER_ID = "test"
FETCH_TIMEOUT = 0.3  # jwks_fetch_timeout_s where an IdP hangs


def short_fetch_timeout(doc: dict[str, Any]) -> None:
    """A small jwks_fetch_timeout_s, so a hanging IdP costs a fraction of a second."""
    doc["issuers"]["test"]["jwks_fetch_timeout_s"] = FETCH_TIMEOUT


async def get_api(gw: conftest.RunningGateway, tok: str) -> Any:
    return await gw.client.get("/api/orders", headers=conftest.bearer(tok))


def impostor_token(clock: Any, kid: str) -> str:
    """A validly signed token under ``kid`` from a key the IdP never publishes."""
    return make_token(_IMPOSTOR, clock, headers={"kid": kid}, iss=ISSUER, aud=AUDIENCE, sub="eve")


_IMPOSTOR = generate_key("ES256", "impostor")


# --- unknown kids ---------------------------------------------------------------------------
async def test_kid_flood_costs_one_fetch_per_cooldown_window(gateway, idp, clock):
    clock.advance(COOLDOWN)  # leave the window opened by the start-up fetch (TTL not reached)
    hits = idp.hits
    for _ in range(100):
        response = await get_api(gateway, impostor_token(clock, secrets.token_hex(8)))
        assert response.status == 401
        assert await reason_of(response) == "key_not_found"
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert idp.hits - hits == 1
    assert gateway.metric("gateway_jwks_kid_misses_total", issuer=ISSUER_ID) == 100
    assert gateway.metric("gateway_jwks_refetch_suppressed_total", issuer=ISSUER_ID) == 99
    assert gateway.metric("gateway_jwks_fetches_total", issuer=ISSUER_ID, result="success") == 2
    assert gateway.metric("gateway_requests_total", route="api", reason="key_not_found") == 100

    # The next window allows exactly one more fetch, however many kids arrive.
    clock.advance(COOLDOWN)
    for _ in range(50):
        response = await get_api(gateway, impostor_token(clock, secrets.token_hex(8)))
        assert response.status == 401
    assert idp.hits - hits == 2
    assert gateway.metric("gateway_jwks_refetch_suppressed_total", issuer=ISSUER_ID) == 99 + 49


async def test_concurrent_kid_flood_shares_one_fetch(gateway, idp, clock):
    clock.advance(COOLDOWN)
    hits = idp.hits
    tokens = [impostor_token(clock, secrets.token_hex(8)) for _ in range(100)]
    responses = await asyncio.gather(*(get_api(gateway, t) for t in tokens))
    assert [r.status for r in responses] == [401] * 100
    assert {await reason_of(r) for r in responses} == {"key_not_found"}
    assert idp.hits - hits == 1
    assert gateway.metric("gateway_jwks_kid_misses_total", issuer=ISSUER_ID) == 100
    # Misses that arrive while the one fetch runs join it; the rest are suppressed.
    suppressed = gateway.metric("gateway_jwks_refetch_suppressed_total", issuer=ISSUER_ID)
    assert 0 <= suppressed <= 99


async def test_kid_flood_right_after_startup_costs_no_fetch(gateway, idp, clock):
    # The cooldown counts from the last fetch of any kind, the start-up fetch included.
    hits = idp.hits
    for _ in range(100):
        response = await get_api(gateway, impostor_token(clock, secrets.token_hex(8)))
        assert response.status == 401
        assert await reason_of(response) == "key_not_found"
    assert idp.hits == hits
    assert gateway.metric("gateway_jwks_kid_misses_total", issuer=ISSUER_ID) == 100
    assert gateway.metric("gateway_jwks_refetch_suppressed_total", issuer=ISSUER_ID) == 100


async def test_new_key_is_accepted_one_cooldown_after_publication(
    gateway, idp, clock, token, signing_keys
):
    fresh = generate_key("ES256", "fresh-es256")
    idp.publish(*signing_keys.values(), fresh)  # published at the instant of the last fetch
    hits = idp.hits

    first = await get_api(gateway, token(key=fresh))
    assert first.status == 401
    assert await reason_of(first) == "key_not_found"
    assert idp.hits == hits  # inside the cooldown: no network

    waited = 0
    while True:
        clock.advance(1)
        waited += 1
        response = await get_api(gateway, token(key=fresh))
        if response.status == 200:
            break
        assert await reason_of(response) == "key_not_found"
        assert waited < 3 * COOLDOWN, "new key never accepted"
    assert waited == COOLDOWN  # time to accept, in fake seconds
    assert echoed_headers(await response.json())["X-User-Sub"] == "alice"
    assert idp.hits == hits + 1
    # Old keys keep working throughout.
    assert (await get_api(gateway, token())).status == 200


async def test_rotation_new_key_accepted_and_retired_key_rejected_after_ttl(
    gateway, idp, clock, token, signing_keys, rsa_key
):
    new = generate_key("RS256", "rotated-rs256")
    idp.publish(*signing_keys.values(), new)  # step 1: publish old + new
    clock.advance(COOLDOWN)
    assert (await get_api(gateway, token(key=new))).status == 200  # unknown kid -> one refetch
    assert (await get_api(gateway, token(key=rsa_key))).status == 200

    idp.publish(new)  # step 2: retire every old key
    # Until the cache is refreshed the retired key is still trusted (documented caching).
    clock.advance(COOLDOWN)
    assert (await get_api(gateway, token(key=rsa_key))).status == 200

    clock.advance(TTL)  # the cached set has expired: the refresher fetches it again at once
    await wait_until(
        lambda: (
            gateway.metric("gateway_jwks_fetches_total", issuer=ISSUER_ID, result="success") == 3
        ),
        what="the refresh after expiry",
    )
    old = await get_api(gateway, token(key=rsa_key))
    assert old.status == 401
    assert await reason_of(old) == "key_not_found"
    assert (await get_api(gateway, token(key=new))).status == 200
    assert gateway.metric("gateway_jwks_keys", issuer=ISSUER_ID) == 1


async def test_retired_key_rejected_as_soon_as_an_unknown_kid_refetches(
    gateway, idp, clock, token, rsa_key
):
    new = generate_key("RS256", "rotated-rs256")
    idp.publish(new)
    clock.advance(COOLDOWN)
    assert (await get_api(gateway, token(key=new))).status == 200  # refetch drops the old keys
    old = await get_api(gateway, token(key=rsa_key))
    assert old.status == 401
    assert await reason_of(old) == "key_not_found"


async def test_hanging_refetch_bounds_unknown_kids_and_never_blocks_known_keys(
    make_gateway, idp, clock, token
):
    gw = await make_gateway(short_fetch_timeout)
    idp.mode = "hang"
    clock.advance(COOLDOWN)
    hits = idp.hits
    loop = asyncio.get_running_loop()
    started = loop.time()
    unknown = [
        asyncio.create_task(get_api(gw, impostor_token(clock, secrets.token_hex(8))))
        for _ in range(20)
    ]
    await wait_until(lambda: idp.hits == hits + 1, what="the refetch reached the IdP")
    known = await get_api(gw, token())  # a cached kid never waits on the hanging fetch
    assert known.status == 200
    assert not all(t.done() for t in unknown)
    responses = await asyncio.gather(*unknown)
    elapsed = loop.time() - started
    assert {r.status for r in responses} == {401}
    assert {await reason_of(r) for r in responses} == {"key_not_found"}
    assert elapsed < FETCH_TIMEOUT + 1.0  # bounded by jwks_fetch_timeout_s (plus loopback slack)
    assert idp.hits == hits + 1
    await wait_until(
        lambda: gw.metric("gateway_jwks_fetches_total", issuer=ISSUER_ID, result="timeout") == 1,
        what="the hanging fetch ended as a timeout",
    )


# --- outages ------------------------------------------------------------------------------
OUTAGES = [
    ("error", "http_error"),
    ("hang", "timeout"),
    ("garbage", "invalid"),
    ("empty", "invalid"),
    ("huge", "invalid"),
]


@pytest.mark.parametrize(("mode", "result"), OUTAGES)
async def test_warm_cache_keeps_verifying_through_an_outage(
    make_gateway, idp, clock, token, mode, result
):
    gw = await make_gateway(short_fetch_timeout)
    idp.mode = mode
    hits = idp.hits
    for _ in range(5):
        assert (await get_api(gw, token())).status == 200
    assert idp.hits == hits  # a fresh set needs no network

    clock.advance(TTL + 1)  # expired: stale-on-error from here on
    for _ in range(20):
        response = await get_api(gw, token())
        assert response.status == 200
        assert echoed_headers(await response.json())["X-User-Sub"] == "alice"
    await wait_until(  # the refresh runs in the background: no request waited for it
        lambda: gw.metric("gateway_jwks_fetches_total", issuer=ISSUER_ID, result=result) == 1,
        what="the failed refresh",
    )
    assert idp.hits == hits + 1  # one failed fetch, then backoff: not one per request
    assert gw.metric("gateway_jwks_keys", issuer=ISSUER_ID) == 10
    ready = await gw.admin.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["issuers"][ISSUER_ID]["failures"] == 1

    # The next retry is due after the backoff and still fails without hurting requests.
    clock.advance(1)
    assert (await get_api(gw, token())).status == 200
    await wait_until(lambda: idp.hits == hits + 2, what="the retry after the backoff")


async def test_failed_fetches_back_off_exponentially_never_per_request(
    make_gateway, idp, clock, token
):
    gw = await make_gateway()
    idp.mode = "error"
    clock.advance(TTL)
    assert (await get_api(gw, token())).status == 200
    assert idp.hits == 2  # start-up fetch + the first failed refresh
    fetched_at: list[int] = []
    for second in range(1, 40):
        clock.advance(1)
        before = idp.hits
        for _ in range(3):  # several requests per fake second
            assert (await get_api(gw, token())).status == 200
        assert idp.hits - before in (0, 1)
        if idp.hits > before:
            fetched_at.append(second)
    gaps = [b - a for a, b in zip([0, *fetched_at], fetched_at, strict=False)]
    assert gaps == [1, 2, 4, 8, 16]

    idp.mode = "ok"  # recovery at the next retry (32 s after the last one)
    clock.advance(32)
    assert (await get_api(gw, token())).status == 200
    await wait_until(lambda: gw.jwks.status()[ISSUER_ID]["failures"] == 0, what="recovery")
    assert gw.metric("gateway_jwks_fetches_total", issuer=ISSUER_ID, result="success") == 2


@pytest.mark.parametrize("mode", ["error", "hang"])
async def test_cold_start_during_outage_is_503_then_recovers_by_itself(
    make_gateway, idp, clock, token, mode
):
    idp.mode = mode
    gw = await make_gateway(short_fetch_timeout)  # settles on the failed first fetch
    assert idp.hits == 1

    for _ in range(10):
        response = await get_api(gw, token())
        assert response.status == 503
        assert await reason_of(response) == "jwks_unavailable"
        assert "WWW-Authenticate" not in response.headers
        assert response.headers["Cache-Control"] == "no-store"
    assert idp.hits == 1  # backoff: no fetch per request
    assert (await gw.client.get("/public/x")).status == 200  # public routes are unaffected
    assert (await gw.admin.get("/healthz")).status == 200
    ready = await gw.admin.get("/readyz")
    assert ready.status == 503
    state = (await ready.json())["issuers"][ISSUER_ID]
    assert (state["keys"], state["ready"], state["failures"], state["stale"]) == (
        0,
        False,
        1,
        False,
    )

    idp.mode = "ok"
    clock.advance(0.5)  # before the 1 s retry: nothing happens
    assert (await get_api(gw, token())).status == 503
    assert idp.hits == 1
    clock.advance(0.5)

    async def ready_now() -> bool:
        return bool((await gw.admin.get("/readyz")).status == 200)

    await wait_until(ready_now, what="/readyz 200 after the IdP came back")
    assert idp.hits == 2
    response = await get_api(gw, token())
    assert response.status == 200
    assert gw.metric("gateway_requests_total", route="api", reason="jwks_unavailable") == 11


# --- a malformed member in an otherwise good set ----------------------------------------------
def list_alg_jwk() -> dict[str, Any]:
    """A well-formed RSA public JWK except that its ``alg`` is a list, not a string."""
    return generate_key("RS256", "bad-alg").public_jwk(alg=["RS256"])


async def test_malformed_jwk_is_skipped_without_poisoning_the_set(
    make_gateway, idp, clock, token, rsa_key
):
    idp.keys = [list_alg_jwk(), rsa_key.public_jwk()]
    gw = await make_gateway()
    hits = idp.hits
    for _ in range(5):
        assert (await get_api(gw, token())).status == 200
    assert idp.hits == hits


async def test_malformed_jwk_during_refresh_keeps_stale_set_and_backs_off(
    make_gateway, idp, clock, token
):
    gw = await make_gateway()
    idp.keys = [list_alg_jwk()]  # the next refresh finds only the malformed key
    clock.advance(TTL + 1)
    hits = idp.hits
    statuses = [(await get_api(gw, token())).status for _ in range(10)]
    assert statuses == [200] * 10
    assert idp.hits - hits <= 1


# --- private key material in the published set ------------------------------------------------
async def test_published_private_keys_are_never_used(make_gateway, idp, clock, token):
    # A misconfigured IdP publishes private JWKs: an RSA one made every token naming it a 500,
    # an EC one was trusted.  Both are dropped, logged and counted; the rest of the set serves.
    leaked_rsa = generate_key("RS256", "leaked-rs256")
    leaked_ec = generate_key("ES256", "leaked-es256")
    idp.leak(leaked_rsa, leaked_ec)
    gw = await make_gateway()
    for leaked in (leaked_rsa, leaked_ec):
        response = await get_api(gw, token(key=leaked))
        assert response.status == 401, leaked.kid
        assert await reason_of(response) == "key_not_found"
    assert gw.metric("gateway_jwks_private_keys_dropped_total", issuer=ISSUER_ID) == 2
    assert gw.metric("gateway_jwks_keys", issuer=ISSUER_ID) == 10
    assert (await get_api(gw, token())).status == 200
    ready = await gw.admin.get("/readyz")
    assert (await ready.json())["issuers"][ISSUER_ID]["keys"] == 10
