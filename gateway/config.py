"""The configuration: YAML read once, checked completely, and frozen into typed objects.

``load_config(path)`` is the only way in.  Every check happens here, so the
request path never reads a dict and never re-validates.  A problem raises
``ConfigError`` whose message names the YAML path, the bad value and what was
expected, e.g.::

    routes[1].auth.issuers[0]: unknown issuer 'crop'; expected one of: corp

Each key is declared once, on the field it fills (``setting``/``optional``/``required`` from
schema.py): its kind (type with range or allowed set), its default and one line of
documentation.  The reader, the JSON Schema (``gateway schema``) and the README's reference
table (``gateway schema --markdown``) all come from those declarations.  A section's builder
adds only the rules between keys (at most one key set, values in order).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

import yaml

from .errors import ConfigError, JwksFetchError
from .headers import (
    AUTH_OUTCOME_HEADER,
    CLIENT_ORIGIN_HEADERS,
    FORWARDED_HEADERS,
    FORWARDED_PREFIX,
    HOP_BY_HOP_HEADERS,
    METHOD_OVERRIDE_HEADERS,
    REQUEST_ID_HEADER,
    RESERVED_HEADERS,
    header_key,
)
from .keyset import build_key_set, private_members
from .schema import (
    Boolean,
    Choice,
    Custom,
    Integer,
    Key,
    Nested,
    Node,
    Ratio,
    Seconds,
    Section,
    Text,
    Values,
    file_path,
    json_schema,
    optional,
    reference_table,
    required,
    setting,
    show,
)

# RFC 7518 asymmetric algorithms PyJWT verifies.  `none` and HS* are never accepted:
# HMAC keyed with a public JWK is the algorithm-confusion attack.
ASYMMETRIC_ALGORITHMS: Final = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip

_ROUTE_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ISSUER_ID: Final = _ROUTE_ID
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_CLAIM_SEGMENT: Final = re.compile(r"[^.\s]+")
_METHOD: Final = re.compile(r"[A-Z]+")
_HOST: Final = re.compile(
    r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_COOKIE_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUERY_NAME: Final = re.compile(r"[A-Za-z0-9_.~-]+")
_TYP: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}(?:/[A-Za-z0-9!#$&^_.+-]{1,64})?")
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token
_REALM: Final = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")  # fits a quoted-string unescaped
_LOOPBACK_NAMES: Final = frozenset({"localhost"})

_PORT: Final = Integer(0, 65535)
_SECONDS: Final = Seconds()
_STRING: Final = {"type": "string", "minLength": 1}
_STRINGS: Final = {"type": "array", "items": _STRING}


@dataclass(frozen=True)
class _Context:
    """What reading one part of the file needs from the rest (rides on every ``Node``)."""

    base_dir: Path | None
    issuers: Mapping[str, IssuerConfig] | None = None
    limits: Limits | None = None
    mode: GatewayMode | None = None
    issuer_id: str = ""


def _context(node: Node) -> _Context:
    context = node.context
    assert isinstance(context, _Context)
    return context


def _within(node: Node, **changes: Any) -> Node:
    """The same node, with more known about where it sits."""
    return Node(node.value, node.path, dataclasses.replace(_context(node), **changes))


# --- shared kinds ---------------------------------------------------------------------
def _read_file_path(node: Node) -> Path:
    """A file that must exist and be readable at load (relative to the config file's folder)."""
    path = file_path(node, "a file path")
    try:
        path.read_bytes()
    except OSError as exc:
        raise node.fail(f"cannot read {str(path)!r}: {exc.strerror}", "a readable file") from None
    return path


_FILE: Final = Custom(_read_file_path, _STRING)


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_url(node: Node, *, what: str, https_only: bool, origin_only: bool) -> SplitResult:
    text = node.string(what=what)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise node.fail(f"invalid URL {text!r}", what) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise node.fail(f"invalid URL {text!r}", what)
    if https_only and parts.scheme != "https" and not _is_loopback(parts.hostname):
        raise node.fail(f"{text!r} is not https", "an https URL (plain http only for loopback)")
    if parts.username or parts.password:
        raise node.fail(f"{text!r} carries credentials", "a URL without user:password")
    if origin_only and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise node.fail(
            f"{text!r} has a path, query or fragment",
            "an origin such as http://orders.internal:8080 (the request path is forwarded as is)",
        )
    return parts


def is_secure_url(url: str) -> bool:
    """Whether ``url`` is https, or plain http to a loopback host (tests, sidecars)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return False
    if not parts.hostname or parts.username or parts.password:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname))


def file_signature(path: Path) -> tuple[int, int] | None:
    """What changes when a file is rewritten or its symlink swapped (Kubernetes ConfigMaps and
    Secrets): the config file itself and the certificate files it names are watched by it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def _read_header_name(node: Node) -> str:
    return node.string(pattern=_HEADER_NAME, what="a valid HTTP header name")


# --- listen, admin ----------------------------------------------------------------------
class ClientCertMode(enum.StrEnum):
    """Whether the TLS listener asks clients for a certificate."""

    OPTIONAL = "optional"  # verified against client_ca_file when sent; none is accepted
    REQUIRED = "required"  # no verified certificate, no handshake


def _read_tls_version(node: Node) -> str:
    # An unquoted 1.2 is a YAML float: the same answer as "1.2".
    value = f"{node.value:.1f}" if isinstance(node.value, float) else node.value
    return Node(value, node.path).choice(["1.2", "1.3"])


@dataclass(frozen=True, slots=True)
class ListenTls:
    """The listener's certificate (re-read on SIGHUP and on change) and client certificates."""

    cert_file: Path = required(
        _FILE,
        "serve HTTPS with this PEM certificate chain (relative to the config file; checked with "
        "`key_file` as a pair at load). Re-read on SIGHUP and within 2 s of either file changing, "
        "without a restart: new handshakes get the new certificate; a pair that does not load is "
        "logged (`event=tls_reload result=failure`) and the running one kept",
    )
    key_file: Path = required(_FILE, "the certificate's private key (PEM)")
    min_version: str = setting(
        "1.2",
        Custom(_read_tls_version, {"enum": ["1.2", "1.3", 1.2, 1.3]}),
        "`1.2` or `1.3`; nothing older is ever accepted",
    )
    client_ca_file: Path | None = optional(
        _FILE, "PEM bundle client certificates are verified against (changing it needs a restart)"
    )
    client_cert: ClientCertMode = setting(
        ClientCertMode.OPTIONAL,
        Choice(ClientCertMode),
        "with `client_ca_file`: `optional` (a certificate, when sent, must verify) or `required` "
        "(no verified certificate, no handshake)",
    )


def _build_listen_tls(values: Values) -> ListenTls:
    tls = ListenTls(**values.fields())
    if values.given("client_cert") and tls.client_ca_file is None:
        raise values.node.child("client_ca_file").fail(
            "missing", "the CA bundle that client certificates are verified against"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            str(tls.cert_file), str(tls.key_file)
        )
    except ssl.SSLError:
        raise values.node.child("cert_file").fail(
            "the certificate and key do not load as a pair", "a PEM certificate chain and its key"
        ) from None
    return tls


LISTEN_TLS: Final = Section(
    "listen_tls", ListenTls, doc="HTTPS on the proxy listener.", build=_build_listen_tls
)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the proxy listens, whether with TLS, and how long it drains on shutdown."""

    # A proxy listens on all interfaces by default.
    host: str = setting("0.0.0.0", Text(), "proxy listener address")  # noqa: S104
    port: int = setting(8080, _PORT, "proxy listener port")
    shutdown_timeout_s: float = setting(
        15.0,  # below Kubernetes' 30 s default grace period
        _SECONDS,
        "on SIGTERM/SIGINT, requests in flight get this long",
    )
    tls: ListenTls | None = optional(Nested(LISTEN_TLS), "serve HTTPS", shown="— (plain HTTP)")


LISTEN: Final = Section("listen", ListenConfig, doc="The proxy listener.")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where /metrics, /healthz and /readyz are served (a separate listener)."""

    # Metrics stay off the public interface unless asked.
    host: str = setting("127.0.0.1", Text(), "admin listener (`/metrics`, `/healthz`, `/readyz`)")
    port: int = setting(9100, _PORT, "admin listener port")


ADMIN: Final = Section("admin", AdminConfig, doc="The admin listener.")


def _read_traces_endpoint(node: Node) -> str:
    parts = _read_url(
        node, what="an http(s) OTLP/HTTP traces URL", https_only=False, origin_only=False
    )
    endpoint = node.string()
    if parts.path in ("", "/") and not parts.query:
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return endpoint


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where spans go (OTLP/HTTP), which share of new traces is sampled, and the service name."""

    endpoint: str = required(
        Custom(_read_traces_endpoint, {**_STRING, "pattern": "^https?://"}),
        "the OTLP/HTTP traces URL spans are exported to (an origin gets `/v1/traces`), e.g. "
        "`http://otel-collector:4318`",
    )
    sample_ratio: float = setting(
        1.0,
        Ratio(),
        "share of the traces the gateway starts that are recorded (0 to 1); a client's "
        "sampled flag in `traceparent` stands",
    )
    service_name: str = setting("gateway", Text(), "`service.name` of the spans")
    export_timeout_s: float = setting(
        10.0, _SECONDS, "longest one batch export to the endpoint may take"
    )


def _build_tracing(values: Values) -> TracingConfig:
    from .tracing import otel_missing  # imports OpenTelemetry: only with a tracing block

    missing = otel_missing()
    if missing is not None:
        raise values.node.fail(
            f"needs OpenTelemetry, but {missing} is not installed",
            "the otel extra: pip install 'gateway[otel]'",
        )
    return TracingConfig(**values.fields())


TRACING: Final = Section(
    "tracing",
    TracingConfig,
    doc="OpenTelemetry spans, exported over OTLP/HTTP (needs the otel extra).",
    build=_build_tracing,
)


# --- limits, upstream defaults ------------------------------------------------------------
_CONNECTIONS: Final = Integer(1, 1_000_000)
_BODY_BYTES: Final = Integer(0, 2**62)
_QUEUE: Final = Integer(0, 1_000_000)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may ask of the gateway; each has a safe default."""

    max_header_bytes: int = setting(
        16384,  # aiohttp's default is 8190
        Integer(1024, 1024 * 1024),
        "longest request line or header line; longer gets 431 `headers_too_large` (the whole "
        "head is also bounded, at 4 times this or 64 KiB, whichever is more)",
    )
    max_headers: int = setting(
        100,  # nginx and Envoy allow about this many
        Integer(8, 10_000),
        "most request headers; more gets 431 `headers_too_large`",
    )
    client_idle_timeout_s: float = setting(
        30.0,
        _SECONDS,
        "a connection with no complete request header for this long (at its start or between "
        "requests, however its bytes trickle) is closed: the idle keep-alive and slow-header "
        "timeout",
    )
    client_body_timeout_s: float = setting(
        30.0,
        _SECONDS,
        "longest gap while a request body arrives; then 408 `client_timeout` and the upstream "
        "request is aborted",
    )
    client_body_deadline_s: float = setting(
        300.0,
        _SECONDS,
        "longest a whole request body may take to arrive, however steadily it drips; then 408 "
        "`client_timeout` likewise",
    )
    client_write_timeout_s: float = setting(
        30.0,
        _SECONDS,
        "longest one write of a response may wait for a client that stopped reading; then the "
        "connection is closed, the upstream connection and admission slot freed, and the "
        "request logged `client_timeout`",
    )
    max_connections: int = setting(
        10_000,
        _CONNECTIONS,
        "client connections open at once, per process (each `--workers` process has its own); "
        "one more is answered 503 `too_many_connections` and closed",
    )
    tunnel_idle_timeout_s: float = setting(
        300.0,
        _SECONDS,
        "an upgraded connection (WebSocket) on which no byte moved either way for this long is "
        "closed",
    )
    tunnel_max_duration_s: float = setting(
        0.0,
        Seconds(allow_zero=True),
        "longest an upgraded connection lives, however busy (0: no limit)",
    )
    max_body_bytes: int = setting(
        10 * 1024 * 1024,
        _BODY_BYTES,
        "default request-body limit of every route; larger gets 413 `payload_too_large` (by "
        "`Content-Length` at once, or while a chunked body streams). 0: no limit",
    )
    max_concurrent_requests: int = setting(
        1024, _CONNECTIONS, "default bound on requests in flight to one route's upstream"
    )
    max_queued_requests: int = setting(
        1024,
        _QUEUE,
        "default bound on requests waiting for one of those slots; beyond it, 503 "
        "`upstream_overloaded` at once",
    )


LIMITS: Final = Section("limits", Limits, doc="What one client may ask of the gateway.")
_DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class UpstreamDefaults:
    """Timeouts and pool size for every upstream hop."""

    connect_timeout_s: float = setting(
        2.0, _SECONDS, "TCP connect timeout to upstreams (504 when exceeded)"
    )
    timeout_s: float = setting(
        30.0,  # aiohttp's own default is 300 s total: far too long
        _SECONDS,
        "longest wait for any read from an upstream, response headers included",
    )
    max_connections: int = setting(
        256,
        Integer(1, 100_000),
        "pooled keep-alive connections per upstream host:port, shared by every route naming it",
    )
    pool_timeout_s: float = setting(
        5.0,
        _SECONDS,
        "longest wait for a free pooled connection when all `max_connections` are busy; then "
        "503 `upstream_overloaded`",
    )


UPSTREAM_DEFAULTS: Final = Section(
    "upstream_defaults", UpstreamDefaults, doc="Timeouts and pool size for every upstream hop."
)


# --- issuers ---------------------------------------------------------------------------
def _read_algorithms(node: Node, what: str = "a JWKS issuer") -> frozenset[str]:
    algs: list[str] = []
    for item in node.seq(non_empty=True):
        alg = item.string()
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise item.fail(
                f"unsafe algorithm {alg!r} for {what}",
                f"one of: {', '.join(ASYMMETRIC_ALGORITHMS)}",
            )
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise item.fail(
                f"unknown algorithm {alg!r}", f"one of: {', '.join(ASYMMETRIC_ALGORITHMS)}"
            )
        algs.append(alg)
    return frozenset(algs)


_ALGORITHMS_SCHEMA: Final = {
    "type": "array", "minItems": 1, "items": {"enum": list(ASYMMETRIC_ALGORITHMS)},
}  # fmt: skip


def _read_jwks_uri(node: Node) -> str:
    _read_url(node, what="an https URL", https_only=True, origin_only=False)
    return node.string()


def _read_typ(node: Node) -> str:
    return node.string(pattern=_TYP, what="a media type such as at+jwt")


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted identity provider with its pinned algorithms and key-cache settings."""

    id: str  # the key under `issuers:`
    issuer: str = required(
        Text(what="the issuer URL exactly as tokens carry it in 'iss'"),
        "must equal the token's `iss` exactly; each URL configured once",
    )
    # None: found by OpenID discovery, unless the set is static.
    jwks_uri: str | None = optional(
        Custom(_read_jwks_uri, {**_STRING, "format": "uri"}),
        "`https://` (plain `http://` only for loopback hosts); absent (with no "
        "`jwks_file`/`jwks`): OpenID discovery from `issuer`",
        shown="discovery",
        bare=True,
    )
    algorithms: frozenset[str] = required(
        Custom(_read_algorithms, _ALGORITHMS_SCHEMA),
        "non-empty subset of RS256/384/512, PS256/384/512, ES256/384/512, EdDSA; `none` and "
        "`HS*` are refused",
    )
    leeway_s: float = setting(
        30.0,
        # A typo such as 1e9 would switch expiry checks off (Envoy allows 60).
        Seconds(allow_zero=True, at_most=600.0),
        "clock skew allowed on `exp`, `nbf`, `iat` (at most 600)",
    )
    jwks_cache_ttl_s: float = setting(
        300.0, _SECONDS, "key-set lifetime when the JWKS response declares none"
    )
    jwks_cache_min_ttl_s: float = setting(
        60.0,  # an IdP's max-age=0 must not mean a fetch per request
        _SECONDS,
        "lower clamp of a declared lifetime (`max-age=0` must not mean a fetch per request); "
        "by default 60, or `jwks_cache_ttl_s` when that is shorter",
    )
    jwks_cache_max_ttl_s: float = setting(
        3600.0,
        _SECONDS,
        "upper clamp: a retired key is trusted at most this long after removal; by default "
        "3600, or `jwks_cache_ttl_s` when that is longer",
    )
    jwks_refetch_cooldown_s: float = setting(
        30.0,
        _SECONDS,
        "minimum gap between unknown-kid refetches (≤ `jwks_cache_ttl_s`, which is also its "
        "default when shorter than 30)",
    )
    jwks_fetch_timeout_s: float = setting(
        3.0, _SECONDS, "fetch timeout, and the longest a request waits for a fetch"
    )
    jwks_refresh_ahead_s: float = setting(
        30.0,
        Seconds(allow_zero=True),
        "background refresh this long before expiry (< `jwks_cache_ttl_s`; by default at most "
        "half of it)",
    )
    jwks_max_stale_s: float = setting(
        21600.0,
        Seconds(allow_zero=True),
        "while fetches fail, the last set serves this long past its expiry; then 503",
    )
    jwks_max_bytes: int = setting(
        512 * 1024,  # real key sets are a few KB
        Integer(1024, 16 * 1024 * 1024),
        "larger JWKS responses are failed fetches",
    )
    jwks_refresh_interval_s: float | None = optional(
        _SECONDS,
        "also refresh this often (seconds, > 0), conditionally: a 304 costs ~nothing, a retired "
        "key is dropped within one interval",
        shown="off (the lifetime)",
    )
    static_jwks: str | None = None  # canonical JSON of a jwks_file / inline jwks: never fetched
    required_for_readiness: bool = setting(
        True, Boolean(), "`/readyz` waits for this issuer's keys"
    )
    # None: typ absent, JWT or at+jwt; else exactly this (RFC 9068: at+jwt).
    typ: str | None = optional(
        Custom(_read_typ, {**_STRING, "pattern": f"^(?:{_TYP.pattern})$"}),
        "the one header `typ` accepted, e.g. `at+jwt`",
        shown="any of JWT/at+jwt/absent",
    )


def _read_static_jwks(values: Values, issuer_id: str, algorithms: frozenset[str]) -> str | None:
    """A static key set (``jwks_file`` or inline ``jwks``), checked for usable keys at load."""
    node = values.node
    if node.has("jwks_file"):
        where = node.child("jwks_file")
        path: Path = values.get("jwks_file")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise where.fail(f"cannot read {str(path)!r}: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError):
            raise where.fail(f"{str(path)!r} is not JSON", "a JWKS document") from None
    elif node.has("jwks"):
        where = node.child("jwks")
        document = where.value
    else:
        return None
    try:
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        raise where.fail(
            "not plain JSON data", "a JWKS of maps, lists, strings and numbers"
        ) from None
    # Private keys are refused by name; HMAC secrets (`k`) too, once the set is known to have a
    # usable key (an HMAC key never is one, so a set of them is reported as such).
    _refuse_private_keys(where, document, secrets=False)
    try:
        build_key_set(json.loads(canonical), issuer_id, algorithms)
    except JwksFetchError as exc:
        raise where.fail(
            exc.detail, "a JWKS with at least one key usable with 'algorithms'"
        ) from None
    _refuse_private_keys(where, document, secrets=True)
    return canonical


def _refuse_private_keys(where: Node, document: Any, *, secrets: bool) -> None:
    """A static set must not carry private keys (``secrets``: nor symmetric ones): fail at the
    key (inline) or at the file."""
    keys = document.get("keys") if isinstance(document, dict) else None
    for index, jwk in enumerate(keys if isinstance(keys, list) else []):
        members = private_members(jwk)
        if not members or (not secrets and jwk.get("kty") == "oct"):
            continue
        at = where.child("keys").child(index) if where.value is document else where  # inline
        kid = jwk.get("kid")
        raise at.fail(
            f"key {index}{f' (kid {kid!r})' if isinstance(kid, str) else ''} carries private key "
            f"members {', '.join(members)}",
            "public keys only: remove the key, or publish its public half",
        )


def _build_issuer(values: Values) -> IssuerConfig:
    node = values.node
    sources = [k for k in ("jwks_uri", "jwks_file", "jwks") if node.has(k)]
    if len(sources) > 1:
        raise node.fail(
            f"both {sources[0]!r} and {sources[1]!r} are set",
            "at most one of jwks_uri, jwks_file, jwks (none: OpenID discovery from 'issuer')",
        )
    iss: str = values.get("issuer")
    issuer_id = _context(node).issuer_id
    algorithms: frozenset[str] = values.get("algorithms")
    values.get("jwks_uri")
    static = _read_static_jwks(values, issuer_id, algorithms)
    if not sources and not is_secure_url(iss):
        raise node.child("issuer").fail(
            f"{iss!r} cannot be used for OpenID discovery",
            "an https issuer URL (plain http only for loopback), or jwks_uri/jwks_file/jwks",
        )
    # Defaults that follow a configured lifetime, so that one short or long TTL alone is valid.
    ttl: float = values.get("jwks_cache_ttl_s")
    min_ttl: float = (
        values.get("jwks_cache_min_ttl_s") if node.has("jwks_cache_min_ttl_s") else min(60.0, ttl)
    )
    max_ttl: float = (
        values.get("jwks_cache_max_ttl_s") if node.has("jwks_cache_max_ttl_s") else max(3600.0, ttl)
    )
    if not min_ttl <= ttl <= max_ttl:
        raise node.fail(
            f"cache lifetimes min {min_ttl:g}, default {ttl:g}, max {max_ttl:g} are out of order",
            "jwks_cache_min_ttl_s <= jwks_cache_ttl_s <= jwks_cache_max_ttl_s",
        )
    cooldown: float = (
        values.get("jwks_refetch_cooldown_s")
        if node.has("jwks_refetch_cooldown_s")
        else min(30.0, ttl)
    )
    if cooldown > ttl:
        raise node.child("jwks_refetch_cooldown_s").fail(
            f"{cooldown:g} is longer than jwks_cache_ttl_s ({ttl:g})", "a value <= jwks_cache_ttl_s"
        )
    ahead: float = (
        values.get("jwks_refresh_ahead_s")
        if node.has("jwks_refresh_ahead_s")
        else min(30.0, ttl / 2)
    )
    if ahead >= ttl:
        raise node.child("jwks_refresh_ahead_s").fail(
            f"{ahead:g} is not shorter than jwks_cache_ttl_s ({ttl:g})",
            "a value < jwks_cache_ttl_s",
        )
    values.get("typ")
    return IssuerConfig(
        **values.fields(
            id=issuer_id,
            jwks_cache_min_ttl_s=min_ttl,
            jwks_cache_max_ttl_s=max_ttl,
            jwks_refetch_cooldown_s=cooldown,
            jwks_refresh_ahead_s=ahead,
            static_jwks=static,
        )
    )


ISSUER: Final = Section(
    "issuer",
    IssuerConfig,
    doc="A trusted identity provider: its iss, pinned algorithms and key-cache settings.",
    extra=(
        Key(
            "jwks_file",
            Custom(lambda n: file_path(n, "a path to a JWKS JSON file"), _STRING),
            "path to a static JWKS JSON file (relative to the config file), read and checked at "
            "load (a key with private members is an error); never fetched",
            None,
        ),
        Key(
            "jwks",
            Custom(lambda n: n.value, {"type": "object", "required": ["keys"]}),
            "an inline static JWKS (`{keys: [...]}`); at most one of `jwks_uri`, `jwks_file`, "
            "`jwks`",
            None,
        ),
    ),
    build=_build_issuer,
    rules={"not": {"anyOf": [
        {"required": ["jwks_uri", "jwks_file"]},
        {"required": ["jwks_uri", "jwks"]},
        {"required": ["jwks_file", "jwks"]},
    ]}},
)  # fmt: skip


def _read_issuers(node: Node) -> Mapping[str, IssuerConfig]:
    if not isinstance(node.value, dict) or not node.value:
        raise node.fail(f"got {show(node.value)}", "a mapping of issuer id to issuer settings")
    issuers: dict[str, IssuerConfig] = {}
    seen_urls: dict[str, str] = {}
    for issuer_id, child in node.items():
        if not _ISSUER_ID.fullmatch(issuer_id):
            raise child.fail(f"invalid issuer id {issuer_id!r}", f"to match {_ISSUER_ID.pattern}")
        issuer = ISSUER.read(_within(child, issuer_id=issuer_id))
        if issuer.issuer in seen_urls:
            raise child.child("issuer").fail(
                f"{issuer.issuer!r} is already issuer '{seen_urls[issuer.issuer]}'",
                "each issuer URL configured once",
            )
        seen_urls[issuer.issuer] = issuer_id
        issuers[issuer_id] = issuer
    return MappingProxyType(issuers)


# --- routes: match -----------------------------------------------------------------------
def _read_path(node: Node) -> str:
    path = node.string(what="a path starting with '/'")
    if not path.startswith("/") or any(c in path for c in "?#%\\; \t") or "//" in path:
        raise node.fail(f"invalid path {path!r}", "a plain path starting with '/'")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise node.fail(f"invalid path {path!r}", "a path without dot segments")
    return path


_PATH: Final = Custom(_read_path, {**_STRING, "pattern": "^/"})


def _read_methods(node: Node) -> frozenset[str]:
    methods = {
        item.string(pattern=_METHOD, what="an upper-case HTTP method such as GET")
        for item in node.seq(non_empty=True)
    }
    if "GET" in methods:
        # RFC 9110 §9.3.2: HEAD is GET without the body, so the route that judges GET judges
        # HEAD too; otherwise HEAD would fall through to a looser route below.
        methods.add("HEAD")
    return frozenset(methods)


def _read_hosts(node: Node) -> tuple[frozenset[str], tuple[str, ...]]:
    hosts: set[str] = set()
    suffixes: list[str] = []
    for item in node.seq(non_empty=True):
        host = item.string(
            pattern=_HOST, what="a host name such as api.example.com or *.example.com"
        )
        if host.startswith("*."):
            suffixes.append(host[1:].lower())
        else:
            hosts.add(host.lower())
    return frozenset(hosts), tuple(suffixes)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a request must look like to take a route (routing.py does the matching)."""

    path: str | None = optional(_PATH, "exact raw path", shown="one of", bare=True)
    path_prefix: str | None = optional(
        _PATH,
        "whole-segment prefix: `/api` matches `/api` and `/api/x`, not `/apix`; `/` matches all",
        shown="one of",
        bare=True,
    )
    methods: frozenset[str] = setting(
        frozenset(),
        Custom(
            _read_methods,
            {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[A-Z]+$"}},
        ),
        "upper-case methods; `GET` brings `HEAD` along",
        shown="any",
    )
    hosts: frozenset[str] = frozenset()  # exact names, lower-case; empty means any
    host_suffixes: tuple[str, ...] = ()  # from "*.example.com": ".example.com"


def _build_match(values: Values) -> RouteMatch:
    node = values.node
    if node.has("path") == node.has("path_prefix"):
        raise node.fail("exactly one of 'path' or 'path_prefix' must be set")
    prefix = values.get("path_prefix")
    if prefix is not None and prefix != "/" and prefix.endswith("/"):
        raise node.child("path_prefix").fail(
            f"{prefix!r} ends with '/'",
            "a prefix without a trailing slash (matching is per segment)",
        )
    hosts, suffixes = values.get("hosts")
    return RouteMatch(**values.fields(hosts=hosts, host_suffixes=suffixes))


MATCH: Final = Section(
    "match",
    RouteMatch,
    doc="What a request must look like to take the route.",
    extra=(
        Key(
            "hosts",
            Custom(_read_hosts, {"type": "array", "minItems": 1, "items": _STRING}),
            "host names (`Host` without port, case-insensitive); `*.example.com` matches any "
            "subdomain",
            (frozenset(), ()),
            shown="any",
        ),
    ),
    build=_build_match,
    rules={"oneOf": [{"required": ["path"]}, {"required": ["path_prefix"]}]},
)


# --- routes: upstream ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How the gateway checks an https upstream and proves itself to it (mTLS)."""

    verify: bool = setting(
        True,
        Boolean(),
        "check the upstream's certificate chain and name (TLS 1.2 or newer always); `false` is "
        "an explicit opt-out and cannot be combined with `ca_file`/`server_name`",
    )
    ca_file: Path | None = optional(
        _FILE,
        "PEM bundle of the CAs to trust for this upstream (relative to the config file); "
        "checked readable at load",
        shown="system store",
    )
    server_name: str | None = optional(
        Text(what="a DNS name"),
        "the name sent as SNI and required in the certificate (for an upstream addressed by IP "
        "or a Service name)",
        shown="the URL's host",
    )
    cert_file: Path | None = optional(
        _FILE, "a client certificate (PEM, with `key_file`): mutual TLS to the service"
    )
    key_file: Path | None = optional(_FILE, "the client certificate's key (PEM, with `cert_file`)")


def _build_upstream_tls(values: Values) -> UpstreamTls:
    tls = UpstreamTls(**values.fields())
    node = values.node
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        raise node.child(missing).fail("missing", "cert_file and key_file together (mutual TLS)")
    if not tls.verify and (tls.ca_file is not None or tls.server_name is not None):
        raise node.child("verify").fail(
            "false with ca_file or server_name", "verify: true when a CA or name is given"
        )
    return tls


UPSTREAM_TLS: Final = Section(
    "upstream_tls",
    UpstreamTls,
    doc="How an https upstream is checked, and the client certificate shown to it.",
    build=_build_upstream_tls,
)


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream origin: scheme, host and port only; the request path is forwarded as is."""

    url: str
    scheme: str
    host: str
    port: int
    tls: UpstreamTls | None = None  # https only; None: verified against the system store


def _upstream_at(url: Node, tls: UpstreamTls | None, where: Node) -> Upstream:
    parts = _read_url(url, what="an http(s) origin URL", https_only=False, origin_only=True)
    if tls is not None and parts.scheme != "https":
        raise where.child("tls").fail("set for an http:// upstream", "an https:// url")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    assert parts.hostname is not None
    return Upstream(
        url=url.string().rstrip("/"), scheme=parts.scheme, host=parts.hostname, port=port, tls=tls
    )


_ORIGIN: Final = {**_STRING, "pattern": "^https?://"}
UPSTREAM: Final = Section(
    "upstream",
    None,
    doc="An upstream origin with its TLS settings.",
    extra=(
        Key("url", Custom(lambda n: n, _ORIGIN), "the origin, as for a plain `upstream`"),
        Key("tls", Nested(UPSTREAM_TLS), "TLS settings of an `https://` upstream", None),
    ),
    build=lambda values: _upstream_at(values.get("url"), values.get("tls"), values.node),
)


def _read_upstream(node: Node) -> Upstream:
    """An origin URL, or a mapping of ``url`` and ``tls`` (CA, name, client certificate)."""
    if isinstance(node.value, dict):
        return UPSTREAM.read(node)
    return _upstream_at(node, None, node)


# --- routes: auth ----------------------------------------------------------------------------
class AuthMode(enum.StrEnum):
    """How a route treats tokens."""

    REQUIRED = "required"  # no valid token, no entry
    OPTIONAL = "optional"  # no token: forwarded without identity; an invalid token: rejected
    REPORT_ONLY = "report-only"  # verified, counted and logged, but forwarded whatever the outcome


class BindingMode(enum.StrEnum):
    """Whether a route asks for sender-constrained tokens (DPoP, certificate-bound)."""

    OFF = "off"  # not checked (a DPoP-bound token as Bearer is refused all the same)
    ALLOWED = "allowed"  # a bound token must prove its binding; an unbound token still passes
    REQUIRED = "required"  # only bound tokens, with their proof


def _read_binding(node: Node) -> BindingMode:
    # YAML 1.1 reads a bare `off` as false: the same answer.
    if node.value is False:
        return BindingMode.OFF
    return BindingMode(node.choice([m.value for m in BindingMode]))


_BINDING: Final = Custom(_read_binding, {"enum": [*(m.value for m in BindingMode), False]})


class GatewayMode(enum.StrEnum):
    """What the listener does with an admitted request."""

    PROXY = "proxy"  # forward it to the route's upstream
    # Answer the caller's check (nginx auth_request, Envoy ext_authz, Traefik ForwardAuth) with
    # the decision and the claim headers; the caller proxies.
    FORWARD_AUTH = "forward_auth"


class TokenLocation(enum.StrEnum):
    """Where a route looks for its token."""

    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class TokenSource:
    """One place a token may come from; ``prefix`` (headers only) is matched case-insensitively."""

    location: TokenLocation
    name: str
    prefix: str = ""


BEARER_HEADER: Final = TokenSource(TokenLocation.HEADER, "Authorization", "Bearer ")


def _build_token_source(values: Values) -> TokenSource:
    node = values.node
    kinds = [loc for loc in TokenLocation if node.has(loc.value)]
    if len(kinds) != 1:
        raise node.fail("needs exactly one of header, cookie, query")
    location = kinds[0]
    if node.has("prefix") and location is not TokenLocation.HEADER:
        raise node.child("prefix").fail("a prefix applies to headers only")
    name: str = values.get(location.value)
    if location is TokenLocation.HEADER:
        if name.lower() in HOP_BY_HOP_HEADERS or name.lower() in ("host", "cookie"):
            raise node.child("header").fail(
                f"header {name!r} cannot carry a token", "an end-to-end header"
            )
        return TokenSource(location, name, values.get("prefix"))
    return TokenSource(location, name)


TOKEN_SOURCE: Final = Section(
    "token_source",
    None,
    doc="One place a token may come from: a header (with a prefix), a cookie or a query parameter.",
    extra=(
        Key(
            "header",
            Custom(_read_header_name, _STRING),
            "a request header carrying the token",
            None,
            shown="one of",
        ),
        Key(
            "prefix",
            Text(),
            "with `header`: what precedes the token, matched case-insensitively (`Bearer `)",
            "",
        ),
        Key("cookie", Text(_COOKIE_NAME), "a cookie carrying the token", None, shown="one of"),
        Key(
            "query",
            Text(_QUERY_NAME),
            "a query parameter carrying the token (the query is then forwarded without it)",
            None,
            shown="one of",
        ),
    ),
    build=_build_token_source,
    rules={"oneOf": [{"required": ["header"]}, {"required": ["cookie"]}, {"required": ["query"]}]},
)


class MatchOp(enum.StrEnum):
    """How a claim matcher compares."""

    EQUALS = "equals"  # the claim equals the one value
    ONE_OF = "one_of"  # the claim equals one of the values
    CONTAINS = "contains"  # the claim (a list, or a space-delimited string) contains the value


@dataclass(frozen=True, slots=True)
class ClaimMatcher:
    """A condition on a verified claim; failing it answers 403 like a missing scope."""

    path: tuple[str, ...]
    op: MatchOp
    values: tuple[str | int | bool, ...]

    def describe(self) -> str:
        """A short human form, e.g. ``realm_access.roles contains admin``."""
        shown = ",".join(str(v) for v in self.values)
        return f"{'.'.join(self.path)} {self.op.value} {shown}"


def _read_claim_path(node: Node) -> tuple[str, ...]:
    """A claim path: ``org.tenant_id`` (dotted) or a list of names, for names that contain dots
    or are URLs (``["https://example.com/roles"]``)."""
    if isinstance(node.value, list):
        return tuple(item.string(what="a claim name") for item in node.seq(non_empty=True))
    claim = node.string(
        what="a claim name, a dotted path such as org.tenant_id, or a list of names"
    )
    segments = tuple(claim.split("."))
    if not all(_CLAIM_SEGMENT.fullmatch(s) for s in segments):
        raise node.fail(
            f"invalid claim path {claim!r}",
            "a dotted path such as org.tenant_id (a list of names for names with dots)",
        )
    return segments


_CLAIM_PATH: Final = Custom(
    _read_claim_path,
    {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": _STRING},
        ]
    },
)


def _read_scalar(node: Node) -> str | int | bool:
    value = node.value
    if isinstance(value, bool | int | str) and value != "":
        return value
    raise node.fail(f"got {show(value)}", "a string, integer or boolean")


_SCALAR_SCHEMA: Final = {"oneOf": [_STRING, {"type": "integer"}, {"type": "boolean"}]}
_SCALAR: Final = Custom(_read_scalar, _SCALAR_SCHEMA)


def _build_matcher(values: Values) -> ClaimMatcher:
    node = values.node
    given = [op for op in MatchOp if node.has(op.value)]
    if len(given) != 1:
        raise node.fail(
            "needs exactly one comparison",
            f"one of: {', '.join(sorted(op.value for op in MatchOp))}",
        )
    op = given[0]
    found = values.get(op.value)
    claim_values = found if op is MatchOp.ONE_OF else (found,)
    return ClaimMatcher(values.get("path"), op, claim_values)


CLAIM_MATCHER: Final = Section(
    "claim_matcher",
    None,
    doc="A condition on a verified claim: `path` and exactly one comparison.",
    extra=(
        Key(
            "path",
            _CLAIM_PATH,
            "the claim: a dotted path (`realm_access.roles`) or a list of names",
        ),
        Key("equals", _SCALAR, "the claim equals this value", None, shown="one of"),
        Key(
            "one_of",
            Custom(
                lambda n: tuple(_read_scalar(v) for v in n.seq(non_empty=True)),
                {"type": "array", "minItems": 1, "items": _SCALAR_SCHEMA},
            ),
            "the claim equals one of these values",
            None,
            shown="one of",
        ),
        Key(
            "contains",
            _SCALAR,
            "the claim (a list, or a space-delimited string) contains this value",
            None,
            shown="one of",
        ),
    ),
    build=_build_matcher,
    rules={"oneOf": [{"required": [op.value]} for op in MatchOp]},
)


def _read_matchers(node: Node) -> tuple[ClaimMatcher, ...]:
    return tuple(CLAIM_MATCHER.read(item) for item in node.seq(non_empty=True))


def _read_scope_list(node: Node) -> frozenset[str]:
    return frozenset(
        item.string(pattern=_SCOPE_TOKEN, what="a scope token") for item in node.seq(non_empty=True)
    )


_SCOPE_LIST: Final = Custom(_read_scope_list, {"type": "array", "minItems": 1, "items": _STRING})


def _build_scope_sets(values: Values) -> tuple[frozenset[str], bool]:
    if len(values.node.value) != 1:
        raise values.node.fail("needs exactly one of all_of, any_of")
    any_of = values.given("any_of")
    return values.get("any_of" if any_of else "all_of"), any_of


SCOPE_SETS: Final = Section(
    "scope_sets",
    None,
    doc="Scopes a token must be granted: every one (`all_of`) or one of them (`any_of`).",
    extra=(
        Key("all_of", _SCOPE_LIST, "every one must be granted", None, shown="one of"),
        Key("any_of", _SCOPE_LIST, "one of them suffices", None, shown="one of"),
    ),
    build=_build_scope_sets,
    rules={"oneOf": [{"required": ["all_of"]}, {"required": ["any_of"]}]},
)


def _read_scopes(node: Node) -> tuple[frozenset[str], bool]:
    """``[a, b]`` or ``{all_of: [a, b]}`` (every one), or ``{any_of: [a, b]}`` (one suffices)."""
    if isinstance(node.value, dict):
        return SCOPE_SETS.read(node)
    return _read_scope_list(node), False


def _read_token_sources(node: Node) -> tuple[TokenSource, ...]:
    sources = tuple(TOKEN_SOURCE.read(item) for item in node.seq(non_empty=True))
    if len({(s.location, s.name.lower()) for s in sources}) != len(sources):
        raise node.fail("a token source is listed twice")
    return sources


def _read_route_issuers(node: Node) -> tuple[IssuerConfig, ...]:
    issuers = _context(node).issuers or {}
    known = ", ".join(sorted(issuers))
    chosen: list[IssuerConfig] = []
    for item in node.seq(non_empty=True):
        name = item.string()
        if name not in issuers:
            raise item.fail(f"unknown issuer {name!r}", f"one of: {known}")
        if issuers[name] in chosen:
            raise item.fail(f"issuer {name!r} listed twice")
        chosen.append(issuers[name])
    return tuple(chosen)


def _read_audiences(node: Node) -> frozenset[str] | None:
    if node.value == "any":
        return None
    if not isinstance(node.value, list):
        raise node.fail(f"got {show(node.value)}", "a list of audiences, or 'any'")
    return frozenset(item.string() for item in node.seq(non_empty=True))


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """What a token must satisfy on a route.

    ``audiences`` is ``None`` only when the YAML said ``audiences: any``.
    """

    issuers: tuple[IssuerConfig, ...] = required(
        Custom(_read_route_issuers, {"type": "array", "minItems": 1, "items": _STRING}),
        "issuer ids this route trusts",
    )
    audiences: frozenset[str] | None = required(
        Custom(
            _read_audiences,
            {"oneOf": [{"const": "any"}, {"type": "array", "minItems": 1, "items": _STRING}]},
        ),
        "the token's `aud` must contain one of these; `any` disables the check explicitly",
    )
    required_claims: tuple[str, ...] = setting(
        (),
        Custom(lambda n: tuple(item.string() for item in n.seq()), _STRINGS),
        "claims that must be present and non-null",
    )
    required_scopes: frozenset[str] = frozenset()
    scopes_any_of: bool = False  # required_scopes: one suffices instead of all
    claim_matchers: tuple[ClaimMatcher, ...] = setting(
        (),
        Custom(
            _read_matchers,
            {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/claim_matcher"}},
            (("[]", CLAIM_MATCHER),),
        ),
        "conditions on claims, each `{path: P, equals: V}`, `{path: P, one_of: [V...]}` or "
        "`{path: P, contains: V}`; else 403",
        key="claims",
    )
    forward_token: bool = setting(
        False,
        Boolean(),
        "forward the `Authorization` header upstream. Off by default: the upstream gets "
        "verified identity headers, and a compromised or logging upstream cannot replay the "
        "caller's token elsewhere",
    )
    mode: AuthMode = setting(
        AuthMode.REQUIRED,
        Choice(AuthMode),
        "`required`, `optional` (no token: forwarded without identity) or `report-only` "
        "(forwarded whatever the outcome)",
    )
    dpop: BindingMode = setting(
        BindingMode.OFF,
        _BINDING,
        "DPoP (RFC 9449): `required` (only `Authorization: DPoP` with a valid `DPoP` proof "
        "and a token whose `cnf.jkt` is the proof's key), `allowed` (that, or a token with no "
        "binding as Bearer) or `off`. A DPoP-bound token sent as Bearer is refused on every "
        "route",
    )
    certificate_bound: BindingMode = setting(
        BindingMode.OFF,
        _BINDING,
        "certificate-bound tokens (RFC 8705): `required` (the token's `cnf.x5t#S256` must be "
        "the SHA-256 of the client certificate), `allowed` (checked when the token has one) or "
        "`off`. Needs `listen.tls.client_ca_file` or `client_cert_header`",
    )
    token_sources: tuple[TokenSource, ...] = setting(
        (BEARER_HEADER,),
        Custom(
            _read_token_sources,
            {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/token_source"}},
            (("[]", TOKEN_SOURCE),),
        ),
        "where the token is looked for; a request may carry only one token",
        key="token_from",
        shown='`[{header: Authorization, prefix: "Bearer "}]`',
    )


def _build_auth(values: Values) -> AuthPolicy:
    values.get("issuers")
    values.get("audiences")
    values.get("required_claims")
    scopes, any_of = values.get("required_scopes")
    return AuthPolicy(**values.fields(required_scopes=scopes, scopes_any_of=any_of))


AUTH: Final = Section(
    "auth",
    AuthPolicy,
    doc="What a token must satisfy on the route.",
    extra=(
        Key(
            "required_scopes",
            Custom(
                _read_scopes,
                {"oneOf": [
                    {"type": "array", "minItems": 1, "items": _STRING},
                    {"$ref": "#/$defs/scope_sets"},
                ]},
                (("", SCOPE_SETS),),
            ),
            "all must be granted (`scope` space-delimited string, or `scp` list/string); "
            "`{any_of: [...]}` for one of them; else 403",
            (frozenset(), False),
            shown="`[]`",
        ),
    ),
    build=_build_auth,
)  # fmt: skip


def _read_auth(node: Node) -> AuthPolicy | None:
    if node.value == "none":
        return None
    if node.value is None:
        raise node.fail(
            "missing", "'none' for a public route, or a mapping with issuers and audiences"
        )
    return AUTH.read(node)


# --- routes: claim headers, rewrite ------------------------------------------------------------
class ClaimFormat(enum.StrEnum):
    """How a claim header renders lists and objects."""

    CSV = "csv"  # lists of scalars comma-joined, objects as compact JSON
    JSON = "json"  # compact JSON


@dataclass(frozen=True, slots=True)
class ClaimHeader:
    """One injected header: its name, the claim path (``org.tenant_id`` → ``("org", "tenant_id")``)
    and how lists and objects are rendered (``csv``: lists comma-joined; ``json``: compact JSON)."""

    header: str
    claim: tuple[str, ...]
    format: ClaimFormat = ClaimFormat.CSV


CLAIM_HEADER: Final = Section(
    "claim_header",
    None,
    doc="A claim header with its rendering.",
    extra=(
        Key("claim", _CLAIM_PATH, "the claim name, dotted path or list of names"),
        Key(
            "format",
            Choice(ClaimFormat),
            "`csv`: lists of scalars comma-joined; `json`: the header is JSON text",
            ClaimFormat.CSV,
        ),
    ),
    build=lambda values: (values.get("claim"), values.get("format")),
)


def _read_owned_header_name(node: Node, header: str) -> str:
    node.string(pattern=_HEADER_NAME, what="a valid HTTP header name")
    lower = header.lower()
    if (
        lower in RESERVED_HEADERS
        or lower in FORWARDED_HEADERS
        or lower in CLIENT_ORIGIN_HEADERS
        or lower in METHOD_OVERRIDE_HEADERS
        or lower.startswith(FORWARDED_PREFIX)
        or lower == AUTH_OUTCOME_HEADER.lower()
        or lower == REQUEST_ID_HEADER.lower()  # the gateway's own: the one it logs
    ):
        raise node.fail(f"header {header!r} is reserved", "a header the gateway does not own")
    return header


def _read_claim_headers(node: Node) -> tuple[ClaimHeader, ...]:
    if not isinstance(node.value, dict):
        raise node.fail(f"got {show(node.value)}", "a mapping of header name to claim path")
    out: list[ClaimHeader] = []
    seen: set[str] = set()
    for header, child in node.items():
        _read_owned_header_name(Node(header, child.path), header)
        if header.lower() in seen:
            raise Node(header, child.path).fail(
                f"header {header!r} is listed twice (names are case-insensitive)"
            )
        seen.add(header.lower())
        if isinstance(child.value, dict):
            claim, fmt = CLAIM_HEADER.read(child)
        else:
            claim, fmt = _read_claim_path(child), ClaimFormat.CSV
        out.append(ClaimHeader(header=header, claim=claim, format=fmt))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """What replaces the matched ``path_prefix`` in the forwarded path (``""`` strips it)."""

    prefix: str
    replacement: str


def _build_rewrite(values: Values) -> str:
    node = values.node
    if node.has("strip_prefix") == node.has("replace_prefix"):
        raise node.fail("needs exactly one of strip_prefix, replace_prefix")
    if node.has("strip_prefix"):
        if not values.get("strip_prefix"):
            raise node.child("strip_prefix").fail("false does nothing", "true, or no rewrite")
        return ""
    replacement: str = values.get("replace_prefix")
    return "" if replacement == "/" else replacement


REWRITE: Final = Section(
    "rewrite",
    None,
    doc="How the matched path_prefix changes in the forwarded path.",
    extra=(
        Key(
            "strip_prefix",
            Boolean(),
            "`true`: remove the matched `path_prefix` from the forwarded path",
            None,
            shown="one of",
        ),
        Key(
            "replace_prefix",
            _PATH,
            "replace the matched `path_prefix` with this path",
            None,
            shown="one of",
        ),
    ),
    build=_build_rewrite,
    rules={"oneOf": [{"required": ["strip_prefix"]}, {"required": ["replace_prefix"]}]},
)


# --- routes ------------------------------------------------------------------------------------
class EscapedSlashes(enum.StrEnum):
    """What a route does with ``%2F`` in the path."""

    REJECT = "reject"  # 400 request_rejected
    KEEP = "keep"  # matched as data, forwarded unchanged


_UPSTREAM_KIND: Final = Custom(
    _read_upstream,
    {"oneOf": [_ORIGIN, {"$ref": "#/$defs/upstream"}]},
    (("", UPSTREAM),),
)
_AUTH_KIND: Final = Custom(
    _read_auth, {"oneOf": [{"const": "none"}, {"$ref": "#/$defs/auth"}]}, (("", AUTH),)
)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route: how it is matched, where it goes and what it requires."""

    id: str = required(
        Text(_ROUTE_ID, "a lower-case id such as orders_read"),
        "unique, `[a-z0-9][a-z0-9_-]*`; the `route` metric label",
    )
    match: RouteMatch = required(Nested(MATCH), "what a request must look like to take the route")
    # None only in forward_auth mode (the caller proxies).
    upstream: Upstream | None = optional(
        _UPSTREAM_KIND,
        "origin only (`http://host:port` or `https://…`); the raw path and query are forwarded "
        "as received. Or a mapping `{url, tls}`. Not needed in `forward_auth` mode (one given is "
        "unused)",
        shown="required",
        bare=True,
    )
    auth: AuthPolicy | None = required(
        _AUTH_KIND, "`none` for a public route (must be explicit), else the mapping below"
    )  # None only for an explicit `auth: none`
    claim_headers: tuple[ClaimHeader, ...] = setting(
        (),
        Custom(
            _read_claim_headers,
            {"type": "object", "additionalProperties": {"oneOf": [
                _CLAIM_PATH.schema(), {"$ref": "#/$defs/claim_header"}
            ]}},
            ((".<header>", CLAIM_HEADER),),
        ),
        "header name → claim name, dotted path (`org.tenant_id`), list of names, or `{claim: "
        "..., format: csv|json}`. Strings as is (sent as UTF-8, to the upstream in proxy "
        "mode and in the answer in forward-auth mode), integers and integral floats in decimal, "
        "booleans `true`/`false`, lists of scalars comma-joined (or JSON with `format: json`), "
        "objects as compact JSON; absent claims leave the header out. A header carries the "
        "checked value or nothing: a value with C0/C1 controls (tab included), U+2028/U+2029, "
        "a lone surrogate or leading/trailing whitespace is `claim_invalid`, and so is, in "
        "`format: csv`, a list item that would not read back as itself (one containing a comma "
        'or a quote, an empty or padded one: `["user,admin","dev"]` never reads as three '
        "roles). Use `format: json` for lists whose items may hold such characters: the header "
        "is then JSON text, with those characters escaped, that decodes to exactly the checked "
        "value. These names are stripped from every inbound request on every route. Reserved "
        "names (`Authorization`, `Host`, `Content-Length`, `Cookie`, hop-by-hop, "
        "`X-Forwarded-*`, `X-Request-ID`…) are refused",
        shown="`{}`",
    )  # fmt: skip
    rewrite: PathRewrite | None = optional(
        Custom(
            lambda n: PathRewrite("", REWRITE.read(n)),
            {"$ref": "#/$defs/rewrite"},
            (("", REWRITE),),
        ),
        "change the matched `match.path_prefix` in the forwarded path",
    )
    payload_header: str | None = optional(
        Custom(lambda n: _read_owned_header_name(n, n.value), _STRING),
        "a header carrying the verified payload (base64url JSON); stripped inbound everywhere",
    )
    cors_preflight: bool = setting(
        False, Boolean(), "let CORS preflight `OPTIONS` requests through without a token"
    )
    max_body_bytes: int = setting(
        _DEFAULT_LIMITS.max_body_bytes,
        _BODY_BYTES,
        "this route's request-body limit",
        shown="`limits.max_body_bytes`",
    )
    max_concurrent_requests: int = setting(
        _DEFAULT_LIMITS.max_concurrent_requests,
        _CONNECTIONS,
        "this route's in-flight bound",
        shown="`limits.max_concurrent_requests`",
    )
    max_queued_requests: int = setting(
        _DEFAULT_LIMITS.max_queued_requests,
        _QUEUE,
        "this route's queue bound",
        shown="`limits.max_queued_requests`",
    )
    # `escaped_slashes: keep`: %2F is matched as data and forwarded unchanged (Envoy's
    # path_with_escaped_slashes_action KEEP_UNCHANGED); default `reject` answers 400.
    keep_escaped_slashes: bool = False


def _build_route(values: Values) -> RouteConfig:
    node = values.node
    context = _context(node)
    if context.mode is GatewayMode.PROXY and not node.has("upstream"):
        raise node.child("upstream").fail("missing required key")
    values.get("id")
    auth: AuthPolicy | None = values.get("auth")
    claim_headers: tuple[ClaimHeader, ...] = values.get("claim_headers")
    payload_header: str | None = values.get("payload_header")
    for key, value in (("claim_headers", claim_headers), ("payload_header", payload_header)):
        if auth is None and value:
            raise node.child(key).fail(
                f"{key} on a route with 'auth: none'", "no identity on a public route"
            )
    if payload_header and payload_header.lower() in {h.header.lower() for h in claim_headers}:
        raise node.child("payload_header").fail(f"{payload_header!r} is also a claim header")
    match: RouteMatch = values.get("match")
    if values.get("cors_preflight") and match.methods and "OPTIONS" not in match.methods:
        raise node.child("cors_preflight").fail(
            "preflights are OPTIONS requests, which match.methods leaves out",
            "OPTIONS in match.methods, or no methods list",
        )
    rewrite: PathRewrite | None = None
    if node.has("rewrite"):
        where = node.child("rewrite").mapping(REWRITE.allowed)
        if match.path_prefix is None:
            raise where.fail(
                "a rewrite needs match.path_prefix", "match.path_prefix, not match.path"
            )
        rewrite = PathRewrite(match.path_prefix, values.get("rewrite").replacement)
    limits = context.limits or _DEFAULT_LIMITS
    inherited = {
        name: getattr(limits, name)
        for name in ("max_body_bytes", "max_concurrent_requests", "max_queued_requests")
        if not node.has(name)
    }
    return RouteConfig(
        **values.fields(
            rewrite=rewrite,
            keep_escaped_slashes=values.get("escaped_slashes") is EscapedSlashes.KEEP,
            **inherited,
        )
    )


ROUTE: Final = Section(
    "route",
    RouteConfig,
    doc="One route: how it is matched, where it goes and what it requires.",
    extra=(
        Key(
            "escaped_slashes",
            Choice(EscapedSlashes),
            "`reject`: a `%2F` in the path is 400 `request_rejected`; `keep`: matched as data "
            "and forwarded unchanged, for APIs with slashes in identifiers (Envoy's "
            "`path_with_escaped_slashes_action: KEEP_UNCHANGED`); the upstream must not decode "
            "it before routing",
            EscapedSlashes.REJECT,
        ),
    ),
    build=_build_route,
)


def _read_routes(node: Node) -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    seen: dict[str, int] = {}
    for item in node.seq(non_empty=True):
        route = ROUTE.read(item)
        if route.id in seen:
            raise item.child("id").fail(
                f"duplicate route id {route.id!r} (first at routes[{seen[route.id]}])",
                "unique route ids",
            )
        seen[route.id] = len(routes)
        routes.append(route)
    return tuple(routes)


# --- the whole file --------------------------------------------------------------------------------
def _read_trusted_proxies(
    node: Node,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in node.seq():
        text = item.string()
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise item.fail(f"invalid network {text!r}", "an IP address or CIDR") from None
    return tuple(nets)


def _read_strip_headers(node: Node) -> frozenset[str]:
    names = set()
    for item in node.seq():
        name = _read_header_name(item)
        if name.lower() in RESERVED_HEADERS:
            raise item.fail(f"header {name!r} is not the client's to lose", "a non-framing header")
        names.add(header_key(name))
    return frozenset(names)


def _read_origin(node: Node) -> str:
    parts = _read_url(
        node, what="an origin such as https://api.example.com", https_only=False, origin_only=True
    )
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True, slots=True)
class DpopSettings:
    """How DPoP proofs are checked, for every route with ``auth.dpop``."""

    algorithms: frozenset[str] = setting(
        frozenset(ASYMMETRIC_ALGORITHMS),
        Custom(lambda n: _read_algorithms(n, "DPoP proofs"), _ALGORITHMS_SCHEMA),
        "the proof algorithms accepted (the `algs` of the DPoP challenge); `none` and `HS*` "
        "are refused",
        shown="all asymmetric ones",
    )
    proof_max_age_s: float = setting(
        60.0,
        _SECONDS,
        "a proof's `iat` may be at most this old; its `jti` is remembered this long (plus "
        "`proof_leeway_s`), so each proof serves one request",
    )
    proof_leeway_s: float = setting(
        5.0,
        Seconds(allow_zero=True, at_most=600.0),
        "clock skew allowed on a proof's `iat`, either way",
    )
    replay_cache_size: int = setting(
        100_000,
        Integer(1, 10_000_000),
        "proofs remembered per process (`gateway_dpop_replay_cache_entries`); when full the "
        "oldest is forgotten first (`gateway_dpop_replay_evictions_total`): size it above "
        "proofs per second times the window",
    )
    nonce: bool = setting(
        False,
        Boolean(),
        "require server nonces (RFC 9449 §9): a proof must carry the current `nonce`, else "
        '401 `dpop_nonce_required` with `error="use_dpop_nonce"` and a `DPoP-Nonce` header '
        "to retry with; every DPoP challenge carries the current one",
    )
    nonce_lifetime_s: float = setting(
        300.0,
        Seconds(at_most=86400.0),
        "how long a nonce is accepted: a new one each lifetime, the previous one still "
        "accepted (so between one and two lifetimes)",
    )
    public_url: str | None = optional(
        Custom(_read_origin, _ORIGIN),
        "the origin clients address (`https://api.example.com`), which a proof's `htu` must "
        "name; by default the request's scheme and `Host` (a trusted proxy's "
        "`X-Forwarded-Proto` and `X-Forwarded-Host`)",
        shown="from the request",
    )


DPOP: Final = Section("dpop", DpopSettings, doc="How DPoP proofs are checked.")


class CertHeaderFormat(enum.StrEnum):
    """How a TLS-terminating proxy passes the client certificate on."""

    XFCC = "xfcc"  # Envoy's X-Forwarded-Client-Cert: Hash=<hex SHA-256 of the DER>;...
    PEM = "pem"  # nginx's $ssl_client_escaped_cert: the URL-encoded PEM


@dataclass(frozen=True, slots=True)
class ClientCertHeader:
    """Where a trusted proxy in front puts the verified client certificate."""

    name: str = required(
        Custom(_read_header_name, _STRING),
        "the header, e.g. `X-Forwarded-Client-Cert` (Envoy) or `X-SSL-Client-Cert` (nginx); "
        "read only from `trusted_proxies`, removed from everyone else's requests",
    )
    format: CertHeaderFormat = setting(
        CertHeaderFormat.XFCC,
        Choice(CertHeaderFormat),
        "`xfcc`: Envoy's `Hash=...;Cert=...` (the first element, the one the proxy added); "
        "`pem`: a URL-encoded PEM certificate (nginx `$ssl_client_escaped_cert`)",
    )


CLIENT_CERT_HEADER: Final = Section(
    "client_cert_header",
    ClientCertHeader,
    doc="The client certificate as a TLS-terminating proxy in front passes it on.",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """The whole, validated configuration."""

    mode: GatewayMode = setting(
        GatewayMode.PROXY,
        Choice(GatewayMode),
        "`proxy`: forward admitted requests to the route's `upstream`; `forward_auth`: answer "
        'the decision endpoints nginx, Envoy and Traefik call (see "Behind nginx, Envoy or '
        'Traefik"), where routes need no `upstream` (one given is unused) and `rewrite`, body '
        "and concurrency limits do not apply. Changing it needs a restart",
    )
    listen: ListenConfig = setting(
        ListenConfig(), Nested(LISTEN), "the proxy listener", shown="the keys below"
    )
    admin: AdminConfig = setting(
        AdminConfig(), Nested(ADMIN), "the admin listener", shown="the keys below"
    )
    realm: str = setting("gateway", Text(_REALM), "`realm` of `WWW-Authenticate` challenges")
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        (),
        Custom(_read_trusted_proxies, _STRINGS),
        "IPs/CIDRs whose `X-Forwarded-For` chain is kept and extended (and whose "
        "`X-Forwarded-Proto`/`-Host` are kept); from anyone else they are replaced. In "
        "`forward_auth` mode required and non-empty: only these peers may ask for decisions",
    )
    # More request headers removed from untrusted peers, as header_key spells them.
    strip_untrusted_headers: frozenset[str] = setting(
        frozenset(),
        Custom(_read_strip_headers, _STRINGS),
        "more request header names removed when the peer is not a trusted proxy (as the "
        "built-in `X-Forwarded-*`, `True-Client-IP`… are)",
    )
    upstream_defaults: UpstreamDefaults = setting(
        UpstreamDefaults(),
        Nested(UPSTREAM_DEFAULTS),
        "timeouts and pools of every upstream",
        shown="the keys below",
    )
    max_token_bytes: int = setting(
        8192,  # aiohttp's own header-field limit is 8190
        Integer(256, 65536),
        "longer credentials get 400 `invalid_request`, before any parsing",
    )
    limits: Limits = setting(
        _DEFAULT_LIMITS, Nested(LIMITS), "what one client may ask", shown="the keys below"
    )
    token_cache_size: int = setting(
        10_000,  # verified tokens kept (about 2-3 KB each)
        Integer(0, 10_000_000),
        "verified tokens remembered until their `exp` (0 turns the cache off); every hit "
        "re-checks the key, time claims and the route's policy",
    )
    token_cache_max_bytes: int = setting(
        64 * 1024 * 1024,
        Integer(0, 2**40),
        "bound on the memory the verified-token cache holds (64 MiB): each entry is weighed "
        "from its token and payload JSON, never below what it keeps alive (a typical token "
        "weighs 3-12 KB, an 8 KB one stuffed with tiny objects up to ~500 KB), and entries are "
        "evicted oldest first, one used since it last came round getting one more round "
        "(second chance), to stay within both bounds; an entry heavier than "
        "the bound is not cached. Worst case: this many bytes, whatever the tokens (1.5 GB at "
        "the defaults without it). 0 caches nothing",
    )
    issuers: Mapping[str, IssuerConfig] = setting(
        MappingProxyType({}),
        Custom(
            _read_issuers,
            {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": f"^(?:{_ISSUER_ID.pattern})$"},
                "additionalProperties": {"$ref": "#/$defs/issuer"},
            },
            ((".<id>", ISSUER),),
        ),
        "trusted identity providers by id; an id matches `[a-z0-9][a-z0-9_-]*` and is the "
        "`issuer` metric label",
        shown="`{}`",
        bare=True,
    )
    dpop: DpopSettings = setting(
        DpopSettings(), Nested(DPOP), "how DPoP proofs are checked", shown="the keys below"
    )
    client_cert_header: ClientCertHeader | None = optional(
        Nested(CLIENT_CERT_HEADER),
        "take the client certificate from a trusted proxy's header instead of this listener's "
        "TLS (for `auth.certificate_bound` behind a TLS-terminating proxy)",
    )
    tracing: TracingConfig | None = optional(
        Nested(TRACING),
        "record OpenTelemetry spans (request, verification, upstream call) and export them; "
        "without it the W3C trace context is still continued and forwarded, and logged",
        shown="— (no spans)",
    )
    routes: tuple[RouteConfig, ...] = required(
        Custom(
            _read_routes,
            {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/route"}},
            (("[]", ROUTE),),
        ),
        "ordered, first match wins",
    )

    def trusts(self, peer: str | None) -> bool:
        """Whether a connection from ``peer`` (an IP address) comes from a trusted proxy."""
        if not self.trusted_proxies or peer is None:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_proxies)

    @property
    def owned_headers(self) -> frozenset[str]:
        """Names of every header the gateway sets, lower-case with ``_`` as ``-`` (how CGI/WSGI
        upstreams read them): stripped from every inbound request in any spelling."""
        names = {h.header for r in self.routes for h in r.claim_headers}
        names.update(r.payload_header for r in self.routes if r.payload_header)
        names.add(AUTH_OUTCOME_HEADER)
        return frozenset(header_key(name) for name in names)


def _build_gateway(values: Values) -> GatewayConfig:
    root = values.node
    issuers: Mapping[str, IssuerConfig] = values.get("issuers")
    limits: Limits = values.get("limits")
    mode: GatewayMode = values.get("mode")
    if mode is GatewayMode.FORWARD_AUTH and not values.get("trusted_proxies"):
        # The decision endpoints believe what the caller says the original request was: an
        # untrusted peer could name any path. Fail closed at load rather than trust everyone.
        raise root.child("trusted_proxies").fail(
            "forward_auth mode needs the callers' addresses",
            "a non-empty list of the networks nginx, Envoy or Traefik call from",
        )
    routes_node = _within(root.child("routes"), issuers=issuers, limits=limits, mode=mode)
    config = GatewayConfig(**values.fields(routes=_read_routes(routes_node)))
    has_certificates = config.client_cert_header is not None or (
        config.listen.tls is not None and config.listen.tls.client_ca_file is not None
    )
    for index, route in enumerate(config.routes):
        bound = route.auth is not None and route.auth.certificate_bound is not BindingMode.OFF
        if bound and not has_certificates:
            where = root.child("routes").child(index).child("auth")
            raise where.child("certificate_bound").fail(
                "no client certificate to check tokens against",
                "listen.tls.client_ca_file (client certificates on this listener) or "
                "client_cert_header (from a TLS-terminating proxy in trusted_proxies)",
            )
        if bound and mode is GatewayMode.FORWARD_AUTH and config.client_cert_header is None:
            # The listener's own TLS peer is the caller (nginx, Envoy), not the client.
            raise root.child("client_cert_header").fail(
                "missing", "the header the caller passes the client certificate in"
            )
    return config


CONFIG: Final = Section(
    "gateway",
    GatewayConfig,
    doc="The gateway's configuration (config.py reads it; every key is declared there once).",
    build=_build_gateway,
)


def parse_config(document: Any, base_dir: Path | None = None) -> GatewayConfig:
    """Validate an already-parsed YAML document and freeze it into a ``GatewayConfig``.

    Relative paths (``jwks_file``, certificates) resolve against ``base_dir`` (the config file's
    folder).
    """
    return CONFIG.read(Node(document, "", _Context(base_dir)))


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file, derived from the declarations."""
    return json_schema(CONFIG, title="gateway configuration")


def config_reference() -> str:
    """The README's configuration reference table, derived from the declarations."""
    return reference_table(CONFIG)


def _check_duplicate_keys(
    node: yaml.Node | None, path: str = "", seen_nodes: set[int] | None = None
) -> None:
    """Refuse a repeated mapping key: PyYAML keeps the last one silently, so a second ``auth:``
    in a route could quietly replace the first.  Walks the composed tree (each node once, so
    aliases cannot make it loop or blow up), so the error can name the YAML path."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if node is None or id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if key in keys:
                raise ConfigError(where, "key given twice", "each key once per mapping")
            keys.add(key)
            _check_duplicate_keys(value_node, where, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{index}]", seen_nodes)


def load_config(path: str | Path, base_dir: Path | None = None) -> GatewayConfig:
    """Read, validate and freeze the YAML file at ``path``; raise ``ConfigError`` if anything is off.

    Relative ``jwks_file`` paths resolve against ``base_dir``, by default the file's folder.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{str(path)!r} is not UTF-8 text") from None
    return loads_config(text, base_dir=Path(path).parent if base_dir is None else base_dir)


def loads_config(text: str, base_dir: Path | None = None) -> GatewayConfig:
    """Validate YAML text; see ``load_config``."""
    try:
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        document = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError("", "invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError(where, f"invalid YAML: {problem}") from None
    return parse_config(document, base_dir)
