"""The configuration: YAML read once, checked completely, and frozen into typed objects.

``load_config(path)`` is the only way in.  Every check happens here, so the
request path never reads a dict and never re-validates.  A problem raises
``ConfigError`` whose message names the YAML path, the bad value and what was
expected, e.g.::

    routes[1].auth.issuers[0]: unknown issuer 'crop'; expected one of: corp

Defaults are named constants below, each with where it comes from.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import math
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError, JwksFetchError
from .headers import (
    AUTH_OUTCOME_HEADER,
    CLIENT_ORIGIN_HEADERS,
    FORWARDED_HEADERS,
    FORWARDED_PREFIX,
    HOP_BY_HOP_HEADERS,
    METHOD_OVERRIDE_HEADERS,
    RESERVED_HEADERS,
    header_key,
)
from .keyset import build_key_set, private_members

# --- defaults -----------------------------------------------------------------
DEFAULT_LISTEN_HOST: Final = "0.0.0.0"  # noqa: S104 - a proxy listens on all interfaces by default
DEFAULT_LISTEN_PORT: Final = 8080
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 15.0  # below Kubernetes' 30 s default grace period
DEFAULT_ADMIN_HOST: Final = "127.0.0.1"  # metrics stay off the public interface unless asked
DEFAULT_ADMIN_PORT: Final = 9100
DEFAULT_REALM: Final = "gateway"
DEFAULT_CONNECT_TIMEOUT_S: Final = 2.0
DEFAULT_UPSTREAM_TIMEOUT_S: Final = 30.0  # aiohttp's own default is 300 s total: far too long
DEFAULT_MAX_CONNECTIONS: Final = 256  # per upstream host:port
DEFAULT_POOL_TIMEOUT_S: Final = 5.0  # waiting for a free pooled upstream connection
DEFAULT_LEEWAY_S: Final = 30.0
MAX_LEEWAY_S: Final = 600.0  # clock skew tolerated on exp/nbf/iat (Envoy uses 60)
DEFAULT_JWKS_CACHE_TTL_S: Final = 300.0  # used when the JWKS response names no lifetime
DEFAULT_JWKS_CACHE_MIN_TTL_S: Final = 60.0  # an IdP's max-age=0 must not mean a fetch per request
DEFAULT_JWKS_CACHE_MAX_TTL_S: Final = (
    3600.0  # a retired key is trusted at most an hour after removal
)
DEFAULT_JWKS_MAX_STALE_S: Final = 21600.0  # past expiry, a failing IdP's last keys serve 6 h more
DEFAULT_JWKS_REFETCH_COOLDOWN_S: Final = 30.0
DEFAULT_JWKS_FETCH_TIMEOUT_S: Final = 3.0
DEFAULT_JWKS_REFRESH_AHEAD_S: Final = 30.0
DEFAULT_JWKS_MAX_BYTES: Final = 512 * 1024  # real key sets are a few KB
DEFAULT_MAX_TOKEN_BYTES: Final = 8192  # aiohttp's own header-field limit is 8190
DEFAULT_TOKEN_CACHE_SIZE: Final = 10_000  # verified tokens kept (about 2-3 KB each)
DEFAULT_TOKEN_CACHE_MAX_BYTES: Final = 64 * 1024 * 1024  # their summed weight, upper bound
DEFAULT_MAX_HEADER_BYTES: Final = 16384  # one header line; aiohttp's default is 8190
DEFAULT_MAX_HEADERS: Final = 100  # nginx and Envoy allow about this many
DEFAULT_CLIENT_IDLE_TIMEOUT_S: Final = 30.0  # no complete request header for this long: closed
DEFAULT_CLIENT_BODY_TIMEOUT_S: Final = 30.0  # longest gap between request-body chunks (408)
DEFAULT_CLIENT_BODY_DEADLINE_S: Final = 300.0  # longest a whole request body may take (408)
DEFAULT_CLIENT_WRITE_TIMEOUT_S: Final = 30.0  # longest a client may leave a response unread
DEFAULT_MAX_CLIENT_CONNECTIONS: Final = 10_000  # client connections per process (worker)
DEFAULT_TUNNEL_IDLE_TIMEOUT_S: Final = 300.0  # an upgraded connection with no byte either way
DEFAULT_TUNNEL_MAX_DURATION_S: Final = 0.0  # longest an upgraded connection lives (0: no limit)
DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024  # per route unless the route says otherwise
DEFAULT_MAX_CONCURRENT: Final = 1024  # requests in flight to one route's upstream
DEFAULT_MAX_QUEUED: Final = 1024  # requests waiting for a slot; beyond that, 503

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
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


# --- the frozen model -----------------------------------------------------------
class ClientCertMode(enum.StrEnum):
    """Whether the TLS listener asks clients for a certificate."""

    OPTIONAL = "optional"  # verified against client_ca_file when sent; none is accepted
    REQUIRED = "required"  # no verified certificate, no handshake


@dataclass(frozen=True, slots=True)
class ListenTls:
    """The listener's certificate (re-read on SIGHUP and on change) and client certificates."""

    cert_file: Path
    key_file: Path
    min_version: str = "1.2"
    client_ca_file: Path | None = None
    client_cert: ClientCertMode = ClientCertMode.OPTIONAL


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the proxy listens, whether with TLS, and how long it drains on shutdown."""

    host: str = DEFAULT_LISTEN_HOST
    port: int = DEFAULT_LISTEN_PORT
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    tls: ListenTls | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where /metrics, /healthz and /readyz are served (a separate listener)."""

    host: str = DEFAULT_ADMIN_HOST
    port: int = DEFAULT_ADMIN_PORT


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where spans go (OTLP/HTTP), which share of new traces is sampled, and the service name."""

    endpoint: str  # the OTLP/HTTP traces URL (an origin gets /v1/traces)
    sample_ratio: float = 1.0  # of the traces the gateway starts; a client's decision stands
    service_name: str = "gateway"
    export_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamDefaults:
    """Timeouts and pool size for every upstream hop."""

    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may ask of the gateway; each has a safe default."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    client_idle_timeout_s: float = DEFAULT_CLIENT_IDLE_TIMEOUT_S
    client_body_timeout_s: float = DEFAULT_CLIENT_BODY_TIMEOUT_S
    client_body_deadline_s: float = DEFAULT_CLIENT_BODY_DEADLINE_S
    client_write_timeout_s: float = DEFAULT_CLIENT_WRITE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS
    tunnel_idle_timeout_s: float = DEFAULT_TUNNEL_IDLE_TIMEOUT_S
    tunnel_max_duration_s: float = DEFAULT_TUNNEL_MAX_DURATION_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT
    max_queued_requests: int = DEFAULT_MAX_QUEUED


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted identity provider with its pinned algorithms and key-cache settings."""

    id: str
    issuer: str
    jwks_uri: str | None  # None: found by OpenID discovery, unless the set is static
    algorithms: frozenset[str]
    leeway_s: float = DEFAULT_LEEWAY_S
    jwks_cache_ttl_s: float = DEFAULT_JWKS_CACHE_TTL_S
    jwks_cache_min_ttl_s: float = DEFAULT_JWKS_CACHE_MIN_TTL_S
    jwks_cache_max_ttl_s: float = DEFAULT_JWKS_CACHE_MAX_TTL_S
    jwks_refetch_cooldown_s: float = DEFAULT_JWKS_REFETCH_COOLDOWN_S
    jwks_fetch_timeout_s: float = DEFAULT_JWKS_FETCH_TIMEOUT_S
    jwks_refresh_ahead_s: float = DEFAULT_JWKS_REFRESH_AHEAD_S
    jwks_max_stale_s: float = DEFAULT_JWKS_MAX_STALE_S
    jwks_max_bytes: int = DEFAULT_JWKS_MAX_BYTES
    jwks_refresh_interval_s: float | None = None  # None: refresh only ahead of expiry
    static_jwks: str | None = None  # canonical JSON of a jwks_file / inline jwks: never fetched
    required_for_readiness: bool = True
    typ: str | None = None  # None: typ absent, JWT or at+jwt; else exactly this (RFC 9068: at+jwt)

    @property
    def discovery_uri(self) -> str:
        """Where OpenID discovery looks (OpenID Connect Discovery 1.0 §4)."""
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def cache_lifetime(self, max_age_s: float | None) -> float:
        """The key-set lifetime for a response's max-age, clamped to the configured bounds."""
        if max_age_s is None:
            return self.jwks_cache_ttl_s
        return min(max(max_age_s, self.jwks_cache_min_ttl_s), self.jwks_cache_max_ttl_s)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a request must look like to take a route.

    ``path`` matches exactly; ``path_prefix`` matches whole segments (``/api``
    matches ``/api`` and ``/api/x`` but not ``/apix``).  ``methods`` empty means any.
    """

    path: str | None
    path_prefix: str | None
    methods: frozenset[str]
    hosts: frozenset[str] = frozenset()  # exact names, lower-case; empty means any
    host_suffixes: tuple[str, ...] = ()  # from "*.example.com": ".example.com"

    def matches_host(self, host: str) -> bool:
        """Whether the request's host (lower-case, without port) is one this route serves."""
        if not self.hosts and not self.host_suffixes:
            return True
        return host in self.hosts or any(
            host.endswith(s) and len(host) > len(s) for s in self.host_suffixes
        )

    def matches(self, method: str, path: str, host: str = "") -> bool:
        """Whether a request with this method, raw path and host takes the route."""
        if self.methods and method not in self.methods:
            return False
        if not self.matches_host(host):
            return False
        if self.path is not None:
            return path == self.path
        prefix = self.path_prefix
        assert prefix is not None
        if prefix == "/":
            return True
        return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How the gateway checks an https upstream and proves itself to it (mTLS)."""

    verify: bool = True  # the certificate chain and the name are checked
    ca_file: Path | None = None  # trust these CAs instead of the system store
    server_name: str | None = None  # the SNI and the name checked, if not the URL's host
    cert_file: Path | None = None  # a client certificate (and its key) for mutual TLS
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream origin: scheme, host and port only; the request path is forwarded as is."""

    url: str
    scheme: str
    host: str
    port: int
    tls: UpstreamTls | None = None  # https only; None: verified against the system store


