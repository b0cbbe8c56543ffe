"""One token's verification against a route's policy; the only place PyJWT errors become reasons.

Order matters and is the point (see the README's request flow):

1. parse the compact JWS once, unverified;
2. header ``alg`` must be pinned by one of the route's issuers (never chosen by the token);
3. the unverified ``iss`` must name one of the route's issuers, *before* any key
   is fetched, so a forged ``iss`` never reaches the network;
4. ``alg`` must be pinned by that issuer; the key comes from that issuer's set only;
5. the header ``typ``: JWT, at+jwt or absent, or exactly the issuer's ``typ``;
6. signature (PyJWT, with the key bound to its algorithm);
7. claims: ``iss``, ``exp`` (required), ``nbf``/``iat`` with leeway, ``aud``,
   required claims, then scopes (403).

Time claims are checked here rather than by PyJWT because PyJWT reads the wall
clock itself; the gateway's clock is injected so tests can move it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from jwt import PyJWK
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from .clock import Clock
from .config import AuthPolicy, ClaimMatcher, IssuerConfig, MatchOp
from .errors import Rejection
from .jwks import KeyLookup
from .reasons import Reason

# PyJWT exception → Reason, most specific first (InvalidSignatureError is a
# DecodeError, so it must come before it).  A test walks every InvalidTokenError
# subclass PyJWT exports, so an upgrade that adds one fails loudly.
PYJWT_REASONS: Final[tuple[tuple[type[jwt.InvalidTokenError], Reason], ...]] = (
    (jwt.InvalidSignatureError, Reason.SIGNATURE_INVALID),
    (jwt.ExpiredSignatureError, Reason.TOKEN_EXPIRED),
    (jwt.ImmatureSignatureError, Reason.TOKEN_NOT_YET_VALID),
    (jwt.InvalidAudienceError, Reason.AUDIENCE_NOT_ALLOWED),
    (jwt.InvalidIssuerError, Reason.ISSUER_NOT_ALLOWED),
    (jwt.InvalidAlgorithmError, Reason.ALGORITHM_NOT_ALLOWED),
    (jwt.MissingRequiredClaimError, Reason.CLAIM_MISSING),
    (jwt.InvalidIssuedAtError, Reason.CLAIM_INVALID),
    (InvalidSubjectError, Reason.CLAIM_INVALID),
    (InvalidJTIError, Reason.CLAIM_INVALID),
    (jwt.DecodeError, Reason.TOKEN_MALFORMED),
    (jwt.InvalidTokenError, Reason.TOKEN_MALFORMED),
)

_PARSE_ONLY: Final = {"verify_signature": False}
# Signature only: every claim is checked below, against the injected clock.
_SIGNATURE_ONLY: Final = {
    "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
    "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False,
    "require": [],
}  # fmt: skip


def reason_for(exc: jwt.InvalidTokenError) -> Reason:
    """The ``Reason`` for a PyJWT token error (first matching row of ``PYJWT_REASONS``)."""
    for exc_type, reason in PYJWT_REASONS:
        if isinstance(exc, exc_type):
            return reason
    return Reason.TOKEN_MALFORMED  # unreachable: the last row matches every InvalidTokenError


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check: its claims, and which issuer and key vouched for it."""

    claims: Mapping[str, Any]
    issuer: IssuerConfig
    kid: str | None
    payload_segment: str  # the signed base64url payload, as the token carried it


class Verifier:
    """Verifies bearer tokens against route policies using a shared key cache."""

    def __init__(self, keys: KeyLookup, clock: Clock) -> None:
        self._keys = keys
        self._clock = clock
        self._jwt = jwt.PyJWT()

    async def verify(
        self, token: str, policy: AuthPolicy, trace: list[str] | None = None
    ) -> VerifiedToken:
        """Verify ``token`` for ``policy``; raise ``Rejection`` with the first failed check.

        ``trace``, when given, receives one line per check passed (``gateway explain``).
        """
        try:
            unverified = self._jwt.decode_complete(token, options=_PARSE_ONLY)  # type: ignore[arg-type]
        except jwt.InvalidTokenError as exc:
            raise Rejection(reason_for(exc), type(exc).__name__) from None
        header: dict[str, Any] = unverified["header"]
        payload: dict[str, Any] = unverified["payload"]
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
        if not _typ_accepted(header.get("typ"), issuer.typ):
            raise Rejection(Reason.TOKEN_TYPE_INVALID, "typ not accepted")
        kid = header.get("kid")
        key: PyJWK = await self._keys.get_key(issuer, kid, alg)
        if trace is not None:
            trace.append(f"typ {header.get('typ')!r} is accepted")
            trace.append(f"key {kid!r} found in the issuer's key set")

        try:
            verified = self._jwt.decode_complete(
                token,
                key=key,
                algorithms=[alg],
                options=_SIGNATURE_ONLY,  # type: ignore[arg-type]
            )
        except jwt.InvalidTokenError as exc:
            raise Rejection(reason_for(exc), type(exc).__name__) from None
        claims: dict[str, Any] = verified["payload"]
        if trace is not None:
            trace.append("signature verifies")
        self._check_claims(claims, issuer, policy, trace)
        return VerifiedToken(
            claims=claims, issuer=issuer, kid=kid, payload_segment=token.split(".", 2)[1]
        )

    def _check_claims(
        self,
        claims: dict[str, Any],
        issuer: IssuerConfig,
        policy: AuthPolicy,
        trace: list[str] | None,
    ) -> None:
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
        scope = " ".join(sorted(policy.required_scopes)) or None
        if policy.required_scopes:
            granted = _granted_scopes(claims)
            enough = (
                not policy.required_scopes.isdisjoint(granted)
                if policy.scopes_any_of
                else policy.required_scopes <= granted
            )
            if not enough:
                raise Rejection(
                    Reason.INSUFFICIENT_SCOPE, "required scope not granted", scope=scope
                )
            if trace is not None:
                trace.append(f"scopes grant {'any' if policy.scopes_any_of else 'all'} of: {scope}")
        for matcher in policy.claim_matchers:
            if not claim_matches(matcher, claims):
                raise Rejection(
                    Reason.INSUFFICIENT_SCOPE,
                    f"claim check failed: {matcher.describe()}",
                    scope=scope,
                )
            if trace is not None:
                trace.append(f"claim check holds: {matcher.describe()}")


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


def _numeric_date(claims: dict[str, Any], name: str, *, required: bool) -> float | None:
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


def _granted_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (RFC 8693/9068: space-delimited) or ``scp`` (a list or a string)."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(v for v in value if isinstance(v, str))
    return frozenset(granted)
