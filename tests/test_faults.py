"""Real Redis faults against FeatureStore: kill, SIGSTOP, CLIENT PAUSE, DEBUG SLEEP,
a full server, an exhausted pool, garbage. Each read must return (never raise) within
a bound, serve cached values or counted defaults, and recover within seconds.

Each test runs on both read paths (the `multiplex` fixture of tests/conftest.py): over
redis-py's pool ("pool") and over the multiplexed connection the service reads through
("multiplex", FeatureStore(multiplex=True), as open_store builds it)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from features import (
    MERCHANT_RISK,
    USER_FEATURES,
    CircuitBreaker,
    FeatureRows,
    FeatureStore,
    FeatureWriteError,
    FeatureWriter,
    Reason,
    Settings,
    Source,
    metrics,
    open_redis,
)
from features.breaker import State
from features.connection import Client
from tools.redis_server import RedisServer

USER = {"tx_count_1h": 3, "tx_sum_1h": 120.5, "tx_sum_24h": 40.0}
FAILED = {Reason.UNAVAILABLE, Reason.CIRCUIT_OPEN}
# Generous bounds for a busy 2-core VM; the figures themselves are in the load scenario.
SLOW_READ_S = 0.5  # a read that waits for a timeout (socket timeout 0.1 s)
FAST_READ_S = 0.005  # typical read that does not touch the network (median)


def only_on(path: str, reason: str) -> pytest.MarkDecorator:
    """Run a test on one read path ("pool" or "multiplex"); the other is skipped, saying why."""
    skip = pytest.mark.skip(reason=reason)
    return pytest.mark.parametrize(
        "multiplex",
        [
            pytest.param(False, id="pool", marks=() if path == "pool" else skip),
            pytest.param(True, id="multiplex", marks=() if path == "multiplex" else skip),
        ],
    )


@dataclass
class Rig:
    server: RedisServer
    admin: redis.Redis
    client: Client
    store: FeatureStore
    breaker: CircuitBreaker

    async def read(self, user: str, merchant: str = "m1") -> tuple[FeatureRows, float]:
        started = time.perf_counter()
        rows = await self.store.read([{"user": user, "merchant": merchant}])
        return rows, time.perf_counter() - started

    async def recover(self, timeout_s: float = 5.0) -> float:
        """Seconds until a fresh key is read from Redis again."""
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < timeout_s:
            n += 1
            rows, _ = await self.read(f"fresh{n}-{time.monotonic_ns()}")
            if rows.reads[0]["user:features"].reason not in FAILED:
                return time.perf_counter() - started
            await asyncio.sleep(0.02)
        raise AssertionError(f"no recovery within {timeout_s} s")


def breaker_state(rig: Rig) -> State:
    return rig.breaker.state


def reason(rows: FeatureRows) -> Reason | None:
    return rows.reads[0]["user:features"].reason


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(quiet=True) as srv:
        yield srv


@pytest.fixture
async def rig(server: RedisServer, multiplex: bool) -> AsyncIterator[Rig]:
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
    store = FeatureStore(client, cache_ttl_s=30.0, breaker=breaker, multiplex=multiplex)
    await FeatureWriter(client).write(USER_FEATURES, [(f"u{i}", USER) for i in range(20)])
    yield Rig(server, admin, client, store, breaker)
    await store.aclose()
    await client.aclose()
    admin.close()


async def outage_reads(rig: Rig, seconds: float) -> list[tuple[FeatureRows, float]]:
    """Reads of a cached user and of uncached ones for `seconds`, while the fault lasts."""
    results = []
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        n += 1
        cached = await rig.read("u0")
        assert cached[0].reads[0]["user:features"].source is Source.CACHE
        results.append(await rig.read(f"u{1 + n % 19}", merchant=f"x{n}"))
        await asyncio.sleep(0.005)
    return results


def check_outage(results: list[tuple[FeatureRows, float]]) -> None:
    assert results
    for rows, elapsed in results:
        assert elapsed < SLOW_READ_S
        assert reason(rows) in FAILED
        assert rows.source is Source.DEFAULT
    # Once open, the breaker answers without the network: most reads are fast.
    short_circuited = [e for rows, e in results if reason(rows) is Reason.CIRCUIT_OPEN]
    assert len(short_circuited) > len(results) / 2
    assert float(np.median(short_circuited)) < FAST_READ_S


@pytest.mark.parametrize("with_data", [False, True], ids=["restart-empty", "restart-with-data"])
async def test_redis_killed_then_restarted(rig: Rig, with_data: bool) -> None:
    await rig.read("u0")  # cached before the fault
    if with_data:
        rig.admin.save()
    opened = metrics.DEFAULTS.labels("user:features", "circuit_open")
    before = opened._value.get()
    rig.server.kill()
    check_outage(await outage_reads(rig, 0.6))
    rig.store.flush_health()  # the counts are written once a second
    assert opened._value.get() > before
    assert breaker_state(rig) is not State.CLOSED
    rig.server.start()
    assert await rig.recover() < 3.0
    rows, _ = await rig.read("u7", merchant="after")
    assert rows.reads[0]["user:features"].source is (Source.REDIS if with_data else Source.DEFAULT)
    assert reason(rows) is (Reason.INVALID if with_data else Reason.MISSING)
    assert breaker_state(rig) is State.CLOSED


async def test_half_open_probe_runs_off_the_request_path(rig: Rig) -> None:
    rig.server.kill()
    for i in range(3):
        await rig.read(f"u{i + 1}")
    assert breaker_state(rig) is State.OPEN
    rig.server.start()
    await asyncio.sleep(0.25)  # the open window (0.2 s) is over
    rows, elapsed = await rig.read("u5")
    # This read started the probe but did not wait for it.
    assert reason(rows) is Reason.CIRCUIT_OPEN and elapsed < SLOW_READ_S
    for _ in range(100):
        if breaker_state(rig) is State.CLOSED:
            break
        await asyncio.sleep(0.01)
    assert breaker_state(rig) is State.CLOSED
    assert rig.admin.info("commandstats")["cmdstat_ping"]["calls"] >= 1  # the probe
    rows, _ = await rig.read("u5")
    assert rows.reads[0]["user:features"].source is Source.DEFAULT  # empty after restart
    assert reason(rows) is Reason.MISSING


async def test_redis_hung_by_sigstop_then_sigcont(rig: Rig) -> None:
    await rig.read("u0")
    timeouts = metrics.REDIS_ERRORS.labels("timeout")
    before = timeouts._value.get()
    rig.server.kill(signal.SIGSTOP)
    try:
        results = await outage_reads(rig, 0.8)
    finally:
        rig.server.kill(signal.SIGCONT)
    check_outage(results)
    assert timeouts._value.get() >= before + 3  # the breaker opened on timeouts
    assert await rig.recover() < 3.0


@pytest.mark.parametrize("how", ["client-pause", "debug-sleep"])
async def test_redis_slower_than_the_timeout(rig: Rig, how: str) -> None:
    await rig.read("u0")
    if how == "client-pause":
        rig.admin.execute_command("CLIENT", "PAUSE", 800, "ALL")  # type: ignore[no-untyped-call]
        blocker = None
    else:
        blocker = threading.Thread(target=rig.admin.execute_command, args=("DEBUG", "SLEEP", 0.8))
        blocker.start()
        await asyncio.sleep(0.05)
    results = await outage_reads(rig, 0.6)
    check_outage(results)
    if blocker is not None:
        blocker.join()
    assert await rig.recover() < 3.0


@only_on("pool", "the multiplexed path takes no pooled connection: see the next test")
async def test_pool_exhausted_waits_briefly_then_serves_defaults(rig: Rig) -> None:
    assert isinstance(rig.client, aioredis.Redis)
    pool = rig.client.connection_pool
    held = [await pool.get_connection() for _ in range(4)]  # type: ignore[no-untyped-call]
    exhausted = metrics.REDIS_ERRORS.labels("pool_exhausted")
    before = exhausted._value.get()
    try:
        for i in range(6):
            rows, elapsed = await rig.read(f"u{i + 1}")
            assert reason(rows) is Reason.UNAVAILABLE
            assert elapsed < SLOW_READ_S  # the pool timeout is 0.02 s
        assert exhausted._value.get() == before + 6
        # Our own backlog, not a Redis failure: the breaker stays closed.
        assert breaker_state(rig) is State.CLOSED
    finally:
        for connection in held:
            await pool.release(connection)
    rows, _ = await rig.read("u1")
    assert rows.reads[0]["user:features"].source is Source.REDIS


@only_on("multiplex", "the pool path needs a pooled connection: see the test above")
async def test_reads_need_no_pooled_connection(rig: Rig) -> None:
    """What replaces the exhausted-pool test on the multiplexed path: with every pooled
    connection taken, reads still go to Redis, and the breaker stays closed."""
    assert isinstance(rig.client, aioredis.Redis)
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


async def test_more_concurrent_reads_than_connections(rig: Rig) -> None:
    # Paused longer than the reads may take: none can be answered by Redis, however slowly
    # a busy runner schedules the pool's waits.
    rig.admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    results = await asyncio.gather(*(rig.read(f"u{i}", merchant=f"c{i}") for i in range(40)))
    assert time.perf_counter() - started < 1.0
    assert all(reason(rows) in FAILED for rows, _ in results)
    clients = rig.admin.info("clients")["connected_clients"]
    assert clients <= 4 + 1  # the pool's bound, plus the admin connection
    assert await rig.recover() < 3.0


async def test_full_redis_writer_loses_nothing_and_readers_keep_serving(rig: Rig) -> None:
    rig.admin.flushall()
    used = int(rig.admin.info("memory")["used_memory"])
    rig.admin.config_set("maxmemory", used + 300_000)
    rig.admin.config_set("maxmemory-policy", "noeviction")
    writer = FeatureWriter(rig.client)
    written: list[str] = []
    refused: list[str] = []
    try:
        for batch in range(200):
            ids = [f"w{batch}-{i}" for i in range(100)]
            try:
                await writer.write(USER_FEATURES, [(e, USER) for e in ids])
            except FeatureWriteError as exc:
                # Each row is whole or absent: the error names exactly the refused ones.
                refused = list(exc.failed)
                assert "maxmemory" in str(exc)
                assert f"{len(refused)} user:features rows not written" in str(exc)
                written += [e for e in ids if e not in set(refused)]
                break
            written += ids
        assert written and refused, "the server never filled up"
        # Readers keep serving while the server refuses writes.
        rows = await rig.store.read([{"user": e, "merchant": "m1"} for e in written[-50:]])
        assert all(r["user:features"].source is Source.REDIS for r in rows.reads)
    finally:
        rig.admin.config_set("maxmemory", 0)
    # Every row the writer reported is there, and nothing of the refused batch is.
    pipe = rig.admin.pipeline(transaction=False)
    for e in written:
        pipe.hget(USER_FEATURES.key(e), "tx_sum_1h")
    assert pipe.execute() == [b"120.5"] * len(written)
    assert rig.admin.exists(*(USER_FEATURES.key(e) for e in refused)) == 0


@pytest.mark.parametrize("kind", ["list", "set", "zset", "string"])
async def test_keys_of_the_wrong_type_serve_defaults(rig: Rig, kind: str) -> None:
    key = MERCHANT_RISK.key("g1")
    {
        "list": lambda: rig.admin.rpush(key, "a"),
        "set": lambda: rig.admin.sadd(key, "a"),
        "zset": lambda: rig.admin.zadd(key, {"a": 1.0}),
        "string": lambda: rig.admin.set(key, "x" * 1000),
    }[kind]()  # type: ignore[no-untyped-call]
    rows, _ = await rig.read("u1", merchant="g1")
    read = rows.reads[0]["merchant:risk"]
    assert (read.source, read.reason) == (Source.DEFAULT, Reason.INVALID)
    assert rows.reads[0]["user:features"].source is Source.REDIS  # the rest of the row is fine


async def test_huge_and_unknown_fields_are_handled(rig: Rig) -> None:
    key = USER_FEATURES.key("big")
    rig.admin.hset(key, mapping={"tx_count_1h": "1" * 8_000_000, "not_a_feature": "x" * 1000})
    rig.admin.hset(key, "tx_sum_24h", "12.5")
    corrupt = metrics.CORRUPT_VALUES.labels("user:features", "tx_count_1h")
    before = corrupt._value.get()
    rows, elapsed = await rig.read("big")
    read = rows.reads[0]["user:features"]
    assert read.reason is Reason.INVALID and "tx_count_1h" in read.defaulted
    assert "tx_sum_24h" not in read.defaulted
    assert corrupt._value.get() == before + 1
    assert elapsed < 2.0  # 8 MB through a 0.1 s socket timeout on loopback
