"""One token's verification against a route's policy, with a bounded cache of verified tokens.

Order matters and is the point (see the README's request flow):

1. parse the compact JWS once: three base64url segments, JSON objects without
   duplicate members, no ``crit`` or ``b64`` extensions;
2. header ``alg`` must be pinned by one of the route's issuers (never chosen by the token);
3. the unverified ``iss`` must name one of the route's issuers, *before* any key
   is fetched, so a forged ``iss`` never reaches the network;
4. ``alg`` must be pinned by that issuer; the header ``typ`` accepted by it;
5. the key comes from that issuer's set only (a key bound to one algorithm);
6. signature, by PyJWT's algorithm implementation for that key;
7. claims: ``iss``, ``exp`` (required), ``nbf``/``iat`` with leeway, ``aud``,
   required claims, then scopes and claim matchers (403).

The parse is ours rather than ``jwt.decode``'s: PyJWT validates base64 one
character at a time in Python (most of its cost), and decoding both before the
key fetch (for ``iss``) and after it (for the signature) would parse twice.
Verification itself is PyJWT's (``PyJWK.Algorithm.verify``).  Time claims are
checked here because PyJWT reads the wall clock itself; ours is injected.

A token that verified is remembered (``TokenCache``) until its ``exp``; a hit
skips parsing and signature but re-checks everything that can change: the key
still in the issuer's set, time claims, and the route's whole policy.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from jwt import PyJWK

from .clock import Clock
from .config import AuthPolicy, ClaimMatcher, IssuerConfig, MatchOp
from .errors import Rejection
from .jwks import KeyLookup
from .reasons import Reason
from .token_cache import TokenCache

_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook that refuses duplicate member names (RFC 7515 §4: MUST reject):
    with them, two parsers could read two different tokens out of one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last character of a 4n+2 (4n+3) segment carries 4 (2) unused bits, which must be zero:
# otherwise 15 (3) other spellings decode to the same bytes, and one signature would have
# several tokens (a way around caches and replay lists keyed by the token).
_CANONICAL_LAST: Final = {
    2: frozenset(_ALPHABET[i] for i in range(0, 64, 16)),
    3: frozenset(_ALPHABET[i] for i in range(0, 64, 4)),
}


def _segment(text: str, name: str) -> bytes:
    # base64url without padding (RFC 7515 §2): the alphabet is checked by a regex in C,
    # a length of 4n+1 can never be valid, and the unused bits must be zero.
    rest = len(text) % 4
    if (
        not _SEGMENT.fullmatch(text)
        or rest == 1
        or (rest and text[-1] not in _CANONICAL_LAST[rest])
    ):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not canonical base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not base64url") from None


# Built once: json.loads(..., object_pairs_hook=...) would build a decoder on every call.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = _DECODER.decode(data.decode("utf-8"))  # RFC 7519 §7.2: UTF-8 JSON
    except (ValueError, RecursionError):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not a JSON object") from None
    if not isinstance(value, dict):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A compact JWS split and decoded, not yet verified."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes
    payload_segment: str


def parse_token(token: str) -> ParsedToken:
    """Split and decode a compact JWS; ``TOKEN_MALFORMED`` for anything but a plain signed JWT."""
    parts = token.split(".")
    if len(parts) != 3:  # a JWE has five; nested or trailing junk has more
        raise Rejection(Reason.TOKEN_MALFORMED, f"{len(parts)} segments")
    head, body, sig = parts
    header = _json_object(_segment(head, "header"), "header")
    # No JWS extension is understood here, so none may be critical (RFC 7515 §4.1.11),
    # and an unencoded payload (RFC 7797 b64) is refused outright.
    if "crit" in header or "b64" in header:
        raise Rejection(Reason.TOKEN_MALFORMED, "crit or b64 header")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Rejection(Reason.TOKEN_MALFORMED, "kid is not a string")
    payload = _json_object(_segment(body, "payload"), "payload")
    return ParsedToken(
        header, payload, f"{head}.{body}".encode("ascii"), _segment(sig, "signature"), body
    )


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check: its claims, and which issuer and key vouched for it."""

    claims: Mapping[str, Any]
    issuer: IssuerConfig
    kid: str | None
    payload_segment: str  # the signed base64url payload, as the token carried it
    alg: str = ""
    key: PyJWK | None = None
    typ: Any = None


