"""DPoP (RFC 9449) through the HTTP surface: a DPoP-bound token is accepted only with a fresh
proof made by the key it is bound to, for this request; each attack gets its reason and the
RFC 9449 §7.1 challenge.

Tokens come from the fake identity provider's key (``cnf.jkt`` is a claim like any other); the
client makes its proofs with its own key pair (tests/integration/senderkit.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from tests.conftest import GatewayFactory, RunningGateway, bearer, metric_value
from tests.fakes import FakeClock, generate_key
from tests.integration.senderkit import DpopClient, dpop

ALGS = "ES256 EdDSA PS256 RS256"
Edit = Callable[[dict[str, Any]], None]


def dpop_route(mode: str, **settings: Any) -> Edit:
    """The api route with ``auth.dpop: mode``; ``settings`` go to the top-level dpop block."""

    def edit(doc: dict[str, Any]) -> None:
        route = doc["routes"][0]
        route["auth"]["dpop"] = mode
        route["claim_headers"]["X-Dpop-Jkt"] = "cnf.jkt"
        doc["dpop"] = {"algorithms": ALGS.split(), **settings}

    return edit


@pytest.fixture
def client() -> DpopClient:
    return DpopClient("ES256")


@pytest.fixture
def bound(token: Callable[..., str], client: DpopClient) -> str:
    """A token bound to the client's key."""
    return token(cnf={"jkt": client.jkt})


def url(gw: RunningGateway, path: str = "/api/orders") -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


async def call(
    gw: RunningGateway, headers: dict[str, str], path: str = "/api/orders", method: str = "GET"
) -> tuple[int, str, list[str]]:
    """Status, reason (or "ok") and the WWW-Authenticate values of one request."""
    async with gw.client.request(method, path, headers=headers) as response:
        body = await response.read()
        challenges = response.headers.getall("WWW-Authenticate", [])
        if response.status == 200:
            return 200, "ok", challenges
        return response.status, json.loads(body)["error"]["reason"], challenges


def proof_challenge(error: str, message: str) -> str:
    return f'DPoP realm="gateway", algs="{ALGS}", error="{error}", error_description="{message}"'


