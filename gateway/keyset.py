"""A JWKS document turned into usable verification keys: which keys are kept, and for which algorithms."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from jwt import PyJWK
from jwt.exceptions import PyJWTError

from .errors import JwksFetchError
from .logs import kv
from .reasons import Reason

log = logging.getLogger(__name__)

# Which algorithms a key of each type and curve can verify (RFC 7518 §3, RFC 8037).
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_ALGS_BY_KEY: Final[Mapping[tuple[str, str | None], frozenset[str]]] = {
    ("RSA", None): _RSA_ALGS,
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}


# Members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4.1): a key
# carrying any of them was published by mistake, and is never used, whatever else it says.
PRIVATE_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def private_members(jwk: Any) -> list[str]:
    """The private-key members ``jwk`` carries (empty for a public key or a non-object)."""
    return [m for m in PRIVATE_MEMBERS if m in jwk] if isinstance(jwk, dict) else []


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable signing keys of one fetch: ``kid`` → ``alg`` → key, plus keys without a kid."""

    by_kid: Mapping[str, Mapping[str, PyJWK]]
    unnamed: Mapping[str, tuple[PyJWK, ...]]
    size: int

    def lookup(self, kid: str | None, alg: str) -> PyJWK | Reason:
        """The key for this kid and alg, or the reason there is none.

        ``KEY_NOT_FOUND`` means the kid is unknown (a refetch may help);
        ``ALGORITHM_NOT_ALLOWED`` means the kid is known but not for this alg.
        A token without a kid is matched only when exactly one key fits its alg.
        """
        if kid is None:
            candidates = [*self.unnamed.get(alg, ()),
                          *(keys[alg] for keys in self.by_kid.values() if alg in keys)]  # fmt: skip
            return candidates[0] if len(candidates) == 1 else Reason.KEY_NOT_FOUND
        keys = self.by_kid.get(kid)
        if keys is None:
            return Reason.KEY_NOT_FOUND
        return keys.get(alg, Reason.ALGORITHM_NOT_ALLOWED)


def build_key_set(
    document: Any,
    issuer_id: str,
    algorithms: frozenset[str],
    *,
    on_private: Callable[[], None] | None = None,
) -> KeySet:
    """Turn a JWKS document into a ``KeySet`` of the keys usable with the issuer's algorithms.

    Keys with private members are dropped first (logged, and ``on_private`` is called for
    each).  Encryption keys, HMAC keys, keys for other algorithms and keys PyJWT cannot
    load are skipped one by one (and logged); a set with no usable key at all is
    a failed fetch (``invalid``), so it never replaces a good set.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFetchError("invalid", "document has no 'keys' list")
    by_kid: dict[str, dict[str, PyJWK]] = {}
    unnamed: dict[str, list[PyJWK]] = {}
    size = 0
    for index, jwk in enumerate(document["keys"]):
        private = private_members(jwk)
        if private:
            # Never loaded: PyJWT would build a private key (an RSA one fails to verify, an EC
            # one verifies); the members' values are never logged.
            log.error(kv(event="jwks_key_skipped", issuer=issuer_id, index=index,
                         kid=jwk.get("kid") if isinstance(jwk.get("kid"), str) else None,
                         why="private_key_material", members=",".join(private)))  # fmt: skip
            if on_private is not None:
                on_private()
            continue
        usable = _load_key(jwk, issuer_id, algorithms, index)
        if not usable:
            continue
        kid = jwk.get("kid")
        if isinstance(kid, str):
            slot = by_kid.setdefault(kid, {})
            if any(alg in slot for alg in usable):
                log.warning(kv(event="jwks_key_skipped", issuer=issuer_id, index=index,
                               why="duplicate_kid"))  # fmt: skip
                continue
            slot.update(usable)
        else:
            for alg, key in usable.items():
                unnamed.setdefault(alg, []).append(key)
        size += 1
    if size == 0:
        raise JwksFetchError("invalid", "no usable signing key")
    return KeySet(
        by_kid={k: dict(v) for k, v in by_kid.items()},
        unnamed={alg: tuple(keys) for alg, keys in unnamed.items()},
        size=size,
    )


def _load_key(jwk: Any, issuer_id: str, algorithms: frozenset[str], index: int) -> dict[str, PyJWK]:
    """The PyJWK objects one JWK yields, by algorithm; empty when it is not usable."""

    def skip(why: str) -> dict[str, PyJWK]:
        log.warning(kv(event="jwks_key_skipped", issuer=issuer_id, index=index, why=why))
        return {}

    if not isinstance(jwk, dict):
        return skip("not_an_object")
    if jwk.get("use", "sig") != "sig":
        return {}  # encryption keys are never used to verify; not worth a warning
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return {}
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return skip("kid_not_a_string")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if not isinstance(kty, str) or not isinstance(crv, str | None):
        return skip("kty_or_crv_not_a_string")
    fits = _ALGS_BY_KEY.get((kty, None if kty == "RSA" else crv))
    if fits is None:
        return skip("unsupported_kty_or_crv")
    declared = jwk.get("alg")
    if declared is not None and not isinstance(declared, str):
        return skip("alg_not_a_string")
    wanted = fits & algorithms
    if declared is not None:
        # A key that names its algorithm is used for that algorithm only.
        if declared not in fits:
            return skip("alg_does_not_fit_kty")
        wanted = wanted & {declared}
    loaded: dict[str, PyJWK] = {}
    for alg in sorted(wanted):
        try:
            key = PyJWK(jwk, algorithm=alg)
        except (PyJWTError, ValueError, TypeError, KeyError):
            return skip("unloadable")
        if key.Algorithm.check_key_length(key.key) is not None:
            return skip("key_too_short")
        loaded[alg] = key
    return loaded
