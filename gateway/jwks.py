"""Key sets per issuer: fetched, cached, refreshed ahead of expiry, and guarded by a refetch cooldown.

Semantics (see the README, "When keys rotate"):

* Only configured issuers have an entry; nothing is keyed by what a token says.
* A key set lives ``jwks_cache_ttl_s``; the background refresher fetches it again
  ``jwks_refresh_ahead_s`` before that, so steady-state requests never wait.
* A token whose ``kid`` is unknown triggers at most one refetch per
  ``jwks_refetch_cooldown_s`` per issuer (counted from the last fetch of any
  kind); inside the window it is answered ``key_not_found`` without network.
* Concurrent fetches are single-flight; a request waits for one at most
  ``jwks_fetch_timeout_s`` while the fetch itself carries on and fills the cache.
* A failed fetch keeps the last good set; only "no set at all" is
  ``jwks_unavailable``.  Failed fetches are retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from .clock import Clock
from .config import IssuerConfig
from .errors import JwksFetchError, Rejection
from .logs import kv
from .metrics import GatewayMetrics
from .reasons import Reason

log = logging.getLogger(__name__)

RETRY_INITIAL_S: Final = 1.0  # Envoy retries a failed fetch after 1 s
RETRY_MAX_S: Final = 60.0

# Which algorithms a key of each type and curve can verify (RFC 7518 §3, RFC 8037).
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_ALGS_BY_KEY: Final[Mapping[tuple[str, str | None], frozenset[str]]] = {
    ("RSA", None): _RSA_ALGS,
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}


class KeyLookup(Protocol):
    """What the verifier needs from the key cache."""

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK: ...


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable signing keys of one fetch: ``kid`` → ``alg`` → key, plus keys without a kid."""

    by_kid: Mapping[str, Mapping[str, PyJWK]]
    unnamed: Mapping[str, tuple[PyJWK, ...]]
    size: int

    def lookup(self, kid: str | None, alg: str) -> PyJWK | Reason:
        """The key for this kid and alg, or the reason there is none.

        ``KEY_NOT_FOUND`` means the kid is unknown (a refetch may help);
        ``ALGORITHM_NOT_ALLOWED`` means the kid is known but not for this alg.
        A token without a kid is matched only when exactly one key fits its alg.
        """
        if kid is None:
            candidates = [*self.unnamed.get(alg, ()),
                          *(keys[alg] for keys in self.by_kid.values() if alg in keys)]  # fmt: skip
            return candidates[0] if len(candidates) == 1 else Reason.KEY_NOT_FOUND
        keys = self.by_kid.get(kid)
        if keys is None:
            return Reason.KEY_NOT_FOUND
        return keys.get(alg, Reason.ALGORITHM_NOT_ALLOWED)


def build_key_set(document: Any, issuer: IssuerConfig) -> KeySet:
    """Turn a JWKS document into a ``KeySet`` of the keys usable with the issuer's algorithms.

    Encryption keys, HMAC keys, keys for other algorithms and keys PyJWT cannot
    load are skipped one by one (and logged); a set with no usable key at all is
    a failed fetch (``invalid``), so it never replaces a good set.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFetchError("invalid", "document has no 'keys' list")
    by_kid: dict[str, dict[str, PyJWK]] = {}
    unnamed: dict[str, list[PyJWK]] = {}
    size = 0
    for index, jwk in enumerate(document["keys"]):
        usable = _load_key(jwk, issuer, index)
        if not usable:
            continue
        kid = jwk.get("kid")
        if isinstance(kid, str):
            slot = by_kid.setdefault(kid, {})
            if any(alg in slot for alg in usable):
                log.warning(kv(event="jwks_key_skipped", issuer=issuer.id, index=index,
                               why="duplicate_kid"))  # fmt: skip
                continue
            slot.update(usable)
        else:
            for alg, key in usable.items():
                unnamed.setdefault(alg, []).append(key)
        size += 1
    if size == 0:
        raise JwksFetchError("invalid", "no usable signing key")
    return KeySet(
        by_kid={k: dict(v) for k, v in by_kid.items()},
        unnamed={alg: tuple(keys) for alg, keys in unnamed.items()},
        size=size,
    )


def _load_key(jwk: Any, issuer: IssuerConfig, index: int) -> dict[str, PyJWK]:
    """The PyJWK objects one JWK yields, by algorithm; empty when it is not usable."""

    def skip(why: str) -> dict[str, PyJWK]:
        log.warning(kv(event="jwks_key_skipped", issuer=issuer.id, index=index, why=why))
        return {}

    if not isinstance(jwk, dict):
        return skip("not_an_object")
    if jwk.get("use", "sig") != "sig":
        return {}  # encryption keys are never used to verify; not worth a warning
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return {}
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return skip("kid_not_a_string")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if not isinstance(kty, str) or not isinstance(crv, str | None):
        return skip("kty_or_crv_not_a_string")
    fits = _ALGS_BY_KEY.get((kty, None if kty == "RSA" else crv))
    if fits is None:
        return skip("unsupported_kty_or_crv")
    declared = jwk.get("alg")
    if declared is not None and not isinstance(declared, str):
        return skip("alg_not_a_string")
    wanted = fits & issuer.algorithms
    if declared is not None:
        # A key that names its algorithm is used for that algorithm only.
        if declared not in fits:
            return skip("alg_does_not_fit_kty")
        wanted = wanted & {declared}
    loaded: dict[str, PyJWK] = {}
    for alg in sorted(wanted):
        try:
            key = PyJWK(jwk, algorithm=alg)
        except (PyJWTError, ValueError, TypeError, KeyError):
            return skip("unloadable")
        if key.Algorithm.check_key_length(key.key) is not None:
            return skip("key_too_short")
        loaded[alg] = key
    return loaded


class JwksFetcher(Protocol):
    """Fetches one issuer's JWKS document."""

    async def fetch(self, issuer: IssuerConfig) -> Any: ...


