"""One token's verification against a route's policy, with a bounded cache of verified tokens.

Order matters and is the point (see the README's request flow):

1. parse the compact JWS once: three base64url segments, JSON objects without
   duplicate members, no ``crit`` or ``b64`` extensions.  What is parsed before the
   signature holds is bounded (``_cheap``): a header with more values than a JOSE header
   ever has is refused unparsed, and a payload beyond the bound is decoded only once its
   signature verifies (its ``iss`` read meanwhile by ``_scan_iss``, at C speed);
2. header ``alg`` must be pinned by one of the route's issuers (never chosen by the token);
3. the unverified ``iss`` must name one of the route's issuers, *before* any key
   is fetched, so a forged ``iss`` never reaches the network;
4. ``alg`` must be pinned by that issuer; the header ``typ`` accepted by it;
5. the key comes from that issuer's set only (a key bound to one algorithm);
6. signature, by PyJWT's algorithm implementation for that key;
7. claims: the registered ones of their JSON types (RFC 7519 §4.1: ``iss``, ``sub``, ``jti``
   strings, ``aud`` a string or array of strings, ``exp``/``nbf``/``iat`` numbers; else
   ``claim_invalid``), ``iss``, ``exp`` (required), ``nbf``/``iat`` with leeway, ``aud``,
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

import binascii
import contextlib
import json
import math
import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from jwt import PyJWK
from mypy_extensions import mypyc_attr

from .clock import Clock
from .config import AuthPolicy, ClaimMatcher, IssuerConfig, MatchOp, RouteConfig
from .errors import Rejection
from .jwks import KeyLookup, KeySetLease
from .reasons import Reason
from .token_cache import TokenCache, entry_weight

if TYPE_CHECKING:
    from .tracing import VerifyNotes


# What may be JSON-decoded before a signature is checked.  The decoder's cost grows with the
# number of values (a Python call per object, an allocation per value) and with long digit
# runs (int() is quadratic), not just with bytes: 6 KB of ``[{},{},...]`` cost ~60 normal
# tokens.  ``,``, ``:``, ``[`` and ``{`` bound the number of values from above (inside strings
# they only over-count), so four ``bytes.count`` scans in C decide; integers of more than
# ``MAX_UNVERIFIED_DIGITS`` digits stop the decoder that runs before verification.
MAX_UNVERIFIED_VALUES: Final = 64
MAX_UNVERIFIED_BYTES: Final = 4096
MAX_UNVERIFIED_DIGITS: Final = 64


def _cheap(data: bytes, max_bytes: int = MAX_UNVERIFIED_BYTES) -> bool:
    """Whether a JSON text is small and simple enough to decode before its signature holds."""
    if len(data) > max_bytes:
        return False
    count = data.count(b",") + data.count(b":") + data.count(b"[") + data.count(b"{")
    return count <= MAX_UNVERIFIED_VALUES


class _TooComplex(ValueError):
    """Raised by the decoder that runs before verification at an over-long integer."""


def _short_int(text: str) -> int:
    if len(text) > MAX_UNVERIFIED_DIGITS:
        raise _TooComplex
    return int(text)


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


_BASE64URL: Final = _ALPHABET.encode("ascii")
_TO_BASE64: Final = bytes.maketrans(b"-_", b"+/")


def _segment(text: str, name: str) -> bytes:
    # base64url without padding (RFC 7515 §2): only the alphabet (deleting it from the bytes
    # leaves nothing: one C scan, where a regex cost ~18 instructions a character), a length
    # of 4n+1 can never be valid, and the unused bits must be zero.
    rest = len(text) % 4
    if (
        not text.isascii()
        or rest == 1
        or (rest and text[-1] not in _CANONICAL_LAST[rest])
        or (raw := text.encode("ascii")).translate(None, _BASE64URL)
    ):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not canonical base64url")
    try:
        # base64.urlsafe_b64decode's own steps, without its two interpreted wrappers.
        return binascii.a2b_base64(raw.translate(_TO_BASE64) + b"=" * (-rest % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not base64url") from None


# Built once: json.loads(..., object_pairs_hook=...) would build a decoder on every call.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates)
_UNVERIFIED_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_int=_short_int
)


def _json_object(data: bytes, name: str, decoder: json.JSONDecoder = _DECODER) -> dict[str, Any]:
    try:
        value = decoder.decode(data.decode("utf-8"))  # RFC 7519 §7.2: UTF-8 JSON
    except _TooComplex:
        raise
    except (ValueError, RecursionError):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not a JSON object") from None
    if not isinstance(value, dict):
        raise Rejection(Reason.TOKEN_MALFORMED, f"{name} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A compact JWS split and decoded, not yet verified.

    ``payload`` is ``None`` when the payload is too complex to decode before its signature
    is checked (``_cheap``): ``payload_json`` is then decoded by ``decoded_payload`` after it.
    """

    header: dict[str, Any]
    payload: dict[str, Any] | None
    signing_input: bytes
    signature: bytes
    payload_segment: str
    payload_json: bytes = b""

    def decoded_payload(self) -> dict[str, Any]:
        if self.payload is not None:
            return self.payload
        return _json_object(self.payload_json, "payload")


