"""Identity-header hygiene: what is stripped inbound, and how verified claims become header values."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.claims import claim_headers, identity_headers, render_claim
from gateway.config import (
    ClaimFormat,
    ClaimHeader,
    IssuerConfig,
    RouteConfig,
    RouteMatch,
    Upstream,
)
from gateway.errors import Rejection
from gateway.headers import FORWARDED_HEADERS, HOP_BY_HOP_HEADERS, headers_to_strip
from gateway.reasons import Reason
from gateway.verifier import VerifiedToken, lookup_claim

OWNED = frozenset({"x-user-sub", "x-tenant-id"})


# --- stripping --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("x-user-sub", id="owned"),
        pytest.param("x-tenant-id", id="owned-2"),
        pytest.param("connection", id="connection"),
        pytest.param("keep-alive", id="keep-alive"),
        pytest.param("te", id="te"),
        pytest.param("trailer", id="trailer"),
        pytest.param("transfer-encoding", id="transfer-encoding"),
        pytest.param("upgrade", id="upgrade"),
        pytest.param("proxy-authorization", id="proxy-authorization"),
        pytest.param("proxy-connection", id="proxy-connection"),
        pytest.param("forwarded", id="forwarded"),
        pytest.param("x-forwarded-for", id="x-forwarded-for"),
        pytest.param("x-forwarded-proto", id="x-forwarded-proto"),
        pytest.param("x-forwarded-host", id="x-forwarded-host"),
        pytest.param("x-real-ip", id="x-real-ip"),
    ],
)
def test_always_stripped(name: str) -> None:
    assert name in headers_to_strip(OWNED, ())


def test_strip_set_is_exactly_owned_hop_by_hop_and_forwarded() -> None:
    assert headers_to_strip(OWNED, ()) == OWNED | HOP_BY_HOP_HEADERS | FORWARDED_HEADERS


@pytest.mark.parametrize(
    ("connection", "named"),
    [
        pytest.param(["X-Secret"], {"x-secret"}, id="one"),
        pytest.param(["close, X-A ,x-b"], {"close", "x-a", "x-b"}, id="comma-list"),
        pytest.param(["X-A", "X-B"], {"x-a", "x-b"}, id="two-header-lines"),
        pytest.param(["X-A,,  ,"], {"x-a"}, id="empty-tokens-ignored"),
        # Compared in the spelling CGI/WSGI upstreams read: X_Secret names X-Secret too.
        pytest.param(["X_Secret"], {"x-secret"}, id="underscore-spelling"),
    ],
)
def test_connection_named_headers_are_stripped(connection: list[str], named: set[str]) -> None:
    strip = headers_to_strip(OWNED, connection)
    assert named <= strip
    assert "" not in strip
    assert strip - named == headers_to_strip(OWNED, ()) - named


@pytest.mark.parametrize(
    "name", ["authorization", "content-type", "accept", "x-request-id", "cookie"]
)
def test_end_to_end_headers_are_kept(name: str) -> None:
    assert name not in headers_to_strip(OWNED, ())


# --- claim lookup -------------------------------------------------------------------
CLAIMS: dict[str, Any] = {
    "sub": "alice",
    "org": {"tenant_id": "acme", "meta": {"tier": 3}},
    "roles": ["a", "b"],
    "empty": None,
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("sub",), "alice", id="top-level"),
        pytest.param(("org", "tenant_id"), "acme", id="nested"),
        pytest.param(("org", "meta", "tier"), 3, id="deeply-nested"),
        pytest.param(("org",), {"tenant_id": "acme", "meta": {"tier": 3}}, id="object"),
        pytest.param(("missing",), None, id="absent"),
        pytest.param(("org", "missing"), None, id="absent-nested"),
        pytest.param(("sub", "x"), None, id="through-a-string"),
        pytest.param(("roles", "0"), None, id="through-a-list"),
        pytest.param(("empty", "x"), None, id="through-null"),
    ],
)
def test_lookup_claim(path: tuple[str, ...], value: Any) -> None:
    assert lookup_claim(CLAIMS, path) == value


# --- rendering ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param("alice", "alice", id="str"),
        pytest.param("", "", id="empty-str"),
        pytest.param("caf\u00e9", "caf\u00e9", id="unicode-str"),
        pytest.param(42, "42", id="int"),
        pytest.param(-7, "-7", id="negative-int"),
        pytest.param(10**20, "100000000000000000000", id="big-int"),
        pytest.param(1700000000.0, "1700000000", id="integral-float"),
        pytest.param(-0.0, "0", id="negative-zero"),
        pytest.param(1.5, "1.5", id="float"),
        pytest.param(0.1, "0.1", id="float-shortest-repr"),
        pytest.param(True, "true", id="bool-true"),
        pytest.param(False, "false", id="bool-false"),
        pytest.param(["a", "b"], "a,b", id="list-of-str"),
        pytest.param([1, 2.0, 2.5, "x"], "1,2,2.5,x", id="list-of-scalars"),
        pytest.param([], "", id="empty-list"),
        pytest.param([True, "x"], '[true,"x"]', id="list-with-bool-as-json"),
        pytest.param([["a"], "b"], '[["a"],"b"]', id="nested-list-as-json"),
        pytest.param([None], "[null]", id="list-with-null-as-json"),
        pytest.param({"b": 1, "a": "\u00e9"}, '{"a":"\u00e9","b":1}', id="dict-compact-sorted"),
        pytest.param(None, None, id="none"),
    ],
)
def test_render_claim(value: Any, text: str | None) -> None:
    assert render_claim(value) == text
    assert render_claim(value, "csv") == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param(["a", "b,c"], '["a","b,c"]', id="list-keeps-commas-unambiguous"),
        pytest.param([1, 2], "[1,2]", id="list-of-numbers"),
        pytest.param([], "[]", id="empty-list"),
        pytest.param({"b": [1], "a": None}, '{"a":null,"b":[1]}', id="dict"),
        pytest.param("a,b", "a,b", id="str-unchanged"),
        pytest.param(3.0, "3", id="scalar-unchanged"),
        pytest.param(None, None, id="none"),
    ],
)
def test_render_claim_json_format(value: Any, text: str | None) -> None:
    assert render_claim(value, "json") == text


# --- injection ------------------------------------------------------------------------
MAPPING = (
    ClaimHeader("X-User-Sub", ("sub",)),
    ClaimHeader("X-Tenant-Id", ("org", "tenant_id")),
    ClaimHeader("X-Roles", ("roles",)),
    ClaimHeader("X-Email", ("email",)),
)


def test_claim_headers_renders_present_claims_and_omits_absent_ones() -> None:
    assert claim_headers(CLAIMS, MAPPING) == {
        "X-User-Sub": "alice",
        "X-Tenant-Id": "acme",
        "X-Roles": "a,b",
    }


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"sub": "alice\r\nX-Admin: 1"}, id="crlf"),
        pytest.param({"sub": "alice\nX-Admin: 1"}, id="lf"),
        pytest.param({"sub": "alice\rX"}, id="cr"),
        pytest.param({"sub": "alice\x00"}, id="nul"),
        pytest.param({"sub": "a\x1bb"}, id="escape"),
        pytest.param({"sub": "a\x7fb"}, id="del"),
        pytest.param({"org": {"tenant_id": "acme\r\n"}}, id="nested"),
        pytest.param({"roles": ["a", "b\nc"]}, id="in-list"),
    ],
)
def test_control_characters_are_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(Rejection) as caught:
        claim_headers(claims, MAPPING)
    assert caught.value.reason is Reason.CLAIM_INVALID


def test_control_characters_inside_json_objects_are_escaped_not_refused() -> None:
    # JSON rendering escapes "\n" as the two characters backslash-n: safe to send.
    out = claim_headers({"sub": {"k": "a\nb"}}, (ClaimHeader("X-User-Sub", ("sub",)),))
    assert out == {"X-User-Sub": '{"k":"a\\nb"}'}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a\tb", id="tab-is-c0-too"),
        pytest.param("adm\ud800in", id="lone-high-surrogate"),
        pytest.param("adm\udfffin", id="lone-low-surrogate"),
        pytest.param("\ud83d", id="only-a-surrogate"),
        pytest.param("a\x80b", id="c1-first"),
        pytest.param("a\x85b", id="nel"),
        pytest.param("a\x9fb", id="c1-last"),
        pytest.param("a\u2028b", id="line-separator"),
        pytest.param("a\u2029b", id="paragraph-separator"),
        pytest.param(" alice", id="leading-space"),
        pytest.param("alice ", id="trailing-space"),
        pytest.param("alice\u3000", id="trailing-ideographic-space"),
        pytest.param("\u00a0alice", id="leading-no-break-space"),
        pytest.param(" ", id="only-space"),
    ],
)
def test_values_that_would_not_arrive_as_checked_are_refused(value: str) -> None:
    """aiohttp drops lone surrogates; HTTP parsers trim surrounding whitespace; some readers
    break lines at U+0085/U+2028/U+2029: the header would carry another value than checked."""
    with pytest.raises(Rejection) as caught:
        claim_headers({"sub": value}, MAPPING)
    assert caught.value.reason is Reason.CLAIM_INVALID


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("caf\u00e9", id="latin-1"),
        pytest.param("a\u00a0b", id="inner-no-break-space"),
        pytest.param("a b", id="inner-space"),
        pytest.param("\U0001f600", id="astral-code-point"),
        pytest.param("\u4e2d\u6587", id="cjk"),
        pytest.param("", id="empty"),
    ],
)
def test_values_that_arrive_as_checked_are_kept(value: str) -> None:
    assert claim_headers({"sub": value}, MAPPING) == {"X-User-Sub": value}


@pytest.mark.parametrize(
    "roles",
    [
        pytest.param(["user,admin", "dev"], id="comma-in-an-item"),
        pytest.param(["user", "admin,"], id="trailing-comma-in-an-item"),
        pytest.param(['"user', 'admin"'], id="quotes"),
        pytest.param(["user", ""], id="empty-item"),
        pytest.param(["user", " admin"], id="leading-space-in-an-item"),
        pytest.param(["user ", "admin"], id="trailing-space-in-an-item"),
        pytest.param(["user", "adm\ud800in"], id="lone-surrogate-in-an-item"),
        pytest.param(["user", "a\u2028b"], id="line-separator-in-an-item"),
    ],
)
def test_csv_items_that_would_not_read_back_as_themselves_are_refused(roles: list[str]) -> None:
    """``["user,admin","dev"]`` must not read as three roles."""
    with pytest.raises(Rejection) as caught:
        claim_headers({"roles": roles}, MAPPING)
    assert caught.value.reason is Reason.CLAIM_INVALID


def test_csv_scalar_string_with_a_comma_is_kept_as_is() -> None:
    """A string claim is one value, not a list: only list items are split by readers."""
    assert claim_headers({"sub": "a,b"}, MAPPING) == {"X-User-Sub": "a,b"}


@pytest.mark.parametrize(
    ("roles", "text"),
    [
        pytest.param(["user,admin", "dev"], '["user,admin","dev"]', id="comma"),
        pytest.param(["adm\ud800in"], '["adm\\ud800in"]', id="lone-surrogate-escaped"),
        pytest.param(["a\u2028b"], '["a\\u2028b"]', id="line-separator-escaped"),
        pytest.param(["a\x85b", "c\x7f"], '["a\\u0085b","c\\u007f"]', id="c1-and-del-escaped"),
        pytest.param(["a\tb"], '["a\\tb"]', id="tab-escaped-by-json"),
        pytest.param([" padded "], '[" padded "]', id="padding-inside-the-json-string"),
        pytest.param(["caf\u00e9"], '["caf\u00e9"]', id="latin-1-kept"),
        pytest.param({"k\u2029": "v"}, '{"k\\u2029":"v"}', id="object-key-escaped"),
    ],
)
def test_json_format_carries_every_value_exactly(roles: Any, text: str) -> None:
    """The escape hatch for values csv cannot carry: JSON text the upstream decodes to exactly
    the checked value."""
    import json

    mapping = (ClaimHeader("X-Roles", ("roles",), ClaimFormat.JSON),)
    out = claim_headers({"roles": roles}, mapping)
    assert out == {"X-Roles": text}
    assert json.loads(out["X-Roles"]) == roles


def test_json_format_header() -> None:
    mapping = (ClaimHeader("X-Roles", ("roles",), ClaimFormat.JSON),)
    assert claim_headers({"roles": ["a", "b"]}, mapping) == {"X-Roles": '["a","b"]'}


def test_identity_headers_add_the_signed_payload_segment_when_configured() -> None:
    issuer = IssuerConfig("test", "https://idp.test", None, frozenset({"RS256"}))
    verified = VerifiedToken(
        claims={"sub": "alice"}, issuer=issuer, kid="k", payload_segment="eyJzdWIiOiJhbGljZSJ9"
    )
    route = RouteConfig(
        id="api",
        match=RouteMatch(None, "/api", frozenset()),
        upstream=Upstream("http://up", "http", "up", 80),
        auth=None,
        claim_headers=(ClaimHeader("X-User-Sub", ("sub",)),),
    )
    assert identity_headers(verified, route) == {"X-User-Sub": "alice"}
    with_payload = dataclasses.replace(route, payload_header="X-Jwt-Payload")
    assert identity_headers(verified, with_payload) == {
        "X-User-Sub": "alice",
        "X-Jwt-Payload": "eyJzdWIiOiJhbGljZSJ9",
    }


def test_a_refused_claim_says_why_and_names_the_header() -> None:
    """The decision line's detail: which header, and whether a csv item or the value was at fault."""
    with pytest.raises(Rejection) as caught:
        claim_headers({"roles": ["user,admin", "dev"]}, MAPPING)
    assert (caught.value.reason, caught.value.detail) == (
        Reason.CLAIM_INVALID,
        "a csv item would not read back as itself",
    )
    with pytest.raises(Rejection) as caught:
        claim_headers({"org": {"tenant_id": " acme"}}, MAPPING)
    assert (caught.value.reason, caught.value.detail) == (
        Reason.CLAIM_INVALID,
        "claim for X-Tenant-Id would not arrive as checked",
    )
