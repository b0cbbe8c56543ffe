"""The gateway's exception types.

::

    GatewayError
     ├─ ConfigError       load time only: "<yaml.path>: <problem>; expected <valid set>"
     ├─ Rejection         request time: .reason (a Reason), .detail (logged, never sent)
     └─ JwksFetchError    inside jwks.py: .result (a fetch-result label), .detail
    ClientGone            a ConnectionError: the client left, or its body broke the framing

(Kept out of the modules mypyc compiles: a compiled class cannot subclass ``ConnectionError``.)
"""

from __future__ import annotations

from .reasons import DpopChallenge, Reason


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the YAML path and what was expected."""

    def __init__(self, path: str, problem: str, expected: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.expected = expected
        message = f"{path}: {problem}" if path else problem
        if expected:
            message += f"; expected {expected}"
        super().__init__(message)


class Rejection(GatewayError):
    """A request ends here with ``reason``; ``detail`` is for the log, never for the client."""

    def __init__(self, reason: Reason, detail: str = "", *, scope: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.scope = scope
        # Set by the gate on a route that speaks DPoP: its challenge goes with the answer.
        self.dpop: DpopChallenge | None = None
        super().__init__(f"{reason}: {detail}" if detail else str(reason))


class JwksFetchError(GatewayError):
    """A key-set fetch failed; ``result`` is the bounded label counted in metrics."""

    def __init__(self, result: str, detail: str) -> None:
        self.result = result
        self.detail = detail
        super().__init__(f"{result}: {detail}")


class ClientGone(ConnectionError):
    """The client's connection ended while the gateway was reading or writing; ``reason`` says
    how (it left, or its body turned out malformed)."""

    def __init__(self, detail: str, reason: Reason = Reason.CLIENT_DISCONNECTED) -> None:
        super().__init__(detail)
        self.reason = reason
