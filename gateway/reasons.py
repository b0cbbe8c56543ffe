"""The one vocabulary of request outcomes: every status, header, body, log field and label derives from it.

``Reason`` values are a public contract: they appear in the JSON body, in the
``reason=`` log field, in the ``reason`` label of ``gateway_requests_total`` and
in the alerting rules.  Renaming a value is a breaking change.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


class Outcome(enum.StrEnum):
    """How a request ended, coarse enough to label a histogram with."""

    ALLOWED = "allowed"
    REJECTED = "rejected"
    ERROR = "error"


class Reason(enum.StrEnum):
    """Why a request ended the way it did; ``OK`` is the only non-rejection member."""

    OK = "ok"
    ROUTE_NOT_FOUND = "route_not_found"
    REQUEST_REJECTED = "request_rejected"
    REQUEST_MALFORMED = "request_malformed"
    HEADERS_TOO_LARGE = "headers_too_large"
    VERSION_NOT_SUPPORTED = "version_not_supported"
    TRANSFER_CODING_NOT_SUPPORTED = "transfer_coding_not_supported"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INVALID_REQUEST = "invalid_request"
    CALLER_UNTRUSTED = "caller_untrusted"
    TOKEN_MISSING = "token_missing"
    TOKEN_MALFORMED = "token_malformed"
    TOKEN_TYPE_INVALID = "token_type_invalid"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    ISSUER_NOT_ALLOWED = "issuer_not_allowed"
    KEY_NOT_FOUND = "key_not_found"
    SIGNATURE_INVALID = "signature_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    CLAIM_MISSING = "claim_missing"
    CLAIM_INVALID = "claim_invalid"
    AUDIENCE_NOT_ALLOWED = "audience_not_allowed"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    DPOP_REQUIRED = "dpop_required"
    DPOP_PROOF_INVALID = "dpop_proof_invalid"
    DPOP_PROOF_REPLAYED = "dpop_proof_replayed"
    DPOP_NONCE_REQUIRED = "dpop_nonce_required"
    DPOP_BINDING_MISMATCH = "dpop_binding_mismatch"
    CERT_BINDING_MISMATCH = "cert_binding_mismatch"
    JWKS_UNAVAILABLE = "jwks_unavailable"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CLIENT_TIMEOUT = "client_timeout"
    UPSTREAM_OVERLOADED = "upstream_overloaded"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ABORTED = "upstream_aborted"
    CLIENT_DISCONNECTED = "client_disconnected"
    REQUEST_CANCELLED = "request_cancelled"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class ReasonSpec:
    """How one ``Reason`` is answered.

    ``status`` is ``None`` only where the upstream's status stands (``ok``) or the
    response had already started (``upstream_aborted``, ``client_disconnected``).  ``bearer_error`` is the
    RFC 6750 ``error`` attribute; ``challenge`` says whether a ``WWW-Authenticate``
    header is sent at all (RFC 6750 §3: a request without a token gets a challenge
    without an ``error``).
    """

    status: int | None
    message: str
    outcome: Outcome
    log_level: int
    challenge: bool = False
    bearer_error: str | None = None
    # The RFC 9449 §7.1 ``error`` of the ``DPoP`` challenge a DPoP route adds (none: no error).
    dpop_error: str | None = None


_INFO: Final = logging.INFO
_WARN: Final = logging.WARNING
_ERR: Final = logging.ERROR


def _invalid_token(message: str, log_level: int = _INFO) -> ReasonSpec:
    return ReasonSpec(
        401, message, Outcome.REJECTED, log_level, True, "invalid_token", "invalid_token"
    )


def _invalid_proof(message: str) -> ReasonSpec:
    """A DPoP proof failed: the DPoP challenge says invalid_dpop_proof, a Bearer one (on an
    ``allowed`` route) says nothing about a scheme the client did not use."""
    return ReasonSpec(401, message, Outcome.REJECTED, _WARN, True, None, "invalid_dpop_proof")


REASON_SPECS: Final[Mapping[Reason, ReasonSpec]] = MappingProxyType(
    {
        Reason.OK: ReasonSpec(None, "OK.", Outcome.ALLOWED, _INFO),
        Reason.ROUTE_NOT_FOUND: ReasonSpec(
            404, "No route matches this request.", Outcome.REJECTED, _INFO
        ),
        Reason.REQUEST_REJECTED: ReasonSpec(
            400, "The request path is not accepted.", Outcome.REJECTED, _INFO
        ),
        # The HTTP/1.1 framing rules (RFC 9112): answered by the listener before any route,
        # with its connection closed; nothing after it on that connection is read.
        Reason.REQUEST_MALFORMED: ReasonSpec(
            400, "The request is not valid HTTP/1.1.", Outcome.REJECTED, _INFO
        ),
        Reason.HEADERS_TOO_LARGE: ReasonSpec(
            431, "The request line or headers are too large.", Outcome.REJECTED, _INFO
        ),
        Reason.VERSION_NOT_SUPPORTED: ReasonSpec(
            505, "Only HTTP/1.1 and HTTP/1.0 are served.", Outcome.REJECTED, _INFO
        ),
        Reason.TRANSFER_CODING_NOT_SUPPORTED: ReasonSpec(
            501, "Only the chunked transfer coding is accepted.", Outcome.REJECTED, _INFO
        ),
        # limits.max_connections: shed at accept, before a request is read.
        Reason.TOO_MANY_CONNECTIONS: ReasonSpec(
            503, "The gateway is at its connection limit; try again later.", Outcome.ERROR, _WARN
        ),
        # RFC 6750 §3.1 invalid_request: repeated or malformed credentials → 400.
        Reason.INVALID_REQUEST: ReasonSpec(
            400,
            "The request carries a malformed, oversized or repeated token.",
            Outcome.REJECTED,
            _INFO,
            True,
            "invalid_request",
            "invalid_request",
        ),
        # forward_auth mode: a check from a peer outside trusted_proxies describes a request
        # nobody vouches for; refusing it keeps the decision API from being an oracle.
        Reason.CALLER_UNTRUSTED: ReasonSpec(
            403, "This caller may not ask for decisions.", Outcome.REJECTED, _WARN
        ),
        Reason.TOKEN_MISSING: ReasonSpec(
            401, "A bearer token is required.", Outcome.REJECTED, _INFO, True, None
        ),
        Reason.TOKEN_MALFORMED: _invalid_token("The token is malformed."),
        Reason.TOKEN_TYPE_INVALID: _invalid_token("The token is not of an accepted type."),
        Reason.ALGORITHM_NOT_ALLOWED: _invalid_token(
            "The token's signing algorithm is not allowed.", _WARN
        ),
        Reason.ISSUER_NOT_ALLOWED: _invalid_token("The token's issuer is not accepted here."),
        Reason.KEY_NOT_FOUND: _invalid_token("The token's signing key is not known.", _WARN),
        Reason.SIGNATURE_INVALID: _invalid_token("The token's signature is invalid.", _WARN),
        Reason.TOKEN_EXPIRED: _invalid_token("The token has expired."),
        Reason.TOKEN_NOT_YET_VALID: _invalid_token("The token is not valid yet."),
        Reason.CLAIM_MISSING: _invalid_token("The token lacks a required claim."),
        Reason.CLAIM_INVALID: _invalid_token("The token has an invalid claim."),
        Reason.AUDIENCE_NOT_ALLOWED: _invalid_token("The token is not meant for this service."),
        Reason.INSUFFICIENT_SCOPE: ReasonSpec(
            403,
            "The token does not grant the required scope.",
            Outcome.REJECTED,
            _INFO,
            True,
            "insufficient_scope",
            "insufficient_scope",
        ),
        # Sender-constrained tokens (RFC 9449 DPoP, RFC 8705 certificate-bound).
        Reason.DPOP_REQUIRED: ReasonSpec(
            401,
            "This route requires a DPoP-bound token and proof.",
            Outcome.REJECTED,
            _INFO,
            True,
            None,
            "invalid_token",
        ),
        Reason.DPOP_PROOF_INVALID: _invalid_proof("The DPoP proof is invalid."),
        Reason.DPOP_PROOF_REPLAYED: _invalid_proof("The DPoP proof was already used."),
        # RFC 9449 §9: the proof lacks the server's current nonce; the answer carries one.
        Reason.DPOP_NONCE_REQUIRED: ReasonSpec(
            401,
            "A fresh DPoP nonce is required; retry with the one in DPoP-Nonce.",
            Outcome.REJECTED,
            _INFO,
            True,
            None,
            "use_dpop_nonce",
        ),
        Reason.DPOP_BINDING_MISMATCH: _invalid_token(
            "The token is not bound to the key of the DPoP proof.", _WARN
        ),
        Reason.CERT_BINDING_MISMATCH: _invalid_token(
            "The token is not bound to the client certificate.", _WARN
        ),
        # 503, not 401: the client cannot fix it, and it keeps the 401 rate meaningful.
        Reason.JWKS_UNAVAILABLE: ReasonSpec(
            503, "The signing keys are unavailable; try again later.", Outcome.ERROR, _ERR
        ),
        Reason.PAYLOAD_TOO_LARGE: ReasonSpec(
            413, "The request body is larger than this route accepts.", Outcome.REJECTED, _INFO
        ),
        Reason.CLIENT_TIMEOUT: ReasonSpec(
            408, "The request body stopped arriving.", Outcome.REJECTED, _INFO
        ),
        # Shed before the upstream drowns: the route's in-flight and queue limits are full.
        Reason.UPSTREAM_OVERLOADED: ReasonSpec(
            503, "The upstream service is at capacity; try again later.", Outcome.ERROR, _WARN
        ),
        Reason.UPSTREAM_UNAVAILABLE: ReasonSpec(
            502, "The upstream service is unavailable.", Outcome.ERROR, _ERR
        ),
        Reason.UPSTREAM_TIMEOUT: ReasonSpec(
            504, "The upstream service did not answer in time.", Outcome.ERROR, _ERR
        ),
        Reason.UPSTREAM_ABORTED: ReasonSpec(
            None, "The upstream response broke off.", Outcome.ERROR, _WARN
        ),
        # The client went away mid-response (nginx's 499); not the gateway's fault.
        Reason.CLIENT_DISCONNECTED: ReasonSpec(
            None, "The client closed the connection.", Outcome.ERROR, _INFO
        ),
        # The shutdown drain ended before the request did; its connection is closed.
        Reason.REQUEST_CANCELLED: ReasonSpec(
            None, "The request was cut off by a shutdown.", Outcome.ERROR, _WARN
        ),
        Reason.INTERNAL_ERROR: ReasonSpec(500, "Internal error.", Outcome.ERROR, _ERR),
    }
)
"""The single table from which every response, log line and label is derived."""


@dataclass(frozen=True, slots=True)
class DpopChallenge:
    """How a route that speaks DPoP challenges (RFC 9449 §7.1): the algorithms it accepts for
    proofs, and whether plain Bearer tokens are accepted too (an ``allowed`` route)."""

    algs: str
    bearer_too: bool
    nonce: str | None = None  # with dpop.nonce: the current server nonce (a DPoP-Nonce header)


def challenges(
    reason: Reason, realm: str, scope: str | None = None, dpop: DpopChallenge | None = None
) -> list[str]:
    """The ``WWW-Authenticate`` values for ``reason``: the RFC 6750 Bearer challenge, or on a
    DPoP route the RFC 9449 DPoP challenge (after a Bearer one where Bearer is accepted)."""
    spec = REASON_SPECS[reason]
    if not spec.challenge:
        return []
    if dpop is None:
        bearer = www_authenticate(reason, realm, scope)
        return [bearer] if bearer is not None else []
    out = []
    if dpop.bearer_too:
        bearer = www_authenticate(reason, realm, scope)
        if bearer is not None:
            out.append(bearer)
    parts = [f'DPoP realm="{realm}"', f'algs="{dpop.algs}"']
    if spec.dpop_error is not None:
        parts.append(f'error="{spec.dpop_error}"')
        parts.append(f'error_description="{spec.message}"')
    if scope and reason is Reason.INSUFFICIENT_SCOPE:
        parts.append(f'scope="{scope}"')
    out.append(", ".join(parts))
    return out


def www_authenticate(reason: Reason, realm: str, scope: str | None = None) -> str | None:
    """Render the RFC 6750 ``WWW-Authenticate`` challenge for ``reason``, or ``None``."""
    spec = REASON_SPECS[reason]
    if not spec.challenge:
        return None
    parts = [f'Bearer realm="{realm}"']
    if spec.bearer_error is not None:
        parts.append(f'error="{spec.bearer_error}"')
        parts.append(f'error_description="{spec.message}"')
    if scope and reason is Reason.INSUFFICIENT_SCOPE:
        parts.append(f'scope="{scope}"')
    return ", ".join(parts)
