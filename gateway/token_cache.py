"""The verified-token cache: bounded, keyed by the token, holding a verification until ``exp``.

Only successes are stored (a failure is never cached: the next request with the
same token is verified again).  A hit is used only after the verifier re-checks
what can change (see ``Verifier._still_valid`` and the time and policy checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from cachetools import LRUCache

from .clock import Clock

if TYPE_CHECKING:
    from .verifier import VerifiedToken

DEFAULT_MAX_ENTRIES: Final = 10_000


class TokenCache:
    """At most ``max_entries`` verified tokens, least recently used evicted first."""

    __slots__ = ("_clock", "_entries")

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._entries: LRUCache[str, tuple[float, VerifiedToken]] = LRUCache(maxsize=max_entries)
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> VerifiedToken | None:
        """The cached verification of ``token``, unless it has passed its ``exp``."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        exp, verified = entry
        if exp <= self._clock.time():
            # Past exp (leeway aside): verify in full so the answer is token_expired.
            self._entries.pop(token, None)
            return None
        return verified

    def put(self, token: str, verified: VerifiedToken, exp: float) -> None:
        self._entries[token] = (exp, verified)
