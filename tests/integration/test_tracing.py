"""Tracing end to end: W3C trace context through the gateway (always on), and with a ``tracing:``
block the spans a request produced, exported over OTLP/HTTP to a real receiver on loopback
(decoded with opentelemetry-proto): their parent links, their attributes, and no token in them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from yarl import URL

from gateway.app import GATEWAY_KEY
from gateway.tracing import parse_traceparent
from tests.conftest import RunningGateway, bearer
from tests.fakes import FakeClock, FakeIdP, SigningKey, generate_key
from tests.integration.authkit import logged, send_raw
from tests.integration.e2e_helpers import free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def traceparent(flags: str = "01", trace: str = TRACE, span: str = CLIENT_SPAN) -> str:
    return f"00-{trace}-{span}-{flags}"


def upstream_trace_headers(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every traceparent and tracestate value the echo upstream received, in order."""
    pairs = body["headers"]
    return (
        [v for k, v in pairs if k.lower() == "traceparent"],
        [v for k, v in pairs if k.lower() == "tracestate"],
    )


# --- propagation, without a tracing block -------------------------------------------------------
@pytest.mark.parametrize("flags", ["01", "00"])
async def test_a_valid_traceparent_is_continued_under_the_gateways_span(
    gateway, token, flags, decisions
):
    response = await gateway.client.get(
        "/api/orders",
        headers=bearer(token()) | {"traceparent": traceparent(flags), "tracestate": "k=v,a=b"},
    )
    assert response.status == 200
    parents, states = upstream_trace_headers(await response.json())
    [forwarded] = parents
    parsed = parse_traceparent(forwarded)
    assert parsed is not None
    trace_id, parent_id, sampled = parsed
    assert trace_id == TRACE
    assert parent_id != CLIENT_SPAN  # the gateway's own span, not the client's
    assert forwarded.startswith("00-")
    assert forwarded.endswith(f"-{flags}")
    assert sampled is (flags == "01")
    assert states == ["k=v,a=b"]  # unchanged
    assert logged(decisions)["trace_id"] == TRACE


