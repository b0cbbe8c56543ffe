"""The observing middleware: each reason's answer, and one count, one duration and one decision line
per request, whichever way it ends.

``rejection_response`` is called directly.  The observer runs in front of small handlers on the
gateway's own server on loopback, so a client that goes away really goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from gateway.config import Limits
from gateway.errors import Rejection
from gateway.headers import REQUEST_ID_HEADER
from gateway.logs import REQUEST_LOGGER
from gateway.metrics import UNMATCHED_ROUTE, GatewayMetrics
from gateway.middleware import HandlerSlot, Observer, rejection_response
from gateway.reasons import REASON_SPECS, DpopChallenge, Reason
from gateway.server import Answer, HttpRequest, HttpServer
from tests.conftest import metric_value

REALM = "gw"
ROUTE = "orders"
SECRET = "database password is hunter2"

_INVALID_TOKEN = [
    Reason.TOKEN_MALFORMED,
    Reason.TOKEN_TYPE_INVALID,
    Reason.ALGORITHM_NOT_ALLOWED,
    Reason.ISSUER_NOT_ALLOWED,
    Reason.KEY_NOT_FOUND,
    Reason.SIGNATURE_INVALID,
    Reason.TOKEN_EXPIRED,
    Reason.TOKEN_NOT_YET_VALID,
    Reason.CLAIM_MISSING,
    Reason.CLAIM_INVALID,
    Reason.AUDIENCE_NOT_ALLOWED,
    Reason.DPOP_BINDING_MISMATCH,
    Reason.CERT_BINDING_MISMATCH,
]
# What a client sees for each reason that is answered: the status, and the RFC 6750 error of the
# challenge (None: no WWW-Authenticate at all; "": a challenge without an error).
ANSWERS: dict[Reason, tuple[int, str | None]] = {
    Reason.ROUTE_NOT_FOUND: (404, None),
    Reason.REQUEST_REJECTED: (400, None),
    Reason.REQUEST_MALFORMED: (400, None),
    Reason.HEADERS_TOO_LARGE: (431, None),
    Reason.VERSION_NOT_SUPPORTED: (505, None),
    Reason.TRANSFER_CODING_NOT_SUPPORTED: (501, None),
    Reason.TOO_MANY_CONNECTIONS: (503, None),
    Reason.INVALID_REQUEST: (400, "invalid_request"),
    Reason.CALLER_UNTRUSTED: (403, None),
    Reason.TOKEN_MISSING: (401, ""),
    # Without a DPoP route's challenge (see test_dpop_challenges): a Bearer one, no error.
    Reason.DPOP_REQUIRED: (401, ""),
    Reason.DPOP_PROOF_INVALID: (401, ""),
    Reason.DPOP_PROOF_REPLAYED: (401, ""),
    Reason.DPOP_NONCE_REQUIRED: (401, ""),
    **{reason: (401, "invalid_token") for reason in _INVALID_TOKEN},
    Reason.INSUFFICIENT_SCOPE: (403, "insufficient_scope"),
    Reason.JWKS_UNAVAILABLE: (503, None),
    Reason.PAYLOAD_TOO_LARGE: (413, None),
    Reason.CLIENT_TIMEOUT: (408, None),
    Reason.UPSTREAM_OVERLOADED: (503, None),
    Reason.UPSTREAM_UNAVAILABLE: (502, None),
    Reason.UPSTREAM_TIMEOUT: (504, None),
    Reason.INTERNAL_ERROR: (500, None),
}


def test_the_table_covers_every_reason_that_is_answered() -> None:
    answered = {reason for reason in Reason if REASON_SPECS[reason].status is not None}
    assert set(ANSWERS) == answered


@pytest.mark.parametrize(
    ("reason", "bearer_too", "expected"),
    [
        pytest.param(
            Reason.DPOP_PROOF_INVALID,
            False,
            [
                'DPoP realm="gw", algs="ES256 RS256", error="invalid_dpop_proof", '
                'error_description="The DPoP proof is invalid."'
            ],
            id="required-route-proof",
        ),
        pytest.param(
            Reason.DPOP_PROOF_REPLAYED,
            True,
            [
                'Bearer realm="gw"',
                'DPoP realm="gw", algs="ES256 RS256", error="invalid_dpop_proof", '
                'error_description="The DPoP proof was already used."',
            ],
            id="allowed-route-replay",
        ),
        pytest.param(
            Reason.TOKEN_MISSING,
            True,
            ['Bearer realm="gw"', 'DPoP realm="gw", algs="ES256 RS256"'],
            id="allowed-route-no-token",
        ),
        pytest.param(
            Reason.TOKEN_EXPIRED,
            False,
            [
                'DPoP realm="gw", algs="ES256 RS256", error="invalid_token", '
                'error_description="The token has expired."'
            ],
            id="required-route-expired",
        ),
    ],
)
def test_dpop_challenges(reason: Reason, bearer_too: bool, expected: list[str]) -> None:
    # RFC 9449 §7.1: a DPoP route challenges with DPoP and its algs; Bearer too where accepted.
    response = rejection_response(reason, REALM, dpop=DpopChallenge("ES256 RS256", bearer_too))
    assert [v for k, v in response.headers if k == "WWW-Authenticate"] == expected


@pytest.mark.parametrize(("reason", "answer"), ANSWERS.items(), ids=[r.value for r in ANSWERS])
def test_rejection_response(reason: Reason, answer: tuple[int, str | None]) -> None:
    status, error = answer
    response = rejection_response(reason, REALM)
    headers = CIMultiDict(response.headers)
    assert response.status == status
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    message = REASON_SPECS[reason].message
    assert json.loads(response.body) == {
        "error": {"code": status, "reason": reason.value, "message": message}
    }
    challenge = headers.get("WWW-Authenticate")
    if error is None:
        assert challenge is None
    elif error == "":
        assert challenge == f'Bearer realm="{REALM}"'  # RFC 6750 §3: no token, no error code
    else:
        assert challenge == (
            f'Bearer realm="{REALM}", error="{error}", error_description="{message}"'
        )


def test_insufficient_scope_names_the_scope_it_needs() -> None:
    response = rejection_response(Reason.INSUFFICIENT_SCOPE, REALM, "orders:read orders:write")
    challenge = CIMultiDict(response.headers)["WWW-Authenticate"]
    assert challenge.endswith(', scope="orders:read orders:write"')


def test_only_insufficient_scope_names_a_scope() -> None:
    response = rejection_response(Reason.TOKEN_EXPIRED, REALM, "orders:read")
    assert "scope=" not in CIMultiDict(response.headers)["WWW-Authenticate"]


# --- the observer on a loopback server --------------------------------------------------------------
class Client:
    """GETs to the loopback server under test."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self._session = session
        self._port = port

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        response = await self._session.get(f"http://127.0.0.1:{self._port}{path}", **kwargs)
        await response.read()
        return response


