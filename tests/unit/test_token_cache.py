"""The verified-token cache: how long an entry counts, what it weighs, which one goes first, and
the two spellings of one ECDSA signature as one entry."""

from __future__ import annotations

import base64
import gc
import json
import tracemalloc
from typing import Any

import jwt
import pytest
from jwt import PyJWK

from gateway.config import IssuerConfig
from gateway.token_cache import KEY_CHARS, TokenCache, ecdsa_twin, entry_weight
from gateway.verifier import VerifiedToken, _json_object
from tests.fakes import FakeClock, SigningKey, make_token

WALL = 1_700_000_000.0
NOW = int(WALL)
ISS = "https://idp.test"
ISSUER = IssuerConfig(
    id="test",
    issuer=ISS,
    jwks_uri="https://idp.test/jwks.json",
    algorithms=frozenset({"RS256", "ES256", "ES384", "ES512", "EdDSA"}),
)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_HEADER = _b64(b'{"alg":"ES256","kid":"k"}')
_PAYLOAD = _b64(b'{"iss":"https://idp.test","exp":9999999999}')


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=WALL)


def _verified(alg: str = "RS256", sub: str = "a") -> VerifiedToken:
    return VerifiedToken({"sub": sub}, ISSUER, "k", "e30", alg)


def _token(key: SigningKey, clock: FakeClock) -> str:
    return make_token(key, clock, iss=ISS, aud="api", sub="alice")


def _spellings(key: SigningKey, clock: FakeClock) -> tuple[str, str]:
    token = _token(key, clock)
    twin = ecdsa_twin(token)
    assert twin is not None
    assert twin[1] == key.alg
    return token, twin[0]


