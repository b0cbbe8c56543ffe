"""The upstream hop's header hygiene: what an upstream never sees, what it is told, and the body meter.

``Forwarder.upstream_headers`` is driven with the server's ``HttpRequest`` objects built as
its parser would build them (without a connection); nothing here opens a connection.  The
body meter reads a real ``RequestBody`` that the test feeds by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from gateway import loads_config
from gateway.config import GatewayConfig, Upstream
from gateway.errors import Rejection
from gateway.extractor import cookie_values, query_values
from gateway.headers import AUTH_OUTCOME_HEADER, Carriers, header_key, token_carriers
from gateway.metrics import GatewayMetrics
from gateway.proxy import (
    Forwarder,
    _BodyMeter,
    _BodyStopped,
    _host_header,
    _without_cookies,
    _without_params,
    name_lengths,
    request_head,
    response_block,
)
from gateway.reasons import Reason
from gateway.server import HttpRequest, RequestBody
from gateway.upstream import UpstreamPools

UNTRUSTED = "203.0.113.9"
TRUSTED = "10.0.0.5"  # inside trusted_proxies
HOST = "api.example.com"
REQUEST_ID = "rid-1"
BODY_LIMIT = 1024
# Port 9 (discard) on loopback: nothing listens; a test that reached it would see a refusal.
NOWHERE = "http://127.0.0.1:9"

CONFIG: GatewayConfig = loads_config(
    yaml.safe_dump(
        {
            "trusted_proxies": ["10.0.0.0/8"],
            "strip_untrusted_headers": ["X-Debug-User"],
            # Only a trusted proxy may say which certificate the client showed.
            "client_cert_header": {"name": "X-SSL-Client-Cert", "format": "pem"},
            "issuers": {
                "test": {
                    "issuer": "https://idp.test",
                    "jwks_uri": "https://idp.test/jwks.json",
                    "algorithms": ["RS256"],
                }
            },
            "routes": [
                {
                    "id": "api",
                    "match": {"path_prefix": "/api"},
                    "upstream": NOWHERE,
                    "max_body_bytes": BODY_LIMIT,
                    "auth": {"issuers": ["test"], "audiences": ["api"]},
                    "claim_headers": {"X-User-Sub": "sub", "X-Tenant-Id": "org.tenant"},
                    "payload_header": "X-Jwt-Payload",
                },
                {
                    "id": "sources",
                    "match": {"path_prefix": "/sources"},
                    "upstream": NOWHERE,
                    "auth": {
                        "issuers": ["test"],
                        "audiences": ["api"],
                        "token_from": [
                            {"header": "X-Api-Token"},
                            {"cookie": "session"},
                            {"query": "access_token"},
                        ],
                    },
                },
                {
                    "id": "forwarding",
                    "match": {"path_prefix": "/forwarding"},
                    "upstream": NOWHERE,
                    "auth": {
                        "issuers": ["test"],
                        "audiences": ["api"],
                        "forward_token": True,
                        "token_from": [
                            {"header": "Authorization", "prefix": "Bearer "},
                            {"cookie": "session"},
                        ],
                    },
                },
                {
                    "id": "public",
                    "match": {"path_prefix": "/public"},
                    "upstream": NOWHERE,
                    "auth": "none",
                },
            ],
        }
    )
)
ROUTES = {route.id: route for route in CONFIG.routes}


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    pools = UpstreamPools(CONFIG.upstream_defaults.max_connections)
    yield Forwarder(CONFIG, pools, GatewayMetrics(CollectorRegistry()))
    await pools.close()


def request_from(
    peer: str | None,
    headers: Iterable[tuple[str, str]] = (),
    path: str = "/api/orders",
    method: str = "GET",
) -> HttpRequest:
    """A request as the server's parser hands it over, from ``peer``, with the record set."""
    parsed = CIMultiDictProxy(CIMultiDict([("Host", HOST), *headers]))
    length = parsed.get("Content-Length")
    request = HttpRequest(
        method,
        path,
        parsed,
        remote=peer,
        content_length=int(length) if length is not None else None,
    )
    request.record.request_id = REQUEST_ID
    return request


