"""End to end through HTTP: the key lifecycle of an issuer.

OpenID discovery, key-set lifetimes from Cache-Control clamped to the configured bounds,
background refresh ahead of expiry, outages up to ``jwks_max_stale_s``, static key sets,
per-issuer readiness, the ``typ`` header, and the JWKS fetch metrics.

Every duration the gateway measures is moved with the fake clock; the only real waiting is
bounded polling for loopback I/O (``wait_until`` / ``idle``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientResponse

from gateway import ConfigError, load_config, loads_config
from gateway.metrics import JWKS_FETCH_RESULTS
from tests.conftest import AUDIENCE, ISSUER, RunningGateway, base_config, bearer
from tests.fakes import FakeIdP, SigningKey, generate_key, make_token
from tests.integration.e2e_helpers import echoed_headers, free_port, reason_of, wait_until
from tests.integration.lifecycle_helpers import (
    SteppingClock,
    advance_idle,
    idle,
    json_of,
)

ISSUER_ID = "test"
TTL = 300  # base config jwks_cache_ttl_s
COOLDOWN = 30  # base config jwks_refetch_cooldown_s
AHEAD = 30  # default jwks_refresh_ahead_s (min(30, ttl / 2))
KEYS = 10  # the fake IdP publishes one key per algorithm

Edit = Callable[[dict[str, Any]], None]

_IMPOSTOR = generate_key("ES256", "impostor")


@pytest.fixture
def clock() -> SteppingClock:
    """The fake clock, able to show when the background refreshers sleep (overrides conftest's)."""
    return SteppingClock()


# --- helpers ----------------------------------------------------------------------------------
def issuer_of(doc: dict[str, Any], issuer_id: str = ISSUER_ID) -> dict[str, Any]:
    issuer: dict[str, Any] = doc["issuers"][issuer_id]
    return issuer


def settings(**values: Any) -> Edit:
    """An edit that sets issuer keys of the test issuer."""

    def edit(doc: dict[str, Any]) -> None:
        issuer_of(doc).update(values)

    return edit


def use_discovery(idp: FakeIdP, issuer: str | None = None) -> Edit:
    """No jwks_uri: the key set is found by OpenID discovery from ``issuer`` (default idp.issuer)."""

    def edit(doc: dict[str, Any]) -> None:
        cfg = issuer_of(doc)
        del cfg["jwks_uri"]
        cfg["issuer"] = idp.issuer if issuer is None else issuer

    return edit


def mint(key: SigningKey, clock: SteppingClock, iss: str = ISSUER, **claims: Any) -> str:
    return make_token(key, clock, iss=iss, aud=AUDIENCE, sub="alice", **claims)


def impostor(clock: SteppingClock, iss: str = ISSUER, **headers: Any) -> str:
    """A validly signed token under a fresh kid the IdP never published."""
    return make_token(
        _IMPOSTOR,
        clock,
        headers={"kid": secrets.token_hex(8), **headers},
        iss=iss,
        aud=AUDIENCE,
        sub="eve",
    )


async def get_api(gw: RunningGateway, tok: str, path: str = "/api/orders") -> ClientResponse:
    return await gw.client.get(path, headers=bearer(tok))


async def readyz(gw: RunningGateway) -> tuple[int, dict[str, Any]]:
    response = await gw.admin.get("/readyz")
    return response.status, await json_of(response)


def fetches(gw: RunningGateway, result: str, issuer: str = ISSUER_ID) -> float:
    return gw.metric("gateway_jwks_fetches_total", issuer=issuer, result=result)


def stale(gw: RunningGateway, issuer: str = ISSUER_ID) -> float:
    return gw.metric("gateway_jwks_stale", issuer=issuer)


def keys(gw: RunningGateway, issuer: str = ISSUER_ID) -> float:
    return gw.metric("gateway_jwks_keys", issuer=issuer)


async def expect_unavailable(response: ClientResponse) -> None:
    assert response.status == 503
    assert await reason_of(response) == "jwks_unavailable"


# --- OpenID discovery -------------------------------------------------------------------------
async def test_discovery_from_issuer_alone_verifies_tokens(make_gateway, idp, clock, rsa_key):
    gw = await make_gateway(use_discovery(idp))
    assert gw.config.issuers[ISSUER_ID].jwks_uri is None
    assert (idp.discovery_hits, idp.hits) == (1, 1)  # one discovery fetch, then the key set

    for _ in range(5):
        response = await get_api(gw, mint(rsa_key, clock, iss=idp.issuer))
        assert response.status == 200
        assert echoed_headers(await response.json())["X-User-Sub"] == "alice"
    assert (idp.discovery_hits, idp.hits) == (1, 1)
    # The issuer's URL is what tokens must carry: the old placeholder is no longer trusted.
    wrong = await get_api(gw, mint(rsa_key, clock, iss=ISSUER))
    assert wrong.status == 401
    assert await reason_of(wrong) == "issuer_not_allowed"

    status, body = await readyz(gw)
    assert status == 200
    assert body["issuers"][ISSUER_ID]["source"] == "discovery"
    assert body["issuers"][ISSUER_ID]["keys"] == KEYS
    assert fetches(gw, "success") == 1


async def test_discovery_uses_the_jwks_uri_the_document_names(
    make_gateway, idp, clock, rsa_key, aiohttp_server
):
    elsewhere = FakeIdP()
    elsewhere.publish(rsa_key)
    server = await aiohttp_server(elsewhere.app())
    elsewhere.jwks_uri = str(server.make_url("/jwks.json"))
    idp.discovery = {"issuer": idp.issuer, "jwks_uri": elsewhere.jwks_uri}

    gw = await make_gateway(use_discovery(idp))
    assert (await get_api(gw, mint(rsa_key, clock, iss=idp.issuer))).status == 200
    assert (idp.discovery_hits, idp.hits, elsewhere.hits) == (1, 0, 1)


def _doc(**fields: Any) -> Callable[[FakeIdP], dict[str, Any]]:
    """A discovery document built from the IdP: ``{issuer}``/``{jwks_uri}`` are filled in."""

    def build(idp: FakeIdP) -> dict[str, Any]:
        values = {"issuer": idp.issuer, "jwks_uri": idp.jwks_uri}
        return {
            k: v.format(**values) if isinstance(v, str) else v
            for k, v in fields.items()
            if v is not None
        }

    return build


BAD_DISCOVERY = [
    pytest.param(
        "", _doc(issuer="{issuer}/", jwks_uri="{jwks_uri}"), "invalid", id="document-adds-slash"
    ),
    pytest.param(
        "/", _doc(issuer="{issuer}", jwks_uri="{jwks_uri}"), "invalid", id="config-adds-slash"
    ),
    pytest.param(
        "",
        _doc(issuer="https://evil.example", jwks_uri="{jwks_uri}"),
        "invalid",
        id="other-issuer",
    ),
    pytest.param("", _doc(jwks_uri="{jwks_uri}"), "invalid", id="no-issuer"),
    pytest.param(
        "",
        _doc(issuer="{issuer}", jwks_uri="http://keys.example.com/jwks.json"),
        "invalid",
        id="jwks-uri-http-not-loopback",
    ),
    pytest.param(
        "",
        _doc(issuer="{issuer}", jwks_uri="ftp://127.0.0.1/jwks.json"),
        "invalid",
        id="jwks-uri-not-http",
    ),
    pytest.param("", _doc(issuer="{issuer}"), "invalid", id="jwks-uri-missing"),
    pytest.param("", _doc(issuer="{issuer}", jwks_uri=42), "invalid", id="jwks-uri-not-a-string"),
    pytest.param("", None, "http_error", id="discovery-http-500"),
]


@pytest.mark.parametrize(("suffix", "document", "result"), BAD_DISCOVERY)
async def test_bad_discovery_document_is_a_failed_fetch(
    make_gateway, idp, clock, rsa_key, suffix, document, result
):
    if document is None:
        idp.discovery_mode = "error"
    else:
        idp.discovery = document(idp)
    configured = idp.issuer + suffix
    gw = await make_gateway(use_discovery(idp, configured))

    assert idp.discovery_hits == 1
    assert idp.hits == 0  # no key set is fetched from a document that was refused
    assert fetches(gw, result) == 1
    assert fetches(gw, "success") == 0
    status, body = await readyz(gw)
    assert status == 503
    assert body["issuers"][ISSUER_ID]["ready"] is False
    await expect_unavailable(await get_api(gw, mint(rsa_key, clock, iss=configured)))
    assert keys(gw) == 0


async def test_discovery_is_cached_for_its_lifetime_then_refreshed(
    make_gateway, idp, clock, rsa_key
):
    # Both documents say 120 s: the key set is refreshed ahead of expiry, at 90 s (120 - 30),
    # then at 180 s; discovery, fetched at 0 s, is reused at 90 s and fetched again at 180 s.
    idp.headers = {"Cache-Control": "max-age=120"}
    gw = await make_gateway(use_discovery(idp))
    await idle(clock)
    expected = [(89, (1, 1)), (90, (1, 2)), (179, (1, 2)), (180, (2, 3)), (269, (2, 3))]
    now = 0
    for at, counts in expected:
        await advance_idle(clock, at - now)
        now = at
        assert (idp.discovery_hits, idp.hits) == counts, f"at {at} s"
        assert (await get_api(gw, mint(rsa_key, clock, iss=idp.issuer))).status == 200


async def test_discovery_failing_later_keeps_the_learnt_jwks_uri(make_gateway, idp, clock, rsa_key):
    idp.headers = {"Cache-Control": "max-age=120"}
    gw = await make_gateway(use_discovery(idp))
    await idle(clock)
    idp.discovery_mode = "error"
    for refresh in range(1, 7):  # six key-set lifetimes, refreshed every 90 s
        await advance_idle(clock, 90)
        assert idp.hits == 1 + refresh
        assert (await get_api(gw, mint(rsa_key, clock, iss=idp.issuer))).status == 200
        assert stale(gw) == 0
    assert idp.discovery_hits >= 2  # discovery was tried again, and failed
    assert fetches(gw, "success") == 7
    status, body = await readyz(gw)
    assert status == 200
    assert body["issuers"][ISSUER_ID]["failures"] == 0


async def test_discovery_jwks_uri_with_an_invalid_port_is_refused_as_invalid(
    make_gateway, idp, clock, rsa_key
):
    host = idp.issuer.rsplit(":", 1)[0]
    idp.discovery = {"issuer": idp.issuer, "jwks_uri": f"{host}:99999/jwks.json"}
    gw = await make_gateway(use_discovery(idp))
    await expect_unavailable(await get_api(gw, mint(rsa_key, clock, iss=idp.issuer)))
    assert (fetches(gw, "invalid"), fetches(gw, "unreachable")) == (1, 0)

    # A refused document is not cached: once it is fixed, the next retry recovers.
    idp.discovery = None
    await advance_idle(clock, 1)
    assert idp.discovery_hits == 2
    assert (await get_api(gw, mint(rsa_key, clock, iss=idp.issuer))).status == 200


# --- lifetimes --------------------------------------------------------------------------------
_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"  # the IdP's own clock: only Expires - Date counts
_DATE_PLUS_160 = "Sun, 06 Nov 1994 08:52:17 GMT"
BOUNDS = {"jwks_cache_min_ttl_s": 100, "jwks_cache_max_ttl_s": 1000}

LIFETIMES = [
    pytest.param(BOUNDS, {"Cache-Control": "max-age=120"}, 120, id="max-age"),
    pytest.param(BOUNDS, {"Cache-Control": "public, s-maxage=150, max-age=5"}, 150, id="s-maxage"),
    pytest.param(BOUNDS, {"Cache-Control": "max-age=1"}, 100, id="clamped-up-to-min"),
    pytest.param(BOUNDS, {"Cache-Control": "max-age=999999"}, 1000, id="clamped-down-to-max"),
    pytest.param(BOUNDS, {"Cache-Control": "no-store"}, 100, id="no-store-is-min"),
    pytest.param(BOUNDS, {}, TTL, id="no-header-is-ttl"),
    pytest.param(BOUNDS, {"Date": _DATE, "Expires": _DATE_PLUS_160}, 160, id="expires-minus-date"),
    pytest.param(BOUNDS, {"Date": _DATE, "Expires": "0"}, 100, id="invalid-expires-is-min"),
    pytest.param(
        BOUNDS,
        {"Cache-Control": "max-age=200", "Date": _DATE, "Expires": _DATE_PLUS_160},
        200,
        id="max-age-beats-expires",
    ),
    pytest.param({}, {"Cache-Control": "max-age=1"}, 60, id="default-min"),
    pytest.param({}, {"Cache-Control": "max-age=999999"}, 3600, id="default-max"),
]


@pytest.mark.parametrize(("bounds", "headers", "lifetime"), LIFETIMES)
async def test_key_set_lifetime_follows_cache_control_within_bounds(
    make_gateway, idp, clock, token, bounds, headers, lifetime
):
    idp.headers = headers
    gw = await make_gateway(settings(**bounds))
    await idle(clock)
    start = clock.monotonic()
    due = lifetime - min(AHEAD, lifetime / 2)  # the background refresh runs ahead of expiry
    assert clock.waiting() == [start + due]

    await advance_idle(clock, due - 1)
    assert idp.hits == 1, "refreshed too early"
    idp.mode = "error"  # the refresh fails, so the set lives exactly its lifetime
    await advance_idle(clock, 1)
    assert idp.hits == 2, "no refresh ahead of expiry"
    assert stale(gw) == 0

    await advance_idle(clock, lifetime - due - 1)
    assert stale(gw) == 0, "expired too early"
    await advance_idle(clock, 1)
    assert stale(gw) == 1, "not expired at the end of its lifetime"
    assert (await get_api(gw, token())).status == 200  # stale-on-error


CACHE_BOUNDS = [
    pytest.param({"jwks_cache_min_ttl_s": 301}, None, id="min-above-ttl"),
    pytest.param({"jwks_cache_max_ttl_s": 299}, None, id="max-below-ttl"),
    pytest.param({"jwks_cache_min_ttl_s": 200, "jwks_cache_max_ttl_s": 100}, None, id="min-above-max"),
    pytest.param({"jwks_cache_min_ttl_s": 300, "jwks_cache_max_ttl_s": 300}, (300, 300, 300), id="all-equal"),
    pytest.param({"jwks_cache_ttl_s": 30}, (30, 30, 3600), id="short-ttl-lowers-default-min"),
    pytest.param({"jwks_cache_ttl_s": 7200}, (60, 7200, 7200), id="long-ttl-raises-default-max"),
    pytest.param({}, (60, 300, 3600), id="defaults"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "expected"), CACHE_BOUNDS)
def test_cache_lifetime_bounds_must_be_in_order(idp, upstream, values, expected):
    doc = base_config(idp, upstream)
    issuer_of(doc).update(values)
    text = yaml.safe_dump(doc)
    if expected is None:
        with pytest.raises(ConfigError) as caught:
            loads_config(text)
        assert caught.value.path == f"issuers.{ISSUER_ID}"
        assert "jwks_cache_min_ttl_s <= jwks_cache_ttl_s <= jwks_cache_max_ttl_s" in str(
            caught.value
        )
        return
    issuer = loads_config(text).issuers[ISSUER_ID]
    bounds = (issuer.jwks_cache_min_ttl_s, issuer.jwks_cache_ttl_s, issuer.jwks_cache_max_ttl_s)
    assert bounds == expected


# --- background refresh -----------------------------------------------------------------------
async def test_steady_state_refreshes_in_the_background_never_in_a_request(
    make_gateway, idp, clock, token
):
    idp.headers = {"Cache-Control": "max-age=120"}  # lifetime 120 s, refreshed every 90 s
    gw = await make_gateway()
    await idle(clock)
    fetched_at: list[int] = []
    for second in range(10, 610, 10):  # five lifetimes
        before = idp.hits
        await advance_idle(clock, 10)  # no request in flight
        if idp.hits > before:
            fetched_at.append(second)
        during = idp.hits
        for _ in range(3):
            assert (await get_api(gw, token())).status == 200
        assert idp.hits == during, f"a request fetched keys at {second} s"
        assert stale(gw) == 0
    assert fetched_at == [90, 180, 270, 360, 450, 540]
    assert fetches(gw, "success") == 1 + len(fetched_at)


async def test_hanging_refresh_ahead_of_expiry_never_delays_a_request(
    make_gateway, idp, clock, token
):
    gw = await make_gateway(settings(jwks_fetch_timeout_s=5))
    await idle(clock)
    idp.mode = "hang"
    clock.advance(TTL - AHEAD)  # the refresh starts and hangs
    await wait_until(lambda: idp.hits == 2, what="the refresh reached the IdP")
    for _ in range(5):
        assert (await get_api(gw, token())).status == 200
    # Had a request waited on the refresh, it would have ended (timeout) by now.
    assert sum(fetches(gw, r) for r in JWKS_FETCH_RESULTS) == 1
    idp.release.set()
    await wait_until(lambda: fetches(gw, "http_error") == 1, what="the released refresh ended")


# --- outages and max staleness ----------------------------------------------------------------
MAX_STALE = 600


async def test_outage_serves_stale_keys_until_max_stale_then_recovers_by_itself(
    make_gateway, idp, clock, token
):
    gw = await make_gateway(settings(jwks_max_stale_s=MAX_STALE))
    await idle(clock)
    idp.mode = "error"
    fetched_at: list[int] = []
    end = TTL + MAX_STALE
    for second in range(1, end + 11):
        before = idp.hits
        await advance_idle(clock, 1)
        if idp.hits > before:
            fetched_at.append(second)
        if second % 10 and second not in (TTL - 1, end - 1):
            continue
        during = idp.hits
        response = await get_api(gw, token())
        status, body = await readyz(gw)
        state = body["issuers"][ISSUER_ID]
        if second < TTL:  # fresh, although refreshes fail
            assert response.status == 200
            assert (status, state["stale"], stale(gw)) == (200, False, 0)
        elif second < end:  # stale-on-error
            assert response.status == 200, f"at {second} s"
            assert (status, state["stale"], stale(gw)) == (200, True, 1)
            assert keys(gw) == KEYS
        else:  # past max staleness
            await expect_unavailable(response)
            assert status == 503
            assert state["ready"] is False
            assert keys(gw) == 0
        assert idp.hits == during, f"a request fetched at {second} s"

    # Retries back off exponentially (1, 2, 4 ... 60 s) from the first failed refresh at 270 s.
    gaps = [b - a for a, b in itertools.pairwise(fetched_at)]
    assert fetched_at[0] == TTL - AHEAD
    assert gaps == [1, 2, 4, 8, 16, 32] + [60] * 9
    assert fetches(gw, "http_error") == len(fetched_at)

    # Past max staleness, requests do not fetch either.
    hits = idp.hits
    for _ in range(20):
        await expect_unavailable(await get_api(gw, token()))
    assert idp.hits == hits

    # The IdP comes back: the next retry (60 s after the last) recovers with no request at all.
    idp.mode = "ok"
    waited = 0
    while idp.hits == hits:
        await advance_idle(clock, 1)
        waited += 1
        assert waited <= 60, "no retry within the 60 s backoff cap"
    assert end + 10 + waited == fetched_at[-1] + 60
    status, body = await readyz(gw)
    assert status == 200
    assert (body["issuers"][ISSUER_ID]["failures"], body["issuers"][ISSUER_ID]["stale"]) == (
        0,
        False,
    )
    assert (stale(gw), keys(gw)) == (0, KEYS)
    assert (await get_api(gw, token())).status == 200


async def test_max_stale_zero_serves_no_stale_keys(make_gateway, idp, clock, token):
    gw = await make_gateway(settings(jwks_max_stale_s=0))
    await idle(clock)
    idp.mode = "error"
    await advance_idle(clock, TTL - 1)
    assert (await get_api(gw, token())).status == 200
    await advance_idle(clock, 1)
    await expect_unavailable(await get_api(gw, token()))
    assert (await readyz(gw))[0] == 503
    assert keys(gw) == 0


async def test_expired_set_is_served_while_a_hanging_idp_is_refreshed(
    make_gateway, idp, clock, token
):
    # Past its lifetime (within jwks_max_stale_s) the set serves at once; the refresh runs in the
    # background.  A request waiting on the hanging fetch would take jwks_fetch_timeout_s (30 s).
    gw = await make_gateway(settings(jwks_fetch_timeout_s=30, jwks_max_stale_s=MAX_STALE))
    await idle(clock)
    idp.mode = "hang"
    clock.advance(TTL - AHEAD)  # the refresh ahead of expiry starts and hangs
    await wait_until(lambda: idp.hits == 2, what="the refresh reached the IdP")
    clock.advance(AHEAD)  # the set expires while it hangs

    async def uncached_requests() -> None:
        for _ in range(5):  # fresh tokens: no verified-token cache hit
            tok = token(jti=secrets.token_hex(8))
            response = await asyncio.wait_for(get_api(gw, tok), 2)
            assert response.status == 200

    await uncached_requests()
    assert (stale(gw), keys(gw), idp.hits) == (1, KEYS, 2)

    # On every backoff cycle: the hanging refresh ends (500), the retry hangs again.
    idp.release.set()
    await wait_until(lambda: fetches(gw, "http_error") == 1, what="the refresh ended")
    idp.release.clear()
    await idle(clock)
    clock.advance(1)
    await wait_until(lambda: idp.hits == 3, what="the retry reached the IdP")
    await uncached_requests()
    assert idp.hits == 3
    idp.release.set()


# --- a rotation step during an IdP restart ---------------------------------------------------
ROTATION_TOKENS = 25


async def test_rotation_step_during_an_idp_restart_loses_no_valid_token(
    make_gateway, idp, clock, signing_keys
):
    # The refresh ahead of expiry falls inside the IdP's restart and fails; the IdP comes back
    # publishing a new key and signing with it at once.  The failed fetch must not start the
    # unknown-kid cooldown, and tokens naming the new kid wait for the retry (due in 1 s, within
    # jwks_fetch_timeout_s) instead of failing.
    gw = await make_gateway(settings(jwks_fetch_timeout_s=2))
    await idle(clock)
    idp.mode = "error"  # restarting
    await advance_idle(clock, TTL - AHEAD)
    assert (idp.hits, fetches(gw, "http_error")) == (2, 1)
    new = generate_key("ES256", "rotated-es256")
    idp.publish(*signing_keys.values(), new)
    idp.mode = "ok"  # back, 0.4 s later, with the new key
    await advance_idle(clock, 0.4)

    requests = [
        asyncio.create_task(get_api(gw, mint(new, clock, jti=secrets.token_hex(8))))
        for _ in range(ROTATION_TOKENS)
    ]
    # Each waits on the clock for the retry (the refresher sleeps for it too), or is answered.
    await wait_until(
        lambda: len(clock.waiting()) > ROTATION_TOKENS or all(r.done() for r in requests),
        what="the requests waiting for the retry",
    )
    refused_early = sum(r.done() for r in requests)
    assert idp.hits == 2  # the backoff governs: nothing fetched before the retry is due
    clock.advance(0.6)  # the retry is due
    responses = await asyncio.gather(*requests)
    refused = [r.status for r in responses if r.status != 200]
    assert (refused_early, refused) == (0, []), "valid tokens refused"
    assert idp.hits == 3  # one retry, shared
    assert gw.metric("gateway_jwks_refetch_suppressed_total", issuer=ISSUER_ID) == 0
    await idle(clock)
    assert fetches(gw, "success") == 2


# --- conditional refresh ----------------------------------------------------------------------
INTERVAL = 15


async def test_conditional_refresh_every_interval_retires_keys_sooner(
    make_gateway, idp, clock, token, rsa_key, signing_keys
):
    idp.etags = True
    gw = await make_gateway(settings(jwks_refresh_interval_s=INTERVAL))
    await idle(clock)
    assert clock.waiting() == [clock.monotonic() + INTERVAL]
    cached = token()
    for n in range(1, 5):  # every interval one conditional request, answered 304
        await advance_idle(clock, INTERVAL)
        assert (idp.hits, idp.not_modified_hits) == (1 + n, n)
        assert idp.validators[-1] == (idp.etag(), None)
        assert (await get_api(gw, cached)).status == 200  # a 304 keeps cached tokens valid
        assert stale(gw) == 0
    assert (fetches(gw, "success"), fetches(gw, "not_modified")) == (1, 4)

    # Retire the RS256 key: refused at the next interval, not at the end of the 300 s lifetime.
    idp.publish(*(k for k in signing_keys.values() if k.kid != rsa_key.kid))
    assert (await get_api(gw, cached)).status == 200
    await advance_idle(clock, INTERVAL)
    assert (fetches(gw, "success"), fetches(gw, "not_modified")) == (2, 4)
    for tok in (cached, token(jti="after-retirement")):
        response = await get_api(gw, tok)
        assert response.status == 401
        assert await reason_of(response) == "key_not_found"
    assert keys(gw) == KEYS - 1


async def test_refresh_without_validators_is_unconditional(make_gateway, idp, clock, token):
    gw = await make_gateway(settings(jwks_refresh_interval_s=INTERVAL))
    await idle(clock)
    await advance_idle(clock, INTERVAL)
    assert idp.validators == [(None, None), (None, None)]
    assert (fetches(gw, "success"), fetches(gw, "not_modified")) == (2, 0)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(None, True, id="default-off"),
        pytest.param(10, True, id="ten-seconds"),
        pytest.param(0, False, id="zero"),
        pytest.param(-5, False, id="negative"),
        pytest.param("soon", False, id="not-a-number"),
    ],
)
def test_refresh_interval_setting(idp, upstream, value, ok):
    doc = base_config(idp, upstream)
    if value is not None:
        issuer_of(doc)["jwks_refresh_interval_s"] = value
    if ok:
        assert loads_config(yaml.safe_dump(doc)).issuers[ISSUER_ID].jwks_refresh_interval_s == value
        return
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(doc))
    assert caught.value.path == f"issuers.{ISSUER_ID}.jwks_refresh_interval_s"


