"""Token verification against a route policy, with an injected key lookup and a hand-moved clock."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any

import jwt
import jwt.exceptions
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jwt import PyJWK

from gateway.config import AuthPolicy, ClaimMatcher, IssuerConfig, MatchOp
from gateway.errors import Rejection
from gateway.jwks import KeyLookup, KeySetLease
from gateway.reasons import Reason
from gateway.verifier import (
    CheckFailed,
    VerifiedToken,
    Verifier,
    checks,
    parse_token,
    token_facts,
)
from tests.fakes import FakeClock, SigningKey, generate_key, make_token

WALL = 1_700_000_000.0
ISS = "https://idp.test"
OTHER_ISS = "https://other.test"
LEEWAY = 30.0

TEST_ISSUER = IssuerConfig(
    id="test",
    issuer=ISS,
    jwks_uri="https://idp.test/jwks.json",
    algorithms=frozenset({"RS256", "ES256", "EdDSA"}),
    leeway_s=LEEWAY,
)
OTHER_ISSUER = IssuerConfig(
    id="other",
    issuer=OTHER_ISS,
    jwks_uri="https://other.test/jwks.json",
    algorithms=frozenset({"PS256"}),
    leeway_s=LEEWAY,
)
POLICY = AuthPolicy(issuers=(TEST_ISSUER,), audiences=frozenset({"api"}))


# --- the parser, differentially against PyJWT ------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_HEADER = _b64(b'{"alg":"RS256","kid":"k"}')
_PAYLOAD = _b64(b'{"iss":"https://idp.test","exp":9999999999}')
_SIG = _b64(b"\x01" * 256)


def _jws(header: bytes, payload: str = _PAYLOAD, sig: str = _SIG) -> str:
    return _b64(header) + "." + payload + "." + sig


MALFORMED = {
    "one-segment": "abc",
    "two-segments": _HEADER + "." + _PAYLOAD,
    "five-segments-jwe": ".".join([_HEADER, _PAYLOAD, _SIG, "a", "b"]),
    "header-not-base64url": "!!!." + _PAYLOAD + "." + _SIG,
    "payload-not-base64url": _HEADER + ".***." + _SIG,
    "header-not-json": _jws(b"not json"),
    "header-a-list": _jws(b"[1]"),
    "payload-a-string": _HEADER + "." + _b64(b'"x"') + "." + _SIG,
    "payload-not-json": _HEADER + "." + _b64(b"{") + "." + _SIG,
    "kid-not-string": _jws(b'{"alg":"RS256","kid":7}'),
    "unknown-crit": _jws(b'{"alg":"RS256","crit":["x"],"x":1}'),
    "b64-false": _jws(b'{"alg":"RS256","b64":false,"crit":["b64"]}', payload=""),
    "bad-length": _HEADER + "." + _PAYLOAD + ".A",
}


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
def test_whatever_pyjwt_refuses_to_parse_we_refuse(token: str) -> None:
    """Our parser is at least as strict as PyJWT's: a differential check over malformed tokens."""
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode_complete(token, options={"verify_signature": False})
    with pytest.raises(Rejection) as caught:
        parse_token(token)
    assert caught.value.reason is Reason.TOKEN_MALFORMED


@pytest.mark.parametrize(
    "token",
    [
        _jws(b'{"alg":"RS256","alg":"none"}'),
        _HEADER + "." + _b64(b'{"iss":"a","iss":"b"}') + "." + _SIG,
    ],
    ids=["duplicate-header-member", "duplicate-payload-member"],
)
def test_duplicate_members_are_refused_where_pyjwt_keeps_the_last(token: str) -> None:
    jwt.decode_complete(token, options={"verify_signature": False})  # PyJWT accepts it
    with pytest.raises(Rejection) as caught:
        parse_token(token)
    assert caught.value.reason is Reason.TOKEN_MALFORMED


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CANONICAL_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def _canonical_signature(segment: str) -> bytes | None:
    """The oracle: the segment's bytes if it is canonical unpadded base64url (RFC 7515 §2:
    the alphabet, a length that is not 4n+1, zero unused bits), else ``None``."""
    if not _CANONICAL_BASE64URL.fullmatch(segment) or len(segment) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != segment:
        return None  # non-zero unused bits: another spelling of the same bytes
    return raw


@given(
    st.text(alphabet=st.sampled_from(_ALPHABET[::7] + "+/=. \u00e9\u0663\uff21"), max_size=11)
    | st.binary(max_size=8).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode())
)
def test_a_signature_segment_is_read_exactly_when_it_is_canonical_base64url(segment: str) -> None:
    token = f"{_HEADER}.{_b64(b'{}')}.{segment}"
    expected = _canonical_signature(segment)
    if expected is None:
        with pytest.raises(Rejection) as caught:
            parse_token(token)
        assert caught.value.reason is Reason.TOKEN_MALFORMED
    else:
        assert parse_token(token).signature == expected


def test_a_valid_token_parses_like_pyjwt(rs: SigningKey, wall_clock: FakeClock) -> None:
    token = make_token(rs, wall_clock, iss=ISS, aud="api", sub="a")
    ours = parse_token(token)
    theirs = jwt.decode_complete(token, options={"verify_signature": False})
    assert (ours.header, ours.payload) == (theirs["header"], theirs["payload"])
    assert ours.signature == theirs["signature"]


# --- a key lookup injected into the verifier ------------------------------------------
class CountingLookup:
    """A ``KeyLookup`` serving public keys by kid, counting every call."""

    def __init__(self, *keys: SigningKey) -> None:
        self._keys = {k.kid: k for k in keys}
        self.calls: list[tuple[str, str | None, str]] = []

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        self.calls.append((issuer.id, kid, alg))
        key = self._keys.get(kid) if kid is not None else None
        if key is None:
            raise Rejection(Reason.KEY_NOT_FOUND, "unknown kid")
        return PyJWK(key.public_jwk(), algorithm=alg)

    def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None:
        return None  # these verifiers run without a token cache

    def lease(self, issuer: IssuerConfig) -> KeySetLease | None:
        return None  # no leases: a cache hit asks current_key


