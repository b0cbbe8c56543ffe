"""The gateway's request handler: match, extract, verify, then strip, inject and forward."""

from __future__ import annotations

from aiohttp import web

from .claims import claim_headers
from .config import GatewayConfig
from .errors import Rejection
from .extractor import extract_bearer
from .proxy import Forwarder
from .reasons import Reason
from .record import RECORD_KEY
from .routing import RouteTable, check_raw_path
from .verifier import Verifier


class GatewayHandler:
    """Admits a request only after its route's policy is satisfied, then forwards it."""

    def __init__(self, config: GatewayConfig, verifier: Verifier, forwarder: Forwarder) -> None:
        self._table = RouteTable(config.routes)
        self._max_token_bytes = config.max_token_bytes
        self._verifier = verifier
        self._forwarder = forwarder

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        record = request[RECORD_KEY]
        path = check_raw_path(request.raw_path)
        route = self._table.match(request.method, path)
        if route is None:
            raise Rejection(Reason.ROUTE_NOT_FOUND)
        record.route = route.id
        injected: dict[str, str] = {}
        if route.auth is not None:
            token = extract_bearer(request.headers, self._max_token_bytes)
            verified = await self._verifier.verify(token, route.auth)
            record.issuer = verified.issuer.id
            record.kid = verified.kid
            injected = claim_headers(verified.claims, route.claim_headers)
        # Only now, with every check passed, does anything reach the upstream.
        return await self._forwarder.forward(request, route, injected)