class AuthMode(enum.StrEnum):
    """How a route treats tokens."""

    REQUIRED = "required"  # no valid token, no entry
    OPTIONAL = "optional"  # no token: forwarded without identity; an invalid token: rejected
    REPORT_ONLY = "report-only"  # verified, counted and logged, but forwarded whatever the outcome


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


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """What a token must satisfy on a route.

    ``audiences`` is ``None`` only when the YAML said ``audiences: any``.
    """

    issuers: tuple[IssuerConfig, ...]
    audiences: frozenset[str] | None
    required_claims: tuple[str, ...] = ()
    required_scopes: frozenset[str] = frozenset()
    scopes_any_of: bool = False  # required_scopes: one suffices instead of all
    claim_matchers: tuple[ClaimMatcher, ...] = ()
    forward_token: bool = False
    mode: AuthMode = AuthMode.REQUIRED
    token_sources: tuple[TokenSource, ...] = (BEARER_HEADER,)

    def issuer_for(self, iss: str) -> IssuerConfig | None:
        """The configured issuer whose ``issuer`` URL equals ``iss``, if the route trusts it."""
        for issuer in self.issuers:
            if issuer.issuer == iss:
                return issuer
        return None


@dataclass(frozen=True, slots=True)
class ClaimHeader:
    """One injected header: its name, the claim path (``org.tenant_id`` → ``("org", "tenant_id")``)
    and how lists and objects are rendered (``csv``: lists comma-joined; ``json``: compact JSON)."""

    header: str
    claim: tuple[str, ...]
    format: str = "csv"


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """What replaces the matched ``path_prefix`` in the forwarded path (``""`` strips it)."""

    prefix: str
    replacement: str

    def apply(self, path: str) -> str:
        rest = path[len(self.prefix) :] if self.prefix != "/" else path
        rewritten = self.replacement + rest
        return rewritten if rewritten.startswith("/") else "/" + rewritten


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route: how it is matched, where it goes and what it requires."""

    id: str
    match: RouteMatch
    upstream: Upstream | None  # None only in forward_auth mode (the caller proxies)
    auth: AuthPolicy | None  # None only for an explicit `auth: none`
    claim_headers: tuple[ClaimHeader, ...] = ()
    rewrite: PathRewrite | None = None
    payload_header: str | None = None  # the whole verified payload, base64url JSON
    cors_preflight: bool = False  # OPTIONS preflights pass without a token
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT
    max_queued_requests: int = DEFAULT_MAX_QUEUED
    # `escaped_slashes: keep`: %2F is matched as data and forwarded unchanged (Envoy's
    # path_with_escaped_slashes_action KEEP_UNCHANGED); default `reject` answers 400.
    keep_escaped_slashes: bool = False


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole, validated configuration."""

    listen: ListenConfig
    admin: AdminConfig
    realm: str
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    upstream_defaults: UpstreamDefaults
    max_token_bytes: int
    limits: Limits
    issuers: Mapping[str, IssuerConfig]
    routes: tuple[RouteConfig, ...]
    token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE
    token_cache_max_bytes: int = DEFAULT_TOKEN_CACHE_MAX_BYTES
    mode: GatewayMode = GatewayMode.PROXY
    # More request headers removed from untrusted peers, as header_key spells them.
    strip_untrusted_headers: frozenset[str] = frozenset()
    tracing: TracingConfig | None = None

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


