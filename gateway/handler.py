"""The gateway's request handler: match, extract, verify, then strip, inject and forward."""

from __future__ import annotations

from aiohttp import web

from .claims import identity_headers
from .config import AUTH_OUTCOME_HEADER, AuthMode, GatewayConfig, RouteConfig
from .errors import Rejection
from .extractor import extract_token
from .metrics import GatewayMetrics
from .proxy import Forwarder
from .reasons import Reason
from .record import RECORD_KEY, RequestRecord
from .routing import RouteTable, request_host
from .verifier import Verifier


def is_cors_preflight(request: web.Request) -> bool:
    """An OPTIONS request that announces a CORS preflight (Fetch standard §3.2.2)."""
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and "Origin" in headers
        and "Access-Control-Request-Method" in headers
    )


class GatewayHandler:
    """Admits a request only after its route's policy is satisfied, then forwards it."""

    def __init__(
        self,
        config: GatewayConfig,
        verifier: Verifier,
        forwarder: Forwarder,
        metrics: GatewayMetrics,
    ) -> None:
        self._table = RouteTable(config.routes)
        self._max_token_bytes = config.max_token_bytes
        self._verifier = verifier
        self._forwarder = forwarder
        self._metrics = metrics

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        record = request[RECORD_KEY]
        raw_path = request.raw_path
        path = self._table.check(raw_path)
        host = request_host(request.host) if self._table.uses_hosts else ""
        route = self._table.match(request.method, path, host)
        if route is None:
            raise Rejection(Reason.ROUTE_NOT_FOUND)
        record.route = route.id
        injected: dict[str, str] = {}
        policy = route.auth
        if policy is not None and not (route.cors_preflight and is_cors_preflight(request)):
            query = raw_path.partition("?")[2]
            if policy.mode is AuthMode.REPORT_ONLY:
                injected = await self._report_only(request, route, query, record)
            else:
                found = extract_token(
                    request.headers, query, policy.token_sources, self._max_token_bytes
                )
                if found is not None:
                    injected = await self._verify(route, found.token, record)
                elif policy.mode is AuthMode.REQUIRED:
                    raise Rejection(Reason.TOKEN_MISSING, "no token")
        # Only now, with every check passed, does anything reach the upstream.
        return await self._forwarder.forward(request, route, injected)

    async def _verify(
        self, route: RouteConfig, token: str, record: RequestRecord
    ) -> dict[str, str]:
        assert route.auth is not None
        verified = await self._verifier.verify(token, route.auth)
        record.issuer = verified.issuer.id
        record.kid = verified.kid
        return identity_headers(verified, route)

    async def _report_only(
        self, request: web.Request, route: RouteConfig, query: str, record: RequestRecord
    ) -> dict[str, str]:
        """Verify as a required route would, but forward whatever the outcome, saying which."""
        assert route.auth is not None
        injected: dict[str, str] = {}
        try:
            found = extract_token(
                request.headers, query, route.auth.token_sources, self._max_token_bytes
            )
            if found is None:
                raise Rejection(Reason.TOKEN_MISSING, "no token")
            injected = await self._verify(route, found.token, record)
            outcome = Reason.OK
        except Rejection as rejection:
            outcome = rejection.reason
            record.detail = rejection.detail
        record.auth_outcome = outcome
        self._metrics.report_only.labels(route.id, outcome.value).inc()
        injected[AUTH_OUTCOME_HEADER] = outcome.value
        return injected
