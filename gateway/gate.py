"""Judging a request by its route's policy: match, extract, verify; shared by both listener modes.

The proxy handler forwards what the gate admits; the forward-auth handler answers the caller
with the same decision.  One code path decides, whichever way the answer leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDictProxy

from .binding import DPOP_HEADER, SenderCheck
from .claims import identity_headers
from .config import AuthMode, BindingMode, GatewayConfig, RouteConfig, TokenSource
from .errors import Rejection
from .extractor import FoundToken, extract_token
from .headers import AUTH_OUTCOME_HEADER
from .metrics import GatewayMetrics
from .reasons import Reason
from .record import RequestRecord
from .routing import RouteTable, request_host, valid_host
from .verifier import Verifier

if TYPE_CHECKING:
    from .server import HttpRequest


def is_cors_preflight(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """An OPTIONS request that announces a CORS preflight (Fetch standard §3.2.2)."""
    return (
        method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers
    )


# What a bound token's sender is checked by, as the client addressed the request: method, raw
# path, host, headers and the request as received (scheme, peer, client certificate).
_Request = tuple[str, str, str, CIMultiDictProxy[str], "HttpRequest | None"]


class Admitted:
    """A request the route's policy let through, with the identity headers it earned.  (A plain
    class: one is made per request, see ``ResponseHead`` in gateway/upstream.py.)"""

    __slots__ = ("injected", "route", "target")

    def __init__(self, route: RouteConfig, injected: Mapping[str, str], target: str) -> None:
        self.route: Final = route
        self.injected: Final = injected  # read-only: a cached token's may be shared by requests
        # The path as matched (unreserved escapes decoded) and the query as received.
        self.target: Final = target


class Gate:
    """Admits a request only after its route's policy is satisfied."""

    __slots__ = (
        "_known",
        "_max_token_bytes",
        "_metrics",
        "_sender",
        "_sources",
        "_table",
        "_verifier",
    )

    def __init__(
        self,
        config: GatewayConfig,
        verifier: Verifier,
        metrics: GatewayMetrics,
        sender: SenderCheck,
    ) -> None:
        self._table = RouteTable(config.routes)
        self._max_token_bytes = config.max_token_bytes
        self._verifier = verifier
        self._known = verifier.known
        self._metrics = metrics
        self._sender = sender
        # Where each route looks for its token: a DPoP route also reads Authorization: DPoP.
        self._sources: dict[str, tuple[TokenSource, ...]] = {
            route.id: (
                (*route.auth.token_sources, DPOP_HEADER)
                if route.auth.dpop is not BindingMode.OFF
                else route.auth.token_sources
            )
            for route in config.routes
            if route.auth is not None
        }

    async def admit(
        self,
        method: str,
        raw_target: str,
        host: str,
        headers: CIMultiDictProxy[str],
        record: RequestRecord,
        connection: HttpRequest | None = None,
    ) -> Admitted:
        """The route and identity headers for a request with this method, raw target (path and
        query as received), ``Host`` and headers; raises ``Rejection`` when it may not pass.
        ``connection`` (the request as received) tells a bound token's sender: its scheme,
        peer and client certificate."""
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
        injected: Mapping[str, str] = {}
        policy = route.auth
        if policy is not None and not (route.cors_preflight and is_cors_preflight(method, headers)):
            request = (method, raw_path, host, headers, connection)
            if policy.mode is AuthMode.REPORT_ONLY:
                injected = await self._report_only(request, route, query, record)
            else:
                try:
                    found = extract_token(
                        headers, query, self._sources[route.id], self._max_token_bytes, self._known
                    )
                    if found is not None:
                        injected = await self._verify(route, found, request, record)
                    elif policy.mode is AuthMode.REQUIRED:
                        raise Rejection(Reason.TOKEN_MISSING, "no token")
                except Rejection as rejection:
                    rejection.dpop = self._sender.challenge(route)
                    raise
        # Most paths carry no escape to decode: the target is then the one received, as is.
        target = raw_target if path == raw_path else path + sep + query
        return Admitted(route, injected, target)

    async def _verify(
        self, route: RouteConfig, found: FoundToken, request: _Request, record: RequestRecord
    ) -> Mapping[str, str]:
        policy = route.auth
        assert policy is not None
        span = record.span
        verified = await (
            self._verifier.verify(found.token, policy)
            if span is None
            else span.verify(self._verifier, found.token, policy, route.id)
        )
        record.issuer = verified.issuer.id
        record.kid = verified.kid
        if (
            "cnf" in verified.claims
            or found.source is DPOP_HEADER
            or policy.dpop is BindingMode.REQUIRED
            or policy.certificate_bound is BindingMode.REQUIRED
        ):
            method, raw_path, host, headers, connection = request
            self._sender.check(
                route,
                found.source,
                found.token,
                verified.claims,
                method=method,
                raw_path=raw_path,
                host=host,
                headers=headers,
                connection=connection,
            )
        memo = verified.memo
        if memo.route is not route:
            # Rendered once per (cached token, route): they depend on nothing else.
            memo.headers = identity_headers(verified, route)
            memo.route = route
        return memo.headers

    async def _report_only(
        self, request: _Request, route: RouteConfig, query: str, record: RequestRecord
    ) -> Mapping[str, str]:
        """Verify as a required route would, but admit whatever the outcome, saying which."""
        assert route.auth is not None
        injected: Mapping[str, str] = {}
        try:
            found = extract_token(
                request[3], query, self._sources[route.id], self._max_token_bytes, self._known
            )
            if found is None:
                raise Rejection(Reason.TOKEN_MISSING, "no token")
            injected = await self._verify(route, found, request, record)
            outcome = Reason.OK
        except Rejection as rejection:
            outcome = rejection.reason
            record.detail = rejection.detail
        record.auth_outcome = outcome
        self._metrics.report_only.labels(route.id, outcome.value).inc()
        return {**injected, AUTH_OUTCOME_HEADER: outcome.value}
