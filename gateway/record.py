"""The per-request record the observing middleware logs and counts once, filled in along the way."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .metrics import UNMATCHED_ROUTE
from .reasons import Reason


@dataclass(slots=True)
class RequestRecord:
    """What is known about one request so far; ``reason`` ends as ``OK`` or why it did not."""

    route: str = UNMATCHED_ROUTE
    reason: Reason = Reason.OK
    detail: str = ""
    status: int | None = None
    issuer: str | None = None
    kid: str | None = None
    auth_outcome: Reason | None = None  # report-only routes: what verification would have said


RECORD_KEY = web.RequestKey("gateway_record", RequestRecord)
