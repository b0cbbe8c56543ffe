"""Forward-auth mode: the decision endpoints nginx, Envoy and Traefik delegate authentication to.

Each caller describes the original request in its own way; ``Caller`` turns that back into
method, target and host, and the same ``Gate`` the proxy uses judges it.  Only peers in
``trusted_proxies`` are believed: the headers that describe the original request are exactly
the ones a client could forge if it reached this listener directly.

    /auth/nginx              nginx auth_request: X-Original-Method, X-Original-URI and Host;
                             ingress-nginx auth-url: X-Original-Method and X-Original-URL
    /auth/traefik            Traefik ForwardAuth: X-Forwarded-Method, -Uri, -Host
    /auth/envoy<path>        Envoy ext_authz (HTTP service, path_prefix /auth/envoy): the check
                             request's own method, path after the prefix, and Host

Allowed: 200 with the identity headers the route injects in proxy mode.  Denied: the proxy
mode's status, ``WWW-Authenticate`` and JSON body.  How each caller keeps a client's copy of
an owned header from reaching the upstream is in the README ("Behind nginx, Envoy or Traefik").
"""

from __future__ import annotations

import enum
import re
from typing import Final

from multidict import CIMultiDictProxy

from .config import GatewayConfig
from .errors import Rejection
from .gate import Gate
from .headers import header_key, token_carriers
from .metrics import GatewayMetrics
from .middleware import answer_rejection
from .reasons import Reason
from .server import Answer, HttpRequest

ENVOY_PREFIX: Final = "/auth/envoy"
# Envoy removes the request headers named here from what it sends upstream (ext_authz HTTP).
ENVOY_REMOVE_HEADER: Final = "x-envoy-auth-headers-to-remove"
# nginx drops an auth subrequest's body; its config can send this header's copy instead.
ERROR_BODY_HEADER: Final = "X-Gateway-Error"
_METHOD: Final = re.compile(r"[A-Z]{1,32}")


class Caller(enum.StrEnum):
    """Which proxy is asking, known from the endpoint it called (never from what it sends)."""

    NGINX = "nginx"
    TRAEFIK = "traefik"
    ENVOY = "envoy"


_ENDPOINTS: Final = {"/auth/nginx": Caller.NGINX, "/auth/traefik": Caller.TRAEFIK}


def _one(headers: CIMultiDictProxy[str], name: str) -> str | None:
    """The single value of header ``name``; a repeated one is ambiguous and refused."""
    values = headers.getall(name, [])
    if len(values) > 1:
        raise Rejection(Reason.REQUEST_REJECTED, f"{name} given {len(values)} times")
    return values[0] if values else None


def _required(headers: CIMultiDictProxy[str], name: str) -> str:
    value = _one(headers, name)
    if not value:
        raise Rejection(Reason.REQUEST_REJECTED, f"no {name} from the caller")
    return value


def _method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise Rejection(Reason.REQUEST_REJECTED, "invalid original method")
    return value


def _split_url(url: str) -> tuple[str, str]:
    """Host and raw target of an absolute http(s) URL, without decoding anything."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise Rejection(Reason.REQUEST_REJECTED, "X-Original-URL is not an absolute http(s) URL")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:cut], rest[cut:]
    if not authority or "@" in authority:
        raise Rejection(Reason.REQUEST_REJECTED, "X-Original-URL has no plain authority")
    if not target.startswith("/"):
        target = "/" + target
    return authority, target


def original_request(caller: Caller, request: HttpRequest, raw_path: str) -> tuple[str, str, str]:
    """The original request's method, raw target and ``Host`` as ``caller`` describes it."""
    headers = request.headers
    if caller is Caller.ENVOY:
        target = raw_path[len(ENVOY_PREFIX) :]
        if not target.startswith("/"):
            target = "/" + target  # "/auth/envoy" asks about "/", "/auth/envoy?x" about "/?x"
        return request.method, target, request.host
    if caller is Caller.TRAEFIK:
        method = _method(_required(headers, "X-Forwarded-Method"))
        target = _required(headers, "X-Forwarded-Uri")
        return method, target, _one(headers, "X-Forwarded-Host") or request.host
    method = _method(_required(headers, "X-Original-Method"))
    uri = _one(headers, "X-Original-URI")
    if uri is not None:
        # The common nginx pattern sets X-Original-URI (and Host) but not X-Original-URL, which a
        # client could then send itself: with an X-Original-URI, X-Original-URL is never read.
        return method, uri, request.host
    url = _one(headers, "X-Original-URL")  # ingress-nginx: $scheme://$http_host$request_uri
    if url is None:
        raise Rejection(Reason.REQUEST_REJECTED, "no X-Original-URI or X-Original-URL from nginx")
    host, target = _split_url(url)
    return method, target, host


class ForwardAuthHandler:
    """Answers a caller's check with the gate's decision instead of forwarding the request."""

    __slots__ = ("_gate", "_metrics", "_realm", "_removals", "_trusts")

    def __init__(self, config: GatewayConfig, gate: Gate, metrics: GatewayMetrics) -> None:
        self._gate = gate
        self._metrics = metrics
        self._realm = config.realm
        self._trusts = config.trusts
        # For Envoy, per route: every header a client may not hand the upstream — each owned
        # header (of every route, as proxy mode strips them) and, unless the route forwards
        # its token, the token's headers.  The ones an answer sets are taken out per request.
        owned = sorted(config.owned_headers)
        self._removals: dict[str, tuple[str, ...]] = {
            route.id: (*owned, *sorted(token_carriers(route).headers)) for route in config.routes
        }

    def _caller(self, raw_path: str) -> Caller:
        caller = _ENDPOINTS.get(raw_path.partition("?")[0])
        if caller is not None:
            return caller
        if raw_path == ENVOY_PREFIX or raw_path.startswith(
            (ENVOY_PREFIX + "/", ENVOY_PREFIX + "?")
        ):
            return Caller.ENVOY
        raise Rejection(Reason.ROUTE_NOT_FOUND, "not a forward-auth endpoint")

    async def __call__(self, request: HttpRequest) -> Answer:
        record = request.record
        raw_path = request.target
        caller = self._caller(raw_path)
        record.caller = caller.value
        try:
            if not self._trusts(request.remote):
                raise Rejection(Reason.CALLER_UNTRUSTED, "peer not in trusted_proxies")
            method, target, host = original_request(caller, request, raw_path)
            record.method, record.target = method, target
            admitted = await self._gate.admit(
                method, target, host, request.headers, record, request
            )
        except Rejection as rejection:
            # Answered here rather than by the middleware: the nginx copy of the body below.
            self._metrics.forward_auth_decision(caller.value, allowed=False)
            response = answer_rejection(record, rejection, self._realm)
            if caller is Caller.NGINX:
                response.headers.append((ERROR_BODY_HEADER, response.body.decode()))
            return response
        self._metrics.forward_auth_decision(caller.value, allowed=True)
        headers = list(admitted.injected.items())
        if caller is Caller.ENVOY:
            earned = {header_key(name) for name in admitted.injected}
            remove = [n for n in self._removals[admitted.route.id] if n not in earned]
            if remove:
                headers.append((ENVOY_REMOVE_HEADER, ",".join(remove)))
        record.status = 200
        return Answer(200, headers)
