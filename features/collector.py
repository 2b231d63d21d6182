"""The garbage collector on the serving path: start-up objects frozen, every pause timed.

A full collection walks every tracked object. After torch, BentoML and the model are
loaded a worker holds some 300k of them, and a gen2 pass stopped the loop for ~100 ms.
`freeze()` moves what start-up made into the permanent generation, which no collection
walks; the cache's entries are plain tuples the collector stops tracking (see
features/online/entry.py), so later passes stay small.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from typing import Any

from features import metrics


def freeze() -> int:
    """Collect once, then exempt every surviving object from later collections; returns
    how many objects were frozen. Call once a worker is set up and warmed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Times each collection with `gc.callbacks` and exports the pauses as metrics.

    The callback only appends to a bounded deque: it may run inside any allocation,
    also one made while prometheus_client holds its (non-reentrant) lock, so the
    metrics are updated later, from the event loop, by `flush()` or `run()`.
    """

    def __init__(self, max_pending: int = 4096) -> None:
        self._pending: deque[tuple[int, float]] = deque(maxlen=max_pending)
        self._started = 0.0
        self._worst = [0.0, 0.0, 0.0]
        self._histograms = [metrics.GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]
        self._gauges = [metrics.GC_PAUSE_MAX_SECONDS.labels(str(g)) for g in range(3)]

    def install(self) -> None:
        """Start timing collections (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        """Stop timing collections."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
        else:
            self._pending.append((info["generation"], now - self._started))

    def flush(self) -> None:
        """Move the pauses timed so far into the metrics."""
        pending = self._pending
        while pending:
            generation, seconds = pending.popleft()
            self._histograms[generation].observe(seconds)
            if seconds > self._worst[generation]:
                self._worst[generation] = seconds
                self._gauges[generation].set(seconds)

    async def run(self, interval_s: float = 1.0) -> None:
        """Flush every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.flush()