def upstream_sees(
    forwarder: Forwarder,
    headers: Iterable[tuple[str, str]],
    *,
    peer: str | None = UNTRUSTED,
    route: str = "api",
    injected: dict[str, str] | None = None,
) -> CIMultiDict[str]:
    sent = forwarder.upstream_headers(request_from(peer, headers), ROUTES[route], injected or {})
    return CIMultiDict(sent)


def names(headers: CIMultiDict[str]) -> set[str]:
    """The headers' names as an upstream that folds ``_`` and ``.`` into ``-`` reads them."""
    return {header_key(name) for name in headers}


# --- claim headers the gateway owns -------------------------------------------------------------
OWNED_SPELLINGS = [
    pytest.param("X-User-Sub", id="canonical"),
    pytest.param("x-user-sub", id="lower-case"),
    pytest.param("X_User_Sub", id="underscores-as-cgi-reads-them"),
    pytest.param("X.User.Sub", id="dots-as-php-reads-them"),
    pytest.param("X-User_Sub", id="mixed-dash-and-underscore"),
    pytest.param("X-Tenant-Id", id="second-claim-header"),
    pytest.param("X_Jwt_Payload", id="payload-header"),
    pytest.param(AUTH_OUTCOME_HEADER, id="report-only-outcome-header"),
    pytest.param("x.gateway_auth-outcome", id="outcome-header-odd-spelling"),
]


@pytest.mark.parametrize("spelling", OWNED_SPELLINGS)
@pytest.mark.parametrize("peer", [UNTRUSTED, TRUSTED], ids=["untrusted-peer", "trusted-peer"])
@pytest.mark.parametrize("route", ["api", "public"], ids=["on-its-route", "on-a-public-route"])
async def test_a_spoofed_owned_header_never_reaches_the_upstream_in_any_spelling(
    forwarder: Forwarder, spelling: str, peer: str, route: str
) -> None:
    sent = upstream_sees(forwarder, [(spelling, "admin")], peer=peer, route=route)
    assert header_key(spelling) not in names(sent)
    assert "admin" not in sent.values()


async def test_the_injected_claim_replaces_the_spoofed_one_exactly_once(
    forwarder: Forwarder,
) -> None:
    sent = upstream_sees(
        forwarder,
        [("X-User-Sub", "admin"), ("X_User_Sub", "admin"), ("X.User.Sub", "admin")],
        injected={"X-User-Sub": "alice"},
    )
    assert [v for k, v in sent.items() if header_key(k) == "x-user-sub"] == ["alice"]


# --- hop-by-hop and Connection-named headers ------------------------------------------------------
HOP_BY_HOP = [
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "websocket"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("Transfer-Encoding", "chunked"),
    ("Connection", "keep-alive"),
]


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP, ids=[n for n, _ in HOP_BY_HOP])
@pytest.mark.parametrize("peer", [UNTRUSTED, TRUSTED], ids=["untrusted-peer", "trusted-peer"])
async def test_hop_by_hop_headers_are_not_forwarded(
    forwarder: Forwarder, name: str, value: str, peer: str
) -> None:
    sent = upstream_sees(forwarder, [(name, value), ("Accept", "*/*")], peer=peer)
    assert header_key(name) not in names(sent)
    assert sent["Accept"] == "*/*"


async def test_host_and_expect_are_the_proxys_own(forwarder: Forwarder) -> None:
    sent = upstream_sees(forwarder, [("Expect", "100-continue")])
    assert "Host" not in sent  # the upstream session sets the upstream's own
    assert "Expect" not in sent  # already answered by the gateway


@pytest.mark.parametrize("peer", [UNTRUSTED, TRUSTED], ids=["untrusted-peer", "trusted-peer"])
async def test_headers_named_in_connection_are_dropped_in_every_spelling(
    forwarder: Forwarder, peer: str
) -> None:
    sent = upstream_sees(
        forwarder,
        [
            ("Connection", "keep-alive, X-Hop-Secret"),
            ("Connection", "x-other-hop"),
            ("X-Hop-Secret", "1"),
            ("X_Hop_Secret", "2"),
            ("X-Other-Hop", "3"),
            ("X-Kept", "4"),
        ],
        peer=peer,
    )
    assert names(sent) & {"x-hop-secret", "x-other-hop", "connection"} == set()
    assert sent["X-Kept"] == "4"


