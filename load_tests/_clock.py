"""A timer for benchmarks that time cache misses: `Jump`, an hour per call.

A module of its own that imports nothing, so load_tests/bench_ab.py can use it before it
imports prometheus_client (its --multiprocess mode must be set first) or any features/."""

from __future__ import annotations


class Jump:
    """A clock that moves an hour per call: every cached entry is already stale."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 3600.0
        return self.now
