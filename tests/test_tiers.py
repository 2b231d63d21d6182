"""Each tier of the read path on its own: the cache, Redis (real server), the backing tier."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pytest
import redis

from features import (
    MERCHANT_RISK,
    USER_FEATURES,
    CircuitBreaker,
    FeatureWriter,
    Reason,
    Source,
    metrics,
)
from features.backing import EncodedRow, Record, RestoreCounts, restore_to_redis
from features.breaker import State
from features.connection import Client
from features.errors import BackingStoreError
from features.online.backing_tier import BackingTier
from features.online.cache import NO_SESSION, UNTRACKED, EntryCache
from features.online.codec import codec_for
from features.online.keys import key_of
from features.online.redis_tier import RedisTier
from features.spec import FeatureGroup
from tests.conftest import command_calls

CODECS = {g.qualified_name: codec_for(g) for g in (USER_FEATURES, MERCHANT_RISK)}
USER = {f.name: 1.0 for f in USER_FEATURES.features}


def far() -> float:
    return asyncio.get_running_loop().time() + 60.0


def test_cache_is_fresh_for_its_ttl_and_kept_for_the_fallback() -> None:
    cache = EntryCache(maxsize=2, ttl_s=5.0, keep_s=60.0)
    entry = codec_for(USER_FEATURES).missing
    cache.put("a", entry, now=100.0)
    assert cache.fresh("a", 104.9) is not None
    assert cache.fresh("a", 105.0) is None
    last = cache.last("a", 159.9)
    assert last is not None and last[:3] == entry
    assert cache.last("a", 160.0) is None
    cache.put("b", entry, now=100.0)
    cache.fresh("a", 100.0)  # a is now the most recently used
    cache.put("c", entry, now=100.0)
    assert cache.fresh("b", 100.0) is None and cache.fresh("a", 100.0) is not None
    assert len(cache) == 2
    with pytest.raises(ValueError):
        EntryCache(maxsize=1, ttl_s=5.0, keep_s=1.0)


def test_cache_gives_the_tracked_ttl_only_under_the_live_session() -> None:
    cache = EntryCache(maxsize=10, ttl_s=5.0, keep_s=300.0, tracked_ttl_s=60.0)
    entry = codec_for(USER_FEATURES).missing
    cache.session = 1
    cache.put("tracked", entry, now=100.0, session=1)
    cache.put("untracked", entry, now=100.0, session=UNTRACKED)
    assert cache.fresh("tracked", 159.9) is not None and cache.fresh("tracked", 160.0) is None
    assert cache.fresh("untracked", 104.9) is not None and cache.fresh("untracked", 105.0) is None
    cache.session = NO_SESSION  # the session is lost: the short TTL for every entry
    assert cache.fresh("tracked", 104.9) is not None and cache.fresh("tracked", 105.0) is None
    cache.session = 2  # a new one does not track what the old one read
    assert cache.fresh("tracked", 105.0) is None
    assert cache.last("tracked", 105.0) is not None  # still the deadline's fallback
    assert cache.drop("tracked") and not cache.drop("tracked") and "tracked" not in cache
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        EntryCache(maxsize=1, ttl_s=5.0, keep_s=30.0, tracked_ttl_s=60.0)


def test_cache_drops_a_key_with_its_member_entries() -> None:
    cache = EntryCache(maxsize=3, ttl_s=5.0, keep_s=300.0)
    entry = codec_for(USER_FEATURES).missing
    cache.put("k1#a", entry, now=1.0, member_of="k1")
    cache.put("k1#b", entry, now=1.0, member_of="k1")
    cache.put("k2#a", entry, now=1.0, member_of="k2")
    assert cache.drop("k1") == 2 and len(cache) == 1 and "k2#a" in cache
    assert cache.drop("k1") == 0
    cache.put("k3", entry, now=2.0)
    cache.put("k4", entry, now=2.0)
    cache.put("k5", entry, now=2.0)  # evicts k2#a, least recently used
    assert "k2#a" not in cache and cache.drop("k2") == 0
    assert cache._members == {}  # the index forgets what the LRU evicted


def test_stored_entries_leave_the_collector_nothing_to_walk() -> None:
    # On a cold cache nearly every request stores entries: a tracked object per entry
    # would set young collections off and be what each of them walks.
    cache = EntryCache(maxsize=300, ttl_s=5.0, keep_s=60.0)
    entry = codec_for(USER_FEATURES).missing

    def put(batch: str) -> None:
        for i in range(1000):  # evicting from the 301st on
            cache.put(f"{batch}{i}", entry, now=1.0, member_of=f"r{i % 7}" if i % 2 else "")
        cache.drop("r1")

    put("a")  # once: what the maps themselves come to hold
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects(0))
        put("b")
        young = len(gc.get_objects(0)) - before
    finally:
        gc.enable()
    assert young == 0
    assert "b998" in cache and cache.last("b999", 2.0) == entry


async def test_redis_tier_answers_values_missing_and_wrong_types(
    client: Client, sync_redis: redis.Redis
) -> None:
    await FeatureWriter(client).write(USER_FEATURES, [("u1", USER)])
    sync_redis.set(USER_FEATURES.key("bad"), "not a hash")
    tier = RedisTier(client, CODECS)
    keys = [key_of(USER_FEATURES, u) for u in ("u1", "ghost", "bad")]
    found, missing, wrong = await tier.read(keys, far())
    assert missing is Reason.MISSING  # for the next tier to ask
    assert not isinstance(found, Reason) and not isinstance(wrong, Reason)
    np.testing.assert_array_equal(found[0], [1.0] * len(USER_FEATURES.features))
    read = CODECS["user:features"].reads[wrong[1]][0]
    assert (read.source, read.reason) == (Source.DEFAULT, Reason.INVALID)
    assert command_calls(sync_redis, "hmget") == 3


async def test_redis_tier_counts_a_reply_after_the_deadline_as_slow(redis_server) -> None:
    from features import Settings, open_redis
    from tools.delay_proxy import DelayProxy

    breaker = CircuitBreaker(slow_threshold=2, window=4)
    with DelayProxy("127.0.0.1", redis_server.port, delay_s=0.03) as proxy:
        slow = open_redis(Settings(redis_url=proxy.url(), redis_socket_timeout_s=1.0))
        try:
            tier = RedisTier(slow, CODECS, breaker=breaker)
            key = key_of(USER_FEATURES, "u1")
            for _ in range(2):  # each reply lands 30 ms later, the deadline is 5 ms away
                await tier.read([key], asyncio.get_running_loop().time() + 0.005)
            assert breaker.state is State.OPEN
            assert await tier.read([key], far()) == [Reason.CIRCUIT_OPEN]
            await tier.aclose()
        finally:
            await slow.aclose()


def probes_running() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "RedisTier._probe" and not task.done()
    ]


async def test_aclose_stops_every_probe_in_flight_and_starts_none(redis_server, clock) -> None:
    from features import FeatureStore, Settings, open_redis
    from tools.delay_proxy import DelayProxy

    breaker = CircuitBreaker(failure_threshold=1, reset_s=1.0, timer=clock)
    with DelayProxy("127.0.0.1", redis_server.port, delay_s=5.0) as proxy:
        held = open_redis(Settings(redis_url=proxy.url(), redis_socket_timeout_s=10.0))
        store = FeatureStore(held, breaker=breaker)
        try:
            breaker.failure()
            for i in range(2):
                clock.tick(1.0)  # half-open: this read sends a PING, which the proxy holds
                await store.read([{"user": f"u{i}", "merchant": "m1"}])
                breaker.failure()  # a read sent before the breaker opened fails late
            probes = probes_running()
            assert len(probes) == 2
            await store.aclose()
            assert not probes_running()
            clock.tick(1.0)
            await store.read([{"user": "late", "merchant": "m1"}])  # racing the close
            assert not probes_running()
        finally:
            for task in probes_running():
                task.cancel()
            await held.aclose()


async def test_redis_tier_reports_a_failure_as_unavailable() -> None:
    from features import Settings, open_redis
    from tools.redis_server import free_port

    down = open_redis(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        tier = RedisTier(down, CODECS)
        assert await tier.read([key_of(USER_FEATURES, "u1")], far()) == [Reason.UNAVAILABLE]
    finally:
        await down.aclose()


def state(breaker: CircuitBreaker) -> State:
    return breaker.state  # a call, so mypy does not narrow the property between steps


async def test_both_breakers_run_on_the_injected_timer(client: Client, clock) -> None:
    from features import FeatureStore, Settings, open_redis
    from tools.redis_server import free_port

    down = open_redis(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        tier = RedisTier(down, CODECS, timer=clock)
        for _ in range(5):  # the default threshold
            await tier.read([key_of(USER_FEATURES, "u1")], far())
        assert state(tier.breaker) is State.OPEN
        clock.tick(1.0)  # the default reset, on the injected timer alone
        assert state(tier.breaker) is State.HALF_OPEN
    finally:
        await down.aclose()
    store = FeatureStore(client, backing=MemoryBacking({}), timer=clock)
    redis_tier, backing_tier = store._tiers
    assert isinstance(redis_tier, RedisTier) and isinstance(backing_tier, BackingTier)
    for breaker in (redis_tier.breaker, backing_tier.breaker):
        for _ in range(5):
            breaker.failure()
        assert state(breaker) is State.OPEN
        clock.tick(5.0)  # past either default reset
        assert state(breaker) is State.HALF_OPEN


class MemoryBacking:
    """A backing store held in a dict: the backing tier's logic without an emulator."""

    name = "memory"

    def __init__(self, records: dict[tuple[str, str], Record], fails: bool = False) -> None:
        self.records = records
        self.fails = fails
        self.opened = 0

    async def open(self) -> None:
        self.opened += 1

    async def read(self, keys: Sequence[tuple[FeatureGroup, str]]) -> list[Record | None]:
        if self.fails:
            raise BackingStoreError("down")
        return [self.records.get((g.qualified_name, e)) for g, e in keys]

    async def write(
        self,
        group: FeatureGroup,
        rows: Sequence[EncodedRow],
        event_ts: float,
        *,
        versions: Sequence[int] | None = None,
    ) -> int:
        raise NotImplementedError

    def scan(self, batch_size: int) -> AsyncIterator[list[tuple[FeatureGroup, str, Record]]]:
        raise NotImplementedError

    async def create_layout(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_backing_tier_answers_found_missing_and_repairs_redis(
    client: Client, sync_redis: redis.Redis
) -> None:
    record = Record(tuple(b"2" for _ in USER_FEATURES.features), 1.7e9)
    store = MemoryBacking({("user:features", "u1"): record})
    tier = BackingTier(store, CODECS, repair_client=client, clock=lambda: 1.7e9 + 1)
    found, missing = await tier.read(
        [key_of(USER_FEATURES, "u1"), key_of(USER_FEATURES, "u2")], far()
    )
    assert missing is Reason.MISSING and not isinstance(found, Reason)
    assert CODECS["user:features"].reads[found[1]][0].source is Source.BACKING
    await tier.wait_repairs()
    assert sync_redis.hget(USER_FEATURES.key("u1"), "tx_count_1h") == b"2"


async def test_backing_tier_skips_repair_while_redis_is_down_and_reports_failures(
    client: Client, sync_redis: redis.Redis
) -> None:
    record = Record(tuple(b"2" for _ in USER_FEATURES.features), None)
    store = MemoryBacking({("user:features", "u1"): record})
    tier = BackingTier(store, CODECS, repair_client=client, repair_when=lambda: False)
    await tier.read([key_of(USER_FEATURES, "u1")], far())
    await tier.wait_repairs()
    assert sync_redis.dbsize() == 0
    store.fails = True
    assert await tier.read([key_of(USER_FEATURES, "u1")], far()) == [Reason.UNAVAILABLE]


VALUES = tuple(b"2" for _ in USER_FEATURES.features)
N = 5000  # records to restore into a Redis with room for about half of them


@contextmanager
def nearly_full(sync_redis: redis.Redis, ids: Sequence[str]) -> Iterator[None]:
    """Redis refuses writes (maxmemory, noeviction) once about half the memory that
    USER_FEATURES records of `ids` take is used: measured by writing them once, so that
    neither the records' size nor what else Redis holds at the time moves the result."""

    def used() -> int:
        return int(sync_redis.info("memory")["used_memory"])

    keys = [USER_FEATURES.key(i) for i in ids]
    fields = [x for f, v in zip(USER_FEATURES.features, VALUES, strict=True) for x in (f.name, v)]
    start = used()
    with sync_redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hset(key, items=fields)
            pipe.expire(key, 3600)
        pipe.execute()
    need = used() - start
    sync_redis.delete(*keys)
    sync_redis.config_set("maxmemory", used() + need // 2)
    sync_redis.config_set("maxmemory-policy", "noeviction")
    try:
        yield
    finally:
        sync_redis.config_set("maxmemory", 0)


async def test_restore_counts_every_record_once(client: Client, sync_redis: redis.Redis) -> None:
    sync_redis.hset(USER_FEATURES.key("there"), "tx_count_1h", 9)
    only_ts = Record(tuple(None for _ in USER_FEATURES.features), time.time())
    items = [(USER_FEATURES, f"u{i}", Record(VALUES, None)) for i in range(N)]
    items += [
        (USER_FEATURES, "there", Record(VALUES, None)),
        (USER_FEATURES, "only-ts", only_ts),
        (USER_FEATURES, "old", Record(VALUES, 1.0)),
    ]
    with nearly_full(sync_redis, [f"u{i}" for i in range(N)]):
        counts = await restore_to_redis(client, items, time.time())
    written = sync_redis.dbsize() - 1
    assert 0 < written < N, "Redis should fill up part way"
    assert (counts.written, counts.failed) == (written, N - written)
    assert (counts.present, counts.empty, counts.expired) == (1, 1, 1)
    assert "OOM" in str(counts.error)


async def test_read_repair_counts_only_what_redis_refused_as_failed(
    client: Client, sync_redis: redis.Redis
) -> None:
    store = MemoryBacking({("user:features", f"u{i}"): Record(VALUES, None) for i in range(N)})
    tier = BackingTier(store, CODECS, repair_client=client)
    outcomes = ("written", "failed")
    before = {o: metrics.READ_REPAIRS.labels(o)._value.get() for o in outcomes}
    with nearly_full(sync_redis, [f"u{i}" for i in range(N)]):
        await tier.read([key_of(USER_FEATURES, f"u{i}") for i in range(N)], far())
        await tier.wait_repairs()
    written = sync_redis.dbsize()
    assert 0 < written < N, "Redis should fill up part way"
    counted = {o: metrics.READ_REPAIRS.labels(o)._value.get() - before[o] for o in outcomes}
    assert counted == {"written": written, "failed": N - written}


async def test_an_unexpected_repair_error_is_logged_and_counted(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object) -> RestoreCounts:
        raise RuntimeError("a bug in read repair")

    # A fault no server shows: an error that is not Redis's, in a task no caller awaits.
    monkeypatch.setattr("features.online.backing_tier.restore_to_redis", broken)
    store = MemoryBacking({("user:features", f"u{i}"): Record(VALUES, None) for i in range(2)})
    tier = BackingTier(store, CODECS, repair_client=client)
    failed = metrics.READ_REPAIRS.labels("failed")
    before = failed._value.get()
    with caplog.at_level(logging.WARNING, logger="features.online.backing_tier"):
        for _ in range(2):
            await tier.read([key_of(USER_FEATURES, "u0"), key_of(USER_FEATURES, "u1")], far())
            await tier.wait_repairs()
    assert failed._value.get() == before + 4
    (record,) = caplog.records  # rate-limited: one line for both
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "RuntimeError: a bug in read repair" in record.getMessage()
