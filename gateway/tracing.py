"""W3C Trace Context for every request, and the optional OpenTelemetry bridge that records spans.

Propagation is always on and costs a header lookup and one random draw per request: the gateway
continues the client's ``traceparent`` (or starts a trace when there is none, or it does not
parse), names its own span id in the ``traceparent`` it forwards, passes the client's
``tracestate`` on unchanged, and logs the trace id.  A client's own ``traceparent`` and
``tracestate`` never reach the upstream (they are stripped like hop-by-hop headers), so the
upstream sees exactly one of each.

Parsing follows the W3C Trace Context recommendation (Level 1, §3.2 and §4.3):

- ``version-traceid-parentid-flags``, lower-case hex only; version ``ff`` is invalid;
- version ``00`` is exactly 55 characters;
- a later version is read leniently by its first four fields: at least 55 characters, and after
  the flags either the end or a ``-`` (whatever follows is that version's and ignored);
- an all-zero trace id or parent id is invalid;
- more than one ``traceparent`` header is invalid (which of them would be the parent?);
- when ``traceparent`` is invalid, ``tracestate`` is dropped with it (§3.3: a vendor that cannot
  parse ``traceparent`` must not use ``tracestate``).

The sampled flag the gateway forwards is its sampling decision: without OpenTelemetry the
client's flag is passed on (the gateway records nothing, the client's decision stands) and a
trace the gateway starts is forwarded unsampled; with it, the sampler's decision (parent-based:
a sampled client ``traceparent`` is honoured).

With a ``tracing:`` block (and the ``otel`` extra installed) ``Tracing`` records a server span
per request, a span for the token's verification and a client span for the upstream call,
exported over OTLP/HTTP by the SDK's batch processor.  Their attributes are route ids, issuer
ids, reason values, statuses and the path, never a token, a claim or a header value.  Nothing in
this module imports OpenTelemetry until ``build_tracing`` runs: without a ``tracing:`` block the
request path never loads it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from multidict import CIMultiDictProxy

from .headers import TRACEPARENT, TRACESTATE

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from .config import AuthPolicy, TracingConfig
    from .record import RequestRecord
    from .verifier import VerifiedToken, Verifier


_HEX: Final = "0123456789abcdef"
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_SAMPLED_DIGITS: Final = frozenset("13579bdf")  # a last flags digit with bit 0 (sampled) set

Bits = Callable[[int], int]
"""A source of random bits (``random.getrandbits``; tests pass a fixed one)."""


def _hex(text: str) -> bool:
    """Whether non-empty ``text`` is lower-case hex only (``strip`` leaves nothing)."""
    return not text.strip(_HEX)


# Version 00, the one clients send: one regex in C instead of the field-by-field checks.
_VERSION_00: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]([0-9a-f])")


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """The trace id, parent id and sampled flag of a ``traceparent`` value, or ``None`` when
    the W3C rules say it is invalid (the trace is then restarted)."""
    match = _VERSION_00.fullmatch(value)
    if match is not None:
        trace_id, parent_id, last = match.groups()
        if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
            return None
        return trace_id, parent_id, last in _SAMPLED_DIGITS
    if len(value) < 55:
        return None
    version = value[:2]
    if version == "00":
        if len(value) != 55:
            return None
    elif version == "ff" or not _hex(version) or (len(value) > 55 and value[55] != "-"):
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_hex(trace_id) and _hex(parent_id) and _hex(flags)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, flags[1] in _SAMPLED_DIGITS


class TraceContext:
    """One request's place in its trace: the trace id, the client's span (``parent_id``,
    ``None`` when the gateway started the trace), the gateway's span id that the upstream is
    told about, the sampled flag forwarded, and the client's ``tracestate``."""

    __slots__ = ("parent_id", "sampled", "span_id", "trace_id", "tracestate")

    def __init__(
        self,
        trace_id: str,
        parent_id: str | None,
        span_id: str,
        sampled: bool,
        tracestate: str | None,
    ) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate

    def traceparent(self) -> str:
        """The ``traceparent`` the upstream receives: version 00, this trace, the gateway's span."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def _span_id(bits: Bits) -> str:
    while True:
        span_id = bits(64).to_bytes(8).hex()
        if span_id != _ZERO_SPAN:
            return span_id


def incoming(headers: CIMultiDictProxy[str], bits: Bits = random.getrandbits) -> TraceContext:
    """The trace a request continues (a valid, single ``traceparent``) or starts, with a fresh
    span id for the gateway either way."""
    if TRACEPARENT in headers:
        values = headers.getall(TRACEPARENT)
        parsed = parse_traceparent(values[0]) if len(values) == 1 else None
        if parsed is not None:
            trace_id, parent_id, sampled = parsed
            states = headers.getall(TRACESTATE, ())
            # Repeated tracestate headers are one list (RFC 9110 §5.3), combined in order.
            state = ",".join(states) if states else None
            return TraceContext(trace_id, parent_id, _span_id(bits), sampled, state or None)
    while True:
        ids = bits(192).to_bytes(24).hex()  # one draw: a 128-bit trace id and a 64-bit span id
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
            return TraceContext(trace_id, None, span_id, False, None)


# --- the OpenTelemetry bridge (only with a `tracing:` block) ----------------------------------


def otel_missing() -> str | None:
    """The first OpenTelemetry module the ``tracing:`` block needs that does not import, or
    ``None`` when the ``otel`` extra is installed."""
    import importlib

    for name in (
        "opentelemetry.sdk.trace",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def build_provider(config: TracingConfig) -> TracerProvider:
    """A tracer provider for ``config``: parent-based ratio sampling, the service name as the
    resource, spans batched to the OTLP/HTTP endpoint."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=Resource.create({"service.name": config.service_name}),
        shutdown_on_exit=False,
    )
    exporter = OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout_s)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, export_timeout_millis=config.export_timeout_s * 1000)
    )
    return provider