@pytest.fixture(scope="module")
def rs(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["RS256"]


@pytest.fixture(scope="module")
def es(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["ES256"]


@pytest.fixture(scope="module")
def ed(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["EdDSA"]


@pytest.fixture(scope="module")
def ps(signing_keys: dict[str, SigningKey]) -> SigningKey:
    return signing_keys["PS256"]


@pytest.fixture
def wall_clock() -> FakeClock:
    return FakeClock(wall=WALL)


@pytest.fixture
def lookup(rs: SigningKey, es: SigningKey, ed: SigningKey, ps: SigningKey) -> CountingLookup:
    return CountingLookup(rs, es, ed, ps)


@pytest.fixture
def verifier(lookup: CountingLookup, wall_clock: FakeClock) -> Verifier:
    return Verifier(lookup, wall_clock)


def mint(key: SigningKey, clock: FakeClock, **claims: Any) -> str:
    defaults: dict[str, Any] = {"iss": ISS, "aud": "api", "sub": "alice"}
    return make_token(key, clock, **{**defaults, **claims})


async def reject(verifier: Verifier, token: str, policy: AuthPolicy = POLICY) -> Rejection:
    with pytest.raises(Rejection) as caught:
        await verifier.verify(token, policy)
    return caught.value


def sign_raw(key: SigningKey, payload: dict[str, Any]) -> str:
    """Sign any JSON payload, bypassing PyJWT's claim checks on encode."""
    return jwt.PyJWS().encode(
        json.dumps(payload).encode(), key.private, algorithm=key.alg, headers={"kid": key.kid}
    )


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --- the happy path ----------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_valid_token_is_verified(
    alg: str,
    signing_keys: dict[str, SigningKey],
    verifier: Verifier,
    lookup: CountingLookup,
    wall_clock: FakeClock,
) -> None:
    key = signing_keys[alg]
    token = mint(key, wall_clock, email="a@x")
    verified = await verifier.verify(token, POLICY)
    assert isinstance(verified, VerifiedToken)
    assert verified.issuer is TEST_ISSUER
    assert verified.kid == key.kid
    assert verified.claims["sub"] == "alice"
    assert verified.claims["email"] == "a@x"
    assert verified.payload_segment == token.split(".")[1]
    assert lookup.calls == [("test", key.kid, alg)]


async def test_key_comes_from_the_issuer_named_by_iss(
    ps: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    policy = AuthPolicy(issuers=(TEST_ISSUER, OTHER_ISSUER), audiences=frozenset({"api"}))
    verified = await verifier.verify(mint(ps, wall_clock, iss=OTHER_ISS), policy)
    assert verified.issuer is OTHER_ISSUER
    assert lookup.calls == [("other", ps.kid, "PS256")]


async def test_the_injected_clock_decides_expiry(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)  # exp = now + 300
    await verifier.verify(token, POLICY)
    wall_clock.advance(300 + LEEWAY - 1)
    await verifier.verify(token, POLICY)
    wall_clock.advance(1)
    assert (await reject(verifier, token)).reason is Reason.TOKEN_EXPIRED


# --- time claims ---------------------------------------------------------------------------
NOW = int(WALL)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"exp": NOW - 3600}, Reason.TOKEN_EXPIRED, id="expired-long-ago"),
        pytest.param({"exp": NOW - LEEWAY}, Reason.TOKEN_EXPIRED, id="exp-at-leeway-edge"),
        pytest.param(
            {"exp": NOW - LEEWAY - 0.5}, Reason.TOKEN_EXPIRED, id="exp-fraction-past-edge"
        ),
        pytest.param({"exp": NOW - LEEWAY + 1}, None, id="exp-inside-leeway"),
        pytest.param({"exp": NOW}, None, id="exp-now-inside-leeway"),
        pytest.param({"nbf": NOW + LEEWAY}, None, id="nbf-at-leeway-edge"),
        pytest.param({"nbf": NOW + LEEWAY + 1}, Reason.TOKEN_NOT_YET_VALID, id="nbf-future"),
        pytest.param({"nbf": NOW - 10}, None, id="nbf-past"),
        pytest.param({"iat": NOW + LEEWAY}, None, id="iat-at-leeway-edge"),
        pytest.param({"iat": NOW + LEEWAY + 1}, Reason.TOKEN_NOT_YET_VALID, id="iat-future"),
        pytest.param({"exp": NOW + 60.5}, None, id="exp-float"),
        pytest.param({"exp": str(NOW + 60)}, Reason.CLAIM_INVALID, id="exp-string"),
        pytest.param({"exp": True}, Reason.CLAIM_INVALID, id="exp-bool"),
        pytest.param({"exp": [NOW + 60]}, Reason.CLAIM_INVALID, id="exp-list"),
        pytest.param({"exp": None}, Reason.CLAIM_MISSING, id="exp-null"),
        pytest.param({"exp": float("inf")}, Reason.CLAIM_INVALID, id="exp-infinity"),
        pytest.param({"exp": float("nan")}, Reason.CLAIM_INVALID, id="exp-nan"),
        pytest.param({"exp": 10**400}, Reason.CLAIM_INVALID, id="exp-overflows-float"),
        pytest.param({"nbf": float("-inf")}, Reason.CLAIM_INVALID, id="nbf-minus-infinity"),
        pytest.param({"nbf": "yesterday"}, Reason.CLAIM_INVALID, id="nbf-string"),
        pytest.param({"iat": {"t": 1}}, Reason.CLAIM_INVALID, id="iat-object"),
    ],
)
async def test_time_claims(
    claims: dict[str, Any],
    reason: Reason | None,
    rs: SigningKey,
    verifier: Verifier,
    wall_clock: FakeClock,
) -> None:
    token = mint(rs, wall_clock, **claims)
    if reason is None:
        await verifier.verify(token, POLICY)
    else:
        assert (await reject(verifier, token)).reason is reason


async def test_exp_is_required(rs: SigningKey, verifier: Verifier, wall_clock: FakeClock) -> None:
    token = make_token(rs, wall_clock, omit=("exp",), iss=ISS, aud="api")
    assert (await reject(verifier, token)).reason is Reason.CLAIM_MISSING


async def test_zero_leeway_issuer_expires_at_exp(
    rs: SigningKey, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    strict = IssuerConfig(
        id="test",
        issuer=ISS,
        jwks_uri="https://idp.test/j",
        algorithms=frozenset({"RS256"}),
        leeway_s=0,
    )
    policy = AuthPolicy(issuers=(strict,), audiences=None)
    verifier = Verifier(lookup, wall_clock)
    await verifier.verify(mint(rs, wall_clock, exp=NOW + 1), policy)
    assert (
        await reject(verifier, mint(rs, wall_clock, exp=NOW), policy)
    ).reason is Reason.TOKEN_EXPIRED
    assert (
        await reject(verifier, mint(rs, wall_clock, nbf=NOW + 1), policy)
    ).reason is Reason.TOKEN_NOT_YET_VALID


# --- audience ---------------------------------------------------------------------------
AUD_POLICY = AuthPolicy(issuers=(TEST_ISSUER,), audiences=frozenset({"api", "api2"}))
ANY_AUD_POLICY = AuthPolicy(issuers=(TEST_ISSUER,), audiences=None)


@pytest.mark.parametrize(
    ("aud", "accepted"),
    [
        pytest.param("api", True, id="str"),
        pytest.param("api2", True, id="second-accepted"),
        pytest.param(["other", "api"], True, id="list-containing"),
        pytest.param(["api"], True, id="list-of-one"),
        pytest.param("other", False, id="str-wrong"),
        pytest.param(["other", "more"], False, id="list-wrong"),
        pytest.param("API", False, id="case-sensitive"),
        pytest.param("", False, id="empty-str"),
        pytest.param([], False, id="empty-list"),
        pytest.param(None, False, id="null"),
    ],
)
async def test_audience(
    aud: Any,
    accepted: bool,
    rs: SigningKey,
    verifier: Verifier,
    wall_clock: FakeClock,
) -> None:
    token = mint(rs, wall_clock, aud=aud)
    if accepted:
        await verifier.verify(token, AUD_POLICY)
    else:
        assert (await reject(verifier, token, AUD_POLICY)).reason is Reason.AUDIENCE_NOT_ALLOWED
    # 'audiences: any' accepts whatever string (or strings) aud holds.
    await verifier.verify(token, ANY_AUD_POLICY)


@pytest.mark.parametrize(
    "aud",
    [
        pytest.param(7, id="number"),
        pytest.param(True, id="bool"),
        pytest.param(["api", 7], id="list-with-non-string"),
        pytest.param([["api"]], id="list-of-lists"),
        pytest.param({"api": True}, id="object"),
    ],
)
@pytest.mark.parametrize("policy", [AUD_POLICY, ANY_AUD_POLICY], ids=["audiences", "any"])
async def test_aud_of_the_wrong_type_is_claim_invalid_even_with_audiences_any(
    aud: Any, policy: AuthPolicy, rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    """RFC 7519 §4.1.3: a string or an array of strings, whether or not the route checks it."""
    token = mint(rs, wall_clock, aud=aud)
    assert (await reject(verifier, token, policy)).reason is Reason.CLAIM_INVALID


# --- registered claim types (RFC 7519 §4.1) -----------------------------------------------
@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"sub": 12345}, Reason.CLAIM_INVALID, id="sub-number"),
        pytest.param({"sub": 1.5}, Reason.CLAIM_INVALID, id="sub-float"),
        pytest.param({"sub": False}, Reason.CLAIM_INVALID, id="sub-bool"),
        pytest.param({"sub": {"id": "admin"}}, Reason.CLAIM_INVALID, id="sub-object"),
        pytest.param({"sub": ["admin", "user"]}, Reason.CLAIM_INVALID, id="sub-array"),
        pytest.param({"jti": 1}, Reason.CLAIM_INVALID, id="jti-number"),
        pytest.param({"jti": {"a": 1}}, Reason.CLAIM_INVALID, id="jti-object"),
        pytest.param({"iss": [ISS]}, Reason.CLAIM_INVALID, id="iss-array"),
        pytest.param({"iss": 1}, Reason.CLAIM_INVALID, id="iss-number"),
        pytest.param({"iss": {"iss": ISS}}, Reason.CLAIM_INVALID, id="iss-object"),
        pytest.param({"sub": None}, None, id="sub-null-is-absent"),
        pytest.param({"jti": None}, None, id="jti-null-is-absent"),
        pytest.param({"sub": "12345", "jti": "j"}, None, id="strings"),
    ],
)
async def test_registered_string_claims(
    claims: dict[str, Any],
    reason: Reason | None,
    rs: SigningKey,
    verifier: Verifier,
    lookup: CountingLookup,
    wall_clock: FakeClock,
) -> None:
    payload = {"iss": ISS, "aud": "api", "sub": "alice", "exp": NOW + 60, **claims}
    token = sign_raw(rs, payload)  # PyJWT's encoder would refuse a non-string iss
    if reason is None:
        await verifier.verify(token, ANY_AUD_POLICY)
        return
    assert (await reject(verifier, token, ANY_AUD_POLICY)).reason is reason
    if "iss" in claims:
        assert lookup.calls == []  # refused before any key lookup


