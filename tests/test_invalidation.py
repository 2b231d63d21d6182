"""Cache invalidation (features/online/tracking.py) against real redis-servers: a write
drops the key from every worker's cache, a reply in flight is not cached past the write,
a lost session falls back to the short TTL and comes back, a flush empties the cache,
Sentinel mode; cluster mode is in tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from features import (
    GROUPS,
    MERCHANT_EMBEDDING,
    MERCHANT_RISK,
    USER_ACTIVITY,
    USER_FEATURES,
    USER_MERCHANTS,
    FeatureStore,
    FeatureWriter,
    Reason,
    Settings,
    Source,
    metrics,
    open_redis,
    open_store,
)
from features.backing import Record
from features.breaker import CircuitBreaker
from features.connection import Client
from features.online.keys import key_of
from features.online.structures import pack_embedding
from features.online.tracking import LIVE, LOST, OFF
from features.spec import FeatureGroup
from tests.conftest import FakeClock, command_calls, sentinel_settings
from tests.test_security import PASSWORD, READER, READER_PASSWORD, TLSRedis, tls_redis
from tools.delay_proxy import DelayProxy
from tools.redis_server import RedisServer

SHORT_TTL_S, TRACKED_TTL_S = 5.0, 60.0
U1 = USER_FEATURES.key("u1")
TX_MEMBER_ID = key_of(USER_MERCHANTS, "u1", "m1").id
TX = {"user": "u1", "merchant": "m1"}
WAIT_S = 5.0  # the bound on every wait for an asynchronous effect

__all__ = ["tls_redis"]  # a fixture, imported for the ACL test


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail after WAIT_S."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S
    while not condition():
        if loop.time() > give_up:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.005)


def tracked_store(client: Client, clock: FakeClock, **kwargs: Any) -> FeatureStore:
    kwargs.setdefault("groups", (USER_FEATURES, MERCHANT_RISK))
    return FeatureStore(
        client,
        multiplex=True,
        invalidation=True,
        cache_ttl_s=SHORT_TTL_S,
        cache_tracked_ttl_s=TRACKED_TTL_S,
        timer=clock,
        **kwargs,
    )


def user_value(rows: Any) -> float:
    return float(rows.values[0, 0])  # tx_count_1h, the first stored feature


def kill_tracked(admin: redis.Redis) -> int:
    """CLIENT KILL every connection with tracking on (flag `t`); how many."""
    tracked = [c for c in admin.client_list() if "t" in c["flags"]]
    for c in tracked:
        admin.client_kill_filter(_id=c["id"])
    return len(tracked)


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.fixture
async def stores(client: Client, clock: FakeClock) -> AsyncIterator[list[FeatureStore]]:
    """Two workers' stores on one Redis, tracking, both open."""
    made = [tracked_store(client, clock), tracked_store(client, clock)]
    for store in made:
        await store.open()
    yield made
    for store in made:
        await store.aclose()


async def write_user(client: Client, value: float) -> None:
    await FeatureWriter(client).write(USER_FEATURES, [("u1", {"tx_count_1h": value})])


async def test_a_write_drops_the_key_from_every_workers_cache(
    client: Client, stores: list[FeatureStore], clock: FakeClock, sync_redis: redis.Redis
) -> None:
    await write_user(client, 1.0)
    for store in stores:
        assert store.tracking is not None and store.tracking.state == LIVE
        assert user_value(await store.read([TX])) == 1.0
    clock.tick(SHORT_TTL_S * 2)  # past the short TTL, within the tracked one
    for store in stores:
        rows = await store.read([TX])
        assert rows.source is Source.CACHE and user_value(rows) == 1.0
    dropped = counter(metrics.INVALIDATED_KEYS, "dropped")
    sync_redis.hset(U1, "tx_count_1h", 2)  # another client, not the store's writer
    for store in stores:
        await wait_until(lambda s=store: U1 not in s._cache, "the written key left the cache")  # type: ignore[misc]
    assert counter(metrics.INVALIDATED_KEYS, "dropped") >= dropped + 2
    for store in stores:
        rows = await store.read([TX])
        user = rows.reads[0]["user:features"]
        assert user.source is Source.REDIS and user_value(rows) == 2.0
        assert MERCHANT_RISK.key("m1") in store._cache  # never written: still cached


