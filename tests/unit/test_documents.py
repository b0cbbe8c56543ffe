"""Fetching the IdP's JSON documents: the lifetime a response declares, and the HTTP fetcher's
limits (status, size, JSON, time, connection, redirects) against a real server on loopback."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.documents import FetchedDocument, HttpDocumentFetcher, declared_lifetime
from gateway.errors import JwksFetchError
from tests.fakes import FakeClock
from tests.integration.e2e_helpers import free_port

NOW = 1_700_000_000.0  # the gateway's wall clock in these tests


def http_date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


DATE = http_date(NOW - 5_000)  # the origin's clock, far from ours: only Expires - Date counts

LIFETIMES = [
    pytest.param([("Cache-Control", "max-age=120")], 120.0, id="max-age"),
    pytest.param([("Cache-Control", "public, max-age=120, must-revalidate")], 120.0, id="max-age-among-others"),
    pytest.param([("Cache-Control", "Max-Age=120")], 120.0, id="case-insensitive"),
    pytest.param([("Cache-Control", 'max-age="120"')], 120.0, id="quoted-max-age"),
    pytest.param([("Cache-Control", "max-age=0")], 0.0, id="max-age-zero"),
    pytest.param([("Cache-Control", "s-maxage=30, max-age=120")], 30.0, id="s-maxage-first"),
    pytest.param([("Cache-Control", "max-age=120, s-maxage=30")], 30.0, id="s-maxage-last"),
    pytest.param([("Cache-Control", 's-maxage="45"')], 45.0, id="quoted-s-maxage"),
    pytest.param([("Cache-Control", "public"), ("Cache-Control", "max-age=7")], 7.0, id="two-header-lines"),
    pytest.param([("Cache-Control", "no-store")], 0.0, id="no-store"),
    pytest.param([("Cache-Control", "no-cache")], 0.0, id="no-cache"),
    pytest.param([("Cache-Control", "max-age=120, no-store")], 0.0, id="no-store-beats-max-age"),
    pytest.param([("Cache-Control", "No-Cache, s-maxage=60")], 0.0, id="no-cache-beats-s-maxage"),
    pytest.param([("Cache-Control", "max-age=abc")], None, id="unparsable-max-age-says-nothing"),
    pytest.param([("Date", DATE), ("Expires", http_date(NOW - 5_000 + 600))], 600.0, id="expires-minus-date"),
    pytest.param([("Date", DATE), ("Expires", http_date(NOW - 6_000))], 0.0, id="expires-before-date"),
    pytest.param([("Expires", http_date(NOW + 90))], 90.0, id="expires-without-date"),
    pytest.param([("Expires", http_date(NOW - 90))], 0.0, id="expires-in-the-past"),
    pytest.param([("Date", DATE), ("Expires", "Sunday, 06-Nov-94 08:59:37 GMT")], 0.0, id="rfc850-expires-past"),
    pytest.param(
        [("Date", "Sun, 06 Nov 1994 08:49:37 GMT"), ("Expires", "Sunday, 06-Nov-94 08:59:37 GMT")],
        600.0,
        id="rfc850-expires",
    ),
    pytest.param([("Expires", "0")], 0.0, id="invalid-expires-0"),
    pytest.param([("Date", DATE), ("Expires", "not a date")], 0.0, id="invalid-expires-text"),
    pytest.param([("Expires", "")], 0.0, id="empty-expires"),
    pytest.param(
        [("Cache-Control", "max-age=120"), ("Date", DATE), ("Expires", http_date(NOW))],
        120.0,
        id="max-age-beats-expires",
    ),
    pytest.param(
        [("Cache-Control", "public"), ("Expires", http_date(NOW + 30))], 30.0, id="expires-without-max-age"
    ),
    pytest.param([], None, id="nothing"),
    pytest.param([("Cache-Control", "public, must-revalidate")], None, id="no-lifetime-directive"),
    pytest.param([("Date", DATE)], None, id="date-alone"),
]  # fmt: skip


@pytest.mark.parametrize(("pairs", "expected"), LIFETIMES)
def test_declared_lifetime(pairs: list[tuple[str, str]], expected: float | None) -> None:
    assert declared_lifetime(headers(*pairs), NOW) == expected


def test_repeated_max_age_uses_the_first_or_none() -> None:
    lifetime = declared_lifetime(headers(("Cache-Control", "max-age=10, max-age=100000")), NOW)
    assert lifetime in (10.0, 0.0)


@pytest.fixture
def eastern_time() -> Iterator[None]:
    """The process's local time zone set to UTC-5 (a server not running in UTC)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST+05"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("eastern_time")
