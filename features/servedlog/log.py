"""The served-feature log: a sampled record per scored transaction, handed to a writer
thread through a bounded queue and written off the request path into rolling Parquet files.

The request path pays one random() comparison per transaction when a transaction is not
sampled, and the copy of its values into a slot of a fixed ring (ring.py) when it is. A
full ring drops the record and counts it; nothing the log does ever waits on the writer,
or fails a request.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from features._log import RateLimitedLog
from features.metrics import SERVED_LOG_RECORDS
from features.online.entry import GroupRead
from features.servedlog.ring import Batch, Ring
from features.settings import PREFIX, Settings
from features.spec import GROUPS, MODEL_FEATURES

if TYPE_CHECKING:
    from features.servedlog.files import RollingParquet

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 4096
"""Most records the writer converts and writes at once: one Parquet row group."""
POLL_S = 0.05
"""How often the writer looks for records when fewer than a row group wait: a full ring
of the default size empties 200 000 records a second this way, more than one writer
thread converts."""
_ONE = (0,)


def check_directory(path: str) -> Path:
    """Create the log directory if needed; ValueError naming FEATURES_SERVED_LOG_DIR unless
    this process can write files in it."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{PREFIX}SERVED_LOG_DIR={path!r}: cannot create it ({exc})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{PREFIX}SERVED_LOG_DIR={path!r}: not writable")
    return directory


