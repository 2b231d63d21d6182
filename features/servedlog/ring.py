"""A fixed ring of record slots between the request path and the log's writer thread.

Every slot is allocated once, when the worker starts (so `gc.freeze()` at start-up takes
it out of every later collection): a queued record adds no object the collector tracks,
and memory stays at `size` records whatever the traffic. Model inputs are copied into one
float32 matrix; the rest are references to values the request made anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from features.online.entry import GroupRead, Source

_NO_READ = GroupRead(Source.DEFAULT)
_NO_IDS: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class Batch:
    """Records taken from the ring, as columns."""

    served_at: list[float]
    request_id: list[str]
    position: list[int]
    entity_ids: list[Mapping[str, str]]
    event_time: list[float]
    inputs: npt.NDArray[np.float32]
    reads: dict[str, list[GroupRead]]
    """Per qualified group name, each record's read."""
    score: list[float]

    def __len__(self) -> int:
        return len(self.score)


class Ring:
    """At most `size` records: `put` (under the caller's hold of `lock`) fills the slots
    after the last, `take` hands the oldest to one consumer thread. A put that raises
    (a bad index: a bug) leaves no slot counted."""

    def __init__(self, size: int, n_inputs: int, group_names: Sequence[str]) -> None:
        self.size = size
        self.lock = threading.Lock()
        self._served_at = [0.0] * size
        self._request_id = [""] * size
        self._position = [0] * size
        self._entity_ids = [_NO_IDS] * size
        self._event_time = [0.0] * size
        # Written, not just reserved (np.zeros maps pages lazily): no page fault later.
        self._inputs = np.full((size, n_inputs), 0.0, dtype=np.float32)
        self._reads = {name: [_NO_READ] * size for name in group_names}
        self._score = [0.0] * size
        self._first = 0  # the oldest filled slot
        self.count = 0
        """Filled slots. Read without the lock it is a hint; put and take keep it exact."""

    def put(
        self,
        picked: Sequence[int],
        served_at: float,
        request_id: str,
        entity_ids: Sequence[Mapping[str, str]],
        event_times: Sequence[float] | npt.NDArray[np.float64],
        inputs: npt.NDArray[np.float32],
        reads: Sequence[Mapping[str, GroupRead]],
        scores: Sequence[float],
    ) -> int:
        """Fill slots with the records at positions `picked` of one request, as many as
        fit, in order; return how many. Hold `lock`."""
        n = min(len(picked), self.size - self.count)
        if n <= 0:
            return 0
        start = self._first + self.count
        slots = [(start + j) % self.size for j in range(n)]
        if n == 1:  # the common case: no index arrays
            self._inputs[slots[0]] = inputs[picked[0]]
        else:
            self._inputs[slots] = inputs[list(picked[:n])]
        for k, i in zip(slots, picked, strict=False):
            self._entity_ids[k] = entity_ids[i]
            self._event_time[k] = float(event_times[i])
            self._score[k] = scores[i]
            for name, column in self._reads.items():
                column[k] = reads[i][name]
            self._served_at[k] = served_at
            self._request_id[k] = request_id
            self._position[k] = i
        self.count += n
        return n

    def take(self, limit: int) -> Batch:
        """The oldest records, at most `limit`, copied out; their slots are then free.
        One consumer only: slots counted as filled are never written by `put`."""
        with self.lock:
            first, n = self._first, min(self.count, limit)
        slots = [(first + j) % self.size for j in range(n)]
        batch = Batch(
            served_at=[self._served_at[k] for k in slots],
            request_id=[self._request_id[k] for k in slots],
            position=[self._position[k] for k in slots],
            entity_ids=[self._entity_ids[k] for k in slots],
            event_time=[self._event_time[k] for k in slots],
            inputs=self._inputs[slots],  # fancy indexing copies
            reads={name: [column[k] for k in slots] for name, column in self._reads.items()},
            score=[self._score[k] for k in slots],
        )
        for k in slots:
            self._entity_ids[k] = _NO_IDS  # hold no request's objects once written
        with self.lock:
            self._first = (first + n) % self.size
            self.count -= n
        return batch
