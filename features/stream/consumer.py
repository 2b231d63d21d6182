"""One consumer of the transaction stream in a consumer group: read a batch, apply it to
the activity logs, write the velocity groups, then acknowledge.

At least once: an entry is acknowledged only after its groups were written, so a consumer
that dies leaves its entries pending; after `claim_idle_s` another consumer (or a new one)
claims them with XAUTOCLAIM and applies them again, which the scripts make idempotent by
transaction id. A malformed entry goes to the dead-letter stream with its reason and
fields, then is acknowledged.

Retries: after a failed write of the batch (Redis or the backing store down) the consumer
backs off and applies the batch in hand again, with no new delivery (XCLAIM JUSTID keeps
other consumers from claiming it meanwhile); after an event's own
script failed, it acknowledges the rest and reads its own pending entries again (XREADGROUP
0), a new delivery. Redis counts the deliveries of each pending entry (XREADGROUP and
XAUTOCLAIM add one); for entries read back or claimed, never for new ones, the consumer
asks for those counts (XPENDING, one pipeline) and dead-letters an entry delivered more
than `max_deliveries` times, reason `delivery_limit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from redis.exceptions import RedisError, ResponseError

from features._log import RateLimitedLog
from features.connection import Client
from features.errors import FeatureWriteError, MalformedEvent
from features.offline.writer import FeatureWriter
from features.spec import MERCHANT_VELOCITY, USER_FEATURES, FeatureGroup
from features.stream.event import TransactionEvent
from features.stream.velocity import (
    MERCHANT_SCRIPT,
    USER_SCRIPT,
    Velocity,
    merchant_call,
    merchant_velocity,
    user_call,
    user_velocity,
)

logger = logging.getLogger(__name__)

Entry = tuple[bytes | None, Mapping[bytes, bytes] | None]
"""A stream entry as redis-py returns it: (id, fields); (None, None) if it was trimmed."""

DeadLetter = tuple[bytes, Mapping[bytes, bytes] | Mapping[str, str], str, str]
"""(entry id, its fields, why it cannot be applied, the kind of reason: DEAD_REASONS)"""

DEAD_REASONS = ("malformed", "wrong_type", "delivery_limit")
"""Kinds of dead letter: a bad field, a key of another type in Redis, too many deliveries."""

MAX_BACKOFF_S = 5.0
_FAILURES = (RedisError, OSError, FeatureWriteError)


class ScriptFailed(RedisError):
    """Some events' scripts failed (e.g. OOM); the rest of the batch was acknowledged."""


def dead_letter_key(stream: str) -> str:
    """Where a stream's malformed entries go."""
    return f"{stream}:dead"


@dataclass(slots=True)
class Counts:
    """What a consumer has done, by outcome (reset by the interval report)."""

    read: int = 0
    new: int = 0
    duplicate: int = 0
    late: int = 0
    dead: int = 0
    claimed: int = 0
    failed: int = 0
    older: int = 0  # backing-store rows not written: a newer version was stored

    def line(self) -> str:
        """`read 3, new 2, ...`: the counts as one log line."""
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self))