# --- accepted -------------------------------------------------------------------------------
async def test_a_bound_token_with_a_fresh_proof_passes_and_the_upstream_sees_no_proof(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required"))
    proof = client.proof("GET", url(gw), bound, now=clock.time())
    async with gw.client.get("/api/orders", headers=dpop(bound, proof)) as response:
        assert response.status == 200
        seen = {name.lower(): value for name, value in (await response.json())["headers"]}
    assert "dpop" not in seen
    assert "authorization" not in seen
    assert seen["x-dpop-jkt"] == client.jkt  # the verified binding, as a claim header
    assert seen["x-user-sub"] == "alice"


async def test_the_query_is_not_part_of_htu_and_scheme_and_host_case_do_not_matter(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required"))
    proof = client.proof("GET", f"HTTP://127.0.0.1:{gw.port}/api/orders", bound, now=clock.time())
    assert (await call(gw, dpop(bound, proof), "/api/orders?page=2"))[:2] == (200, "ok")


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA"])
async def test_each_pinned_proof_algorithm_is_accepted(
    make_gateway: GatewayFactory, token: Callable[..., str], clock: FakeClock, alg: str
) -> None:
    holder = DpopClient(alg)
    gw = await make_gateway(dpop_route("required"))
    access = token(cnf={"jkt": holder.jkt})
    proof = holder.proof("POST", url(gw), access, now=clock.time())
    assert (await call(gw, dpop(access, proof), method="POST"))[:2] == (200, "ok")


async def test_an_allowed_route_takes_an_unbound_bearer_token_and_challenges_both_schemes(
    make_gateway: GatewayFactory, token: Callable[..., str]
) -> None:
    gw = await make_gateway(dpop_route("allowed"))
    assert (await call(gw, bearer(token())))[:2] == (200, "ok")
    status, reason, challenges = await call(gw, {})
    assert (status, reason) == (401, "token_missing")
    assert challenges == ['Bearer realm="gateway"', f'DPoP realm="gateway", algs="{ALGS}"']


# --- refused: the attacks of the issue, each with its reason ------------------------------------
async def test_a_replayed_proof_is_refused(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required"))
    proof = client.proof("GET", url(gw), bound, now=clock.time())
    assert (await call(gw, dpop(bound, proof)))[:2] == (200, "ok")
    status, reason, challenges = await call(gw, dpop(bound, proof))
    assert (status, reason) == (401, "dpop_proof_replayed")
    assert challenges == [proof_challenge("invalid_dpop_proof", "The DPoP proof was already used.")]
    assert metric_value(gw.registry, "gateway_dpop_replay_cache_entries") == 1
    assert (
        metric_value(
            gw.registry, "gateway_requests_total", route="api", reason="dpop_proof_replayed"
        )
        == 1
    )


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda c, gw, t, now: c.proof("POST", url(gw), t, now=now), id="other-method"),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw, "/api/other"), t, now=now), id="other-path"
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", "http://evil.test/api/orders", t, now=now),
            id="other-host",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw).replace("http:", "https:"), t, now=now),
            id="other-scheme",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t + "x", now=now),
            id="ath-of-another-token",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now, omit=("ath",)), id="no-ath"
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now, omit=("jti",)), id="no-jti"
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now, omit=("htm",)), id="no-htm"
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now - 120), id="iat-too-old"
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now + 60), id="iat-in-the-future"
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now, iat="now"),
            id="iat-not-a-number",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now, header={"typ": "JWT"}),
            id="typ-jwt",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof("GET", url(gw), t, now=now, header={"jwk": None}),
            id="no-jwk",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof(
                "GET", url(gw), t, now=now, header={"jwk": {**c.jwk, "d": "AAAA"}}
            ),
            id="jwk-with-private-members",
        ),
        pytest.param(
            lambda c, gw, t, now: c.proof(
                "GET", url(gw), t, now=now, signer=generate_key("ES256", "x")
            ),
            id="signed-by-a-key-other-than-its-jwk",
        ),
        pytest.param(lambda c, gw, t, now: _unsigned(c, url(gw), t, now), id="alg-none"),
        pytest.param(lambda c, gw, t, now: _hmac(c, url(gw), t, now), id="alg-hs256"),
        pytest.param(lambda c, gw, t, now: "not.a.jws", id="not-a-jws"),
    ],
)
async def test_a_proof_that_fails_a_check_is_refused(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str, make: Any
) -> None:
    gw = await make_gateway(dpop_route("required"))
    status, reason, challenges = await call(gw, dpop(bound, make(client, gw, bound, clock.time())))
    assert (status, reason) == (401, "dpop_proof_invalid")
    assert challenges == [proof_challenge("invalid_dpop_proof", "The DPoP proof is invalid.")]


def _private_jwk(client: DpopClient) -> dict[str, Any]:
    """The client's own key with its private half: a proof must never carry one."""
    return {**client.jwk, **ECAlgorithm.to_jwk(client.key.private, as_dict=True)}


async def test_a_proof_whose_jwk_has_private_members_is_refused_even_if_it_verifies(
    make_gateway: GatewayFactory, token: Callable[..., str], clock: FakeClock
) -> None:
    # An Ed25519 private JWK still verifies with PyJWT (it takes the public half): only the
    # private-member check refuses a client that publishes its private key.
    holder = DpopClient("EdDSA")
    access = token(cnf={"jkt": holder.jkt})
    gw = await make_gateway(dpop_route("required"))
    private = {**holder.jwk, **OKPAlgorithm.to_jwk(holder.key.private, as_dict=True)}
    proof = holder.proof("GET", url(gw), access, now=clock.time(), header={"jwk": private})
    assert (await call(gw, dpop(access, proof)))[:2] == (401, "dpop_proof_invalid")


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}"


def _claims(client: DpopClient, htu: str, token: str, now: float) -> dict[str, Any]:
    return jwt.decode(client.proof("GET", htu, token, now=now), options={"verify_signature": False})


def _unsigned(client: DpopClient, htu: str, token: str, now: float) -> str:
    head = {"typ": "dpop+jwt", "alg": "none", "jwk": client.jwk}
    return _segments(head, _claims(client, htu, token, now)) + "."