# --- static key sets --------------------------------------------------------------------------
def _write_jwks(path: Path, *signers: SigningKey) -> None:
    path.write_text(json.dumps({"keys": [k.public_jwk() for k in signers]}), encoding="utf-8")


@pytest.mark.parametrize("source", ["jwks_file", "jwks"])
async def test_static_key_set_verifies_without_any_fetch(
    make_gateway, idp, clock, token, signing_keys, tmp_path, source
):
    public = {"keys": [k.public_jwk() for k in signing_keys.values()]}

    def edit(doc: dict[str, Any]) -> None:
        cfg = issuer_of(doc)
        del cfg["jwks_uri"]
        if source == "jwks_file":
            path = tmp_path / "jwks.json"
            path.write_text(json.dumps(public), encoding="utf-8")
            cfg["jwks_file"] = str(path)
        else:
            cfg["jwks"] = public

    gw = await make_gateway(edit, settle=False)
    status, body = await readyz(gw)  # at once: nothing to wait for
    assert status == 200
    assert body["issuers"][ISSUER_ID]["source"] == "static"
    assert body["issuers"][ISSUER_ID]["keys"] == KEYS

    for _ in range(3):
        assert (await get_api(gw, token())).status == 200
    clock.advance(10 * TTL)  # a static set never expires and is never refreshed
    assert clock.waiting() == []
    assert (await get_api(gw, token())).status == 200
    unknown = await get_api(gw, impostor(clock))  # past the cooldown, yet no refetch
    assert unknown.status == 401
    assert await reason_of(unknown) == "key_not_found"

    assert (idp.hits, idp.discovery_hits) == (0, 0)
    assert sum(fetches(gw, r) for r in JWKS_FETCH_RESULTS) == 0
    assert (stale(gw), keys(gw)) == (0, KEYS)
    assert (await readyz(gw))[0] == 200