async def test_end_to_end_headers_pass_unchanged_with_repeats_in_order(
    forwarder: Forwarder,
) -> None:
    sent = upstream_sees(
        forwarder,
        [
            ("Accept", "application/json"),
            ("X-Custom", "one"),
            ("Content-Type", "text/plain"),
            ("X-Custom", "two"),
            ("User-Agent", "curl/8"),
        ],
    )
    assert sent.getall("X-Custom") == ["one", "two"]
    assert (sent["Accept"], sent["Content-Type"], sent["User-Agent"]) == (
        "application/json",
        "text/plain",
        "curl/8",
    )


# --- headers that say who the client is: only the gateway's (or a trusted proxy's) word ----------
FORWARDED_VARIANTS = [
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Ssl",
    "X-Forwarded-Scheme",
    "X-Forwarded-Server",
    "X-Forwarded-Uri",
    "X_Forwarded_Prefix",
    "x.forwarded.port",
]


@pytest.mark.parametrize("name", FORWARDED_VARIANTS)
async def test_every_x_forwarded_name_from_an_untrusted_peer_is_dropped(
    forwarder: Forwarder, name: str
) -> None:
    sent = upstream_sees(forwarder, [(name, "spoofed")], peer=UNTRUSTED)
    assert header_key(name) not in names(sent)
    assert "spoofed" not in sent.values()


@pytest.mark.parametrize("name", FORWARDED_VARIANTS[:6])
async def test_a_trusted_proxys_other_x_forwarded_headers_pass(
    forwarder: Forwarder, name: str
) -> None:
    sent = upstream_sees(forwarder, [(name, "from-the-edge")], peer=TRUSTED)
    assert sent[name] == "from-the-edge"


@pytest.mark.parametrize("name", ["Forwarded", "X-Real-IP"])
@pytest.mark.parametrize("peer", [UNTRUSTED, TRUSTED], ids=["untrusted-peer", "trusted-peer"])
async def test_forwarded_and_x_real_ip_are_never_passed_on(
    forwarder: Forwarder, name: str, peer: str
) -> None:
    sent = upstream_sees(forwarder, [(name, "for=198.51.100.7")], peer=peer)
    assert name not in sent


CLIENT_ORIGIN = [
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-Forwarded-For",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Client-IP",
    "True_Client_IP",
    "X-Debug-User",  # strip_untrusted_headers
    "x_debug.user",  # ... in another spelling
    "X-SSL-Client-Cert",  # client_cert_header
    "x_ssl_client.cert",  # ... in another spelling
]


@pytest.mark.parametrize("name", CLIENT_ORIGIN)
async def test_client_origin_headers_are_dropped_from_untrusted_peers_only(
    forwarder: Forwarder, name: str
) -> None:
    for _ in range(2):  # the forwarder remembers each peer's answer: the same both times
        untrusted = upstream_sees(forwarder, [(name, "198.51.100.7")], peer=UNTRUSTED)
        assert header_key(name) not in names(untrusted)
        trusted = upstream_sees(forwarder, [(name, "198.51.100.7")], peer=TRUSTED)
        assert trusted[name] == "198.51.100.7"


async def test_a_request_without_a_peer_address_is_untrusted(forwarder: Forwarder) -> None:
    sent = upstream_sees(
        forwarder, [("True-Client-IP", "1.2.3.4"), ("X-Forwarded-Port", "1")], peer=None
    )
    assert names(sent) & {"true-client-ip", "x-forwarded-port"} == set()
    assert sent["X-Forwarded-For"] == "unknown"
    # The untrusted answer remembered for "no address" is not any other peer's.
    trusted = upstream_sees(forwarder, [("True-Client-IP", "1.2.3.4")], peer=TRUSTED)
    assert trusted["True-Client-IP"] == "1.2.3.4"


METHOD_OVERRIDES = ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method", "X_Http_Method"]


@pytest.mark.parametrize("name", METHOD_OVERRIDES)
@pytest.mark.parametrize("peer", [UNTRUSTED, TRUSTED], ids=["untrusted-peer", "trusted-peer"])
async def test_method_overrides_are_dropped_from_every_peer(
    forwarder: Forwarder, name: str, peer: str
) -> None:
    sent = upstream_sees(forwarder, [(name, "DELETE")], peer=peer)
    assert "DELETE" not in sent.values()