# --- the typed reader -----------------------------------------------------------
class _Node:
    """A YAML value together with its path, so every error can say where it is."""

    __slots__ = ("path", "value")

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def child(self, key: str | int) -> _Node:
        if isinstance(key, int):
            return _Node(self.value[key], f"{self.path}[{key}]")
        sep = "." if self.path else ""
        return _Node(self.value.get(key) if isinstance(self.value, dict) else None,
                     f"{self.path}{sep}{key}")  # fmt: skip

    def fail(self, problem: str, expected: str | None = None) -> ConfigError:
        return ConfigError(self.path or "<root>", problem, expected)

    def mapping(self, allowed: frozenset[str], required: frozenset[str] = frozenset()) -> _Node:
        if not isinstance(self.value, dict):
            raise self.fail(f"got {_show(self.value)}", "a mapping")
        for key in self.value:
            if not isinstance(key, str) or key not in allowed:
                raise self.child(str(key)).fail(
                    f"unknown key {key!r}", f"one of: {', '.join(sorted(allowed))}"
                )
        for key in sorted(required):
            if key not in self.value:
                raise self.child(key).fail("missing required key")
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def items(self) -> Iterator[tuple[str, _Node]]:
        assert isinstance(self.value, dict)
        for key in self.value:
            yield str(key), self.child(key)

    def seq(self, *, non_empty: bool = False) -> list[_Node]:
        if not isinstance(self.value, list):
            raise self.fail(f"got {_show(self.value)}", "a list")
        if non_empty and not self.value:
            raise self.fail("empty list", "at least one entry")
        return [self.child(i) for i in range(len(self.value))]

    def string(self, *, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(self.value, str) or not self.value:
            raise self.fail(f"got {_show(self.value)}", what or "a non-empty string")
        if pattern is not None and not pattern.fullmatch(self.value):
            raise self.fail(f"invalid value {self.value!r}", what or f"to match {pattern.pattern}")
        return self.value

    def number(self, *, positive: bool = True, allow_zero: bool = False) -> float:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise self.fail(f"got {_show(value)}", "a number of seconds")
        if positive and (value < 0 or (value == 0 and not allow_zero)):
            raise self.fail(f"got {value}", "a number >= 0" if allow_zero else "a number > 0")
        return float(value)

    def integer(self, *, low: int, high: int) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(f"got {_show(value)}", f"an integer from {low} to {high}")
        return value

    def choice(self, options: list[str]) -> str:
        if self.value not in options:
            raise self.fail(f"got {_show(self.value)}", f"one of: {', '.join(options)}")
        return str(self.value)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"got {_show(self.value)}", "true or false")
        return self.value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a very large integer"  # repr() of a huge int may itself refuse (int_max_str_digits)
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _opt(node: _Node, key: str, read: Any, default: Any) -> Any:
    return read(node.child(key)) if node.has(key) else default


# --- sections -------------------------------------------------------------------
_LISTEN_TLS_KEYS: Final = frozenset(
    {"cert_file", "key_file", "min_version", "client_ca_file", "client_cert"}
)


def _read_tls_version(node: _Node) -> str:
    # An unquoted 1.2 is a YAML float: the same answer as "1.2".
    value = f"{node.value:.1f}" if isinstance(node.value, float) else node.value
    return _Node(value, node.path).choice(["1.2", "1.3"])


def _read_listen_tls(node: _Node, base_dir: Path | None) -> ListenTls:
    node.mapping(_LISTEN_TLS_KEYS, frozenset({"cert_file", "key_file"}))
    tls = ListenTls(
        cert_file=_read_file_path(node.child("cert_file"), base_dir),
        key_file=_read_file_path(node.child("key_file"), base_dir),
        min_version=_opt(node, "min_version", _read_tls_version, "1.2"),
        client_ca_file=_opt(node, "client_ca_file", lambda n: _read_file_path(n, base_dir), None),
        client_cert=_opt(
            node, "client_cert", lambda n: ClientCertMode(n.choice([m.value for m in ClientCertMode])),
            ClientCertMode.OPTIONAL,
        ),
    )  # fmt: skip
    if node.has("client_cert") and tls.client_ca_file is None:
        raise node.child("client_ca_file").fail(
            "missing", "the CA bundle that client certificates are verified against"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            str(tls.cert_file), str(tls.key_file)
        )
    except ssl.SSLError:
        raise node.child("cert_file").fail(
            "the certificate and key do not load as a pair", "a PEM certificate chain and its key"
        ) from None
    return tls


def _read_listen(node: _Node, base_dir: Path | None = None) -> ListenConfig:
    node.mapping(frozenset({"host", "port", "shutdown_timeout_s", "tls"}))
    return ListenConfig(
        host=_opt(node, "host", lambda n: n.string(), DEFAULT_LISTEN_HOST),
        port=_opt(node, "port", lambda n: n.integer(low=0, high=65535), DEFAULT_LISTEN_PORT),
        shutdown_timeout_s=_opt(
            node, "shutdown_timeout_s", lambda n: n.number(), DEFAULT_SHUTDOWN_TIMEOUT_S
        ),
        tls=_opt(node, "tls", lambda n: _read_listen_tls(n, base_dir), None),
    )


