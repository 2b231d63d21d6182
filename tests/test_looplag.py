"""The loop's lateness sampler (features/looplag.py), on a real event loop."""

from __future__ import annotations

import asyncio
import time

from features import looplag


async def test_a_blocked_loop_is_late_by_about_the_block() -> None:
    lag = looplag.acquire()
    try:
        await asyncio.sleep(0.05)
        quiet = lag.take_smallest()
        t0, before = time.monotonic(), lag.late_s()
        time.sleep(0.03)  # the loop cannot run anything for 30 ms
        inside = lag.late_s()  # the overdue sample counts before it has run
        await asyncio.sleep(0.01)
        after = lag.late_s()
        ended = time.monotonic()
        own = lag.discounted(ended, before) - t0  # a call over the block, less the block
    finally:
        looplag.release(lag)
    assert quiet < 0.01
    assert inside - before >= 0.025
    assert after >= inside  # never goes back
    assert after - before < 0.03 + 0.02  # about the block, not the whole time slept
    assert 0.0 <= own < ended - t0 - 0.02  # ~10 ms of the ~40: the sleep, not the block


def sampling(lag: looplag.LoopLag) -> bool:
    return lag._handle is not None


async def test_one_sampler_per_loop_stopped_by_its_last_user() -> None:
    first = looplag.acquire()
    second = looplag.acquire()
    assert first is second
    looplag.release(first)
    assert sampling(first)  # the other user still samples
    looplag.release(second)
    assert not sampling(first)
    time.sleep(0.01)
    assert first.late_s() == first.late_s()  # stopped: nothing overdue grows it
    again = looplag.acquire()
    assert again is first and sampling(again)
    looplag.release(again)


def test_an_unstarted_sampler_reads_zero() -> None:
    lag = looplag.LoopLag()
    time.sleep(0.005)
    assert lag.late_s() == 0.0
    assert lag.discounted(12.5, 0.0) == 12.5  # nothing to discount