async def test_relative_jwks_file_is_resolved_against_the_config_folder(
    make_gateway, idp, upstream, clock, token, rsa_key, tmp_path
):
    folder = tmp_path / "etc" / "gateway"
    (folder / "keys").mkdir(parents=True)
    _write_jwks(folder / "keys" / "jwks.json", rsa_key)
    doc = base_config(idp, upstream)
    cfg = issuer_of(doc)
    del cfg["jwks_uri"]
    cfg["jwks_file"] = "keys/jwks.json"
    (folder / "gateway.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")

    gw = await make_gateway(path=folder / "gateway.yaml")
    assert (await readyz(gw))[0] == 200
    response = await get_api(gw, token())
    assert response.status == 200
    assert echoed_headers(await response.json())["X-User-Sub"] == "alice"
    assert idp.hits == 0

    # Without the file's folder the same relative path does not resolve (it is not the cwd).
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(doc))
    assert caught.value.path == f"issuers.{ISSUER_ID}.jwks_file"


def _source_uri(doc: dict[str, Any], tmp: Path) -> None:
    issuer_of(doc)["jwks_uri"] = "https://idp.test/jwks.json"


def _source_file(doc: dict[str, Any], tmp: Path) -> None:
    issuer_of(doc)["jwks_file"] = str(tmp / "jwks.json")


