"""W3C Trace Context parsing and formatting, and the tracing config block."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import loads_config
from gateway.errors import ConfigError
from gateway.tracing import TraceContext, incoming, otel_missing, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


# --- parse_traceparent: the W3C rules ---------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
        # Only bit 0 is "sampled"; other bits are someone else's (and are not forwarded).
        (f"00-{TRACE}-{PARENT}-02", (TRACE, PARENT, False)),
        (f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-ff", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-0e", (TRACE, PARENT, False)),
        # A later version is read by its first four fields; what follows a "-" is its own.
        (f"01-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
        (f"cc-{TRACE}-{PARENT}-01-what-the-future-says", (TRACE, PARENT, True)),
        (f"fe-{TRACE}-{PARENT}-00-", (TRACE, PARENT, False)),
    ],
)
def test_valid_traceparents_parse(value: str, expected: tuple[str, str, bool]) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        VALID[:-1],  # 54 characters
        VALID + "0",  # version 00 is exactly 55
        VALID + "-",  # ... even with a dash after it
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"0g-{TRACE}-{PARENT}-01",  # version not hex
        f"0A-{TRACE}-{PARENT}-01",  # upper-case version
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case trace id
        f"00-{TRACE}-{PARENT.upper()}-01",  # upper-case parent id
        f"00-{TRACE}-{PARENT}-0A",  # upper-case flags
        f"00-{TRACE}-{PARENT}-0x",  # flags not hex
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00_{TRACE}-{PARENT}-01",  # separators
        f"00-{TRACE}_{PARENT}-01",
        f"00-{TRACE}-{PARENT}_01",
        f"00-{TRACE[:-1]}g-{PARENT}-01",  # a non-hex character at the end of the trace id
        f"00-g{TRACE[1:]}-{PARENT}-01",  # ... at its start
        f"00-{TRACE[:16]}z{TRACE[17:]}-{PARENT}-01",  # ... in its middle
        f"00-{TRACE}-{PARENT[:-1]}x-01",  # non-hex parent id
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"01-{TRACE}-{PARENT}-01x",  # a later version: after the flags, the end or a "-" only
        f"00-{TRACE}-{PARENT}-0\u0661",  # non-ASCII digit
        f"00-{TRACE[:31]}\u00e9-{PARENT}-01",
        f" 00-{TRACE}-{PARENT}-0",  # shifted by a leading space
    ],
)
def test_invalid_traceparents_do_not_parse(value: str) -> None:
    assert parse_traceparent(value) is None


# --- incoming: continue or start ----------------------------------------------------------------
def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


class FixedBits:
    """A random source that hands out the given values in turn, recording each size asked."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)
        self.asked: list[int] = []

    def __call__(self, k: int) -> int:
        self.asked.append(k)
        return self.values.pop(0)


def test_a_valid_traceparent_is_continued_with_a_new_span_id() -> None:
    bits = FixedBits(0xAB)
    trace = incoming(_headers(("Traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE")), bits)
    assert (trace.trace_id, trace.parent_id, trace.sampled) == (TRACE, PARENT, True)
    assert trace.span_id == "00000000000000ab"
    assert trace.tracestate == "congo=t61rcWkgMzE"
    assert bits.asked == [64]
    assert trace.traceparent() == f"00-{TRACE}-00000000000000ab-01"


def test_an_unsampled_parent_stays_unsampled() -> None:
    trace = incoming(_headers(("traceparent", f"00-{TRACE}-{PARENT}-00")), FixedBits(1))
    assert trace.sampled is False
    assert trace.traceparent() == f"00-{TRACE}-0000000000000001-00"
    assert trace.tracestate is None


def test_a_later_version_is_forwarded_as_version_00() -> None:
    trace = incoming(_headers(("traceparent", f"cc-{TRACE}-{PARENT}-01-x")), FixedBits(2))
    assert trace.traceparent() == f"00-{TRACE}-0000000000000002-01"


def test_repeated_tracestate_headers_are_one_list_in_order() -> None:
    trace = incoming(
        _headers(("traceparent", VALID), ("tracestate", "a=1,b=2"), ("tracestate", "c=3")),
        FixedBits(1),
    )
    assert trace.tracestate == "a=1,b=2,c=3"


def test_an_empty_tracestate_is_not_forwarded() -> None:
    trace = incoming(_headers(("traceparent", VALID), ("tracestate", "")), FixedBits(1))
    assert trace.tracestate is None


def test_a_zero_span_id_is_drawn_again() -> None:
    bits = FixedBits(0, 7)
    trace = incoming(_headers(("traceparent", VALID)), bits)
    assert trace.span_id == "0000000000000007"
    assert bits.asked == [64, 64]


NEW = (0x11 << 64) | 0x22  # a 192-bit draw: trace id 000…011, span id 000…022
NEW_TRACE = "0000000000000000000000000000" + "0011"
NEW_SPAN = "0000000000000022"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("traceparent", f"00-{TRACE}-{'0' * 16}-01"), ("tracestate", "a=1")],
        [("traceparent", "junk"), ("tracestate", "a=1")],
        # Two traceparents: which would be the parent?  Neither (W3C test suite: a new trace).
        [("traceparent", VALID), ("traceparent", VALID)],
        [("traceparent", VALID), ("traceparent", f"00-{TRACE}-{PARENT}-00")],
    ],
)
def test_a_trace_is_started_otherwise(headers: list[tuple[str, str]]) -> None:
    bits = FixedBits(NEW)
    trace = incoming(_headers(*headers), bits)
    assert bits.asked == [192]
    assert (trace.trace_id, trace.span_id) == (NEW_TRACE, NEW_SPAN)
    assert trace.parent_id is None
    assert trace.sampled is False
    assert trace.tracestate is None  # dropped with the traceparent it belonged to
    assert trace.traceparent() == f"00-{NEW_TRACE}-{NEW_SPAN}-00"


