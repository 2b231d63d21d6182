"""The feature step's one deadline and the slow-call breaker, against a real redis-server
(and dynalite) behind a proxy that delays their replies."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from features import GROUPS as ALL_GROUPS
from features import (
    HASH_GROUPS,
    USER_FEATURES,
    CircuitBreaker,
    FeatureRows,
    FeatureStore,
    FeatureWriter,
    GroupRead,
    Reason,
    Settings,
    Source,
    metrics,
    open_redis,
)
from features.backing.dynamo import DynamoStore
from features.breaker import State
from features.connection import Client
from tests.conftest import (
    FakeClock,
    Service,
    command_calls,
    entity_features,
    structure_commands,
    write_entities,
    write_structures,
)
from tools.delay_proxy import DelayProxy
from tools.emulators import Dynalite
from tools.redis_server import RedisServer

DEADLINE_S = 0.015
MARGIN_S = 0.035  # a busy 2-core VM; still far below the delay
SLOW_S = 0.1  # the reply delay: well past the deadline, far below the 1 s socket timeout
LATE_REPLY_S = 0.3  # long enough for a delayed reply to land, scheduling noise included
GROUPS = {g.qualified_name: g for g in ALL_GROUPS}
USER = {f.name: float(i + 1) for i, f in enumerate(entity_features("user"))}
USER["is_premium"] = 1.0
MERCHANT = {
    "mcc_risk_score": 0.25,
    "chargeback_rate_90d": 0.01,
    "refund_rate_30d": 0.02,
    "merchant_tx_count_24h": 7,
    "avg_ticket_30d": 40.0,
    "days_since_onboarding": 100,
    "is_high_risk_category": 1,
}
CREDENTIALS = ("test", "test")  # dynalite checks that requests are signed, not by whom

MakeStore = Callable[..., FeatureStore]


def tx(user: str, merchant: str) -> dict[str, str]:
    return {"user": user, "merchant": merchant}


def proxied(proxy: DelayProxy) -> Settings:
    # Redis's own timeouts far above the delay: only the deadline may end a read.
    return Settings(redis_url=proxy.url(), redis_socket_timeout_s=1.0, redis_pool_timeout_s=1.0)


def deadline_count(group: str, served: str) -> float:
    labels = {"group": group, "served": served}
    return REGISTRY.get_sample_value("features_deadline_exceeded_total", labels) or 0.0


def breaker_gauge(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("features_breaker_state", {"dependency": dependency})


def state(breaker: CircuitBreaker) -> State:
    return breaker.state  # a call, so mypy does not narrow the property between steps


async def timed_read(store: FeatureStore, rows: list[dict[str, str]]) -> tuple[FeatureRows, float]:
    started = time.perf_counter()
    result = await store.read(rows)
    return result, time.perf_counter() - started


def defaults_at_deadline(name: str) -> GroupRead:
    return GroupRead(Source.DEFAULT, GROUPS[name].field_names, Reason.DEADLINE, False)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    with DelayProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


@pytest.fixture
async def slow_client(proxy: DelayProxy, sync_redis: redis.Redis) -> AsyncIterator[Client]:
    """A client of the same redis-server through the proxy, one connection warmed up."""
    client = open_redis(proxied(proxy))
    await client.ping()  # the handshake's replies would be delayed too
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(proxy: DelayProxy, multiplex: bool) -> AsyncIterator[MakeStore]:
    """FeatureStores with the test's deadline, on either read path (`multiplex`, from
    tests/conftest.py); closed after the late replies have landed."""
    stores: list[FeatureStore] = []

    def make(client: Client, **kwargs: object) -> FeatureStore:
        kwargs.setdefault("deadline_s", DEADLINE_S)
        store = FeatureStore(client, multiplex=multiplex, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    proxy.set_delay(0)
    await asyncio.sleep(LATE_REPLY_S)
    for store in stores:
        await store.aclose()


async def seed(client: Client, users: list[str], merchants: list[str]) -> None:
    writer = FeatureWriter(client)
    await write_entities(writer, "user", [(u, USER) for u in users])
    await write_entities(writer, "merchant", [(m, MERCHANT) for m in merchants])
    await write_structures(client, users, merchants)


async def test_a_slow_reply_is_cut_at_the_deadline(proxy, slow_client, make_store) -> None:
    store = make_store(slow_client)
    before = {name: deadline_count(name, "default") for name in GROUPS}
    proxy.set_delay(SLOW_S)
    rows, elapsed = await timed_read(store, [tx("never-read", "nowhere")])
    assert elapsed <= DEADLINE_S + MARGIN_S < SLOW_S
    assert rows.reads == [{name: defaults_at_deadline(name) for name in GROUPS}]
    defaults = np.concatenate([g.defaults for g in ALL_GROUPS])
    np.testing.assert_array_equal(rows.values[0], defaults)
    for name in GROUPS:
        assert deadline_count(name, "default") == before[name] + 1


async def test_b_the_last_value_is_served_stale_at_the_deadline(
    proxy, client, slow_client, make_store, clock: FakeClock
) -> None:
    await seed(client, ["u1"], ["m1"])
    store = make_store(slow_client, cache_ttl_s=5.0, stale_max_age_s=300.0, timer=clock)
    first = await store.read([tx("u1", "m1")])
    assert {r.source for r in first.reads[0].values()} == {Source.REDIS}

    clock.tick(10)  # past the cache's freshness, within the stale limit
    proxy.set_delay(SLOW_S)
    before = deadline_count(USER_FEATURES.qualified_name, "stale")
    rows, elapsed = await timed_read(store, [tx("u1", "m1")])
    assert elapsed <= DEADLINE_S + MARGIN_S
    np.testing.assert_array_equal(rows.values, first.values)
    stale = GroupRead(Source.CACHE, (), Reason.DEADLINE, True)
    assert rows.reads == [{name: stale for name in GROUPS}]
    assert deadline_count(USER_FEATURES.qualified_name, "stale") == before + 1

    await asyncio.sleep(LATE_REPLY_S)  # the late reply refreshes the entry, at the same time
    clock.tick(301)  # now older than stale_max_age_s
    rows, elapsed = await timed_read(store, [tx("u1", "m1")])
    assert elapsed <= DEADLINE_S + MARGIN_S
    assert rows.reads == [{name: defaults_at_deadline(name) for name in GROUPS}]


async def test_c_a_late_reply_still_fills_the_cache(proxy, client, slow_client, make_store) -> None:
    await seed(client, ["u1"], ["m1"])
    store = make_store(slow_client)
    proxy.set_delay(SLOW_S)
    rows = await store.read([tx("u1", "m1")])
    assert rows.reads[0][USER_FEATURES.qualified_name].reason is Reason.DEADLINE
    await asyncio.sleep(LATE_REPLY_S)
    rows, elapsed = await timed_read(store, [tx("u1", "m1")])  # the delay is still on
    assert elapsed <= DEADLINE_S + MARGIN_S
    assert rows.source is Source.CACHE
    assert {r.source for r in rows.reads[0].values()} == {Source.CACHE}
    assert {r.reason for r in rows.reads[0].values()} == {None}
    user = rows.values[0, : len(USER_FEATURES.features)]
    assert user.tolist() == [USER.get(f.name, float(f.default)) for f in USER_FEATURES.features]


async def test_d_slow_replies_open_the_breaker_and_it_closes_when_fast(
    proxy, client, slow_client, make_store, sync_redis
) -> None:
    breaker = CircuitBreaker(
        name="redis", failure_threshold=5, slow_threshold=5, window=10, reset_s=1.0
    )
    store = make_store(slow_client, breaker=breaker)
    proxy.set_delay(0.03)  # slower than the deadline, far below the socket timeout
    reads = 0
    while state(breaker) is not State.OPEN and reads < 5 + 3:
        await store.read([tx(f"slow{reads}", f"slow{reads}")])
        reads += 1
        await asyncio.sleep(0.08)  # the slow reply lands and is counted
    assert state(breaker) is State.OPEN, f"still {state(breaker).name} after {reads} reads"
    assert breaker_gauge("redis") == State.OPEN

    hmgets = command_calls(sync_redis, "hmget")
    rows, elapsed = await timed_read(store, [tx("open", "open")])
    assert elapsed <= DEADLINE_S + MARGIN_S
    assert {r.reason for r in rows.reads[0].values()} == {Reason.CIRCUIT_OPEN}
    assert command_calls(sync_redis, "hmget") == hmgets  # Redis was not asked

    await seed(client, [f"back{i}" for i in range(60)], ["m1"])
    proxy.set_delay(0)
    deadline = time.monotonic() + 3.0  # reset_s is 1.0: one probe after it, then reads
    read: GroupRead | None = None
    for i in range(60):
        rows = await store.read([tx(f"back{i}", "m1")])
        read = rows.reads[0][USER_FEATURES.qualified_name]
        if read.source is Source.REDIS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert read is not None and read.source is Source.REDIS and read.reason is None, read
    assert state(breaker) is State.CLOSED
    assert breaker_gauge("redis") == State.CLOSED


async def busy_reads(store: FeatureStore, proxy: DelayProxy, n: int) -> None:
    """`n` reads that Redis answers well inside the deadline, each while the worker's loop
    is busy (blocked) for twice the deadline, so each ends past it."""
    proxy.set_delay(DEADLINE_S / 3)
    for i in range(n):
        read = asyncio.ensure_future(store.read([tx(f"busy{i}", f"busy{i}")]))
        await asyncio.sleep(0.002)  # the read is written; its reply is due in 5 ms
        time.sleep(2 * DEADLINE_S)  # another request's CPU work, holding the loop
        await read
        await asyncio.sleep(0.02)


async def test_h_a_busy_worker_is_not_taken_for_a_slow_redis(
    proxy, slow_client, make_store
) -> None:
    def breaker() -> CircuitBreaker:
        return CircuitBreaker(name="redis", failure_threshold=5, slow_threshold=2, window=10)

    # Opened, the store's tiers watch the loop's lateness and subtract it from each read.
    watched = make_store(slow_client, breaker=breaker())
    await watched.open()
    await busy_reads(watched, proxy, 6)
    assert state(watched._tiers[0].breaker) is State.CLOSED

    # The same reads, timed without it (a tier never opened): each is past the deadline.
    blind = make_store(slow_client, breaker=breaker())
    await busy_reads(blind, proxy, 2)
    assert state(blind._tiers[0].breaker) is State.OPEN


@pytest.fixture
def dynamo_proxy(dynalite: Dynalite) -> Iterator[DelayProxy]:
    with DelayProxy("127.0.0.1", dynalite.port) as proxy:
        yield proxy


@pytest.fixture
async def slow_backing(dynamo_proxy: DelayProxy) -> AsyncIterator[DynamoStore]:
    """A fresh dynalite table, reached through its proxy; client and table made undelayed."""
    table = f"deadline-{uuid.uuid4().hex[:12]}"
    url = f"http://127.0.0.1:{dynamo_proxy.port}"
    store = DynamoStore(table, endpoint_url=url, credentials=CREDENTIALS, timeout_s=5.0)
    await store.create_layout()
    yield store
    dynamo_proxy.set_delay(0)
    await store.aclose()


async def test_e_a_slow_backing_store_is_cut_at_the_same_deadline(
    dynamo_proxy, client, sync_redis, slow_backing, make_store
) -> None:
    users = [f"cold{i}" for i in range(10)]
    writer = FeatureWriter(client, slow_backing)
    await write_entities(writer, "user", [(u, USER) for u in users])
    await write_entities(writer, "merchant", [("m1", MERCHANT)])
    sync_redis.flushall()  # in the backing store only: every read must ask it
    backing_breaker = CircuitBreaker(
        name="dynamodb", failure_threshold=3, slow_threshold=3, window=5, reset_s=30.0
    )
    store = make_store(
        client,  # Redis direct and fast: only the backing store is slow
        backing=slow_backing,
        backing_timeout_s=1.0,  # the deadline, not the backing timeout, must end the read
        backing_breaker=backing_breaker,
    )
    dynamo_proxy.set_delay(SLOW_S)
    reads = 0
    while state(backing_breaker) is not State.OPEN and reads < 3 + 3:
        rows, elapsed = await timed_read(store, [tx(users[reads], f"cold-m{reads}")])
        reads += 1
        assert elapsed <= DEADLINE_S + MARGIN_S
        assert rows.reads == [{name: defaults_at_deadline(name) for name in GROUPS}]
        await asyncio.sleep(LATE_REPLY_S)  # the slow answer lands and is counted
    assert state(backing_breaker) is State.OPEN, f"{state(backing_breaker).name} after {reads}"

    skipped = metrics.BACKING_READS.labels("dynamodb", "skipped")
    before = skipped._value.get()
    rows, elapsed = await timed_read(store, [tx(users[-1], "m1")])
    assert elapsed <= DEADLINE_S + MARGIN_S
    assert skipped._value.get() == before + 1  # the open breaker kept the read from it
    assert rows.reads[0][USER_FEATURES.qualified_name].source is Source.DEFAULT


@pytest.mark.parametrize("name", ["FEATURES_DEADLINE_S", "FEATURES_STALE_MAX_AGE_S"])
@pytest.mark.parametrize("raw", ["0", "-1", "-0.5", "nan", "inf", "abc", ""])
def test_f_bad_deadline_settings_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: raw})


def test_f_deadline_settings_defaults_and_parsing() -> None:
    defaults = Settings()
    assert defaults.deadline_s == 0.015
    assert (defaults.breaker_slow_calls, defaults.breaker_window) == (5, 10)
    env = {
        "FEATURES_DEADLINE_S": "0.02",
        "FEATURES_STALE_MAX_AGE_S": "60",
        "FEATURES_BREAKER_SLOW_CALLS": "3",
        "FEATURES_BREAKER_WINDOW": "8",
    }
    parsed = Settings.from_env(env)
    assert (parsed.deadline_s, parsed.stale_max_age_s) == (0.02, 60.0)
    assert (parsed.breaker_slow_calls, parsed.breaker_window) == (3, 8)


@pytest.mark.e2e
def test_f_serve_exits_on_a_bad_deadline(bentoml_home: Path, redis_url: str) -> None:
    svc = Service(bentoml_home, redis_url, FEATURES_DEADLINE_S="-1")
    with pytest.raises(RuntimeError, match="bentoml serve exited") as info:
        svc.start(timeout_s=60)
    svc.stop()
    assert "FEATURES_DEADLINE_S" in str(info.value)


def post_predict(url: str, user: str, merchant: str) -> tuple[httpx.Response, float]:
    body = {"user_id": user, "merchant_id": merchant, "amount": 10.0}
    started = time.perf_counter()
    response = httpx.post(f"{url}/predict", json=body, timeout=10)
    return response, time.perf_counter() - started


@pytest.mark.e2e
def test_g_serve_answers_at_the_deadline_through_a_slow_network(
    bentoml_home: Path, proxy: DelayProxy, sync_redis: redis.Redis
) -> None:
    users = [f"g{i}" for i in range(40)]
    for group in HASH_GROUPS:
        values = {k: v for k, v in {**USER, **MERCHANT}.items() if k in group.field_names}
        for entity_id in users if group.entity == "user" else ["gm"]:
            sync_redis.hset(group.key(entity_id), mapping=values)  # type: ignore[arg-type]
            sync_redis.expire(group.key(entity_id), group.ttl_s)
    for command in structure_commands(users, ["gm"]):
        sync_redis.execute_command(*command)  # type: ignore[no-untyped-call]
    svc = Service(
        bentoml_home,
        proxy.url(),
        FEATURES_REDIS_SOCKET_TIMEOUT_S="1",
        FEATURES_REDIS_POOL_TIMEOUT_S="1",
        FEATURES_DEADLINE_S=str(DEADLINE_S),
    ).start()
    try:
        response, _ = post_predict(svc.url, "warm", "warm")  # first request: lazy set-up
        assert response.status_code == 200, response.text
        delay_s = 0.3  # the client's own overhead on a busy VM must not reach it
        proxy.set_delay(delay_s)
        response, elapsed = post_predict(svc.url, "g0", "gm")
        assert response.status_code == 200, response.text
        assert elapsed < delay_s / 2
        body = response.json()
        assert body["timings"]["features_ms"] <= (DEADLINE_S + MARGIN_S) * 1e3
        for name in GROUPS:
            assert body["sources"][name]["reason"] == "deadline", body["sources"]
            assert body["sources"][name]["source"] == "default"

        proxy.set_delay(0)
        deadline = time.monotonic() + 5.0  # the breaker may have opened: reset_s is 1 s
        for i in range(1, 40):
            response, _ = post_predict(svc.url, f"g{i}", "gm")
            sources = response.json()["sources"]
            back = all(
                s["source"] in ("redis", "cache") and s["reason"] is None for s in sources.values()
            )
            if back or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert back, sources
    finally:
        svc.stop()
