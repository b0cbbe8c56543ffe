"""The per-request record the observing middleware logs and counts once, filled in along the way."""

from __future__ import annotations

import itertools
import os
import re
from typing import TYPE_CHECKING, Final

from .metrics import UNMATCHED_ROUTE
from .reasons import Reason

if TYPE_CHECKING:
    from .tracing import RequestSpan, TraceContext


class RequestRecord:
    """What is known about one request so far; ``reason`` ends as ``OK`` or why it did not.
    (A plain class, not a dataclass: one is made per request, and a dataclass's generated
    ``__init__`` stays interpreted in the compiled build, setup.py.)"""

    __slots__ = (
        "auth_outcome",
        "caller",
        "detail",
        "issuer",
        "kid",
        "method",
        "reason",
        "request_id",
        "route",
        "span",
        "status",
        "target",
        "trace",
    )

    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id
        self.route = UNMATCHED_ROUTE
        self.reason = Reason.OK
        self.detail = ""
        self.status: int | None = None
        self.issuer: str | None = None
        self.kid: str | None = None
        # Report-only routes: what verification would have said.
        self.auth_outcome: Reason | None = None
        # forward_auth mode: who asked, and the original request's method and target.
        self.caller: str | None = None
        self.method: str | None = None
        self.target: str | None = None
        # The trace it continues or starts (set by the observer).
        self.trace: TraceContext | None = None
        self.span: RequestSpan | None = None  # its server span, when tracing is configured

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"RequestRecord({fields})"


_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


# Generated ids: 16 random hex digits per process, then a 16-digit counter.  Unique without
# a system call per request (uuid4 reads the kernel's random source every time).  The counter
# starts at 2**64 so that hex() gives its 16 digits zero-padded after "0x1" (a format spec
# costs several times more).
_ID_PREFIX: Final = os.urandom(8).hex()
_ID_COUNTER: Final = itertools.count(2**64 + 1)


def request_id_from(value: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a fresh unique one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return _ID_PREFIX + hex(next(_ID_COUNTER))[3:]