def _source_inline(doc: dict[str, Any], tmp: Path) -> None:
    issuer_of(doc)["jwks"] = json.loads((tmp / "jwks.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("first", "second", "names"),
    [
        pytest.param(_source_uri, _source_file, ("jwks_uri", "jwks_file"), id="uri-and-file"),
        pytest.param(_source_uri, _source_inline, ("jwks_uri", "jwks"), id="uri-and-inline"),
        pytest.param(_source_file, _source_inline, ("jwks_file", "jwks"), id="file-and-inline"),
    ],
)
def test_more_than_one_key_source_is_a_config_error(
    idp, upstream, rsa_key, tmp_path, first, second, names
):
    _write_jwks(tmp_path / "jwks.json", rsa_key)
    doc = base_config(idp, upstream)
    del issuer_of(doc)["jwks_uri"]
    first(doc, tmp_path)
    second(doc, tmp_path)
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(doc))
    assert caught.value.path == f"issuers.{ISSUER_ID}"
    message = str(caught.value)
    assert message.startswith(f"issuers.{ISSUER_ID}: ")
    assert all(repr(name) in message for name in names)


def _hmac_jwk() -> dict[str, Any]:
    return {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0", "kid": "h", "alg": "HS256"}


UNUSABLE_STATIC = [
    pytest.param("jwks", {"keys": []}, id="inline-empty"),
    pytest.param("jwks", "not-a-set", id="inline-not-a-mapping"),
    pytest.param("jwks", {"keys": [_hmac_jwk()]}, id="inline-hmac-only"),
    pytest.param("jwks", {"keys": [_IMPOSTOR.public_jwk()]}, id="inline-alg-not-pinned"),
    pytest.param("jwks_file", {"keys": []}, id="file-empty"),
    pytest.param("jwks_file", {"keys": [_IMPOSTOR.public_jwk()]}, id="file-alg-not-pinned"),
    pytest.param("jwks_file", None, id="file-missing"),
    pytest.param("jwks_file", "{not json", id="file-not-json"),
]


@pytest.mark.parametrize(("key", "content"), UNUSABLE_STATIC)
def test_static_key_set_without_a_usable_key_is_a_config_error(
    idp, upstream, tmp_path, key, content
):
    doc = base_config(idp, upstream)
    cfg = issuer_of(doc)
    del cfg["jwks_uri"]
    cfg["algorithms"] = ["RS256"]
    if key == "jwks":
        cfg["jwks"] = content
    else:
        path = tmp_path / "jwks.json"
        if content is not None:
            text = content if isinstance(content, str) else json.dumps(content)
            path.write_text(text, encoding="utf-8")
        cfg["jwks_file"] = str(path)
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(doc))
    assert caught.value.path == f"issuers.{ISSUER_ID}.{key}"


