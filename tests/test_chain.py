"""The read path's orchestrator on in-memory tiers: order, reasons, deadline, single-flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
import pytest

from features import MERCHANT_RISK, USER_FEATURES, FeatureGroup, FeatureStore, Key, Reason, Source
from features.online.codec import codec_for
from features.online.tier import Answer
from tests.conftest import FakeClock

ROW = {"user": "u1", "merchant": "m1"}
USER_KEY = USER_FEATURES.key("u1")
MERCHANT_KEY = MERCHANT_RISK.key("m1")


def stored(group_values: Sequence[float], source: Source = Source.REDIS) -> Answer:
    """An entry as a store tier would decode it (all values present and valid)."""
    group = USER_FEATURES if len(group_values) == len(USER_FEATURES.features) else MERCHANT_RISK
    raw = [repr(float(v)).encode() for v in group_values]
    return codec_for(group).decode_values(raw, None, 0.0, source)


USER_VALUES = [float(i + 1) for i in range(len(USER_FEATURES.features))]
MERCHANT_VALUES = [0.5, 0.01, 0.02, 40.0, 100.0, 0.0]
# Two groups, one per entity, are all the chain's logic needs.
TWO_GROUPS = (USER_FEATURES, MERCHANT_RISK)


class MemoryTier:
    """A tier answering from a dict; records each call's keys; optionally slow or broken."""

    def __init__(
        self,
        name: str,
        answers: dict[str, Answer],
        *,
        otherwise: Reason = Reason.MISSING,
        delay_s: float = 0.0,
        fails: bool = False,
    ) -> None:
        self.name = name
        self.answers = answers
        self.otherwise = otherwise
        self.delay_s = delay_s
        self.fails = fails
        self.calls: list[list[str]] = []
        self.closed = False

    async def open(self) -> None:
        pass

    def carries(self, group: FeatureGroup) -> bool:
        return True

    async def read(self, keys: Sequence[Key], deadline: float) -> list[Answer]:
        self.calls.append([key.id for key in keys])
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fails:
            raise RuntimeError("a bug in a tier")
        return [self.answers.get(key.id, self.otherwise) for key in keys]

    async def aclose(self) -> None:
        self.closed = True


def store_of(*tiers: MemoryTier, **kwargs: object) -> FeatureStore:
    kwargs.setdefault("groups", TWO_GROUPS)
    return FeatureStore(tiers=tiers, **kwargs)  # type: ignore[arg-type]


async def test_each_tier_gets_only_what_the_ones_before_it_left() -> None:
    first = MemoryTier("first", {USER_KEY: stored(USER_VALUES)})
    second = MemoryTier("second", {MERCHANT_KEY: stored(MERCHANT_VALUES, Source.BACKING)})
    rows = await store_of(first, second).read([ROW])
    assert first.calls == [[USER_KEY, MERCHANT_KEY]]
    assert second.calls == [[MERCHANT_KEY]]
    assert rows.reads[0]["user:features"].source is Source.REDIS
    assert rows.reads[0]["merchant:risk"].source is Source.BACKING
    assert rows.source is Source.BACKING
    np.testing.assert_array_equal(rows.values[0], USER_VALUES + MERCHANT_VALUES)


async def test_the_last_tiers_reason_decides_the_defaults() -> None:
    first = MemoryTier("first", {}, otherwise=Reason.UNAVAILABLE)
    second = MemoryTier("second", {}, otherwise=Reason.MISSING)
    rows = await store_of(first, second).read([ROW])
    for read in rows.reads[0].values():
        assert (read.source, read.reason) == (Source.DEFAULT, Reason.MISSING)
    np.testing.assert_array_equal(rows.values[0], np.concatenate([g.defaults for g in TWO_GROUPS]))


