"""DPoP proofs (RFC 9449): is this request signed by the key its access token is bound to?

A proof is a JWS the client makes per request with its own key pair: ``typ: dpop+jwt``, the
public key in the header (``jwk``), and claims naming the request (``htm`` method, ``htu``
URL), the time (``iat``), a unique id (``jti``) and the access token's hash (``ath``).  The
token's ``cnf.jkt`` names the key by its RFC 7638 thumbprint.  ``check_proof`` runs every check
of RFC 9449 §4.3 and returns the thumbprint; the caller compares it with ``cnf.jkt``.  The
``ReplayCache`` remembers each accepted proof (by key and ``jti``) for as long as its ``iat``
would be accepted, so a proof is good for one request only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from jwt import PyJWK
from jwt.exceptions import PyJWTError

from .clock import Clock
from .errors import Rejection
from .keyset import PRIVATE_MEMBERS
from .reasons import Reason
from .verifier import parse_token

PROOF_TYPE: Final = "dpop+jwt"
MAX_JTI_CHARS: Final = 256
# RFC 7638 §3.2: the required members of each key type, in the order the thumbprint hashes.
_THUMBPRINT_MEMBERS: Final = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _canonical(jwk: dict[str, Any]) -> str:
    """The RFC 7638 §3.2 JSON of a public JWK's required members (nothing else)."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise Rejection(Reason.DPOP_PROOF_INVALID, "jwk is not an RSA, EC or OKP public key")
    return json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)


def _digest(canonical: str) -> str:
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url (``cnf.jkt``)."""
    return _digest(_canonical(jwk))


@functools.lru_cache(maxsize=4096)
def _proof_key(canonical: str, alg: str) -> PyJWK:
    """The verification key of a proof's jwk, built from its required members only: a client
    signs every request with the same key, and building one (an EC point, an RSA modulus)
    costs more than checking a signature with it."""
    return PyJWK(json.loads(canonical), algorithm=alg)


def access_token_hash(token: str) -> str:
    """``ath``: the base64url SHA-256 of the access token's ASCII (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