class ServedLog:
    """Samples scored transactions and writes them, off the request path, to Parquet.

    `sample(n)` picks which of a request's n transactions to record; `offer(...)` queues
    them in a ring of `queue_size` slots, under a lock (any thread may call it). `start()`
    starts the writer thread (nothing happens at a sample rate of 0), `close()` writes what
    is queued and closes the open file.
    """

    def __init__(
        self,
        *,
        sample_rate: float,
        directory: Path,
        queue_size: int,
        roll_rows: int,
        roll_s: float,
        model_tag: str,
        fingerprint: str,
        error_log_interval_s: float = 10.0,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {sample_rate}")
        self.sample_rate = sample_rate
        self.directory = directory
        self.queue_size = queue_size
        self.roll_rows = roll_rows
        self.roll_s = roll_s
        self.model_tag = model_tag
        self.fingerprint = fingerprint
        self._rand = rand
        self._clock = clock
        self._wall = wall
        # Allocated here, in the worker's start-up: gc.freeze() then takes it out of
        # every collection. A rate of 0 needs no slots.
        self._ring = Ring(
            queue_size if sample_rate > 0 else 0,
            len(MODEL_FEATURES),
            [g.qualified_name for g in GROUPS],
        )
        self._accepting = sample_rate > 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._sink: RollingParquet | None = None
        # One per thread: a RateLimitedLog is not thread-safe.
        self._errors = RateLimitedLog(logger, error_log_interval_s, clock, exc_info=True)
        self._offer_errors = RateLimitedLog(logger, error_log_interval_s, clock, exc_info=True)
        self.dropped = 0
        """Records dropped on the request path (queue full, or the log closed)."""

    @classmethod
    def from_settings(cls, settings: Settings, *, model_tag: str, fingerprint: str) -> ServedLog:
        """The log FEATURES_SERVED_LOG_* describe, for the model with this tag."""
        return cls(
            sample_rate=settings.served_log_sample_rate,
            directory=Path(settings.served_log_dir),
            queue_size=settings.served_log_queue_size,
            roll_rows=settings.served_log_roll_rows,
            roll_s=settings.served_log_roll_s,
            model_tag=model_tag,
            fingerprint=fingerprint,
            error_log_interval_s=settings.error_log_interval_s,
        )

    def start(self, sink: RollingParquet | None = None) -> None:
        """Start the writer thread, writing to `sink` (default: rolling files in the
        directory). Does nothing at a sample rate of 0: pyarrow is not even imported."""
        if self.sample_rate == 0 or self._thread is not None:
            return
        if sink is None:
            from features.servedlog.columns import arrow_schema
            from features.servedlog.files import RollingParquet

            check_directory(str(self.directory))
            sink = RollingParquet(self.directory, arrow_schema(), self.roll_rows, self._wall)
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name="served-log", daemon=True)
        self._thread.start()

    def sample(self, n: int) -> Sequence[int]:
        """Positions, among a request's `n` transactions, to record: mostly none."""
        rate = self.sample_rate
        if rate == 0.0:
            return ()
        if n == 1:
            return _ONE if self._rand() < rate else ()
        rand = self._rand
        return [i for i in range(n) if rand() < rate]

    def offer(
        self,
        picked: Sequence[int],
        request_id: str | None,
        entity_ids: Sequence[Mapping[str, str]],
        event_times: Sequence[float] | npt.NDArray[np.float64],
        inputs: npt.NDArray[np.float32],
        reads: Sequence[Mapping[str, GroupRead]],
        scores: Sequence[float],
    ) -> None:
        """Queue a record for each position in `picked` of a scored request; never waits
        on the writer, never raises. `request_id` None draws one (16 hex digits, like
        BentoML's)."""
        queued = 0
        try:
            served_at = self._wall()
            rid = request_id or format(random.getrandbits(64), "016x")
            ring = self._ring
            with ring.lock:
                if self._accepting:
                    queued = ring.put(
                        picked, served_at, rid, entity_ids, event_times, inputs, reads, scores
                    )
        except Exception as exc:  # a bug here must not fail the request: count it, log it
            SERVED_LOG_RECORDS.labels("failed").inc(len(picked))
            self._offer_errors.failed("queueing a served-log record", exc)
            return
        if queued < len(picked):
            self.dropped += len(picked) - queued
            SERVED_LOG_RECORDS.labels("dropped").inc(len(picked) - queued)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop taking records, write those queued, close the open file; wait at most
        `timeout_s`. True if the writer finished in time."""
        with self._ring.lock:
            self._accepting = False
        self._closing = True
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning(
                "served-log writer still busy after %.1f s; %d records queued are lost",
                timeout_s,
                self._ring.count,
            )
            return False
        return True

    def _run(self) -> None:
        """The writer thread. Should it ever fail, the log stops taking records (each then
        counted as dropped) rather than fill the ring for nobody."""
        try:
            self._write_until_closed()
        except Exception:
            logger.exception("served-feature log writer failed; the log takes no more records")
            with self._ring.lock:
                self._accepting = False

    def _write_until_closed(self) -> None:
        """Write a row group once one is waiting; close each file at `roll_rows` rows, or
        `roll_s` after the writer first saw a record for it; at close, drain the ring and
        close the last file."""
        sink = self._sink
        assert sink is not None
        ring = self._ring
        due: float | None = None  # when the file now filling must close
        while True:
            closing = self._closing  # read first: records put before it are all seen below
            ready = ring.count
            if ready and due is None:
                due = self._clock() + self.roll_s
            expired = due is not None and self._clock() >= due
            limit = min(ROW_GROUP_ROWS, sink.room)
            if ready >= limit or (ready and (closing or expired)):
                self._write(sink, ring.take(limit))
                if sink.rows == 0:  # the write filled the file, which closed
                    due = None
                if not expired:
                    continue  # more may be waiting
            if closing or expired:
                self._close_file(sink)
                due = None
                if closing and ring.count == 0:
                    return
                continue
            time.sleep(POLL_S if due is None else min(POLL_S, max(0.0, due - self._clock())))

    def _write(self, sink: RollingParquet, batch: Batch) -> None:
        from features.servedlog.columns import to_table

        try:
            table = to_table(batch, sink.schema, self.model_tag, self.fingerprint)
        except Exception as exc:  # a record the log cannot hold: a bug; the file is fine
            SERVED_LOG_RECORDS.labels("failed").inc(len(batch))
            self._errors.failed("converting served-log records", exc, len(batch))
            return
        rows = sink.rows  # already in the open file
        try:
            sink.write(table)
        except Exception as exc:  # disk full, permissions: give up the file, keep going
            sink.discard()
            SERVED_LOG_RECORDS.labels("failed").inc(rows + len(batch))
            self._errors.failed("writing the served-feature log", exc, rows + len(batch))
            return
        if sink.rows == 0:
            SERVED_LOG_RECORDS.labels("written").inc(rows + len(batch))

    def _close_file(self, sink: RollingParquet) -> None:
        rows = sink.rows
        if rows == 0:
            return
        try:
            sink.close()
        except Exception as exc:
            SERVED_LOG_RECORDS.labels("failed").inc(rows)
            self._errors.failed("closing a served-feature log file", exc, rows)
            return
        SERVED_LOG_RECORDS.labels("written").inc(rows)