async def test_missing_aud_is_refused_unless_audiences_any(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    token = make_token(rs, wall_clock, iss=ISS)  # no aud at all
    assert (await reject(verifier, token, AUD_POLICY)).reason is Reason.AUDIENCE_NOT_ALLOWED
    assert (await verifier.verify(token, ANY_AUD_POLICY)).claims.get("aud") is None


# --- required claims and scopes -----------------------------------------------------------
@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"email": "a@x", "tenant": "t"}, None, id="all-present"),
        pytest.param({"email": "", "tenant": 0}, None, id="falsy-but-present"),
        pytest.param({"tenant": "t"}, Reason.CLAIM_MISSING, id="one-missing"),
        pytest.param({"email": None, "tenant": "t"}, Reason.CLAIM_MISSING, id="null-is-missing"),
    ],
)
async def test_required_claims(
    claims: dict[str, Any],
    reason: Reason | None,
    rs: SigningKey,
    verifier: Verifier,
    wall_clock: FakeClock,
) -> None:
    policy = AuthPolicy(
        issuers=(TEST_ISSUER,), audiences=None, required_claims=("sub", "email", "tenant")
    )
    token = mint(rs, wall_clock, **claims)
    if reason is None:
        await verifier.verify(token, policy)
    else:
        assert (await reject(verifier, token, policy)).reason is reason


@pytest.mark.parametrize(
    ("claims", "required", "granted"),
    [
        pytest.param({"scope": "orders:read"}, {"orders:read"}, True, id="scope-str"),
        pytest.param({"scope": "a orders:read  b"}, {"orders:read"}, True, id="scope-str-many"),
        pytest.param({"scp": ["orders:read", "x"]}, {"orders:read"}, True, id="scp-list"),
        pytest.param({"scp": "orders:read"}, {"orders:read"}, True, id="scp-str"),
        pytest.param({"scope": "a", "scp": ["b"]}, {"a", "b"}, True, id="scope-and-scp-combined"),
        pytest.param({"scope": "a b"}, {"a", "b"}, True, id="all-of-several"),
        pytest.param({}, {"orders:read"}, False, id="no-scope-claim"),
        pytest.param({"scope": "orders:write"}, {"orders:read"}, False, id="other-scope"),
        pytest.param({"scope": "orders:readx"}, {"orders:read"}, False, id="no-substring-match"),
        pytest.param({"scope": "orders"}, {"orders:read"}, False, id="no-prefix-match"),
        pytest.param({"scope": "a"}, {"a", "b"}, False, id="one-of-two"),
        pytest.param({"scope": ["orders:read"]}, {"orders:read"}, True, id="scope-as-list"),
        pytest.param(
            {"scp": [1, {"orders:read": 1}]}, {"orders:read"}, False, id="scp-non-strings"
        ),
    ],
)
async def test_scopes(
    claims: dict[str, Any],
    required: set[str],
    granted: bool,
    rs: SigningKey,
    verifier: Verifier,
    wall_clock: FakeClock,
) -> None:
    policy = AuthPolicy(issuers=(TEST_ISSUER,), audiences=None, required_scopes=frozenset(required))
    token = mint(rs, wall_clock, **claims)
    if granted:
        await verifier.verify(token, policy)
    else:
        rejection = await reject(verifier, token, policy)
        assert rejection.reason is Reason.INSUFFICIENT_SCOPE
        assert rejection.scope == " ".join(sorted(required))


async def test_scope_is_checked_after_authentication(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    # An expired token is a 401, never a 403: the client must not learn the scope first.
    policy = AuthPolicy(issuers=(TEST_ISSUER,), audiences=None, required_scopes=frozenset({"x"}))
    token = mint(rs, wall_clock, exp=NOW - 3600)
    assert (await reject(verifier, token, policy)).reason is Reason.TOKEN_EXPIRED


# --- issuer and algorithm, before any key is fetched ------------------------------------------
@pytest.mark.parametrize(
    "iss",
    [
        pytest.param("https://evil.test", id="unknown"),
        pytest.param(OTHER_ISS, id="configured-but-not-on-route"),
        pytest.param(ISS + "/", id="trailing-slash"),
        pytest.param(None, id="missing"),
    ],
)
async def test_untrusted_iss_is_refused_without_key_lookup(
    iss: Any, rs: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    payload: dict[str, Any] = {"aud": "api", "sub": "alice", "exp": NOW + 60}
    if iss is not None:
        payload["iss"] = iss
    token = sign_raw(rs, payload)
    assert (await reject(verifier, token)).reason is Reason.ISSUER_NOT_ALLOWED
    assert lookup.calls == []


async def test_alg_not_pinned_is_refused_without_key_lookup(
    ps: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    # PS256 is pinned by no issuer of POLICY.
    assert (await reject(verifier, mint(ps, wall_clock))).reason is Reason.ALGORITHM_NOT_ALLOWED
    assert lookup.calls == []


async def test_alg_pinned_by_another_issuer_of_the_route_is_refused(
    ps: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    # PS256 is pinned by 'other', but the token claims iss of 'test', which pins only RS/ES/EdDSA.
    policy = AuthPolicy(issuers=(TEST_ISSUER, OTHER_ISSUER), audiences=None)
    rejection = await reject(verifier, mint(ps, wall_clock, iss=ISS), policy)
    assert rejection.reason is Reason.ALGORITHM_NOT_ALLOWED
    assert lookup.calls == []


async def test_alg_none_is_refused(
    verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    token = jwt.encode({"iss": ISS, "aud": "api", "exp": NOW + 60}, "", algorithm="none")
    assert (await reject(verifier, token)).reason is Reason.ALGORITHM_NOT_ALLOWED
    assert lookup.calls == []


async def test_hmac_token_is_refused(
    rs: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    # The algorithm-confusion attack: HS256 keyed with bytes the attacker chose.
    secret = b"k" * 64
    token = jwt.encode(
        {"iss": ISS, "aud": "api", "exp": NOW + 60},
        secret,
        algorithm="HS256",
        headers={"kid": rs.kid},
    )
    assert (await reject(verifier, token)).reason is Reason.ALGORITHM_NOT_ALLOWED
    assert lookup.calls == []


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"alg": None}, id="null"),
        pytest.param({"alg": ["RS256"]}, id="list"),
        pytest.param({"alg": "rs256"}, id="wrong-case"),
    ],
)
async def test_odd_alg_header_values_are_refused(
    header: dict[str, Any],
    rs: SigningKey,
    verifier: Verifier,
    lookup: CountingLookup,
    wall_clock: FakeClock,
) -> None:
    good = mint(rs, wall_clock)
    _, payload, signature = good.split(".")
    token = ".".join([b64({"typ": "JWT", "kid": rs.kid, **header}), payload, signature])
    assert (await reject(verifier, token)).reason is Reason.ALGORITHM_NOT_ALLOWED
    assert lookup.calls == []


# --- signatures and malformed tokens -----------------------------------------------------------
async def test_tampered_payload_is_signature_invalid(
    rs: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    header, _, signature = token.split(".")
    payload = b64({"iss": ISS, "aud": "api", "sub": "admin", "exp": NOW + 300})
    rejection = await reject(verifier, f"{header}.{payload}.{signature}")
    assert rejection.reason is Reason.SIGNATURE_INVALID
    assert len(lookup.calls) == 1


async def test_signature_by_another_key_with_a_known_kid_is_invalid(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    impostor = generate_key("RS256", rs.kid)
    rejection = await reject(verifier, mint(impostor, wall_clock))
    assert rejection.reason is Reason.SIGNATURE_INVALID


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda t: t.rsplit(".", 1)[0] + ".", id="signature-removed"),
        pytest.param(lambda t: t + "AA", id="signature-extended"),
    ],
)
async def test_mangled_signature_is_invalid(
    cut: Any, rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    rejection = await reject(verifier, cut(mint(rs, wall_clock)))
    assert rejection.reason is Reason.SIGNATURE_INVALID


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="one-segment"),
        pytest.param("a.b", id="two-segments"),
        pytest.param("a.b.c", id="not-base64-json"),
        pytest.param("a.b.c.d", id="four-segments"),
        pytest.param(f"{b64({'alg': 'RS256'})}.bm90IGpzb24.c2ln", id="payload-not-json"),
        pytest.param(
            f"{b64({'alg': 'RS256'})}.{base64.urlsafe_b64encode(b'[1]').decode()}.c2ln",
            id="payload-array",
        ),
        pytest.param("eyJ.eyJ.sig", id="truncated-json"),
    ],
)
async def test_garbage_is_token_malformed(
    token: str, verifier: Verifier, lookup: CountingLookup
) -> None:
    assert (await reject(verifier, token)).reason is Reason.TOKEN_MALFORMED
    assert lookup.calls == []