def test_asctime_expires_is_gmt_whatever_the_local_time_zone() -> None:
    date = "Sun, 06 Nov 1994 08:49:37 GMT"
    lifetime = declared_lifetime(
        headers(("Date", date), ("Expires", "Sun Nov  6 08:59:37 1994")), 0
    )
    assert lifetime == 600.0


# --- HttpDocumentFetcher against a server on loopback -----------------------------------------
MAX_BYTES = 1024


@dataclass
class Origin:
    """A tiny document server; ``hits`` counts requests per path."""

    url: str
    hits: dict[str, int]
    release: asyncio.Event
    accept: list[str]

    def at(self, path: str) -> str:
        return self.url + path


def _padded_json(size: int) -> bytes:
    """A JSON document of exactly ``size`` bytes."""
    head, tail = b'{"keys":[],"pad":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.fixture
async def origin(aiohttp_server: Any) -> AsyncIterator[Origin]:
    hits: dict[str, int] = {}
    release = asyncio.Event()
    accept: list[str] = []

    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        hits[request.path] = hits.get(request.path, 0) + 1
        accept.append(request.headers.get("Accept", ""))
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[web.middleware(count)])

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"keys": []}, headers={"Cache-Control": "max-age=60"})

    async def plain(_: web.Request) -> web.Response:
        return web.json_response({"keys": [1, 2]})

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="{}")

    async def sized(request: web.Request) -> web.Response:
        return web.Response(
            body=_padded_json(int(request.match_info["size"])), content_type="application/json"
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        # No Content-Length: the size is known only by reading.
        body = _padded_json(int(request.match_info["size"]))
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 100):
            await response.write(body[start : start + 100])
        await response.write_eof()
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        # Streams until the client gives up (bounded, so a broken client cannot hang the test).
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(4096):
            await response.write(b" " * 4096)
            await asyncio.sleep(0)
        return response

    async def not_json(_: web.Request) -> web.Response:
        return web.Response(text="<html>login</html>", content_type="text/html")

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def slow_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"keys": ')
        await release.wait()
        return response

    async def announced_huge(request: web.Request) -> web.StreamResponse:
        # Announces a body over the limit, then sends nothing: only the header can refuse it.
        response = web.StreamResponse()
        response.content_length = 50 * MAX_BYTES
        await response.prepare(request)
        await release.wait()
        return response

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app.router.add_get("/ok", ok)
    app.router.add_get("/plain", plain)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/sized/{size}", sized)
    app.router.add_get("/chunked/{size}", chunked)
    app.router.add_get("/endless", endless)
    app.router.add_get("/not-json", not_json)
    app.router.add_get("/hang", hang)
    app.router.add_get("/slow-body", slow_body)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/announced-huge", announced_huge)
    server = await aiohttp_server(app)
    yield Origin(str(server.make_url("")).rstrip("/"), hits, release, accept)
    release.set()


@pytest.fixture
async def fetcher() -> AsyncIterator[HttpDocumentFetcher]:
    async with aiohttp.ClientSession() as session:
        yield HttpDocumentFetcher(session, FakeClock(wall=NOW))


async def fetch(fetcher: HttpDocumentFetcher, url: str, timeout_s: float = 2.0) -> FetchedDocument:
    return await fetcher.fetch(url, timeout_s=timeout_s, max_bytes=MAX_BYTES)


async def failure(fetcher: HttpDocumentFetcher, url: str, timeout_s: float = 2.0) -> str:
    with pytest.raises(JwksFetchError) as caught:
        await fetch(fetcher, url, timeout_s)
    return caught.value.result


async def test_ok_document_with_its_lifetime(fetcher: HttpDocumentFetcher, origin: Origin) -> None:
    document = await fetch(fetcher, origin.at("/ok"))
    assert document == FetchedDocument({"keys": []}, 60.0)
    assert "application/json" in origin.accept[-1]


async def test_ok_document_without_lifetime(fetcher: HttpDocumentFetcher, origin: Origin) -> None:
    assert await fetch(fetcher, origin.at("/plain")) == FetchedDocument({"keys": [1, 2]}, None)


@pytest.mark.parametrize("code", [201, 204, 304, 400, 404, 429, 500, 503])
async def test_any_status_but_200_is_an_http_error(
    fetcher: HttpDocumentFetcher, origin: Origin, code: int
) -> None:
    assert await failure(fetcher, origin.at(f"/status/{code}")) == "http_error"


