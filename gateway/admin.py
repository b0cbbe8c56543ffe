"""The admin endpoints: Prometheus exposition, liveness and readiness, on their own listener."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from .app import GATEWAY_KEY, JWKS_KEY, METRICS_KEY


def create_admin_app(gateway: web.Application) -> web.Application:
    """The admin listener's application: /metrics, /healthz and /readyz for ``gateway``."""
    admin = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        # Liveness: the process answers.  Never tied to the IdP, so an IdP outage
        # does not make Kubernetes restart every gateway at once.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        jwks = gateway.get(JWKS_KEY)
        if gateway[GATEWAY_KEY].draining:
            return web.json_response({"status": "draining"}, status=503)
        if jwks is None:
            return web.json_response({"status": "starting"}, status=503)
        ready = jwks.ready()
        return web.json_response(
            {"status": "ready" if ready else "waiting_for_keys", "issuers": jwks.status()},
            status=200 if ready else 503,
        )

    admin.router.add_get("/metrics", make_aiohttp_handler(gateway[METRICS_KEY].registry))
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin
