"""Sender-constrained tokens: is the request's sender the one its token is bound to?

Two bindings, both named by the token's ``cnf`` claim:

- DPoP (RFC 9449): ``cnf.jkt``, the thumbprint of a key the client proves per request with a
  ``DPoP`` proof (dpop.py checks the proof).
- Certificate-bound (RFC 8705): ``cnf["x5t#S256"]``, the SHA-256 of the client certificate of
  the TLS connection: this listener's own (with ``listen.tls.client_ca_file``) or, behind a
  TLS-terminating proxy, the one a trusted proxy's ``client_cert_header`` names.

A token that carries a binding is accepted only with it, on every route: a DPoP-bound token sent
as Bearer, or a certificate-bound one over a connection with another certificate or none, is
what a thief would send.  A route's ``auth.dpop`` / ``auth.certificate_bound`` say whether tokens
without the binding are accepted too (``allowed``) or not (``required``).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote

from multidict import CIMultiDictProxy

from .clock import Clock
from .config import (
    BindingMode,
    CertHeaderFormat,
    DpopSettings,
    GatewayConfig,
    RouteConfig,
    TokenLocation,
    TokenSource,
)
from .dpop import Nonces, ReplayCache, b64url, check_proof
from .errors import Rejection
from .reasons import DpopChallenge, Reason
from .routing import valid_host

DPOP_HEADER: Final = TokenSource(TokenLocation.HEADER, "Authorization", "DPoP ")
PROOF_HEADER: Final = "DPoP"


def certificate_thumbprint(der: bytes) -> str:
    """``x5t#S256``: the base64url SHA-256 of a certificate's DER (RFC 8705 §3.1)."""
    return b64url(hashlib.sha256(der).digest())


def thumbprint_from_header(value: str, fmt: CertHeaderFormat) -> str | None:
    """The ``x5t#S256`` of the certificate a proxy's header names, or ``None`` if it names none
    we can read.  XFCC with more than one element is refused: only a proxy that sets the header
    afresh (Envoy's ``SANITIZE_SET``) says which certificate the client itself showed."""
    if fmt is CertHeaderFormat.PEM:
        try:
            return certificate_thumbprint(ssl.PEM_cert_to_DER_cert(unquote(value)))
        except (ValueError, ssl.SSLError):
            return None
    if len(_split_outside_quotes(value, ",")) > 1:
        return None
    fields: dict[str, str] = {}
    for part in _split_outside_quotes(value, ";"):
        name, sep, text = part.partition("=")
        if sep:
            fields[name.strip().lower()] = text.strip().strip('"')
    digest = fields.get("hash")
    if digest is not None:
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            return None
        return b64url(raw) if len(raw) == 32 else None
    cert = fields.get("cert")
    if cert is not None:
        return thumbprint_from_header(cert, CertHeaderFormat.PEM)
    return None


def _split_outside_quotes(value: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


class SenderCheck:
    """Checks a verified token's binding against the request that presented it.

    Holds the DPoP replay cache, which outlives reloads (a reload must not make a used proof
    usable again); ``reconfigure`` takes a new config's settings."""

    __slots__ = (
        "_cert_header", "_challenges", "_clock", "_dpop", "_nonces", "_origin", "_trusts", "replay",
    )  # fmt: skip

    def __init__(self, config: GatewayConfig, clock: Clock) -> None:
        self._clock = clock
        self.replay = ReplayCache(config.dpop.replay_cache_size, clock)
        self._nonces: Nonces | None = None
        self.reconfigure(config)

    def reconfigure(self, config: GatewayConfig) -> None:
        """Take a (new or reloaded) config's settings; the replay cache and nonces stay."""
        self._dpop: DpopSettings = config.dpop
        self._cert_header = config.client_cert_header
        self._trusts = config.trusts
        self._origin = config.dpop.public_url
        self.replay.max_entries = config.dpop.replay_cache_size
        if not config.dpop.nonce:
            self._nonces = None
        elif self._nonces is None:  # kept across reloads: issued nonces stay good
            self._nonces = Nonces(self._clock, config.dpop.nonce_lifetime_s)
        else:
            self._nonces.lifetime_s = config.dpop.nonce_lifetime_s
        algs = " ".join(sorted(config.dpop.algorithms))
        self._challenges: dict[str, DpopChallenge] = {
            route.id: DpopChallenge(algs, route.auth.dpop is BindingMode.ALLOWED)
            for route in config.routes
            if route.auth is not None and route.auth.dpop is not BindingMode.OFF
        }

    def challenge(self, route: RouteConfig) -> DpopChallenge | None:
        """The DPoP challenge a rejection on ``route`` carries, if the route speaks DPoP (with
        the current nonce when nonces are on)."""
        challenge = self._challenges.get(route.id)
        if challenge is None or self._nonces is None:
            return challenge
        return DpopChallenge(challenge.algs, challenge.bearer_too, self._nonces.current())

    def check(
        self,
        route: RouteConfig,
        source: TokenSource,
        token: str,
        claims: Mapping[str, Any],
        *,
        method: str,
        raw_path: str,
        host: str,
        headers: CIMultiDictProxy[str],
        connection: Any,
    ) -> None:
        """Raise the binding's reason unless ``token`` (verified, with ``claims``) is presented
        by the sender it is bound to, as the route's policy asks."""
        policy = route.auth
        assert policy is not None
        cnf = claims.get("cnf")
        cnf = cnf if isinstance(cnf, dict) else {}
        jkt = cnf.get("jkt")
        if source is DPOP_HEADER:
            proofs = headers.getall(PROOF_HEADER, [])
            if len(proofs) != 1:
                raise Rejection(Reason.DPOP_PROOF_INVALID, f"{len(proofs)} DPoP headers")
            settings = self._dpop
            proof = check_proof(
                proofs[0],
                method=method,
                url=self._request_url(raw_path, host, headers, connection),
                access_token=token,
                algorithms=settings.algorithms,
                now=self._clock.time(),
                max_age_s=settings.proof_max_age_s,
                leeway_s=settings.proof_leeway_s,
                nonces=self._nonces,
            )
            if not isinstance(jkt, str) or jkt != proof.jkt:
                raise Rejection(
                    Reason.DPOP_BINDING_MISMATCH,
                    "token has no cnf.jkt" if jkt is None else "cnf.jkt is not the proof's key",
                )
            window = settings.proof_max_age_s + settings.proof_leeway_s
            if not self.replay.first_use(proof, window):
                raise Rejection(Reason.DPOP_PROOF_REPLAYED, "jti seen before")
        elif jkt is not None:
            raise Rejection(Reason.DPOP_BINDING_MISMATCH, "DPoP-bound token sent as Bearer")
        elif policy.dpop is BindingMode.REQUIRED:
            raise Rejection(Reason.DPOP_REQUIRED, "Bearer where DPoP is required")
        x5t = cnf.get("x5t#S256")
        if x5t is None and policy.certificate_bound is not BindingMode.REQUIRED:
            return
        if x5t is None:
            raise Rejection(Reason.CERT_BINDING_MISMATCH, "token is not certificate-bound")
        shown = self._client_thumbprint(headers, connection)
        if shown is None:
            raise Rejection(Reason.CERT_BINDING_MISMATCH, "no client certificate")
        if shown != x5t:
            raise Rejection(Reason.CERT_BINDING_MISMATCH, "another client certificate")

    def _request_url(
        self, raw_path: str, host: str, headers: CIMultiDictProxy[str], connection: Any
    ) -> str:
        """The URL the client addressed, as ``htu`` must name it (without the query)."""
        if self._origin is not None:
            return self._origin + raw_path
        scheme = getattr(connection, "scheme", "http")
        if self._trusts(getattr(connection, "remote", None)):
            proto = headers.get("X-Forwarded-Proto", "").strip().lower()
            if proto in ("http", "https"):
                scheme = proto
            forwarded = headers.get("X-Forwarded-Host")
            if forwarded is not None and valid_host(forwarded):
                host = forwarded
        return f"{scheme}://{host}{raw_path}"

    def _client_thumbprint(self, headers: CIMultiDictProxy[str], connection: Any) -> str | None:
        header = self._cert_header
        if header is not None:
            if not self._trusts(getattr(connection, "remote", None)):
                return None
            values = headers.getall(header.name, [])
            return thumbprint_from_header(values[0], header.format) if len(values) == 1 else None
        der = connection.peer_certificate() if connection is not None else None
        return certificate_thumbprint(der) if der else None