@pytest.mark.parametrize(
    "value",
    [
        "junk",
        traceparent(trace="0" * 32),
        traceparent(span="0" * 16),
        traceparent().upper(),
        "ff" + traceparent()[2:],
        traceparent() + "-extra",  # version 00 has nothing after the flags
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace(gateway, token, value, decisions):
    response = await gateway.client.get(
        "/api/orders", headers=bearer(token()) | {"traceparent": value, "tracestate": "k=v"}
    )
    assert response.status == 200
    parents, states = upstream_trace_headers(await response.json())
    [forwarded] = parents
    parsed = parse_traceparent(forwarded)
    assert parsed is not None
    trace_id, parent_id, sampled = parsed
    assert trace_id != TRACE
    assert parent_id != CLIENT_SPAN
    assert sampled is False  # the gateway records nothing: it does not claim it did
    assert states == []  # the tracestate went with its invalid traceparent
    assert logged(decisions)["trace_id"] == trace_id


async def test_no_traceparent_starts_a_trace_and_logs_it(gateway, token, decisions):
    response = await gateway.client.get("/api/orders", headers=bearer(token()))
    [forwarded], states = upstream_trace_headers(await response.json())
    parsed = parse_traceparent(forwarded)
    assert parsed is not None
    assert states == []
    assert logged(decisions)["trace_id"] == parsed[0]


async def test_the_client_cannot_make_the_gateway_forward_two_traceparents(gateway, decisions):
    headers = [
        ("traceparent", traceparent()),
        ("Traceparent", traceparent(span="1111111111111111")),
        ("tracestate", "k=v"),
    ]
    response = await send_raw(gateway.client, "GET", "/public/x", headers)
    parents, states = upstream_trace_headers(json.loads(response.body))
    [forwarded] = parents  # exactly one: the gateway's
    parsed = parse_traceparent(forwarded)
    assert parsed is not None
    assert parsed[0] != TRACE  # two parents are no parent: a new trace (W3C test suite)
    assert states == []
    assert logged(decisions)["trace_id"] == parsed[0]


async def test_repeated_tracestate_headers_reach_the_upstream_as_one(gateway):
    headers = [("traceparent", traceparent()), ("tracestate", "a=1"), ("TraceState", "b=2")]
    response = await send_raw(gateway.client, "GET", "/public/x", headers)
    parents, states = upstream_trace_headers(json.loads(response.body))
    assert len(parents) == 1
    assert states == ["a=1,b=2"]


async def test_a_rejected_request_logs_the_clients_trace_id(gateway, decisions, upstream):
    response = await gateway.client.get("/api/orders", headers={"traceparent": traceparent()})
    assert response.status == 401
    assert "traceparent" not in response.headers
    assert upstream.hits == 0
    assert logged(decisions)["trace_id"] == TRACE


def forward_auth(document: dict[str, Any]) -> None:
    document["mode"] = "forward_auth"
    document["trusted_proxies"] = ["127.0.0.1/32"]


async def test_forward_auth_logs_the_callers_trace_and_answers_without_one(
    make_gateway, token, decisions
):
    fa = await make_gateway(forward_auth)
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/api/x", "traceparent": traceparent()}
    response = await fa.client.get("/auth/nginx", headers=headers | bearer(token()))
    assert response.status == 200
    # The caller sends the request upstream itself, under its own span: a traceparent in the
    # answer could be copied next to it (two parents) or replace it (a wrong parent).
    assert "traceparent" not in response.headers
    assert logged(decisions)["trace_id"] == TRACE


# --- spans, with a tracing block ----------------------------------------------------------------
def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass
class Received:
    """One exported span, as the receiver decoded it."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[str]
    status: int


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP traces endpoint: decodes every ExportTraceServiceRequest it is sent."""

    spans: list[Received] = field(default_factory=list)
    posts: int = 0
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()

        async def traces(request: web.Request) -> web.Response:
            assert request.content_type == "application/x-protobuf"
            message = ExportTraceServiceRequest.FromString(await request.read())
            self.posts += 1
            for resource_spans in message.resource_spans:
                service = _attributes(resource_spans.resource.attributes)["service.name"]
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Received(
                                service,
                                span.name,
                                span.kind,
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                _attributes(span.attributes),
                                [event.name for event in span.events],
                                span.status.code,
                            )
                        )
            self.arrived.set()
            return web.Response(
                body=ExportTraceServiceResponse().SerializeToString(),
                content_type="application/x-protobuf",
            )

        app.router.add_post("/v1/traces", traces)
        return app

    async def wait_for(self, enough: Callable[[list[Received]], bool]) -> list[Received]:
        """The spans once ``enough`` holds for them (a bounded wait, no sleeping)."""
        async with asyncio.timeout(10):
            while not enough(self.spans):
                self.arrived.clear()
                await self.arrived.wait()
        return self.spans

    def of_trace(self, trace_id: str) -> list[Received]:
        return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> OtlpReceiver:
    fake = OtlpReceiver()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/v1/traces"))
    return fake


def tracing_to(receiver: OtlpReceiver, **settings: Any) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        document["tracing"] = {"endpoint": receiver.url, "service_name": "edge", **settings}

    return edit


async def flush(gateway: RunningGateway) -> None:
    """Export every span ended so far (the SDK's force_flush blocks: run it off the loop,
    which serves the receiver meanwhile)."""
    tracing = gateway.app[GATEWAY_KEY].tracing
    assert tracing is not None
    assert await asyncio.to_thread(tracing.force_flush, 10_000)


SERVER, CLIENT, INTERNAL = (
    ProtoSpan.SpanKind.SPAN_KIND_SERVER,
    ProtoSpan.SpanKind.SPAN_KIND_CLIENT,
    ProtoSpan.SpanKind.SPAN_KIND_INTERNAL,
)


def one(spans: list[Received], kind: int, name: str | None = None) -> Received:
    [span] = [s for s in spans if s.kind == kind and (name is None or s.name == name)]
    return span


def no_token_in(spans: list[Received], secret: str) -> None:
    for span in spans:
        for value in (span.name, *span.attributes.values(), *span.events):
            assert secret not in str(value)
            # Nor any of its segments (the signed payload carries the claims).
            for segment in secret.split("."):
                assert segment not in str(value)


async def test_spans_of_an_allowed_request_hang_under_the_clients_span(
    make_gateway, token, receiver, upstream
):
    gateway = await make_gateway(tracing_to(receiver))
    jwt = token(email="alice@example.com")
    sent = bearer(jwt) | {"traceparent": traceparent(), "tracestate": "k=v"}
    response = await gateway.client.get("/api/orders?q=secret", headers=sent)
    assert response.status == 200
    [forwarded], states = upstream_trace_headers(await response.json())
    await flush(gateway)
    spans = await receiver.wait_for(lambda got: len(got) >= 3)
    assert len(spans) == 3
    assert {s.trace_id for s in spans} == {TRACE}
    assert {s.service for s in spans} == {"edge"}
    server = one(spans, SERVER)
    verify = one(spans, INTERNAL, "verify")
    client = one(spans, CLIENT)
    assert server.parent_id == CLIENT_SPAN
    assert verify.parent_id == server.span_id
    assert client.parent_id == server.span_id
    # The upstream's spans hang under the gateway's upstream call, sampled as the client said.
    assert forwarded == f"00-{TRACE}-{client.span_id}-01"
    assert states == ["k=v"]
    assert server.name == "GET api"
    assert server.attributes == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "url.path": "/api/orders",
        "gateway.route": "api",
        "gateway.reason": "ok",
        "gateway.issuer": "test",
    }
    assert verify.attributes == {
        "gateway.route": "api",
        "gateway.reason": "ok",
        "gateway.issuer": "test",
        "gateway.token_cache.hit": False,
        "gateway.jwks.key_cached": True,
    }
    assert verify.events == []
    assert client.name == "GET"
    assert client.attributes["gateway.route"] == "api"
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == URL(upstream.url).port
    assert client.status == Status.STATUS_CODE_UNSET
    no_token_in(spans, jwt)
    for span in spans:
        assert "alice" not in str(span.attributes)
        assert "secret" not in str(span.attributes)


