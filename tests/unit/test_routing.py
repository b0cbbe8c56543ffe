"""Raw-path refusal and route matching (first match wins, prefixes match whole segments)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import PathRewrite, RouteConfig, RouteMatch, Upstream
from gateway.errors import Rejection
from gateway.reasons import Reason
from gateway.routing import (
    _UNSAFE_PATH,
    RouteTable,
    check_raw_path,
    is_plain_path,
    request_host,
    rewritten,
    valid_host,
)

UNRESERVED = frozenset(
    [*range(0x30, 0x3A), *range(0x41, 0x5B), *range(0x61, 0x7B), 0x2D, 0x2E, 0x5F, 0x7E]
)
CONTROLS = frozenset([*range(0x00, 0x20), 0x7F])
# Bytes that must never arrive percent-encoded: an upstream that decodes them would
# see a different path than the one matched (RFC 3986 §2.3, §6.2.2.2); ';' because
# decoded it starts path parameters.
# Bytes that never occur in UTF-8: 0xC0 and 0xC1 (overlong forms such as %C0%AE for '.')
# and 0xF5 to 0xFF.
NEVER_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
MUST_REFUSE_ENCODED = CONTROLS | {0x2F, 0x5C, 0x25, 0x3B} | NEVER_UTF8


def rejected(raw_path: str) -> bool:
    """Whether ``check_raw_path`` refuses ``raw_path`` (always as ``REQUEST_REJECTED``)."""
    reason: Reason | None = None
    try:
        check_raw_path(raw_path)
    except Rejection as rejection:
        reason = rejection.reason
    assert reason in (None, Reason.REQUEST_REJECTED)
    return reason is not None


@pytest.mark.parametrize(
    "raw_path",
    [
        pytest.param("/a/../b", id="dotdot-segment"),
        pytest.param("/a/./b", id="dot-segment"),
        pytest.param("/./", id="dot-slash"),
        pytest.param("/.", id="trailing-dot"),
        pytest.param("/a/..", id="trailing-dotdot"),
        pytest.param("/..", id="root-dotdot"),
        pytest.param("/a/..?x=1", id="dotdot-before-query"),
        pytest.param("/a/%2e%2e/b", id="encoded-dotdot-lower"),
        pytest.param("/a/%2E%2E/b", id="encoded-dotdot-upper"),
        pytest.param("/a/.%2e/b", id="half-encoded-dotdot"),
        pytest.param("/a%2fb", id="encoded-slash-lower"),
        pytest.param("/a%2Fb", id="encoded-slash-upper"),
        pytest.param("/a%5cb", id="encoded-backslash-lower"),
        pytest.param("/a%5Cb", id="encoded-backslash-upper"),
        pytest.param("/a%252e%252e/b", id="double-encoding"),
        pytest.param("/a%25", id="encoded-percent"),
        pytest.param("/a%", id="bare-percent-end"),
        pytest.param("/a%2", id="truncated-escape"),
        pytest.param("/a%zz", id="non-hex-escape"),
        pytest.param("/a%u002e", id="iis-unicode-escape"),
        pytest.param("/a//b", id="empty-segment"),
        pytest.param("//a", id="leading-double-slash"),
        pytest.param("/a\\b", id="backslash"),
        pytest.param("/a;jsessionid=1", id="semicolon"),
        pytest.param("/admin;/x", id="semicolon-segment"),
        pytest.param("/a b", id="space"),
        pytest.param("/a#frag", id="raw-fragment"),
        pytest.param("/a\tb", id="tab"),
        pytest.param("/a\x00b", id="nul"),
        pytest.param("/a\x7f", id="del"),
        pytest.param("/a%00", id="encoded-nul"),
        pytest.param("/a%0d%0a", id="encoded-crlf"),
        pytest.param("a/b", id="relative"),
        pytest.param("*", id="asterisk-form"),
        pytest.param("http://evil/a", id="absolute-form"),
        pytest.param("", id="empty"),
    ],
)
def test_ambiguous_paths_are_refused(raw_path: str) -> None:
    with pytest.raises(Rejection) as caught:
        check_raw_path(raw_path)
    assert caught.value.reason is Reason.REQUEST_REJECTED


@pytest.mark.parametrize(
    ("raw_path", "path"),
    [
        pytest.param("/", "/", id="root"),
        pytest.param("/api/orders/42", "/api/orders/42", id="plain"),
        pytest.param("/api/orders?id=1&x=%2e%2e/..", "/api/orders", id="query-not-checked"),
        pytest.param("/files/a%20b.txt", "/files/a%20b.txt", id="encoded-space"),
        pytest.param("/q/%3Fx%23y", "/q/%3Fx%23y", id="encoded-question-and-hash"),
        pytest.param("/u/%40me%3A1", "/u/%40me%3A1", id="encoded-at-and-colon"),
        pytest.param("/a/%5B0%5D", "/a/%5B0%5D", id="encoded-brackets"),
        pytest.param("/caf%C3%A9", "/caf%C3%A9", id="encoded-utf8"),
        pytest.param("/caf\u00e9", "/caf\u00e9", id="raw-utf8"),
        pytest.param("/a/.well-known/x", "/a/.well-known/x", id="dot-prefixed-name"),
        pytest.param("/a/..b/c.", "/a/..b/c.", id="dots-inside-segments"),
        pytest.param("/a/...", "/a/...", id="three-dots"),
        pytest.param("/a/", "/a/", id="trailing-slash"),
        pytest.param("/a-b_c~d.e", "/a-b_c~d.e", id="raw-unreserved"),
        # RFC 3986 §6.2.2.2: an encoded unreserved character is that character.
        pytest.param("/%41dmin", "/Admin", id="encoded-letter-upper"),
        pytest.param("/%61dmin", "/admin", id="encoded-letter-lower"),
        pytest.param("/public/%7Euser", "/public/~user", id="encoded-tilde"),
        pytest.param("/a%7e", "/a~", id="encoded-tilde-lower"),
        pytest.param("/a%2d%5F", "/a-_", id="encoded-hyphen-underscore"),
        pytest.param("/v%31?x=%41", "/v1", id="encoded-digit-query-untouched"),
        pytest.param("/a%2Ejson", "/a.json", id="encoded-dot-in-a-segment"),
        pytest.param("/a%252e", None, id="double-encoding-stays-refused"),
    ],
)
def test_ordinary_paths_are_accepted_and_query_is_dropped(raw_path: str, path: str | None) -> None:
    if path is None:
        assert rejected(raw_path)
    else:
        assert check_raw_path(raw_path) == path


def test_every_unreserved_escape_decodes_to_its_character() -> None:
    wrong = [
        (octet, case)
        for octet in UNRESERVED
        for case in ("02X", "02x")
        if check_raw_path(f"/x/a%{octet:{case}}b") != f"/x/a{chr(octet)}b"
    ]
    assert wrong == []


def test_an_encoded_slash_is_refused_unless_the_matched_route_keeps_it() -> None:
    keep = dataclasses.replace(make_route("ids", prefix="/ids"), keep_escaped_slashes=True)
    table = RouteTable((keep, make_route("rest", prefix="/")))
    assert table.check("/ids/a%2Fb") == "/ids/a%2Fb"
    route = table.match("GET", "/ids/a%2Fb")
    assert route is not None
    assert route.id == "ids"
    with pytest.raises(Rejection) as caught:
        table.match("GET", "/other/a%2Fb")  # the catch-all does not keep them
    assert caught.value.reason is Reason.REQUEST_REJECTED
    with pytest.raises(Rejection):
        RouteTable((make_route("rest", prefix="/"),)).check("/ids/a%2Fb")


def test_every_percent_escape_is_classified() -> None:
    """Unreserved characters, controls, '/', '\\', ';', '%' and non-UTF-8 bytes are refused
    encoded; other bytes pass.

    All 256 octets, in both hex cases.
    """
    wrong = [
        f"%{octet:{case}}"
        for octet in range(256)
        for case in ("02X", "02x")
        if rejected(f"/x/a%{octet:{case}}b") is not (octet in MUST_REFUSE_ENCODED)
    ]
    assert wrong == []


@pytest.mark.parametrize("raw_path", ["/admin%3B/x", "/admin%3b/x"], ids=["upper", "lower"])
def test_encoded_semicolon_is_refused(raw_path: str) -> None:
    # A raw ';' is refused for path parameters; an upstream that decodes before stripping
    # them would read /admin%3B/x as /admin/x.
    assert rejected(raw_path)


# --- the route table ------------------------------------------------------------------
def make_route(
    route_id: str,
    *,
    prefix: str | None = None,
    path: str | None = None,
    methods: tuple[str, ...] = (),
    hosts: tuple[str, ...] = (),
    host_suffixes: tuple[str, ...] = (),
) -> RouteConfig:
    return RouteConfig(
        id=route_id,
        match=RouteMatch(
            path=path,
            path_prefix=prefix,
            methods=frozenset(methods),
            hosts=frozenset(hosts),
            host_suffixes=host_suffixes,
        ),
        upstream=Upstream("http://up.internal", "http", "up.internal", 80),
        auth=None,
    )


TABLE = RouteTable(
    (
        make_route("login", path="/api/login", methods=("POST",)),
        make_route("api_read", prefix="/api", methods=("GET", "HEAD")),
        make_route("api_write", prefix="/api", methods=("POST", "PUT", "DELETE")),
        make_route("exact", path="/status"),
        make_route("docs", prefix="/docs/v1"),
    )
)


@pytest.mark.parametrize(
    ("method", "path", "route_id"),
    [
        pytest.param("POST", "/api/login", "login", id="exact-path-first"),
        pytest.param("GET", "/api/login", "api_read", id="exact-method-mismatch-falls-through"),
        pytest.param("GET", "/api", "api_read", id="prefix-itself"),
        pytest.param("GET", "/api/", "api_read", id="prefix-slash"),
        pytest.param("GET", "/api/orders/1", "api_read", id="prefix-deep"),
        pytest.param("HEAD", "/api/x", "api_read", id="second-method"),
        pytest.param("POST", "/api/orders", "api_write", id="method-picks-route"),
        pytest.param("GET", "/apix", None, id="prefix-not-substring"),
        pytest.param("GET", "/api-v2/x", None, id="prefix-not-dash"),
        pytest.param("PATCH", "/api/orders", None, id="method-not-listed"),
        pytest.param("get", "/api/orders", None, id="method-case-sensitive"),
        pytest.param("GET", "/status", "exact", id="exact"),
        pytest.param("DELETE", "/status", "exact", id="exact-any-method"),
        pytest.param("GET", "/status/", None, id="exact-not-prefix-slash"),
        pytest.param("GET", "/status/x", None, id="exact-not-prefix"),
        pytest.param("GET", "/statusx", None, id="exact-not-substring"),
        pytest.param("GET", "/docs/v1/a", "docs", id="multi-segment-prefix"),
        pytest.param("GET", "/docs/v10", None, id="multi-segment-prefix-partial"),
        pytest.param("GET", "/docs", None, id="shorter-than-prefix"),
        pytest.param("GET", "/", None, id="root-unmatched"),
    ],
)
def test_route_table_matching(method: str, path: str, route_id: str | None) -> None:
    route = TABLE.match(method, path)
    assert (route.id if route else None) == route_id


def test_first_match_wins() -> None:
    table = RouteTable(
        (
            make_route("narrow", prefix="/api/admin"),
            make_route("wide", prefix="/api"),
            make_route("shadowed", prefix="/api/admin"),
        )
    )
    matched = [table.match("GET", p) for p in ("/api/admin/x", "/api/x")]
    assert [r.id if r else None for r in matched] == ["narrow", "wide"]


def test_earlier_wide_prefix_shadows_later_narrow_one() -> None:
    table = RouteTable(
        (make_route("wide", prefix="/api"), make_route("narrow", prefix="/api/admin"))
    )
    route = table.match("GET", "/api/admin/x")
    assert route is not None
    assert route.id == "wide"


@pytest.mark.parametrize("path", ["/", "/x", "/a/b/c", "/api"], ids=["root", "one", "deep", "api"])
def test_root_prefix_matches_everything(path: str) -> None:
    table = RouteTable((make_route("catch_all", prefix="/"),))
    route = table.match("OPTIONS", path)
    assert route is not None
    assert route.id == "catch_all"


def test_empty_table_matches_nothing() -> None:
    assert RouteTable(()).match("GET", "/") is None


# --- hosts ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "host"),
    [
        pytest.param("api.example.com", "api.example.com", id="plain"),
        pytest.param("API.Example.COM", "api.example.com", id="lower-cased"),
        pytest.param("api.example.com:8443", "api.example.com", id="port-dropped"),
        pytest.param(" api.example.com ", "api.example.com", id="whitespace"),
        pytest.param("[::1]:8080", "[::1]", id="ipv6-with-port"),
        pytest.param("[::1]", "[::1]", id="ipv6"),
        pytest.param("10.0.0.1:80", "10.0.0.1", id="ipv4-with-port"),
        pytest.param("api.example.com.", "api.example.com", id="trailing-dot"),
        pytest.param("API.example.com.:443", "api.example.com", id="trailing-dot-with-port"),
        pytest.param("", "", id="empty"),
    ],
)
def test_request_host(header: str, host: str) -> None:
    assert request_host(header) == host


def test_trailing_dot_host_is_the_same_host() -> None:
    # Otherwise "admin.example.com." escapes the admin route and falls through to a weaker one,
    # while DNS, nginx and most upstreams treat it as the same host.
    table = RouteTable(
        (
            make_route("admin", prefix="/", hosts=("admin.example.com",)),
            make_route("public", prefix="/"),
        )
    )
    route = table.match("GET", "/x", request_host("admin.example.com.:443"))
    assert route is not None
    assert route.id == "admin"


HOST_TABLE = RouteTable(
    (
        make_route("admin", prefix="/", hosts=("admin.example.com",)),
        make_route("tenants", prefix="/", host_suffixes=(".tenants.example.com",)),
        make_route("api_only", prefix="/api", hosts=("api.example.com", "api2.example.com")),
        make_route("fallback", prefix="/public"),
    )
)


@pytest.mark.parametrize(
    ("host", "path", "route_id"),
    [
        pytest.param("admin.example.com", "/x", "admin", id="exact-host"),
        pytest.param("xadmin.example.com", "/x", None, id="exact-host-no-suffix-match"),
        pytest.param("admin.example.com.evil", "/x", None, id="exact-host-no-prefix-match"),
        pytest.param("a.tenants.example.com", "/x", "tenants", id="wildcard"),
        pytest.param("a.b.tenants.example.com", "/x", "tenants", id="wildcard-deeper"),
        pytest.param("tenants.example.com", "/x", None, id="wildcard-needs-a-label"),
        # valid_host lets a leading dot through; the suffix alone is not a label under it
        pytest.param(".tenants.example.com", "/x", None, id="wildcard-needs-a-non-empty-label"),
        pytest.param("eviltenants.example.com", "/x", None, id="wildcard-whole-labels"),
        pytest.param("api2.example.com", "/api/v1", "api_only", id="second-host"),
        pytest.param("api.example.com", "/other", None, id="host-and-path"),
        pytest.param("anything.example", "/public/x", "fallback", id="no-host-restriction"),
        pytest.param("", "/public/x", "fallback", id="empty-host-unrestricted-only"),
        pytest.param("", "/x", None, id="empty-host-restricted"),
    ],
)
def test_host_matching(host: str, path: str, route_id: str | None) -> None:
    route = HOST_TABLE.match("GET", path, host)
    assert (route.id if route else None) == route_id


@pytest.mark.parametrize(
    ("route_path", "raw_path"),
    [
        pytest.param("/v1/things:batchGet", "/v1/things%3AbatchGet", id="colon-upper"),
        pytest.param("/v1/things:batchGet", "/v1/things%3abatchGet", id="colon-lower"),
        pytest.param("/v1/a+b", "/v1/a%2Bb", id="plus"),
        pytest.param("/users/@me", "/users/%40me", id="at"),
    ],
)
def test_a_reserved_character_a_route_names_may_not_arrive_encoded(
    route_path: str, raw_path: str
) -> None:
    """Else this table would not see the route, and a decoding upstream would."""
    table = RouteTable((make_route("named", path=route_path), make_route("broad", prefix="/")))
    with pytest.raises(Rejection) as caught:
        table.check(raw_path)
    assert caught.value.reason is Reason.REQUEST_REJECTED
    plain = RouteTable((make_route("broad", prefix="/"),))
    assert plain.check(raw_path) == raw_path  # no route names it: accepted as before


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("api.example.com", True),
        ("API.Example.com:8443", True),
        ("127.0.0.1", True),
        ("127.0.0.1:80", True),
        ("[::1]", True),
        ("[2001:db8::1]:443", True),
        ("localhost.", True),
        ("public.example.com:@admin.example.com", False),
        ("evil.com/.example.com", False),
        ("a.example.com:80:81", False),
        ("a.example.com:", False),
        ("a.example.com:123456", False),
        ("a.example.com:8x", False),
        ("user@a.example.com", False),
        ("a%2eexample.com", False),
        ("a,b.example.com", False),
        ("", False),
        ("[::1", False),
        ("[fe80::1%eth0]", False),
        ("[not-ipv6]", False),
        ("[::1]x", False),
        ("a b", False),
    ],
)
def test_valid_host_is_rfc3986_host_and_port(host: str, valid: bool) -> None:
    assert valid_host(host) is valid


# --- why a path was refused (the decision line's detail), and what the table derives from routes --
@pytest.mark.parametrize(
    ("raw_path", "detail"),
    [
        pytest.param("api/x", "path is not origin-form", id="not-origin-form"),
        pytest.param("/a%2Fb", "encoded slash", id="encoded-slash"),
        pytest.param("/a/../b", "ambiguous path", id="dot-segment"),
    ],
)
def test_a_refused_path_says_why(raw_path: str, detail: str) -> None:
    with pytest.raises(Rejection) as caught:
        check_raw_path(raw_path)
    assert (caught.value.reason, caught.value.detail) == (Reason.REQUEST_REJECTED, detail)


def test_a_route_table_refusal_says_why() -> None:
    keep = dataclasses.replace(make_route("ids", prefix="/ids"), keep_escaped_slashes=True)
    table = RouteTable((keep, make_route("batch", path="/v1/a:b"), make_route("rest", prefix="/")))
    with pytest.raises(Rejection) as caught:
        table.check("/v1/a%3Ab")
    assert (caught.value.reason, caught.value.detail) == (
        Reason.REQUEST_REJECTED,
        "encoded character a route names literally",
    )
    with pytest.raises(Rejection) as caught:
        table.match("GET", "/other/a%2Fb")
    assert (caught.value.reason, caught.value.detail) == (Reason.REQUEST_REJECTED, "encoded slash")


@pytest.mark.parametrize(
    "raw_path",
    [
        pytest.param("/v1/things%3AbatchGet", id="named-by-an-exact-path"),
        pytest.param("/users/%40me/profile", id="named-by-a-prefix"),
        pytest.param("/files/a%2Bb", id="named-by-a-third-route"),
    ],
)
def test_every_reserved_character_any_route_names_is_refused_encoded(raw_path: str) -> None:
    """Several routes naming several reserved characters: each one is watched, prefixes too."""
    table = RouteTable(
        (
            make_route("batch", path="/v1/things:batchGet"),
            make_route("me", prefix="/users/@me"),
            make_route("plus", prefix="/files/a+b"),
            make_route("broad", prefix="/"),
        )
    )
    with pytest.raises(Rejection) as caught:
        table.check(raw_path)
    assert caught.value.reason is Reason.REQUEST_REJECTED
    assert table.check("/v1/things%3FbatchGet") == "/v1/things%3FbatchGet"  # '?' is named by none


@pytest.mark.parametrize(
    ("routes", "uses_hosts"),
    [
        pytest.param((make_route("a", prefix="/"),), False, id="no-route-names-a-host"),
        pytest.param(
            (make_route("a", prefix="/api"), make_route("h", prefix="/", hosts=("a.example",))),
            True,
            id="a-route-names-hosts",
        ),
        pytest.param(
            (make_route("s", prefix="/", host_suffixes=(".example.com",)),),
            True,
            id="a-route-names-host-suffixes",
        ),
    ],
)
def test_the_table_asks_for_the_host_when_a_route_names_one(
    routes: tuple[RouteConfig, ...], uses_hosts: bool
) -> None:
    """The gate hands the request's host to ``match`` only when ``uses_hosts``: were it False
    with a host route, that route would never match."""
    assert RouteTable(routes).uses_hosts is uses_hosts


@pytest.mark.parametrize(
    ("prefix", "replacement", "path", "forwarded"),
    [
        pytest.param("/svc", "", "/svc/orders/1", "/orders/1", id="strip"),
        pytest.param("/svc", "", "/svc", "/", id="strip-the-prefix-itself"),
        pytest.param("/svc", "", "/svc/", "/", id="strip-to-a-slash"),
        pytest.param("/old", "/v2", "/old/x", "/v2/x", id="replace"),
        pytest.param("/old", "/v2", "/old", "/v2", id="replace-the-prefix-itself"),
        pytest.param("/a/b", "/c/d", "/a/b/c", "/c/d/c", id="replace-multi-segment"),
        pytest.param("/", "/v2", "/x", "/v2/x", id="root-prefix-keeps-the-path"),
        pytest.param("/", "", "/x", "/x", id="root-prefix-stripped-is-the-path"),
    ],
)
def test_a_rewrite_replaces_only_the_matched_prefix(
    prefix: str, replacement: str, path: str, forwarded: str
) -> None:
    assert rewritten(PathRewrite(prefix, replacement), path) == forwarded


# --- the plain-path shortcut -------------------------------------------------------------------
# Every printable ASCII character, the controls the regex names, and a few beyond ASCII.
PATH_CHARS = st.sampled_from([chr(c) for c in range(0x80)] + ["\u00e9", "\u2024", "\uff0e"])


@given(st.text(alphabet=PATH_CHARS, max_size=10).map(lambda tail: "/" + tail))
def test_a_plain_path_is_one_the_ambiguity_regex_finds_nothing_in(path: str) -> None:
    """The shortcut only skips the regex where it would match nothing: it never lets an
    ambiguous path through."""
    if is_plain_path(path):
        assert _UNSAFE_PATH.search(path) is None


@pytest.mark.parametrize(
    ("path", "plain"),
    [("/public/x", True), ("/api/v1/orders/42:cancel", True), ("/a-b_c~d/@e!$&'()*+,=", True),
     ("/", True), ("/a/../b", False), ("/a//b", False), ("/a%2Fb", False), ("/a;b", False),
     ("/a\\b", False), ("/a b", False), ("/a\x7f", False), ("/caf\u00e9", False),
     ("/a.b", False)],
)  # fmt: skip
def test_most_paths_take_the_shortcut_and_the_rest_the_regex(path: str, plain: bool) -> None:
    assert is_plain_path(path) is plain