def _hmac(client: DpopClient, htu: str, token: str, now: float) -> str:
    # The classic confusion: HMAC keyed with the public key's bytes.
    head = {"typ": "dpop+jwt", "alg": "HS256", "jwk": client.jwk}
    signing_input = _segments(head, _claims(client, htu, token, now))
    secret = json.dumps(client.jwk).encode()
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def test_a_proof_within_the_leeway_passes(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required", proof_max_age_s=60, proof_leeway_s=5))
    for skew in (-64, 4):  # 60 s old plus 4 s of skew; 4 s ahead
        proof = client.proof("GET", url(gw), bound, now=clock.time() + skew)
        assert (await call(gw, dpop(bound, proof)))[:2] == (200, "ok"), skew


async def test_a_stolen_token_without_a_proof_is_refused(
    make_gateway: GatewayFactory, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required"))
    assert (await call(gw, {"Authorization": f"DPoP {bound}"}))[:2] == (401, "dpop_proof_invalid")


async def test_two_proofs_are_refused(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required"))
    proof = client.proof("GET", url(gw), bound, now=clock.time())
    other = client.proof("GET", url(gw), bound, now=clock.time())
    async with gw.client.get(
        "/api/orders",
        headers=[("Authorization", f"DPoP {bound}"), ("DPoP", proof), ("DPoP", other)],
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"]["reason"] == "dpop_proof_invalid"


async def test_a_proof_by_a_key_other_than_cnf_jkt_is_a_binding_mismatch(
    make_gateway: GatewayFactory, clock: FakeClock, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required"))
    thief = DpopClient("ES256")  # a valid proof, by the thief's own key
    proof = thief.proof("GET", url(gw), bound, now=clock.time())
    status, reason, challenges = await call(gw, dpop(bound, proof))
    assert (status, reason) == (401, "dpop_binding_mismatch")
    assert challenges == [
        proof_challenge("invalid_token", "The token is not bound to the key of the DPoP proof.")
    ]


async def test_an_unbound_token_with_the_dpop_scheme_is_a_binding_mismatch(
    make_gateway: GatewayFactory, token: Callable[..., str], clock: FakeClock, client: DpopClient
) -> None:
    gw = await make_gateway(dpop_route("allowed"))
    plain = token()
    proof = client.proof("GET", url(gw), plain, now=clock.time())
    assert (await call(gw, dpop(plain, proof)))[:2] == (401, "dpop_binding_mismatch")


@pytest.mark.parametrize("mode", ["required", "allowed", None])
async def test_a_dpop_bound_token_sent_as_bearer_is_refused_on_every_route(
    make_gateway: GatewayFactory, bound: str, mode: str | None
) -> None:
    gw = await make_gateway(dpop_route(mode) if mode else None)
    assert (await call(gw, bearer(bound)))[:2] == (401, "dpop_binding_mismatch")


async def test_a_required_route_refuses_a_plain_bearer_token_with_the_dpop_challenge(
    make_gateway: GatewayFactory, token: Callable[..., str]
) -> None:
    gw = await make_gateway(dpop_route("required"))
    status, reason, challenges = await call(gw, bearer(token()))
    assert (status, reason) == (401, "dpop_required")
    assert challenges == [
        proof_challenge("invalid_token", "This route requires a DPoP-bound token and proof.")
    ]


async def test_an_invalid_token_on_a_dpop_route_gets_the_dpop_challenge(
    make_gateway: GatewayFactory, token: Callable[..., str], clock: FakeClock, client: DpopClient
) -> None:
    gw = await make_gateway(dpop_route("required"))
    expired = token(cnf={"jkt": client.jkt}, exp=int(clock.time()) - 3600)
    proof = client.proof("GET", url(gw), expired, now=clock.time())
    status, reason, challenges = await call(gw, dpop(expired, proof))
    assert (status, reason) == (401, "token_expired")
    assert challenges == [proof_challenge("invalid_token", "The token has expired.")]


# --- the replay cache and the URL the proof names ---------------------------------------------
async def test_a_full_replay_cache_forgets_the_oldest_proof_and_counts_it(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required", replay_cache_size=2))
    proofs = [client.proof("GET", url(gw), bound, now=clock.time()) for _ in range(3)]
    for proof in proofs:
        assert (await call(gw, dpop(bound, proof)))[:2] == (200, "ok")
    assert metric_value(gw.registry, "gateway_dpop_replay_cache_entries") == 2
    assert metric_value(gw.registry, "gateway_dpop_replay_evictions_total") == 1
    # The two newest are still remembered.
    assert (await call(gw, dpop(bound, proofs[2])))[:2] == (401, "dpop_proof_replayed")


async def test_a_proof_is_remembered_for_its_whole_window_and_then_too_old(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required", proof_max_age_s=60, proof_leeway_s=5))
    proof = client.proof("GET", url(gw), bound, now=clock.time())
    assert (await call(gw, dpop(bound, proof)))[:2] == (200, "ok")
    clock.advance(64)  # inside the window: remembered
    assert (await call(gw, dpop(bound, proof)))[:2] == (401, "dpop_proof_replayed")
    clock.advance(2)  # past it: forgotten, and its iat is too old
    assert (await call(gw, dpop(bound, proof)))[:2] == (401, "dpop_proof_invalid")


async def test_with_a_public_url_the_proof_must_name_it(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required", public_url="https://api.example.com"))
    seen_here = client.proof("GET", url(gw), bound, now=clock.time())
    assert (await call(gw, dpop(bound, seen_here)))[:2] == (401, "dpop_proof_invalid")
    public = client.proof("GET", "https://api.example.com/api/orders", bound, now=clock.time())
    assert (await call(gw, dpop(bound, public)))[:2] == (200, "ok")


@pytest.mark.parametrize("trusted", [True, False])
async def test_forwarded_scheme_and_host_count_only_from_trusted_proxies(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str, trusted: bool
) -> None:
    def trust(doc: dict[str, Any]) -> None:
        doc["trusted_proxies"] = ["127.0.0.1/32"] if trusted else ["10.0.0.0/8"]

    gw = await make_gateway(dpop_route("required"), trust)
    proof = client.proof("GET", "https://api.example.com/api/orders", bound, now=clock.time())
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"}
    expected = (200, "ok") if trusted else (401, "dpop_proof_invalid")
    assert (await call(gw, {**dpop(bound, proof), **forwarded}))[:2] == expected


# --- server nonces (RFC 9449 §9) ---------------------------------------------------------------
async def test_with_nonces_a_proof_without_one_gets_a_nonce_to_retry_with(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    gw = await make_gateway(dpop_route("required", nonce=True, nonce_lifetime_s=300))
    first = client.proof("GET", url(gw), bound, now=clock.time())
    async with gw.client.get("/api/orders", headers=dpop(bound, first)) as response:
        assert response.status == 401
        assert (await response.json())["error"]["reason"] == "dpop_nonce_required"
        assert response.headers.getall("WWW-Authenticate") == [
            proof_challenge(
                "use_dpop_nonce",
                "A fresh DPoP nonce is required; retry with the one in DPoP-Nonce.",
            )
        ]
        nonce = response.headers["DPoP-Nonce"]
    retry = client.proof("GET", url(gw), bound, now=clock.time(), nonce=nonce)
    assert (await call(gw, dpop(bound, retry)))[:2] == (200, "ok")
    # The first proof was refused, not spent: it never counts as seen.
    assert metric_value(gw.registry, "gateway_dpop_replay_cache_entries") == 1


async def test_a_nonce_is_good_for_its_lifetime_and_the_next_then_replaced(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, token: Callable[..., str]
) -> None:
    bound = token(cnf={"jkt": client.jkt}, exp=int(clock.time()) + 3600)  # outlives the windows
    gw = await make_gateway(dpop_route("required", nonce=True, nonce_lifetime_s=300))
    async with gw.client.get("/api/orders", headers={"Authorization": f"DPoP {bound}"}) as reply:
        nonce = reply.headers["DPoP-Nonce"]  # every DPoP challenge carries the current one

    async def with_nonce(value: str) -> tuple[int, str]:
        proof = client.proof("GET", url(gw), bound, now=clock.time(), nonce=value)
        status, reason, _ = await call(gw, dpop(bound, proof))
        return status, reason

    clock.advance(300)  # the next window: the previous nonce still passes
    assert await with_nonce(nonce) == (200, "ok")
    clock.advance(300)  # two windows on: replaced
    assert await with_nonce(nonce) == (401, "dpop_nonce_required")
    window, _, mac = nonce.partition(".")
    assert await with_nonce(f"{int(window) + 2}.{mac}") == (401, "dpop_nonce_required")  # forged


async def test_a_route_without_dpop_reads_no_token_from_the_dpop_scheme(
    make_gateway: GatewayFactory, clock: FakeClock, client: DpopClient, bound: str
) -> None:
    # Only a DPoP route looks in Authorization: DPoP; elsewhere it is another scheme (RFC 6750
    # §3.1: the request lacks authentication), whatever proof comes with it.
    gw = await make_gateway()
    proof = client.proof("GET", url(gw), bound, now=clock.time())
    assert (await call(gw, dpop(bound, proof)))[:2] == (401, "token_missing")