# --- how long an entry counts ------------------------------------------------------------------
def test_an_entry_serves_until_its_exp_and_not_at_it(clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    verified = _verified()
    cache.put("t", verified, NOW + 60, 100)
    clock.advance(59.5)
    assert cache.get("t") is verified
    clock.advance(0.5)  # exp itself: the full verification decides (token_expired)
    assert cache.get("t") is None
    assert (len(cache), cache.weight) == (0, 0)  # dropped, its bytes given back
    clock.advance(-1)
    assert cache.get("t") is None  # gone, not merely hidden


def test_an_entry_is_judged_at_the_instant_given(clock: FakeClock) -> None:
    """The verifier reads the time once per hit and hands it over: exp is compared with that
    instant, not with a second reading of the clock."""
    cache = TokenCache(10, clock)
    verified = _verified()
    cache.put("t", verified, NOW + 60, 100)
    assert cache.get("t", now=NOW + 59.5) is verified
    assert cache.get("t", now=NOW + 60) is None  # the clock still reads NOW
    assert len(cache) == 0


def test_an_expired_twin_entry_is_dropped_too(es: SigningKey, clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    token, twin = _spellings(es, clock)
    cache.put(token, _verified("ES256"), NOW + 60, 100)
    clock.advance(60)
    assert cache.get(twin) is None
    assert (len(cache), cache.weight) == (0, 0)


def test_an_unknown_token_is_a_miss(clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    cache.put("t", _verified(), NOW + 60, 100)
    assert cache.get("u") is None
    assert cache.get(f"{_HEADER}.{_PAYLOAD}.{_b64(b'x' * 64)}") is None  # a twin, not cached


def test_membership_is_of_the_exact_spelling_held(es: SigningKey, clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    token, twin = _spellings(es, clock)
    cache.put(token, _verified("ES256"), NOW + 60, 100)
    assert token in cache
    assert twin not in cache  # get() answers for it; membership is of what was put
    assert "u" not in cache
    clock.advance(120)
    assert token in cache  # past exp, still a token that verified once (get() drops it)
    assert cache.get(token) is None
    assert token not in cache


# --- a key is a token's end ----------------------------------------------------------------------
_SIGNATURE_END = "s" * KEY_CHARS


def test_a_token_that_only_ends_like_a_cached_one_is_a_miss(clock: FakeClock) -> None:
    """Entries are held under a token's last characters: one that ends the same but differs
    before (another payload under a copied signature) is neither served nor taken as held,
    and the entry it resembles stays as it was."""
    cache = TokenCache(10, clock)
    verified = _verified()
    cache.put(f"h.p.{_SIGNATURE_END}", verified, NOW + 60, 100)
    forged = f"h.q.{_SIGNATURE_END}"
    assert cache.get(forged) is None
    assert forged not in cache
    assert cache.get(f"h.p.{_SIGNATURE_END}") is verified
    assert (len(cache), cache.weight) == (1, 100)


def test_a_token_ending_like_a_held_one_replaces_it_once(clock: FakeClock) -> None:
    """Two tokens that verified and share an end (not expected of signatures, and harmless)
    share one entry: the later one, its weight counted once."""
    cache = TokenCache(10, clock)
    first, second = _verified(sub="a"), _verified(sub="b")
    cache.put(f"h.p.{_SIGNATURE_END}", first, NOW + 60, 100)
    cache.put(f"h.q.{_SIGNATURE_END}", second, NOW + 60, 70)
    assert cache.get(f"h.p.{_SIGNATURE_END}") is None
    assert cache.get(f"h.q.{_SIGNATURE_END}") is second
    assert (len(cache), cache.weight) == (1, 70)


def test_membership_is_only_of_strings(clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    cache.put("t", _verified(), NOW + 60, 100)
    assert "t" in cache
    assert None not in cache  # a TypeError without the check


# --- bounds ------------------------------------------------------------------------------------
def test_the_cache_evicts_to_its_byte_bound(clock: FakeClock) -> None:
    cache = TokenCache(100, clock, max_bytes=10_000)
    for i in range(10):
        cache.put(f"t{i}", _verified(), NOW + 60, 3_000)
    assert len(cache) == 3
    assert cache.weight == 9_000
    assert cache.get("t9") is not None
    assert cache.get("t0") is None
    cache.put("huge", _verified(), NOW + 60, 10_001)  # heavier than the whole bound
    assert cache.get("huge") is None
    assert len(cache) == 3
    cache.put("t9", _verified(), NOW + 60, 1_000)  # replaced, not counted twice
    assert cache.weight == 7_000


def test_an_entry_of_exactly_the_byte_bound_is_kept_alone(clock: FakeClock) -> None:
    cache = TokenCache(100, clock, max_bytes=10_000)
    cache.put("small", _verified(), NOW + 60, 1)
    cache.put("whole", _verified(), NOW + 60, 10_000)
    assert cache.get("whole") is not None
    assert cache.get("small") is None
    assert (len(cache), cache.weight) == (1, 10_000)


def test_the_cache_bounds_entries(clock: FakeClock) -> None:
    cache = TokenCache(2, clock, max_bytes=10_000)
    for i in range(5):
        cache.put(f"t{i}", _verified(), NOW + 60, 10)
    assert len(cache) == 2
    assert cache.weight == 20
    assert [token for token, _ in cache.items()] == ["t3", "t4"]


def test_a_one_entry_cache_keeps_the_latest(clock: FakeClock) -> None:
    cache = TokenCache(1, clock)
    cache.put("a", _verified(), NOW + 60, 10)
    assert cache.get("a") is not None
    cache.put("b", _verified(), NOW + 60, 10)
    assert (cache.get("a") is None, cache.get("b") is not None) == (True, True)


def test_a_zero_entry_cache_stores_nothing(clock: FakeClock) -> None:
    cache = TokenCache(0, clock)
    cache.put("t", _verified(), NOW + 60, 10)
    assert cache.get("t") is None
    assert (len(cache), cache.weight) == (0, 0)


def test_the_least_recently_used_entry_goes_first(clock: FakeClock) -> None:
    cache = TokenCache(2, clock)
    first, second = _verified(sub="first"), _verified(sub="second")
    cache.put("first", first, NOW + 60, 10)
    cache.put("second", second, NOW + 60, 10)
    assert cache.get("first") is first  # now the most recent
    cache.put("third", _verified(), NOW + 60, 10)
    assert cache.get("first") is first
    assert cache.get("second") is None


def test_a_twin_hit_counts_as_use(es: SigningKey, clock: FakeClock) -> None:
    cache = TokenCache(2, clock)
    token, twin = _spellings(es, clock)
    cache.put(token, _verified("ES256"), NOW + 60, 10)
    cache.put("other", _verified(), NOW + 60, 10)
    assert cache.get(twin) is not None  # the entry under ``token`` is now the most recent
    cache.put("third", _verified(), NOW + 60, 10)
    assert cache.get(token) is not None
    assert cache.get("other") is None


def test_an_entry_used_since_it_came_round_gets_one_more_round(clock: FakeClock) -> None:
    """Second chance: the oldest entry goes unless it was used since it last came round; a used
    one goes to the back unmarked, so unused again it goes next time."""
    cache = TokenCache(3, clock)
    for token in ("a", "b", "c"):
        cache.put(token, _verified(sub=token), NOW + 60, 10)
    assert cache.get("b") is not None
    cache.put("d", _verified(), NOW + 60, 10)  # a goes (unused)
    cache.put("e", _verified(), NOW + 60, 10)  # b is kept, c goes
    assert [token for token, _ in cache.items()] == ["d", "b", "e"]
    cache.put("f", _verified(), NOW + 60, 10)
    cache.put("g", _verified(), NOW + 60, 10)  # d, then b (unmarked when kept) go
    assert [token for token, _ in cache.items()] == ["e", "f", "g"]


def test_every_entry_used_still_makes_room_for_one(clock: FakeClock) -> None:
    cache = TokenCache(2, clock, max_bytes=100)
    cache.put("a", _verified(), NOW + 60, 50)
    cache.put("b", _verified(), NOW + 60, 50)
    assert cache.get("a") is not None
    assert cache.get("b") is not None
    cache.put("c", _verified(), NOW + 60, 50)
    assert [token for token, _ in cache.items()] == ["b", "c"]
    assert (len(cache), cache.weight) == (2, 100)


def test_an_expired_probed_entry_drops_only_itself(clock: FakeClock) -> None:
    """A membership test remembers the entry it found for the lookup after it; if another
    entry took that entry's place meanwhile, an expired probed token drops nothing else."""
    cache = TokenCache(10, clock)
    first = f"h.p.{'s' * KEY_CHARS}"
    cache.put(first, _verified(), NOW + 60, 10)
    assert first in cache
    second = _verified(sub="b")
    cache.put(f"h.q.{'s' * KEY_CHARS}", second, NOW + 120, 10)
    clock.advance(60)
    assert cache.get(first) is None
    assert cache.get(f"h.q.{'s' * KEY_CHARS}") is second


def test_a_probe_serves_only_the_token_it_found(clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    verified = _verified()
    cache.put("t", verified, NOW + 60, 10)
    assert "t" in cache
    assert cache.get("u") is None  # another token: searched, not the probed entry
    assert cache.get("t") is verified


def test_replacing_an_entry_keeps_its_weight_once(clock: FakeClock) -> None:
    cache = TokenCache(10, clock, max_bytes=100)
    cache.put("t", _verified(), NOW + 60, 60)
    replacement = _verified(sub="new")
    cache.put("t", replacement, NOW + 60, 60)  # 120 if the old weight were kept
    assert cache.get("t") is replacement
    assert (len(cache), cache.weight) == (1, 60)


# --- what an entry weighs ----------------------------------------------------------------------
def _payload_text(**extra: Any) -> bytes:
    claims = {"iss": ISS, "aud": "api", "sub": "alice", "exp": NOW + 60, **extra}
    return json.dumps(claims, separators=(",", ":")).encode()


def _traced_claims(text: bytes) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        claims = _json_object(text, "payload")
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert claims is not None
    return after - before


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([{}] * 1900, id="tiny-objects"),
        pytest.param([[]] * 2800, id="tiny-arrays"),
        pytest.param(json.loads("[" * 900 + "]" * 900), id="nested-arrays"),
        pytest.param(json.loads('{"":' * 400 + "0" + "}" * 400), id="nested-objects"),
        pytest.param({f"{i:x}": i for i in range(700)}, id="members"),
        pytest.param([1.5] * 1400, id="floats"),
        pytest.param([10**30 + i for i in range(150)], id="big-integers"),
        pytest.param(["ab"] * 1100, id="short-strings"),
        pytest.param(["\U0001f600" + "a" * 40] * 100, id="astral-strings"),
        pytest.param(["\u0100"] * 900, id="wide-one-char-strings"),
        pytest.param("x" * 5000, id="one-long-string"),
        pytest.param(
            {
                "realm_access": {"roles": ["offline_access", "uma_authorization"]},
                "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
                "allowed-origins": ["https://app.example.com"],
                "email_verified": True,
                "name": "Alice Example",
                "sid": "0c9d7e2a-1111-2222-3333-444455556666",
            },
            id="keycloak-like",
        ),
    ],
)
def test_entry_weight_bounds_what_the_claims_hold(value: Any) -> None:
    """The cache's weight (computed from the JSON text) is never below what decoding it
    allocates, measured by tracemalloc, for hostile shapes and ordinary ones."""
    text = _payload_text(x=value)
    assert entry_weight("", text) >= _traced_claims(text)


@pytest.mark.parametrize(
    ("token", "text", "weight"),
    [
        # 830 (the entry, its key of KEY_CHARS characters, two str headers) + the token
        # + its segment (4/3 of the text, + 4) + the claims: the text's bytes and the objects
        # they decode to
        pytest.param("", b"", 830 + 4 + 56, id="empty"),  # one value
        pytest.param("", b"{}", 830 + 6 + 2 + 184 + 56, id="empty-object"),  # a dict, a value
        # a dict, a member (slot 40 + key 56), a list (88), 2 list slots (16 each), 4 values
        pytest.param(
            "t" * 10, b'{"a":[1,2]}', 830 + 10 + 18 + 11 + 184 + 96 + 88 + 32 + 224, id="ascii"
        ),
        # not ASCII: 4 bytes a character, 80 a header
        pytest.param("", '{"a":"é"}'.encode(), 830 + 17 + 40 + 184 + 120 + 160, id="wide"),
        pytest.param("", b'{"a":"\\u00e9"}', 830 + 22 + 56 + 184 + 120 + 160, id="escaped"),
    ],
)
def test_entry_weight_of_known_shapes(token: str, text: bytes, weight: int) -> None:
    """What a shape weighs decides how many entries the byte bound holds: pinned exactly."""
    assert entry_weight(token, text) == weight


# --- one ECDSA signature, two spellings ------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_ecdsa_twin_is_the_other_valid_spelling(
    alg: str, signing_keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    key = signing_keys[alg]
    token, twin = _spellings(key, clock)
    assert twin != token
    assert twin.rpartition(".")[0] == token.rpartition(".")[0]
    assert ecdsa_twin(twin) == (token, alg)
    public = PyJWK(key.public_jwk(), algorithm=alg)
    for spelling in (token, twin):
        claims = jwt.decode(
            spelling, public, algorithms=[alg], audience="api", options={"verify_exp": False}
        )
        assert claims["sub"] == "alice"


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(_b64(b"\x01" * 32 + b"\x00" * 32), id="s-zero"),
        pytest.param(_b64(b"\x01" * 32 + b"\xff" * 32), id="s-above-n"),
        pytest.param(
            _b64(
                b"\x01" * 32
                + bytes.fromhex("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551")
            ),
            id="s-equals-n",
        ),
        pytest.param(_b64(b"\x01" * 63), id="63-bytes"),
        pytest.param(_b64(b"\x01" * 256), id="rsa-sized"),
        pytest.param("", id="empty"),
        pytest.param("*" * 86, id="not-base64url"),
        pytest.param("A" * 85 + "=", id="padded"),
    ],
)
def test_ecdsa_twin_needs_a_signature_that_can_verify(signature: str) -> None:
    assert ecdsa_twin(f"{_HEADER}.{_PAYLOAD}.{signature}") is None


def test_ecdsa_twin_of_the_smallest_s() -> None:
    n = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)
    r = b"\x01" * 32
    token = f"{_HEADER}.{_PAYLOAD}.{_b64(r + (1).to_bytes(32, 'big'))}"
    twin = f"{_HEADER}.{_PAYLOAD}.{_b64(r + (n - 1).to_bytes(32, 'big'))}"
    assert ecdsa_twin(token) == (twin, "ES256")
    assert ecdsa_twin(twin) == (token, "ES256")


N384 = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
    "581A0DB248B0A77AECEC196ACCC52973",
    16,
)


