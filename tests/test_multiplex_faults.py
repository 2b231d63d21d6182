"""The fault tests of tests/test_faults.py and the store-level deadline tests of
tests/test_deadline.py again, on the multiplexed connection the service reads through
(FeatureStore(multiplex=True), as open_store builds it): the same faults, the same
promises. Only their fixtures differ, overridden here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from features import (
    USER_FEATURES,
    CircuitBreaker,
    FeatureStore,
    FeatureWriter,
    Settings,
    Source,
    open_redis,
)
from features.breaker import State
from features.connection import Client
from tests import test_deadline
from tests.test_deadline import (
    LATE_REPLY_S,
    dynamo_proxy,
    proxy,
    slow_backing,
    slow_client,
    test_a_slow_reply_is_cut_at_the_deadline,
    test_b_the_last_value_is_served_stale_at_the_deadline,
    test_c_a_late_reply_still_fills_the_cache,
    test_d_slow_replies_open_the_breaker_and_it_closes_when_fast,
    test_e_a_slow_backing_store_is_cut_at_the_same_deadline,
)
from tests.test_faults import (
    USER,
    Rig,
    server,
    test_full_redis_writer_loses_nothing_and_readers_keep_serving,
    test_half_open_probe_runs_off_the_request_path,
    test_huge_and_unknown_fields_are_handled,
    test_keys_of_the_wrong_type_serve_defaults,
    test_more_concurrent_reads_than_connections,
    test_redis_hung_by_sigstop_then_sigcont,
    test_redis_killed_then_restarted,
    test_redis_slower_than_the_timeout,
)
from tools.delay_proxy import DelayProxy
from tools.redis_server import RedisServer

__all__ = [  # collected here too, with the fixtures below
    "dynamo_proxy",
    "proxy",
    "server",
    "slow_backing",
    "slow_client",
    "test_a_slow_reply_is_cut_at_the_deadline",
    "test_b_the_last_value_is_served_stale_at_the_deadline",
    "test_c_a_late_reply_still_fills_the_cache",
    "test_d_slow_replies_open_the_breaker_and_it_closes_when_fast",
    "test_e_a_slow_backing_store_is_cut_at_the_same_deadline",
    "test_full_redis_writer_loses_nothing_and_readers_keep_serving",
    "test_half_open_probe_runs_off_the_request_path",
    "test_huge_and_unknown_fields_are_handled",
    "test_keys_of_the_wrong_type_serve_defaults",
    "test_more_concurrent_reads_than_connections",
    "test_redis_hung_by_sigstop_then_sigcont",
    "test_redis_killed_then_restarted",
    "test_redis_slower_than_the_timeout",
]


@pytest.fixture
async def rig(server: RedisServer) -> AsyncIterator[Rig]:
    """tests/test_faults.py's rig, its store reading through the multiplexed connection."""
    settings = Settings(
        redis_url=server.url,
        redis_socket_timeout_s=0.1,
        redis_connect_timeout_s=0.1,
        redis_max_connections=4,
        redis_pool_timeout_s=0.02,
    )
    admin = redis.Redis(port=server.port, socket_timeout=5)
    client = open_redis(settings)
    breaker = CircuitBreaker(failure_threshold=3, reset_s=0.2)
    store = FeatureStore(client, cache_ttl_s=30.0, breaker=breaker, multiplex=True)
    await FeatureWriter(client).write(USER_FEATURES, [(f"u{i}", USER) for i in range(20)])
    yield Rig(server, admin, client, store, breaker)
    await store.aclose()
    await client.aclose()
    admin.close()


@pytest.fixture
async def make_store(proxy: DelayProxy) -> AsyncIterator[test_deadline.MakeStore]:
    """tests/test_deadline.py's store factory, with multiplex=True."""
    stores: list[FeatureStore] = []

    def make(client: Client, **kwargs: object) -> FeatureStore:
        kwargs.setdefault("deadline_s", test_deadline.DEADLINE_S)
        store = FeatureStore(client, multiplex=True, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    proxy.set_delay(0)
    await asyncio.sleep(LATE_REPLY_S)
    for store in stores:
        await store.aclose()


async def test_reads_need_no_pooled_connection(rig: Rig) -> None:
    """What replaces tests/test_faults.py's exhausted-pool test: with every pooled
    connection taken, reads still go to Redis, and the breaker stays closed."""
    assert isinstance(rig.client, redis.asyncio.Redis)
    pool = rig.client.connection_pool
    held = [await pool.get_connection() for _ in range(4)]  # type: ignore[no-untyped-call]
    try:
        for i in range(6):
            rows, _ = await rig.read(f"u{i + 1}")
            assert rows.reads[0]["user:features"].source is Source.REDIS
        assert rig.breaker.state is State.CLOSED
    finally:
        for connection in held:
            await pool.release(connection)
