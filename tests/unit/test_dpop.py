"""DPoP building blocks: the RFC 7638 thumbprint, the htu comparison, the replay cache."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from gateway.dpop import (
    NONCE_KEY_ENV,
    Nonces,
    Proof,
    ReplayCache,
    access_token_hash,
    check_proof,
    jwk_thumbprint,
    normalized_htu,
)
from gateway.errors import Rejection
from gateway.reasons import Reason
from tests.fakes import FakeClock, generate_key
from tests.integration.senderkit import DpopClient

# RFC 7638 §3.1: the example key and its thumbprint.
RFC_7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWK"
    "RXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMi"
    "cAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRw"
    "r3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)


def test_the_thumbprint_is_rfc_7638s_and_ignores_optional_members() -> None:
    jwk = {"kty": "RSA", "n": RFC_7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert jwk_thumbprint({"e": "AQAB", "kty": "RSA", "n": RFC_7638_N}) == jwk_thumbprint(jwk)


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "EC", "crv": "P-256", "x": "AA"},  # no y
        {"kty": "RSA", "n": 1, "e": "AQAB"},
        {"n": RFC_7638_N, "e": "AQAB"},
    ],
)
def test_a_jwk_that_is_no_public_key_has_no_thumbprint(jwk: dict[str, object]) -> None:
    with pytest.raises(Rejection) as refused:
        jwk_thumbprint(jwk)
    assert refused.value.reason is Reason.DPOP_PROOF_INVALID


def test_ath_is_the_base64url_sha256_of_the_token() -> None:
    # RFC 9449 §7.1's example access token and its ath (§4.3 Figure 6 of the RFC).
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert access_token_hash(token) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("https://api.example.com/x", "HTTPS://API.example.COM/x", True),
        ("https://api.example.com/x", "https://api.example.com:443/x", True),
        ("http://api.example.com/x", "http://api.example.com:80/x", True),
        ("https://api.example.com", "https://api.example.com/", True),
        ("https://api.example.com/x?a=1#f", "https://api.example.com/x", True),
        ("https://api.example.com/x", "https://api.example.com/X", False),
        ("https://api.example.com/x", "http://api.example.com/x", False),
        ("https://api.example.com:8443/x", "https://api.example.com/x", False),
        ("https://api.example.com/x", "https://api.example.org/x", False),
        ("https://[::1]:8443/x", "https://[::1]:8443/x", True),
    ],
)
def test_htu_is_compared_after_normalizing(a: str, b: str, same: bool) -> None:
    assert (normalized_htu(a) == normalized_htu(b)) is same
    assert normalized_htu(a) is not None


@pytest.mark.parametrize(
    "url", ["ftp://x/y", "/relative", "https://user@host/x", "https://host:99999/", ""]
)
def test_an_htu_that_is_no_http_url_matches_nothing(url: str) -> None:
    assert normalized_htu(url) is None


def test_the_replay_cache_remembers_a_proof_for_its_window_only() -> None:
    clock = FakeClock()
    cache = ReplayCache(10, clock)
    proof = Proof("jkt", "jti-1", clock.time())
    assert cache.first_use(proof, 60)
    assert not cache.first_use(proof, 60)
    assert cache.first_use(Proof("other-key", "jti-1", clock.time()), 60)  # keyed by key too
    clock.advance(59)
    assert not cache.first_use(proof, 60)
    clock.advance(2)
    assert cache.first_use(proof, 60)  # its window closed: forgotten (its iat is too old anyway)
    assert len(cache) == 1  # the expired entries went too


def test_a_full_replay_cache_forgets_its_oldest_and_counts() -> None:
    clock = FakeClock()
    cache = ReplayCache(2, clock)
    sizes: list[int] = []
    evicted: list[None] = []
    cache.observe(sizes.append, lambda: evicted.append(None))
    for jti in ("a", "b", "c"):
        assert cache.first_use(Proof("k", jti, clock.time()), 60)
    assert (len(cache), cache.evictions, sizes, len(evicted)) == (2, 1, [1, 2, 2], 1)
    assert cache.first_use(Proof("k", "a", clock.time()), 60)  # the evicted one
    assert not cache.first_use(Proof("k", "c", clock.time()), 60)


def test_workers_sharing_the_nonce_key_accept_each_others_nonces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setenv(NONCE_KEY_ENV, "ab" * 32)  # what the --workers supervisor sets
    one, other = Nonces(clock, 300), Nonces(clock, 300)
    assert other.valid(one.current())
    monkeypatch.delenv(NONCE_KEY_ENV)
    alone = Nonces(clock, 300)  # a key of its own
    assert not alone.valid(one.current())
    assert alone.valid(alone.current())


@pytest.mark.parametrize(
    "nonce", [None, 7, "", "abc", "1.", ".x", "9" * 21 + ".x", "9" * 5000 + ".x"]
)
def test_a_nonce_that_is_not_one_of_ours_is_refused(nonce: object) -> None:
    assert not Nonces(FakeClock(), 300).valid(nonce)


def test_a_proof_is_remembered_up_to_the_last_instant_its_iat_is_accepted() -> None:
    clock = FakeClock()
    cache = ReplayCache(10, clock)
    proof = Proof("k", "j", clock.time())
    assert cache.first_use(proof, 65)
    clock.advance(65)  # iat + max_age + leeway: check_proof still accepts this iat
    assert not cache.first_use(proof, 65)


def test_a_replay_cache_of_one_keeps_one_and_counts_every_eviction() -> None:
    clock = FakeClock()
    cache = ReplayCache(1, clock)
    for jti in ("a", "b", "c"):
        assert cache.first_use(Proof("k", jti, clock.time()), 60)
    assert (len(cache), cache.evictions) == (1, 2)
    assert not cache.first_use(Proof("k", "c", clock.time()), 60)


# --- check_proof's edges, on a fixed clock -------------------------------------------------------
NOW = 1_000_000.0
URL = "https://api.example/orders"


def _check(client: DpopClient, proof: str, **overrides: Any) -> None:
    options: dict[str, Any] = {
        "method": "GET", "url": URL, "access_token": "tok", "algorithms": frozenset({"ES256"}),
        "now": NOW, "max_age_s": 60.0, "leeway_s": 5.0, **overrides,
    }  # fmt: skip
    check_proof(proof, **options)


def _expect(holder: DpopClient, proof: str, accepted: bool) -> None:
    if accepted:
        _check(holder, proof)
        return
    with pytest.raises(Rejection) as refused:
        _check(holder, proof)
    assert refused.value.reason is Reason.DPOP_PROOF_INVALID


@pytest.fixture(scope="module")
def holder() -> DpopClient:
    return DpopClient("ES256")


@pytest.mark.parametrize(
    ("iat", "accepted"), [(NOW + 5, True), (NOW + 6, False), (NOW - 65, True), (NOW - 66, False)]
)
def test_iat_is_accepted_up_to_the_edges_of_its_window(
    holder: DpopClient, iat: float, accepted: bool
) -> None:
    proof = holder.proof("GET", URL, "tok", now=iat)
    _expect(holder, proof, accepted)


@pytest.mark.parametrize(
    ("jti", "accepted"),
    [("", False), (7, False), (None, False), ("j" * 256, True), ("j" * 257, False)],
)
def test_jti_must_be_a_string_of_1_to_256_characters(
    holder: DpopClient, jti: object, accepted: bool
) -> None:
    proof = holder.proof("GET", URL, "tok", now=NOW, jti=jti)
    _expect(holder, proof, accepted)


def test_a_jwk_that_does_not_fit_the_alg_is_refused(holder: DpopClient) -> None:
    # An EC key claiming RS256: no key for that algorithm can be built from it.
    proof = holder.proof("GET", URL, "tok", now=NOW, header={"alg": "ES256"})
    rs_claims = jwt.decode(proof, options={"verify_signature": False})
    forged = jwt.encode(
        rs_claims, generate_key("RS256", "x").private, algorithm="RS256",
        headers={"typ": "dpop+jwt", "jwk": holder.jwk},
    )  # fmt: skip
    with pytest.raises(Rejection) as refused:
        _check(holder, forged, algorithms=frozenset({"ES256", "RS256"}))
    assert refused.value.reason is Reason.DPOP_PROOF_INVALID


def test_a_large_signed_payload_that_is_not_json_is_refused(holder: DpopClient) -> None:
    # Over the size decoded before the signature: decoded after it, and refused there.
    header = {"typ": "dpop+jwt", "jwk": holder.jwk}
    proof = jwt.api_jws.encode(b"x" * 5000, holder.key.private, algorithm="ES256", headers=header)
    with pytest.raises(Rejection) as refused:
        _check(holder, proof)
    assert refused.value.reason is Reason.DPOP_PROOF_INVALID
