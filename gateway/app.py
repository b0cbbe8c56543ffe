"""Application assembly: collaborators wired once, shared state under typed keys, resources in cleanup_ctx.

The request path is built from the config into a handler (``GatewayHandler`` in proxy mode,
``ForwardAuthHandler`` in forward_auth mode) around one ``Gate``; a reload
builds a new one and swaps it in whole, so a request finishes on the config it
started with.  Key caches of issuers whose settings did not change survive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from .admission import Admission
from .binding import SenderCheck
from .clock import SYSTEM_CLOCK, Clock
from .config import AuthMode, GatewayConfig, GatewayMode, load_config
from .documents import DocumentFetcher, HttpDocumentFetcher
from .errors import ConfigError
from .forward_auth import Caller, ForwardAuthHandler
from .gate import Gate
from .handler import GatewayHandler
from .jwks import JwksCache
from .logs import kv
from .metrics import GatewayMetrics
from .middleware import HandlerSlot, Observer, rejection_response
from .proxy import Forwarder, admissions_for
from .server import HttpServer
from .token_cache import TokenCache
from .tracing import Tracing, build_provider
from .upstream import UpstreamPools
from .verifier import Verifier

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

DocumentFetcherFactory = Callable[[aiohttp.ClientSession], DocumentFetcher]


def _tls_restart_settings(config: GatewayConfig) -> tuple[object, ...] | None:
    tls = config.listen.tls
    return None if tls is None else (tls.min_version, tls.client_ca_file, tls.client_cert)


def _report_only_routes(config: GatewayConfig) -> list[str]:
    return [
        r.id for r in config.routes if r.auth is not None and r.auth.mode is AuthMode.REPORT_ONLY
    ]


class Gateway:
    """The running gateway: its current config and handler, key cache, sessions and metrics."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        clock: Clock,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.tracing = tracing  # spans, with a tracing block (set at start: a reload keeps it)
        self.draining = False
        self._handler: GatewayHandler | ForwardAuthHandler | None = None
        self.handler_slot = HandlerSlot()  # what the proxy listener's observer calls
        self._jwks: JwksCache | None = None
        self._upstream_pools: UpstreamPools | None = None
        # Each route's bound, made by the first _build_handler and kept across reloads.
        self._admissions: dict[str, Admission] = {}
        self._reload_lock = asyncio.Lock()
        # Survives reloads: every hit is re-checked against the route's current policy.
        self.token_cache = (
            TokenCache(config.token_cache_size, clock, config.token_cache_max_bytes)
            if config.token_cache_size
            else None
        )
        # Survives reloads too: a reload must not make a used DPoP proof usable again.
        self.sender = SenderCheck(config, clock)
        metrics.watch_replay_cache(self.sender.replay)

    @property
    def handler(self) -> GatewayHandler | ForwardAuthHandler:
        assert self._handler is not None, "the gateway has not started"
        return self._handler

    @property
    def jwks(self) -> JwksCache:
        assert self._jwks is not None, "the gateway has not started"
        return self._jwks

    @property
    def upstream_pools(self) -> UpstreamPools:
        assert self._upstream_pools is not None, "the gateway has not started"
        return self._upstream_pools

    def _build_handler(self, config: GatewayConfig) -> GatewayHandler | ForwardAuthHandler:
        verifier = Verifier(self.jwks, self.clock, self.token_cache)
        self.sender.reconfigure(config)
        gate = Gate(config, verifier, self.metrics, self.sender)
        if config.mode is GatewayMode.FORWARD_AUTH:
            return ForwardAuthHandler(config, gate, self.metrics)
        # Pools and admission bounds outlive the config: a reload never doubles either.
        self._admissions = admissions_for(config, self._admissions)
        forwarder = Forwarder(config, self.upstream_pools, self.metrics, self._admissions)
        return GatewayHandler(gate, forwarder)

    def start(self, jwks: JwksCache, upstream_pools: UpstreamPools) -> None:
        self._jwks = jwks
        self._upstream_pools = upstream_pools
        self._handler = self.handler_slot.current = self._build_handler(self.config)
        if self.tracing is not None:
            self.tracing.key_fetches = lambda: jwks.fetches_completed
        jwks.start()

    def apply(self, config: GatewayConfig) -> None:
        """Swap in a validated config: new routes and policies at once, surviving key caches."""
        old = self.config
        for what, before, after in (
            # A new certificate and key load without a restart (the listener's ServerTls).
            ("listen", dataclasses.replace(old.listen, tls=None),
             dataclasses.replace(config.listen, tls=None)),
            ("listen.tls", _tls_restart_settings(old), _tls_restart_settings(config)),
            ("admin", old.admin, config.admin),
            ("tracing", old.tracing, config.tracing),
            ("upstream_defaults.max_connections", old.upstream_defaults.max_connections,
             config.upstream_defaults.max_connections),
        ):  # fmt: skip
            if before != after:
                log.warning(kv(event="config_reload", ignored=what, why="needs_restart"))
        self.metrics.add_routes((r.id for r in config.routes), _report_only_routes(config))
        self.metrics.add_issuers(config.issuers)
        self.jwks.reconfigure(config.issuers)
        self._handler = self.handler_slot.current = self._build_handler(config)
        self.config = config

    async def reload(
        self, path: str | Path, *, count: bool = True, base_dir: Path | None = None
    ) -> bool:
        """Re-read ``path``; apply it if valid, else log (and count) the error and keep running.

        Workers pass ``count=False``: their supervisor validates and counts once.
        """
        async with self._reload_lock:
            try:
                config = await asyncio.to_thread(load_config, path, base_dir)
                if config.mode is not self.config.mode:
                    # The other mode's routes may lack upstreams, and callers expect one API.
                    raise ConfigError("mode", "changing the mode needs a restart")
            except ConfigError as exc:
                if count:
                    self.metrics.config_reloads.labels("failure").inc()
                log.error(
                    kv(event="config_reload", result="failure", file=str(path), error=str(exc))
                )
                return False
            self.apply(config)
            if count:
                self.metrics.config_reloads.labels("success").inc()
            log.info(kv(event="config_reload", result="success", routes=len(config.routes)))
            return True