_NOT_A_STRING: Final = object()
_ISS_KEY: Final = '"iss"'
_COLON: Final = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_MAX_ISS_SCANNED: Final = 4
# The json module's C string scanner (untyped in typeshed): one JSON string from an offset.
_scanstring: Final[Callable[[str, int], tuple[str, int]]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _scan_iss(payload_json: bytes) -> list[Any]:
    """The values of the first few ``"iss"`` members in a JSON text, without decoding it.

    Strings are read by the json module's C string scanner; anything else is ``_NOT_A_STRING``.
    Only the issuer to ask for a key is chosen from this: the payload is decoded in full once
    the signature verifies, and its ``iss`` must then be that issuer's (a member this scan
    misread, nested or duplicated, can only lead to a refusal).
    """
    try:
        text = payload_json.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(Reason.TOKEN_MALFORMED, "payload is not a JSON object") from None
    found: list[Any] = []
    at = text.find(_ISS_KEY)
    while at >= 0 and len(found) < _MAX_ISS_SCANNED:
        colon = _COLON.match(text, at + len(_ISS_KEY))
        if colon is not None:
            start = colon.end()
            if text.startswith('"', start):
                try:
                    found.append(_scanstring(text, start + 1)[0])
                except ValueError:
                    found.append(_NOT_A_STRING)
            else:
                found.append(_NOT_A_STRING)
        at = text.find(_ISS_KEY, at + 1)
    return found


def parse_token(token: str) -> ParsedToken:
    """Split and decode a compact JWS; ``TOKEN_MALFORMED`` for anything but a plain signed JWT."""
    parts = token.split(".")
    if len(parts) != 3:  # a JWE has five; nested or trailing junk has more
        raise Rejection(Reason.TOKEN_MALFORMED, f"{len(parts)} segments")
    head, body, sig = parts
    header_json = _segment(head, "header")
    # A header is always read before its signature: one with more values than a JOSE header
    # has is refused (its bytes are bounded by max_token_bytes; x5c chains can be long).
    try:
        if not _cheap(header_json, max_bytes=len(header_json)):
            raise _TooComplex
        header = _json_object(header_json, "header", _UNVERIFIED_DECODER)
    except _TooComplex:
        raise Rejection(Reason.TOKEN_MALFORMED, "header too complex") from None
    # No JWS extension is understood here, so none may be critical (RFC 7515 §4.1.11),
    # and an unencoded payload (RFC 7797 b64) is refused outright.
    if "crit" in header or "b64" in header:
        raise Rejection(Reason.TOKEN_MALFORMED, "crit or b64 header")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Rejection(Reason.TOKEN_MALFORMED, "kid is not a string")
    payload_json = _segment(body, "payload")
    payload: dict[str, Any] | None = None
    if _cheap(payload_json):
        with contextlib.suppress(_TooComplex):  # else decoded in full once the signature holds
            payload = _json_object(payload_json, "payload", _UNVERIFIED_DECODER)
    return ParsedToken(
        header,
        payload,
        f"{head}.{body}".encode("ascii"),
        _segment(sig, "signature"),
        body,
        payload_json,
    )


class TokenMemo:
    """What a verified token was last found to earn, kept beside it in the cache: the policy
    object whose audience, claim and scope checks it passed (those depend on nothing but the
    claims and the policy, both immutable: a hit on the same route skips them; a reload makes
    new policy objects, so they run again), and the identity headers it earned on a route."""

    __slots__ = ("headers", "policy", "route")

    def __init__(self) -> None:
        self.policy: AuthPolicy | None = None
        self.route: RouteConfig | None = None
        self.headers: Mapping[str, str] = {}


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
    # Its time claims, read (and their types checked) once when it verified: a cache hit
    # compares them with the clock and reads nothing else of the claims for them.
    exp: float = math.inf
    nbf: float | None = None
    iat: float | None = None
    memo: TokenMemo = field(default_factory=TokenMemo, compare=False, repr=False)
    # The lease of the key set ``key`` came from (gateway/jwks.py), if the key cache keeps them.
    lease: KeySetLease | None = field(default=None, compare=False, repr=False)
    # Whether its claims hold ``cnf`` (RFC 7800): a bound token, whose sender is checked.  Read
    # once, so a cache hit need not look in its claims (a cold dict) for it.
    bound: bool = False


# `gateway explain` watches what the verifier says by subclassing it (gateway/explain.py): in the
# compiled build (setup.py) that needs mypyc's leave.
@mypyc_attr(allow_interpreted_subclasses=True)
class Verifier:
    """Verifies bearer tokens against route policies using a shared key cache."""

    def __init__(self, keys: KeyLookup, clock: Clock, cache: TokenCache | None = None) -> None:
        self._keys = keys
        self._clock = clock
        self._cache = cache

    @property
    def known(self) -> Container[str]:
        """Tokens that verified (the cache's, or none): each is a well-formed JWS."""
        return self._cache if self._cache is not None else ()

    async def verify(
        self, token: str, policy: AuthPolicy, notes: VerifyNotes | None = None
    ) -> VerifiedToken:
        """Verify ``token`` for ``policy``; raise ``CheckFailed`` naming the first failed check.
        A traced verification passes ``notes``: told whether the cache answered, and on a miss
        whether the key was cached."""
        hit = self.cached(token, policy)
        if hit is not None:
            if notes is not None:
                notes.cache_hit = True
            return hit
        cache = self._cache
        try:
            parsed = parse_token(token)
        except Rejection as rejection:
            raise _failed(PARSE, rejection) from None
        header, payload = parsed.header, parsed.payload

        alg = header.get("alg")
        if not isinstance(alg, str) or not any(alg in i.algorithms for i in policy.issuers):
            raise CheckFailed(
                ALG, Reason.ALGORITHM_NOT_ALLOWED, f"alg {str(alg)[:16]!r} not pinned"
            )
        try:
            issuer = _unverified_issuer(parsed, policy)
        except Rejection as rejection:
            raise _failed(ISS, rejection) from None
        if alg not in issuer.algorithms:
            raise CheckFailed(
                ISSUER_ALG, Reason.ALGORITHM_NOT_ALLOWED, f"alg {alg} not pinned for {issuer.id}"
            )
        typ = header.get("typ")
        if not _typ_accepted(typ, issuer.typ):
            raise CheckFailed(TYP, Reason.TOKEN_TYPE_INVALID, "typ not accepted")
        kid = header.get("kid")
        if notes is not None:
            # Not cached (and not a static set): the lookup waits for the issuer's key set.
            notes.key_cached = (
                issuer.static_jwks is not None
                or self._keys.current_key(issuer, kid, alg) is not None
            )
        try:
            key: PyJWK = await self._keys.get_key(issuer, kid, alg)
        except Rejection as rejection:
            raise _failed(KEY, rejection) from None
        # Asked with no await since get_key returned: the lease of the set ``key`` is in.
        lease = self._keys.lease(issuer)

        # The key is bound to one algorithm; the header's alg must be that one.
        if key.algorithm_name != alg:
            raise CheckFailed(
                KEY_ALG, Reason.ALGORITHM_NOT_ALLOWED, f"key is for {key.algorithm_name}"
            )
        try:
            valid = key.Algorithm.verify(parsed.signing_input, key.key, parsed.signature)
        except (ValueError, TypeError):
            valid = False
        if not valid:
            raise CheckFailed(SIGNATURE, Reason.SIGNATURE_INVALID, "signature does not verify")
        if payload is None:
            try:
                payload = parsed.decoded_payload()
            except Rejection as rejection:
                raise _failed(PAYLOAD, rejection) from None
        exp, nbf, iat = self._check_claims(payload, issuer, policy)
        verified = VerifiedToken(
            payload,
            issuer,
            kid,
            parsed.payload_segment,
            alg,
            key,
            typ,
            exp,
            nbf,
            iat,
            lease=lease,
            bound="cnf" in payload,
        )
        verified.memo.policy = policy
        if cache is not None:
            cache.put(token, verified, exp, entry_weight(token, parsed.payload_json))
        return verified

    def cached(self, token: str, policy: AuthPolicy) -> VerifiedToken | None:
        """The cache's verification of ``token`` if it may stand for a fresh one on ``policy``
        now (``None``: verify it), or raise ``CheckFailed`` as ``verify`` would.  No await: a
        hit needs none, so the gate asks this before it awaits ``verify``."""
        cache = self._cache
        if cache is None:
            return None
        now = self._clock.time()
        hit = cache.get(token, now)
        if hit is None:
            return None
        memo = hit.memo
        if memo.policy is policy and hit.lease is not None:
            # This very policy judged it before, and policies and issuers are immutable: the
            # issuer it trusts, and the alg and typ it accepts, still pass.
            issuer: IssuerConfig | None = hit.issuer
        else:
            issuer = self._trusted_again(hit, policy)
        if issuer is None or not self._key_current(hit, issuer):
            return None
        # Its claim types and signed iss were checked when it verified (the issuer is still the
        # one it verified with): what can change is the time, and the policy it is judged by.
        self._check_times(hit, now)
        if memo.policy is not policy:
            self._check_policy(hit.claims, policy)
            memo.policy = policy
        return hit

    @staticmethod
    def _trusted_again(hit: VerifiedToken, policy: AuthPolicy) -> IssuerConfig | None:
        """The issuer by which a cached token may stand on this route, now: one it trusts with
        the same settings, whose alg and typ still pass; ``None`` if there is none."""
        issuer = trusted_issuer(policy, hit.issuer.issuer)
        if issuer is None:
            return None
        if issuer is not hit.issuer and (
            # A reload made a new config object: compare settings, then re-check alg and typ.
            issuer != hit.issuer
            or hit.alg not in issuer.algorithms
            or not _typ_accepted(hit.typ, issuer.typ)
        ):
            return None
        return issuer

    def _key_current(self, hit: VerifiedToken, issuer: IssuerConfig) -> bool:
        """Whether a cached token's key is still the one in the issuer's current set (a
        rotated-out key drops it)."""
        lease = hit.lease
        if lease is not None:
            # Its key set is still the issuer's (a new set ends the lease) and usable now: the
            # set's lookup of its kid and alg is still the key it verified with.
            return self._clock.monotonic() < lease.usable_until
        return self._keys.current_key(issuer, hit.kid, hit.alg) is hit.key

    def _check_claims(
        self, claims: Mapping[str, Any], issuer: IssuerConfig, policy: AuthPolicy
    ) -> tuple[float, float | None, float | None]:
        """Check registered claims' types, time claims and the route's policy; return ``exp``,
        ``nbf`` and ``iat``."""
        _check_registered_types(claims)
        if claims.get("iss") != issuer.issuer:
            raise CheckFailed(SIGNED_ISS, Reason.ISSUER_NOT_ALLOWED, "verified iss differs")
        # Each time claim is compared as soon as it is read, in the order of the check table.
        now = self._clock.time()
        leeway = issuer.leeway_s
        exp = _numeric_date(claims, "exp", required=True)
        assert exp is not None
        _check_exp(exp, now, leeway)
        nbf = _numeric_date(claims, "nbf", required=False)
        _check_not_after_now(NBF, nbf, now, leeway)
        iat = _numeric_date(claims, "iat", required=False)
        _check_not_after_now(IAT, iat, now, leeway)
        self._check_policy(claims, policy)
        return exp, nbf, iat

    @staticmethod
    def _check_times(hit: VerifiedToken, now: float) -> None:
        """A cached token's time claims against the clock's time ``now``."""
        leeway = hit.issuer.leeway_s
        _check_exp(hit.exp, now, leeway)
        _check_not_after_now(NBF, hit.nbf, now, leeway)
        _check_not_after_now(IAT, hit.iat, now, leeway)

    @staticmethod
    def _check_policy(claims: Mapping[str, Any], policy: AuthPolicy) -> None:
        """The route's own checks: audience, required claims, scopes, claim matchers."""
        if policy.audiences is not None:
            _check_audience(claims.get("aud"), policy.audiences)
        for name in policy.required_claims:
            if claims.get(name) is None:
                raise CheckFailed(_claim_check(name), Reason.CLAIM_MISSING, f"claim {name} missing")
        if policy.required_scopes:
            granted = _granted_scopes(claims)
            enough = (
                not policy.required_scopes.isdisjoint(granted)
                if policy.scopes_any_of
                else policy.required_scopes <= granted
            )
            if not enough:
                raise CheckFailed(
                    _scopes_check(policy),
                    Reason.INSUFFICIENT_SCOPE,
                    "required scope not granted",
                    scope=_scope(policy),
                )
        for matcher in policy.claim_matchers:
            if not claim_matches(matcher, claims):
                raise CheckFailed(
                    _matcher_check(matcher),
                    Reason.INSUFFICIENT_SCOPE,
                    f"claim check failed: {matcher.describe()}",
                    scope=_scope(policy),
                )


def _check_exp(exp: float, now: float, leeway: float) -> None:
    if exp <= now - leeway:
        raise CheckFailed(EXP, Reason.TOKEN_EXPIRED, "exp passed")


def _check_not_after_now(check: Check, value: float | None, now: float, leeway: float) -> None:
    """``nbf`` or ``iat`` (``check``), if present, not later than now (with leeway)."""
    if value is not None and value > now + leeway:
        raise CheckFailed(check, Reason.TOKEN_NOT_YET_VALID, f"{check.name} in the future")


def trusted_issuer(policy: AuthPolicy, iss: str) -> IssuerConfig | None:
    """The configured issuer whose ``issuer`` URL equals ``iss``, if the route trusts it (a URL
    is configured once).  Here, not on the config's ``AuthPolicy``: compiled, a cache hit's
    look-up runs no interpreted frame."""
    for issuer in policy.issuers:
        if issuer.issuer == iss:
            return issuer
    return None


def _unverified_issuer(parsed: ParsedToken, policy: AuthPolicy) -> IssuerConfig:
    """The route's issuer that the unverified ``iss`` names: chosen before any key is fetched."""
    if parsed.payload is not None:
        candidates = [parsed.payload.get("iss")]
    else:
        candidates = _scan_iss(parsed.payload_json)
    not_a_string = False
    for iss in candidates:
        if isinstance(iss, str):
            issuer = trusted_issuer(policy, iss)
            if issuer is not None:
                return issuer
        elif iss is not None:
            not_a_string = True
    if not_a_string:
        raise Rejection(Reason.CLAIM_INVALID, "iss is not a string")
    raise Rejection(Reason.ISSUER_NOT_ALLOWED, "iss not trusted on this route")


_STRING_CLAIMS: Final = ("iss", "sub", "jti")


def _check_registered_types(claims: Mapping[str, Any]) -> None:
    """RFC 7519 §4.1: ``iss``, ``sub``, ``jti`` are strings and ``aud`` a string or an array of
    strings (``exp``/``nbf``/``iat`` are checked by ``_numeric_date``).  A JSON ``null`` is read
    as the claim's absence, as everywhere else; it is never forwarded."""
    for name in _STRING_CLAIMS:
        value = claims.get(name)
        if value is not None and not isinstance(value, str):
            raise CheckFailed(CLAIM_TYPES, Reason.CLAIM_INVALID, f"claim {name} is not a string")
    aud = claims.get("aud")
    if (
        aud is not None
        and not isinstance(aud, str)
        and not (isinstance(aud, list) and all(isinstance(v, str) for v in aud))
    ):
        raise CheckFailed(
            CLAIM_TYPES, Reason.CLAIM_INVALID, "claim aud is not a string or array of strings"
        )


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
            raise CheckFailed(_TIME_CHECKS[name], Reason.CLAIM_MISSING, f"claim {name} missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckFailed(
            _TIME_CHECKS[name], Reason.CLAIM_INVALID, f"claim {name} is not a NumericDate"
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    # json.loads accepts NaN and Infinity; an infinite exp would never expire.
    if not math.isfinite(number):
        raise CheckFailed(_TIME_CHECKS[name], Reason.CLAIM_INVALID, f"claim {name} is not finite")
    return number


def _check_audience(aud: Any, accepted: frozenset[str]) -> None:
    """``aud`` is a string or a list of strings; one of them must be accepted here."""
    if aud is None or aud == [] or aud == "":
        raise CheckFailed(AUD, Reason.AUDIENCE_NOT_ALLOWED, "aud missing")
    values = [aud] if isinstance(aud, str) else aud  # its type checked before
    if accepted.isdisjoint(values):
        raise CheckFailed(AUD, Reason.AUDIENCE_NOT_ALLOWED, "aud not accepted")


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


# --- the check table ------------------------------------------------------------------------------
# The steps of ``Verifier.verify`` are named, in the order it runs them, by ``Check`` entries
# (``checks(policy)`` lists those a route's policy runs), and every refusal is a ``CheckFailed``
# naming the entry that refused.  ``gateway explain`` reads which checks passed and which failed
# from that alone: nothing in ``verify`` records its progress, so a token that passes costs
# nothing for being explainable.
@dataclass(frozen=True, slots=True)
class Check:
    """One named step of ``Verifier.verify``.

    ``holds`` says what passing it established; it may name the token's ``{alg}``, ``{kid}``,
    ``{typ}``, ``{issuer}`` and ``{leeway}``, filled in by ``says`` from ``token_facts``.
    """

    name: str
    holds: str

    def says(self, facts: Mapping[str, str]) -> str:
        """``holds`` with the token's facts filled in (``?`` for one not known)."""
        return self.holds.format_map(_Facts(facts))


class _Facts(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


class CheckFailed(Rejection):
    """A ``Rejection`` by one of the verifier's checks; ``check`` is the entry that refused."""

    def __init__(
        self, check: Check, reason: Reason, detail: str = "", *, scope: str | None = None
    ) -> None:
        super().__init__(reason, detail, scope=scope)
        self.check = check


def _failed(check: Check, rejection: Rejection) -> CheckFailed:
    """``rejection`` (raised by a function that is one step) as that step's refusal."""
    return CheckFailed(check, rejection.reason, rejection.detail, scope=rejection.scope)


# The checks of every token, in the order ``verify`` runs them; ``checks`` adds the policy's.
PARSE: Final = Check("parse", "token parses as a JWS with a JSON header and payload")
ALG: Final = Check("alg", "alg {alg} is pinned by an issuer of this route")
ISS: Final = Check("iss", "iss names issuer '{issuer}', trusted on this route")
ISSUER_ALG: Final = Check("issuer alg", "alg {alg} is pinned for issuer '{issuer}'")
TYP: Final = Check("typ", "typ {typ} is accepted")
KEY: Final = Check("key", "key {kid} found in the issuer's key set")
KEY_ALG: Final = Check("key alg", "the key is bound to alg {alg}")
SIGNATURE: Final = Check("signature", "signature verifies")
PAYLOAD: Final = Check("payload", "the signed payload is a JSON object")
CLAIM_TYPES: Final = Check("claim types", "iss, sub and jti are strings, aud a string or strings")
SIGNED_ISS: Final = Check("signed iss", "the signed iss still names issuer '{issuer}'")
EXP: Final = Check("exp", "exp is a number and has not passed (leeway {leeway}s)")
NBF: Final = Check("nbf", "nbf, if present, is a number and has come (leeway {leeway}s)")
IAT: Final = Check("iat", "iat, if present, is a number and not in the future (leeway {leeway}s)")
AUD: Final = Check("aud", "aud names an audience of this route")
TOKEN_CHECKS: Final = (
    PARSE, ALG, ISS, ISSUER_ALG, TYP, KEY, KEY_ALG, SIGNATURE, PAYLOAD,
    CLAIM_TYPES, SIGNED_ISS, EXP, NBF, IAT,
)  # fmt: skip
_TIME_CHECKS: Final = {"exp": EXP, "nbf": NBF, "iat": IAT}


def _literal(text: str) -> str:
    """Configured text inside ``Check.holds``: braces kept as they are."""
    return text.replace("{", "{{").replace("}", "}}")


def _claim_check(name: str) -> Check:
    return Check("required claim", _literal(f"{name!r} is present"))


def _scopes_check(policy: AuthPolicy) -> Check:
    which = "any" if policy.scopes_any_of else "all"
    return Check("scopes", _literal(f"the token grants {which} of: {_scope(policy)}"))


def _matcher_check(matcher: ClaimMatcher) -> Check:
    return Check("claim check", _literal(f"{matcher.describe()} holds"))


def checks(policy: AuthPolicy) -> tuple[Check, ...]:
    """The checks ``Verifier.verify`` runs on a token for ``policy``, in the order it runs them."""
    return (
        *TOKEN_CHECKS,
        *((AUD,) if policy.audiences is not None else ()),
        *(_claim_check(name) for name in policy.required_claims),
        *((_scopes_check(policy),) if policy.required_scopes else ()),
        *(_matcher_check(matcher) for matcher in policy.claim_matchers),
    )


def token_facts(token: str, policy: AuthPolicy) -> dict[str, str]:
    """What the passed checks of ``checks(policy)`` name: the token's ``alg``, ``kid`` and ``typ``,
    and the issuer its ``iss`` chooses, with that issuer's leeway (read by the same steps as
    ``verify``; for ``gateway explain``, never on the request path)."""
    facts: dict[str, str] = {}
    try:
        parsed = parse_token(token)
    except Rejection:
        return facts
    facts.update(
        alg=str(parsed.header.get("alg")),
        kid=repr(parsed.header.get("kid")),
        typ=repr(parsed.header.get("typ")),
    )
    try:
        issuer = _unverified_issuer(parsed, policy)
    except Rejection:
        return facts
    facts.update(issuer=issuer.id, leeway=f"{issuer.leeway_s:g}")
    return facts