# --- what the gateway tells the upstream ------------------------------------------------------------
@pytest.mark.parametrize(
    ("peer", "inbound", "expected"),
    [
        pytest.param(UNTRUSTED, [], UNTRUSTED, id="untrusted-no-prior"),
        pytest.param(
            UNTRUSTED, [("X-Forwarded-For", "1.2.3.4")], UNTRUSTED, id="untrusted-spoof-replaced"
        ),
        pytest.param(TRUSTED, [], TRUSTED, id="trusted-no-prior"),
        pytest.param(
            TRUSTED,
            [("X-Forwarded-For", "198.51.100.1")],
            f"198.51.100.1, {TRUSTED}",
            id="trusted-prior-extended",
        ),
        pytest.param(
            TRUSTED,
            [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2")],
            f"198.51.100.1, 198.51.100.2, {TRUSTED}",
            id="trusted-repeated-headers-joined",
        ),
    ],
)
async def test_x_forwarded_for(
    forwarder: Forwarder, peer: str, inbound: list[tuple[str, str]], expected: str
) -> None:
    sent = upstream_sees(forwarder, inbound, peer=peer)
    assert sent.getall("X-Forwarded-For") == [expected]


@pytest.mark.parametrize(
    ("peer", "inbound", "expected"),
    [
        pytest.param(UNTRUSTED, None, "http", id="untrusted-scheme-of-the-connection"),
        pytest.param(UNTRUSTED, "https", "http", id="untrusted-claim-ignored"),
        pytest.param(TRUSTED, "https", "https", id="trusted-claim-kept"),
        pytest.param(TRUSTED, None, "http", id="trusted-without-claim"),
    ],
)
async def test_x_forwarded_proto(
    forwarder: Forwarder, peer: str, inbound: str | None, expected: str
) -> None:
    headers = [] if inbound is None else [("X-Forwarded-Proto", inbound)]
    sent = upstream_sees(forwarder, headers, peer=peer)
    assert sent.getall("X-Forwarded-Proto") == [expected]


@pytest.mark.parametrize(
    ("peer", "inbound", "expected"),
    [
        pytest.param(UNTRUSTED, None, HOST, id="untrusted-the-request-host"),
        pytest.param(UNTRUSTED, "admin.example.com", HOST, id="untrusted-claim-ignored"),
        pytest.param(TRUSTED, "public.example.com:8443", "public.example.com:8443", id="trusted"),
        pytest.param(TRUSTED, "[2001:db8::1]:443", "[2001:db8::1]:443", id="trusted-ipv6"),
        pytest.param(
            TRUSTED, "public.example.com:@admin.example.com", HOST, id="trusted-userinfo-refused"
        ),
        pytest.param(TRUSTED, "evil.com/.example.com", HOST, id="trusted-slash-refused"),
        pytest.param(TRUSTED, "a.example.com, b.example.com", HOST, id="trusted-list-refused"),
        pytest.param(TRUSTED, "", HOST, id="trusted-empty-refused"),
    ],
)
async def test_x_forwarded_host_only_when_valid(
    forwarder: Forwarder, peer: str, inbound: str | None, expected: str
) -> None:
    headers = [] if inbound is None else [("X-Forwarded-Host", inbound)]
    sent = upstream_sees(forwarder, headers, peer=peer)
    assert sent.getall("X-Forwarded-Host") == [expected]


async def test_the_request_id_is_the_records_not_the_clients(forwarder: Forwarder) -> None:
    sent = upstream_sees(forwarder, [("X-Request-ID", "client-chosen")])
    assert sent.getall("X-Request-ID") == [REQUEST_ID]


# --- token carriers -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("route", "header"),
    [
        pytest.param("api", "Authorization", id="required-route"),
        pytest.param("public", "Authorization", id="public-route"),
        pytest.param("sources", "Authorization", id="route-reading-other-sources"),
        pytest.param("sources", "X-Api-Token", id="configured-header"),
        pytest.param("sources", "x_api.token", id="configured-header-other-spelling"),
    ],
)
async def test_a_token_header_is_hidden_from_the_upstream(
    forwarder: Forwarder, route: str, header: str
) -> None:
    sent = upstream_sees(forwarder, [(header, "Bearer secret-token")], route=route)
    assert "Bearer secret-token" not in sent.values()


