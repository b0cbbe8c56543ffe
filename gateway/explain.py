"""``gateway explain``: what the gateway would do with one request, decided by its own steps.

Explain builds the request a client would send to a route (the token in the route's first token
source, unless the options say otherwise) and hands it to ``Gate.admit``, the decision both
listener modes call: the same route match, extractor, mode logic and verifier.  It then prints
what that decision was.  Which verifier checks passed and which one refused is read from the
verifier's check table (``verifier.checks``) and the ``CheckFailed`` it raised; nothing here
judges a token by itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TextIO
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from .binding import SenderCheck
from .clock import SYSTEM_CLOCK
from .config import (
    BEARER_HEADER,
    AuthMode,
    AuthPolicy,
    GatewayConfig,
    RouteConfig,
    TokenLocation,
    TokenSource,
)
from .documents import HttpDocumentFetcher
from .errors import Rejection
from .gate import Gate, is_cors_preflight
from .headers import AUTH_OUTCOME_HEADER
from .jwks import JwksCache
from .metrics import GatewayMetrics
from .reasons import REASON_SPECS, Reason, challenges
from .record import RequestRecord
from .tracing import VerifyNotes
from .verifier import CheckFailed, VerifiedToken, Verifier, checks, parse_token, token_facts

_ELIDED: Final = "<token>"  # how the request lines show the token


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """The request explain asks the gate about: what a client would send."""

    method: str
    target: str  # path and query, as on the request line
    host: str
    headers: tuple[tuple[str, str], ...]


def _source_text(source: TokenSource) -> str:
    if source.location is TokenLocation.HEADER:
        return f"{source.name}: {source.prefix}".rstrip()
    return f"{source.location} {source.name}"


def client_request(
    route: RouteConfig,
    token: str,
    *,
    method: str | None = None,
    path: str | None = None,
    host: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> ClientRequest:
    """A request that takes ``route`` (unless ``method``, ``path`` or ``host`` say otherwise),
    carrying ``headers`` and, when ``token`` is not empty, the token in the route's first
    token source."""
    match = route.match
    if method is None:
        method = "GET" if not match.methods or "GET" in match.methods else min(match.methods)
    if path is None:
        path = match.path or match.path_prefix or "/"
    if host is None:
        if match.hosts:
            host = min(match.hosts)
        elif match.host_suffixes:
            host = "explain" + match.host_suffixes[0]
        else:
            host = "localhost"
    sent = list(headers)
    if token:
        source = route.auth.token_sources[0] if route.auth is not None else BEARER_HEADER
        if source.location is TokenLocation.HEADER:
            sent.append((source.name, source.prefix + token))
        elif source.location is TokenLocation.COOKIE:
            sent.append(("Cookie", f"{source.name}={token}"))
        else:
            joiner = "&" if "?" in path else "?"
            path = f"{path}{joiner}{quote(source.name, safe='')}={quote(token, safe='')}"
    return ClientRequest(method.upper(), path, host, tuple(sent))


class _Watched(Verifier):
    """The verifier the gateway runs, remembering what it said (the gate keeps a report-only
    route's refusal to itself)."""

    token = ""
    outcome: VerifiedToken | Rejection | None = None

    async def verify(
        self, token: str, policy: AuthPolicy, notes: VerifyNotes | None = None
    ) -> VerifiedToken:
        self.token = token
        try:
            verified = await super().verify(token, policy, notes)
        except Rejection as rejection:
            self.outcome = rejection
            raise
        self.outcome = verified
        return verified


@dataclass(slots=True)
class Decision:
    """What the gate decided about one request, and what it saw on the way."""

    record: RequestRecord
    route: RouteConfig | None  # the route the request took, if one matched
    injected: Mapping[str, str] | None  # None: refused
    rejection: Rejection | None = None
    verification: VerifiedToken | Rejection | None = None  # None: the verifier was not asked
    token: str = ""  # the token the verifier was given


async def decide(config: GatewayConfig, request: ClientRequest) -> Decision:
    """Ask ``Gate.admit`` about ``request``, with keys fetched as the gateway fetches them."""
    record = RequestRecord()
    headers = CIMultiDictProxy(CIMultiDict(request.headers))
    async with aiohttp.ClientSession() as session:
        metrics = GatewayMetrics(CollectorRegistry(), (), config.issuers)
        keys = JwksCache(
            config.issuers, HttpDocumentFetcher(session, SYSTEM_CLOCK), metrics, SYSTEM_CLOCK
        )
        verifier = _Watched(keys, SYSTEM_CLOCK)
        gate = Gate(config, verifier, metrics, SenderCheck(config, SYSTEM_CLOCK))
        try:
            admitted = await gate.admit(
                request.method, request.target, request.host, headers, record
            )
        except Rejection as rejection:
            routes = {route.id: route for route in config.routes}
            route = routes.get(record.route)
            return Decision(record, route, None, rejection, verifier.outcome, verifier.token)
        finally:
            await keys.close()
    return Decision(
        record, admitted.route, admitted.injected, None, verifier.outcome, verifier.token
    )


def _print_token(token: str, out: TextIO) -> None:
    """The token's header and claims as decoded by the verifier's parser (display only)."""
    try:
        parsed = parse_token(token)
        payload = parsed.decoded_payload()
    except Rejection:
        print("header: null", file=out)
        print("claims: null", file=out)
        return
    print("header:", json.dumps(parsed.header, indent=2, sort_keys=True), file=out)
    print("claims:", json.dumps(payload, indent=2, sort_keys=True), file=out)


def _print_request(request: ClientRequest, token: str, out: TextIO) -> None:
    def shown(text: str) -> str:
        return text.replace(token, _ELIDED) if token else text

    print(f"request: {request.method} {shown(request.target)}", file=out)
    print(f"  Host: {request.host}", file=out)
    for name, value in request.headers:
        print(f"  {name}: {shown(value)}", file=out)


def _print_checks(
    policy: AuthPolicy, token: str, verification: VerifiedToken | Rejection, out: TextIO
) -> None:
    """Each check of the verifier's table: passed, the one that refused, or not reached."""
    table = checks(policy)
    if isinstance(verification, Rejection):
        if not isinstance(verification, CheckFailed) or verification.check not in table:
            print(f"  FAIL  {verification.detail or verification.reason.value}", file=out)
            return
        reached = table.index(verification.check)
    else:
        reached = len(table)
    facts = token_facts(token, policy)
    for position, check in enumerate(table):
        if position < reached:
            print(f"  ok    {check.name}: {check.says(facts)}", file=out)
        elif position == reached:
            assert isinstance(verification, Rejection)
            print(f"  FAIL  {check.name}: {verification.detail or verification.reason.value}",
                  file=out)  # fmt: skip
        else:
            print(f"  --    {check.name}: not reached", file=out)


def _answer(reason: Reason) -> str:
    spec = REASON_SPECS[reason]
    return f"{spec.status} {reason.value}: {spec.message}"


async def explain(
    config: GatewayConfig,
    route_id: str,
    token: str,
    out: TextIO,
    *,
    method: str | None = None,
    path: str | None = None,
    host: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> int:
    """Print what the gateway would do with a client's request to ``route_id`` carrying
    ``token``; return 0 if it would be forwarded, 1 if refused, 2 for an unknown route."""
    routes = {route.id: route for route in config.routes}
    asked = routes.get(route_id)
    if asked is None:
        print(f"unknown route {route_id!r}; expected one of: {', '.join(routes)}", file=out)
        return 2
    request = client_request(asked, token, method=method, path=path, host=host, headers=headers)
    _print_request(request, token, out)
    decision = await decide(config, request)
    if decision.token or token:
        _print_token(decision.token or token, out)
    route = decision.route
    if route is not None and route.id != asked.id:
        # The request built from the route's own match takes an earlier route only if shadowed.
        why = "" if (method, path, host) != (None, None, None) else " (an earlier route matches it)"
        print(f"note: this request takes route '{route.id}', not '{asked.id}'{why}", file=out)
    if route is None or route.auth is None:
        if route is not None:
            print(f"route '{route.id}' is public (auth: none): every request is forwarded",
                  file=out)  # fmt: skip
    else:
        _print_policy(route, route.auth, request, decision, out)
    if decision.injected is None:
        assert decision.rejection is not None
        rejection = decision.rejection
        print(f"result: {_answer(rejection.reason)}", file=out)
        for challenge in challenges(
            rejection.reason, config.realm, rejection.scope, rejection.dpop
        ):
            print(f"WWW-Authenticate: {challenge}", file=out)
        return 1
    print("result: admitted; the upstream would receive:", file=out)
    for name, value in decision.injected.items():
        print(f"  {name}: {value}", file=out)
    if not decision.injected:
        print("  (no identity headers)", file=out)
    return 0


def _print_policy(
    route: RouteConfig,
    policy: AuthPolicy,
    request: ClientRequest,
    decision: Decision,
    out: TextIO,
) -> None:
    """The route's part of the decision: the token found or not, then the checks it passed."""
    print(f"checks on route '{route.id}' (mode {policy.mode.value}):", file=out)
    verification = decision.verification
    record = decision.record
    headers = CIMultiDictProxy(CIMultiDict(request.headers))
    if verification is not None:
        print("  ok    token: one token in the request", file=out)
        _print_checks(policy, decision.token, verification, out)
    elif route.cors_preflight and is_cors_preflight(request.method, headers):
        print("  --    token: not needed (a CORS preflight)", file=out)
    else:
        # The extractor's answer: refused (invalid_request), or no token at all.
        if decision.rejection is not None:
            reason, detail = decision.rejection.reason, decision.rejection.detail
        elif record.auth_outcome is not None:
            reason, detail = record.auth_outcome, record.detail
        else:
            reason, detail = Reason.TOKEN_MISSING, "no token"
        if reason is Reason.TOKEN_MISSING:
            sources = ", ".join(_source_text(s) for s in policy.token_sources)
            mark = "--" if policy.mode is AuthMode.OPTIONAL else "FAIL"
            print(f"  {mark:<5} token: none in the request (looked in: {sources})", file=out)
        else:
            print(f"  FAIL  token: {detail or reason.value}", file=out)
    if policy.mode is AuthMode.REPORT_ONLY and record.auth_outcome is not None:
        outcome = record.auth_outcome
        if outcome is Reason.OK:
            print(f"report-only: the token is valid ({AUTH_OUTCOME_HEADER}: ok)", file=out)
        else:
            print(f"report-only: forwarded anyway ({AUTH_OUTCOME_HEADER}: {outcome.value}); "
                  f"mode required would answer {_answer(outcome)}", file=out)  # fmt: skip


def read_token(argument: str | None, stdin: TextIO = sys.stdin) -> str:
    """The token from the command line, or from standard input when absent or ``-``."""
    text = stdin.read() if argument in (None, "-") else argument
    assert text is not None
    token = text.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return token
