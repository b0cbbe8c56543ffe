"""Key sets per issuer: discovered, fetched, cached, refreshed ahead of expiry, guarded by a refetch cooldown.

Semantics (the README's "When keys rotate" is the user-facing version):

* Only configured issuers have an entry; nothing is keyed by what a token says.
* Where: ``jwks_uri``, or OpenID discovery from ``issuer`` (the document's
  ``issuer`` must equal it exactly), or a static set from the config.
* How long: the JWKS response's ``Cache-Control``/``Expires`` lifetime clamped
  to [``jwks_cache_min_ttl_s``, ``jwks_cache_max_ttl_s``], else
  ``jwks_cache_ttl_s``.  A background task refetches ahead of expiry (and every
  ``jwks_refresh_interval_s`` if set), so steady-state requests never wait on
  the network.  Refetches are conditional (``If-None-Match``/``If-Modified-Since``
  from the last answer): a 304 (``not_modified``) keeps the set and renews it.
* A set past its lifetime but within ``jwks_max_stale_s`` is served at once;
  the refresh runs in the background.  Only a request with no usable set waits.
* Unknown ``kid``: at most one refetch per ``jwks_refetch_cooldown_s`` per
  issuer, counted from the last successful fetch; inside the window the answer
  is ``key_not_found`` without network.  A failed fetch does not start the
  window: its backoff governs, and a retry due within ``jwks_fetch_timeout_s``
  is waited for.  Concurrent fetches are single-flight; a request waits for
  fetches at most ``jwks_fetch_timeout_s`` in all.
* Outages: a failed fetch keeps the last good set, which serves until
  ``jwks_max_stale_s`` past its expiry; then ``jwks_unavailable`` until the
  first good fetch.  Failures are retried with exponential backoff.
* Keys with private members are dropped from fetched sets (and counted).
* Leases: each key set an entry holds has one ``KeySetLease``, which a token verified with
  one of its keys keeps (gateway/verifier.py).  Its ``usable_until`` is the monotonic time the
  set stops being usable (expiry plus ``jwks_max_stale_s``), moved by every fetch that keeps the
  set (a 304); it is ended (-inf) when the set is replaced or the issuer dropped.  A cache hit
  then needs one comparison, not a key lookup, to know its key is still the issuer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from jwt import PyJWK

from .clock import Clock
from .config import IssuerConfig, is_secure_url
from .documents import DocumentFetcher, FetchedDocument
from .errors import JwksFetchError, Rejection
from .keyset import KeySet, build_key_set
from .logs import kv
from .metrics import GatewayMetrics
from .reasons import Reason

log = logging.getLogger(__name__)

RETRY_INITIAL_S: Final = 1.0  # Envoy retries a failed fetch after 1 s
RETRY_MAX_S: Final = 60.0

__all__ = [
    "RETRY_INITIAL_S",
    "RETRY_MAX_S",
    "JwksCache",
    "KeyLookup",
    "KeySet",
    "KeySetLease",
    "build_key_set",
]


class KeySetLease:
    """How long one issuer's key set, as the cache holds it, stays the set requests may use:
    until ``usable_until`` on the cache clock's monotonic time.  A fetch that keeps the set
    moves it; replacing the set, or dropping the issuer, ends it for good."""

    __slots__ = ("usable_until",)

    def __init__(self) -> None:
        self.usable_until = float("-inf")

    def end(self) -> None:
        self.usable_until = float("-inf")


class KeyLookup(Protocol):
    """What the verifier needs from the key cache."""

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK: ...

    def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None: ...

    def lease(self, issuer: IssuerConfig) -> KeySetLease | None:
        """The lease of the issuer's current key set; ``None`` where this lookup keeps none
        (then a cache hit asks ``current_key``).  Its time is the monotonic time of the clock
        the verifier reads: the gateway hands both the same clock."""
        ...


@dataclass(slots=True, eq=False)
class _Entry:
    """The mutable cache state of one issuer."""

    issuer: IssuerConfig
    key_set: KeySet | None = None
    fetched_at: float = float("-inf")
    expires_at: float = float("-inf")
    jwks_uri: str | None = None  # configured, or learnt by discovery
    discovery_expires_at: float = float("-inf")
    last_success_started: float = float("-inf")  # the unknown-kid cooldown counts from here
    next_retry_at: float = float("-inf")
    failures: int = 0
    completed: int = 0  # fetches finished, whatever their result
    # What the last full answer said: its lifetime, and its validators for conditional refetches.
    max_age_s: float | None = None
    etag: str | None = None
    last_modified: str | None = None
    validated_uri: str | None = None  # the URL those validators belong to
    inflight: asyncio.Task[None] | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    attempted: asyncio.Event = field(default_factory=asyncio.Event)
    lease: KeySetLease = field(default_factory=KeySetLease)  # of key_set

    def adopt(self, key_set: KeySet, expires_at: float) -> None:
        """Hold ``key_set`` until ``expires_at``: a new set gets a new lease (the old one's
        holders must look again), the same set's lease is moved."""
        if key_set is not self.key_set:
            self.lease.end()
            self.lease = KeySetLease()
        self.key_set = key_set
        self.expires_at = expires_at
        self.lease.usable_until = expires_at + self.issuer.jwks_max_stale_s

    @property
    def static(self) -> bool:
        return self.issuer.static_jwks is not None

    def usable(self, now: float) -> KeySet | None:
        """The set requests may use: fresh, or stale by no more than ``jwks_max_stale_s``, which
        is while its lease holds (the one bound a cache hit checks too; none before a set)."""
        return self.key_set if now < self.lease.usable_until else None