@pytest.mark.parametrize(
    "s",
    [
        pytest.param(0x17, id="this-spelling-ends-in-X"),  # low 6 bits 23: 'X'
        pytest.param(0x1C, id="the-twin-ends-in-X"),  # n - s ends in 0x57: 'X' again
    ],
)
def test_ecdsa_twin_of_a_spelling_ending_in_any_letter(s: int) -> None:
    """ES384 signatures (128 characters) use every bit of their last character."""
    r = b"\x01" * 48
    token = f"{_HEADER}.{_PAYLOAD}.{_b64(r + s.to_bytes(48, 'big'))}"
    twin = f"{_HEADER}.{_PAYLOAD}.{_b64(r + (N384 - s).to_bytes(48, 'big'))}"
    assert "X" in (token[-1], twin[-1])
    assert ecdsa_twin(token) == (twin, "ES384")
    assert ecdsa_twin(twin) == (token, "ES384")


def test_ecdsa_twin_needs_a_signed_token() -> None:
    assert ecdsa_twin(_b64(b"\x01" * 32 + b"\x02" * 32)) is None  # no dot: not a JWS


def test_ecdsa_twin_refuses_a_non_canonical_spelling(es: SigningKey, clock: FakeClock) -> None:
    token, _ = _spellings(es, clock)
    last = ALPHABET.index(token[-1])
    assert ecdsa_twin(token[:-1] + ALPHABET[last | 1]) is None  # 86 chars: 4 unused bits


