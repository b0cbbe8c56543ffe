"""Every header-policy set of the gateway, in one place: what is hop-by-hop, what the gateway
owns, what only a trusted proxy may say, and how names compare.

The config reader checks claim-header names against these sets, the forwarder strips by them,
the forward-auth handler tells Envoy what to remove by them, and the relay drops response
hop-by-hop headers by them.  Nothing here reads the config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from multidict import istr

if TYPE_CHECKING:
    from .config import RouteConfig

# The names the request path looks up or sets on every request, as multidict ``istr``s: a
# case-insensitive lookup by an ``istr`` uses its folded form, computed once, not per call.
HOST: Final = istr("Host")
CONTENT_LENGTH: Final = istr("Content-Length")
TRANSFER_ENCODING: Final = istr("Transfer-Encoding")
EXPECT: Final = istr("Expect")
CONNECTION: Final = istr("Connection")
UPGRADE: Final = istr("Upgrade")
X_FORWARDED_FOR: Final = istr("X-Forwarded-For")
X_FORWARDED_PROTO: Final = istr("X-Forwarded-Proto")
X_FORWARDED_HOST: Final = istr("X-Forwarded-Host")
REQUEST_ID_HEADER: Final = istr("X-Request-ID")
TRACEPARENT: Final = istr("traceparent")  # W3C trace context (gateway/tracing.py)
TRACESTATE: Final = istr("tracestate")
REQUEST_ID_BYTES: Final = REQUEST_ID_HEADER.encode()  # as the relay writes it
AUTH_OUTCOME_HEADER: Final = "X-Gateway-Auth-Outcome"  # report-only routes tell the upstream

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded (a route cannot inject
# them either).
HOP_BY_HOP_HEADERS: Final = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# W3C Trace Context: the gateway forwards its own (gateway/tracing.py), never the client's.
TRACE_CONTEXT_HEADERS: Final = frozenset({"traceparent", "tracestate"})
# Headers the gateway never lets a route inject: framing, routing, credentials, trace context.
RESERVED_HEADERS: Final = (
    HOP_BY_HOP_HEADERS
    | TRACE_CONTEXT_HEADERS
    | frozenset({"authorization", "host", "content-length", "content-type", "cookie", "set-cookie"})
)
FORWARDED_HEADERS: Final = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
)
# Every `X-Forwarded-*` name (Rack, Werkzeug's ProxyFix and Spring honour -Port, -Prefix, -Ssl,
# -Scheme, -Server, -Uri...) is removed from untrusted peers by this prefix, with these names
# that frameworks and CDNs read as the client's address or the original URL.
FORWARDED_PREFIX: Final = "x-forwarded-"
CLIENT_ORIGIN_HEADERS: Final = frozenset(
    {"x-original-url", "x-rewrite-url", "x-original-forwarded-for", "true-client-ip",
     "cf-connecting-ip", "x-client-ip"}
)  # fmt: skip
# They change the method an upstream executes after the gateway judged another one: removed
# from every peer, trusted or not.
METHOD_OVERRIDE_HEADERS: Final = frozenset(
    {"x-http-method-override", "x-method-override", "x-http-method"}
)
# Never copied from the client: Host is the upstream's, Expect was already answered here, the
# body's framing is the gateway's (it writes its own Content-Length or chunked coding), and so
# is the request id (the upstream gets the one the gateway logs).
PROXY_OWN_HEADERS: Final = frozenset(
    {"host", "expect", "content-length", "transfer-encoding", REQUEST_ID_HEADER.lower()}
)
# Dropped from an upstream's response before it is relayed (the framing is the gateway's).
RESPONSE_HOP_BY_HOP_HEADERS: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-authenticate"}
)  # fmt: skip
# What the relay drops from a response, as the bytes it compares (lower-cased names): the
# hop-by-hop headers and the upstream's X-Request-ID (the client gets the gateway's).
RESPONSE_DROPPED: Final = frozenset(
    name.encode() for name in (*RESPONSE_HOP_BY_HOP_HEADERS, REQUEST_ID_HEADER.lower())
)


def connection_options(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The names a message's ``Connection`` headers list (lower-cased bytes): hop-by-hop too."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    named.discard(b"")
    return frozenset(named)


def header_key(name: str) -> str:
    """A header name as the gateway compares it: lower-case, with ``_`` and ``.`` read as ``-``
    (CGI and WSGI upstreams read ``X_User_Sub`` as ``X-User-Sub``, PHP and some WSGI servers
    read ``X.User.Sub`` so too; every such spelling is one header)."""
    return name.lower().replace("_", "-").replace(".", "-")


def headers_to_strip(owned: frozenset[str], connection_values: Iterable[str]) -> frozenset[str]:
    """Names (as ``header_key`` spells them) to drop from a request: owned claim headers,
    hop-by-hop ones and those named in its ``Connection`` header (RFC 9110 §7.6.1)."""
    named = {header_key(token.strip()) for value in connection_values for token in value.split(",")}
    named.discard("")
    return owned | HOP_BY_HOP_HEADERS | FORWARDED_HEADERS | named


@dataclass(frozen=True, slots=True)
class Carriers:
    """Where a route's token may sit, to be removed before forwarding (unless forward_token)."""

    headers: frozenset[str]
    cookies: frozenset[str]
    query: frozenset[str]


_KEEP_ALL: Final = Carriers(frozenset(), frozenset(), frozenset())
_AUTHORIZATION_ONLY: Final = Carriers(frozenset({"authorization"}), frozenset(), frozenset())


def token_carriers(route: RouteConfig) -> Carriers:
    """The route's token carriers (``TokenLocation`` values compare equal to their names)."""
    # Authorization never reaches an upstream unless a route forwards its token on
    # purpose: a compromised or logging upstream must not be able to replay it.
    if route.auth is None:
        return _AUTHORIZATION_ONLY
    if route.auth.forward_token:
        return _KEEP_ALL
    sources = route.auth.token_sources
    # A DPoP proof is made for this hop only; the upstream has no use for it.
    proof = {"dpop"} if route.auth.dpop != "off" else set()
    return Carriers(
        frozenset(
            {"authorization"}
            | proof
            | {header_key(s.name) for s in sources if s.location == "header"}
        ),
        frozenset(s.name for s in sources if s.location == "cookie"),
        frozenset(s.name for s in sources if s.location == "query"),
    )