async def test_a_token_cookie_is_cut_out_and_the_other_cookies_kept(forwarder: Forwarder) -> None:
    sent = upstream_sees(
        forwarder,
        [("Cookie", "theme=dark; session=secret-token; lang=en"), ("Cookie", "session=other")],
        route="sources",
    )
    assert sent.getall("Cookie") == ["theme=dark; lang=en"]  # the second header is gone whole


async def test_the_headers_after_a_cookie_that_held_only_the_token_still_pass(
    forwarder: Forwarder,
) -> None:
    sent = upstream_sees(
        forwarder,
        [("Cookie", "session=secret-token"), ("X-After", "1"), ("Cookie", "lang=en")],
        route="sources",
    )
    assert sent.getall("Cookie") == ["lang=en"]
    assert sent["X-After"] == "1"


async def test_the_headers_after_a_stripped_one_still_pass(forwarder: Forwarder) -> None:
    sent = upstream_sees(forwarder, [("X-User-Sub", "spoofed"), ("X-After", "1")])
    assert "X-User-Sub" not in sent
    assert sent["X-After"] == "1"


async def test_cookies_of_a_route_without_cookie_tokens_pass_untouched(
    forwarder: Forwarder,
) -> None:
    sent = upstream_sees(forwarder, [("Cookie", "session=abc;theme=dark")], route="api")
    assert sent.getall("Cookie") == ["session=abc;theme=dark"]


async def test_forward_token_passes_every_carrier(forwarder: Forwarder) -> None:
    sent = upstream_sees(
        forwarder,
        [("Authorization", "Bearer secret-token"), ("Cookie", "session=secret-token")],
        route="forwarding",
    )
    assert sent["Authorization"] == "Bearer secret-token"
    assert sent["Cookie"] == "session=secret-token"


def _carriers(headers: set[str], cookies: set[str], query: set[str]) -> Carriers:
    return Carriers(frozenset(headers), frozenset(cookies), frozenset(query))


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        pytest.param("api", _carriers({"authorization"}, set(), set()), id="default-source"),
        pytest.param("public", _carriers({"authorization"}, set(), set()), id="public-route"),
        # Authorization is hidden even where the route reads its token elsewhere.
        pytest.param(
            "sources",
            _carriers({"authorization", "x-api-token"}, {"session"}, {"access_token"}),
            id="header-cookie-query-sources",
        ),
        pytest.param("forwarding", _carriers(set(), set(), set()), id="forward-token"),
    ],
)
def test_token_carriers(route: str, expected: Carriers) -> None:
    assert token_carriers(ROUTES[route]) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("a=1; session=t; b=2", "a=1; b=2", id="middle"),
        pytest.param("session=t", "", id="only-the-token"),
        pytest.param(" session = t ;a=1", "a=1", id="padded-name"),
        pytest.param("session=t; session=u; a=1", "a=1", id="repeated"),
        pytest.param("sessionx=1; xsession=2", "sessionx=1; xsession=2", id="similar-names-kept"),
        pytest.param("Session=1", "Session=1", id="other-case-is-another-cookie"),
        pytest.param("a=1;;b=2", "a=1; b=2", id="empty-pairs-dropped"),
        pytest.param("session", "", id="bare-name"),
    ],
)
def test_without_cookies(header: str, expected: str) -> None:
    remaining = _without_cookies(header, frozenset({"session"}))
    assert remaining == expected
    # What is left never holds a value the extractor would read as the token.
    assert cookie_values(CIMultiDictProxy(CIMultiDict({"Cookie": remaining})), "session") == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("a=1&access_token=t&b=2", "a=1&b=2", id="middle"),
        pytest.param("access_token=t", "", id="only-the-token"),
        pytest.param("access%5Ftoken=t&a=1", "a=1", id="percent-encoded-name"),
        pytest.param("access_token=t&access_token=u", "", id="repeated"),
        pytest.param("access_token", "", id="bare-name"),
        pytest.param(
            "x_access_token=1&access_tokens=2",
            "x_access_token=1&access_tokens=2",
            id="similar-names-kept",
        ),
        pytest.param("a=1&&b=2", "a=1&b=2", id="empty-pairs-dropped"),
        pytest.param("", "", id="empty"),
    ],
)
def test_without_params(query: str, expected: str) -> None:
    remaining = _without_params(query, frozenset({"access_token"}))
    assert remaining == expected
    assert query_values(remaining, "access_token") == []