def _read_admin(node: _Node) -> AdminConfig:
    node.mapping(frozenset({"host", "port"}))
    return AdminConfig(
        host=_opt(node, "host", lambda n: n.string(), DEFAULT_ADMIN_HOST),
        port=_opt(node, "port", lambda n: n.integer(low=0, high=65535), DEFAULT_ADMIN_PORT),
    )


def _read_tracing(node: _Node) -> TracingConfig:
    node.mapping(
        frozenset({"endpoint", "sample_ratio", "service_name", "export_timeout_s"}),
        frozenset({"endpoint"}),
    )
    from .tracing import otel_missing  # imports OpenTelemetry: only with a tracing block

    missing = otel_missing()
    if missing is not None:
        raise node.fail(
            f"needs OpenTelemetry, but {missing} is not installed",
            "the otel extra: pip install 'gateway[otel]'",
        )
    endpoint, parts = _read_url(
        node.child("endpoint"),
        what="an http(s) OTLP/HTTP traces URL",
        https_only=False,
        origin_only=False,
    )
    if parts.path in ("", "/") and not parts.query:
        endpoint = endpoint.rstrip("/") + "/v1/traces"

    def share(n: _Node) -> float:
        value = n.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise n.fail(f"got {_show(value)}", "a share from 0 to 1")
        return float(value)

    return TracingConfig(
        endpoint=endpoint,
        sample_ratio=_opt(node, "sample_ratio", share, 1.0),
        service_name=_opt(node, "service_name", lambda n: n.string(), "gateway"),
        export_timeout_s=_opt(node, "export_timeout_s", lambda n: n.number(), 10.0),
    )


def _read_limits(node: _Node) -> Limits:
    node.mapping(frozenset(f.name for f in dataclasses.fields(Limits)))
    return Limits(
        max_header_bytes=_opt(
            node, "max_header_bytes", lambda n: n.integer(low=1024, high=1024 * 1024),
            DEFAULT_MAX_HEADER_BYTES,
        ),
        max_headers=_opt(
            node, "max_headers", lambda n: n.integer(low=8, high=10_000), DEFAULT_MAX_HEADERS
        ),
        client_idle_timeout_s=_opt(
            node, "client_idle_timeout_s", lambda n: n.number(), DEFAULT_CLIENT_IDLE_TIMEOUT_S
        ),
        client_body_timeout_s=_opt(
            node, "client_body_timeout_s", lambda n: n.number(), DEFAULT_CLIENT_BODY_TIMEOUT_S
        ),
        client_body_deadline_s=_opt(
            node, "client_body_deadline_s", lambda n: n.number(), DEFAULT_CLIENT_BODY_DEADLINE_S
        ),
        client_write_timeout_s=_opt(
            node, "client_write_timeout_s", lambda n: n.number(), DEFAULT_CLIENT_WRITE_TIMEOUT_S
        ),
        max_connections=_opt(
            node, "max_connections", lambda n: n.integer(low=1, high=1_000_000),
            DEFAULT_MAX_CLIENT_CONNECTIONS,
        ),
        tunnel_idle_timeout_s=_opt(
            node, "tunnel_idle_timeout_s", lambda n: n.number(), DEFAULT_TUNNEL_IDLE_TIMEOUT_S
        ),
        tunnel_max_duration_s=_opt(
            node, "tunnel_max_duration_s", lambda n: n.number(allow_zero=True),
            DEFAULT_TUNNEL_MAX_DURATION_S,
        ),
        max_body_bytes=_opt(
            node, "max_body_bytes", lambda n: n.integer(low=0, high=2**62), DEFAULT_MAX_BODY_BYTES
        ),
        max_concurrent_requests=_opt(
            node, "max_concurrent_requests", lambda n: n.integer(low=1, high=1_000_000),
            DEFAULT_MAX_CONCURRENT,
        ),
        max_queued_requests=_opt(
            node, "max_queued_requests", lambda n: n.integer(low=0, high=1_000_000),
            DEFAULT_MAX_QUEUED,
        ),
    )  # fmt: skip


def _read_upstream_defaults(node: _Node) -> UpstreamDefaults:
    node.mapping(frozenset({"connect_timeout_s", "timeout_s", "max_connections", "pool_timeout_s"}))
    return UpstreamDefaults(
        connect_timeout_s=_opt(
            node, "connect_timeout_s", lambda n: n.number(), DEFAULT_CONNECT_TIMEOUT_S
        ),
        timeout_s=_opt(node, "timeout_s", lambda n: n.number(), DEFAULT_UPSTREAM_TIMEOUT_S),
        max_connections=_opt(
            node, "max_connections", lambda n: n.integer(low=1, high=100_000),
            DEFAULT_MAX_CONNECTIONS,
        ),
        pool_timeout_s=_opt(
            node, "pool_timeout_s", lambda n: n.number(),
            DEFAULT_POOL_TIMEOUT_S,
        ),
    )  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_url(node: _Node, *, what: str, https_only: bool, origin_only: bool) -> tuple[str, Any]:
    text = node.string(what=what)
    try:
        parts = urlsplit(text)
        port = parts.port
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
    del port
    return text, parts


def _read_algorithms(node: _Node) -> frozenset[str]:
    algs: list[str] = []
    for item in node.seq(non_empty=True):
        alg = item.string()
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise item.fail(
                f"unsafe algorithm {alg!r} for a JWKS issuer",
                f"one of: {', '.join(ASYMMETRIC_ALGORITHMS)}",
            )
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise item.fail(
                f"unknown algorithm {alg!r}", f"one of: {', '.join(ASYMMETRIC_ALGORITHMS)}"
            )
        algs.append(alg)
    return frozenset(algs)