async def test_a_flush_empties_the_cache(
    client: Client, stores: list[FeatureStore], sync_redis: redis.Redis
) -> None:
    await write_user(client, 1.0)
    store = stores[0]
    await store.read([TX, {"user": "u2", "merchant": "m2"}])
    assert len(store._cache) == 4
    flushes = counter(metrics.INVALIDATIONS, "flush")
    sync_redis.flushdb()
    await wait_until(lambda: len(store._cache) == 0, "the flush emptied the cache")
    assert counter(metrics.INVALIDATIONS, "flush") > flushes


class _HeldBackingStore:
    """A backing store whose reads wait for the test: a read held in flight."""

    name = "held"

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.answer = asyncio.Event()

    async def open(self) -> None:
        return None

    async def read(self, keys: Sequence[tuple[FeatureGroup, str]]) -> list[Record | None]:
        self.reading.set()
        await self.answer.wait()
        return [None] * len(keys)  # absent: the read is answered `missing`, cacheable

    async def aclose(self) -> None:
        return None


async def test_a_read_in_flight_when_its_key_is_invalidated_is_not_cached(
    client: Client, clock: FakeClock, sync_redis: redis.Redis
) -> None:
    # Redis misses u1 (and tracks it); the read is still in flight, at the backing
    # store, when a writer creates the key: what the read brings back predates the write.
    backing = _HeldBackingStore()
    store = tracked_store(client, clock, backing=backing, backing_timeout_s=WAIT_S)
    await store.open()
    try:
        in_flight = counter(metrics.INVALIDATED_KEYS, "in_flight")
        read = asyncio.create_task(store.read([TX]))
        await asyncio.wait_for(backing.reading.wait(), WAIT_S)
        sync_redis.hset(U1, "tx_count_1h", 3)
        await wait_until(
            lambda: counter(metrics.INVALIDATED_KEYS, "in_flight") > in_flight,
            "the invalidation reached the read in flight",
        )
        backing.answer.set()
        rows = await read
        assert rows.reads[0]["user:features"].reason is Reason.MISSING  # as it was read
        assert U1 not in store._cache  # but not cached: the key has changed since
        assert MERCHANT_RISK.key("m1") in store._cache  # the untouched key is
        rows = await store.read([TX])
        assert rows.reads[0]["user:features"].source is Source.REDIS and user_value(rows) == 3.0
    finally:
        await store.aclose()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    with DelayProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


async def test_a_reply_delayed_past_a_write_is_not_served_after_it(
    proxy: DelayProxy, clock: FakeClock, sync_redis: redis.Redis
) -> None:
    # The reply (the old value) and then the invalidation travel the same delayed
    # connection: the old value may reach the request that asked, never a later one.
    settings = Settings(redis_url=proxy.url(), redis_socket_timeout_s=WAIT_S)
    client = open_redis(settings)
    store = tracked_store(client, clock)
    try:
        await store.open()
        sync_redis.hset(U1, "tx_count_1h", 1)
        proxy.set_delay(0.2)
        read = asyncio.create_task(store.read([TX]))
        await wait_until(lambda: command_calls(sync_redis, "hmget") >= 2, "the server read it")
        sync_redis.hset(U1, "tx_count_1h", 4)
        assert user_value(await read) == 1.0
        await wait_until(lambda: U1 not in store._cache, "the late invalidation dropped it")
        proxy.set_delay(0)
        assert user_value(await store.read([TX])) == 4.0
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_killed_session_falls_back_to_the_short_ttl_then_comes_back(
    client: Client, stores: list[FeatureStore], clock: FakeClock, sync_redis: redis.Redis
) -> None:
    store = stores[0]
    tracking = store.tracking
    assert tracking is not None
    await write_user(client, 1.0)
    await store.read([TX])
    lost = counter(metrics.TRACKING_SESSIONS, "lost")
    # Both workers' read connections (and any other tracked one: a session's bentoml serve).
    assert kill_tracked(sync_redis) >= 2
    await wait_until(lambda: tracking.sessions == 2, "a new session after the kill")
    assert counter(metrics.TRACKING_SESSIONS, "lost") >= lost + 2
    # Read under the lost session: the short TTL again, though tracking is back.
    clock.tick(SHORT_TTL_S * 2)
    assert (await store.read([TX])).reads[0]["user:features"].source is Source.REDIS
    # Read under the new one: the tracked TTL, and invalidations work again.
    clock.tick(SHORT_TTL_S * 2)
    assert (await store.read([TX])).source is Source.CACHE
    sync_redis.hset(U1, "tx_count_1h", 5)
    await wait_until(lambda: U1 not in store._cache, "the new session's invalidation")
    assert user_value(await store.read([TX])) == 5.0


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    with RedisServer(quiet=True) as server:
        yield server


