"""Fetching the identity provider's JSON documents (discovery, JWKS): size limit, timeout, HTTP cache lifetime, revalidation."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from .clock import Clock
from .errors import JwksFetchError

_MAX_VALIDATOR: Final = 256  # longer ETag/Last-Modified values are not echoed back
_MAX_AGE: Final = re.compile(r"^\s*(s-maxage|max-age)\s*=\s*\"?(\d+)\"?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """A parsed JSON body and the lifetime its response declared (``None`` when it said nothing),
    with the validators to revalidate it by.  ``not_modified``: a 304 to a conditional request,
    without a body; the cached copy is still current (RFC 9110 §15.4.5)."""

    body: Any
    max_age_s: float | None
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False


class DocumentFetcher(Protocol):
    """Fetches one JSON document; every failure is a ``JwksFetchError`` with a bounded result label."""

    async def fetch(
        self,
        url: str,
        *,
        timeout_s: float,
        max_bytes: int,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> FetchedDocument: ...


def declared_lifetime(headers: CIMultiDictProxy[str], now: float) -> float | None:
    """The lifetime a response has left (RFC 9111 §4.2.1): ``s-maxage``, then ``max-age``, less
    ``Age``; else ``Expires`` minus ``Date``; ``no-store``/``no-cache`` mean 0.  ``None`` when it
    says nothing."""
    directives = [
        d.strip().lower() for value in headers.getall("Cache-Control", []) for d in value.split(",")
    ]
    ages: dict[str, float] = {}
    for directive in directives:
        if directive in ("no-store", "no-cache"):
            return 0.0
        match = _MAX_AGE.match(directive)
        if match:  # RFC 9111 §4.2.1: a repeated directive counts by its first occurrence
            ages.setdefault(match.group(1).lower(), float(match.group(2)))
    # A cache between us and the IdP says how long it has held the response (RFC 9111 §5.1).
    try:
        age = max(float(headers.get("Age", "0")), 0.0)
    except ValueError:
        age = 0.0
    if "s-maxage" in ages:  # the gateway is a shared cache
        return max(ages["s-maxage"] - age, 0.0)
    if "max-age" in ages:
        return max(ages["max-age"] - age, 0.0)
    expires = headers.get("Expires")
    if expires is None:
        return None
    try:
        expires_at = _http_date(expires)
        date = headers.get("Date")
        origin_now = _http_date(date) if date else now
    except (TypeError, ValueError, IndexError):
        return 0.0  # RFC 9111 §5.3: an invalid Expires means "already expired"
    return max(expires_at - origin_now, 0.0)


def _http_date(text: str) -> float:
    """An HTTP date as a Unix time; every HTTP date is GMT (RFC 9110 §5.6.7), asctime ones too."""
    parsed = parsedate_to_datetime(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class HttpDocumentFetcher:
    """GETs JSON over HTTP(S) without redirects, within a time and size budget; conditionally
    (``If-None-Match``/``If-Modified-Since``) when given the validators of the cached copy."""

    def __init__(self, session: aiohttp.ClientSession, clock: Clock) -> None:
        self._session = session
        self._clock = clock

    async def fetch(
        self,
        url: str,
        *,
        timeout_s: float,
        max_bytes: int,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> FetchedDocument:
        headers = {"Accept": "application/json, application/jwk-set+json"}
        if etag is not None:
            headers["If-None-Match"] = etag
        if last_modified is not None:
            headers["If-Modified-Since"] = last_modified
        conditional = etag is not None or last_modified is not None
        try:
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
                headers=headers,
            ) as response:
                if response.status == 304 and conditional:
                    # The 304's own freshness headers update the cached copy's (RFC 9111 §4.3.4).
                    return FetchedDocument(
                        None,
                        declared_lifetime(response.headers, self._clock.time()),
                        _validator(response.headers.get("ETag")) or etag,
                        _validator(response.headers.get("Last-Modified")) or last_modified,
                        not_modified=True,
                    )
                if response.status != 200:
                    raise JwksFetchError("http_error", f"status {response.status}")
                if (response.content_length or 0) > max_bytes:
                    raise JwksFetchError("invalid", f"body over {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > max_bytes:
                        raise JwksFetchError("invalid", f"body over {max_bytes} bytes")
                lifetime = declared_lifetime(response.headers, self._clock.time())
                validators = (_validator(response.headers.get("ETag")),
                              _validator(response.headers.get("Last-Modified")))  # fmt: skip
        except TimeoutError:
            raise JwksFetchError("timeout", f"no answer within {timeout_s}s") from None
        except aiohttp.ClientResponseError as exc:
            raise JwksFetchError("http_error", f"bad response: {exc.status}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JwksFetchError("unreachable", type(exc).__name__) from None
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            raise JwksFetchError("invalid", "body is not JSON") from None
        return FetchedDocument(parsed, lifetime, validators[0], validators[1])


def _validator(value: str | None) -> str | None:
    """A response validator worth sending back: short, one line, printable ASCII (else none)."""
    if value is None or not 0 < len(value) <= _MAX_VALIDATOR or not value.isascii():
        return None
    return value if value.isprintable() else None
