"""The proxy-mode request handler: the gate admits, then the forwarder strips, injects and forwards."""

from __future__ import annotations

from .gate import Gate
from .proxy import Forwarder
from .server import Answer, HttpRequest


class GatewayHandler:
    """Forwards a request upstream only after the gate admitted it."""

    __slots__ = ("_forwarder", "_gate")

    def __init__(self, gate: Gate, forwarder: Forwarder) -> None:
        self._gate = gate
        self._forwarder = forwarder

    async def __call__(self, request: HttpRequest) -> Answer | None:
        admitted = await self._gate.admit(
            request.method, request.target, request.host, request.headers, request.record, request
        )
        # Only now, with every check passed, does anything reach the upstream.
        await self._forwarder.forward(request, admitted.route, admitted.target, admitted.injected)
        return None
