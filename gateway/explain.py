"""``gateway explain``: how the gateway would judge one token on one route, check by check."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import aiohttp
import jwt
from prometheus_client import CollectorRegistry

from .claims import identity_headers
from .clock import SYSTEM_CLOCK
from .config import GatewayConfig
from .documents import HttpDocumentFetcher
from .errors import Rejection
from .jwks import JwksCache
from .metrics import GatewayMetrics
from .reasons import REASON_SPECS, Reason, www_authenticate
from .verifier import Verifier


def _decoded(token: str) -> tuple[Any, Any]:
    """The unverified header and payload, for display only."""
    try:
        parts = jwt.decode_complete(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None, None
    return parts["header"], parts["payload"]


async def explain(config: GatewayConfig, route_id: str, token: str, out: TextIO) -> int:
    """Print the decoded token and each check in order; return 0 if the route would admit it."""
    routes = {route.id: route for route in config.routes}
    route = routes.get(route_id)
    if route is None:
        print(f"unknown route {route_id!r}; expected one of: {', '.join(routes)}", file=out)
        return 2
    header, payload = _decoded(token)
    print("header:", json.dumps(header, indent=2, sort_keys=True), file=out)
    print("claims:", json.dumps(payload, indent=2, sort_keys=True), file=out)
    if route.auth is None:
        print(f"route '{route.id}' is public (auth: none): every request is forwarded", file=out)
        return 0
    print(f"checks on route '{route.id}' (mode {route.auth.mode.value}):", file=out)
    trace: list[str] = []
    async with aiohttp.ClientSession() as session:
        metrics = GatewayMetrics(CollectorRegistry(), (), config.issuers)
        keys = JwksCache(
            config.issuers, HttpDocumentFetcher(session, SYSTEM_CLOCK), metrics, SYSTEM_CLOCK
        )
        try:
            verified = await Verifier(keys, SYSTEM_CLOCK).verify(token, route.auth, trace)
            headers = identity_headers(verified, route)
            reason = Reason.OK
            detail = ""
        except Rejection as rejection:
            reason, detail, headers = rejection.reason, rejection.detail, {}
            scope = rejection.scope
        else:
            scope = None
        finally:
            await keys.close()
    for line in trace:
        print(f"  ok    {line}", file=out)
    spec = REASON_SPECS[reason]
    if reason is Reason.OK:
        print("result: admitted; the upstream would receive:", file=out)
        for name, value in headers.items():
            print(f"  {name}: {value}", file=out)
        return 0
    print(f"  FAIL  {detail or reason.value}", file=out)
    print(f"result: {spec.status} {reason.value}: {spec.message}", file=out)
    challenge = www_authenticate(reason, config.realm, scope)
    if challenge:
        print(f"WWW-Authenticate: {challenge}", file=out)
    return 1


def read_token(argument: str | None, stdin: TextIO = sys.stdin) -> str:
    """The token from the command line, or from standard input when absent or ``-``."""
    text = stdin.read() if argument in (None, "-") else argument
    assert text is not None
    token = text.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return token