async def test_redis_restarted_short_ttl_while_down_tracking_after(
    own_server: RedisServer, clock: FakeClock
) -> None:
    settings = Settings(
        redis_url=own_server.url, redis_socket_timeout_s=1.0, redis_connect_timeout_s=0.2
    )
    client = open_redis(settings)
    store = tracked_store(client, clock, breaker=CircuitBreaker(reset_s=0.05))
    tracking = store.tracking
    assert tracking is not None
    try:
        await store.open()
        await write_user(client, 1.0)
        assert user_value(await store.read([TX])) == 1.0
        own_server.kill()
        await wait_until(lambda: tracking.state == LOST, "the session is lost")
        clock.tick(SHORT_TTL_S / 2)  # within the short TTL: still served
        assert (await store.read([TX])).source is Source.CACHE
        clock.tick(SHORT_TTL_S)  # past it: not served from the cache any more
        rows = await store.read([TX])
        assert rows.reads[0]["user:features"].reason is Reason.UNAVAILABLE
        assert tracking.state == LOST
        own_server.start()
        await wait_until(lambda: tracking.state == LIVE, "the keeper reconnected")
        assert tracking.sessions == 2
        sync = redis.Redis(port=own_server.port)
        sync.hset(U1, "tx_count_1h", 6)
        rows = await store.read([TX])
        for _ in range(int(WAIT_S / 0.05)):  # until the breaker's probe (0.05 s) closes it
            if rows.reads[0]["user:features"].reason is not Reason.CIRCUIT_OPEN:
                break
            await asyncio.sleep(0.05)
            rows = await store.read([TX])
        assert user_value(rows) == 6.0  # the old entry was not served
        sync.hset(U1, "tx_count_1h", 7)
        await wait_until(lambda: U1 not in store._cache, "invalidation after the restart")
        sync.close()
    finally:
        await store.aclose()
        await client.aclose()


async def test_open_store_tracks_by_default(settings: Settings, client: Client) -> None:
    store = open_store(settings, client)
    assert store.tracking is not None
    try:
        await store.open()
        assert store.tracking.state == LIVE
    finally:
        await store.aclose()
    assert store.tracking.state == OFF
    off = open_store(settings.model_copy(update={"cache_invalidation": False}), client)
    assert off.tracking is None


async def test_reads_over_resp3_answer_as_over_resp2(
    client: Client, clock: FakeClock, sync_redis: redis.Redis
) -> None:
    # The tracked connection speaks RESP3: values, missing keys and wrong types read alike,
    # for every kind of group (ZSCORE answers a RESP3 double).
    await write_user(client, 9.0)
    sync_redis.set(MERCHANT_RISK.key("bad"), "not a hash")
    sync_redis.zadd(USER_MERCHANTS.key("u1"), {"m1": 1.7e9 + 0.25})
    sync_redis.zadd(USER_ACTIVITY.key("u1"), {"t1": time.time()})
    sync_redis.set(MERCHANT_EMBEDDING.key("m1"), pack_embedding([0.5] * MERCHANT_EMBEDDING.dim))
    tracked = tracked_store(client, clock, groups=GROUPS)
    await tracked.open()
    try:
        await wait_until(
            lambda: tracked.tracking is not None and tracked.tracking.state == LIVE, "live"
        )
        rows = await tracked.read([TX, {"user": "ghost", "merchant": "bad"}])
    finally:
        await tracked.aclose()
    resp2 = FeatureStore(client, multiplex=True)
    try:
        plain = await resp2.read([TX, {"user": "ghost", "merchant": "bad"}])
    finally:
        await resp2.aclose()
    assert (rows.values == plain.values).all() and rows.reads == plain.reads
    assert user_value(rows) == 9.0
    assert rows.reads[1]["user:features"].reason is Reason.MISSING
    assert rows.reads[1]["merchant:risk"].reason is Reason.INVALID


