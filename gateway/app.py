"""Application assembly: collaborators wired once, shared state under typed keys, resources in cleanup_ctx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from .clock import SYSTEM_CLOCK, Clock
from .config import AuthMode, GatewayConfig
from .documents import DocumentFetcher, HttpDocumentFetcher
from .handler import GatewayHandler
from .jwks import JwksCache
from .metrics import GatewayMetrics
from .middleware import create_observe_middleware
from .proxy import Forwarder, create_upstream_session
from .verifier import Verifier

CONFIG_KEY = web.AppKey("config", GatewayConfig)
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
JWKS_KEY = web.AppKey("jwks", JwksCache)
HANDLER_KEY = web.AppKey("handler", GatewayHandler)
DRAINING_KEY = web.AppKey("draining", list[bool])  # a one-slot box: set at shutdown

DocumentFetcherFactory = Callable[[aiohttp.ClientSession], DocumentFetcher]


def create_app(
    config: GatewayConfig,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock = SYSTEM_CLOCK,
    document_fetcher: DocumentFetcherFactory | None = None,
) -> web.Application:
    """Build the proxy application for ``config``.

    Collaborators are injected: a fresh ``CollectorRegistry`` per app unless one
    is given, the clock (tests pass a fake one), and the factory of the fetcher of
    discovery and JWKS documents (default: HTTP through the app's JWKS session).
    The upstream and JWKS client sessions are created on start-up and closed on
    clean-up.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = GatewayMetrics(
        registry,
        (r.id for r in config.routes),
        config.issuers,
        (r.id for r in config.routes if r.auth is not None and r.auth.mode is AuthMode.REPORT_ONLY),
    )
    app = web.Application(
        middlewares=[create_observe_middleware(metrics, config.realm)],
        handler_args={"max_field_size": 8190, "max_line_size": 8190},
    )
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics
    app[DRAINING_KEY] = [False]

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # JWKS traffic gets its own small session: it must not queue behind
        # upstream connections, and it may decompress what the IdP sends.
        jwks_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16), cookie_jar=aiohttp.DummyCookieJar()
        )
        upstream_session = create_upstream_session(config)
        fetcher = (
            document_fetcher(jwks_session)
            if document_fetcher is not None
            else HttpDocumentFetcher(jwks_session, clock)
        )
        jwks = JwksCache(config.issuers, fetcher, metrics, clock)
        app[JWKS_KEY] = jwks
        app[HANDLER_KEY] = GatewayHandler(
            config, Verifier(jwks, clock), Forwarder(config, upstream_session, metrics), metrics
        )
        jwks.start()
        try:
            yield
        finally:
            await jwks.close()
            await upstream_session.close()
            await jwks_session.close()

    app.cleanup_ctx.append(resources)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        # Policy routing is ours (RouteTable), so aiohttp's router has one catch-all.
        return await request.app[HANDLER_KEY](request)

    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
