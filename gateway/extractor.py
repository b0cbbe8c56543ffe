"""Taking the bearer token out of a request's headers (RFC 6750 §2.1)."""

from __future__ import annotations

import re
from typing import Final

from multidict import CIMultiDictProxy

from .errors import Rejection
from .reasons import Reason

# RFC 6750 b64token: the whole credential after "Bearer ", nothing more.
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def extract_bearer(headers: CIMultiDictProxy[str], max_token_bytes: int) -> str:
    """Return the bearer token from the one ``Authorization`` header.

    No header, or a scheme other than Bearer: ``TOKEN_MISSING`` (the client sent no
    bearer credentials).  Two headers, an empty or malformed credential, or an
    oversized one: ``AUTH_HEADER_INVALID`` (400, ``invalid_request``).
    """
    values = headers.getall("Authorization", [])
    if not values:
        raise Rejection(Reason.TOKEN_MISSING, "no Authorization header")
    if len(values) > 1:
        raise Rejection(Reason.AUTH_HEADER_INVALID, "more than one Authorization header")
    scheme, _, credentials = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Rejection(Reason.TOKEN_MISSING, "Authorization scheme is not Bearer")
    token = credentials.strip(" ")
    if len(token) > max_token_bytes:
        raise Rejection(Reason.AUTH_HEADER_INVALID, f"token longer than {max_token_bytes} bytes")
    if not _B64TOKEN.fullmatch(token):
        raise Rejection(Reason.AUTH_HEADER_INVALID, "credentials are not a single b64token")
    return token