_ISSUER_KEYS: Final = frozenset(
    {
        "issuer", "jwks_uri", "jwks_file", "jwks", "algorithms", "leeway_s", "jwks_cache_ttl_s",
        "jwks_cache_min_ttl_s", "jwks_cache_max_ttl_s", "jwks_refetch_cooldown_s",
        "jwks_fetch_timeout_s", "jwks_refresh_ahead_s", "jwks_max_stale_s", "jwks_max_bytes",
        "jwks_refresh_interval_s", "required_for_readiness", "typ",
    }
)  # fmt: skip
_TYP: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}(?:/[A-Za-z0-9!#$&^_.+-]{1,64})?")


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


def _read_static_jwks(
    node: _Node, issuer_id: str, algorithms: frozenset[str], base_dir: Path | None
) -> str | None:
    """A static key set (``jwks_file`` or inline ``jwks``), checked for usable keys at load."""
    if node.has("jwks_file"):
        where = node.child("jwks_file")
        path = _config_path(where, base_dir, "a path to a JWKS JSON file")
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


def _refuse_private_keys(where: _Node, document: Any, *, secrets: bool) -> None:
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


def _read_issuer(issuer_id: str, node: _Node, base_dir: Path | None) -> IssuerConfig:
    node.mapping(_ISSUER_KEYS, frozenset({"issuer", "algorithms"}))
    sources = [k for k in ("jwks_uri", "jwks_file", "jwks") if node.has(k)]
    if len(sources) > 1:
        raise node.fail(
            f"both {sources[0]!r} and {sources[1]!r} are set",
            "at most one of jwks_uri, jwks_file, jwks (none: OpenID discovery from 'issuer')",
        )
    iss_node = node.child("issuer")
    iss = iss_node.string(what="the issuer URL exactly as tokens carry it in 'iss'")
    algorithms = _read_algorithms(node.child("algorithms"))
    jwks_uri: str | None = None
    if node.has("jwks_uri"):
        jwks_uri, _ = _read_url(
            node.child("jwks_uri"), what="an https URL", https_only=True, origin_only=False
        )
    static = _read_static_jwks(node, issuer_id, algorithms, base_dir)
    if not sources and not is_secure_url(iss):
        raise iss_node.fail(
            f"{iss!r} cannot be used for OpenID discovery",
            "an https issuer URL (plain http only for loopback), or jwks_uri/jwks_file/jwks",
        )

    def number(key: str, default: float) -> float:
        value: float = _opt(node, key, lambda n: n.number(), default)
        return value

    ttl = number("jwks_cache_ttl_s", DEFAULT_JWKS_CACHE_TTL_S)
    min_ttl = number("jwks_cache_min_ttl_s", min(DEFAULT_JWKS_CACHE_MIN_TTL_S, ttl))
    max_ttl = number("jwks_cache_max_ttl_s", max(DEFAULT_JWKS_CACHE_MAX_TTL_S, ttl))
    if not min_ttl <= ttl <= max_ttl:
        raise node.fail(
            f"cache lifetimes min {min_ttl:g}, default {ttl:g}, max {max_ttl:g} are out of order",
            "jwks_cache_min_ttl_s <= jwks_cache_ttl_s <= jwks_cache_max_ttl_s",
        )
    cooldown = number("jwks_refetch_cooldown_s", min(DEFAULT_JWKS_REFETCH_COOLDOWN_S, ttl))
    if cooldown > ttl:
        raise node.child("jwks_refetch_cooldown_s").fail(
            f"{cooldown:g} is longer than jwks_cache_ttl_s ({ttl:g})", "a value <= jwks_cache_ttl_s"
        )
    ahead = _opt(
        node, "jwks_refresh_ahead_s", lambda n: n.number(allow_zero=True),
        min(DEFAULT_JWKS_REFRESH_AHEAD_S, ttl / 2),
    )  # fmt: skip
    if ahead >= ttl:
        raise node.child("jwks_refresh_ahead_s").fail(
            f"{ahead:g} is not shorter than jwks_cache_ttl_s ({ttl:g})",
            "a value < jwks_cache_ttl_s",
        )
    typ = _opt(
        node, "typ", lambda n: n.string(pattern=_TYP, what="a media type such as at+jwt"), None
    )
    return IssuerConfig(
        id=issuer_id,
        issuer=iss,
        jwks_uri=jwks_uri,
        algorithms=algorithms,
        leeway_s=_opt(node, "leeway_s", _read_leeway, DEFAULT_LEEWAY_S),
        jwks_cache_ttl_s=ttl,
        jwks_cache_min_ttl_s=min_ttl,
        jwks_cache_max_ttl_s=max_ttl,
        jwks_refetch_cooldown_s=cooldown,
        jwks_fetch_timeout_s=number("jwks_fetch_timeout_s", DEFAULT_JWKS_FETCH_TIMEOUT_S),
        jwks_refresh_ahead_s=ahead,
        jwks_max_stale_s=_opt(
            node, "jwks_max_stale_s", lambda n: n.number(allow_zero=True), DEFAULT_JWKS_MAX_STALE_S
        ),
        jwks_max_bytes=_opt(
            node, "jwks_max_bytes", lambda n: n.integer(low=1024, high=16 * 1024 * 1024),
            DEFAULT_JWKS_MAX_BYTES,
        ),
        jwks_refresh_interval_s=_opt(node, "jwks_refresh_interval_s", lambda n: n.number(), None),
        static_jwks=static,
        required_for_readiness=_opt(node, "required_for_readiness", lambda n: n.boolean(), True),
        typ=typ,
    )  # fmt: skip


def _read_leeway(node: _Node) -> float:
    leeway = node.number(allow_zero=True)
    if leeway > MAX_LEEWAY_S:  # a typo such as 1e9 would switch expiry checks off
        raise node.fail(f"got {leeway:g}", f"at most {MAX_LEEWAY_S:g} seconds")
    return leeway


def _read_issuers(node: _Node, base_dir: Path | None) -> dict[str, IssuerConfig]:
    if not isinstance(node.value, dict) or not node.value:
        raise node.fail(f"got {_show(node.value)}", "a mapping of issuer id to issuer settings")
    issuers: dict[str, IssuerConfig] = {}
    seen_urls: dict[str, str] = {}
    for issuer_id, child in node.items():
        if not _ISSUER_ID.fullmatch(issuer_id):
            raise child.fail(f"invalid issuer id {issuer_id!r}", f"to match {_ISSUER_ID.pattern}")
        issuer = _read_issuer(issuer_id, child, base_dir)
        if issuer.issuer in seen_urls:
            raise child.child("issuer").fail(
                f"{issuer.issuer!r} is already issuer '{seen_urls[issuer.issuer]}'",
                "each issuer URL configured once",
            )
        seen_urls[issuer.issuer] = issuer_id
        issuers[issuer_id] = issuer
    return issuers


def _read_match(node: _Node) -> RouteMatch:
    node.mapping(frozenset({"path", "path_prefix", "methods", "hosts"}))
    if node.has("path") == node.has("path_prefix"):
        raise node.fail("exactly one of 'path' or 'path_prefix' must be set")
    path = _opt(node, "path", _read_path, None)
    prefix = _opt(node, "path_prefix", _read_path, None)
    if prefix is not None and prefix != "/" and prefix.endswith("/"):
        raise node.child("path_prefix").fail(
            f"{prefix!r} ends with '/'",
            "a prefix without a trailing slash (matching is per segment)",
        )
    methods: set[str] = set()
    if node.has("methods"):
        for item in node.child("methods").seq(non_empty=True):
            methods.add(item.string(pattern=_METHOD, what="an upper-case HTTP method such as GET"))
        if "GET" in methods:
            # RFC 9110 §9.3.2: HEAD is GET without the body, so the route that judges GET judges
            # HEAD too; otherwise HEAD would fall through to a looser route below.
            methods.add("HEAD")
    hosts: set[str] = set()
    suffixes: list[str] = []
    for item in _opt(node, "hosts", lambda n: n.seq(non_empty=True), []):
        host = item.string(
            pattern=_HOST, what="a host name such as api.example.com or *.example.com"
        )
        if host.startswith("*."):
            suffixes.append(host[1:].lower())
        else:
            hosts.add(host.lower())
    return RouteMatch(
        path=path,
        path_prefix=prefix,
        methods=frozenset(methods),
        hosts=frozenset(hosts),
        host_suffixes=tuple(suffixes),
    )


def _read_path(node: _Node) -> str:
    path = node.string(what="a path starting with '/'")
    if not path.startswith("/") or any(c in path for c in "?#%\\; \t") or "//" in path:
        raise node.fail(f"invalid path {path!r}", "a plain path starting with '/'")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise node.fail(f"invalid path {path!r}", "a path without dot segments")
    return path


_UPSTREAM_KEYS: Final = frozenset({"url", "tls"})
_UPSTREAM_TLS_KEYS: Final = frozenset({"verify", "ca_file", "server_name", "cert_file", "key_file"})


def file_signature(path: Path) -> tuple[int, int] | None:
    """What changes when a file is rewritten or its symlink swapped (Kubernetes ConfigMaps and
    Secrets): the config file itself and the certificate files it names are watched by it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def _config_path(node: _Node, base_dir: Path | None, what: str) -> Path:
    """A path given in the config, relative to the config file's folder unless absolute."""
    path = Path(node.string(what=what))
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def _read_file_path(node: _Node, base_dir: Path | None) -> Path:
    """A file that must exist and be readable at load (relative to the config file's folder)."""
    path = _config_path(node, base_dir, "a file path")
    try:
        path.read_bytes()
    except OSError as exc:
        raise node.fail(f"cannot read {str(path)!r}: {exc.strerror}", "a readable file") from None
    return path


def _read_upstream_tls(node: _Node, base_dir: Path | None) -> UpstreamTls:
    node.mapping(_UPSTREAM_TLS_KEYS)
    tls = UpstreamTls(
        verify=_opt(node, "verify", lambda n: n.boolean(), True),
        ca_file=_opt(node, "ca_file", lambda n: _read_file_path(n, base_dir), None),
        server_name=_opt(node, "server_name", lambda n: n.string(what="a DNS name"), None),
        cert_file=_opt(node, "cert_file", lambda n: _read_file_path(n, base_dir), None),
        key_file=_opt(node, "key_file", lambda n: _read_file_path(n, base_dir), None),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        raise node.child(missing).fail("missing", "cert_file and key_file together (mutual TLS)")
    if not tls.verify and (tls.ca_file is not None or tls.server_name is not None):
        raise node.child("verify").fail(
            "false with ca_file or server_name", "verify: true when a CA or name is given"
        )
    return tls


def _read_upstream(node: _Node, base_dir: Path | None = None) -> Upstream:
    """An origin URL, or a mapping of ``url`` and ``tls`` (CA, name, client certificate)."""
    tls: UpstreamTls | None = None
    url_node = node
    if isinstance(node.value, dict):
        node.mapping(_UPSTREAM_KEYS, frozenset({"url"}))
        url_node = node.child("url")
        if node.has("tls"):
            tls = _read_upstream_tls(node.child("tls"), base_dir)
    text, parts = _read_url(
        url_node, what="an http(s) origin URL", https_only=False, origin_only=True
    )
    if tls is not None and parts.scheme != "https":
        raise node.child("tls").fail("set for an http:// upstream", "an https:// url")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(
        url=text.rstrip("/"), scheme=parts.scheme, host=parts.hostname, port=port, tls=tls
    )


_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token
_REALM: Final = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")  # fits a quoted-string unescaped


_AUTH_KEYS: Final = frozenset(
    {"issuers", "audiences", "required_claims", "required_scopes", "claims", "forward_token",
     "mode", "token_from"}
)  # fmt: skip


def _read_claim_path(node: _Node) -> tuple[str, ...]:
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


def _read_scalar(node: _Node) -> str | int | bool:
    value = node.value
    if isinstance(value, bool | int | str) and value != "":
        return value
    raise node.fail(f"got {_show(value)}", "a string, integer or boolean")


def _read_matchers(node: _Node) -> tuple[ClaimMatcher, ...]:
    matchers: list[ClaimMatcher] = []
    ops = {op.value for op in MatchOp}
    for item in node.seq(non_empty=True):
        item.mapping(frozenset({"path", *ops}), frozenset({"path"}))
        given = [op for op in MatchOp if item.has(op.value)]
        if len(given) != 1:
            raise item.fail("needs exactly one comparison", f"one of: {', '.join(sorted(ops))}")
        op = given[0]
        where = item.child(op.value)
        values: tuple[str | int | bool, ...]
        if op is MatchOp.ONE_OF:
            values = tuple(_read_scalar(v) for v in where.seq(non_empty=True))
        else:
            values = (_read_scalar(where),)
        matchers.append(ClaimMatcher(_read_claim_path(item.child("path")), op, values))
    return tuple(matchers)


def _read_scopes(node: _Node) -> tuple[frozenset[str], bool]:
    """``[a, b]`` or ``{all_of: [a, b]}`` (every one), or ``{any_of: [a, b]}`` (one suffices)."""
    any_of = False
    if isinstance(node.value, dict):
        node.mapping(frozenset({"all_of", "any_of"}))
        if len(node.value) != 1:
            raise node.fail("needs exactly one of all_of, any_of")
        any_of = node.has("any_of")
        node = node.child("any_of" if any_of else "all_of")
    scopes = frozenset(
        item.string(pattern=_SCOPE_TOKEN, what="a scope token") for item in node.seq(non_empty=True)
    )
    return scopes, any_of


def _read_token_sources(node: _Node) -> tuple[TokenSource, ...]:
    sources: list[TokenSource] = []
    for item in node.seq(non_empty=True):
        item.mapping(frozenset({"header", "prefix", "cookie", "query"}))
        kinds = [loc for loc in TokenLocation if item.has(loc.value)]
        if len(kinds) != 1:
            raise item.fail("needs exactly one of header, cookie, query")
        location = kinds[0]
        if item.has("prefix") and location is not TokenLocation.HEADER:
            raise item.child("prefix").fail("a prefix applies to headers only")
        where = item.child(location.value)
        if location is TokenLocation.HEADER:
            name = where.string(pattern=_HEADER_NAME, what="a valid HTTP header name")
            if name.lower() in HOP_BY_HOP_HEADERS or name.lower() in ("host", "cookie"):
                raise where.fail(f"header {name!r} cannot carry a token", "an end-to-end header")
            prefix = _opt(item, "prefix", lambda n: n.string(), "")
            sources.append(TokenSource(location, name, prefix))
        else:
            pattern = _COOKIE_NAME if location is TokenLocation.COOKIE else _QUERY_NAME
            sources.append(TokenSource(location, where.string(pattern=pattern)))
    if len({(s.location, s.name.lower()) for s in sources}) != len(sources):
        raise node.fail("a token source is listed twice")
    return tuple(sources)


def _read_auth(node: _Node, issuers: Mapping[str, IssuerConfig]) -> AuthPolicy | None:
    if node.value == "none":
        return None
    if node.value is None:
        raise node.fail(
            "missing", "'none' for a public route, or a mapping with issuers and audiences"
        )
    node.mapping(_AUTH_KEYS, frozenset({"issuers", "audiences"}))
    known = ", ".join(sorted(issuers))
    chosen: list[IssuerConfig] = []
    for item in node.child("issuers").seq(non_empty=True):
        name = item.string()
        if name not in issuers:
            raise item.fail(f"unknown issuer {name!r}", f"one of: {known}")
        if issuers[name] in chosen:
            raise item.fail(f"issuer {name!r} listed twice")
        chosen.append(issuers[name])
    aud_node = node.child("audiences")
    audiences: frozenset[str] | None
    if aud_node.value == "any":
        audiences = None
    else:
        if not isinstance(aud_node.value, list):
            raise aud_node.fail(f"got {_show(aud_node.value)}", "a list of audiences, or 'any'")
        audiences = frozenset(item.string() for item in aud_node.seq(non_empty=True))
    claims = tuple(item.string() for item in _opt(node, "required_claims", lambda n: n.seq(), []))
    scopes, any_of = _opt(node, "required_scopes", _read_scopes, (frozenset(), False))
    mode = AuthMode(_opt(node, "mode", lambda n: n.choice([m.value for m in AuthMode]), "required"))
    return AuthPolicy(
        issuers=tuple(chosen),
        audiences=audiences,
        required_claims=claims,
        required_scopes=scopes,
        scopes_any_of=any_of,
        claim_matchers=_opt(node, "claims", _read_matchers, ()),
        forward_token=_opt(node, "forward_token", lambda n: n.boolean(), False),
        mode=mode,
        token_sources=_opt(node, "token_from", _read_token_sources, (BEARER_HEADER,)),
    )


def _read_owned_header_name(node: _Node, header: str) -> str:
    node.string(pattern=_HEADER_NAME, what="a valid HTTP header name")
    lower = header.lower()
    if (
        lower in RESERVED_HEADERS
        or lower in FORWARDED_HEADERS
        or lower in CLIENT_ORIGIN_HEADERS
        or lower in METHOD_OVERRIDE_HEADERS
        or lower.startswith(FORWARDED_PREFIX)
        or lower == AUTH_OUTCOME_HEADER.lower()
    ):
        raise node.fail(f"header {header!r} is reserved", "a header the gateway does not own")
    return header


def _read_claim_headers(node: _Node) -> tuple[ClaimHeader, ...]:
    if not isinstance(node.value, dict):
        raise node.fail(f"got {_show(node.value)}", "a mapping of header name to claim path")
    out: list[ClaimHeader] = []
    seen: set[str] = set()
    for header, child in node.items():
        _read_owned_header_name(_Node(header, child.path), header)
        if header.lower() in seen:
            raise _Node(header, child.path).fail(
                f"header {header!r} is listed twice (names are case-insensitive)"
            )
        seen.add(header.lower())
        fmt = "csv"
        claim_node = child
        if isinstance(child.value, dict):
            child.mapping(frozenset({"claim", "format"}), frozenset({"claim"}))
            claim_node = child.child("claim")
            fmt = _opt(child, "format", lambda n: n.choice(["csv", "json"]), "csv")
        out.append(ClaimHeader(header=header, claim=_read_claim_path(claim_node), format=fmt))
    return tuple(out)


def _read_rewrite(node: _Node, match: RouteMatch) -> PathRewrite:
    node.mapping(frozenset({"strip_prefix", "replace_prefix"}))
    if match.path_prefix is None:
        raise node.fail("a rewrite needs match.path_prefix", "match.path_prefix, not match.path")
    if node.has("strip_prefix") == node.has("replace_prefix"):
        raise node.fail("needs exactly one of strip_prefix, replace_prefix")
    if node.has("strip_prefix"):
        if not node.child("strip_prefix").boolean():
            raise node.child("strip_prefix").fail("false does nothing", "true, or no rewrite")
        return PathRewrite(match.path_prefix, "")
    replacement = _read_path(node.child("replace_prefix"))
    return PathRewrite(match.path_prefix, "" if replacement == "/" else replacement)


_ROUTE_KEYS: Final = frozenset(
    {"id", "match", "upstream", "auth", "claim_headers", "rewrite", "payload_header",
     "cors_preflight", "max_body_bytes", "max_concurrent_requests", "max_queued_requests",
     "escaped_slashes"}
)  # fmt: skip


def _read_route(
    node: _Node,
    issuers: Mapping[str, IssuerConfig],
    limits: Limits,
    mode: GatewayMode,
    base_dir: Path | None = None,
) -> RouteConfig:
    # In forward_auth mode the caller proxies: a route needs no upstream (one given is unused,
    # so one routes file can serve both modes).
    required = {"id", "match", "auth"} | ({"upstream"} if mode is GatewayMode.PROXY else set())
    node.mapping(_ROUTE_KEYS, frozenset(required))
    route_id = node.child("id").string(
        pattern=_ROUTE_ID, what="a lower-case id such as orders_read"
    )
    auth = _read_auth(node.child("auth"), issuers)
    claim_headers = _opt(node, "claim_headers", _read_claim_headers, ())
    payload_header = _opt(
        node, "payload_header", lambda n: _read_owned_header_name(n, n.value), None
    )
    for key, value in (("claim_headers", claim_headers), ("payload_header", payload_header)):
        if auth is None and value:
            raise node.child(key).fail(
                f"{key} on a route with 'auth: none'", "no identity on a public route"
            )
    if payload_header and payload_header.lower() in {h.header.lower() for h in claim_headers}:
        raise node.child("payload_header").fail(f"{payload_header!r} is also a claim header")
    match = _read_match(node.child("match"))
    cors = _opt(node, "cors_preflight", lambda n: n.boolean(), False)
    if cors and match.methods and "OPTIONS" not in match.methods:
        raise node.child("cors_preflight").fail(
            "preflights are OPTIONS requests, which match.methods leaves out",
            "OPTIONS in match.methods, or no methods list",
        )
    return RouteConfig(
        id=route_id,
        match=match,
        upstream=_opt(node, "upstream", lambda n: _read_upstream(n, base_dir), None),
        auth=auth,
        claim_headers=claim_headers,
        rewrite=_opt(node, "rewrite", lambda n: _read_rewrite(n, match), None),
        payload_header=payload_header,
        cors_preflight=cors,
        max_body_bytes=_opt(
            node, "max_body_bytes", lambda n: n.integer(low=0, high=2**62), limits.max_body_bytes
        ),
        max_concurrent_requests=_opt(
            node, "max_concurrent_requests", lambda n: n.integer(low=1, high=1_000_000),
            limits.max_concurrent_requests,
        ),
        max_queued_requests=_opt(
            node, "max_queued_requests", lambda n: n.integer(low=0, high=1_000_000),
            limits.max_queued_requests,
        ),
        keep_escaped_slashes=_opt(
            node, "escaped_slashes", lambda n: n.choice(["reject", "keep"]), "reject"
        ) == "keep",
    )  # fmt: skip


_TOP_KEYS: Final = frozenset(
    {"mode", "listen", "admin", "realm", "trusted_proxies", "strip_untrusted_headers",
     "upstream_defaults", "max_token_bytes", "limits", "token_cache_size",
     "token_cache_max_bytes", "issuers", "routes", "tracing"}
)  # fmt: skip


def _read_trusted_proxies(
    node: _Node,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in node.seq():
        text = item.string()
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise item.fail(f"invalid network {text!r}", "an IP address or CIDR") from None
    return tuple(nets)


def _read_strip_headers(node: _Node) -> frozenset[str]:
    names = set()
    for item in node.seq():
        name = item.string(pattern=_HEADER_NAME, what="a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise item.fail(f"header {name!r} is not the client's to lose", "a non-framing header")
        names.add(header_key(name))
    return frozenset(names)


def parse_config(document: Any, base_dir: Path | None = None) -> GatewayConfig:
    """Validate an already-parsed YAML document and freeze it into a ``GatewayConfig``.

    Relative ``jwks_file`` paths are resolved against ``base_dir`` (the config file's folder).
    """
    root = _Node(document, "")
    root.mapping(_TOP_KEYS, frozenset({"routes"}))
    issuers = _read_issuers(root.child("issuers"), base_dir) if root.has("issuers") else {}
    routes: list[RouteConfig] = []
    seen: dict[str, int] = {}
    limits = _opt(root, "limits", _read_limits, Limits())
    mode = GatewayMode(
        _opt(root, "mode", lambda n: n.choice([m.value for m in GatewayMode]), GatewayMode.PROXY)
    )
    trusted_proxies = _opt(root, "trusted_proxies", _read_trusted_proxies, ())
    if mode is GatewayMode.FORWARD_AUTH and not trusted_proxies:
        # The decision endpoints believe what the caller says the original request was: an
        # untrusted peer could name any path. Fail closed at load rather than trust everyone.
        raise root.child("trusted_proxies").fail(
            "forward_auth mode needs the callers' addresses",
            "a non-empty list of the networks nginx, Envoy or Traefik call from",
        )
    for item in root.child("routes").seq(non_empty=True):
        route = _read_route(item, issuers, limits, mode, base_dir)
        if route.id in seen:
            raise item.child("id").fail(
                f"duplicate route id {route.id!r} (first at routes[{seen[route.id]}])",
                "unique route ids",
            )
        seen[route.id] = len(routes)
        routes.append(route)
    return GatewayConfig(
        listen=_opt(root, "listen", lambda n: _read_listen(n, base_dir), ListenConfig()),
        admin=_opt(root, "admin", _read_admin, AdminConfig()),
        realm=_opt(
            root, "realm", lambda n: n.string(pattern=_REALM),
            DEFAULT_REALM,
        ),
        trusted_proxies=trusted_proxies,
        strip_untrusted_headers=_opt(
            root, "strip_untrusted_headers", _read_strip_headers, frozenset()
        ),
        upstream_defaults=_opt(
            root, "upstream_defaults", _read_upstream_defaults, UpstreamDefaults()
        ),
        max_token_bytes=_opt(
            root, "max_token_bytes", lambda n: n.integer(low=256, high=65536),
            DEFAULT_MAX_TOKEN_BYTES,
        ),
        limits=limits,
        token_cache_size=_opt(
            root, "token_cache_size", lambda n: n.integer(low=0, high=10_000_000),
            DEFAULT_TOKEN_CACHE_SIZE,
        ),
        token_cache_max_bytes=_opt(
            root, "token_cache_max_bytes", lambda n: n.integer(low=0, high=2**40),
            DEFAULT_TOKEN_CACHE_MAX_BYTES,
        ),
        issuers=MappingProxyType(issuers),
        routes=tuple(routes),
        mode=mode,
        tracing=_opt(root, "tracing", _read_tracing, None),
    )  # fmt: skip


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