class JwksCache:
    """Per-issuer key sets shared by every route that trusts the issuer."""

    def __init__(
        self,
        issuers: Mapping[str, IssuerConfig],
        fetcher: DocumentFetcher,
        metrics: GatewayMetrics,
        clock: Clock,
    ) -> None:
        self._fetcher = fetcher
        self._metrics = metrics
        self._clock = clock
        self._started = False
        self.fetches_completed = 0  # key-set fetches finished, of every issuer (for tracing)
        self._refreshers: dict[str, asyncio.Task[None]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._entries: dict[str, _Entry] = {}
        for issuer_id, cfg in issuers.items():
            self._entries[issuer_id] = self._new_entry(cfg)
        if not metrics.multiprocess:
            metrics.ready.set_function(lambda: float(self.ready()))

    def _new_entry(self, issuer: IssuerConfig) -> _Entry:
        entry = _Entry(issuer, jwks_uri=issuer.jwks_uri)
        if issuer.static_jwks is not None:
            entry.adopt(
                build_key_set(json.loads(issuer.static_jwks), issuer.id, issuer.algorithms),
                float("inf"),
            )
            entry.attempted.set()
        if not self._metrics.multiprocess:
            # Computed at scrape time, so staleness shows without any request.  With
            # --workers, the ticker sets them instead (set_function is per process).
            self._metrics.jwks_keys.labels(issuer.id).set_function(lambda: self._usable_keys(entry))
            self._metrics.jwks_stale.labels(issuer.id).set_function(lambda: self._stale(entry))
            self._metrics.jwks_age.labels(issuer.id).set_function(lambda: self._age(entry))
        return entry

    def _usable_keys(self, entry: _Entry) -> float:
        key_set = entry.usable(self._clock.monotonic())
        return float(key_set.size) if key_set else 0.0

    def _stale(self, entry: _Entry) -> float:
        return float(entry.key_set is not None and self._clock.monotonic() >= entry.expires_at)

    def _age(self, entry: _Entry) -> float:
        if entry.static:
            return 0.0
        return max(self._clock.monotonic() - entry.fetched_at, 0.0)  # +Inf before a success

    async def _tick(self) -> None:
        """Multiprocess mode: publish this worker's key gauges once a second."""
        while True:
            for entry in self._entries.values():
                self._metrics.jwks_keys.labels(entry.issuer.id).set(self._usable_keys(entry))
                self._metrics.jwks_stale.labels(entry.issuer.id).set(self._stale(entry))
                self._metrics.jwks_age.labels(entry.issuer.id).set(self._age(entry))
            self._metrics.ready.set(float(self.ready()))
            await asyncio.sleep(1.0)

    def reconfigure(self, issuers: Mapping[str, IssuerConfig]) -> None:
        """Adopt a reloaded issuer set: unchanged issuers keep their keys and schedule; changed
        or new ones start afresh (fetching at once); removed ones stop."""
        for issuer_id in list(self._entries):
            if self._entries[issuer_id].issuer != issuers.get(issuer_id):
                self._stop(issuer_id)
                self._entries.pop(issuer_id).lease.end()
        for issuer_id, cfg in issuers.items():
            if issuer_id not in self._entries:
                self._entries[issuer_id] = entry = self._new_entry(cfg)
                if self._started:
                    self._start_refresher(entry)

    def _start_refresher(self, entry: _Entry) -> None:
        if not entry.static:
            task = asyncio.create_task(self._refresh_loop(entry))
            self._refreshers[entry.issuer.id] = task

    def _stop(self, issuer_id: str) -> None:
        task = self._refreshers.pop(issuer_id, None)
        if task is not None:
            task.cancel()
        # A fetch in flight is left to finish: requests may be waiting on it.
        for gauge in (self._metrics.jwks_keys, self._metrics.jwks_stale, self._metrics.jwks_age):
            # A removed issuer's gauges must not go on reporting its old entry.
            with contextlib.suppress(KeyError):
                gauge.remove(issuer_id)

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start one background refresher per fetched issuer; each fetches at once."""
        self._started = True
        for entry in self._entries.values():
            self._start_refresher(entry)
        if self._metrics.multiprocess:
            self._ticker = asyncio.create_task(self._tick())

    async def close(self) -> None:
        """Cancel the refreshers and any fetch in flight."""
        tasks = [
            *self._refreshers.values(),
            *(e.inflight for e in self._entries.values() if e.inflight),
        ]
        if self._ticker is not None:
            tasks.append(self._ticker)
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
        """Whether every issuer that gates readiness has a usable key set."""
        now = self._clock.monotonic()
        return all(
            entry.usable(now) is not None
            for entry in self._entries.values()
            if entry.issuer.required_for_readiness
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per-issuer state for /readyz."""
        now = self._clock.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for issuer_id, entry in self._entries.items():
            usable = entry.usable(now)
            out[issuer_id] = {
                "ready": usable is not None,
                "keys": usable.size if usable else 0,
                "stale": entry.key_set is not None and now >= entry.expires_at,
                "failures": entry.failures,
                "source": "static"
                if entry.static
                else "discovery"
                if entry.issuer.jwks_uri is None
                else "jwks_uri",
                "required_for_readiness": entry.issuer.required_for_readiness,
            }
        return out

    # --- the request path ------------------------------------------------------
    def current_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK | None:
        """The key in the issuer's usable set right now, without any fetch (cache hits)."""
        entry = self._entries.get(issuer.id)
        key_set = entry.usable(self._clock.monotonic()) if entry is not None else None
        if key_set is None:
            return None
        found = key_set.lookup(kid, alg)
        return None if isinstance(found, Reason) else found

    def lease(self, issuer: IssuerConfig) -> KeySetLease | None:
        """The lease of the issuer's current key set (ended once the set is replaced)."""
        entry = self._entries.get(issuer.id)
        return entry.lease if entry is not None else None

    async def get_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> PyJWK:
        """The verification key for ``kid``/``alg`` of ``issuer``, or a ``Rejection``."""
        entry = self._entries.get(issuer.id)
        if entry is None:  # removed by a reload while this request was in flight
            raise Rejection(Reason.JWKS_UNAVAILABLE, f"issuer {issuer.id} no longer configured")
        now = self._clock.monotonic()
        if not entry.static and (entry.key_set is None or now >= entry.expires_at):
            if entry.usable(now) is not None:
                # Stale but servable: no request waits; the refresh runs in the background
                # (unless failed fetches are backing off: their retry is scheduled).
                if now >= entry.next_retry_at:
                    self._start_fetch(entry)
            elif entry.inflight is not None or now >= entry.next_retry_at:
                await self._await_fetch(entry, issuer.jwks_fetch_timeout_s)
        key_set = entry.usable(self._clock.monotonic())
        if key_set is None:
            raise Rejection(Reason.JWKS_UNAVAILABLE, f"no usable key set for issuer {issuer.id}")
        found = key_set.lookup(kid, alg)
        if not isinstance(found, Reason):
            return found
        if found is Reason.ALGORITHM_NOT_ALLOWED:
            raise Rejection(found, f"key {kid!r} is not for {alg}")
        self._metrics.jwks_kid_misses.labels(issuer.id).inc()
        if entry.static:
            raise Rejection(Reason.KEY_NOT_FOUND, "unknown kid in a static key set")
        if not await self._refetch_for_unknown_kid(entry):
            raise Rejection(Reason.KEY_NOT_FOUND, "unknown kid; no refetch allowed now")
        key_set = entry.usable(self._clock.monotonic())
        found = key_set.lookup(kid, alg) if key_set else Reason.KEY_NOT_FOUND
        if isinstance(found, Reason):
            raise Rejection(found, "unknown kid after refetch")
        return found

    async def _refetch_for_unknown_kid(self, entry: _Entry) -> bool:
        """Fetch again for an unknown kid if that is allowed now; whether any fetch finished
        since (the set may have changed).  All waiting is bounded by ``jwks_fetch_timeout_s``.

        A fetch in flight is joined.  While failed fetches back off, their schedule alone
        decides (a failed fetch never starts the cooldown): a retry due within the budget is
        waited for, a later one is not.  Otherwise one refetch per cooldown, counted from the
        last successful fetch.
        """
        issuer = entry.issuer
        deadline = self._clock.monotonic() + issuer.jwks_fetch_timeout_s
        seen = entry.completed
        while True:
            now = self._clock.monotonic()
            if entry.inflight is not None:
                pass  # join it
            elif entry.completed != seen and not entry.failures:
                return True  # a fetch succeeded meanwhile
            elif entry.failures:
                if entry.next_retry_at >= deadline:  # no time would be left to wait for it
                    return entry.completed != seen
                if now < entry.next_retry_at:
                    # The refresher starts the retry then too; whoever wakes first starts it.
                    await self._clock.sleep(entry.next_retry_at - now)
                    continue
            elif now - entry.last_success_started < issuer.jwks_refetch_cooldown_s:
                self._metrics.jwks_refetch_suppressed.labels(issuer.id).inc()
                return False
            if not await self._await_fetch(entry, deadline - now):
                return entry.completed != seen  # still running: it fills the cache later

    def _start_fetch(self, entry: _Entry) -> asyncio.Task[None]:
        """The issuer's fetch in flight, started if none runs (single-flight)."""
        if entry.inflight is None:
            entry.inflight = asyncio.create_task(self._fetch(entry))
        return entry.inflight

    async def _await_fetch(self, entry: _Entry, timeout_s: float) -> bool:
        """Join the issuer's fetch (starting one if none runs) for at most ``timeout_s``;
        whether it finished in that time."""
        task = self._start_fetch(entry)
        try:
            # shield: a request that gives up must not cancel the fetch others share.
            await asyncio.wait_for(asyncio.shield(task), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True

    async def _get(
        self,
        issuer: IssuerConfig,
        url: str,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> FetchedDocument:
        return await self._fetcher.fetch(
            url,
            timeout_s=issuer.jwks_fetch_timeout_s,
            max_bytes=issuer.jwks_max_bytes,
            etag=etag,
            last_modified=last_modified,
        )

    async def _resolve_jwks_uri(self, entry: _Entry) -> str:
        """The configured jwks_uri, or the one OpenID discovery names (cached like a key set)."""
        issuer = entry.issuer
        if issuer.jwks_uri is not None:
            return issuer.jwks_uri
        now = self._clock.monotonic()
        if entry.jwks_uri is not None and now < entry.discovery_expires_at:
            return entry.jwks_uri
        try:
            document = await self._get(issuer, discovery_uri(issuer))
            body = document.body
            if not isinstance(body, dict) or body.get("issuer") != issuer.issuer:
                raise JwksFetchError("invalid", "discovery document names another issuer")
            jwks_uri = body.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not is_secure_url(jwks_uri):
                raise JwksFetchError("invalid", "discovery jwks_uri missing or not https")
        except JwksFetchError as exc:
            if entry.jwks_uri is None:
                raise
            # Stale-on-error for discovery too: keep using the jwks_uri learnt before.
            log.warning(
                kv(
                    event="discovery_fetch",
                    issuer=issuer.id,
                    result=exc.result,
                    detail=exc.detail,
                    stale=True,
                )
            )
            return entry.jwks_uri
        entry.jwks_uri = jwks_uri
        entry.discovery_expires_at = now + cache_lifetime(issuer, document.max_age_s)
        return jwks_uri

    async def _fetch(self, entry: _Entry) -> None:
        issuer = entry.issuer
        started = self._clock.monotonic()
        try:
            uri = await self._resolve_jwks_uri(entry)
            cached = entry.key_set if entry.validated_uri == uri else None
            document = await self._get(
                issuer,
                uri,
                etag=entry.etag if cached else None,
                last_modified=entry.last_modified if cached else None,
            )
            if document.not_modified:
                if cached is None:
                    raise JwksFetchError("http_error", "304 to an unconditional request")
                key_set = cached
            else:
                key_set = self._build(entry, document)
        except JwksFetchError as exc:
            entry.failures += 1
            backoff = min(RETRY_INITIAL_S * 2 ** (entry.failures - 1), RETRY_MAX_S)
            entry.next_retry_at = self._clock.monotonic() + backoff
            self._metrics.jwks_fetches.labels(issuer.id, exc.result).inc()
            log.warning(kv(event="jwks_fetch", issuer=issuer.id, result=exc.result,
                           detail=exc.detail, failures=entry.failures,
                           stale=entry.key_set is not None, retry_in_s=backoff))  # fmt: skip
        else:
            # A 304 confirms the cached copy; its own freshness headers, if it has any, replace
            # the stored ones (RFC 9111 §4.3.4).
            if document.max_age_s is not None or not document.not_modified:
                entry.max_age_s = document.max_age_s
            lifetime = cache_lifetime(issuer, entry.max_age_s)
            result = "not_modified" if document.not_modified else "success"
            entry.adopt(key_set, started + lifetime)
            entry.etag, entry.last_modified = document.etag, document.last_modified
            entry.validated_uri = uri
            entry.fetched_at = entry.last_success_started = started
            entry.failures = 0
            entry.next_retry_at = float("-inf")
            self._metrics.jwks_fetches.labels(issuer.id, result).inc()
            self._metrics.jwks_last_success.labels(issuer.id).set(self._clock.time())
            log.info(kv(event="jwks_fetch", issuer=issuer.id, result=result,
                        keys=key_set.size, ttl_s=f"{lifetime:g}"))  # fmt: skip
        finally:
            entry.inflight = None
            entry.completed += 1
            self.fetches_completed += 1
            entry.wakeup.set()
            entry.attempted.set()

    def _build(self, entry: _Entry, document: FetchedDocument) -> KeySet:
        """The key set of a full answer; private keys in it are counted as they are dropped."""
        issuer = entry.issuer
        dropped = self._metrics.jwks_private_keys_dropped.labels(issuer.id)
        try:
            return build_key_set(
                document.body, issuer.id, issuer.algorithms, on_private=dropped.inc
            )
        except JwksFetchError:
            raise
        except Exception as exc:
            # A document shaped in a way nobody foresaw is an invalid document: it must back
            # off and keep the stale set like any failed fetch, not turn every request into a
            # 500 or end the refresher.
            log.exception(kv(event="jwks_document_error", issuer=issuer.id))
            raise JwksFetchError("invalid", type(exc).__name__) from None

    async def _refresh_loop(self, entry: _Entry) -> None:
        """Keep one issuer's set fresh: fetch now, then ahead of expiry, backing off on failure."""
        issuer = entry.issuer
        while True:
            now = self._clock.monotonic()
            if entry.key_set is None or entry.failures:
                due = entry.next_retry_at
            else:
                # Ahead of expiry, but never sooner than half-way through a short lifetime;
                # sooner still at the configured interval (conditional: a 304 costs ~nothing).
                lifetime = entry.expires_at - entry.fetched_at
                due = entry.expires_at - min(issuer.jwks_refresh_ahead_s, lifetime / 2)
                if issuer.jwks_refresh_interval_s is not None:
                    due = min(due, entry.fetched_at + issuer.jwks_refresh_interval_s)
            if now >= due:
                await asyncio.shield(self._start_fetch(entry))
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


def discovery_uri(issuer: IssuerConfig) -> str:
    """Where OpenID discovery looks (OpenID Connect Discovery 1.0 §4)."""
    return issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"


def cache_lifetime(issuer: IssuerConfig, max_age_s: float | None) -> float:
    """The key-set lifetime for a response's max-age, clamped to the issuer's bounds."""
    if max_age_s is None:
        return issuer.jwks_cache_ttl_s
    return min(max(max_age_s, issuer.jwks_cache_min_ttl_s), issuer.jwks_cache_max_ttl_s)
