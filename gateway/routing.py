"""Route matching on the raw request path, and refusal of paths a matcher and an upstream could read differently."""

from __future__ import annotations

import re
from typing import Final

from .config import RouteConfig
from .errors import Rejection
from .reasons import Reason

# What we refuse rather than normalise.  The path that is matched is the path
# that is forwarded, byte for byte; anything an upstream might rewrite before
# routing (dot segments, decoded slashes or unreserved characters, merged
# slashes, backslashes, `;` path parameters as in Tomcat) would let a request
# match one route here and land on another there.  Spring's StrictHttpFirewall
# refuses the same set.
_UNSAFE_PATH: Final = re.compile(
    r"""
      (?:^|/)\.{1,2}(?:/|$)                 # dot segments
    | //                                    # empty segments (merge_slashes)
    | [\\;#\x00-\x20\x7f]                   # backslash, path parameters, fragment, controls, space
    | %(?:2[eEfF]|5[cC]|3[bB]|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dD]|5[fF]|7[eE]|[01][0-9a-fA-F]|7[fF]|25)
                                            # encoded . / \ ; unreserved, controls, or a double encoding
    | %(?:[cC][01]|[fF][5-9a-fA-F])         # bytes that never occur in UTF-8 (overlong '.' is %C0%AE)
    | %(?![0-9a-fA-F]{2})                   # a bare '%'
    """,
    re.VERBOSE,
)


def request_host(host: str) -> str:
    """The request's host name, lower-case and without a port (``[::1]:8080`` → ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    # "api.example.com." is the same host to DNS and to most upstreams.
    return host.partition(":")[0].rstrip(".")


def check_raw_path(raw_path: str) -> str:
    """Return the path part of ``raw_path`` (no query), or raise ``REQUEST_REJECTED`` if it is ambiguous."""
    path, _, _ = raw_path.partition("?")
    if not path.startswith("/"):
        raise Rejection(Reason.REQUEST_REJECTED, "path is not origin-form")
    if _UNSAFE_PATH.search(path):
        raise Rejection(Reason.REQUEST_REJECTED, "ambiguous path")
    return path


def _escapes_of(chars: set[str]) -> re.Pattern[str] | None:
    """A pattern for the percent-encoded forms of ``chars`` (either hex case)."""
    if not chars:
        return None
    codes = sorted(f"{ord(c):02X}" for c in chars)
    alternatives = "|".join(f"{c[0]}[{c[1]}{c[1].lower()}]" if c[1].isalpha() else c for c in codes)
    return re.compile(f"%(?:{alternatives})")


class RouteTable:
    """The ordered routes; the first whose match fits the request wins."""

    __slots__ = ("_literal_escapes", "_routes", "uses_hosts")

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self._routes = routes
        # Whether matching needs the request's host at all (most configs name none).
        self.uses_hosts = any(r.match.hosts or r.match.host_suffixes for r in routes)
        # A reserved character that some route names literally (":" in /v1/things:batchGet)
        # must not arrive percent-encoded: this matcher would not see the route, and an
        # upstream that decodes before routing would.
        reserved = {
            c
            for route in routes
            for c in (route.match.path or route.match.path_prefix or "")
            if not (c.isalnum() or c in "-._~/")
        }
        self._literal_escapes = _escapes_of(reserved)

    def check(self, raw_path: str) -> str:
        """``check_raw_path`` plus this table's own rule on encoded route characters."""
        path = check_raw_path(raw_path)
        if self._literal_escapes is not None and self._literal_escapes.search(path):
            raise Rejection(Reason.REQUEST_REJECTED, "encoded character a route names literally")
        return path

    def match(self, method: str, path: str, host: str = "") -> RouteConfig | None:
        """The route for a request with this method, (already checked) raw path and host, or ``None``."""
        for route in self._routes:
            if route.match.matches(method, path, host):
                return route
        return None