@pytest.mark.parametrize("draws", [(0x22, NEW), (0x11 << 64, NEW)])
def test_all_zero_new_ids_are_drawn_again(draws: tuple[int, int]) -> None:
    bits = FixedBits(*draws)
    trace = incoming(_headers(), bits)
    assert (trace.trace_id, trace.span_id) == (NEW_TRACE, NEW_SPAN)
    assert bits.asked == [192, 192]


def test_real_random_ids_have_the_w3c_shape() -> None:
    first, second = incoming(_headers()), incoming(_headers())
    for trace in (first, second):
        assert parse_traceparent(trace.traceparent()) == (trace.trace_id, trace.span_id, False)
    assert first.trace_id != second.trace_id
    continued = incoming(_headers(("traceparent", VALID)))
    assert len(continued.span_id) == 16
    assert continued.span_id != PARENT


def test_traceparent_formats_the_sampled_flag() -> None:
    trace = TraceContext(TRACE, None, PARENT, True, None)
    assert trace.traceparent() == VALID
    trace.sampled = False
    assert trace.traceparent() == f"00-{TRACE}-{PARENT}-00"


# --- the tracing block ---------------------------------------------------------------------------
def _config(tracing: Any, **route: Any) -> str:
    doc: dict[str, Any] = {
        "routes": [
            {
                "id": "r",
                "match": {"path_prefix": "/"},
                "upstream": "http://127.0.0.1:9",
                "auth": "none",
                **route,
            }
        ]
    }
    if tracing is not None:
        doc["tracing"] = tracing
    return yaml.safe_dump(doc)


def test_no_tracing_block_means_no_spans() -> None:
    assert loads_config(_config(None)).tracing is None


def test_tracing_block_defaults() -> None:
    config = loads_config(_config({"endpoint": "http://collector:4318/v1/traces"})).tracing
    assert config is not None
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert config.sample_ratio == 1.0
    assert config.service_name == "gateway"
    assert config.export_timeout_s == 10.0


def test_tracing_block_values() -> None:
    config = loads_config(
        _config(
            {
                "endpoint": "https://collector.example/otlp/traces",
                "sample_ratio": 0,
                "service_name": "edge",
                "export_timeout_s": 2.5,
            }
        )
    ).tracing
    assert config is not None
    assert (config.endpoint, config.sample_ratio, config.service_name) == (
        "https://collector.example/otlp/traces",
        0.0,
        "edge",
    )
    assert config.export_timeout_s == 2.5


@pytest.mark.parametrize("origin", ["http://collector:4318", "http://collector:4318/"])
def test_an_origin_gets_the_traces_path(origin: str) -> None:
    config = loads_config(_config({"endpoint": origin})).tracing
    assert config is not None
    assert config.endpoint == "http://collector:4318/v1/traces"


@pytest.mark.parametrize(
    ("tracing", "path", "says"),
    [
        ({}, "tracing.endpoint", "missing required key"),
        ({"endpoint": "collector:4318"}, "tracing.endpoint", "invalid URL"),
        ({"endpoint": "ftp://collector/v1/traces"}, "tracing.endpoint", "invalid URL"),
        ({"endpoint": "http://u:p@collector/v1/traces"}, "tracing.endpoint", "credentials"),
        ({"endpoint": "http://c", "sample_ratio": 1.5}, "tracing.sample_ratio", "0 to 1"),
        ({"endpoint": "http://c", "sample_ratio": -0.1}, "tracing.sample_ratio", "0 to 1"),
        ({"endpoint": "http://c", "sample_ratio": True}, "tracing.sample_ratio", "0 to 1"),
        ({"endpoint": "http://c", "sample_ratio": ".5"}, "tracing.sample_ratio", "0 to 1"),
        ({"endpoint": "http://c", "service_name": ""}, "tracing.service_name", "non-empty"),
        ({"endpoint": "http://c", "export_timeout_s": 0}, "tracing.export_timeout_s", "> 0"),
        ({"endpoint": "http://c", "sampler": "always"}, "tracing.sampler", "unknown key"),
        ("yes", "tracing", "a mapping"),
    ],
)
def test_bad_tracing_blocks_name_their_path(tracing: Any, path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(_config(tracing))
    assert caught.value.path == path
    assert says in str(caught.value)


@pytest.mark.parametrize(
    "module", ["opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"]
)
def test_a_tracing_block_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    # A module set to None in sys.modules does not import: as if the package were absent.
    monkeypatch.setitem(sys.modules, module, None)
    assert otel_missing() == module
    with pytest.raises(ConfigError) as caught:
        loads_config(_config({"endpoint": "http://collector:4318"}))
    assert caught.value.path == "tracing"
    assert module in str(caught.value)
    assert "pip install 'gateway[otel]'" in str(caught.value)


def test_the_extra_is_installed_here() -> None:
    assert otel_missing() is None


@pytest.mark.parametrize("name", ["traceparent", "TraceState"])
def test_a_route_cannot_inject_trace_context(name: str) -> None:
    doc = yaml.safe_load(_config(None))
    doc["routes"][0]["auth"] = {"issuers": ["i"], "audiences": ["a"]}
    doc["issuers"] = {
        "i": {
            "issuer": "https://i.example",
            "jwks_uri": "https://i.example/k",
            "algorithms": ["RS256"],
        }
    }
    doc["routes"][0]["claim_headers"] = {name: "sub"}
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(doc))
    assert "reserved" in str(caught.value)