@pytest.mark.parametrize("kid", [["x"], 7, {"k": 1}], ids=["list", "number", "object"])
async def test_non_string_kid_is_malformed(
    kid: Any, rs: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    token = make_token(rs, wall_clock, iss=ISS, aud="api")
    _, payload, signature = token.split(".")
    forged = ".".join([b64({"alg": "RS256", "typ": "JWT", "kid": kid}), payload, signature])
    assert (await reject(verifier, forged)).reason is Reason.TOKEN_MALFORMED
    assert lookup.calls == []


async def test_key_lookup_rejection_passes_through(
    verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    unknown = generate_key("RS256", "not-published")
    assert (await reject(verifier, mint(unknown, wall_clock))).reason is Reason.KEY_NOT_FOUND
    assert lookup.calls == [("test", "not-published", "RS256")]


# --- typ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("typ", "required", "accepted"),
    [
        pytest.param("JWT", None, True, id="jwt"),
        pytest.param("jwt", None, True, id="jwt-lower"),
        pytest.param("at+jwt", None, True, id="at-jwt"),
        pytest.param("application/at+JWT", None, True, id="media-type-form"),
        pytest.param(None, None, True, id="absent"),
        pytest.param("JOSE", None, False, id="jose"),
        pytest.param("logout+jwt", None, False, id="other-jwt-kind"),
        pytest.param(7, None, False, id="number"),
        pytest.param("at+jwt", "at+jwt", True, id="required-at-jwt"),
        pytest.param("application/AT+JWT", "at+jwt", True, id="required-media-type-form"),
        pytest.param("JWT", "at+jwt", False, id="required-but-jwt"),
        pytest.param(None, "at+jwt", False, id="required-but-absent"),
        pytest.param("at+jwt", "application/at+jwt", True, id="required-in-media-type-form"),
    ],
)
async def test_typ_header(
    typ: Any,
    required: str | None,
    accepted: bool,
    rs: SigningKey,
    lookup: CountingLookup,
    wall_clock: FakeClock,
) -> None:
    issuer = dataclasses.replace(TEST_ISSUER, typ=required)
    policy = AuthPolicy(issuers=(issuer,), audiences=None)
    verifier = Verifier(lookup, wall_clock)
    token = make_token(rs, wall_clock, headers={"typ": typ}, iss=ISS)
    if accepted:
        await verifier.verify(token, policy)
    else:
        assert (await reject(verifier, token, policy)).reason is Reason.TOKEN_TYPE_INVALID
        assert lookup.calls == []


# --- any-of scopes and claim matchers ----------------------------------------------------------
@pytest.mark.parametrize(
    ("claims", "granted"),
    [
        pytest.param({"scope": "b"}, True, id="one-of-two"),
        pytest.param({"scp": ["a", "b"]}, True, id="both"),
        pytest.param({"scope": "c"}, False, id="neither"),
        pytest.param({}, False, id="none"),
    ],
)
async def test_any_of_scopes(
    claims: dict[str, Any], granted: bool, rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    policy = AuthPolicy(
        issuers=(TEST_ISSUER,),
        audiences=None,
        required_scopes=frozenset({"a", "b"}),
        scopes_any_of=True,
    )
    token = mint(rs, wall_clock, **claims)
    if granted:
        await verifier.verify(token, policy)
    else:
        rejection = await reject(verifier, token, policy)
        assert (rejection.reason, rejection.scope) == (Reason.INSUFFICIENT_SCOPE, "a b")


@pytest.mark.parametrize(
    ("matcher", "claims", "holds"),
    [
        pytest.param(
            ClaimMatcher(("tier",), MatchOp.EQUALS, ("gold",)), {"tier": "gold"}, True, id="equals"
        ),
        pytest.param(
            ClaimMatcher(("tier",), MatchOp.EQUALS, ("gold",)),
            {"tier": "Gold"},
            False,
            id="equals-case",
        ),
        pytest.param(
            ClaimMatcher(("tier",), MatchOp.EQUALS, ("gold",)), {}, False, id="equals-absent"
        ),
        pytest.param(
            ClaimMatcher(("admin",), MatchOp.EQUALS, (True,)),
            {"admin": True},
            True,
            id="equals-bool",
        ),
        pytest.param(
            ClaimMatcher(("admin",), MatchOp.EQUALS, (True,)),
            {"admin": 1},
            False,
            id="one-is-not-true",
        ),
        pytest.param(
            ClaimMatcher(("level",), MatchOp.EQUALS, (1,)),
            {"level": True},
            False,
            id="true-is-not-one",
        ),
        pytest.param(
            ClaimMatcher(("level",), MatchOp.EQUALS, (1,)),
            {"level": "1"},
            False,
            id="string-is-not-int",
        ),
        pytest.param(
            ClaimMatcher(("level",), MatchOp.EQUALS, (1,)),
            {"level": 1.0},
            True,
            id="numbers-by-value",
        ),
        pytest.param(
            ClaimMatcher(("level",), MatchOp.EQUALS, (1,)), {"level": 2}, False, id="other-number"
        ),
        pytest.param(
            ClaimMatcher(("org", "id"), MatchOp.ONE_OF, ("a", "b")),
            {"org": {"id": "b"}},
            True,
            id="one-of-nested",
        ),
        pytest.param(
            ClaimMatcher(("org", "id"), MatchOp.ONE_OF, ("a", "b")),
            {"org": {"id": "c"}},
            False,
            id="one-of-miss",
        ),
        pytest.param(
            ClaimMatcher(("roles",), MatchOp.CONTAINS, ("admin",)),
            {"roles": ["user", "admin"]},
            True,
            id="contains-list",
        ),
        pytest.param(
            ClaimMatcher(("roles",), MatchOp.CONTAINS, ("admin",)),
            {"roles": "user admin"},
            True,
            id="contains-words",
        ),
        pytest.param(
            ClaimMatcher(("roles",), MatchOp.CONTAINS, ("admin",)),
            {"roles": "superadmin"},
            False,
            id="contains-no-substring",
        ),
        pytest.param(
            ClaimMatcher(("roles",), MatchOp.CONTAINS, ("admin",)),
            {"roles": ["admins"]},
            False,
            id="contains-whole-items",
        ),
        pytest.param(
            ClaimMatcher(("roles",), MatchOp.CONTAINS, ("admin",)),
            {"roles": {"admin": 1}},
            False,
            id="contains-object",
        ),
    ],
)
async def test_claim_matchers(
    matcher: ClaimMatcher,
    claims: dict[str, Any],
    holds: bool,
    rs: SigningKey,
    verifier: Verifier,
    wall_clock: FakeClock,
) -> None:
    policy = AuthPolicy(issuers=(TEST_ISSUER,), audiences=None, claim_matchers=(matcher,))
    token = mint(rs, wall_clock, **claims)
    if holds:
        await verifier.verify(token, policy)
    else:
        rejection = await reject(verifier, token, policy)
        assert (rejection.reason, rejection.scope) == (Reason.INSUFFICIENT_SCOPE, None)


# --- what is parsed before the signature is checked (issue 11) ---------------------------
def _payload_text(**extra: Any) -> bytes:
    claims = {"iss": ISS, "aud": "api", "sub": "alice", "exp": NOW + 60, **extra}
    return json.dumps(claims, separators=(",", ":")).encode()


def _signed_text(key: SigningKey, text: bytes, **header: Any) -> str:
    return jwt.PyJWS().encode(
        text, key.private, algorithm=key.alg, headers={"kid": key.kid, **header}
    )


HEAVY: dict[str, Any] = {"x": [{}] * 200}


def test_a_normal_payload_is_parsed_at_once() -> None:
    parsed = parse_token(_jws(b'{"alg":"RS256","kid":"k"}', _b64(_payload_text())))
    assert parsed.payload is not None
    assert parsed.payload["sub"] == "alice"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"x": [{}] * 100}, id="many-objects"),
        pytest.param({"x": [0] * 100}, id="many-integers"),
        pytest.param({f"m{i}": 0 for i in range(70)}, id="many-members"),
        pytest.param({"x": 10**70}, id="long-digit-run"),
        pytest.param({"x": "a" * 5000}, id="over-4-kb"),
    ],
)
def test_a_complex_payload_is_left_undecoded_until_verified(extra: dict[str, Any]) -> None:
    text = _payload_text(**extra)
    parsed = parse_token(_jws(b'{"alg":"RS256","kid":"k"}', _b64(text)))
    assert parsed.payload is None
    assert parsed.payload_json == text
    assert parsed.decoded_payload() == json.loads(text)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"alg": "RS256", "x": [{}] * 70}, id="many-objects"),
        pytest.param({"alg": "RS256", "x": list(range(70))}, id="many-integers"),
        pytest.param({"alg": "RS256", "x": 10**70}, id="long-digit-run"),
    ],
)
def test_a_complex_header_is_refused_unparsed(header: dict[str, Any]) -> None:
    with pytest.raises(Rejection) as caught:
        parse_token(_jws(json.dumps(header).encode()))
    assert caught.value.reason is Reason.TOKEN_MALFORMED


def test_a_long_header_of_few_values_is_parsed() -> None:
    """x5c chains are long strings: bytes alone never refuse a header."""
    header = {"alg": "RS256", "kid": "k", "x5c": ["A" * 3000, "B" * 3000]}
    assert parse_token(_jws(json.dumps(header).encode())).header == header


