"""Trusted identity headers: which inbound headers are stripped, and how verified claims become headers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from .config import FORWARDED_HEADERS, HOP_BY_HOP_HEADERS, ClaimHeader, RouteConfig, header_key
from .errors import Rejection
from .reasons import Reason
from .verifier import VerifiedToken, lookup_claim

# A header value may carry visible ASCII, spaces and tabs, and UTF-8 text; never
# CR, LF, NUL or other controls (header injection).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def headers_to_strip(owned: frozenset[str], connection_values: Iterable[str]) -> frozenset[str]:
    """Names (as ``header_key`` spells them) to drop from a request: owned claim headers,
    hop-by-hop ones and those named in its ``Connection`` header (RFC 9110 §7.6.1)."""
    named = {header_key(token.strip()) for value in connection_values for token in value.split(",")}
    named.discard("")
    return owned | HOP_BY_HOP_HEADERS | FORWARDED_HEADERS | named


def render_claim(value: Any, fmt: str = "csv") -> str | None:
    """A claim value as a header value; ``None`` leaves the header out.

    Strings as they are; integers and integral floats in plain decimal (as
    Envoy prints them); booleans as ``true``/``false``; lists of scalars
    comma-joined (``fmt="csv"``) or as JSON (``fmt="json"``); objects and
    anything else as compact JSON.
    """
    if value is None:
        return None
    if fmt == "json" and isinstance(value, list | dict):
        return _compact_json(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
    ):
        return ",".join(str(render_claim(v)) for v in value)
    return _compact_json(value)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def claim_headers(claims: Mapping[str, Any], mapping: tuple[ClaimHeader, ...]) -> dict[str, str]:
    """The headers to inject for a verified token; a value with control characters is refused."""
    out: dict[str, str] = {}
    for entry in mapping:
        text = render_claim(lookup_claim(claims, entry.claim), entry.format)
        if text is None:
            continue
        if _CONTROL.search(text):
            raise Rejection(
                Reason.CLAIM_INVALID, f"claim for {entry.header} has control characters"
            )
        out[entry.header] = text
    return out


def identity_headers(verified: VerifiedToken, route: RouteConfig) -> dict[str, str]:
    """Every header a verified token earns on ``route``: its claim headers and, if configured,
    the whole payload (the token's own signed base64url payload segment, byte for byte)."""
    headers = claim_headers(verified.claims, route.claim_headers)
    if route.payload_header is not None:
        headers[route.payload_header] = verified.payload_segment
    return headers