class Verifier:
    """Verifies bearer tokens against route policies using a shared key cache."""

    def __init__(self, keys: KeyLookup, clock: Clock, cache: TokenCache | None = None) -> None:
        self._keys = keys
        self._clock = clock
        self._cache = cache

    async def verify(
        self, token: str, policy: AuthPolicy, trace: list[str] | None = None
    ) -> VerifiedToken:
        """Verify ``token`` for ``policy``; raise ``Rejection`` with the first failed check.

        ``trace``, when given, receives one line per check passed (``gateway explain``).
        """
        cache = self._cache
        if cache is not None and trace is None:
            hit = cache.get(token)
            if hit is not None and self._still_valid(hit, policy):
                self._check_claims(hit.claims, hit.issuer, policy, None)
                return hit
        parsed = parse_token(token)
        header, payload = parsed.header, parsed.payload
        if trace is not None:
            trace.append("token parses as a JWS with a JSON header and payload")

        alg = header.get("alg")
        if not isinstance(alg, str) or not any(alg in i.algorithms for i in policy.issuers):
            raise Rejection(Reason.ALGORITHM_NOT_ALLOWED, f"alg {str(alg)[:16]!r} not pinned")
        iss = payload.get("iss")
        issuer = policy.issuer_for(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Rejection(Reason.ISSUER_NOT_ALLOWED, "iss not trusted on this route")
        if alg not in issuer.algorithms:
            raise Rejection(Reason.ALGORITHM_NOT_ALLOWED, f"alg {alg} not pinned for {issuer.id}")
        if trace is not None:
            trace.append(f"iss names issuer '{issuer.id}', trusted on this route")
            trace.append(f"alg {alg} is pinned for issuer '{issuer.id}'")
        typ = header.get("typ")
        if not _typ_accepted(typ, issuer.typ):
            raise Rejection(Reason.TOKEN_TYPE_INVALID, "typ not accepted")
        kid = header.get("kid")
        key: PyJWK = await self._keys.get_key(issuer, kid, alg)
        if trace is not None:
            trace.append(f"typ {typ!r} is accepted")
            trace.append(f"key {kid!r} found in the issuer's key set")

        # The key is bound to one algorithm; the header's alg must be that one.
        if key.algorithm_name != alg:
            raise Rejection(Reason.ALGORITHM_NOT_ALLOWED, f"key is for {key.algorithm_name}")
        try:
            valid = key.Algorithm.verify(parsed.signing_input, key.key, parsed.signature)
        except (ValueError, TypeError):
            valid = False
        if not valid:
            raise Rejection(Reason.SIGNATURE_INVALID, "signature does not verify")
        if trace is not None:
            trace.append("signature verifies")
        exp = self._check_claims(payload, issuer, policy, trace)
        verified = VerifiedToken(payload, issuer, kid, parsed.payload_segment, alg, key, typ)
        if cache is not None:
            cache.put(token, verified, exp)
        return verified

    def _still_valid(self, hit: VerifiedToken, policy: AuthPolicy) -> bool:
        """Whether a cached token may stand for a fresh verification on this route, now:
        its issuer is trusted here with the same settings, its alg and typ still pass, and its
        key is still the one in the issuer's current set (a rotated-out key drops it)."""
        issuer = policy.issuer_for(hit.issuer.issuer)
        if issuer is None:
            return False
        if issuer is not hit.issuer and (
            # A reload made a new config object: compare settings, then re-check alg and typ.
            issuer != hit.issuer
            or hit.alg not in issuer.algorithms
            or not _typ_accepted(hit.typ, issuer.typ)
        ):
            return False
        return self._keys.current_key(issuer, hit.kid, hit.alg) is hit.key

    def _check_claims(
        self,
        claims: Mapping[str, Any],
        issuer: IssuerConfig,
        policy: AuthPolicy,
        trace: list[str] | None,
    ) -> float:
        """Check time claims and the route's policy; return ``exp``."""
        if claims.get("iss") != issuer.issuer:
            raise Rejection(Reason.ISSUER_NOT_ALLOWED, "verified iss differs")
        now = self._clock.time()
        leeway = issuer.leeway_s
        exp = _numeric_date(claims, "exp", required=True)
        assert exp is not None
        if exp <= now - leeway:
            raise Rejection(Reason.TOKEN_EXPIRED, "exp passed")
        nbf = _numeric_date(claims, "nbf", required=False)
        if nbf is not None and nbf > now + leeway:
            raise Rejection(Reason.TOKEN_NOT_YET_VALID, "nbf in the future")
        iat = _numeric_date(claims, "iat", required=False)
        if iat is not None and iat > now + leeway:
            raise Rejection(Reason.TOKEN_NOT_YET_VALID, "iat in the future")
        if trace is not None:
            trace.append(f"exp, nbf and iat are valid now (leeway {leeway:g}s)")
        if policy.audiences is not None:
            _check_audience(claims.get("aud"), policy.audiences)
            if trace is not None:
                trace.append("aud names an audience of this route")
        for name in policy.required_claims:
            if claims.get(name) is None:
                raise Rejection(Reason.CLAIM_MISSING, f"claim {name} missing")
            if trace is not None:
                trace.append(f"required claim {name!r} is present")
        if policy.required_scopes:
            granted = _granted_scopes(claims)
            enough = (
                not policy.required_scopes.isdisjoint(granted)
                if policy.scopes_any_of
                else policy.required_scopes <= granted
            )
            if not enough:
                raise Rejection(
                    Reason.INSUFFICIENT_SCOPE, "required scope not granted", scope=_scope(policy)
                )
            if trace is not None:
                which = "any" if policy.scopes_any_of else "all"
                trace.append(f"scopes grant {which} of: {_scope(policy)}")
        for matcher in policy.claim_matchers:
            if not claim_matches(matcher, claims):
                raise Rejection(
                    Reason.INSUFFICIENT_SCOPE,
                    f"claim check failed: {matcher.describe()}",
                    scope=_scope(policy),
                )
            if trace is not None:
                trace.append(f"claim check holds: {matcher.describe()}")
        return exp


def _scope(policy: AuthPolicy) -> str | None:
    """The ``scope`` attribute of a 403 challenge: built only when a request is refused."""
    return " ".join(sorted(policy.required_scopes)) or None


# RFC 9068 access tokens say at+jwt; most other issuers say JWT or nothing.
_DEFAULT_TYPES: Final = frozenset({"jwt", "at+jwt"})


def _typ_accepted(typ: Any, required: str | None) -> bool:
    """Compare ``typ`` as RFC 7515 §4.1.9 says: case-insensitive, ``application/`` optional."""
    if typ is None:
        return required is None
    if not isinstance(typ, str):
        return False
    name = typ.lower().removeprefix("application/")
    if required is None:
        return name in _DEFAULT_TYPES
    return name == required.lower().removeprefix("application/")


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    """RFC 7519 NumericDate: a JSON number (not a bool, not a string)."""
    value = claims.get(name)
    if value is None:
        if required:
            raise Rejection(Reason.CLAIM_MISSING, f"claim {name} missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejection(Reason.CLAIM_INVALID, f"claim {name} is not a NumericDate")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    # json.loads accepts NaN and Infinity; an infinite exp would never expire.
    if not math.isfinite(number):
        raise Rejection(Reason.CLAIM_INVALID, f"claim {name} is not finite")
    return number


def _check_audience(aud: Any, accepted: frozenset[str]) -> None:
    """``aud`` is a string or a list of strings; one of them must be accepted here."""
    if aud is None or aud == [] or aud == "":
        raise Rejection(Reason.AUDIENCE_NOT_ALLOWED, "aud missing")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise Rejection(Reason.AUDIENCE_NOT_ALLOWED, "aud is not a string or list of strings")
    if accepted.isdisjoint(values):
        raise Rejection(Reason.AUDIENCE_NOT_ALLOWED, "aud not accepted")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 equals 1.0), but a boolean is never a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def claim_matches(matcher: ClaimMatcher, claims: Mapping[str, Any]) -> bool:
    """Whether the verified claims satisfy one configured matcher."""
    value = lookup_claim(claims, matcher.path)
    if matcher.op is MatchOp.CONTAINS:
        wanted = matcher.values[0]
        if isinstance(value, str):
            return isinstance(wanted, str) and wanted in value.split()
        return isinstance(value, list) and any(_same(item, wanted) for item in value)
    return any(_same(value, wanted) for wanted in matcher.values)


def lookup_claim(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a claim path (``("org", "tenant_id")``), or ``None`` when any step is absent."""
    value: Any = claims
    for segment in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(segment)
    return value


def _granted_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (RFC 8693/9068: space-delimited) or ``scp`` (a list or a string)."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(v for v in value if isinstance(v, str))
    return frozenset(granted)
