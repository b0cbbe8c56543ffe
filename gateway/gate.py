"""Judging a request by its route's policy: match, extract, verify; shared by both listener modes.

The proxy handler forwards what the gate admits; the forward-auth handler answers the caller
with the same decision.  One code path decides, whichever way the answer leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDictProxy

from .claims import identity_headers
from .config import AuthMode, GatewayConfig, RouteConfig
from .errors import Rejection
from .extractor import extract_token
from .headers import AUTH_OUTCOME_HEADER
from .metrics import GatewayMetrics
from .reasons import Reason
from .record import RequestRecord
from .routing import RouteTable, request_host, valid_host
from .verifier import Verifier


def is_cors_preflight(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """An OPTIONS request that announces a CORS preflight (Fetch standard §3.2.2)."""
    return (
        method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers
    )


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request the route's policy let through, with the identity headers it earned."""

    route: RouteConfig
    injected: dict[str, str]
    target: str  # the path as matched (unreserved escapes decoded) and the query as received


class Gate:
    """Admits a request only after its route's policy is satisfied."""

    __slots__ = ("_max_token_bytes", "_metrics", "_table", "_verifier")

    def __init__(self, config: GatewayConfig, verifier: Verifier, metrics: GatewayMetrics) -> None:
        self._table = RouteTable(config.routes)
        self._max_token_bytes = config.max_token_bytes
        self._verifier = verifier
        self._metrics = metrics

    async def admit(
        self,
        method: str,
        raw_target: str,
        host: str,
        headers: CIMultiDictProxy[str],
        record: RequestRecord,
    ) -> Admitted:
        """The route and identity headers for a request with this method, raw target (path and
        query as received), ``Host`` and headers; raises ``Rejection`` when it may not pass."""
        if not valid_host(host):
            # Only a host[:port] reaches host matching and X-Forwarded-Host.
            raise Rejection(Reason.REQUEST_REJECTED, "invalid Host")
        raw_path, sep, query = raw_target.partition("?")
        path = self._table.check(raw_path)
        route = self._table.match(
            method, path, request_host(host) if self._table.uses_hosts else ""
        )
        if route is None:
            raise Rejection(Reason.ROUTE_NOT_FOUND)
        record.route = route.id
        injected: dict[str, str] = {}
        policy = route.auth
        if policy is not None and not (route.cors_preflight and is_cors_preflight(method, headers)):
            if policy.mode is AuthMode.REPORT_ONLY:
                injected = await self._report_only(headers, route, query, record)
            else:
                found = extract_token(headers, query, policy.token_sources, self._max_token_bytes)
                if found is not None:
                    injected = await self._verify(route, found.token, record)
                elif policy.mode is AuthMode.REQUIRED:
                    raise Rejection(Reason.TOKEN_MISSING, "no token")
        # Most paths carry no escape to decode: the target is then the one received, as is.
        target = raw_target if path == raw_path else path + sep + query
        return Admitted(route, injected, target)

    async def _verify(
        self, route: RouteConfig, token: str, record: RequestRecord
    ) -> dict[str, str]:
        assert route.auth is not None
        span = record.span
        verified = await (
            self._verifier.verify(token, route.auth)
            if span is None
            else span.verify(self._verifier, token, route.auth, route.id)
        )
        record.issuer = verified.issuer.id
        record.kid = verified.kid
        return identity_headers(verified, route)

    async def _report_only(
        self, headers: CIMultiDictProxy[str], route: RouteConfig, query: str, record: RequestRecord
    ) -> dict[str, str]:
        """Verify as a required route would, but admit whatever the outcome, saying which."""
        assert route.auth is not None
        injected: dict[str, str] = {}
        try:
            found = extract_token(headers, query, route.auth.token_sources, self._max_token_bytes)
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