# --- the request body ------------------------------------------------------------------------------
def body(*chunks: bytes, eof: bool = True) -> RequestBody:
    """A request body stream holding ``chunks`` (and its end, unless ``eof`` is false)."""
    stream = RequestBody()
    for chunk in chunks:
        stream.feed(chunk)
    if eof:
        stream.feed_eof()
    return stream


async def drain(meter: _BodyMeter) -> list[bytes]:
    chunks = []
    while chunk := await meter.next_chunk():
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize(
    ("size", "limit"),
    [
        pytest.param(10, 100, id="under"),
        pytest.param(100, 100, id="exactly-the-limit"),
        pytest.param(3 * 2**20, 0, id="no-limit"),
        pytest.param(0, 100, id="empty"),
    ],
)
async def test_a_body_within_the_limit_streams_whole(size: int, limit: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    meter = _BodyMeter(body(data), limit, gap_s=5, deadline_s=60)
    assert b"".join(await drain(meter)) == data


async def test_a_body_past_the_limit_stops_before_the_excess_is_sent() -> None:
    stream = body(eof=False)
    meter = _BodyMeter(stream, 100, gap_s=5, deadline_s=60)
    sent: list[bytes] = []
    stream.feed(b"a" * 60)
    sent.append(await meter.next_chunk())
    stream.feed(b"b" * 41)  # 101 bytes in all
    with pytest.raises(_BodyStopped) as caught:
        await meter.next_chunk()
    assert caught.value.reason is Reason.PAYLOAD_TOO_LARGE
    assert sent == [b"a" * 60]


async def test_a_stalled_body_stops_after_the_gap() -> None:
    stream = body(b"start", eof=False)
    meter = _BodyMeter(stream, 0, gap_s=0.05, deadline_s=60)
    assert await meter.next_chunk() == b"start"
    with pytest.raises(_BodyStopped) as caught:
        await asyncio.wait_for(meter.next_chunk(), 5)
    assert caught.value.reason is Reason.CLIENT_TIMEOUT


async def test_the_gap_bounds_each_wait_not_the_whole_upload() -> None:
    stream = body(eof=False)
    meter = _BodyMeter(stream, 0, gap_s=0.25, deadline_s=60)

    async def trickle() -> None:
        for _ in range(10):  # ~0.5 s in all, twice the gap
            await asyncio.sleep(0.05)
            stream.feed(b"x")
        stream.feed_eof()

    feeder = asyncio.create_task(trickle())
    assert b"".join(await drain(meter)) == b"x" * 10
    await feeder


async def test_the_deadline_bounds_the_whole_upload_however_steadily_it_drips() -> None:
    stream = body(eof=False)
    meter = _BodyMeter(stream, 0, gap_s=0.25, deadline_s=0.2)

    async def trickle() -> None:
        for _ in range(40):  # a byte every 0.05 s: never a gap, 2 s in all
            await asyncio.sleep(0.05)
            stream.feed(b"x")
        stream.feed_eof()

    feeder = asyncio.create_task(trickle())
    try:
        with pytest.raises(_BodyStopped) as caught:
            await asyncio.wait_for(drain(meter), 5)
        assert caught.value.reason is Reason.CLIENT_TIMEOUT
        assert not feeder.done()  # cut while still dripping, not at the end
    finally:
        feeder.cancel()


async def test_a_declared_length_over_the_limit_is_refused_before_the_upstream(
    forwarder: Forwarder,
) -> None:
    request = request_from(UNTRUSTED, [("Content-Length", str(BODY_LIMIT + 1))], method="POST")
    with pytest.raises(Rejection) as caught:
        await forwarder.forward(request, ROUTES["api"], "/api/orders", {})
    # Not upstream_unavailable: nothing was sent to the (closed) upstream port.
    assert caught.value.reason is Reason.PAYLOAD_TOO_LARGE
    assert caught.value.detail == f"Content-Length {BODY_LIMIT + 1} over {BODY_LIMIT}"


# --- the response's header block ------------------------------------------------------------
_RESPONSE = [
    (b"Server", b"nginx"),
    (b"X-Hop", b"1"),
    (b"CONNECTION", b"x-hop"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Content-Length", b"3"),
    (b"x-" + b"l" * 70, b"long"),
]


def upstream_at(url: str) -> Upstream:
    """``url`` as the config reads a route's upstream."""
    route = {"id": "r", "match": {"path_prefix": "/"}, "upstream": url, "auth": "none"}
    [parsed] = loads_config(yaml.safe_dump({"routes": [route]})).routes
    assert parsed.upstream is not None
    return parsed.upstream


@pytest.mark.parametrize(
    ("url", "host"),
    [
        pytest.param("http://svc", "svc", id="http-default-port"),
        pytest.param("http://svc:80", "svc", id="http-port-80-named"),
        pytest.param("https://svc", "svc", id="https-default-port"),
        pytest.param("https://svc:443", "svc", id="https-port-443-named"),
        pytest.param("http://svc:443", "svc:443", id="http-on-443"),
        pytest.param("https://svc:80", "svc:80", id="https-on-80"),
        pytest.param("http://svc:8080", "svc:8080", id="other-port"),
        pytest.param("http://127.0.0.1:9", "127.0.0.1:9", id="ipv4"),
        pytest.param("http://[::1]:8080", "[::1]:8080", id="ipv6-bracketed"),
        pytest.param("https://[2001:db8::1]", "[2001:db8::1]", id="ipv6-default-port"),
    ],
)
def test_the_upstreams_host_header_names_its_port_unless_the_schemes_default(
    url: str, host: str
) -> None:
    assert _host_header(upstream_at(url)) == host


def test_the_request_head_is_written_byte_for_byte() -> None:
    head = request_head(
        "POST",
        "/a?b=1",
        "svc:8080",
        [("X-A", "1"), ("x-b", "caf\udcc3\udca9")],
        "Content-Length: 3",
    )
    assert head == (
        b"POST /a?b=1 HTTP/1.1\r\nHost: svc:8080\r\nX-A: 1\r\nx-b: caf\xc3\xa9\r\n"
        b"Content-Length: 3\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        pytest.param("/a", [("X-A", "a\nb")], id="bare-lf-in-a-value"),
        pytest.param("/a", [("X-A", "a\rb")], id="bare-cr-in-a-value"),
        pytest.param("/a", [("X-A", "a\r\nX-Injected: 1")], id="crlf-in-a-value"),
        pytest.param("/a\r\nX: 1", [], id="crlf-in-the-target"),
    ],
)
def test_a_line_break_never_reaches_the_upstream(
    target: str, headers: list[tuple[str, str]]
) -> None:
    # The parser and the claim checks keep them out; the head writer refuses one all the same.
    with pytest.raises(Rejection) as caught:
        request_head("GET", target, "svc", headers, "")
    assert caught.value.reason is Reason.INTERNAL_ERROR
    assert caught.value.detail == "line break in an upstream header"


def test_name_lengths_is_a_bit_per_length() -> None:
    assert name_lengths(frozenset({b"te", b"connection", b"keep-alive"})) == (1 << 2) | (1 << 10)
    assert name_lengths(frozenset()) == 0
    assert name_lengths(frozenset({b"te", b"x" * 64})) == -1  # too long for a small bit set


@pytest.mark.parametrize("exact", [True, False], ids=["lengths", "every-length"])
def test_the_response_block_drops_the_named_headers_in_any_case(exact: bool) -> None:
    dropped = frozenset({b"connection", b"keep-alive", b"x-hop", b"x-" + b"l" * 70})
    lengths = name_lengths(dropped) if exact else -1
    assert response_block(_RESPONSE, dropped, lengths) == (
        b"Server: nginx\r\nContent-Length: 3\r\n"
    )
    # Without the lengths, every name is compared.
    assert response_block(_RESPONSE, dropped) == b"Server: nginx\r\nContent-Length: 3\r\n"


def test_a_name_of_a_length_no_dropped_name_has_is_kept_unread() -> None:
    dropped = frozenset({b"x-hop"})
    assert response_block(
        [(b"X-Hops", b"2"), (b"x-HOP", b"1")], dropped, name_lengths(dropped)
    ) == (b"X-Hops: 2\r\n")
