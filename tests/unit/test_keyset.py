"""Which keys of a JWKS document are usable: key type and curve against the pinned algorithms,
private members, the per-key skip log, lookups by kid and alg, and documents that are no key set.

``build_key_set`` is pure: these tests hand it documents and look the keys up.  The cache that
fetches documents is tested in ``test_jwks.py``.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed448, rsa
from jwt import PyJWK
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from gateway.errors import JwksFetchError
from gateway.keyset import PRIVATE_MEMBERS, KeySet, build_key_set, private_members
from gateway.reasons import Reason
from tests.conftest import ALL_ALGORITHMS
from tests.fakes import FakeIdP, SigningKey

ISSUER_ID = "corp"
EVERY_ALG = frozenset(ALL_ALGORITHMS)
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


def build(keys: list[Any], algorithms: frozenset[str] = EVERY_ALG, **kwargs: Any) -> KeySet:
    return build_key_set({"keys": keys}, ISSUER_ID, algorithms, **kwargs)


def served(key_set: KeySet, kid: str | None) -> set[str]:
    """The algorithms for which ``kid`` finds a key."""
    return {alg for alg in EVERY_ALG if isinstance(key_set.lookup(kid, alg), PyJWK)}


def found(key_set: KeySet, kid: str | None, alg: str) -> PyJWK:
    key = key_set.lookup(kid, alg)
    assert isinstance(key, PyJWK), key
    return key


def verifies(key: PyJWK, signer: SigningKey, alg: str | None = None) -> bool:
    """Whether a token ``signer`` signs verifies with ``key`` (``key`` is its public half)."""
    alg = alg or signer.alg
    token = jwt.encode({"sub": "alice"}, signer.private, algorithm=alg)
    try:
        jwt.decode(token, key, algorithms=[alg])
    except jwt.InvalidSignatureError:
        return False
    return True


def without(jwk: dict[str, Any], *members: str) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k not in members}


@pytest.fixture(scope="module")
def ed448_jwk() -> dict[str, Any]:
    public = ed448.Ed448PrivateKey.generate().public_key()
    jwk: dict[str, Any] = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": "ed448", "use": "sig"}


@pytest.fixture(scope="module")
def rsa_1024_jwk() -> dict[str, Any]:
    # Deliberately breakable: it must be refused.
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return {**jwk, "kid": "bad", "alg": "RS256", "use": "sig"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- which algorithms a key serves -----------------------------------------------------------------
FITS = [
    # (signing key, JWK changes, the issuer's pinned algorithms, what the key serves)
    pytest.param("RS256", {"alg": None}, EVERY_ALG, RSA_ALGS, id="rsa-without-alg-every-rsa-alg"),
    pytest.param(
        "RS256", {"alg": None}, frozenset({"RS256", "ES256"}), {"RS256"}, id="rsa-only-pinned"
    ),
    pytest.param("RS256", {"alg": "PS384"}, EVERY_ALG, {"PS384"}, id="rsa-declared-alg-only"),
    pytest.param("ES256", {"alg": None}, EVERY_ALG, {"ES256"}, id="p256-es256"),
    pytest.param("ES384", {"alg": None}, EVERY_ALG, {"ES384"}, id="p384-es384"),
    pytest.param("ES512", {"alg": None}, EVERY_ALG, {"ES512"}, id="p521-es512"),
    pytest.param("EdDSA", {"alg": None}, EVERY_ALG, {"EdDSA"}, id="ed25519-eddsa"),
    pytest.param("EdDSA", {}, EVERY_ALG, {"EdDSA"}, id="ed25519-declaring-eddsa"),
    pytest.param("ES256", {"use": None}, EVERY_ALG, {"ES256"}, id="no-use-means-sig"),
    pytest.param("ES256", {"key_ops": ["verify"]}, EVERY_ALG, {"ES256"}, id="key-ops-verify"),
    pytest.param(
        "ES256", {"key_ops": ["sign", "verify"]}, EVERY_ALG, {"ES256"}, id="key-ops-with-verify"
    ),
    # Not usable:
    pytest.param(
        "RS256", {"alg": "PS384"}, frozenset({"RS256"}), set(), id="declared-alg-not-pinned"
    ),
    pytest.param("ES256", {"alg": "ES384"}, EVERY_ALG, set(), id="p256-declaring-es384"),
    pytest.param("ES256", {"alg": None}, RSA_ALGS, set(), id="ec-key-rsa-issuer"),
    pytest.param("RS256", {"alg": "EdDSA"}, EVERY_ALG, set(), id="rsa-declaring-eddsa"),
    pytest.param("EdDSA", {"alg": "ES256"}, EVERY_ALG, set(), id="okp-declaring-es256"),
    pytest.param("RS256", {"use": "enc"}, EVERY_ALG, set(), id="encryption-key"),
    pytest.param("RS256", {"key_ops": ["encrypt"]}, EVERY_ALG, set(), id="key-ops-without-verify"),
    pytest.param("RS256", {"key_ops": []}, EVERY_ALG, set(), id="key-ops-empty"),
    pytest.param("RS256", {"alg": "HS256"}, EVERY_ALG, set(), id="rsa-declaring-hmac"),
]


@pytest.mark.parametrize(("signer", "changes", "pinned", "expected"), FITS)
def test_a_key_serves_the_pinned_algorithms_its_type_and_curve_fit(
    signing_keys: dict[str, SigningKey],
    signer: str,
    changes: dict[str, Any],
    pinned: frozenset[str],
    expected: set[str],
) -> None:
    key = signing_keys[signer]
    jwk = {k: v for k, v in {**key.public_jwk(kid="k"), **changes}.items() if v is not None}
    # Another key keeps the set valid when this one is unusable (every row pins RS256).
    other = signing_keys["RS256"].public_jwk(kid="other", alg="RS256")
    key_set = build([jwk, other], pinned)
    assert served(key_set, "k") == expected
    for alg in expected:
        assert verifies(found(key_set, "k", alg), key, alg)


def test_an_ed448_key_serves_eddsa(ed448_jwk: dict[str, Any]) -> None:
    key_set = build([ed448_jwk])
    assert served(key_set, "ed448") == {"EdDSA"}


def test_a_known_kid_with_another_alg_is_not_an_unknown_key(
    signing_keys: dict[str, SigningKey],
) -> None:
    rs = signing_keys["RS256"]
    key_set = build([rs.public_jwk()])
    # Distinct answers: an unknown kid may be worth a refetch, a wrong alg never is.
    assert key_set.lookup(rs.kid, "ES256") is Reason.ALGORITHM_NOT_ALLOWED
    assert key_set.lookup(rs.kid, "PS256") is Reason.ALGORITHM_NOT_ALLOWED  # declared RS256
    assert key_set.lookup("nobody", "RS256") is Reason.KEY_NOT_FOUND


def test_an_rsa_key_without_alg_is_bound_to_each_pinned_rsa_alg_and_no_other(
    signing_keys: dict[str, SigningKey],
) -> None:
    rs = signing_keys["RS256"]
    key_set = build([rs.public_jwk(with_alg=False)], frozenset({"RS256", "PS256", "ES256"}))
    assert found(key_set, rs.kid, "RS256").algorithm_name == "RS256"
    assert found(key_set, rs.kid, "PS256").algorithm_name == "PS256"
    assert key_set.lookup(rs.kid, "RS384") is Reason.ALGORITHM_NOT_ALLOWED  # fits, not pinned
    assert key_set.lookup(rs.kid, "ES256") is Reason.ALGORITHM_NOT_ALLOWED  # pinned, wrong kty
    assert key_set.size == 1


def test_the_same_kid_on_different_key_types_serves_both(
    signing_keys: dict[str, SigningKey],
) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    key_set = build([rs.public_jwk(kid="shared"), es.public_jwk(kid="shared")])
    assert key_set.size == 2
    assert verifies(found(key_set, "shared", "RS256"), rs)
    assert verifies(found(key_set, "shared", "ES256"), es)


@pytest.mark.parametrize(
    ("published", "expected"),
    [
        pytest.param(["rs-nokid"], "rs", id="the-one-kidless-key"),
        pytest.param(["rs"], "rs", id="the-one-key-with-a-kid"),
        pytest.param(["rs-nokid", "es-nokid"], "rs", id="the-one-that-fits-the-alg"),
        pytest.param(["rs-nokid", "es"], "rs", id="the-kidless-one-that-fits-among-kid-keys"),
        pytest.param(["es-nokid", "rs"], "rs", id="the-kid-key-that-fits-among-kidless-ones"),
        pytest.param(["rs-nokid", "ps"], None, id="kidless-and-kid-both-fit"),
        pytest.param(["rs-nokid", "ps-nokid"], None, id="two-kidless-fit"),
        pytest.param(["rs", "ps"], None, id="two-with-kids-fit"),
        pytest.param(["es-nokid"], None, id="none-fits"),
    ],
)
def test_a_kidless_token_gets_a_key_only_when_exactly_one_fits(
    signing_keys: dict[str, SigningKey], published: list[str], expected: str | None
) -> None:
    rs, ps, es = signing_keys["RS256"], signing_keys["PS256"], signing_keys["ES256"]
    jwks = {
        "rs": rs.public_jwk(with_alg=False),
        "rs-nokid": without(rs.public_jwk(with_alg=False), "kid"),
        "ps": ps.public_jwk(with_alg=False),
        "ps-nokid": without(ps.public_jwk(with_alg=False), "kid"),
        "es-nokid": without(es.public_jwk(), "kid"),
        "es": es.public_jwk(),
    }
    key_set = build([jwks[name] for name in published])
    if expected is None:
        # Guessing between keys would let whichever key is listed first decide.
        assert key_set.lookup(None, "RS256") is Reason.KEY_NOT_FOUND
    else:
        assert verifies(found(key_set, None, "RS256"), {"rs": rs}[expected])


def test_a_token_naming_a_kid_never_falls_back_to_a_kidless_key(
    signing_keys: dict[str, SigningKey],
) -> None:
    rs = signing_keys["RS256"]
    key_set = build([without(rs.public_jwk(), "kid")])
    assert key_set.lookup("some-kid", "RS256") is Reason.KEY_NOT_FOUND


def test_size_counts_keys_not_algorithms(signing_keys: dict[str, SigningKey]) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    key_set = build(
        [
            rs.public_jwk(with_alg=False),  # six algorithms, one key
            without(es.public_jwk(), "kid"),  # a kid-less key counts too
            rs.public_jwk(kid="enc", use="enc"),  # skipped: not counted
        ]
    )
    assert key_set.size == 2


# --- why a key was skipped, in the log ---------------------------------------------------------------
SKIPS = [
    pytest.param(lambda k: "not a key", "not_an_object", id="not-an-object"),
    pytest.param(lambda k: k.public_jwk(kid=7), "kid_not_a_string", id="kid-a-number"),
    pytest.param(lambda k: k.public_jwk(kty=["RSA"]), "kty_or_crv_not_a_string", id="kty-a-list"),
    pytest.param(lambda k: k.public_jwk(crv=5), "kty_or_crv_not_a_string", id="crv-a-number"),
    pytest.param(
        lambda k: without(k.public_jwk(), "kty"), "kty_or_crv_not_a_string", id="kty-missing"
    ),
    pytest.param(lambda k: k.public_jwk(kty="oct"), "unsupported_kty_or_crv", id="oct"),
    pytest.param(lambda k: k.public_jwk(alg=256), "alg_not_a_string", id="alg-a-number"),
    pytest.param(lambda k: k.public_jwk(alg=["RS256"]), "alg_not_a_string", id="alg-a-list"),
    pytest.param(lambda k: k.public_jwk(alg={"RS256": 1}), "alg_not_a_string", id="alg-an-object"),
    pytest.param(lambda k: k.public_jwk(alg="ES256"), "alg_does_not_fit_kty", id="alg-misfit"),
    pytest.param(lambda k: k.public_jwk(n="AAAA"), "unloadable", id="garbage-modulus"),
]


@pytest.mark.parametrize(("make", "why"), SKIPS)
def test_a_skipped_key_is_logged_with_its_index_and_why(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture, make: Any, why: str
) -> None:
    rs = signing_keys["RS256"]
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    key_set = build([rs.public_jwk(), make(rs)])
    assert key_set.size == 1
    assert verifies(found(key_set, rs.kid, "RS256"), rs)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.keyset"]
    assert lines == [f"event=jwks_key_skipped issuer={ISSUER_ID} index=1 why={why}"]


def test_encryption_keys_are_skipped_silently(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    rs = signing_keys["RS256"]
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    build([rs.public_jwk(), rs.public_jwk(kid="enc", use="enc")])
    assert caplog.records == []  # published for others on purpose: nothing to warn about


# --- private members --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("jwk", "expected"),
    [
        pytest.param({"kty": "RSA", "n": "x", "e": "AQAB"}, [], id="rsa-public"),
        pytest.param(
            {"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}, ["d"], id="ec-private"
        ),
        pytest.param(
            {
                "kty": "RSA",
                "n": "x",
                "e": "AQAB",
                "qi": 1,
                "dq": 1,
                "dp": 1,
                "q": 1,
                "p": 1,
                "d": 1,
            },
            ["d", "p", "q", "dp", "dq", "qi"],
            id="rsa-private-in-table-order",
        ),
        pytest.param({"kty": "oct", "k": "c2VjcmV0"}, ["k"], id="symmetric"),
        pytest.param({"kty": "RSA", "oth": []}, ["oth"], id="multi-prime"),
        pytest.param({"kty": "EC", "d": None}, ["d"], id="present-even-when-null"),
        pytest.param({"kty": "EC", "D": "c"}, [], id="member-names-are-case-sensitive"),
        pytest.param("d", [], id="a-string"),
        pytest.param(["d", "k"], [], id="a-list"),
        pytest.param(None, [], id="null"),
    ],
)
def test_private_members(jwk: Any, expected: list[str]) -> None:
    assert private_members(jwk) == expected


def test_every_private_member_of_rfc_7518_is_listed() -> None:
    assert set(PRIVATE_MEMBERS) == {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.mark.parametrize("signer", ["RS256", "ES256", "EdDSA"])
def test_a_private_key_is_never_used_and_reported_without_its_values(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture, signer: str
) -> None:
    key = signing_keys[signer]
    leaked = FakeIdP.private_jwk(key, kid="leaked")
    reported: list[str] = []
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    key_set = build([leaked, key.public_jwk(kid="public")], on_private=lambda: reported.append("x"))
    assert served(key_set, "leaked") == set()
    assert key_set.lookup("leaked", key.alg) is Reason.KEY_NOT_FOUND
    assert verifies(found(key_set, "public", key.alg), key)
    assert reported == ["x"]
    (record,) = [r for r in caplog.records if "private_key_material" in r.getMessage()]
    assert record.levelno == logging.ERROR
    members = ",".join(m for m in PRIVATE_MEMBERS if m in leaked)
    assert record.getMessage() == (
        f"event=jwks_key_skipped issuer={ISSUER_ID} index=0 kid=leaked"
        f" why=private_key_material members={members}"
    )
    assert leaked["d"] not in caplog.text


def test_a_private_key_without_a_string_kid_is_logged_without_one(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    rs = signing_keys["RS256"]
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    build([FakeIdP.private_jwk(rs, kid=["x"]), rs.public_jwk()])  # no on_private: still dropped
    (line,) = [r.getMessage() for r in caplog.records if "private_key_material" in r.getMessage()]
    assert "kid=" not in line


def test_a_private_key_is_not_a_candidate_for_a_kidless_token(
    signing_keys: dict[str, SigningKey],
) -> None:
    es = signing_keys["ES256"]
    # Were the private twin loaded, two keys would fit ES256 and none would be chosen.
    key_set = build(
        [without(FakeIdP.private_jwk(es), "kid"), without(es.public_jwk(), "kid")],
        on_private=lambda: None,
    )
    assert verifies(found(key_set, None, "ES256"), es)


_OTH = [{"r": b64(b"\x03" * 64), "d": b64(b"\x05" * 64), "t": b64(b"\x07" * 64)}]


@pytest.mark.parametrize("member", PRIVATE_MEMBERS)
def test_a_public_key_with_a_single_private_member_is_dropped(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture, member: str
) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    reported: list[int] = []
    value: Any = _OTH if member == "oth" else b64(b"\x01" * 32)
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    key_set = build(
        [rs.public_jwk(**{member: value}), es.public_jwk()], on_private=lambda: reported.append(1)
    )
    assert served(key_set, rs.kid) == set()
    assert key_set.size == 1
    assert verifies(found(key_set, es.kid, "ES256"), es)
    assert reported == [1]
    assert f"why=private_key_material members={member}" in caplog.text


# --- documents that yield no key set --------------------------------------------------------------------
@pytest.mark.parametrize(
    "document",
    [
        pytest.param({}, id="no-keys-member"),
        pytest.param({"keys": None}, id="keys-null"),
        pytest.param({"keys": {"kty": "RSA"}}, id="keys-an-object"),
        pytest.param([{"kty": "RSA"}], id="a-bare-list"),
        pytest.param("{}", id="a-string"),
        pytest.param(None, id="null"),
    ],
)
def test_a_document_without_a_keys_list_is_an_invalid_fetch(document: Any) -> None:
    with pytest.raises(JwksFetchError) as caught:
        build_key_set(document, ISSUER_ID, EVERY_ALG)
    assert (caught.value.result, caught.value.detail) == ("invalid", "document has no 'keys' list")


@pytest.mark.parametrize(
    ("keys", "private"),
    [
        pytest.param([], 0, id="empty"),
        # An HMAC key's "k" is private material: reported like any private key.
        pytest.param(
            ["junk", {"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}], 1, id="only-unusable"
        ),
        pytest.param(["private-rs", "private-es"], 2, id="only-private"),
        pytest.param(["wrong-alg"], 0, id="only-keys-for-other-algorithms"),
        pytest.param(["encryption"], 0, id="only-an-encryption-key"),
        pytest.param(["short"], 0, id="only-a-short-rsa-key"),
        pytest.param(["garbage-n"], 0, id="only-an-unloadable-key"),
    ],
)
def test_a_set_without_a_usable_key_is_an_invalid_fetch(
    signing_keys: dict[str, SigningKey],
    rsa_1024_jwk: dict[str, Any],
    keys: list[Any],
    private: int,
) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    named = {
        "private-rs": FakeIdP.private_jwk(rs),
        "private-es": FakeIdP.private_jwk(es),
        "wrong-alg": rs.public_jwk(),
        "encryption": es.public_jwk(use="enc"),
        "short": without(rsa_1024_jwk, "alg"),
        "garbage-n": without(rs.public_jwk(n="AAAA"), "alg"),
    }
    document = [named.get(k, k) if isinstance(k, str) else k for k in keys]
    reported: list[int] = []
    with pytest.raises(JwksFetchError) as caught:
        build(document, frozenset({"ES256", "PS256"}), on_private=lambda: reported.append(1))
    assert (caught.value.result, caught.value.detail) == ("invalid", "no usable signing key")
    assert len(reported) == private  # each private key reported on its own


# --- more than one key: each judged on its own, the first of a kid kept ------------------------
HYGIENE_ALGS = frozenset({"RS256", "ES256", "EdDSA"})


def unusable_jwk(case: str, keys: dict[str, SigningKey], short: dict[str, Any]) -> Any:
    rs, es, ed, ps = keys["RS256"], keys["ES256"], keys["EdDSA"], keys["PS256"]
    return {
        "use-enc": rs.public_jwk(kid="bad", use="enc"),
        "key-ops-encrypt": rs.public_jwk(kid="bad", key_ops=["encrypt"]),
        "key-ops-not-a-list": rs.public_jwk(kid="bad", key_ops="verify"),
        "oct-hmac": {"kty": "oct", "k": b64(b"s" * 32), "kid": "bad", "alg": "HS256", "use": "sig"},
        "oct-without-alg": {"kty": "oct", "k": b64(b"s" * 32), "kid": "bad"},
        "alg-not-pinned-by-issuer": ps.public_jwk(kid="bad"),
        "rsa-declaring-es256": rs.public_jwk(kid="bad", alg="ES256"),
        "ec-declaring-rs256": es.public_jwk(kid="bad", alg="RS256"),
        "okp-declaring-es256": ed.public_jwk(kid="bad", alg="ES256"),
        "rsa-1024-bits": short,
        "garbage-n": rs.public_jwk(kid="bad", n="AAAA"),
        "n-not-a-string": rs.public_jwk(kid="bad", n=12345),
        "ec-wrong-curve-coords": es.public_jwk(kid="bad", crv="P-384"),
        "ec-unknown-curve": es.public_jwk(kid="bad", crv="secp256k1"),
        "okp-x25519": ed.public_jwk(kid="bad", crv="X25519"),
        "unknown-kty": rs.public_jwk(kid="bad", kty="RSA-PSS"),
        "kty-missing": without(rs.public_jwk(kid="bad"), "kty"),
        "kid-not-a-string": rs.public_jwk(kid=7),
        "not-an-object": "bad",
    }[case]


UNUSABLE = [
    "use-enc",
    "key-ops-encrypt",
    "key-ops-not-a-list",
    "oct-hmac",
    "oct-without-alg",
    "alg-not-pinned-by-issuer",
    "rsa-declaring-es256",
    "ec-declaring-rs256",
    "okp-declaring-es256",
    "rsa-1024-bits",
    "garbage-n",
    "n-not-a-string",
    "ec-wrong-curve-coords",
    "ec-unknown-curve",
    "okp-x25519",
    "unknown-kty",
    "kty-missing",
    "kid-not-a-string",
    "not-an-object",
]


@pytest.mark.parametrize("case", UNUSABLE)
def test_an_unusable_key_between_usable_ones_is_skipped_without_poisoning_them(
    case: str, signing_keys: dict[str, SigningKey], rsa_1024_jwk: dict[str, Any]
) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    bad = unusable_jwk(case, signing_keys, rsa_1024_jwk)
    key_set = build([rs.public_jwk(), bad, es.public_jwk()], HYGIENE_ALGS)
    assert key_set.size == 2
    for alg in sorted(HYGIENE_ALGS | {"PS256", "HS256"}):
        assert key_set.lookup("bad", alg) is Reason.KEY_NOT_FOUND
    # The bad key is not a kid-less candidate either.
    assert key_set.lookup(None, "HS256") is Reason.KEY_NOT_FOUND
    assert verifies(found(key_set, rs.kid, "RS256"), rs)
    assert verifies(found(key_set, es.kid, "ES256"), es)


def test_an_unusable_key_does_not_hide_the_keys_after_it(
    signing_keys: dict[str, SigningKey],
) -> None:
    rs, es = signing_keys["RS256"], signing_keys["ES256"]
    key_set = build([rs.public_jwk(use="enc"), "junk", es.public_jwk()])
    assert key_set.size == 1
    assert verifies(found(key_set, es.kid, "ES256"), es)


def test_a_duplicate_kid_keeps_the_first_key_is_logged_and_hides_no_later_key(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    rs, ps, es = signing_keys["RS256"], signing_keys["PS256"], signing_keys["ES256"]
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    key_set = build([rs.public_jwk(kid="k"), ps.public_jwk(kid="k", alg="RS256"), es.public_jwk()])
    assert key_set.size == 2
    assert verifies(found(key_set, "k", "RS256"), rs)
    assert not verifies(found(key_set, "k", "RS256"), ps, "RS256")
    assert verifies(found(key_set, es.kid, "ES256"), es)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.keyset"]
    assert lines == [f"event=jwks_key_skipped issuer={ISSUER_ID} index=1 why=duplicate_kid"]


def test_an_rsa_key_is_judged_by_its_type_alone(signing_keys: dict[str, SigningKey]) -> None:
    """RSA keys have no curve (RFC 7518 §6.3): a stray ``crv`` member does not make one unusable."""
    rs = signing_keys["RS256"]
    key_set = build([rs.public_jwk(crv="P-256")])
    assert verifies(found(key_set, rs.kid, "RS256"), rs)


def test_a_short_rsa_key_is_skipped_and_logged(
    signing_keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    rs = signing_keys["RS256"]
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    jwk = {**RSAAlgorithm.to_jwk(short.public_key(), as_dict=True), "kid": "short", "alg": "RS256"}
    caplog.set_level(logging.WARNING, logger="gateway.keyset")
    key_set = build([rs.public_jwk(), jwk])
    assert key_set.lookup("short", "RS256") is Reason.KEY_NOT_FOUND
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.keyset"]
    assert lines == [f"event=jwks_key_skipped issuer={ISSUER_ID} index=1 why=key_too_short"]
