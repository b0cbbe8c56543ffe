"""The observer around every request: the one place a request is counted, logged and, if
rejected, answered."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache

from .errors import Rejection
from .headers import REQUEST_ID_HEADER
from .logs import REQUEST_LOGGER, kv
from .metrics import GatewayMetrics
from .reasons import REASON_SPECS, DpopChallenge, Outcome, Reason, challenges
from .record import RequestRecord, request_id_from
from .server import Answer, HttpRequest
from .tracing import Tracing, incoming

log = logging.getLogger(REQUEST_LOGGER)

RequestHandler = Callable[[HttpRequest], Awaitable[Answer | None]]
"""A request handler returns the answer to send, or ``None`` once it streamed its own."""


@lru_cache(maxsize=256)
def _rejection_body(reason: Reason) -> bytes:
    spec = REASON_SPECS[reason]
    status = spec.status or 500
    body = {"error": {"code": status, "reason": reason.value, "message": spec.message}}
    return json.dumps(body).encode()


def rejection_response(
    reason: Reason, realm: str, scope: str | None = None, dpop: DpopChallenge | None = None
) -> Answer:
    """The answer to a rejected request: status, challenge and a fixed JSON body from the spec."""
    spec = REASON_SPECS[reason]
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    for challenge in challenges(reason, realm, scope, dpop):
        headers.append(("WWW-Authenticate", challenge))
    if dpop is not None and dpop.nonce is not None:
        headers.append(("DPoP-Nonce", dpop.nonce))
    return Answer(spec.status or 500, headers, _rejection_body(reason))


def answer_rejection(record: RequestRecord, rejection: Rejection, realm: str) -> Answer:
    """Record why the request ends here and build its answer: the one way a rejection is
    turned into a response, by the observer and by the forward-auth handler alike."""
    record.reason = rejection.reason
    record.detail = rejection.detail
    return rejection_response(rejection.reason, realm, rejection.scope, rejection.dpop)


class HandlerSlot:
    """The handler requests go to now: the gateway puts one in at start and a reload swaps it
    between requests.  (A compiled field: the observer reads it with no interpreted frame.)"""

    __slots__ = ("current",)

    def __init__(self, handler: RequestHandler | None = None) -> None:
        self.current = handler


class Observer:
    """Runs the current handler for each request; turns rejections into answers and records
    every request once (count, duration, one log line)."""

    __slots__ = ("_draining", "_handler", "_metrics", "_realm", "_tracing")

    def __init__(
        self,
        metrics: GatewayMetrics,
        handler: HandlerSlot,
        realm: Callable[[], str],
        draining: Callable[[], bool],
        tracing: Tracing | None = None,
    ) -> None:
        self._metrics = metrics
        self._handler = handler
        self._realm = realm
        self._draining = draining
        self._tracing = tracing

    async def __call__(self, request: HttpRequest) -> None:
        record = request.record
        headers = request.headers
        record.request_id = request_id_from(headers.get(REQUEST_ID_HEADER))
        record.trace = trace = incoming(headers)
        if self._tracing is not None:
            record.span = self._tracing.request(trace, request.method)
        started = time.perf_counter()
        answer: Answer | None
        try:
            current = self._handler.current
            assert current is not None, "the gateway has not started"
            answer = await current(request)
        except Rejection as rejection:
            answer = answer_rejection(record, rejection, self._realm())
        except asyncio.CancelledError:
            # The client went away (its handler is cancelled), or the shutdown drain ended
            # first: either way still counted and logged once.
            record.reason = (
                Reason.REQUEST_CANCELLED if self._draining() else Reason.CLIENT_DISCONNECTED
            )
            self._record(request, record, time.perf_counter() - started)
            raise
        except Exception:
            # The only broad catch in the gateway: anything unexpected is a 500 with a traceback.
            log.exception(kv(event="internal_error", route=record.route))
            record.reason = Reason.INTERNAL_ERROR
            answer = rejection_response(Reason.INTERNAL_ERROR, self._realm())
        if answer is not None:
            if request.response_started:
                # A failure after the response began: the client must see a cut stream.
                request.close_connection(abort=True)
            elif not request.client_gone:
                answer.headers.append((REQUEST_ID_HEADER, record.request_id))
                request.respond(answer)
            if record.status is None:
                record.status = answer.status
        self._record(request, record, time.perf_counter() - started)

    def _record(self, request: HttpRequest, record: RequestRecord, duration: float) -> None:
        self._metrics.observe_request(record.route, record.reason, duration)
        spec = REASON_SPECS[record.reason]
        span = record.span
        if span is not None:
            record.span = None
            span.end(
                record,
                (record.target or request.target).partition("?")[0],
                spec.outcome is Outcome.ERROR,
            )
        if log.isEnabledFor(spec.log_level):
            trace = record.trace
            log.log(
                spec.log_level,
                kv(
                    event="request",
                    request_id=record.request_id,
                    trace_id=trace.trace_id if trace is not None else None,
                    route=record.route,
                    caller=record.caller,
                    method=record.method or request.method,
                    path=(record.target or request.target).partition("?")[0],
                    status=record.status,
                    reason=record.reason.value,
                    outcome=spec.outcome.value,
                    granted=str(record.reason is Reason.OK).lower(),
                    issuer=record.issuer,
                    kid=record.kid,
                    would_reject=(
                        record.auth_outcome.value
                        if record.auth_outcome not in (None, Reason.OK)
                        else None
                    ),
                    duration_ms=f"{duration * 1000:.2f}",
                    detail=record.detail or None,
                ),
            )