GATEWAY_KEY = web.AppKey("gateway", Gateway)
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
JWKS_KEY = web.AppKey("jwks", JwksCache)


def create_app(
    config: GatewayConfig,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock = SYSTEM_CLOCK,
    document_fetcher: DocumentFetcherFactory | None = None,
    multiprocess: bool = False,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    """Build the proxy application for ``config``.

    Collaborators are injected: a fresh ``CollectorRegistry`` per app unless one
    is given, the clock (tests pass a fake one), and the factory of the fetcher of
    discovery and JWKS documents (default: HTTP through the app's JWKS session).
    The upstream and JWKS client sessions are created on start-up and closed on
    clean-up.  ``multiprocess`` is set by worker processes (``--workers``).  Spans are
    recorded with a ``tracing`` block, through ``tracer_provider`` when one is given (else one
    built from the block: OTLP/HTTP export); the provider is shut down (flushed) on clean-up.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = GatewayMetrics(registry, multiprocess=multiprocess)
    metrics.add_routes((r.id for r in config.routes), _report_only_routes(config))
    metrics.add_issuers(config.issuers)
    if config.mode is GatewayMode.FORWARD_AUTH:
        metrics.add_forward_auth_callers(c.value for c in Caller)
    if tracer_provider is None and config.tracing is not None:
        tracer_provider = build_provider(config.tracing)
    tracing = Tracing(tracer_provider) if tracer_provider is not None else None
    gateway = Gateway(config, metrics, clock, tracing)
    # The app is the lifecycle container (start-up and clean-up, shared keys); the proxy
    # listener is the gateway's own HttpServer (``gateway_runner``), not aiohttp's.
    app = web.Application()
    app[GATEWAY_KEY] = gateway
    app[METRICS_KEY] = metrics

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # JWKS traffic gets its own small session: it must not queue behind
        # upstream connections, and it may decompress what the IdP sends.
        jwks_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16), cookie_jar=aiohttp.DummyCookieJar()
        )
        upstream_pools = UpstreamPools(config.upstream_defaults.max_connections)
        fetcher = (
            document_fetcher(jwks_session)
            if document_fetcher is not None
            else HttpDocumentFetcher(jwks_session, clock)
        )
        jwks = JwksCache(config.issuers, fetcher, metrics, clock)
        app[JWKS_KEY] = jwks
        gateway.start(jwks, upstream_pools)
        try:
            yield
        finally:
            await jwks.close()
            await upstream_pools.close()
            await jwks_session.close()
            if tracing is not None:
                # Exports what is still queued (bounded by the export timeout), off the loop.
                await asyncio.to_thread(tracing.shutdown)

    app.cleanup_ctx.append(resources)

    return app


def http_server(app: web.Application) -> HttpServer:
    """The proxy listener's protocol factory for ``app``: every request observed, then handled
    by the gateway's current handler (a reload swaps it between requests)."""
    gateway = app[GATEWAY_KEY]
    observer = Observer(
        gateway.metrics,
        gateway.handler_slot,
        lambda: gateway.config.realm,
        lambda: gateway.draining,
        gateway.tracing,
    )
    return HttpServer(
        observer,
        lambda: gateway.config.limits,
        gateway.metrics,
        lambda reason: rejection_response(reason, gateway.config.realm),
    )


class GatewayRunner(web.AppRunner):
    """aiohttp's runner for the app's lifecycle (start-up and clean-up contexts, sites,
    graceful shutdown), serving the proxy listener with the gateway's own ``HttpServer``."""

    def __init__(
        self, app: web.Application, make_server: Callable[[], HttpServer], **kwargs: Any
    ) -> None:
        kwargs.pop("access_log", None)
        kwargs.pop("handler_cancellation", None)  # always: a client that leaves is cancelled
        super().__init__(app, **kwargs)
        self._make_http_server = make_server

    async def _make_server(self) -> Any:
        loop = asyncio.get_running_loop()
        self._app._set_loop(loop)
        self._app.on_startup.freeze()
        await self._app.startup()
        self._app.freeze()
        return self._make_http_server()


def gateway_runner(app: web.Application, **kwargs: object) -> GatewayRunner:
    """The runner that starts ``app`` and serves its proxy listener (``web.TCPSite`` on it)."""
    return GatewayRunner(app, lambda: http_server(app), **kwargs)
