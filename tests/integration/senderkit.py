"""A DPoP client (RFC 9449) for the tests: its own key pair, and a proof per request.

The thumbprint is computed here from RFC 7638 directly, not by the gateway's code, so a test
compares two independent readings of the same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import jwt

from tests.fakes import SigningKey, generate_key


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    required = {
        "RSA": ("e", "kty", "n"),
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
    }
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    return b64url(
        hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    )


class DpopClient:
    """A client holding a DPoP key: ``jkt`` for the token's ``cnf``, ``proof`` per request."""

    def __init__(self, alg: str = "ES256") -> None:
        self.key: SigningKey = generate_key(alg, "client")
        self.jwk = {
            k: v for k, v in self.key.public_jwk(with_alg=False).items() if k not in ("kid", "use")
        }
        self.jkt = thumbprint(self.jwk)

    def proof(
        self,
        method: str,
        url: str,
        token: str | None,
        *,
        now: float,
        header: dict[str, Any] | None = None,
        signer: SigningKey | None = None,
        omit: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        """A proof for ``method`` ``url`` carrying ``token``'s hash; overrides for attacks."""
        payload: dict[str, Any] = {
            "jti": uuid.uuid4().hex,
            "htm": method,
            "htu": url,
            "iat": int(now),
        }
        if token is not None:
            payload["ath"] = b64url(hashlib.sha256(token.encode()).digest())
        payload.update(claims)
        for name in omit:
            payload.pop(name, None)
        key = signer or self.key
        head = {"typ": "dpop+jwt", "jwk": self.jwk, **(header or {})}
        alg = head.pop("alg", key.alg)
        return jwt.encode(payload, key.private, algorithm=alg, headers=head)


def dpop(token: str, proof: str) -> dict[str, str]:
    return {"Authorization": f"DPoP {token}", "DPoP": proof}