@pytest.mark.parametrize("key", ["jwks", "jwks_file"])
def test_static_key_set_with_private_members_is_a_config_error(
    idp, upstream, tmp_path, signing_keys, key
):
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    document = {"keys": [rs.public_jwk(), FakeIdP.private_jwk(es)]}
    doc = base_config(idp, upstream)
    cfg = issuer_of(doc)
    del cfg["jwks_uri"]
    if key == "jwks":
        cfg["jwks"] = document
    else:
        (tmp_path / "jwks.json").write_text(json.dumps(document), encoding="utf-8")
        cfg["jwks_file"] = str(tmp_path / "jwks.json")
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "gateway.yaml")
    expected_path = f"issuers.{ISSUER_ID}." + ("jwks.keys[1]" if key == "jwks" else "jwks_file")
    assert caught.value.path == expected_path
    assert "private key members d" in str(caught.value)
    assert es.kid in str(caught.value)
    # check-config says the same and fails.
    result = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        [sys.executable, "-m", "gateway", "check-config", str(tmp_path / "gateway.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert expected_path in result.stderr


# --- readiness per issuer ---------------------------------------------------------------------
OTHER_ISSUER = "https://other.test"


def second_issuer_down(required: bool) -> Edit:
    """A second issuer whose IdP refuses connections, with its own route /other."""

    def edit(doc: dict[str, Any]) -> None:
        doc["issuers"]["other"] = {
            "issuer": OTHER_ISSUER,
            "jwks_uri": f"http://127.0.0.1:{free_port()}/jwks.json",
            "algorithms": ["RS256"],
            "required_for_readiness": required,
        }
        upstream_url = doc["routes"][0]["upstream"]
        doc["routes"].insert(
            0,
            {
                "id": "other",
                "match": {"path_prefix": "/other"},
                "upstream": upstream_url,
                "auth": {"issuers": ["other"], "audiences": [AUDIENCE]},
            },
        )

    return edit


@pytest.mark.parametrize(
    ("required", "ready_status"),
    [pytest.param(False, 200, id="not-required"), pytest.param(True, 503, id="required")],
)
async def test_issuer_not_required_for_readiness(
    make_gateway, clock, token, rsa_key, required, ready_status
):
    gw = await make_gateway(second_issuer_down(required))
    status, body = await readyz(gw)
    assert status == ready_status
    other = body["issuers"]["other"]
    assert (other["ready"], other["required_for_readiness"]) == (False, required)
    assert body["issuers"][ISSUER_ID]["ready"] is True

    await expect_unavailable(await get_api(gw, mint(rsa_key, clock, iss=OTHER_ISSUER), "/other/x"))
    assert (await get_api(gw, token())).status == 200
    assert fetches(gw, "unreachable", issuer="other") == 1


# --- the typ header ---------------------------------------------------------------------------
ABSENT: Any = None  # make_token drops a typ of None

TYPES = [
    pytest.param(None, ABSENT, True, id="default-absent"),
    pytest.param(None, "JWT", True, id="default-JWT"),
    pytest.param(None, "jwt", True, id="default-jwt"),
    pytest.param(None, "at+jwt", True, id="default-at+jwt"),
    pytest.param(None, "application/at+jwt", True, id="default-application/at+jwt"),
    pytest.param(None, "AT+JWT", True, id="default-AT+JWT"),
    pytest.param(None, "dpop+jwt", False, id="default-dpop+jwt"),
    pytest.param(None, "secevent+jwt", False, id="default-secevent+jwt"),
    pytest.param(None, 1, False, id="default-number"),
    pytest.param(None, ["JWT"], False, id="default-list"),
    pytest.param("at+jwt", "at+jwt", True, id="at+jwt-at+jwt"),
    pytest.param("at+jwt", "application/at+jwt", True, id="at+jwt-application/at+jwt"),
    pytest.param("at+jwt", "AT+JWT", True, id="at+jwt-AT+JWT"),
    pytest.param("at+jwt", "JWT", False, id="at+jwt-JWT"),
    pytest.param("at+jwt", ABSENT, False, id="at+jwt-absent"),
    pytest.param("at+jwt", "dpop+jwt", False, id="at+jwt-dpop+jwt"),
    pytest.param("application/at+jwt", "at+jwt", True, id="application/at+jwt-at+jwt"),
    pytest.param("application/at+jwt", "JWT", False, id="application/at+jwt-JWT"),
]


@pytest.mark.parametrize(("configured", "typ", "accepted"), TYPES)
async def test_typ_header(make_gateway, idp, clock, rsa_key, configured, typ, accepted):
    gw = await make_gateway(None if configured is None else settings(typ=configured))
    if accepted:
        response = await get_api(gw, mint(rsa_key, clock, headers={"typ": typ}))
        assert response.status == 200
        return
    # A token of the wrong type is refused before any key lookup: an unknown kid past the
    # cooldown would otherwise cost a fetch.
    clock.advance(COOLDOWN)
    hits = idp.hits
    response = await get_api(gw, impostor(clock, typ=typ))
    assert response.status == 401
    assert await reason_of(response) == "token_type_invalid"
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert idp.hits == hits
    assert gw.metric("gateway_jwks_kid_misses_total", issuer=ISSUER_ID) == 0
    # The same rejection with a published key: the signature would verify, the type does not.
    signed = await get_api(gw, mint(rsa_key, clock, headers={"typ": typ}))
    assert signed.status == 401
    assert await reason_of(signed) == "token_type_invalid"


def test_typ_setting_must_be_a_media_type(idp, upstream):
    doc = base_config(idp, upstream)
    issuer_of(doc)["typ"] = "at jwt"
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(doc))
    assert caught.value.path == f"issuers.{ISSUER_ID}.typ"


# --- fetch metrics ----------------------------------------------------------------------------
def _idp_mode(mode: str, **values: Any) -> Callable[[FakeIdP], Edit | None]:
    def arrange(idp: FakeIdP) -> Edit | None:
        idp.mode = mode
        return settings(**values) if values else None

    return arrange


def _refused(idp: FakeIdP) -> Edit:
    return settings(jwks_uri=f"http://127.0.0.1:{free_port()}/jwks.json")


FETCH_RESULTS = [
    pytest.param(_idp_mode("ok"), "success", id="success"),
    pytest.param(_idp_mode("error"), "http_error", id="http_error"),
    pytest.param(_idp_mode("hang", jwks_fetch_timeout_s=0.2), "timeout", id="timeout"),
    pytest.param(_refused, "unreachable", id="unreachable"),
    pytest.param(_idp_mode("garbage"), "invalid", id="invalid-not-json"),
    pytest.param(_idp_mode("empty"), "invalid", id="invalid-no-keys"),
]


@pytest.mark.parametrize(("arrange", "result"), FETCH_RESULTS)
async def test_fetch_result_is_counted(make_gateway, idp, clock, token, arrange, result):
    gw = await make_gateway(arrange(idp))  # settles on the first fetch, whatever its result
    for label in JWKS_FETCH_RESULTS:
        assert fetches(gw, label) == (1 if label == result else 0), label
    response = await get_api(gw, token())
    if result == "success":
        assert response.status == 200
        assert (
            gw.metric("gateway_jwks_last_success_timestamp_seconds", issuer=ISSUER_ID)
            == clock.time()
        )
    else:
        await expect_unavailable(response)
        assert gw.metric("gateway_jwks_last_success_timestamp_seconds", issuer=ISSUER_ID) == 0


async def test_last_success_timestamp_is_the_time_of_the_last_good_fetch(make_gateway, idp, clock):
    gw: RunningGateway = await make_gateway()
    await idle(clock)

    def last_success() -> float:
        return gw.metric("gateway_jwks_last_success_timestamp_seconds", issuer=ISSUER_ID)

    first = clock.time()
    assert last_success() == first
    await advance_idle(clock, TTL - AHEAD)  # the background refresh
    assert idp.hits == 2
    assert last_success() == clock.time() == first + TTL - AHEAD

    idp.mode = "error"  # failed fetches leave it alone
    refreshed = clock.time()
    await advance_idle(clock, TTL - AHEAD)
    await advance_idle(clock, 1)
    assert idp.hits == 4
    assert last_success() == refreshed
    assert fetches(gw, "http_error") == 2