@dataclass
class Observed:
    """A server whose handlers end requests in every way, behind the observer."""

    client: Client
    registry: CollectorRegistry
    realm: list[str] = field(default_factory=lambda: [REALM])
    draining: list[bool] = field(default_factory=lambda: [False])
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, reason: Reason, route: str = ROUTE) -> float:
        return metric_value(
            self.registry, "gateway_requests_total", route=route, reason=reason.value
        )

    def counted(self, route: str = ROUTE) -> float:
        """Requests counted for ``route``, whatever their reason."""
        return sum(self.count(reason, route) for reason in Reason)

    def timed(self, route: str = ROUTE) -> float:
        """Durations observed for ``route``, whatever their outcome."""
        return sum(
            metric_value(
                self.registry,
                "gateway_request_duration_seconds_count",
                route=route,
                outcome=outcome,
            )
            for outcome in ("allowed", "rejected", "error")
        )


def _routed(request: HttpRequest) -> None:
    request.record.route = ROUTE


@pytest.fixture
async def observed() -> AsyncIterator[Observed]:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, route_ids=[ROUTE])
    holder: dict[str, Observed] = {}

    def state() -> Observed:
        return holder["observed"]

    async def handler(request: HttpRequest) -> Answer | None:
        path = request.target
        if path == "/ok":
            _routed(request)
            return Answer(200, [("Content-Type", "text/plain")], b"fine")
        if path.startswith("/reject/"):
            _routed(request)
            raise Rejection(Reason(path.removeprefix("/reject/")), "exp passed 5s ago")
        if path == "/scope":
            _routed(request)
            raise Rejection(Reason.INSUFFICIENT_SCOPE, "missing orders:write", scope="orders:write")
        if path == "/boom":
            _routed(request)
            raise RuntimeError(SECRET)
        if path == "/hang":
            _routed(request)
            state().entered.set()
            await asyncio.Event().wait()
            raise AssertionError("never answered")
        raise Rejection(Reason.ROUTE_NOT_FOUND)

    observer = Observer(
        metrics, HandlerSlot(handler), lambda: state().realm[0], lambda: state().draining[0]
    )
    server = HttpServer(
        observer, Limits, metrics, lambda reason: rejection_response(reason, state().realm[0])
    )
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as session:
        holder["observed"] = Observed(Client(session, port), registry)
        yield holder["observed"]
    listener.close()
    server.pre_shutdown()
    await server.shutdown(1)
    await listener.wait_closed()


@pytest.fixture
def decisions(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.INFO)

    def lines() -> list[str]:
        messages = (r.getMessage() for r in caplog.records if r.name == REQUEST_LOGGER)
        return [m for m in messages if m.startswith("event=request ")]

    return lines


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split())


