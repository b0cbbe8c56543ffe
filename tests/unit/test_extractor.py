"""Taking the one token out of a request (RFC 6750 §2.1 by default; cookies and query when configured).

``extract_token`` answers ``None`` when the request carries no token (the handler turns
that into ``token_missing`` on a required route) and raises ``invalid_request`` when
what it carries is ambiguous or malformed.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import BEARER_HEADER, TokenLocation, TokenSource
from gateway.errors import Rejection
from gateway.extractor import (
    Carriers,
    FoundToken,
    cookie_values,
    extract_token,
    is_b64token,
    query_values,
)
from gateway.reasons import Reason

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
MAX = 256

COOKIE = TokenSource(TokenLocation.COOKIE, "session")
QUERY = TokenSource(TokenLocation.QUERY, "access_token")
API_KEY = TokenSource(TokenLocation.HEADER, "X-Api-Token")
ALL_SOURCES = (BEARER_HEADER, COOKIE, QUERY)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def extract(
    pairs: list[tuple[str, str]],
    query: str = "",
    sources: tuple[TokenSource, ...] = (BEARER_HEADER,),
) -> str | None:
    found = extract_token(headers(*pairs), query, sources, MAX)
    return None if found is None else found.token


# --- the default: Authorization: Bearer ---------------------------------------------------
@pytest.mark.parametrize(
    ("pairs", "token"),
    [
        pytest.param([("Authorization", f"Bearer {TOKEN}")], TOKEN, id="canonical"),
        pytest.param([("authorization", f"bearer {TOKEN}")], TOKEN, id="lower-case"),
        pytest.param([("AUTHORIZATION", f"BEARER {TOKEN}")], TOKEN, id="upper-case"),
        pytest.param([("Authorization", f"BeArEr {TOKEN}")], TOKEN, id="mixed-case-scheme"),
        pytest.param([("Authorization", f"  Bearer   {TOKEN}  ")], TOKEN, id="extra-spaces"),
        pytest.param(
            [("Authorization", "Bearer abc-_.~+/==")], "abc-_.~+/==", id="b64token-charset"
        ),
        pytest.param([("Authorization", "Bearer " + "a" * MAX)], "a" * MAX, id="exactly-max"),
        pytest.param([("Authorization", "Bearer X1X")], "X1X", id="token-edges-kept"),
        pytest.param(
            [("Authorization", f"Bearer {TOKEN}"), ("X-Other", "1")], TOKEN, id="other-headers"
        ),
    ],
)
def test_bearer_token_is_extracted(pairs: list[tuple[str, str]], token: str) -> None:
    assert extract(pairs) == token
    # A route with more than one source reads its header the same way.
    assert extract(pairs, sources=ALL_SOURCES) == token


def test_a_route_without_sources_finds_no_token() -> None:
    assert Carriers(()).extract(headers(("Authorization", f"Bearer {TOKEN}")), "", MAX) is None


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([], id="no-header"),
        pytest.param([("X-Token", TOKEN)], id="other-header-only"),
        pytest.param([("Authorization", "")], id="empty-header"),
        pytest.param([("Authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")], id="basic"),
        pytest.param([("Authorization", f"Token {TOKEN}")], id="other-scheme"),
        pytest.param([("Authorization", f"Bearer:{TOKEN}")], id="scheme-colon"),
        pytest.param([("Authorization", f"Bearer\t{TOKEN}")], id="scheme-tab"),
        pytest.param([("Authorization", f"Bearerx {TOKEN}")], id="scheme-prefix-only"),
    ],
)
def test_no_bearer_credentials_is_no_token(pairs: list[tuple[str, str]]) -> None:
    # RFC 6750 §3.1: another scheme means the request lacks authentication (token_missing),
    # it is not malformed.
    assert extract(pairs) is None


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param(
            [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")],
            id="two-headers-same",
        ),
        pytest.param(
            [("Authorization", f"Bearer {TOKEN}"), ("authorization", "Basic eA==")],
            id="two-headers-different-case",
        ),
        pytest.param([("Authorization", "Bearer")], id="bearer-alone"),
        pytest.param([("Authorization", "Bearer    ")], id="bearer-spaces"),
        pytest.param([("Authorization", f"Bearer {TOKEN} {TOKEN}")], id="two-tokens"),
        pytest.param([("Authorization", "Bearer abc def")], id="space-inside"),
        pytest.param([("Authorization", "Bearer abc\tdef")], id="tab-inside"),
        pytest.param([("Authorization", "Bearer \tabc")], id="tab-after-the-space"),
        pytest.param([("Authorization", 'Bearer "abc"')], id="quoted"),
        pytest.param([("Authorization", "Bearer abc,def")], id="comma"),
        pytest.param([("Authorization", "Bearer abc=def")], id="inner-padding"),
        pytest.param([("Authorization", "Bearer =abc")], id="leading-padding"),
        pytest.param([("Authorization", "Bearer t\u00f6ken")], id="non-ascii"),
        pytest.param([("Authorization", "Bearer " + "a" * (MAX + 1))], id="one-over-max"),
        pytest.param([("Authorization", "Bearer " + "a" * 100_000)], id="far-over-max"),
    ],
)
def test_malformed_or_repeated_bearer_is_invalid_request(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(Rejection) as caught:
        extract(pairs)
    assert caught.value.reason is Reason.INVALID_REQUEST
    # The detail is for the log: it never echoes the credential.
    assert TOKEN not in caught.value.detail


@pytest.mark.parametrize(
    "sources", [(BEARER_HEADER,), ALL_SOURCES], ids=["the-only-source", "one-of-three"]
)
def test_found_token_names_its_source(sources: tuple[TokenSource, ...]) -> None:
    found = extract_token(headers(("Authorization", f"Bearer {TOKEN}")), "", sources, MAX)
    assert found is not None
    assert found.source is BEARER_HEADER


# --- configured sources: header without prefix, cookie, query -------------------------------
@pytest.mark.parametrize(
    ("pairs", "query", "token"),
    [
        pytest.param([("X-Api-Token", TOKEN)], "", TOKEN, id="custom-header"),
        pytest.param([("Cookie", f"a=1; session={TOKEN}; b=2")], "", TOKEN, id="cookie"),
        pytest.param([("Cookie", f'session="{TOKEN}"')], "", TOKEN, id="cookie-quoted"),
        pytest.param(
            [("Cookie", "a=1"), ("Cookie", f"session={TOKEN}")],
            "",
            TOKEN,
            id="cookie-second-header",
        ),
        pytest.param([], f"x=1&access_token={TOKEN}", TOKEN, id="query"),
        pytest.param([], "access_token=a%2Bb", "a+b", id="query-decoded"),
        pytest.param([("Cookie", "Session=x")], "", None, id="cookie-name-case-sensitive"),
        pytest.param([], "access_token", None, id="query-without-value"),
        pytest.param([], "access_tokenx=abc", None, id="query-other-name"),
        pytest.param(
            [("Authorization", f"Bearer {TOKEN}")], "", None, id="authorization-not-configured"
        ),
    ],
)
def test_configured_sources(pairs: list[tuple[str, str]], query: str, token: str | None) -> None:
    assert extract(pairs, query, (API_KEY, COOKIE, QUERY)) == token


@pytest.mark.parametrize(
    ("pairs", "query"),
    [
        pytest.param(
            [("Authorization", f"Bearer {TOKEN}"), ("Cookie", f"session={TOKEN}")],
            "",
            id="header-and-cookie",
        ),
        pytest.param(
            [("Authorization", f"Bearer {TOKEN}")], f"access_token={TOKEN}", id="header-and-query"
        ),
        pytest.param([("Cookie", f"session={TOKEN}; session={TOKEN}")], "", id="cookie-twice"),
        pytest.param(
            [("Cookie", f"session={TOKEN}"), ("Cookie", "session=other")],
            "",
            id="cookie-in-two-headers",
        ),
        pytest.param([], f"access_token={TOKEN}&access_token={TOKEN}", id="query-twice"),
        pytest.param([("Cookie", "session=")], "", id="cookie-empty"),
        pytest.param([], "access_token=", id="query-empty"),
        pytest.param([], "access_token=a%20b", id="query-decodes-to-space"),
    ],
)
def test_ambiguous_or_empty_sources_are_invalid_request(
    pairs: list[tuple[str, str]], query: str
) -> None:
    # Which of two tokens is "the" token is exactly the ambiguity an attacker wants.
    with pytest.raises(Rejection) as caught:
        extract(pairs, query, ALL_SOURCES)
    assert caught.value.reason is Reason.INVALID_REQUEST


def test_custom_header_twice_is_invalid_request() -> None:
    with pytest.raises(Rejection) as caught:
        extract([("X-Api-Token", "a"), ("X-Api-Token", "b")], "", (API_KEY,))
    assert caught.value.reason is Reason.INVALID_REQUEST


@pytest.mark.parametrize(
    ("cookie_headers", "values"),
    [
        pytest.param(["session=a"], ["a"], id="one"),
        pytest.param(["x=1;session=a ; y=2"], ["a"], id="among-others"),
        pytest.param(["session=a", "session=b"], ["a", "b"], id="two-headers"),
        pytest.param(["sessionx=a; xsession=b"], [], id="no-partial-names"),
        pytest.param(["session"], [], id="no-equals"),
        pytest.param(["session=abc=="], ["abc=="], id="padding-in-the-value"),
        pytest.param(['session="X1X"'], ["X1X"], id="only-the-quotes-are-removed"),
    ],
)
def test_cookie_values(cookie_headers: list[str], values: list[str]) -> None:
    assert cookie_values(headers(*(("Cookie", v) for v in cookie_headers)), "session") == values


@pytest.mark.parametrize(
    ("query", "values"),
    [
        pytest.param("t=a", ["a"], id="one"),
        pytest.param("x=1&t=a&y=2", ["a"], id="among-others"),
        pytest.param("t=a&t=b", ["a", "b"], id="twice"),
        pytest.param("t=a+b%21", ["a b!"], id="plus-and-percent-decoded"),
        pytest.param("%74=a", ["a"], id="encoded-name"),
        pytest.param("tt=a&t", [], id="no-match"),
        pytest.param("t=abc==", ["abc=="], id="padding-in-the-value"),
        pytest.param("", [], id="empty"),
    ],
)
def test_query_values(query: str, values: list[str]) -> None:
    assert query_values(query, "t") == values


# --- one configured source that is not a header, two sources ---------------------------------------
@pytest.mark.parametrize(
    ("sources", "pairs", "query", "token"),
    [
        pytest.param((COOKIE,), [("Cookie", f"session={TOKEN}")], "", TOKEN, id="cookie-only"),
        pytest.param((COOKIE,), [("session", TOKEN)], "", None, id="cookie-not-a-header"),
        pytest.param((QUERY,), [], f"access_token={TOKEN}", TOKEN, id="query-only"),
        pytest.param((BEARER_HEADER, COOKIE), [("Cookie", f"session={TOKEN}")], "", TOKEN,
                     id="header-or-cookie-cookie"),
    ],
)  # fmt: skip
def test_a_single_non_header_source_reads_its_own_location(
    sources: tuple[TokenSource, ...], pairs: list[tuple[str, str]], query: str, token: str | None
) -> None:
    assert extract(pairs, query, sources) == token


def test_header_and_cookie_sources_with_both_present_is_invalid_request() -> None:
    with pytest.raises(Rejection) as caught:
        extract(
            [("Authorization", f"Bearer {TOKEN}"), ("Cookie", f"session={TOKEN}")],
            "",
            (BEARER_HEADER, COOKIE),
        )
    assert (caught.value.reason, caught.value.detail) == (
        Reason.INVALID_REQUEST,
        "more than one token in the request",
    )


# --- why a request was refused (the decision line's detail; never the credential) -------------
@pytest.mark.parametrize(
    ("pairs", "query", "sources", "detail"),
    [
        pytest.param([("X-Api-Token", "a"), ("X-Api-Token", "b")], "", (API_KEY,),
                     "more than one X-Api-Token header", id="header-twice"),
        pytest.param([("Cookie", "session=a; session=b")], "", ALL_SOURCES,
                     "cookie session repeated", id="cookie-twice"),
        pytest.param([], "access_token=a&access_token=b", ALL_SOURCES,
                     "query access_token repeated", id="query-twice"),
        pytest.param([("Authorization", f"Bearer {TOKEN}")], f"access_token={TOKEN}", ALL_SOURCES,
                     "more than one token in the request", id="two-sources"),
        pytest.param([("Authorization", "Bearer " + "a" * (MAX + 1))], "", (BEARER_HEADER,),
                     f"token longer than {MAX} bytes", id="too-long"),
        pytest.param([("Authorization", "Bearer a,b")], "", (BEARER_HEADER,),
                     "credentials are not a single b64token", id="not-a-b64token"),
    ],
)  # fmt: skip
def test_an_invalid_request_says_why(
    pairs: list[tuple[str, str]], query: str, sources: tuple[TokenSource, ...], detail: str
) -> None:
    with pytest.raises(Rejection) as caught:
        extract(pairs, query, sources)
    assert (caught.value.reason, caught.value.detail) == (Reason.INVALID_REQUEST, detail)


# --- the b64token grammar -----------------------------------------------------------------------
# RFC 6750 §2.1, b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=", as the
# regex the check once was: the oracle ``is_b64token`` (two C scans) must agree with.
B64TOKEN_GRAMMAR = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
NEAR_B64TOKEN = st.text(
    alphabet=st.sampled_from("Aa9-._~+/=" + ' \t,;"\\:@!\x00\x7f\u00e9\u0663\uff21\U0001f600'),
    max_size=12,
)


@given(st.one_of(NEAR_B64TOKEN, st.text(max_size=12)))
def test_is_b64token_is_the_rfc_6750_grammar(credentials: str) -> None:
    assert is_b64token(credentials) == bool(B64TOKEN_GRAMMAR.fullmatch(credentials))


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [("a", True), ("a==", True), ("X", True), ("XX==", True), ("Zz09-._~+/", True), ("", False), ("=", False),
     ("==a", False), ("a=b", False), ("a b", False), ("\u0663", False), ("a\x00", False)],
)  # fmt: skip
def test_is_b64token_examples(credentials: str, expected: bool) -> None:
    assert is_b64token(credentials) is expected


def test_a_known_token_skips_only_the_grammar_scan() -> None:
    # ``known`` is the verifier's cache: tokens that verified.  Its members are trusted to be
    # b64tokens (tests/unit/test_verifier.py holds that only verified tokens get in); the length
    # bound still holds for them, and every other token is scanned as before.
    long_token = "a" * (MAX + 1)
    with pytest.raises(Rejection) as caught:
        extract_token(
            headers(("Authorization", f"Bearer {long_token}")), "", (BEARER_HEADER,), MAX,
            {long_token},
        )  # fmt: skip
    assert caught.value.detail == f"token longer than {MAX} bytes"
    with pytest.raises(Rejection) as caught:
        extract_token(headers(("Authorization", "Bearer a,b")), "", (BEARER_HEADER,), MAX, {TOKEN})
    assert caught.value.detail == "credentials are not a single b64token"
    for sources in [(BEARER_HEADER,), ALL_SOURCES]:
        found = extract_token(
            headers(("Authorization", f"Bearer {TOKEN}")), "", sources, MAX, {TOKEN}
        )
        assert found is not None
        assert found.token == TOKEN


def test_a_found_token_never_shows_the_token_in_its_repr() -> None:
    found = FoundToken(TOKEN, BEARER_HEADER)
    assert (found.token, found.source) == (TOKEN, BEARER_HEADER)
    assert TOKEN not in repr(found)
    assert f"<{len(TOKEN)} chars>" in repr(found)