@pytest.mark.parametrize(
    ("text", "found"),
    [
        pytest.param(b'{"iss":"a"}', ["a"], id="plain"),
        pytest.param(b'{"iss" : \n "a"}', ["a"], id="whitespace"),
        pytest.param(b'{"iss":"https:\\/\\/idp.test"}', ["https://idp.test"], id="escaped-slashes"),
        pytest.param(b'{"x":{"iss":"b"},"iss":"a"}', ["b", "a"], id="nested-first"),
        pytest.param(b'{"x":"\\"iss\\":\\"b\\"","iss":"a"}', ["a"], id="inside-a-string"),
        pytest.param(b'{"typ":"iss","iss":"a"}', ["a"], id="as-a-value"),
        pytest.param(b'{"\\u0069ss":"a"}', [], id="escaped-name-not-found"),
        pytest.param(b'{"sub":"a"}', [], id="absent"),
        pytest.param(b'"iss":"a"', ["a"], id="at-the-very-start"),
    ],
)
def test_scan_iss(text: bytes, found: list[Any]) -> None:
    from gateway.verifier import _scan_iss

    assert _scan_iss(text) == found


def test_scan_iss_marks_non_strings_and_stops_after_four() -> None:
    from gateway.verifier import _NOT_A_STRING, _scan_iss

    assert _scan_iss(b'{"iss":["a"]}') == [_NOT_A_STRING]
    assert _scan_iss(b'{"iss":"unterminated') == [_NOT_A_STRING]
    assert len(_scan_iss(b'{"a":[' + b",".join([b'{"iss":"x"}'] * 50) + b"]}")) == 4


async def test_a_complex_payload_that_is_not_utf8_is_malformed_before_any_key(
    verifier: Verifier, lookup: CountingLookup
) -> None:
    text = _payload_text(x=[{}] * 100)[:-1] + b',"y":"\xff"}'
    token = _jws(b'{"alg":"RS256","kid":"key-rs256"}', _b64(text))
    assert parse_token(token).payload is None  # left to _scan_iss
    assert (await reject(verifier, token)).reason is Reason.TOKEN_MALFORMED
    assert lookup.calls == []


async def test_a_complex_payload_is_verified_then_decoded(
    rs: SigningKey, verifier: Verifier, lookup: CountingLookup, wall_clock: FakeClock
) -> None:
    verified = await verifier.verify(_signed_text(rs, _payload_text(**HEAVY)), POLICY)
    assert verified.claims["x"] == [{}] * 200
    assert lookup.calls == [("test", rs.kid, "RS256")]


@pytest.mark.parametrize(
    ("text", "reason", "lookups"),
    [
        pytest.param(
            json.dumps({"iss": "https://evil.test", "exp": NOW + 60, **HEAVY}).encode(),
            Reason.ISSUER_NOT_ALLOWED,
            0,
            id="untrusted-iss-no-key-lookup",
        ),
        pytest.param(
            json.dumps({"iss": [ISS], "exp": NOW + 60, **HEAVY}).encode(),
            Reason.CLAIM_INVALID,
            0,
            id="non-string-iss-no-key-lookup",
        ),
        pytest.param(
            json.dumps({"act": {"iss": ISS}, "iss": "https://evil.test", **HEAVY}).encode(),
            Reason.ISSUER_NOT_ALLOWED,
            1,
            id="nested-trusted-iss-caught-after-decoding",
        ),
        pytest.param(
            _payload_text(**HEAVY)[:-1] + b',"iss":"https://evil.test"}',
            Reason.TOKEN_MALFORMED,
            1,
            id="duplicate-iss-caught-after-decoding",
        ),
        pytest.param(
            _payload_text(**HEAVY)[:-1] + b",]}",
            Reason.TOKEN_MALFORMED,
            1,
            id="not-json-caught-after-the-signature",
        ),
    ],
)
async def test_a_complex_payload_fails_closed(
    text: bytes,
    reason: Reason,
    lookups: int,
    rs: SigningKey,
    verifier: Verifier,
    lookup: CountingLookup,
) -> None:
    assert (await reject(verifier, _signed_text(rs, text))).reason is reason
    assert len(lookup.calls) == lookups


