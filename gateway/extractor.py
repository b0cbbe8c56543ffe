"""Taking the token out of a request: from the route's configured header, cookie or query parameter.

The default source is ``Authorization: Bearer`` (RFC 6750 §2.1); a query
parameter is read only when a route names one (RFC 6750 §2.3 discourages it).
A request that carries more than one token, or one source twice, is refused
(``invalid_request``): which one would be "the" token is exactly the ambiguity
an attacker wants.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final
from urllib.parse import unquote_plus

from multidict import CIMultiDictProxy, istr

from .config import TokenLocation, TokenSource
from .errors import Rejection
from .reasons import Reason

# RFC 6750 §2.1 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"


def is_b64token(credentials: str) -> bool:
    """Whether ``credentials`` is one whole b64token, nothing more.

    Two C scans instead of a regex (whose per-character loop cost ~15k instructions on an
    800-byte RS256 token, over a quarter of what a cache hit adds to passthrough): the ``=``
    padding comes off the end, and deleting every b64token character from what is left must
    leave nothing.
    """
    body = credentials.rstrip("=")
    return (
        bool(body) and body.isascii() and not body.encode("ascii").translate(None, _B64TOKEN_CHARS)
    )


class FoundToken:
    """A token and the source it came from (for logs and tests; the proxy hides every source).
    (A plain class: one is made per request, see ``ResponseHead`` in gateway/upstream.py.)"""

    __slots__ = ("source", "token")

    def __init__(self, token: str, source: TokenSource) -> None:
        self.token: Final = token
        self.source: Final = source

    def __repr__(self) -> str:
        return f"FoundToken(source={self.source!r}, token=<{len(self.token)} chars>)"


# How a cookie pair and a query pair are named.  The proxy removes a token's carrier by the
# same functions, so what is read as a token and what is hidden from the upstream never differ.
def cookie_name(pair: str) -> str:
    """The name of one ``name=value`` pair of a ``Cookie`` header (RFC 6265 §5.4)."""
    return pair.partition("=")[0].strip()


def query_name(pair: str) -> str:
    """The decoded name of one ``name=value`` pair of a raw query string."""
    return unquote_plus(pair.partition("=")[0])


def cookie_values(headers: CIMultiDictProxy[str], name: str) -> list[str]:
    """Every value of cookie ``name`` across all ``Cookie`` headers."""
    return [
        pair.partition("=")[2].strip().strip('"')
        for header in headers.getall("Cookie", [])
        for pair in header.split(";")
        if "=" in pair and cookie_name(pair) == name
    ]


def query_values(query: str, name: str) -> list[str]:
    """Every (decoded) value of parameter ``name`` in a raw query string."""
    return [
        unquote_plus(pair.partition("=")[2])
        for pair in query.split("&")
        if "=" in pair and query_name(pair) == name
    ]


def _from_header(
    headers: CIMultiDictProxy[str], name: str, prefix: str, scheme: str, spelled: str
) -> list[str]:
    """The token of header ``name`` (after ``prefix``, whose ``scheme`` is its lower-case,
    stripped form, and ``spelled`` its stripped form as configured), in a list: empty when
    absent or another scheme."""
    values = headers.getall(name, ())
    if len(values) > 1:
        raise Rejection(Reason.INVALID_REQUEST, f"more than one {name} header")
    if not values:
        return []
    value = values[0].strip()
    if not prefix:
        return [value]
    head, _, rest = value.partition(" ")
    # Clients send the scheme as configured ("Bearer"): compared as is, no lower() is made.
    if head != spelled and head.lower() != scheme:
        # Another scheme (Basic, say) carries no token for us: RFC 6750 §3.1 says
        # such a request lacks authentication, it is not malformed.
        return []
    return [rest.strip(" ")]


_HEADER: Final = TokenLocation.HEADER
_COOKIE: Final = TokenLocation.COOKIE


class Carriers:
    """Where one route looks for its token, read once from its sources (a route's gate keeps
    one): the header name and scheme of the common single-header case need no attribute look-up
    on the config, nor a ``lower()``, per request."""

    __slots__ = ("_name", "_plan", "_prefix", "_scheme", "_single", "_sources", "_spelled")

    def __init__(self, sources: tuple[TokenSource, ...]) -> None:
        self._sources = sources
        # The common case: one header source (Authorization: Bearer by default).
        self._single = len(sources) == 1 and sources[0].location is _HEADER
        first = sources[0] if sources else None
        # An istr: the case-insensitive lookup need not fold the name per request.
        self._name = istr(first.name if first is not None else "")
        self._prefix = first.prefix if first is not None else ""
        self._spelled = self._prefix.strip()
        self._scheme = self._spelled.lower()
        # Every source with its name as an istr and its prefix's stripped and lower-case forms
        # (several sources).
        self._plan = tuple(
            (source, istr(source.name), source.prefix.strip(), source.prefix.strip().lower())
            for source in sources
        )

    def extract(
        self,
        headers: CIMultiDictProxy[str],
        query: str,
        max_token_bytes: int,
        known: Container[str] = (),
    ) -> FoundToken | None:
        """``extract_token`` for these sources."""
        if self._single:
            values = _from_header(headers, self._name, self._prefix, self._scheme, self._spelled)
            if not values:
                return None
            return _checked(FoundToken(values[0], self._sources[0]), max_token_bytes, known)
        found: list[FoundToken] = []
        for source, name, spelled, scheme in self._plan:
            if source.location is _HEADER:
                values = _from_header(headers, name, source.prefix, scheme, spelled)
            elif source.location is _COOKIE:
                values = cookie_values(headers, source.name)
            else:
                values = query_values(query, source.name)
            if len(values) > 1:
                raise Rejection(Reason.INVALID_REQUEST, f"{source.location} {source.name} repeated")
            found.extend(FoundToken(value, source) for value in values)
        if not found:
            return None
        if len(found) > 1:
            raise Rejection(Reason.INVALID_REQUEST, "more than one token in the request")
        return _checked(found[0], max_token_bytes, known)


def extract_token(
    headers: CIMultiDictProxy[str],
    query: str,
    sources: tuple[TokenSource, ...],
    max_token_bytes: int,
    known: Container[str] = (),
) -> FoundToken | None:
    """The one token in the request, or ``None`` if it carries none.

    Raises ``INVALID_REQUEST`` (400) for a repeated source, more than one token,
    or a credential that is empty, oversized or not a single b64token.  A token in ``known``
    (the verifier's cache: tokens that verified, each a JWS whose base64url segments and dots
    are b64token characters) skips the grammar scan; its length is still checked.
    """
    return Carriers(sources).extract(headers, query, max_token_bytes, known)


def _checked(found: FoundToken, max_token_bytes: int, known: Container[str]) -> FoundToken:
    token = found.token
    if len(token) > max_token_bytes:
        raise Rejection(Reason.INVALID_REQUEST, f"token longer than {max_token_bytes} bytes")
    # A dict probe instead of an 8k-instruction scan on a warm hit.
    if token not in known and not is_b64token(token):
        raise Rejection(Reason.INVALID_REQUEST, "credentials are not a single b64token")
    return found
