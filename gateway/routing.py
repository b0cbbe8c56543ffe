"""Route matching on the raw request path, and refusal of paths a matcher and an upstream could read differently."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Final

from .config import PathRewrite, RouteConfig
from .errors import Rejection
from .reasons import Reason

# Percent-encoded unreserved characters (RFC 3986 §2.3: ALPHA, DIGIT, "-", ".", "_", "~") are
# the characters themselves (§6.2.2.2): they are decoded before matching, and the decoded form is
# what is forwarded, so matcher and upstream read one path.  `%2E` decodes to "." and the dot-
# segment rule below then sees it.
_UNRESERVED_ESCAPE: Final = re.compile(
    r"%(?:[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dDeE]|5[fF]|7[eE])"
)
_ESCAPED_SLASH: Final = re.compile(r"%2[fF]")

# What we refuse rather than normalise, in the (decoded) path.  Anything an upstream might
# rewrite before routing (dot segments, merged slashes, backslashes, `;` path parameters as in
# Tomcat, a decoded slash) would let a request match one route here and land on another there.
# Spring's StrictHttpFirewall refuses the same set.
_UNSAFE_PATH: Final = re.compile(
    r"""
      (?:^|/)\.{1,2}(?:/|$)                 # dot segments
    | //                                    # empty segments (merge_slashes)
    | [\\;#\x00-\x20\x7f]                   # backslash, path parameters, fragment, controls, space
    | %(?:5[cC]|3[bB]|[01][0-9a-fA-F]|7[fF]|25)
                                            # encoded \ ;, controls, or a double encoding
    | %(?:[cC][01]|[fF][5-9a-fA-F])         # bytes that never occur in UTF-8 (overlong '.' is %C0%AE)
    | %(?![0-9a-fA-F]{2})                   # a bare '%'
    """,
    re.VERBOSE,
)
# Characters none of whose runs ``_UNSAFE_PATH`` matches: every alternative there needs a
# ``.``, a ``%``, ``//`` or one of ``\\;#``, a control, a space or DEL.
_PLAIN_PATH_CHARS: Final = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~!$&'()*+,=:@/?[]{}|^`\"<>"
)
# RFC 3986 §3.2.2 host, kept to what real clients send: a reg-name of unreserved characters (which
# covers IPv4), or a bracketed IPv6 literal; then an optional port of digits.  Sub-delims, '@',
# '/' and escapes are refused: `public.example.com:@admin.example.com` is not a host.
_REG_NAME: Final = re.compile(r"[A-Za-z0-9._~-]+")
_PORT: Final = re.compile(r"(?::[0-9]{1,5})?")


# Clients send the same few Host values again and again: each is judged once (bounded).
@functools.lru_cache(maxsize=1024)
def valid_host(host: str) -> bool:
    """Whether ``host`` is an RFC 3986 ``host[:port]`` (reg-name, IPv4 or ``[IPv6]``)."""
    if host.startswith("["):
        end = host.find("]")
        literal = host[1:end]
        if end < 0 or "%" in literal:  # no zone ids: they name an interface of the client
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        rest = host[end + 1 :]
    else:
        name, sep, port = host.partition(":")
        if not _REG_NAME.fullmatch(name):
            return False
        rest = sep + port
    return _PORT.fullmatch(rest) is not None


@functools.lru_cache(maxsize=1024)
def request_host(host: str) -> str:
    """The request's host name, lower-case and without a port (``[::1]:8080`` → ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    # "api.example.com." is the same host to DNS and to most upstreams.
    return host.partition(":")[0].rstrip(".")


def check_raw_path(raw_path: str, *, escaped_slashes: bool = False) -> str:
    """The path part of ``raw_path`` (no query) with unreserved escapes decoded, or raise
    ``REQUEST_REJECTED`` if it is ambiguous.  An encoded slash is refused unless
    ``escaped_slashes`` (the route decides later, in ``RouteTable.match``)."""
    path, _, _ = raw_path.partition("?")
    if not path.startswith("/"):
        raise Rejection(Reason.REQUEST_REJECTED, "path is not origin-form")
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m[0][1:], 16)), path)
        if not escaped_slashes and _ESCAPED_SLASH.search(path):
            raise Rejection(Reason.REQUEST_REJECTED, "encoded slash")
    if not is_plain_path(path) and _UNSAFE_PATH.search(path):
        raise Rejection(Reason.REQUEST_REJECTED, "ambiguous path")
    return path