class VelocityConsumer:
    """Applies a stream's transactions to velocity features, as one named group member."""

    def __init__(
        self,
        client: Client,
        writer: FeatureWriter,
        *,
        stream: str,
        group: str,
        name: str,
        batch: int,
        block_ms: int,
        claim_idle_s: float,
        maxlen: int,
        max_user_events: int,
        max_merchant_events: int,
        max_deliveries: int = 5,
        error_log_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
        after_append: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`after_append` is awaited after a batch was applied to the logs, before anything
        is written or acknowledged (tests kill the process there, or race another consumer)."""
        self._client = client
        self._writer = writer
        self.stream = stream
        self.group = group
        self.name = name
        self.dead_letters = dead_letter_key(stream)
        self._batch = batch
        self._block_ms = block_ms
        self._claim_idle_ms = max(1, round(claim_idle_s * 1000))
        self._claim_every_s = claim_idle_s / 2
        self._maxlen = maxlen
        self._max_user_events = max_user_events
        self._max_merchant_events = max_merchant_events
        self._max_deliveries = max_deliveries
        self._clock = clock
        self._timer = timer
        self._after_append = after_append
        self._log = RateLimitedLog(logger, error_log_interval_s, timer)
        self._claim_cursor = b"0-0"
        self._next_claim = -float("inf")
        self._own_pending = True  # at start, and after a failure: read own entries first
        # After a failed write: the batch and its over-the-limit entries, applied again.
        self._held: tuple[list[Entry], dict[bytes, int]] | None = None
        self.counts = Counts()
        self.totals = Counts()
        self.dead_totals: Counter[str] = Counter(dict.fromkeys(DEAD_REASONS, 0))
        self.lag: int | None = None  # the group's lag and pending count, by watch_group()
        self.pending: int | None = None

    async def ensure_group(self) -> None:
        """Create the stream and the group (reading from the start) unless they exist."""
        try:
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def step(self, *, block: bool = True) -> int:
        """Handle one batch: the batch in hand if its write failed, else idle entries of
        other consumers when due, else this consumer's own pending ones after a failure,
        else new ones (waiting up to `block_ms` if `block`). Returns how many entries it
        handled."""
        if self._held is not None:
            entries, exhausted = self._held
            await self._keep(entries)
        else:
            entries = await self._claim() if self._timer() >= self._next_claim else []
            if not entries and self._own_pending:
                entries = await self._read("0", block=False)
                self._own_pending = bool(entries)
            # Only entries delivered before can be over the limit: new ones cost no lookup.
            exhausted = await self._exhausted(entries) if entries else {}
            if not entries:
                entries = await self._read(">", block=block)
            self._held = (entries, exhausted)
        try:
            await self.apply(entries, exhausted)
        except ScriptFailed:
            self._held = None  # the rest is acknowledged: read the failed ones back
            self._own_pending = True
            raise
        self._held = None
        return len(entries)

    async def run(
        self, stop: asyncio.Event, report_interval_s: float, *, watch_group: bool = False
    ) -> None:
        """Handle batches until `stop` is set, backing off after failures; log the counts
        once per `report_interval_s` (and then, if `watch_group`, read the group's lag)."""
        failures = 0
        joined = False
        next_report = self._timer() + report_interval_s
        while not stop.is_set():
            try:
                if not joined:
                    await self.ensure_group()
                    joined = True
                await self.step()
                failures = 0
            except _FAILURES as exc:
                failures += 1
                self.counts.failed += 1
                self.totals.failed += 1
                self._own_pending = True
                self._log.failed("stream batch", exc)
                backoff = min(MAX_BACKOFF_S, 0.1 * 2 ** min(failures, 10))
                with contextlib.suppress(TimeoutError):  # backed off long enough: try again
                    await asyncio.wait_for(stop.wait(), backoff)
            if self._timer() >= next_report:
                self.report()
                if watch_group:
                    await self.watch_group()
                next_report = self._timer() + report_interval_s
        self.report()

    def report(self) -> None:
        """Log the counts since the last report, then reset them."""
        logger.info("stream consumer %s: %s", self.name, self.counts.line())
        self.counts = Counts()

    async def watch_group(self) -> None:
        """Read the group's pending count and lag (XINFO GROUPS; the lag needs Redis 7, and
        is None where Redis cannot tell it, or on a failure, which is logged)."""
        try:
            groups: list[dict[Any, Any]] = await self._client.xinfo_groups(self.stream)
        except RedisError as exc:
            self.lag = self.pending = None
            self._log.failed("XINFO GROUPS", exc)
            return
        info = next((g for g in groups if _text(g.get("name", b"")) == self.group), {})
        lag, pending = info.get("lag"), info.get("pending")
        self.lag = None if lag is None else int(lag)
        self.pending = None if pending is None else int(pending)

    async def leave(self) -> None:
        """Remove this consumer from the group if it holds no pending entries."""
        pending = await self._client.xpending(self.stream, self.group)
        mine = {_text(c["name"]): int(c["pending"]) for c in pending.get("consumers", [])}
        if mine.get(self.name, 0) == 0:
            await self._client.xgroup_delconsumer(self.stream, self.group, self.name)

    async def apply(
        self, entries: Sequence[Entry], exhausted: Mapping[bytes, int] | None = None
    ) -> None:
        """Apply entries, write the groups, dead-letter malformed ones and those in
        `exhausted` (id: times delivered, over the limit), then acknowledge.
        Raises, acknowledging nothing, if the logs or the groups could not be written;
        raises ScriptFailed after acknowledging the rest if some event's script failed
        (it is delivered again)."""
        now = self._clock()
        valid: list[tuple[bytes, TransactionEvent]] = []
        dead: list[DeadLetter] = []
        gone: list[bytes] = []
        for entry_id, entry_fields in entries:
            if entry_id is None:
                continue  # trimmed while pending (Redis < 7 gives no id): cannot be acked
            if not entry_fields:
                gone.append(entry_id)  # trimmed from the stream while pending: nothing left
                continue
            if exhausted and entry_id in exhausted:
                reason = (
                    f"delivery_limit: delivered {exhausted[entry_id]} times,"
                    f" at most {self._max_deliveries}"
                )
                dead.append((entry_id, entry_fields, reason, "delivery_limit"))
                continue
            try:
                valid.append((entry_id, TransactionEvent.parse(entry_fields, now)))
            except MalformedEvent as exc:
                dead.append((entry_id, entry_fields, exc.reason, "malformed"))
        self._count("read", len(entries))
        done, failed = await self._apply_valid(valid, dead)
        if dead:
            await self._dead_letter(dead)
            self._count("dead", len(dead))
            self.dead_totals.update(kind for _, _, _, kind in dead)
        acked = done + gone + [entry_id for entry_id, _, _, _ in dead]
        if acked:
            await self._client.xack(self.stream, self.group, *acked)
        if failed is not None:
            raise failed

    async def _apply_valid(
        self, valid: Sequence[tuple[bytes, TransactionEvent]], dead: list[DeadLetter]
    ) -> tuple[list[bytes], ScriptFailed | None]:
        """Run the scripts, then write each entity's latest aggregates. Returns the ids
        applied and the first script error (its event stays pending); an event whose keys
        hold another type goes to `dead`."""
        if not valid:
            return [], None
        events = [event for _, event in valid]
        user_replies, merchant_replies = await asyncio.gather(
            USER_SCRIPT.run(self._client, [user_call(e, self._max_user_events) for e in events]),
            MERCHANT_SCRIPT.run(
                self._client, [merchant_call(e, self._max_merchant_events) for e in events]
            ),
        )
        if self._after_append is not None:
            await self._after_append()
        users: dict[str, Velocity] = {}
        merchants: dict[str, Velocity] = {}
        done: list[bytes] = []
        failed: ScriptFailed | None = None
        for (entry_id, event), u_reply, m_reply in zip(
            valid, user_replies, merchant_replies, strict=True
        ):
            error = next((r for r in (u_reply, m_reply) if isinstance(r, Exception)), None)
            if isinstance(error, ResponseError) and "WRONGTYPE" in str(error):
                dead.append((entry_id, event.fields(), f"script: {error}", "wrong_type"))
                continue
            if error is not None:  # e.g. OOM: the event stays pending and is tried again
                self._count("failed", 1)
                failed = failed or ScriptFailed(f"velocity script: {error}")
                continue
            user, merchant = user_velocity(u_reply), merchant_velocity(m_reply)
            # Replies come in stream order: each entity's last one has all its events.
            users[event.user_id] = user
            merchants[event.merchant_id] = merchant
            self._count(str(user.applied), 1)
            done.append(entry_id)
        bad_users = await self._write(USER_FEATURES, users)
        bad_merchants = await self._write(MERCHANT_VELOCITY, merchants)
        if bad_users or bad_merchants:  # a row that would fail every time: dead-letter its events
            kept: list[bytes] = []
            by_id = dict(valid)
            for entry_id in done:
                event = by_id[entry_id]
                if event.user_id in bad_users:
                    key = USER_FEATURES.key(event.user_id)
                elif event.merchant_id in bad_merchants:
                    key = MERCHANT_VELOCITY.key(event.merchant_id)
                else:
                    kept.append(entry_id)
                    continue
                reason = f"write: {key} holds another type (WRONGTYPE)"
                dead.append((entry_id, event.fields(), reason, "wrong_type"))
            done = kept
        return done, failed

    async def _write(self, group: FeatureGroup, latest: Mapping[str, Velocity]) -> set[str]:
        """Write each entity's aggregates; returns the entities whose key holds another
        type (every other row was written). Raises for any other failure."""
        if not latest:
            return set()
        rows = [(entity_id, v.values) for entity_id, v in latest.items()]
        skipped_before = self._writer.backing_skipped
        try:
            await self._writer.write(
                group,
                rows,
                event_ts=[v.anchor_ts for v in latest.values()],
                versions=[v.version for v in latest.values()],  # a later one may have landed
            )
        except FeatureWriteError as exc:
            if not exc.wrong_type or set(exc.failed) != set(exc.wrong_type):
                raise  # a timeout, OOM, ...: the batch is tried again
            return set(exc.wrong_type)
        finally:
            self._count("older", self._writer.backing_skipped - skipped_before)
        return set()

    async def _dead_letter(self, dead: Sequence[DeadLetter]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id, entry_fields, reason, _ in dead:
                record: dict[Any, Any] = dict(entry_fields)
                record |= {"_reason": reason, "_entry_id": entry_id, "_consumer": self.name}
                pipe.xadd(self.dead_letters, record, maxlen=self._maxlen, approximate=True)
            await pipe.execute()

    async def _claim(self) -> list[Entry]:
        """Entries idle past the threshold (their consumer died or stalled), now ours."""
        reply: Any = await self._client.xautoclaim(
            self.stream,
            self.group,
            self.name,
            self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=self._batch,
        )
        cursor, entries = reply[0], _entries(reply[1])
        self._claim_cursor = cursor
        if cursor in (b"0-0", "0-0") and len(entries) < self._batch:
            self._next_claim = self._timer() + self._claim_every_s  # scanned all: rest
        self._count("claimed", len(entries))
        return entries

    async def _keep(self, entries: Sequence[Entry]) -> None:
        """Mark the batch in hand as just delivered (XCLAIM JUSTID: no delivery counted),
        so that no other consumer claims it while this one retries it."""
        ids: list[Any] = [entry_id for entry_id, _ in entries if entry_id is not None]
        if ids:
            await self._client.xclaim(self.stream, self.group, self.name, 0, ids, justid=True)

    async def _exhausted(self, entries: Sequence[Entry]) -> dict[bytes, int]:
        """The entries delivered more than `max_deliveries` times, with that count: one
        XPENDING per entry, all in one pipeline."""
        ids = [entry_id for entry_id, _ in entries if entry_id is not None]
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
            replies: list[Any] = await pipe.execute()
        deliveries = {
            entry_id: int(reply[0]["times_delivered"])
            for entry_id, reply in zip(ids, replies, strict=True)
            if reply  # acknowledged meanwhile (by a consumer that had claimed it): not pending
        }
        return {e: n for e, n in deliveries.items() if n > self._max_deliveries}

    async def _read(self, start: str, *, block: bool) -> list[Entry]:
        reply: Any = await self._client.xreadgroup(
            self.group,
            self.name,
            {self.stream: start},
            count=self._batch,
            block=self._block_ms if block else None,
        )
        return _entries(reply[0][1]) if reply else []

    def _count(self, outcome: str, n: int) -> None:
        for counts in (self.counts, self.totals):
            setattr(counts, outcome, getattr(counts, outcome) + n)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _entries(raw: Any) -> list[Entry]:
    """Entries of a redis-py XREADGROUP or XAUTOCLAIM reply (RESP2)."""
    return [(entry_id, entry_fields) for entry_id, entry_fields, *_ in raw]