def test_the_cache_finds_an_entry_under_either_spelling(es: SigningKey, clock: FakeClock) -> None:
    cache = TokenCache(10, clock)
    token, twin = _spellings(es, clock)
    cache.put(token, _verified("ES256"), NOW + 60, 100)
    assert cache.get(twin) is cache.get(token) is not None
    cache.put(twin, _verified("ES256"), NOW + 60, 100)
    assert (len(cache), cache.weight) == (1, 100)
    # An entry verified with another algorithm (EdDSA: 64 bytes too) is not the twin's.
    other = TokenCache(10, clock)
    other.put(token, _verified("EdDSA"), NOW + 60, 100)
    assert other.get(twin) is None


def test_a_twin_is_found_only_under_its_own_whole_spelling(
    es: SigningKey, clock: FakeClock
) -> None:
    """The entry the twin's end leads to must hold the twin itself: another token that ends
    like the twin (its signature copied under another payload) is not the token's twin."""
    cache = TokenCache(10, clock)
    token, twin = _spellings(es, clock)
    head, _, signature = twin.rpartition(".")
    cache.put(f"{head}x.{signature}", _verified("ES256"), NOW + 60, 100)
    assert cache.get(token) is None
    assert token not in cache


@pytest.fixture(scope="module")
def es(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["ES256"]
