"""Cache invalidation by Redis: one tracking session at a time on the read connection,
its pushes turned into dropped keys, and a background task that keeps it up.

Redis's CLIENT TRACKING, default (per-key) mode, over RESP3 on the worker's multiplexed
read connection (features/online/multiplex.py): the server remembers every key that
connection reads and, when one is written, expired, evicted or flushed, pushes one
invalidation naming it, in line with the replies, then forgets it until the next read.
So a worker hears only of keys it read since their last change: a bulk load of keys no
worker reads sends nothing (docs/cache-invalidation.md has the measurements and the
choice against BCAST).

- A session is one tracked connection's life. While one is live, entries read under it
  stay fresh for the cache's tracked TTL; when it ends (the connection failed, timed out
  or was killed) every such entry falls back to the short TTL at once, and so do the
  reads of the next session until they are read again under it (EntryCache.session).
- Replies and pushes share the socket, so their order is the server's. A reply still
  being processed when an invalidation of one of its keys arrives is not cached: the
  store marks its flight (FeatureStore._invalidate), as Redis's client-side caching
  guide advises for the two-connection case.
- The keeper, off the request path, reconnects after a loss (backoff doubling from
  `backoff_s[0]` to `backoff_s[1]`) and PINGs a live session every `heartbeat_s`, so a
  silently dead socket ends its session within a heartbeat and a socket timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from features import metrics
from features._log import RateLimitedLog
from features.online.cache import NO_SESSION, EntryCache
from features.online.multiplex import Multiplexed

logger = logging.getLogger(__name__)

OFF, LOST, LIVE = 0, 1, 2
"""Values of the features_cache_tracking gauge."""

_FAILURES = (TimeoutError, RedisError, OSError)

Invalidate = Callable[[list[str] | None], None]
"""Drop these keys (None: every key) from the cache and from the reads in flight."""


class Tracking:
    """The invalidation session of one multiplexed connection, for one EntryCache."""

    def __init__(
        self,
        cache: EntryCache,
        invalidate: Invalidate,
        *,
        heartbeat_s: float = 1.0,
        backoff_s: tuple[float, float] = (0.05, 5.0),
        error_log_interval_s: float = 10.0,
    ) -> None:
        self.state = OFF
        self.sessions = 0  # sessions started; the live one's number is this
        self._cache = cache
        self._invalidate = invalidate
        self._heartbeat_s = heartbeat_s
        self._backoff_s = backoff_s
        self._log = RateLimitedLog(logger, error_log_interval_s)
        self._bug_log = RateLimitedLog(
            logger, error_log_interval_s, level=logging.ERROR, exc_info=True
        )
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self._flushes = metrics.INVALIDATIONS.labels("flush")
        self._key_messages = metrics.INVALIDATIONS.labels("keys")
        metrics.TRACKING_STATE.set(OFF)

    # --- the connection's listener (multiplex.Listener) -------------------------------

    def opened(self, tracked: bool, why: str) -> None:
        """A connection opened: a new session if tracked, else the short TTL."""
        if self._closed:
            return
        if tracked:
            self.sessions += 1
            self._cache.session = self.sessions
            self._set(LIVE)
            metrics.TRACKING_SESSIONS.labels("started").inc()
        else:
            self._cache.session = NO_SESSION
            self._set(OFF)
            self._log.failed("cache invalidation (short TTL instead)", _Refused(why))

    def pushed(self, message: list[Any]) -> None:
        """An invalidation: drop what it names, or everything for a flush."""
        if len(message) != 2 or message[0] != b"invalidate":
            return  # no other push is asked for
        keys = message[1]
        try:
            if keys is None:
                self._flushes.inc()
                self._invalidate(None)
            else:
                self._key_messages.inc()
                self._invalidate([key.decode(errors="surrogateescape") for key in keys])
        except Exception as exc:  # a bug: runs inside the connection's data_received
            # What it should have dropped is unknown: drop everything, keep the session.
            self._bug_log.failed("handling an invalidation", exc)
            self._invalidate(None)

    def lost(self) -> None:
        """The session's connection is gone: short TTL until the next session."""
        if self._closed:
            return
        self._cache.session = NO_SESSION
        self._set(LOST)
        metrics.TRACKING_SESSIONS.labels("lost").inc()
        self._wake.set()  # the keeper reconnects

    # --- the keeper -----------------------------------------------------------------------

    def start(self, mux: Multiplexed) -> None:
        """Keep a session up on `mux` from now on, in the background."""
        if self._keeper is None and not self._closed:
            self._keeper = asyncio.get_running_loop().create_task(self._keep(mux))

    async def aclose(self) -> None:
        """Stop the keeper; later connection events change nothing."""
        self._closed = True
        self._cache.session = NO_SESSION
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        self._set(OFF)

    async def _keep(self, mux: Multiplexed) -> None:
        low, high = self._backoff_s
        delay = low
        while True:
            if mux.connected():
                await self._wait(self._heartbeat_s)  # woken early by a loss
                if self.state == LIVE and mux.connected():
                    with contextlib.suppress(*_FAILURES):  # a failed PING ends the session
                        await mux.ping()  # a silently dead socket times out
                        delay = low  # the session lived a heartbeat: reset the backoff
                continue
            await asyncio.sleep(delay)  # before every reconnect: a flapping server too
            delay = min(delay * 2, high)
            if mux.connected():  # a read reconnected meanwhile
                continue
            try:
                await mux.connect()
            except _FAILURES as exc:
                metrics.TRACKING_SESSIONS.labels("reconnect_failed").inc()
                self._log.failed("cache invalidation session", exc)

    async def _wait(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def _set(self, state: int) -> None:
        self.state = state
        metrics.TRACKING_STATE.set(state)


class _Refused(Exception):
    """The server would not track this connection (its answer in the message)."""