def test_the_tracked_ttl_is_never_below_the_short_one(client: Client) -> None:
    # A deployment that set only FEATURES_CACHE_TTL_S, longer than the tracked default,
    # keeps its TTL: no start-up error, no shorter lifetime.
    settings = Settings.from_env(
        {"FEATURES_CACHE_TTL_S": "3600", "FEATURES_STALE_MAX_AGE_S": "3600"}
    )
    assert settings.cache_tracked_ttl_s == 60.0
    assert open_store(settings, client)._cache.tracked_ttl_s == 3600.0
    with pytest.raises(ValueError, match="FEATURES_CACHE_INVALIDATION"):
        Settings.from_env({"FEATURES_CACHE_INVALIDATION": "maybe"})
    with pytest.raises(ValueError, match="FEATURES_CACHE_TRACKED_TTL_S"):
        Settings.from_env({"FEATURES_CACHE_TRACKED_TTL_S": "0"})


async def test_sentinel_mode_tracks_the_master(clock: FakeClock) -> None:
    from tools.redis_cluster import LocalSentinel

    with LocalSentinel() as sentinel:
        assert sentinel.master is not None
        master = redis.Redis(port=sentinel.master.port)
        master.hset(U1, "tx_count_1h", 1)
        client = open_redis(sentinel_settings(sentinel))
        store = tracked_store(client, clock)
        try:
            await store.open()
            assert store.tracking is not None and store.tracking.state == LIVE
            assert user_value(await store.read([TX])) == 1.0
            master.hset(U1, "tx_count_1h", 8)
            await wait_until(lambda: U1 not in store._cache, "the master's invalidation")
            assert user_value(await store.read([TX])) == 8.0
        finally:
            await store.aclose()
            await client.aclose()
            master.close()


async def test_an_acl_user_without_hello_reads_untracked_one_with_it_is_tracked(
    tls_redis: TLSRedis, clock: FakeClock
) -> None:
    # redis-server 7 with TLS and ACLs. The serving user of docs/reliability.md
    # (+hmget +ping) may not HELLO: reads work, with the short TTL only.
    admin = redis.Redis(port=tls_redis.server.port, password=PASSWORD)
    admin.acl_setuser(
        "tracked",
        enabled=True,
        passwords=["+pw-Tracked-5c1d"],
        keys=["user:*", "merchant:*"],
        commands=["-@all", "+hmget", "+ping", "+hello", "+client|tracking"],
    )
    try:
        for user, password, state in [
            (READER, READER_PASSWORD, OFF),
            ("tracked", "pw-Tracked-5c1d", LIVE),
        ]:
            settings = tls_redis.settings(redis_username=user, redis_password=password)
            client = open_redis(settings)
            store = tracked_store(client, clock)
            try:
                await store.open()
                assert store.tracking is not None and store.tracking.state == state
                assert user_value(await store.read([TX])) == 7.0
                clock.tick(SHORT_TTL_S * 2)
                rows = await store.read([TX])
                expected = Source.CACHE if state == LIVE else Source.REDIS
                assert rows.reads[0]["user:features"].source is expected
                if state == LIVE:
                    admin.hset(U1, "tx_count_1h", 7)  # the same value: still a write
                    await wait_until(lambda s=store: U1 not in s._cache, "invalidated")  # type: ignore[misc]
            finally:
                await store.aclose()
                await client.aclose()
    finally:
        admin.acl_deluser("tracked")
        admin.close()


def paid(rows: Any) -> float:
    return float(rows.values[0, 0])  # merchant_last_paid_ts, the member group's stored value


