"""The verified-token cache: bounded in entries and in bytes, keyed by the token, holding a
verification until ``exp``.

Only successes are stored (a failure is never cached: the next request with the
same token is verified again).  A hit is used only after the verifier re-checks
what can change (see ``Verifier.cached``).

**Bytes.**  Each entry is weighed when it is stored (``entry_weight``): an upper bound on what
it keeps alive (the token, its signed payload segment, the decoded claims), computed from the
payload's JSON text without walking the claims.  Entries are evicted (second chance, see
``TokenCache``) until both the entry count and the summed weights leave room for the one
stored; an entry heavier than the whole byte bound is not stored.

**Keys.**  An entry is held under its token's last ``KEY_CHARS`` characters, the end of its
signature, and a lookup compares the whole token with the one the entry holds.  Hashing an
800-byte RS256 token cost ~2.4k instructions per request, the largest single item a warm hit
added to passthrough (README, Performance); the signature's end is as unique as the token among
tokens that verified (an accepted signature is a cryptographic output), and a request whose
token merely ends like a cached one finds the entry, fails the comparison, and is verified in
full: a shared end changes no answer, and at worst replaces an entry when both verified.

**ECDSA.**  An ECDSA signature (r, s) has a twin (r, n - s) that verifies as well: one signed
token, two strings.  A lookup that misses computes the other spelling and finds the entry under
it, provided that entry was verified with the curve the signature's length names (a 64-byte
Ed25519 signature is never read as an ES256 one), so both spellings are one cached token.
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from .clock import Clock

if TYPE_CHECKING:
    from .verifier import VerifiedToken

DEFAULT_MAX_ENTRIES: Final = 10_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

# Curve orders n (SEC 2 §2.4), by raw JWS signature length (RFC 7518 §3.4: r || s, each
# component padded to the curve's byte size).
_ECDSA: Final = {
    64: ("ES256", 32, int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)),
    96: (
        "ES384",
        48,
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
    ),
    132: (
        "ES512",
        66,
        int(
            "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
            "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
            16,
        ),
    ),
}
# base64url lengths (unpadded) of those signatures
_ECDSA_SEGMENT: Final = {(8 * size + 5) // 6: size for size in _ECDSA}


def ecdsa_twin(token: str) -> tuple[str, str] | None:
    """The other spelling of an ECDSA-signed compact JWS, and the algorithm its signature length
    names; ``None`` if the signature is not a canonical r || s of a P-256/384/521 size with
    0 < s < n (a token that can verify at all)."""
    head, dot, signature = token.rpartition(".")
    size = _ECDSA_SEGMENT.get(len(signature))
    if not dot or size is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (binascii.Error, ValueError):
        return None
    # Only a canonical spelling has a twin: the verifier refuses every other one.
    if len(raw) != size or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != signature:
        return None
    alg, half, order = _ECDSA[size]
    s = int.from_bytes(raw[half:], "big")
    if not 0 < s < order:
        return None
    twin = raw[:half] + (order - s).to_bytes(half, "big")
    return f"{head}.{base64.urlsafe_b64encode(twin).rstrip(b'=').decode()}", alg


# How many trailing characters of a token its entry is held under: 258 bits of a signature.
KEY_CHARS: Final = 43


def cache_key(token: str) -> str:
    """The key ``token``'s entry is held under: its last ``KEY_CHARS`` characters."""
    return token[-KEY_CHARS:]


# --- weighing an entry ---------------------------------------------------------------------------
# CPython 3.11, 64-bit: what ``sys.getsizeof`` reports for each object, rounded up.
_ENTRY: Final = 640  # the _Entry, the VerifiedToken, the dict slot, kid/alg/typ strings
_KEY: Final = 49 + KEY_CHARS  # the key: an ASCII str of KEY_CHARS characters
_STR: Final = sys.getsizeof("")  # a str's header (49 for ASCII; up to 80 for wider ones)
_DICT: Final = 184  # a dict of up to 5 members; beyond, at most 40 bytes a member
_DICT_MEMBER: Final = 40
_LIST: Final = 88  # a list of up to 3 items (56 + over-allocation); beyond, 16 a slot
_LIST_SLOT: Final = 16
_SCALAR_ASCII: Final = 56  # an ASCII str header, an int (28 + 4/9 digits), a float (24)
_SCALAR_WIDE: Final = 80  # a non-ASCII str header


