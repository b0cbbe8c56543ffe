"""The observing middleware: the one place a request is counted, logged and, if rejected, answered."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .errors import Rejection
from .logs import REQUEST_LOGGER, kv
from .metrics import GatewayMetrics
from .reasons import REASON_SPECS, Reason, www_authenticate
from .record import RECORD_KEY, REQUEST_ID_HEADER, RequestRecord, request_id_from

log = logging.getLogger(REQUEST_LOGGER)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def rejection_response(reason: Reason, realm: str, scope: str | None = None) -> web.Response:
    """The response for a rejected request: status, challenge and a fixed JSON body from the spec."""
    spec = REASON_SPECS[reason]
    status = spec.status or 500
    body = {"error": {"code": status, "reason": reason.value, "message": spec.message}}
    response = web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
    challenge = www_authenticate(reason, realm, scope)
    if challenge is not None:
        response.headers["WWW-Authenticate"] = challenge
    return response


def answer_rejection(record: RequestRecord, rejection: Rejection, realm: str) -> web.Response:
    """Record why the request ends here and build its answer: the one way a rejection is
    turned into a response, by the middleware and by the forward-auth handler alike."""
    record.reason = rejection.reason
    record.detail = rejection.detail
    return rejection_response(rejection.reason, realm, rejection.scope)


def create_observe_middleware(
    metrics: GatewayMetrics, realm: Callable[[], str], draining: Callable[[], bool]
) -> Middleware:
    """Build the middleware that turns rejections into responses and records every request once."""

    def record_request(request: web.Request, record: RequestRecord, duration: float) -> None:
        metrics.observe_request(record.route, record.reason, duration)
        spec = REASON_SPECS[record.reason]
        if log.isEnabledFor(spec.log_level):
            log.log(
                spec.log_level,
                kv(
                    event="request",
                    request_id=record.request_id,
                    route=record.route,
                    caller=record.caller,
                    method=record.method or request.method,
                    path=(record.target or request.raw_path).partition("?")[0],
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

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = RequestRecord(request_id=request_id_from(request.headers.get(REQUEST_ID_HEADER)))
        request[RECORD_KEY] = record
        started = time.perf_counter()
        response: web.StreamResponse
        try:
            response = await handler(request)
        except Rejection as rejection:
            response = answer_rejection(record, rejection, realm())
        except web.HTTPException as exc:
            # aiohttp's own router refuses targets our catch-all cannot take
            # (`OPTIONS *`, `CONNECT host:port`): a bad request, not a server fault.
            record.reason = Reason.REQUEST_REJECTED
            record.detail = f"aiohttp_{exc.status}"
            response = rejection_response(Reason.REQUEST_REJECTED, realm())
        except asyncio.CancelledError:
            # The client went away (the server cancels its handler), or the shutdown drain
            # ended first: either way still counted and logged once.
            record.reason = Reason.REQUEST_CANCELLED if draining() else Reason.CLIENT_DISCONNECTED
            record_request(request, record, time.perf_counter() - started)
            raise
        except Exception:
            # The only broad catch in the gateway: anything unexpected is a 500 with a traceback.
            log.exception(kv(event="internal_error", route=record.route))
            record.reason = Reason.INTERNAL_ERROR
            response = rejection_response(Reason.INTERNAL_ERROR, realm())
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = record.request_id
        if record.status is None:
            record.status = response.status
        record_request(request, record, time.perf_counter() - started)
        return response

    return observe
