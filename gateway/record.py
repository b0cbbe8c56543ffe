"""The per-request record the observing middleware logs and counts once, filled in along the way."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .metrics import UNMATCHED_ROUTE
from .reasons import Reason

if TYPE_CHECKING:
    from .tracing import RequestSpan, TraceContext


@dataclass(slots=True)
class RequestRecord:
    """What is known about one request so far; ``reason`` ends as ``OK`` or why it did not."""

    request_id: str = ""
    route: str = UNMATCHED_ROUTE
    reason: Reason = Reason.OK
    detail: str = ""
    status: int | None = None
    issuer: str | None = None
    kid: str | None = None
    auth_outcome: Reason | None = None  # report-only routes: what verification would have said
    # forward_auth mode: who asked, and the original request's method and target it described.
    caller: str | None = None
    method: str | None = None
    target: str | None = None
    trace: TraceContext | None = None  # the trace it continues or starts (set by the observer)
    span: RequestSpan | None = None  # its server span, when tracing is configured


_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


# Generated ids: 16 random hex digits per process, then a 16-digit counter.  Unique without
# a system call per request (uuid4 reads the kernel's random source every time).
_ID_PREFIX: Final = os.urandom(8).hex()
_ID_COUNTER: Final = itertools.count(1)


def request_id_from(value: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a fresh unique one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