async def eventually(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll ``predicate`` while loopback I/O lands; fail after ``within_s``."""
    for _ in range(int(within_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate()


async def test_an_answered_request_is_counted_timed_and_logged_once(
    observed: Observed, decisions: Callable[[], list[str]]
) -> None:
    response = await observed.client.get("/ok")
    assert response.status == 200
    assert await response.text() == "fine"
    request_id = response.headers[REQUEST_ID_HEADER]
    assert observed.count(Reason.OK) == 1
    assert (observed.counted(), observed.timed()) == (1, 1)
    (line,) = decisions()
    logged = fields(line)
    assert logged["request_id"] == request_id
    assert (logged["route"], logged["method"], logged["path"]) == (ROUTE, "GET", "/ok")
    assert (logged["status"], logged["reason"]) == ("200", "ok")
    assert (logged["outcome"], logged["granted"]) == ("allowed", "true")
    assert "detail" not in logged


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param("trace-42", True, id="sane-id-kept"),
        pytest.param("a" * 128, True, id="longest-sane-id-kept"),
        pytest.param("a" * 129, False, id="too-long-replaced"),
        pytest.param("two words", False, id="space-replaced"),
        pytest.param('x"y', False, id="quote-replaced"),
    ],
)
async def test_the_clients_request_id_is_used_only_when_sane(
    observed: Observed, decisions: Callable[[], list[str]], sent: str, kept: bool
) -> None:
    response = await observed.client.get("/ok", headers={REQUEST_ID_HEADER: sent})
    returned = response.headers[REQUEST_ID_HEADER]
    assert (returned == sent) is kept
    assert fields(decisions()[0])["request_id"] == returned


async def test_a_rejection_is_answered_from_its_reason_and_its_detail_only_logged(
    observed: Observed, decisions: Callable[[], list[str]]
) -> None:
    response = await observed.client.get("/reject/token_expired")
    assert response.status == 401
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["WWW-Authenticate"].startswith(f'Bearer realm="{REALM}", error=')
    body = await response.text()
    assert json.loads(body)["error"]["reason"] == "token_expired"
    assert "5s ago" not in body
    assert REQUEST_ID_HEADER in response.headers
    assert observed.count(Reason.TOKEN_EXPIRED) == 1
    assert (observed.counted(), observed.timed()) == (1, 1)
    (line,) = decisions()
    logged = fields(line)
    assert (logged["status"], logged["reason"]) == ("401", "token_expired")
    assert (logged["outcome"], logged["granted"]) == ("rejected", "false")
    assert logged["detail"] == "exp_passed_5s_ago"  # one field, whitespace made safe


async def test_the_realm_is_read_per_request(observed: Observed) -> None:
    observed.realm[0] = "reloaded"
    response = await observed.client.get("/reject/token_missing")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="reloaded"'


async def test_insufficient_scope_carries_the_scope_to_the_client(observed: Observed) -> None:
    response = await observed.client.get("/scope")
    assert response.status == 403
    assert response.headers["WWW-Authenticate"].endswith(', scope="orders:write"')


async def test_a_request_no_route_took_is_counted_as_unmatched(
    observed: Observed, decisions: Callable[[], list[str]]
) -> None:
    response = await observed.client.get("/unrouted")
    assert response.status == 404
    assert observed.count(Reason.ROUTE_NOT_FOUND, UNMATCHED_ROUTE) == 1
    assert observed.counted() == 0
    assert fields(decisions()[0])["route"] == UNMATCHED_ROUTE


async def test_an_unexpected_exception_is_a_500_with_the_traceback_logged_not_sent(
    observed: Observed, decisions: Callable[[], list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    response = await observed.client.get("/boom")
    assert response.status == 500
    body = await response.text()
    assert json.loads(body) == {
        "error": {"code": 500, "reason": "internal_error", "message": "Internal error."}
    }
    assert SECRET not in body
    assert "Traceback" not in body
    assert "WWW-Authenticate" not in response.headers
    (error,) = [r for r in caplog.records if r.getMessage().startswith("event=internal_error")]
    assert error.levelno == logging.ERROR
    assert error.exc_info is not None
    assert SECRET in caplog.text  # the operator gets the traceback...
    assert f"route={ROUTE}" in error.getMessage()
    assert observed.count(Reason.INTERNAL_ERROR) == 1  # ...and the request is counted once
    assert (observed.counted(), observed.timed()) == (1, 1)
    (line,) = decisions()
    assert (fields(line)["status"], fields(line)["reason"]) == ("500", "internal_error")


@pytest.mark.parametrize(
    ("draining", "reason"),
    [
        pytest.param(False, Reason.CLIENT_DISCONNECTED, id="client-left"),
        pytest.param(True, Reason.REQUEST_CANCELLED, id="shutdown-drain-ended"),
    ],
)
async def test_a_cancelled_request_is_still_counted_and_logged_once(
    observed: Observed, decisions: Callable[[], list[str]], draining: bool, reason: Reason
) -> None:
    observed.draining[0] = draining
    pending = asyncio.create_task(observed.client.get("/hang"))
    await asyncio.wait_for(observed.entered.wait(), 5)
    pending.cancel()  # the client closes its connection; the server cancels the handler
    with pytest.raises(asyncio.CancelledError):
        await pending
    await eventually(lambda: observed.counted() == 1)
    assert observed.count(reason) == 1
    assert observed.timed() == 1
    (line,) = decisions()
    logged = fields(line)
    assert (logged["reason"], logged["outcome"], logged["granted"]) == (
        reason.value,
        "error",
        "false",
    )
    assert "status" not in logged  # nothing was answered