async def test_a_write_drops_every_member_entry_of_its_key(
    client: Client, clock: FakeClock, sync_redis: redis.Redis
) -> None:
    # Each (user, merchant) pair is cached under its own id; the invalidation names the
    # user's key, and the cache finds the pairs by it.
    merchants = USER_MERCHANTS.key("u1")
    sync_redis.zadd(merchants, {"m1": 1.7e9, "m2": 1.6e9})
    sync_redis.zadd(USER_MERCHANTS.key("u2"), {"m1": 1.5e9})
    store = tracked_store(client, clock, groups=(USER_MERCHANTS,))
    await store.open()
    pairs = [TX, {"user": "u1", "merchant": "m2"}, {"user": "u2", "merchant": "m1"}]
    try:
        await wait_until(
            lambda: store.tracking is not None and store.tracking.state == LIVE, "tracking live"
        )
        for tx in pairs:
            assert (await store.read([tx])).reads[0]["user:merchants"].source is Source.REDIS
        clock.tick(SHORT_TTL_S * 2)  # past the short TTL, within the tracked one
        for tx in pairs:
            assert (await store.read([tx])).reads[0]["user:merchants"].source is Source.CACHE
        dropped = counter(metrics.INVALIDATED_KEYS, "dropped")
        sync_redis.zadd(merchants, {"m1": 1.8e9})  # u1 paid m1 again
        await wait_until(lambda: len(store._cache) == 1, "u1's two pairs left the cache")
        assert counter(metrics.INVALIDATED_KEYS, "dropped") == dropped + 2
        again = await store.read([TX])
        assert again.reads[0]["user:merchants"].source is Source.REDIS and paid(again) == 1.8e9
        other = await store.read([pairs[2]])
        assert other.reads[0]["user:merchants"].source is Source.CACHE  # u2 was not written
        assert store._inflight_members == {}  # nothing left behind by the reads
    finally:
        await store.aclose()


async def test_a_member_read_in_flight_when_its_key_is_written_is_not_cached(
    proxy: DelayProxy, clock: FakeClock, sync_redis: redis.Redis
) -> None:
    settings = Settings(redis_url=proxy.url(), redis_socket_timeout_s=WAIT_S)
    client = open_redis(settings)
    store = tracked_store(client, clock, groups=(USER_MERCHANTS,))
    try:
        await store.open()
        await wait_until(
            lambda: store.tracking is not None and store.tracking.state == LIVE, "tracking live"
        )
        sync_redis.zadd(USER_MERCHANTS.key("u1"), {"m1": 1.7e9})
        proxy.set_delay(0.2)
        in_flight = counter(metrics.INVALIDATED_KEYS, "in_flight")
        read = asyncio.create_task(store.read([TX]))
        await wait_until(lambda: command_calls(sync_redis, "zscore") >= 1, "the server read it")
        sync_redis.zadd(USER_MERCHANTS.key("u1"), {"m1": 1.9e9})
        assert paid(await read) == 1.7e9  # as read, by the request that asked
        await wait_until(
            lambda: (
                counter(metrics.INVALIDATED_KEYS, "in_flight") > in_flight
                or TX_MEMBER_ID not in store._cache
            ),
            "the invalidation reached the member read",
        )
        await store.wait_repairs()
        assert TX_MEMBER_ID not in store._cache
        proxy.set_delay(0)
        assert paid(await store.read([TX])) == 1.9e9
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_windowed_count_keeps_the_short_ttl(
    client: Client, clock: FakeClock, sync_redis: redis.Redis
) -> None:
    # Events leave the 10-minute window without a write, so no invalidation would say the
    # count moved: under a live session it is still cached for the short TTL only.
    sync_redis.zadd(USER_ACTIVITY.key("u1"), {"tx-1": time.time()})
    store = tracked_store(client, clock, groups=(USER_ACTIVITY,))
    await store.open()
    try:
        await wait_until(
            lambda: store.tracking is not None and store.tracking.state == LIVE, "tracking live"
        )
        assert (await store.read([TX])).reads[0]["user:activity"].source is Source.REDIS
        clock.tick(SHORT_TTL_S / 2)
        assert (await store.read([TX])).reads[0]["user:activity"].source is Source.CACHE
        clock.tick(SHORT_TTL_S)  # past the short TTL, within the tracked one
        assert (await store.read([TX])).reads[0]["user:activity"].source is Source.REDIS
    finally:
        await store.aclose()