async def test_a_complex_payload_with_a_forged_signature_is_never_decoded(
    rs: SigningKey, verifier: Verifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.verifier as module
    from gateway import compiled

    if compiled():
        pytest.skip("a compiled verifier calls its helpers directly: a spy cannot see them")
    decoded: list[bytes] = []
    real = module._json_object

    def spy(data: bytes, name: str, *decoder: Any) -> dict[str, Any]:
        decoded.append(data)
        return real(data, name, *decoder)

    monkeypatch.setattr(module, "_json_object", spy)
    head, body, _ = _signed_text(rs, _payload_text(**HEAVY)).split(".")
    forged = f"{head}.{body}.{_b64(b'x' * 256)}"
    assert (await reject(verifier, forged)).reason is Reason.SIGNATURE_INVALID
    assert decoded  # the spy saw the header decoded
    assert all(b'"x"' not in data for data in decoded)  # the header only


# --- the verified-token cache seen from the verifier (issue 11) ---------------------------------
# The cache itself (bounds, weights, ECDSA spellings) is tests/unit/test_token_cache.py.
def _es256_spellings(es: SigningKey, wall_clock: FakeClock) -> tuple[str, str]:
    from gateway.token_cache import ecdsa_twin

    token = mint(es, wall_clock)
    twin = ecdsa_twin(token)
    assert twin is not None
    assert twin[1] == "ES256"
    return token, twin[0]


async def test_verifier_caches_both_ecdsa_spellings_as_one(
    es: SigningKey, wall_clock: FakeClock
) -> None:
    from gateway.token_cache import TokenCache

    class CurrentLookup(CountingLookup):
        def __init__(self, key: SigningKey) -> None:
            super().__init__(key)
            self.key = PyJWK(key.public_jwk(), algorithm="ES256")

        async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
            self.calls.append((issuer.id, kid, alg))
            return self.key

        def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None:
            return self.key

    lookup = CurrentLookup(es)
    cache = TokenCache(10, wall_clock)
    verifier = Verifier(lookup, wall_clock, cache)
    token, twin = _es256_spellings(es, wall_clock)
    await verifier.verify(twin, POLICY)
    await verifier.verify(token, POLICY)
    await verifier.verify(twin, POLICY)
    assert len(lookup.calls) == 1  # one full verification
    assert len(cache) == 1


class KeyRing(CountingLookup):
    """A key set that changes as a test says: one ``PyJWK`` object per kid, the way the key
    cache holds them, so a cached token's key is recognised by identity."""

    def __init__(self, *keys: SigningKey) -> None:
        super().__init__(*keys)
        self.current = {k.kid: PyJWK(k.public_jwk(), algorithm=k.alg) for k in keys}

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        self.calls.append((issuer.id, kid, alg))
        key = self.current.get(kid) if kid is not None else None
        if key is None:
            raise Rejection(Reason.KEY_NOT_FOUND, "unknown kid")
        return key

    def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None:
        if issuer.id != TEST_ISSUER.id:
            return None
        key = self.current.get(kid) if kid is not None else None
        return key if key is not None and key.algorithm_name == alg else None


@pytest.fixture
def ring(rs: SigningKey, es: SigningKey) -> KeyRing:
    return KeyRing(rs, es)


def caching(lookup: KeyLookup, clock: FakeClock) -> Verifier:
    """A verifier over ``lookup`` with a token cache of 100 on ``clock``."""
    from gateway.token_cache import TokenCache

    return Verifier(lookup, clock, TokenCache(100, clock))


@pytest.fixture
def cached(ring: KeyRing, wall_clock: FakeClock) -> Verifier:
    return caching(ring, wall_clock)


async def test_a_cache_hit_needs_no_key_and_no_signature(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    first = await cached.verify(token, POLICY)
    assert (first.kid, first.alg, first.key) == (rs.kid, "RS256", ring.current[rs.kid])
    wall_clock.advance(100)
    assert await cached.verify(token, POLICY) is first
    assert len(ring.calls) == 1


async def test_a_verification_says_whether_its_token_is_bound(
    rs: SigningKey, cached: Verifier, wall_clock: FakeClock
) -> None:
    """A token with a cnf claim (RFC 7800) is bound: the gate then checks its sender, on a hit
    too, without looking into the claims again."""
    bound = await cached.verify(mint(rs, wall_clock, cnf={"jkt": "x" * 43}), POLICY)
    plain = await cached.verify(mint(rs, wall_clock), POLICY)
    assert (bound.bound, plain.bound) == (True, False)


async def test_known_holds_exactly_the_tokens_that_verified(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    # The extractor skips its b64token scan for these: only a token that verified may be one.
    token = mint(rs, wall_clock)
    wrong_audience = mint(rs, wall_clock, aud="other")
    assert token not in cached.known
    await cached.verify(token, POLICY)
    await reject(cached, wrong_audience)
    assert token in cached.known
    assert wrong_audience not in cached.known
    uncached = Verifier(ring, wall_clock)
    await uncached.verify(token, POLICY)
    assert token not in uncached.known


async def test_a_cached_token_dies_with_its_retired_key(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    await cached.verify(token, POLICY)
    del ring.current[rs.kid]  # rotated out of the issuer's set
    assert (await reject(cached, token)).reason is Reason.KEY_NOT_FOUND
    assert len(ring.calls) == 2


async def test_a_cached_token_dies_when_its_kid_names_another_key(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    await cached.verify(token, POLICY)
    replacement = generate_key("RS256", rs.kid)  # the kid reused for a new key
    ring.current[rs.kid] = PyJWK(replacement.public_jwk(), algorithm="RS256")
    assert (await reject(cached, token)).reason is Reason.SIGNATURE_INVALID


async def test_a_cached_token_still_valid_keeps_being_served(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    await cached.verify(token, POLICY)
    ring.current["unrelated"] = ring.current[rs.kid]  # the set changed, not this key
    for _ in range(3):
        await cached.verify(token, POLICY)
    assert len(ring.calls) == 1


SCOPED = dataclasses.replace(POLICY, required_scopes=frozenset({"orders:write"}))


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        pytest.param(SCOPED, Reason.INSUFFICIENT_SCOPE, id="scope"),
        pytest.param(
            dataclasses.replace(POLICY, audiences=frozenset({"other-api"})),
            Reason.AUDIENCE_NOT_ALLOWED,
            id="audience",
        ),
        pytest.param(
            dataclasses.replace(POLICY, required_claims=("email",)),
            Reason.CLAIM_MISSING,
            id="required-claim",
        ),
        pytest.param(
            dataclasses.replace(
                POLICY, claim_matchers=(ClaimMatcher(("sub",), MatchOp.EQUALS, ("bob",)),)
            ),
            Reason.INSUFFICIENT_SCOPE,
            id="claim-matcher",
        ),
    ],
)
async def test_a_cache_hit_is_judged_by_this_routes_policy(
    policy: AuthPolicy,
    reason: Reason,
    rs: SigningKey,
    ring: KeyRing,
    cached: Verifier,
    wall_clock: FakeClock,
) -> None:
    """Admitted on /api (cached), the same token must not pass /scoped without the scope."""
    token = mint(rs, wall_clock, scope="orders:read")
    await cached.verify(token, POLICY)
    assert (await reject(cached, token, policy)).reason is reason
    assert len(ring.calls) == 1  # refused by the hit's own check, not by a re-verification
    await cached.verify(token, POLICY)  # still good where it was
    # What the hit remembers passing is the policy it passed, never one it was refused by.
    assert (await reject(cached, token, policy)).reason is reason
    assert (await reject(cached, token, policy)).reason is reason
    await cached.verify(token, POLICY)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_a_cache_hit_compares_nbf_and_iat_with_the_clock_now(
    claim: str, rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    """A wall clock stepped back (NTP) after a token was cached: its nbf or iat, in the
    leeway when it verified, is in the future again, and the hit says so."""
    token = mint(rs, wall_clock, **{claim: NOW + LEEWAY - 5})
    await cached.verify(token, POLICY)
    wall_clock.advance(-10)
    rejection = await reject(cached, token)
    assert rejection.reason is Reason.TOKEN_NOT_YET_VALID
    assert isinstance(rejection, CheckFailed)
    assert rejection.check.name == claim
    assert len(ring.calls) == 1  # the cached entry's own time claims, not a re-verification
    wall_clock.advance(10)
    await cached.verify(token, POLICY)  # the clock back where it was: served from the cache
    assert len(ring.calls) == 1


async def test_a_cache_hit_on_a_route_that_does_not_trust_its_issuer_is_refused(
    rs: SigningKey, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    await cached.verify(token, POLICY)
    elsewhere = AuthPolicy(issuers=(OTHER_ISSUER,), audiences=frozenset({"api"}))
    assert (await reject(cached, token, elsewhere)).reason is Reason.ALGORITHM_NOT_ALLOWED
    both = AuthPolicy(issuers=(OTHER_ISSUER, TEST_ISSUER), audiences=frozenset({"api"}))
    await cached.verify(token, both)  # a route trusting it too: still a hit


@pytest.mark.parametrize("typ", [None, "at+jwt", "custom+jwt"])
async def test_a_reload_that_changes_nothing_keeps_cached_tokens(
    typ: str | None, rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    issuer = dataclasses.replace(TEST_ISSUER, typ=typ)
    policy = AuthPolicy((issuer,), POLICY.audiences)
    headers = {"kid": rs.kid} if typ is None else {"kid": rs.kid, "typ": typ}
    token = make_token(rs, wall_clock, headers=headers, iss=ISS, aud="api")
    await cached.verify(token, policy)
    reloaded = dataclasses.replace(issuer)  # a new object, the same settings
    assert reloaded is not issuer
    await cached.verify(token, AuthPolicy((reloaded,), POLICY.audiences))
    assert len(ring.calls) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"leeway_s": 0.0}, Reason.TOKEN_NOT_YET_VALID, id="leeway"),
        pytest.param({"algorithms": frozenset({"ES256"})}, Reason.ALGORITHM_NOT_ALLOWED, id="alg"),
        pytest.param({"typ": "at+jwt"}, Reason.TOKEN_TYPE_INVALID, id="typ"),
    ],
)
async def test_a_reload_that_changes_the_issuer_reverifies_cached_tokens(
    change: dict[str, Any],
    reason: Reason,
    rs: SigningKey,
    cached: Verifier,
    wall_clock: FakeClock,
) -> None:
    """A token accepted under the old settings (iat 10 s ahead, inside the 30 s leeway; typ
    JWT; RS256) is judged by the new ones at once, not when its cache entry ends."""
    token = mint(rs, wall_clock, iat=NOW + 10)
    await cached.verify(token, POLICY)
    reloaded = dataclasses.replace(TEST_ISSUER, **change)
    assert (await reject(cached, token, AuthPolicy((reloaded,), POLICY.audiences))).reason is reason


async def test_a_cached_token_expires_like_an_uncached_one(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock, exp=NOW + 60)
    await cached.verify(token, POLICY)
    wall_clock.advance(60 + LEEWAY - 1)  # past exp, inside the leeway: verified again, good
    await cached.verify(token, POLICY)
    assert len(ring.calls) == 2
    wall_clock.advance(1)
    assert (await reject(cached, token)).reason is Reason.TOKEN_EXPIRED


async def test_a_refused_token_is_not_cached(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock, scope="orders:read")
    assert (await reject(cached, token, SCOPED)).reason is Reason.INSUFFICIENT_SCOPE
    await cached.verify(token, POLICY)
    assert len(ring.calls) == 2


async def test_a_cache_hit_refused_by_the_route_names_the_check_that_refused(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock, scope="orders:read")
    await cached.verify(token, POLICY)
    rejection = await reject(cached, token, SCOPED)
    assert isinstance(rejection, CheckFailed)
    assert rejection.check == checks(SCOPED)[-1]
    assert (rejection.check.name, rejection.check.says({})) == (
        "scopes",
        "the token grants all of: orders:write",
    )
    assert len(ring.calls) == 1  # judged from the cache: the same checks, no second verify


# --- what the checks themselves decide ------------------------------------------------------------
async def test_a_re_spelled_signature_is_malformed(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    """A 342-character RS256 signature's last character carries 4 unused bits: setting one
    decodes to the same bytes (the signature would verify), but it is another token string."""
    token = mint(rs, wall_clock)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = token[:-1] + alphabet[alphabet.index(token[-1]) | 1]
    assert base64.urlsafe_b64decode(
        respelled.rpartition(".")[2] + "=="
    ) == base64.urlsafe_b64decode(token.rpartition(".")[2] + "==")
    assert (await reject(verifier, respelled)).reason is Reason.TOKEN_MALFORMED
    await verifier.verify(token, POLICY)


@pytest.mark.parametrize(
    ("data", "cheap"),
    [
        *(pytest.param(c * 64, True, id=f"64-{c.decode()}") for c in (b",", b":", b"[", b"{")),
        *(pytest.param(c * 65, False, id=f"65-{c.decode()}") for c in (b",", b":", b"[", b"{")),
        pytest.param(b",:[{" * 16, True, id="64-mixed"),
        pytest.param(b",:[{" * 16 + b",", False, id="65-mixed"),
    ],
)
def test_the_values_decoded_before_the_signature_are_bounded(data: bytes, cheap: bool) -> None:
    from gateway.verifier import _cheap

    assert _cheap(data) is cheap


@pytest.mark.parametrize(("digits", "decoded"), [(64, True), (65, False)])
def test_long_integers_are_decoded_only_after_the_signature(digits: int, decoded: bool) -> None:
    text = _payload_text()[:-1] + b',"n":' + b"1" * digits + b"}"
    assert (parse_token(_jws(b'{"alg":"RS256"}', _b64(text))).payload is not None) is decoded


async def test_a_key_for_another_algorithm_is_refused(
    rs: SigningKey, wall_clock: FakeClock
) -> None:
    class WrongAlg(CountingLookup):
        async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
            return PyJWK(rs.public_jwk(with_alg=False), algorithm="PS256")

    rejection = await reject(Verifier(WrongAlg(rs), wall_clock), mint(rs, wall_clock))
    assert rejection.reason is Reason.ALGORITHM_NOT_ALLOWED


@pytest.mark.parametrize("error", [ValueError, TypeError])
async def test_a_key_the_crypto_library_chokes_on_refuses_the_token(
    error: type[Exception], rs: SigningKey, wall_clock: FakeClock
) -> None:
    class Choking:
        @staticmethod
        def verify(msg: bytes, key: Any, sig: bytes) -> bool:
            raise error("unusable key")

    class ChokingLookup(CountingLookup):
        async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
            key = PyJWK(rs.public_jwk(), algorithm="RS256")
            key.Algorithm = Choking()  # type: ignore[assignment]
            return key

    rejection = await reject(Verifier(ChokingLookup(rs), wall_clock), mint(rs, wall_clock))
    assert rejection.reason is Reason.SIGNATURE_INVALID


async def test_a_failed_claim_check_challenges_with_the_routes_scopes(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    policy = AuthPolicy(
        issuers=(TEST_ISSUER,),
        audiences=None,
        required_scopes=frozenset({"read"}),
        claim_matchers=(ClaimMatcher(("tier",), MatchOp.EQUALS, ("gold",)),),
    )
    rejection = await reject(verifier, mint(rs, wall_clock, scope="read", tier="silver"), policy)
    assert (rejection.reason, rejection.scope) == (Reason.INSUFFICIENT_SCOPE, "read")


# --- the check table: what verify runs, in order, and names when it refuses ----------------------
FULL = AuthPolicy(
    issuers=(TEST_ISSUER, OTHER_ISSUER),
    audiences=frozenset({"api"}),
    required_claims=("sub", "email"),
    required_scopes=frozenset({"read"}),
    claim_matchers=(ClaimMatcher(("tier",), MatchOp.EQUALS, ("gold",)),),
)
FULL_CLAIMS: dict[str, Any] = {"email": "a@x", "scope": "read", "tier": "gold"}


@pytest.mark.parametrize(("any_of", "which"), [(False, "all"), (True, "any")])
async def test_the_check_table_lists_a_policys_checks_in_order(
    any_of: bool, which: str, rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    """What ``gateway explain`` prints for an accepted token, one line per check, in order."""
    policy = dataclasses.replace(FULL, scopes_any_of=any_of)
    token = mint(rs, wall_clock, **FULL_CLAIMS)
    await verifier.verify(token, policy)
    facts = token_facts(token, policy)
    assert [(check.name, check.says(facts)) for check in checks(policy)] == [
        ("parse", "token parses as a JWS with a JSON header and payload"),
        ("alg", "alg RS256 is pinned by an issuer of this route"),
        ("iss", "iss names issuer 'test', trusted on this route"),
        ("issuer alg", "alg RS256 is pinned for issuer 'test'"),
        ("typ", "typ 'JWT' is accepted"),
        ("key", "key 'key-rs256' found in the issuer's key set"),
        ("key alg", "the key is bound to alg RS256"),
        ("signature", "signature verifies"),
        ("payload", "the signed payload is a JSON object"),
        ("claim types", "iss, sub and jti are strings, aud a string or strings"),
        ("signed iss", "the signed iss still names issuer 'test'"),
        ("exp", "exp is a number and has not passed (leeway 30s)"),
        ("nbf", "nbf, if present, is a number and has come (leeway 30s)"),
        ("iat", "iat, if present, is a number and not in the future (leeway 30s)"),
        ("aud", "aud names an audience of this route"),
        ("required claim", "'sub' is present"),
        ("required claim", "'email' is present"),
        ("scopes", f"the token grants {which} of: read"),
        ("claim check", "tier equals gold holds"),
    ]


def test_a_policy_runs_only_the_checks_it_configures() -> None:
    names = [check.name for check in checks(dataclasses.replace(POLICY, audiences=None))]
    assert names[-1] == "iat"
    assert "aud" not in names
    assert "scopes" not in names


def test_configured_text_in_a_check_is_shown_as_it_is() -> None:
    policy = dataclasses.replace(
        POLICY,
        required_claims=("{alg}",),
        claim_matchers=(ClaimMatcher(("x",), MatchOp.EQUALS, ("{kid}",)),),
    )
    *_, claim, matcher = checks(policy)
    assert claim.says({"alg": "RS256"}) == "'{alg}' is present"
    assert matcher.says({"kid": "k"}) == "x equals {kid} holds"


def test_token_facts_of_a_token_that_does_not_parse_are_unknown() -> None:
    assert token_facts("abc", POLICY) == {}
    assert (
        checks(POLICY)[2].says(token_facts("abc", POLICY))
        == "iss names issuer '?', trusted on this route"
    )


class _WrongAlg(CountingLookup):
    """A key set that answers every kid with a key bound to PS256."""

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        return PyJWK(self._keys["key-rs256"].public_jwk(with_alg=False), algorithm="PS256")


def _swapped_payload(rs: SigningKey, clock: FakeClock) -> str:
    head, _, sig = mint(rs, clock, **FULL_CLAIMS).split(".")
    return f"{head}.{mint(rs, clock, sub='mallory').split('.')[1]}.{sig}"


# One token per check of FULL's table, in the table's order: it passes every check before.
REFUSED_BY: list[tuple[str, Any]] = [
    ("parse", lambda rs, ps, clock: "abc"),
    ("alg", lambda rs, ps, clock: _jws(b'{"alg":"HS256","kid":"key-rs256"}')),
    ("iss", lambda rs, ps, clock: mint(rs, clock, iss="https://evil.test")),
    ("issuer alg", lambda rs, ps, clock: mint(ps, clock)),
    ("typ", lambda rs, ps, clock: mint(rs, clock, headers={"typ": "JWE"})),
    ("key", lambda rs, ps, clock: mint(rs, clock, headers={"kid": "nope"})),
    ("key alg", lambda rs, ps, clock: mint(rs, clock)),
    ("signature", lambda rs, ps, clock: _swapped_payload(rs, clock)),
    (
        "payload",
        lambda rs, ps, clock: _signed_text(rs, _payload_text(**HEAVY)[:-1] + b',"sub":"bob"}'),
    ),
    ("claim types", lambda rs, ps, clock: mint(rs, clock, sub=12345)),
    (
        "signed iss",
        lambda rs, ps, clock: _signed_text(
            rs, json.dumps({"act": {"iss": ISS}, "iss": OTHER_ISS, **HEAVY}).encode()
        ),
    ),
    ("exp", lambda rs, ps, clock: mint(rs, clock, iat=NOW - 7200, exp=NOW - 3600)),
    ("nbf", lambda rs, ps, clock: mint(rs, clock, nbf=NOW + 3600)),
    ("iat", lambda rs, ps, clock: mint(rs, clock, iat=NOW + 3600, exp=NOW + 7200)),
    ("aud", lambda rs, ps, clock: mint(rs, clock, **FULL_CLAIMS, aud="other")),
    ("required claim", lambda rs, ps, clock: mint(rs, clock, omit=("sub",), **FULL_CLAIMS)),
    ("required claim", lambda rs, ps, clock: mint(rs, clock, **{**FULL_CLAIMS, "email": None})),
    ("scopes", lambda rs, ps, clock: mint(rs, clock, **{**FULL_CLAIMS, "scope": "write"})),
    ("claim check", lambda rs, ps, clock: mint(rs, clock, **{**FULL_CLAIMS, "tier": "silver"})),
]


def test_every_check_of_the_table_has_a_token_it_refuses() -> None:
    assert [name for name, _ in REFUSED_BY] == [check.name for check in checks(FULL)]


@pytest.mark.parametrize(
    ("position", "make"),
    [pytest.param(i, make, id=f"{i:02}-{name}") for i, (name, make) in enumerate(REFUSED_BY)],
)
async def test_a_refusal_names_the_check_that_refused(
    position: int,
    make: Any,
    rs: SigningKey,
    ps: SigningKey,
    lookup: CountingLookup,
    wall_clock: FakeClock,
) -> None:
    keys = _WrongAlg(rs) if REFUSED_BY[position][0] == "key alg" else lookup
    rejection = await reject(Verifier(keys, wall_clock), make(rs, ps, wall_clock), FULL)
    assert isinstance(rejection, CheckFailed)
    assert rejection.check == checks(FULL)[position]


async def test_verify_runs_the_claim_checks_in_the_tables_order(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    """A token failing every claim check is refused by the first; fixing each in turn in the
    table's order uncovers the next, until it passes."""
    wrong: dict[str, Any] = {
        "exp": NOW - 3600, "nbf": NOW + 3600, "iat": NOW + 3600, "aud": "other", "sub": None,
        "email": None, "scope": "write", "tier": "silver",
    }  # fmt: skip
    right: list[dict[str, Any]] = [
        {"exp": NOW + 7200}, {"nbf": NOW}, {"iat": NOW}, {"aud": "api"}, {"sub": "alice"},
        {"email": "a@x"}, {"scope": "read"}, {"tier": "gold"},
    ]  # fmt: skip
    refused_by = []
    for fix in right:
        rejection = await reject(verifier, mint(rs, wall_clock, **wrong), FULL)
        assert isinstance(rejection, CheckFailed)
        refused_by.append(rejection.check)
        wrong.update(fix)
    await verifier.verify(mint(rs, wall_clock, **wrong), FULL)
    assert refused_by == list(checks(FULL)[-len(right) :])


async def test_a_key_lookup_refusal_is_the_key_check(
    rs: SigningKey, verifier: Verifier, wall_clock: FakeClock
) -> None:
    rejection = await reject(verifier, mint(rs, wall_clock, headers={"kid": "nope"}))
    assert isinstance(rejection, CheckFailed)
    assert (rejection.check.name, rejection.reason, rejection.detail) == (
        "key",
        Reason.KEY_NOT_FOUND,
        "unknown kid",
    )


def test_an_unencoded_payload_header_is_refused_even_without_crit() -> None:
    with pytest.raises(Rejection) as caught:
        parse_token(_jws(b'{"alg":"RS256","b64":true}'))
    assert caught.value.reason is Reason.TOKEN_MALFORMED


# --- a claim check's refusal names that check, whichever way the claim is wrong ------------------
@pytest.mark.parametrize(
    ("claims", "check", "reason"),
    [
        pytest.param({"aud": 123}, "claim types", Reason.CLAIM_INVALID, id="aud-not-a-string"),
        pytest.param({"exp": None}, "exp", Reason.CLAIM_MISSING, id="exp-missing"),
        pytest.param({"exp": "soon"}, "exp", Reason.CLAIM_INVALID, id="exp-not-a-number"),
        pytest.param({"exp": float("inf")}, "exp", Reason.CLAIM_INVALID, id="exp-infinite"),
        pytest.param({"nbf": "now"}, "nbf", Reason.CLAIM_INVALID, id="nbf-not-a-number"),
        pytest.param({"iat": float("nan")}, "iat", Reason.CLAIM_INVALID, id="iat-not-finite"),
        pytest.param({"aud": None}, "aud", Reason.AUDIENCE_NOT_ALLOWED, id="aud-missing"),
    ],
)
async def test_a_claim_refusal_names_its_check(
    claims: dict[str, Any],
    check: str,
    reason: Reason,
    rs: SigningKey,
    verifier: Verifier,
) -> None:
    payload = {"iss": ISS, "aud": "api", "sub": "alice", "exp": NOW + 3600, **claims}
    token = sign_raw(rs, {name: value for name, value in payload.items() if value is not None})
    rejection = await reject(verifier, token)
    assert isinstance(rejection, CheckFailed)
    expected = next(c for c in checks(POLICY) if c.name == check)
    assert (rejection.check, rejection.reason) == (expected, reason)


async def test_a_traced_verification_is_told_which_cache_answered(
    rs: SigningKey, ring: KeyRing, cached: Verifier, wall_clock: FakeClock
) -> None:
    """The span of a verification says whether the verified-token cache answered and, on a
    miss, whether the key was already held (a static set always is) or had to be fetched."""
    from gateway.tracing import VerifyNotes

    token = mint(rs, wall_clock)
    miss = VerifyNotes()
    await cached.verify(token, POLICY, miss)
    assert (miss.cache_hit, miss.key_cached) == (False, True)
    hit = VerifyNotes()
    await cached.verify(token, POLICY, hit)
    assert (hit.cache_hit, hit.key_cached) == (True, None)

    fetched = VerifyNotes()  # no key cache in front of this lookup: every key is fetched
    await Verifier(CountingLookup(rs), wall_clock).verify(token, POLICY, fetched)
    assert (fetched.cache_hit, fetched.key_cached) == (False, False)

    static = dataclasses.replace(TEST_ISSUER, jwks_uri=None, static_jwks='{"keys":[]}')
    held = VerifyNotes()
    await Verifier(CountingLookup(rs), wall_clock).verify(
        token, AuthPolicy((static,), POLICY.audiences), held
    )
    assert (held.cache_hit, held.key_cached) == (False, True)


class LeasedRing(KeyRing):
    """A key ring that hands out a lease for its set, as the key cache does; a test moves or
    ends it, and may let ``current_key`` disagree to show which one a hit believes."""

    def __init__(self, *keys: SigningKey) -> None:
        super().__init__(*keys)
        self.held = KeySetLease()
        self.held.usable_until = 10_000.0 + 600  # FakeClock's monotonic starts at 10,000
        self.asked = 0
        self.renew_on_get = False

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        key = await super().get_key(issuer, kid, alg)
        if self.renew_on_get:
            self.held.end()
            self.held = KeySetLease()
            self.held.usable_until = 10_000.0 + 600
        return key

    def lease(self, issuer: IssuerConfig) -> KeySetLease | None:
        self.asked += 1
        return self.held if issuer.id == TEST_ISSUER.id else None

    def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None:
        raise AssertionError("a hit with a lease needs no key lookup")


@pytest.fixture
def leased_ring(rs: SigningKey, es: SigningKey) -> LeasedRing:
    return LeasedRing(rs, es)


@pytest.fixture
def leased(leased_ring: LeasedRing, wall_clock: FakeClock) -> Verifier:
    return caching(leased_ring, wall_clock)


async def test_a_hit_is_served_while_its_lease_holds_and_verified_anew_from_its_end(
    rs: SigningKey, leased_ring: LeasedRing, leased: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock, exp=int(wall_clock.time()) + 3600)
    first = await leased.verify(token, POLICY)
    assert first.lease is leased_ring.held
    wall_clock.advance(599)
    assert await leased.verify(token, POLICY) is first
    assert len(leased_ring.calls) == 1
    wall_clock.advance(1)  # now == usable_until: the lease has ended
    again = await leased.verify(token, POLICY)
    assert again is not first
    assert len(leased_ring.calls) == 2


async def test_an_ended_lease_sends_a_hit_back_to_the_key_set(
    rs: SigningKey, leased_ring: LeasedRing, leased: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    await leased.verify(token, POLICY)
    leased_ring.held.end()  # the set was replaced: rs is no longer in it
    del leased_ring.current[rs.kid]
    assert (await reject(leased, token)).reason is Reason.KEY_NOT_FOUND
    assert len(leased_ring.calls) == 2


async def test_a_hit_holds_the_lease_in_force_when_its_key_was_found(
    rs: SigningKey, leased_ring: LeasedRing, leased: Verifier, wall_clock: FakeClock
) -> None:
    token = mint(rs, wall_clock)
    before = leased_ring.held
    leased_ring.renew_on_get = True  # a fetch lands while the key is looked up: a new set
    first = await leased.verify(token, POLICY)
    assert before.usable_until == float("-inf")
    assert (first.lease, leased_ring.asked) == (leased_ring.held, 1)
    assert await leased.verify(token, POLICY) is first
    # A reload with the same settings: the hit's issuer is compared, then its lease holds.
    reloaded = AuthPolicy(issuers=(dataclasses.replace(TEST_ISSUER),), audiences=POLICY.audiences)
    assert await leased.verify(token, reloaded) is first
    assert (len(leased_ring.calls), leased_ring.asked) == (1, 1)


async def test_a_leased_hit_on_another_policy_is_judged_by_that_policy_s_issuers(
    rs: SigningKey, leased: Verifier, wall_clock: FakeClock
) -> None:
    """Only the policy that judged a cached token may skip its issuer look-up: another route's
    policy that does not trust the token's issuer, or no longer pins its alg, refuses it, and
    the first policy still takes the hit."""
    token = mint(rs, wall_clock)
    first = await leased.verify(token, POLICY)
    other = dataclasses.replace(OTHER_ISSUER, algorithms=frozenset({"RS256"}))
    elsewhere = AuthPolicy(issuers=(other,), audiences=POLICY.audiences)
    assert (await reject(leased, token, elsewhere)).reason is Reason.ISSUER_NOT_ALLOWED
    repinned = AuthPolicy(
        issuers=(dataclasses.replace(TEST_ISSUER, algorithms=frozenset({"ES256"})),),
        audiences=POLICY.audiences,
    )
    assert (await reject(leased, token, repinned)).reason is Reason.ALGORITHM_NOT_ALLOWED
    assert await leased.verify(token, POLICY) is first