def entry_weight(token: str, payload_json: bytes) -> int:
    """An upper bound on the bytes a cache entry keeps alive, from the payload's JSON text.

    Every value of the decoded claims is an object (its header counted once per value: at
    most one more value than there are ``,``, ``:`` and ``[`` in the text), every member a
    key object and a dict slot, every ``{`` a dict, every ``[`` a list; characters cost one
    byte each in an ASCII text and at most four otherwise.  Brackets, commas and colons inside
    strings only make the bound larger.  ``tests/unit/test_verifier.py`` checks it against
    ``tracemalloc`` for hostile and ordinary shapes.
    """
    objects = payload_json.count(b"{")
    lists = payload_json.count(b"[")
    members = payload_json.count(b":")
    commas = payload_json.count(b",")
    ascii_text = payload_json.isascii() and b"\\u" not in payload_json
    char_bytes = len(payload_json) * (1 if ascii_text else 4)
    scalar = _SCALAR_ASCII if ascii_text else _SCALAR_WIDE
    values = 1 + members + lists + commas
    claims = (
        char_bytes
        + objects * _DICT
        + members * (_DICT_MEMBER + scalar)  # slot and key
        + lists * _LIST
        + (lists + commas) * _LIST_SLOT
        + values * scalar
    )
    segment = len(payload_json) * 4 // 3 + 4
    return _ENTRY + _KEY + 2 * _STR + len(token) + segment + claims


class _Entry:
    """One cached verification: the token (compared whole on a lookup), its ``exp``, the
    verification and its weight, and whether a lookup used it since it last came round for
    eviction.  (A plain class: its ``exp`` is a field, not a float object of its own, so a hit
    reads one object fewer from memory than a tuple would make it.)"""

    __slots__ = ("exp", "token", "used", "verified", "weight")

    def __init__(self, token: str, exp: float, verified: VerifiedToken, weight: int) -> None:
        self.token: Final = token
        self.exp: Final = exp
        self.verified: Final = verified
        self.weight: Final = weight
        self.used = False


class TokenCache:
    """At most ``max_entries`` verified tokens weighing at most ``max_bytes`` together.

    Eviction is second chance (CLOCK), the approximation of least-recently-used that keeps a
    hit from touching other entries: entries wait in the order they were stored; the oldest goes
    unless a lookup used it since it last came round, and then it goes to the back, unmarked, and
    the next is considered.  An exact LRU moves each hit entry to the back of a linked list,
    which writes its two neighbours: two or three cache misses per hit with thousands of tokens.
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_entries",
        "_max_bytes",
        "_max_entries",
        "_probed",
        "_probed_token",
    )

    def __init__(self, max_entries: int, clock: Clock, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        # cache_key(token) -> its entry, in the order eviction considers them, oldest first
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        # The token a membership test last found, and its entry: the lookup that follows it
        # (extractor, then verifier, with no await between) needs no second search.
        self._probed_token: str | None = None
        self._probed: _Entry | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        """Whether ``token`` is held in this exact spelling (expired or not): it verified."""
        if not isinstance(token, str):
            return False
        entry = self._entries.get(cache_key(token))
        if entry is None or entry.token != token:
            return False
        self._probed_token, self._probed = token, entry
        return True

    @property
    def weight(self) -> int:
        """The summed weight of the entries held (never above ``max_bytes``)."""
        return self._bytes

    def items(self) -> Iterator[tuple[str, tuple[str, float, VerifiedToken, int]]]:
        """Each key and what is held under it (token, exp, verification, weight), oldest
        first."""
        return iter(
            [(key, (e.token, e.exp, e.verified, e.weight)) for key, e in self._entries.items()]
        )

    def get(self, token: str, now: float | None = None) -> VerifiedToken | None:
        """The cached verification of ``token`` (or of its ECDSA twin), unless past its ``exp``
        at ``now`` (the clock's time unless given)."""
        entry = self._probed
        if entry is None or token is not self._probed_token:
            key = cache_key(token)
            entry = self._entries.get(key)
            if entry is None or entry.token != token:
                twin = ecdsa_twin(token)
                if twin is None:
                    return None
                spelling, alg = twin
                key = cache_key(spelling)
                entry = self._entries.get(key)
                # The entry's signature verified with the curve this length names: then the
                # twin (same header, same payload, (r, n - s)) verifies with the same key too.
                if entry is None or entry.token != spelling or entry.verified.alg != alg:
                    return None
        self._probed_token, self._probed = None, None
        if entry.exp <= (self._clock.time() if now is None else now):
            # Past exp (leeway aside): verify in full so the answer is token_expired.
            key = cache_key(entry.token)
            if self._entries.get(key) is entry:
                self._drop(key)
            return None
        entry.used = True
        return entry.verified

    def put(self, token: str, verified: VerifiedToken, exp: float, weight: int) -> None:
        """Remember ``verified`` for ``token`` until ``exp``; ``weight`` from ``entry_weight``."""
        if weight > self._max_bytes or self._max_entries <= 0:
            return
        twin = ecdsa_twin(token)
        if twin is not None and twin[0] in self:
            return  # the other spelling is cached: one token, one entry
        key = cache_key(token)
        self._drop(key)  # this token's entry, or one whose token ends the same
        entries = self._entries
        # Room first, so the entry stored is never the one evicted.
        while len(entries) >= self._max_entries or self._bytes + weight > self._max_bytes:
            oldest_key, oldest = entries.popitem(last=False)
            if oldest.used:
                oldest.used = False  # used since it last came round: one more round
                entries[oldest_key] = oldest
            else:
                self._bytes -= oldest.weight
        entries[key] = _Entry(token, exp, verified, weight)
        self._bytes += weight

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.weight