@functools.lru_cache(maxsize=4096)  # pure; a client names the same few URLs again and again
def normalized_htu(url: str) -> str | None:
    """A URL as ``htu`` is compared (RFC 9449 §4.3 step 9, RFC 3986 §6.2.2-6.2.3): scheme and
    host lower-case, the default port dropped, an empty path as ``/``, without query and
    fragment; ``None`` if it is not an http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != (443 if scheme == "https" else 80):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path or '/'}"


NONCE_KEY_ENV: Final = "GATEWAY_DPOP_NONCE_KEY"


class Nonces:
    """Server nonces (RFC 9449 §9) without state: a nonce names a time window and carries an
    HMAC of it; the current and the previous window are accepted.  The key is random per
    process; the ``--workers`` supervisor gives every worker the same one (``NONCE_KEY_ENV``),
    so a nonce from one worker is good at another."""

    __slots__ = ("_clock", "_key", "lifetime_s")

    def __init__(self, clock: Clock, lifetime_s: float) -> None:
        self._clock = clock
        self.lifetime_s = lifetime_s
        shared = os.environ.get(NONCE_KEY_ENV)
        self._key = bytes.fromhex(shared) if shared else os.urandom(32)

    def _window(self) -> int:
        return int(self._clock.time() // self.lifetime_s)

    def _for(self, window: int) -> str:
        mac = hmac.new(self._key, str(window).encode("ascii"), hashlib.sha256).digest()[:18]
        return f"{window}.{b64url(mac)}"

    def current(self) -> str:
        """The nonce a client should put in its next proof."""
        return self._for(self._window())

    def valid(self, nonce: Any) -> bool:
        if not isinstance(nonce, str):
            return False
        window, dot, _ = nonce.partition(".")
        if not dot or not window.isdigit() or len(window) > 20:  # int() of a huge one refuses
            return False
        now = self._window()
        return int(window) in (now, now - 1) and hmac.compare_digest(nonce, self._for(int(window)))


@dataclass(frozen=True, slots=True)
class Proof:
    """A proof that passed every check but the binding and replay: the key it names."""

    jkt: str
    jti: str
    iat: float


def check_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str,
    algorithms: frozenset[str],
    now: float,
    max_age_s: float,
    leeway_s: float,
    nonces: Nonces | None = None,
) -> Proof:
    """Every check of RFC 9449 §4.3 on one proof, except replay and the token's ``cnf.jkt``;
    raises ``DPOP_PROOF_INVALID`` saying (in the detail, for the log) which failed."""
    try:
        parsed = parse_token(proof)
    except Rejection as rejection:
        raise Rejection(Reason.DPOP_PROOF_INVALID, f"proof: {rejection.detail}") from None
    header = parsed.header
    if header.get("typ") != PROOF_TYPE:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "typ is not dpop+jwt")
    alg = header.get("alg")
    # The allow-list is asymmetric only (config refuses none and HS*): the proof's alg never
    # chooses anything the operator did not pin.
    if not isinstance(alg, str) or alg not in algorithms:
        raise Rejection(Reason.DPOP_PROOF_INVALID, f"alg {str(alg)[:16]!r} not allowed")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise Rejection(Reason.DPOP_PROOF_INVALID, "no jwk in the header")
    private = [m for m in PRIVATE_MEMBERS if m in jwk]
    if private:
        raise Rejection(Reason.DPOP_PROOF_INVALID, f"jwk has private members {private}")
    canonical = _canonical(jwk)
    jkt = _digest(canonical)
    try:
        key = _proof_key(canonical, alg)
        valid = key.Algorithm.verify(parsed.signing_input, key.key, parsed.signature)
    except (PyJWTError, ValueError, TypeError, KeyError, AttributeError):
        raise Rejection(Reason.DPOP_PROOF_INVALID, "jwk does not fit alg") from None
    if not valid:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "signature does not verify")
    try:
        claims = parsed.decoded_payload()
    except Rejection:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "payload is not a JSON object") from None
    if claims.get("htm") != method:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "htm is not the request method")
    htu = claims.get("htu")
    if not isinstance(htu, str) or normalized_htu(htu) != normalized_htu(url):
        raise Rejection(Reason.DPOP_PROOF_INVALID, "htu is not the request URL")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise Rejection(Reason.DPOP_PROOF_INVALID, "iat is not a number")
    if iat > now + leeway_s:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "iat is in the future")
    if iat < now - max_age_s - leeway_s:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "iat is too old")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise Rejection(Reason.DPOP_PROOF_INVALID, "jti is missing or too long")
    if claims.get("ath") != access_token_hash(access_token):
        raise Rejection(Reason.DPOP_PROOF_INVALID, "ath is not the access token's hash")
    if nonces is not None and not nonces.valid(claims.get("nonce")):
        raise Rejection(Reason.DPOP_NONCE_REQUIRED, "nonce missing or not current")
    return Proof(jkt, jti, float(iat))


class ReplayCache:
    """The proofs seen within their acceptance window, by (key thumbprint, ``jti``).

    Bounded: at ``max_entries`` the oldest entry goes first, even if its window has not
    closed (counted by the caller as an eviction: a size too small for the proof rate)."""

    __slots__ = ("_clock", "_entries", "_on_evict", "_on_size", "evictions", "max_entries")

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.evictions = 0
        self._on_size: Callable[[int], object] = lambda size: None
        self._on_evict: Callable[[], object] = lambda: None

    def observe(self, on_size: Callable[[int], object], on_evict: Callable[[], object]) -> None:
        """Report the size after each proof, and each early eviction (metrics)."""
        self._on_size = on_size
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._entries)

    def first_use(self, proof: Proof, window_s: float) -> bool:
        """Remember ``proof`` until ``window_s`` after its ``iat``; ``False`` if it was seen."""
        now = self._clock.time()
        entries = self._entries
        while entries:
            oldest, until = next(iter(entries.items()))
            if until >= now:  # at `until` itself the proof's iat is still accepted
                break
            del entries[oldest]
        key = (proof.jkt, proof.jti)
        if key in entries:
            return False
        while len(entries) >= self.max_entries > 0:
            entries.popitem(last=False)
            self.evictions += 1
            self._on_evict()
        # Kept in arrival order: expiry is iat-based, so the front is the oldest to arrive,
        # which for proofs within one window is about the earliest to expire.
        entries[key] = proof.iat + window_s
        self._on_size(len(entries))
        return True