@pytest.mark.parametrize("shape", ["sized", "chunked"], ids=["content-length", "no-content-length"])
async def test_size_limit(fetcher: HttpDocumentFetcher, origin: Origin, shape: str) -> None:
    document = await fetch(fetcher, origin.at(f"/{shape}/{MAX_BYTES}"))  # exactly the limit
    assert document.body["keys"] == []
    assert await failure(fetcher, origin.at(f"/{shape}/{MAX_BYTES + 1}")) == "invalid"
    assert await failure(fetcher, origin.at(f"/{shape}/{50 * MAX_BYTES}")) == "invalid"


async def test_content_length_over_the_limit_is_refused_before_the_body(
    fetcher: HttpDocumentFetcher, origin: Origin
) -> None:
    assert await failure(fetcher, origin.at("/announced-huge"), timeout_s=1) == "invalid"


async def test_endless_body_is_cut_at_the_limit_not_at_the_timeout(
    fetcher: HttpDocumentFetcher, origin: Origin
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await failure(fetcher, origin.at("/endless"), timeout_s=10) == "invalid"
    assert loop.time() - started < 5


async def test_non_json_body_is_invalid(fetcher: HttpDocumentFetcher, origin: Origin) -> None:
    assert await failure(fetcher, origin.at("/not-json")) == "invalid"


@pytest.mark.parametrize("path", ["/hang", "/slow-body"], ids=["no-headers", "stalled-body"])
async def test_no_answer_in_time_is_a_timeout(
    fetcher: HttpDocumentFetcher, origin: Origin, path: str
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await failure(fetcher, origin.at(path), timeout_s=0.2) == "timeout"
    assert loop.time() - started < 2


async def test_refused_port_is_unreachable(fetcher: HttpDocumentFetcher) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    assert await failure(fetcher, url) == "unreachable"


async def test_redirects_are_not_followed(fetcher: HttpDocumentFetcher, origin: Origin) -> None:
    assert await failure(fetcher, origin.at("/redirect")) == "http_error"
    assert origin.hits.get("/ok", 0) == 0


# --- conditional requests -----------------------------------------------------------------------
_ETAG = '"v1"'
_LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.fixture
async def validated(aiohttp_server: Any) -> tuple[str, list[dict[str, str]]]:
    """A JWKS with validators; a matching conditional request gets 304 (max-age=90 on it)."""
    seen: list[dict[str, str]] = []

    async def jwks(request: web.Request) -> web.Response:
        sent = {k: v for k, v in request.headers.items() if k.startswith("If-")}
        seen.append(sent)
        if sent.get("If-None-Match") == _ETAG or sent.get("If-Modified-Since") == _LAST_MODIFIED:
            return web.Response(status=304, headers={"Cache-Control": "max-age=90"})
        headers = {"ETag": _ETAG, "Last-Modified": _LAST_MODIFIED, "Cache-Control": "max-age=60"}
        return web.json_response({"keys": []}, headers=headers)

    async def odd(request: web.Request) -> web.Response:
        headers = {
            "ETag": '"' + "x" * 300 + '"',
            "Last-Modified": "caf\u00e9".encode().decode("latin-1"),
        }
        return web.json_response({"keys": []}, headers=headers)

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/odd", odd)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def test_validators_are_kept_and_sent_back(
    fetcher: HttpDocumentFetcher, validated: tuple[str, list[dict[str, str]]]
) -> None:
    base, seen = validated
    first = await fetch(fetcher, f"{base}/jwks")
    assert (first.etag, first.last_modified, first.not_modified) == (_ETAG, _LAST_MODIFIED, False)
    assert seen == [{}]
    again = await fetcher.fetch(
        f"{base}/jwks", timeout_s=2, max_bytes=MAX_BYTES, etag=first.etag,
        last_modified=first.last_modified,
    )  # fmt: skip
    assert seen[-1] == {"If-None-Match": _ETAG, "If-Modified-Since": _LAST_MODIFIED}
    # A 304: no body, the validators kept, the 304's own lifetime.
    assert again == FetchedDocument(None, 90.0, _ETAG, _LAST_MODIFIED, not_modified=True)


async def test_stale_validators_get_the_full_document(
    fetcher: HttpDocumentFetcher, validated: tuple[str, list[dict[str, str]]]
) -> None:
    base, seen = validated
    document = await fetcher.fetch(f"{base}/jwks", timeout_s=2, max_bytes=MAX_BYTES, etag='"v0"')
    assert seen[-1] == {"If-None-Match": '"v0"'}
    assert document == FetchedDocument({"keys": []}, 60.0, _ETAG, _LAST_MODIFIED)


async def test_unusable_validators_are_not_kept(
    fetcher: HttpDocumentFetcher, validated: tuple[str, list[dict[str, str]]]
) -> None:
    base, _ = validated
    document = await fetch(fetcher, f"{base}/odd")  # an over-long ETag, a non-ASCII date
    assert (document.etag, document.last_modified) == (None, None)