async def test_the_second_request_with_a_token_is_a_cache_hit(make_gateway, token, receiver):
    gateway = await make_gateway(tracing_to(receiver))
    jwt = token()
    for _ in range(2):
        response = await gateway.client.get("/api/orders", headers=bearer(jwt))
        assert response.status == 200
    await flush(gateway)
    spans = await receiver.wait_for(lambda got: len(got) >= 6)
    verifies = [s for s in spans if s.name == "verify"]
    assert [v.attributes["gateway.token_cache.hit"] for v in verifies] == [False, True]
    assert "gateway.jwks.key_cached" not in verifies[1].attributes  # no key lookup on a hit
    # Two requests without a traceparent: two traces, each started by the gateway.
    servers = [s for s in spans if s.kind == SERVER]
    assert len({s.trace_id for s in servers}) == 2
    assert all(s.parent_id == "" for s in servers)
    no_token_in(spans, jwt)


async def test_a_401_names_its_reason_and_calls_no_upstream(
    make_gateway, token, receiver, clock: FakeClock
):
    gateway = await make_gateway(tracing_to(receiver))
    jwt = token(exp=clock.time() - 3600)
    response = await gateway.client.get(
        "/api/orders", headers=bearer(jwt) | {"traceparent": traceparent()}
    )
    assert response.status == 401
    await flush(gateway)
    spans = await receiver.wait_for(lambda got: len(got) >= 2)
    assert len(spans) == 2
    server = one(spans, SERVER)
    verify = one(spans, INTERNAL, "verify")
    assert verify.parent_id == server.span_id
    assert server.attributes["gateway.reason"] == "token_expired"
    assert server.attributes["http.response.status_code"] == 401
    assert "gateway.issuer" not in server.attributes
    assert verify.attributes["gateway.reason"] == "token_expired"
    assert server.status == Status.STATUS_CODE_UNSET  # a client's mistake is not an error
    no_token_in(spans, jwt)


async def test_an_unreachable_upstream_is_an_error_on_both_spans(make_gateway, receiver):
    port = free_port()

    def dead_upstream(document: dict[str, Any]) -> None:
        for route in document["routes"]:
            route["upstream"] = f"http://127.0.0.1:{port}"

    gateway = await make_gateway(tracing_to(receiver), dead_upstream)
    response = await gateway.client.get("/public/x")
    assert response.status == 502
    await flush(gateway)
    spans = await receiver.wait_for(lambda got: len(got) >= 2)
    server, client = one(spans, SERVER), one(spans, CLIENT)
    assert client.parent_id == server.span_id
    assert client.attributes["gateway.reason"] == "upstream_unavailable"
    assert "http.response.status_code" not in client.attributes
    assert server.attributes["http.response.status_code"] == 502
    assert client.status == server.status == Status.STATUS_CODE_ERROR