@dataclass(slots=True)
class VerifyNotes:
    """What the verifier tells a traced verification: whether the verified-token cache answered,
    and (on a miss) whether the key was in the key cache or had to be fetched."""

    cache_hit: bool = False
    key_cached: bool | None = None


class Tracing:
    """Spans for requests, through ``provider`` (built from the config, or a test's)."""

    __slots__ = ("_context", "_kind", "_provider", "_remote", "_status", "_tracer", "key_fetches")

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, StatusCode

        self._provider = provider
        self._tracer: Tracer = provider.get_tracer("gateway")
        self._context = trace.set_span_in_context
        self._kind = SpanKind
        self._status = StatusCode
        self._remote = _remote_parent
        # Key-set fetches finished so far (the key cache's count, wired in at start).
        self.key_fetches: Callable[[], int] = lambda: 0

    def request(self, trace: TraceContext, method: str) -> RequestSpan:
        """Start the server span of a request continuing or starting ``trace``; ``trace`` then
        names that span (its trace id, span id and the sampler's decision)."""
        parent = self._remote(trace) if trace.parent_id is not None else None
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=self._kind.SERVER,
            attributes={"http.request.method": method},
        )
        _adopt(trace, span)
        return RequestSpan(self, span, trace, method)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every span ended so far (blocking: call it from a thread)."""
        return self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: call it from a thread)."""
        self._provider.shutdown()


def _remote_parent(trace: TraceContext) -> Any:
    from opentelemetry import trace as api
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    assert trace.parent_id is not None
    parent = SpanContext(
        int(trace.trace_id, 16),
        int(trace.parent_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if trace.sampled else TraceFlags.DEFAULT),
    )
    return api.set_span_in_context(NonRecordingSpan(parent))


def _adopt(trace: TraceContext, span: Span) -> None:
    """Make ``trace`` name ``span``: what is forwarded and logged is what was recorded."""
    context = span.get_span_context()
    trace.trace_id = f"{context.trace_id:032x}"
    trace.span_id = f"{context.span_id:016x}"
    trace.sampled = context.trace_flags.sampled


class RequestSpan:
    """A request's server span and its children: the verification and the upstream call."""

    __slots__ = ("_method", "_span", "_tracing", "_upstream", "trace")

    def __init__(self, tracing: Tracing, span: Span, trace: TraceContext, method: str) -> None:
        self._tracing = tracing
        self._span = span
        self.trace = trace
        self._method = method
        self._upstream: Span | None = None

    def _child(self, name: str, kind: Any, attributes: dict[str, Any]) -> Span:
        tracing = self._tracing
        return tracing._tracer.start_span(
            name, context=tracing._context(self._span), kind=kind, attributes=attributes
        )

    async def verify(
        self, verifier: Verifier, token: str, policy: AuthPolicy, route_id: str
    ) -> VerifiedToken:
        """``verifier.verify`` inside a verification span (cache hit, key fetch, issuer, reason)."""
        from .errors import Rejection

        span = self._child("verify", self._tracing._kind.INTERNAL, {"gateway.route": route_id})
        notes = VerifyNotes()
        fetches = self._tracing.key_fetches()
        try:
            verified = await verifier.verify(token, policy, notes)
        except Rejection as rejection:
            span.set_attribute("gateway.reason", rejection.reason.value)
            raise
        else:
            span.set_attribute("gateway.reason", "ok")
            span.set_attribute("gateway.issuer", verified.issuer.id)
            return verified
        finally:
            span.set_attribute("gateway.token_cache.hit", notes.cache_hit)
            if notes.key_cached is not None:
                span.set_attribute("gateway.jwks.key_cached", notes.key_cached)
                # The key was not cached and a key-set fetch finished while this verification
                # waited for it (joined or started; none if the refetch cooldown refused one).
                if not notes.key_cached and self._tracing.key_fetches() != fetches:
                    span.add_event("jwks_fetch")
            span.end()

    def upstream(self, route_id: str, host: str, port: int) -> None:
        """Start the upstream call's client span; the ``traceparent`` forwarded names it."""
        self._upstream = span = self._child(
            self._method,
            self._tracing._kind.CLIENT,
            {
                "gateway.route": route_id,
                "http.request.method": self._method,
                "server.address": host,
                "server.port": port,
            },
        )
        _adopt(self.trace, span)

    def upstream_answered(self, status: int) -> None:
        """The upstream's response head arrived with ``status``."""
        if self._upstream is not None:
            self._upstream.set_attribute("http.response.status_code", status)
            if status >= 500:
                self._upstream.set_status(self._tracing._status.ERROR)

    def end(self, record: RequestRecord, path: str, error: bool) -> None:
        """End the upstream span (if any) and the server span, with what the record says."""
        from .reasons import Reason

        reason = record.reason.value
        upstream = self._upstream
        if upstream is not None:
            if record.reason is not Reason.OK:
                upstream.set_attribute("gateway.reason", reason)
                if error:
                    upstream.set_status(self._tracing._status.ERROR)
            upstream.end()
            self._upstream = None
        span = self._span
        span.update_name(f"{self._method} {record.route}")
        attributes: dict[str, Any] = {
            "gateway.route": record.route,
            "gateway.reason": reason,
            "url.path": path,
        }
        if record.status is not None:
            attributes["http.response.status_code"] = record.status
        if record.issuer is not None:
            attributes["gateway.issuer"] = record.issuer
        if record.caller is not None:
            attributes["gateway.caller"] = record.caller
        span.set_attributes(attributes)
        if error:
            span.set_status(self._tracing._status.ERROR)
        span.end()
