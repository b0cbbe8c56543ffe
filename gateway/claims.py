"""Trusted identity headers: which inbound headers are stripped, and how verified claims become headers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from .config import ClaimHeader, RouteConfig
from .errors import Rejection
from .reasons import Reason
from .verifier import VerifiedToken, lookup_claim

# A claim header carries the checked value or nothing.  Refused in a value: C0 controls (tab
# too), DEL and C1 controls (U+0085 among them), U+2028/U+2029 (line breaks to some readers),
# and lone surrogates (every str code point in U+D800-U+DFFF is one: aiohttp's writer drops
# them, so "adm\ud800in" would arrive as "admin"); and leading or trailing whitespace, which
# HTTP parsers trim.
# (The surrogate range is spelt with chr(): mypyc compiles no surrogate in a literal.)
_SURROGATES: Final = chr(0xD800) + "-" + chr(0xDFFF)
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029" + _SURROGATES + "]")
# Inside JSON text the same characters are escaped instead (json.dumps already escapes C0):
# the upstream's JSON parser reads back exactly the checked value.
_JSON_UNSAFE: Final = re.compile("[\x7f-\x9f\u2028\u2029" + _SURROGATES + "]")
# In a comma-joined list an item must read back as itself: no comma, no quote (a list parser
# that honours quoted-strings would join items), not empty (RFC 9110 §5.6.1 recipients drop
# empty elements), no surrounding whitespace.
_CSV_UNSAFE: Final = re.compile('[,"]')


def render_claim(value: Any, fmt: str = "csv") -> str | None:
    """A claim value as a header value; ``None`` leaves the header out.

    Strings as they are; integers and integral floats in plain decimal (as
    Envoy prints them); booleans as ``true``/``false``; lists of scalars
    comma-joined (``fmt="csv"``) or as JSON (``fmt="json"``); objects and
    anything else as compact JSON.  A csv item that would not read back as
    itself (a comma or quote in it, empty, padded) is ``claim_invalid``:
    ``["user,admin","dev"]`` must not read as three roles; ``fmt="json"`` carries it.
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
        items = [str(render_claim(v)) for v in value]
        for item in items:
            if not item or item != item.strip() or _CSV_UNSAFE.search(item):
                raise Rejection(Reason.CLAIM_INVALID, "a csv item would not read back as itself")
        return ",".join(items)
    return _compact_json(value)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _compact_json(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return _JSON_UNSAFE.sub(_escape, text)


def claim_headers(claims: Mapping[str, Any], mapping: tuple[ClaimHeader, ...]) -> dict[str, str]:
    """The headers to inject for a verified token; a value that would not arrive as it was
    checked (controls, line separators, lone surrogates, surrounding whitespace) is refused."""
    out: dict[str, str] = {}
    for entry in mapping:
        text = render_claim(lookup_claim(claims, entry.claim), entry.format)
        if text is None:
            continue
        if _UNSAFE.search(text) or text != text.strip():
            raise Rejection(
                Reason.CLAIM_INVALID, f"claim for {entry.header} would not arrive as checked"
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
