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
from .extractor import Carriers, FoundToken
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


_REPORT_ONLY: Final = AuthMode.REPORT_ONLY
_REQUIRED: Final = AuthMode.REQUIRED
_BINDING_REQUIRED: Final = BindingMode.REQUIRED
_DPOP: Final = DPOP_HEADER


class RoutePlan:
    """What the gate reads of one route on every request, read once from its config: in the
    compiled build each is a field load, where the config's Python dataclasses and enums cost an
    attribute look-up each."""

    __slots__ = (
        "carriers",
        "cors_preflight",
        "id",
        "policy",
        "report_only",
        "required",
        "route",
        "sender_required",
    )

    def __init__(self, route: RouteConfig) -> None:
        self.route: Final = route
        self.id: Final = route.id
        policy = route.auth
        self.policy: Final = policy
        self.cors_preflight: Final = route.cors_preflight
        self.report_only: Final = policy is not None and policy.mode is _REPORT_ONLY
        self.required: Final = policy is not None and policy.mode is _REQUIRED
        # Whether every token needs its sender checked, bound (cnf) or not.
        self.sender_required: Final = policy is not None and (
            policy.dpop is _BINDING_REQUIRED or policy.certificate_bound is _BINDING_REQUIRED
        )
        # Where the route looks for its token: a DPoP route also reads Authorization: DPoP.
        sources: tuple[TokenSource, ...] = ()
        if policy is not None:
            sources = policy.token_sources
            if policy.dpop is not BindingMode.OFF:
                sources = (*sources, _DPOP)
        self.carriers: Final = Carriers(sources)


class Gate:
    """Admits a request only after its route's policy is satisfied."""

    __slots__ = (
        "_known",
        "_max_token_bytes",
        "_metrics",
        "_plans",
        "_sender",
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
        # By the route's index in the table.
        self._plans = tuple(RoutePlan(route) for route in config.routes)

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
        index = self._table.find(method, path, request_host(host) if self._table.uses_hosts else "")
        if index < 0:
            raise Rejection(Reason.ROUTE_NOT_FOUND)
        plan = self._plans[index]
        route = plan.route
        record.route = plan.id
        injected: Mapping[str, str] = {}
        if plan.policy is not None and not (
            plan.cors_preflight and is_cors_preflight(method, headers)
        ):
            request = (method, raw_path, host, headers, connection)
            if plan.report_only:
                injected = await self._report_only(request, plan, query, record)
            else:
                try:
                    found = plan.carriers.extract(
                        headers, query, self._max_token_bytes, self._known
                    )
                    if found is not None:
                        injected = await self._verify(plan, found, request, record)
                    elif plan.required:
                        raise Rejection(Reason.TOKEN_MISSING, "no token")
                except Rejection as rejection:
                    rejection.dpop = self._sender.challenge(route)
                    raise
        # Most paths carry no escape to decode: the target is then the one received, as is.
        target = raw_target if path == raw_path else path + sep + query
        return Admitted(route, injected, target)

    async def _verify(
        self, plan: RoutePlan, found: FoundToken, request: _Request, record: RequestRecord
    ) -> Mapping[str, str]:
        route = plan.route
        policy = plan.policy
        assert policy is not None
        span = record.span
        if span is None:
            # A cached token needs no await (and no coroutine): only a miss goes on to verify.
            verified = self._verifier.cached(found.token, policy)
            if verified is None:
                verified = await self._verifier.verify(found.token, policy)
        else:
            verified = await span.verify(self._verifier, found.token, policy, route.id)
        record.issuer = verified.issuer.id
        record.kid = verified.kid
        if verified.bound or found.source is _DPOP or plan.sender_required:
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
        self, request: _Request, plan: RoutePlan, query: str, record: RequestRecord
    ) -> Mapping[str, str]:
        """Verify as a required route would, but admit whatever the outcome, saying which."""
        injected: Mapping[str, str] = {}
        try:
            found = plan.carriers.extract(request[3], query, self._max_token_bytes, self._known)
            if found is None:
                raise Rejection(Reason.TOKEN_MISSING, "no token")
            injected = await self._verify(plan, found, request, record)
            outcome = Reason.OK
        except Rejection as rejection:
            outcome = rejection.reason
            record.detail = rejection.detail
        record.auth_outcome = outcome
        self._metrics.report_only.labels(plan.id, outcome.value).inc()
        return {**injected, AUTH_OUTCOME_HEADER: outcome.value}