async def test_a_key_fetch_is_an_event_of_the_verification(
    make_gateway, idp: FakeIdP, rsa_key: SigningKey, clock: FakeClock, token, receiver
):
    gateway = await make_gateway(tracing_to(receiver))
    rotated = generate_key("RS256", "rotated")
    idp.publish(rsa_key, rotated)
    # Within the refetch cooldown an unknown kid fetches nothing: no event, key_not_found.
    response = await gateway.client.get("/api/orders", headers=bearer(token(rotated)))
    assert response.status == 401
    clock.advance(31)  # past jwks_refetch_cooldown_s: the unknown kid is fetched for
    response = await gateway.client.get("/api/orders", headers=bearer(token(rotated)))
    assert response.status == 200
    await flush(gateway)
    spans = await receiver.wait_for(lambda got: len(got) >= 5)
    refused, fetched = [s for s in spans if s.name == "verify"]
    assert refused.attributes["gateway.reason"] == "key_not_found"
    assert refused.attributes["gateway.jwks.key_cached"] is False
    assert refused.events == []
    assert fetched.attributes["gateway.reason"] == "ok"
    assert fetched.attributes["gateway.jwks.key_cached"] is False
    assert fetched.events == ["jwks_fetch"]


async def test_sampling_is_parent_based(make_gateway, token, receiver, upstream):
    gateway = await make_gateway(tracing_to(receiver, sample_ratio=0))
    unsampled = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    # Ratio 0: a trace the gateway starts is not sampled, nor one the client did not sample.
    started = await gateway.client.get("/public/a")
    [started_parent], _ = upstream_trace_headers(await started.json())
    declined = await gateway.client.get(
        "/public/b", headers={"traceparent": traceparent("00", trace=unsampled)}
    )
    [declined_parent], _ = upstream_trace_headers(await declined.json())
    # ... but a client's sampled trace is honoured.
    honoured = await gateway.client.get("/public/c", headers={"traceparent": traceparent()})
    [honoured_parent], _ = upstream_trace_headers(await honoured.json())
    await flush(gateway)
    spans = await receiver.wait_for(lambda got: len(got) >= 2)
    assert {s.trace_id for s in spans} == {TRACE}  # force_flush exported everything ended
    assert started_parent.endswith("-00")
    assert declined_parent.startswith(f"00-{unsampled}-")
    assert declined_parent.endswith("-00")
    assert declined_parent != traceparent("00", trace=unsampled)  # still the gateway's span id
    client = one(spans, CLIENT)
    assert honoured_parent == f"00-{TRACE}-{client.span_id}-01"


async def test_forward_auth_records_the_decision_under_the_callers_span(
    make_gateway, token, receiver
):
    def forward_auth_traced(document: dict[str, Any]) -> None:
        forward_auth(document)
        tracing_to(receiver)(document)

    fa = await make_gateway(forward_auth_traced)
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/api/x", "traceparent": traceparent()}
    jwt = token()
    response = await fa.client.get("/auth/nginx", headers=headers | bearer(jwt))
    assert response.status == 200
    assert "traceparent" not in response.headers
    await flush(fa)
    spans = await receiver.wait_for(lambda got: len(got) >= 2)
    assert len(spans) == 2  # no upstream call in this mode
    server, verify = one(spans, SERVER), one(spans, INTERNAL, "verify")
    assert server.parent_id == CLIENT_SPAN
    assert verify.parent_id == server.span_id
    assert server.attributes["gateway.caller"] == "nginx"
    assert server.attributes["url.path"] == "/api/x"
    assert server.attributes["gateway.route"] == "api"
    no_token_in(spans, jwt)


async def test_spans_still_queued_are_exported_on_shutdown(make_gateway, receiver):
    gateway = await make_gateway(tracing_to(receiver))
    response = await gateway.client.get("/public/x", headers={"traceparent": traceparent()})
    assert response.status == 200
    assert receiver.spans == []  # batched: nothing sent yet
    await gateway.shut_down()  # the app's clean-up shuts the provider down, off the loop
    spans = await receiver.wait_for(lambda got: len(got) >= 2)
    assert {s.trace_id for s in spans} == {TRACE}