async def test_answers_are_cached_failures_are_not() -> None:
    clock = FakeClock()
    tier = MemoryTier("only", {USER_KEY: stored(USER_VALUES)}, otherwise=Reason.UNAVAILABLE)
    store = store_of(tier, timer=clock)
    await store.read([ROW])
    rows = await store.read([ROW])
    assert tier.calls == [[USER_KEY, MERCHANT_KEY], [MERCHANT_KEY]]  # the failure is asked again
    assert rows.reads[0]["user:features"].source is Source.CACHE
    assert rows.reads[0]["merchant:risk"].reason is Reason.UNAVAILABLE
    clock.tick(5.0)  # the cache's TTL
    await store.read([ROW])
    assert tier.calls[-1] == [USER_KEY, MERCHANT_KEY]


async def test_deadline_serves_last_values_or_defaults_and_late_replies_fill_the_cache() -> None:
    clock = FakeClock()
    tier = MemoryTier("slow", {USER_KEY: stored(USER_VALUES)})
    store = store_of(tier, timer=clock, deadline_s=0.02, stale_max_age_s=60.0)
    await store.read([ROW])  # fast: cached
    clock.tick(10.0)  # no longer fresh, still younger than stale_max_age_s
    tier.delay_s = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    rows = await store.read([ROW])
    assert loop.time() - started < 0.15  # the deadline, not the tier's 0.2 s
    user, merchant = rows.reads[0]["user:features"], rows.reads[0]["merchant:risk"]
    assert (user.source, user.reason, user.stale) == (Source.CACHE, Reason.DEADLINE, True)
    np.testing.assert_array_equal(rows.values[0, : len(USER_VALUES)], USER_VALUES)
    # The merchant was read as missing before: its cached defaults, also stale.
    assert (merchant.reason, merchant.stale) == (Reason.DEADLINE, True)
    assert rows.source is Source.DEFAULT
    await store.wait_repairs()  # the late reply lands
    tier.delay_s = 0.0
    again = await store.read([ROW])
    assert again.reads[0]["user:features"].source is Source.CACHE
    assert again.reads[0]["user:features"].reason is None
    assert len(tier.calls) == 2


async def test_deadline_without_a_last_value_gives_defaults() -> None:
    tier = MemoryTier("slow", {USER_KEY: stored(USER_VALUES)}, delay_s=0.2)
    store = store_of(tier, deadline_s=0.02)
    rows = await store.read([ROW])
    for read in rows.reads[0].values():
        assert (read.source, read.reason, read.stale) == (Source.DEFAULT, Reason.DEADLINE, False)
    await store.wait_repairs()


async def test_concurrent_misses_share_one_read() -> None:
    tier = MemoryTier("only", {USER_KEY: stored(USER_VALUES)}, delay_s=0.02)
    store = store_of(tier)
    results = await asyncio.gather(*(store.read([ROW]) for _ in range(20)))
    assert tier.calls == [[USER_KEY, MERCHANT_KEY]]
    for rows in results:
        np.testing.assert_array_equal(rows.values, results[0].values)


async def test_a_broken_tier_gives_defaults_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    tier = MemoryTier("broken", {}, fails=True)
    store = store_of(tier)
    with caplog.at_level(logging.ERROR):
        rows = await store.read([ROW])
        await store.wait_repairs()
    for read in rows.reads[0].values():
        assert read.reason is Reason.UNAVAILABLE
    assert "feature read failed unexpectedly" in caplog.text


async def test_a_cancelled_caller_does_not_cancel_the_read() -> None:
    tier = MemoryTier("only", {USER_KEY: stored(USER_VALUES)}, delay_s=0.05)
    store = store_of(tier)
    caller = asyncio.create_task(store.read([ROW]))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await store.wait_repairs()
    rows = await store.read([ROW])  # filled by the read the caller left
    assert rows.reads[0]["user:features"].source is Source.CACHE
    assert len(tier.calls) == 1


async def test_aclose_closes_every_tier() -> None:
    tiers = MemoryTier("a", {}), MemoryTier("b", {})
    await store_of(*tiers).aclose()
    assert all(t.closed for t in tiers)


def test_a_store_needs_a_client_or_tiers() -> None:
    with pytest.raises(ValueError, match="client or its tiers"):
        FeatureStore()
    with pytest.raises(ValueError, match="deadline_s"):
        FeatureStore(tiers=[], deadline_s=0.0)