def is_plain_path(path: str) -> bool:
    """Whether ``path`` holds nothing ``_UNSAFE_PATH`` could match, by two C scans: only
    printable ASCII other than ``.``, ``%``, backslash, ``;``, ``#`` and space, and no ``//``.
    Most paths are plain; the regex (which tries each alternative at every position, ~6k
    instructions on a short path) then need not run.  ``False`` only means "ask the regex"."""
    return (
        path.isascii()
        and "//" not in path
        and not path.encode("ascii").translate(None, _PLAIN_PATH_CHARS)
    )


def _escapes_of(chars: set[str]) -> re.Pattern[str] | None:
    """A pattern for the percent-encoded forms of ``chars`` (either hex case)."""
    if not chars:
        return None
    codes = sorted(f"{ord(c):02X}" for c in chars)
    alternatives = "|".join(f"{c[0]}[{c[1]}{c[1].lower()}]" if c[1].isalpha() else c for c in codes)
    return re.compile(f"%(?:{alternatives})")


class RouteMatcher:
    """One route's match, read once from its config into plain fields: what ``RouteTable``
    tries on every request (compiled, a field read is a load, not an attribute look-up on the
    config's Python dataclass)."""

    __slots__ = (
        "any_path",
        "exact",
        "host_suffixes",
        "hosts",
        "keeps_slashes",
        "methods",
        "prefix",
        "subtree",
    )

    def __init__(self, route: RouteConfig) -> None:
        match = route.match
        self.methods: frozenset[str] = match.methods
        self.hosts: frozenset[str] = match.hosts
        self.host_suffixes: tuple[str, ...] = match.host_suffixes
        self.exact: str | None = match.path
        # A route has a path or a path_prefix (config validation): a prefix when no path.
        prefix = match.path_prefix
        assert match.path is not None or prefix is not None
        self.prefix: str = prefix or ""
        self.subtree: str = self.prefix + "/"
        self.any_path: bool = match.path is None and prefix == "/"
        self.keeps_slashes: bool = route.keep_escaped_slashes

    def fits_host(self, host: str) -> bool:
        """Whether the request's host (lower-case, without port) is one the route serves."""
        if not self.hosts and not self.host_suffixes:
            return True
        return host in self.hosts or any(
            host.endswith(s) and len(host) > len(s) for s in self.host_suffixes
        )

    def fits(self, method: str, path: str, host: str = "") -> bool:
        """Whether a request with this method, raw path and host takes the route.

        ``path`` matches exactly; ``path_prefix`` matches whole segments (``/api`` matches
        ``/api`` and ``/api/x`` but not ``/apix``).  ``methods`` empty means any."""
        if self.methods and method not in self.methods:
            return False
        if not self.fits_host(host):
            return False
        if self.exact is not None:
            return path == self.exact
        return self.any_path or path == self.prefix or path.startswith(self.subtree)


class RouteTable:
    """The ordered routes; the first whose match fits the request wins."""

    __slots__ = ("_keeps_slashes", "_literal_escapes", "_matchers", "_routes", "uses_hosts")

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self._routes = routes
        self._matchers = tuple(RouteMatcher(route) for route in routes)
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
        # Whether any route forwards encoded slashes unchanged; if none does, they are refused
        # before matching, else by the route that matched.
        self._keeps_slashes = any(r.keep_escaped_slashes for r in routes)

    def check(self, raw_path: str) -> str:
        """``check_raw_path`` plus this table's own rule on encoded route characters."""
        path = check_raw_path(raw_path, escaped_slashes=self._keeps_slashes)
        if self._literal_escapes is not None and self._literal_escapes.search(path):
            raise Rejection(Reason.REQUEST_REJECTED, "encoded character a route names literally")
        return path

    def find(self, method: str, path: str, host: str = "") -> int:
        """The index (in the table's routes) of the route for a request with this method,
        (already checked) raw path and host, or -1."""
        for index, matcher in enumerate(self._matchers):
            if matcher.fits(method, path, host):
                if (
                    self._keeps_slashes
                    and not matcher.keeps_slashes
                    and _ESCAPED_SLASH.search(path)
                ):
                    raise Rejection(Reason.REQUEST_REJECTED, "encoded slash")
                return index
        return -1

    def match(self, method: str, path: str, host: str = "") -> RouteConfig | None:
        """The route for a request with this method, (already checked) raw path and host, or ``None``."""
        index = self.find(method, path, host)
        return self._routes[index] if index >= 0 else None


def rewritten(rewrite: PathRewrite, path: str) -> str:
    """The forwarded path: the matched prefix replaced (or stripped)."""
    rest = path[len(rewrite.prefix) :] if rewrite.prefix != "/" else path
    result = rewrite.replacement + rest
    return result if result.startswith("/") else "/" + result