class HttpJwksFetcher:
    """Fetches a JWKS over HTTP(S) with a timeout and a size limit; maps every failure to a result label."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def fetch(self, issuer: IssuerConfig) -> Any:
        timeout = aiohttp.ClientTimeout(total=issuer.jwks_fetch_timeout_s)
        try:
            async with self._session.get(
                issuer.jwks_uri,
                timeout=timeout,
                allow_redirects=False,
                headers={"Accept": "application/json, application/jwk-set+json"},
            ) as response:
                if response.status != 200:
                    raise JwksFetchError("http_error", f"status {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > issuer.jwks_max_bytes:
                        raise JwksFetchError("invalid", f"body over {issuer.jwks_max_bytes} bytes")
        except TimeoutError:
            raise JwksFetchError(
                "timeout", f"no answer within {issuer.jwks_fetch_timeout_s}s"
            ) from None
        except aiohttp.ClientResponseError as exc:
            raise JwksFetchError("http_error", f"bad response: {exc.status}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JwksFetchError("unreachable", type(exc).__name__) from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise JwksFetchError("invalid", "body is not JSON") from None


@dataclass(slots=True, eq=False)
class _Entry:
    """The mutable cache state of one issuer."""

    issuer: IssuerConfig
    key_set: KeySet | None = None
    expires_at: float = 0.0
    last_fetch_started: float = float("-inf")
    next_retry_at: float = float("-inf")
    failures: int = 0
    inflight: asyncio.Task[None] | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    attempted: asyncio.Event = field(default_factory=asyncio.Event)


class JwksCache:
    """Per-issuer key sets shared by every route that trusts the issuer."""

    def __init__(
        self,
        issuers: Mapping[str, IssuerConfig],
        fetcher: JwksFetcher,
        metrics: GatewayMetrics,
        clock: Clock,
    ) -> None:
        self._entries = {issuer_id: _Entry(cfg) for issuer_id, cfg in issuers.items()}
        self._fetcher = fetcher
        self._metrics = metrics
        self._clock = clock
        self._refreshers: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start one background refresher per issuer; each fetches at once."""
        for entry in self._entries.values():
            self._refreshers.append(asyncio.create_task(self._refresh_loop(entry)))

    async def close(self) -> None:
        """Cancel the refreshers and any fetch in flight."""
        tasks = [*self._refreshers, *(e.inflight for e in self._entries.values() if e.inflight)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._refreshers.clear()

    async def settled(self) -> None:
        """Return once every issuer's first fetch has finished, whether it succeeded or not."""
        for entry in self._entries.values():
            await entry.attempted.wait()

    def ready(self) -> bool:
        """Whether every issuer has a key set (stale or not)."""
        return all(entry.key_set is not None for entry in self._entries.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """Per-issuer state for /readyz: whether keys are held, how many, and consecutive failures."""
        return {
            issuer_id: {
                "keys": entry.key_set.size if entry.key_set else 0,
                "ready": entry.key_set is not None,
                "failures": entry.failures,
            }
            for issuer_id, entry in self._entries.items()
        }

    # --- the request path ------------------------------------------------------
    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        """The verification key for ``kid``/``alg`` of ``issuer``, or a ``Rejection``."""
        entry = self._entries[issuer.id]
        now = self._clock.monotonic()
        stale = entry.key_set is None or now >= entry.expires_at
        if stale and (entry.inflight is not None or now >= entry.next_retry_at):
            await self._await_fetch(entry)
        if entry.key_set is None:
            raise Rejection(Reason.JWKS_UNAVAILABLE, f"no key set for issuer {issuer.id}")
        found = entry.key_set.lookup(kid, alg)
        if not isinstance(found, Reason):
            return found
        if found is Reason.ALGORITHM_NOT_ALLOWED:
            raise Rejection(found, f"key {kid!r} is not for {alg}")
        self._metrics.jwks_kid_misses.labels(issuer.id).inc()
        in_cooldown = now - entry.last_fetch_started < issuer.jwks_refetch_cooldown_s
        if entry.inflight is None and in_cooldown:
            self._metrics.jwks_refetch_suppressed.labels(issuer.id).inc()
            raise Rejection(Reason.KEY_NOT_FOUND, "unknown kid; refetch in cooldown")
        await self._await_fetch(entry)
        found = entry.key_set.lookup(kid, alg)
        if isinstance(found, Reason):
            raise Rejection(found, "unknown kid after refetch")
        return found

    async def _await_fetch(self, entry: _Entry) -> None:
        """Join the issuer's fetch (starting one if none runs), waiting at most its timeout."""
        if entry.inflight is None:
            entry.inflight = asyncio.create_task(self._fetch(entry))
        # shield: a request that gives up must not cancel the fetch others share.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(entry.inflight), entry.issuer.jwks_fetch_timeout_s
            )

    async def _fetch(self, entry: _Entry) -> None:
        issuer = entry.issuer
        started = self._clock.monotonic()
        entry.last_fetch_started = started
        try:
            document = await self._fetcher.fetch(issuer)
            try:
                key_set = build_key_set(document, issuer)
            except JwksFetchError:
                raise
            except Exception as exc:
                # A document shaped in a way nobody foresaw is an invalid document: it
                # must back off and keep the stale set like any failed fetch, not turn
                # every request into a 500 or end the refresher.
                log.exception(kv(event="jwks_document_error", issuer=issuer.id))
                raise JwksFetchError("invalid", type(exc).__name__) from None
        except JwksFetchError as exc:
            entry.failures += 1
            backoff = min(RETRY_INITIAL_S * 2 ** (entry.failures - 1), RETRY_MAX_S)
            entry.next_retry_at = self._clock.monotonic() + backoff
            self._metrics.jwks_fetches.labels(issuer.id, exc.result).inc()
            log.warning(kv(event="jwks_fetch", issuer=issuer.id, result=exc.result,
                           detail=exc.detail, failures=entry.failures,
                           stale=entry.key_set is not None, retry_in_s=backoff))  # fmt: skip
        else:
            entry.key_set = key_set
            entry.expires_at = started + issuer.jwks_cache_ttl_s
            entry.failures = 0
            entry.next_retry_at = float("-inf")
            self._metrics.jwks_fetches.labels(issuer.id, "success").inc()
            self._metrics.jwks_keys.labels(issuer.id).set(key_set.size)
            self._metrics.jwks_last_success.labels(issuer.id).set(self._clock.time())
            log.info(kv(event="jwks_fetch", issuer=issuer.id, result="success",
                        keys=key_set.size))  # fmt: skip
        finally:
            entry.inflight = None
            entry.wakeup.set()
            entry.attempted.set()

    async def _refresh_loop(self, entry: _Entry) -> None:
        """Keep one issuer's set fresh: fetch now, then ahead of expiry, backing off on failure."""
        issuer = entry.issuer
        while True:
            now = self._clock.monotonic()
            if entry.key_set is None or entry.failures:
                due = entry.next_retry_at
            else:
                due = entry.expires_at - issuer.jwks_refresh_ahead_s
            if now >= due:
                if entry.inflight is None:
                    entry.inflight = asyncio.create_task(self._fetch(entry))
                await asyncio.shield(entry.inflight)
                continue
            # Sleep until due, or until a request-driven fetch changes the schedule.
            entry.wakeup.clear()
            sleep = asyncio.ensure_future(self._clock.sleep(due - now))
            woken = asyncio.ensure_future(entry.wakeup.wait())
            try:
                await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleep.cancel()
                woken.cancel()
