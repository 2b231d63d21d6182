"""The backing-store tier against real servers: dynalite (DynamoDB API) and cbtemulator."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from features import (
    GROUPS,
    MERCHANT_RISK,
    MERCHANT_VELOCITY,
    USER_FEATURES,
    BackingStore,
    CircuitBreaker,
    FeatureGroup,
    FeatureStore,
    FeatureWriteError,
    FeatureWriter,
    Reason,
    Settings,
    Source,
    metrics,
    open_redis,
)
from features.backing.base import VERSION_LIFETIME_S
from features.backing.bigtable import BigtableStore
from features.backing.dynamo import DynamoStore
from features.connection import Client
from features.offline.warm import warm
from tests.conftest import FakeClock, Service
from tools.emulators import BigtableEmulator, Dynalite
from tools.redis_server import RedisServer, free_port

USER = {f.name: float(i + 1) for i, f in enumerate(USER_FEATURES.features)}
MERCHANT = {"mcc_risk_score": 0.25, "chargeback_rate_90d": 0.01}
PERSISTED = {g.qualified_name: g.persisted for g in GROUPS}
CREDENTIALS = ("test", "test")  # dynalite checks that requests are signed, not by whom
SLOW_OK_S = 2.0  # the emulators' latency on a busy 2-core VM: not the production deadline
# Event times of the tests that read them back: an hour ago, whole seconds. Not a fixed
# date: the Bigtable emulator applies each family's max-age rule (7 days) about once a
# second, and took a years-old cell away between two writes of a test on CI.
T0 = float(int(time.time()) - 3600)


def dynamo_store(url: str, **kwargs: float) -> DynamoStore:
    table = f"features-{uuid.uuid4().hex[:12]}"
    return DynamoStore(table, endpoint_url=url, credentials=CREDENTIALS, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["dynamodb", "bigtable"])
def emulator(request: pytest.FixtureRequest) -> Dynalite | BigtableEmulator:
    name = "dynalite" if request.param == "dynamodb" else "bigtable_emulator"
    server: Dynalite | BigtableEmulator = request.getfixturevalue(name)
    return server


@pytest.fixture
async def backing(emulator: Dynalite | BigtableEmulator) -> AsyncIterator[BackingStore]:
    """A fresh table in the session's emulator, with short store-side timeouts."""
    store: BackingStore
    if isinstance(emulator, Dynalite):
        store = dynamo_store(emulator.url, timeout_s=0.5)
    else:
        store = BigtableStore("test", "inst", f"t{uuid.uuid4().hex[:12]}", timeout_s=0.5)
    await store.create_layout()
    yield store
    emulator.resume()  # in case a test paused it
    await store.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server that a test may restart empty."""
    with RedisServer(quiet=True) as server:
        yield server


def restart_empty(server: RedisServer) -> None:
    server.stop()
    server.start()


def settings_for(url: str) -> Settings:
    return Settings(redis_url=url, redis_socket_timeout_s=1.0, redis_pool_timeout_s=1.0)


WRITTEN = (USER_FEATURES, MERCHANT_RISK)
"""The groups these tests write: their stores read those."""
COLUMN = {f.name: i for i, f in enumerate(f for g in WRITTEN for f in g.features)}


def store_with(
    client: Client,
    backing: BackingStore,
    timeout_s: float = SLOW_OK_S,
    breaker: CircuitBreaker | None = None,
    groups: Sequence[FeatureGroup] = WRITTEN,
) -> FeatureStore:
    return FeatureStore(
        client,
        groups=groups,
        backing=backing,
        backing_timeout_s=timeout_s,
        backing_breaker=breaker,
    )


def tx(user: str, merchant: str) -> dict[str, str]:
    return {"user": user, "merchant": merchant}


async def test_write_through_then_read_back(backing, client, sync_redis) -> None:
    writer = FeatureWriter(client, backing)
    await writer.write(USER_FEATURES, [("u1", USER), ("u2", USER)], event_ts=T0)
    # Two partial writes of one group: the second keeps what the first set.
    await writer.write(MERCHANT_RISK, [("m1", {"mcc_risk_score": 0.5})], event_ts=T0)
    await writer.write(MERCHANT_RISK, [("m1", MERCHANT)], event_ts=T0 + 5)
    records = await backing.read(
        [(USER_FEATURES, "u1"), (MERCHANT_RISK, "m1"), (USER_FEATURES, "nobody")]
    )
    user, merchant, nobody = records
    assert nobody is None
    assert user is not None and merchant is not None
    assert [float(v) for v in user.fields if v is not None] == list(USER.values())
    assert user.event_ts == T0
    by_name = dict(zip(MERCHANT_RISK.field_names, merchant.fields, strict=True))
    assert float(by_name["mcc_risk_score"] or b"nan") == 0.25
    assert float(by_name["chargeback_rate_90d"] or b"nan") == 0.01
    assert by_name["avg_ticket_30d"] is None
    assert merchant.event_ts == T0 + 5
    assert float(sync_redis.hget("user:{u1}:features", "_ts")) == T0


async def test_a_versioned_write_never_puts_older_values_back(backing, client) -> None:
    # Two consumers raced on m1 and u1: the newer values landed first, then the older.
    writer = FeatureWriter(client, backing)
    velocity = MERCHANT_VELOCITY

    async def write(group: FeatureGroup, values: dict[str, float], ts: float, v: int) -> int:
        before = writer.backing_skipped
        await writer.write(group, [("e1", values)], event_ts=ts, versions=[v])
        return writer.backing_skipped - before

    async def stored(group: FeatureGroup) -> tuple[tuple[bytes | None, ...], float | None]:
        (record,) = await backing.read([(group, "e1")])
        assert record is not None
        return record.fields, record.event_ts

    newer = {f: float(i + 10) for i, f in enumerate(USER_FEATURES.field_names)}
    older = {f: float(i) for i, f in enumerate(USER_FEATURES.field_names)}
    assert await write(USER_FEATURES, newer, T0 + 5, 300) == 0
    assert await write(USER_FEATURES, older, T0, 299) == 1  # skipped, no error
    assert await write(USER_FEATURES, older, T0 + 5, 300) == 1  # equal: skipped too
    fields, ts = await stored(USER_FEATURES)
    assert [float(f or b"nan") for f in fields] == list(newer.values()) and ts == T0 + 5
    # 256 > 255 in any byte order: versions are compared as numbers.
    assert await write(velocity, {"merchant_tx_count_24h": 1}, T0, 255) == 0
    assert await write(velocity, {"merchant_tx_count_24h": 2}, T0, 256) == 0
    assert await write(velocity, {"merchant_tx_count_24h": 1}, T0, 255) == 1
    assert (await stored(velocity))[0] == (b"2",)
    # The stream's counter expired (31 quiet days) and began again at 1: the stored
    # version is older than VERSION_LIFETIME_S, so the write goes through.
    later = T0 + VERSION_LIFETIME_S + 1
    assert await write(velocity, {"merchant_tx_count_24h": 3}, later, 1) == 0
    assert await stored(velocity) == ((b"3",), later)
    # Unversioned writes (bulk loads) are taken as before.
    await writer.write(velocity, [("e1", {"merchant_tx_count_24h": 4})], event_ts=later + 1)
    assert await stored(velocity) == ((b"4",), later + 1)


async def test_cold_start_is_served_from_backing_then_repaired(backing, own_redis) -> None:
    settings = settings_for(own_redis.url)
    users = [f"u{i}" for i in range(150)]  # DynamoDB: more than one BatchGetItem
    merchants = [f"m{i}" for i in range(5)]
    client = open_redis(settings)
    try:
        writer = FeatureWriter(client, backing)
        await writer.write(USER_FEATURES, [(u, USER) for u in users])
        await writer.write(MERCHANT_RISK, [(m, MERCHANT) for m in merchants])
    finally:
        await client.aclose()
    restart_empty(own_redis)

    client = open_redis(settings)
    check = redis.Redis.from_url(own_redis.url)
    try:
        assert check.dbsize() == 0
        store = store_with(client, backing)
        rows = await store.read([tx(u, merchants[i % 5]) for i, u in enumerate(users)])
        assert rows.source is Source.BACKING
        for reads in rows.reads:
            assert {r.source for r in reads.values()} == {Source.BACKING}
            assert all(r.reason is None or r.reason is Reason.INVALID for r in reads.values())
        assert rows.values[0, COLUMN["tx_sum_24h"]] == USER["tx_sum_24h"]
        assert rows.values[3, COLUMN["mcc_risk_score"]] == pytest.approx(0.25)
        await store.wait_repairs()
        assert check.dbsize() == 155
        assert USER_FEATURES.ttl_s - 5 <= check.ttl("user:{u7}:features") <= USER_FEATURES.ttl_s
        assert check.hget("user:{u7}:features", "tx_count_1h") == b"1"
        # A new worker (empty cache) now reads Redis.
        again = await store_with(client, backing).read([tx("u7", "m2")])
        assert {r.source for r in again.reads[0].values()} == {Source.REDIS}
        np.testing.assert_array_equal(again.values[0], rows.values[7])
    finally:
        check.close()
        await client.aclose()


async def test_repair_never_overwrites_a_newer_write(backing, client, sync_redis) -> None:
    writer = FeatureWriter(client, backing)
    await writer.write(USER_FEATURES, [("u1", USER)])
    sync_redis.flushall()
    store = store_with(client, backing)
    rows = await store.read([tx("u1", "m1")])
    assert rows.reads[0]["user:features"].source is Source.BACKING
    # A writer lands before the repair runs: the repair must leave its values alone.
    await writer.write(USER_FEATURES, [("u1", {"tx_count_1h": 42})])
    await store.wait_repairs()
    assert sync_redis.hget("user:{u1}:features", "tx_count_1h") == b"42"


async def test_warm_refills_redis_completely_and_idempotently(backing, own_redis) -> None:
    client = open_redis(settings_for(own_redis.url))
    try:
        writer = FeatureWriter(client, backing)
        await writer.write(USER_FEATURES, [(f"u{i}", USER) for i in range(120)])
        await writer.write(MERCHANT_RISK, [(f"m{i}", MERCHANT) for i in range(30)])
    finally:
        await client.aclose()
    restart_empty(own_redis)
    client = open_redis(settings_for(own_redis.url))
    try:
        report = await warm(backing, client, batch_size=40, concurrency=3)
        assert report.scanned == {"user:features": 120, "merchant:risk": 30}
        assert report.counts.written == 150
        assert await client.dbsize() == report.total == 150
        assert 0 < await client.ttl("merchant:{m29}:risk") <= MERCHANT_RISK.ttl_s
        again = await warm(backing, client, batch_size=40, concurrency=3)
        assert (again.counts.written, again.counts.present) == (0, 150)
    finally:
        await client.aclose()


def test_warm_command_reports_counts(dynalite, own_redis, monkeypatch, capsys) -> None:
    from features.offline.warm import main

    store = dynamo_store(dynalite.url)
    settings = settings_for(own_redis.url)

    async def arrange() -> None:
        await store.create_layout()
        client = open_redis(settings)
        await FeatureWriter(client, store).write(USER_FEATURES, [("u1", USER), ("u2", USER)])
        await client.flushall()
        await client.aclose()
        await store.aclose()

    asyncio.run(arrange())
    dynamo_env(monkeypatch, store.table, dynalite.url)
    assert main(["--redis-url", own_redis.url, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "user:features: 2 records in dynamodb" in out
    assert "2 records read" in out and "2 written to Redis" in out
    assert redis.Redis.from_url(own_redis.url).dbsize() == 2


async def test_warm_raises_when_redis_cannot_take_a_batch(dynalite) -> None:
    store = dynamo_store(dynalite.url)
    down = open_redis(settings_for(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        await store.create_layout()
        rows = [(f"u{i}", {"tx_count_1h": "1"}) for i in range(30)]
        await store.write(USER_FEATURES, rows, time.time())
        with pytest.raises(FeatureWriteError, match="records not written to Redis: Connection"):
            await warm(store, down, batch_size=10, concurrency=2)
    finally:
        await down.aclose()
        await store.aclose()


def test_warm_command_fails_when_redis_refuses_records(
    dynalite, own_redis, monkeypatch, capsys
) -> None:
    from features.offline.warm import main

    store = dynamo_store(dynalite.url)

    async def arrange() -> None:
        await store.create_layout()
        rows = [("u1", {"tx_count_1h": "1"}), ("u2", {"tx_count_1h": "2"})]
        await store.write(USER_FEATURES, rows, time.time())
        await store.aclose()

    asyncio.run(arrange())
    dynamo_env(monkeypatch, store.table, dynalite.url)
    full = redis.Redis.from_url(own_redis.url)
    full.config_set("maxmemory", 1)
    full.config_set("maxmemory-policy", "noeviction")
    assert main(["--redis-url", own_redis.url, "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "0 written to Redis" in captured.out and "2 refused by Redis" in captured.out
    assert "warm incomplete: 2 of 2 records not written to Redis" in captured.err
    assert "OOM" in captured.err
    assert full.dbsize() == 0


def dynamo_env(monkeypatch: pytest.MonkeyPatch, table: str, url: str) -> None:
    env = {
        "FEATURES_BACKING_STORE": "dynamodb",
        "FEATURES_DYNAMODB_TABLE": table,
        "FEATURES_DYNAMODB_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_loader_writes_through_in_batches(dynalite, own_redis, monkeypatch) -> None:
    from features.offline.load import main

    table = f"load-{uuid.uuid4().hex[:12]}"
    dynamo_env(monkeypatch, table, dynalite.url)
    demo = ["--demo", "--users", "2100", "--merchants", "20", "--create"]  # 2 user batches
    assert main([*demo, "--redis-url", own_redis.url]) == 0
    # Per user its hashes (persisted) and merchants paid (not); per merchant its hashes and
    # embedding (all persisted).
    user_items = sum(g.entity == "user" and g.persisted for g in GROUPS)
    merchant_items = sum(g.entity == "merchant" and g.persisted for g in GROUPS)
    assert redis.Redis.from_url(own_redis.url).dbsize() == 2100 * (user_items + 1) + 20 * (
        merchant_items
    )

    async def count() -> int:
        store = dynamo_store(dynalite.url)
        store.table = table
        try:
            return sum([len(batch) async for batch in store.scan(1000)])
        finally:
            await store.aclose()

    assert asyncio.run(count()) == 2100 * user_items + 20 * merchant_items


def test_warm_command_fails_cleanly_when_the_store_is_down(own_redis, monkeypatch, capsys) -> None:
    from features.offline.warm import main

    dynamo_env(monkeypatch, "t-down", f"http://127.0.0.1:{free_port()}")
    assert main(["--redis-url", own_redis.url, "--quiet"]) == 1
    assert "warm failed: BackingStoreError" in capsys.readouterr().err


async def test_slow_backing_opens_its_breaker_and_defaults_come_in_time(
    backing, emulator, client
) -> None:
    store = store_with(
        client,
        backing,
        timeout_s=0.05,
        breaker=CircuitBreaker(name=backing.name, failure_threshold=2, reset_s=60.0),
        groups=GROUPS,
    )
    await store.read([tx("warmup", "warmup")])  # connections open before the fault
    skipped = metrics.BACKING_READS.labels(backing.name, "skipped")
    before = skipped._value.get()
    emulator.pause()
    try:
        for i in range(2):
            started = time.perf_counter()
            rows = await store.read([tx(f"slow{i}", "m1")])
            assert time.perf_counter() - started < 0.5  # the 50 ms deadline, plus slack
            for name, read in rows.reads[0].items():
                # The sorted sets are not persisted: Redis's answer (no such key) stands.
                reason = Reason.UNAVAILABLE if PERSISTED[name] else Reason.MISSING
                assert (read.source, read.reason) == (Source.DEFAULT, reason), name
        started = time.perf_counter()
        rows = await store.read([tx("slow9", "m9")])  # breaker open: no backing call
        assert time.perf_counter() - started < 0.5
        assert rows.source is Source.DEFAULT
        assert skipped._value.get() == before + 1  # the proof that it was not asked
    finally:
        emulator.resume()


async def test_backing_down_gives_defaults(client) -> None:
    down = DynamoStore(
        "t-down", endpoint_url=f"http://127.0.0.1:{free_port()}", credentials=CREDENTIALS
    )
    store = store_with(client, down, timeout_s=0.5)
    errors = metrics.BACKING_READS.labels("dynamodb", "error")
    before = errors._value.get()
    try:
        await down.open()  # the client itself (~130 ms), as after a worker's first read
        started = time.perf_counter()
        rows = await store.read([tx("u1", "m1")])
        assert time.perf_counter() - started < 0.5
        assert rows.reads[0]["user:features"].reason is Reason.UNAVAILABLE
        assert errors._value.get() == before + 1
    finally:
        await down.aclose()


async def test_failed_backing_write_is_reported_and_not_half_applied(
    backing, emulator, client, sync_redis
) -> None:
    writer = FeatureWriter(client, backing)
    await writer.write(USER_FEATURES, [("u0", USER)])  # connections open before the fault
    sync_redis.flushall()
    emulator.pause()
    try:
        with pytest.raises(FeatureWriteError, match=r"backing store .*Redis untouched"):
            await writer.write(USER_FEATURES, [("u1", USER), ("u2", USER)])
    finally:
        emulator.resume()
    assert sync_redis.dbsize() == 0


async def test_stale_values_are_reported_from_redis_and_backing(
    backing, client, sync_redis
) -> None:
    old = time.time() - USER_FEATURES.freshness_s - 60
    writer = FeatureWriter(client, backing)
    await writer.write(USER_FEATURES, [("u1", USER)], event_ts=old)
    await writer.write(MERCHANT_RISK, [("m1", MERCHANT)])
    stale = metrics.STALE.labels("user:features", "redis")
    before = stale._value.get()
    reader = store_with(client, backing)
    rows = await reader.read([tx("u1", "m1")])
    user, merchant = rows.reads[0]["user:features"], rows.reads[0]["merchant:risk"]
    assert (user.source, user.stale) == (Source.REDIS, True)
    assert not merchant.stale
    reader.flush_health()  # the counts are written once a second
    assert stale._value.get() == before + 1
    sync_redis.flushall()
    store = store_with(client, backing)
    rows = await store.read([tx("u1", "m1")])
    user = rows.reads[0]["user:features"]
    assert (user.source, user.stale) == (Source.BACKING, True)
    await store.wait_repairs()
    # Repaired with the TTL left from its event time, not a fresh one.
    assert 0 < sync_redis.ttl("user:{u1}:features") <= USER_FEATURES.freshness_s - 60 + 1


def test_backing_breaker_lets_one_read_probe_per_window() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(name="dynamodb", failure_threshold=3, reset_s=10.0, timer=clock)
    for _ in range(3):
        breaker.failure()
    assert not breaker.allow() and not breaker.claim_probe()
    clock.tick(10)
    assert breaker.claim_probe()  # one read may go out
    assert not breaker.claim_probe()  # and only one
    breaker.failure()  # the probe failed: open for another window
    clock.tick(9.9)
    assert not breaker.claim_probe()
    clock.tick(0.1)
    assert breaker.claim_probe()
    breaker.success()
    assert breaker.allow()


def test_settings_select_the_store() -> None:
    assert Settings().backing_store == "none"
    settings = Settings.from_env({"FEATURES_BACKING_STORE": "bigtable"})
    assert settings.backing_store == "bigtable"
    with pytest.raises(ValueError, match="FEATURES_BACKING_STORE"):
        Settings.from_env({"FEATURES_BACKING_STORE": "cassandra"})


@pytest.mark.e2e
def test_service_survives_a_redis_restart_on_the_backing_store(
    bentoml_home: Path, dynalite: Dynalite, own_redis: RedisServer
) -> None:
    store = dynamo_store(dynalite.url)

    async def arrange() -> None:
        await store.create_layout()
        client = open_redis(settings_for(own_redis.url))
        writer = FeatureWriter(client, store)
        await writer.write(USER_FEATURES, [(f"u{i}", USER) for i in range(20)])
        await writer.write(MERCHANT_RISK, [(f"m{i}", MERCHANT) for i in range(20)])
        await client.aclose()
        await store.aclose()

    asyncio.run(arrange())
    service = Service(
        bentoml_home,
        own_redis.url,
        FEATURES_BACKING_STORE="dynamodb",
        FEATURES_DYNAMODB_TABLE=store.table,
        FEATURES_DYNAMODB_ENDPOINT_URL=dynalite.url,
        FEATURES_BACKING_TIMEOUT_S=str(SLOW_OK_S),
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
    ).start()
    check = redis.Redis.from_url(own_redis.url)
    try:
        body = {"user_id": "u0", "merchant_id": "m0", "amount": 10.0}
        first = httpx.post(f"{service.url}/predict", json=body, timeout=10)
        assert first.status_code == 200, first.text
        assert first.json()["sources"]["user:features"]["source"] == "redis"
        restart_empty(own_redis)
        for i in range(1, 20):
            body = {"user_id": f"u{i}", "merchant_id": f"m{i}", "amount": 10.0}
            r = httpx.post(f"{service.url}/predict", json=body, timeout=10)
            assert r.status_code == 200, r.text
            sources = r.json()["sources"]
            written = {sources[g.qualified_name]["source"] for g in WRITTEN}
            assert written == {"backing"}, sources
            assert not sources["user:features"]["stale"]
        # Read repair runs in the background: Redis fills up under traffic. The first
        # request after the restart may have met a dead connection (no repair for it).
        deadline = time.monotonic() + 10
        while check.dbsize() < 36 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check.dbsize() >= 36
        metrics_text = httpx.get(f"{service.url}/metrics", timeout=10).text
        assert 'features_backing_reads_total{result="ok",store="dynamodb"}' in metrics_text
    finally:
        check.close()
        service.stop()


class ThrottlingDynamo:
    """Throttling is a fault dynalite never shows: a fake BatchGetItem that serves one key,
    then leaves every key unprocessed until `throttled` calls have passed."""

    def __init__(self, throttled: int) -> None:
        self.throttled = throttled
        self.calls = 0

    async def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        ((table, request),) = RequestItems.items()
        keys = request["Keys"]
        if self.calls <= self.throttled:
            n = 1 if self.calls == 1 else 0
            served, rest = keys[:n], keys[n:]
        else:
            served, rest = keys, []
        reply: dict[str, Any] = {
            "Responses": {table: [{"pk": k["pk"], "_ts": {"N": "1.5"}} for k in served]}
        }
        if rest:
            reply["UnprocessedKeys"] = {table: {**request, "Keys": rest}}
        return reply


async def test_dynamodb_retries_unprocessed_keys() -> None:
    store = DynamoStore("features")
    store._client = fake = ThrottlingDynamo(throttled=2)
    keys = [(USER_FEATURES, e) for e in ("a", "b", "c", "d")] + [(USER_FEATURES, "a")]
    records = await store.read(keys)
    assert fake.calls == 3
    assert all(r is not None and r.event_ts == 1.5 for r in records)


async def test_endless_throttling_ends_at_the_read_deadline(client) -> None:
    backing = DynamoStore("features")
    backing._client = ThrottlingDynamo(throttled=10**9)
    store = store_with(client, backing, timeout_s=0.05)
    started = time.perf_counter()
    rows = await store.read([tx("a", "b")])
    assert time.perf_counter() - started < 0.5
    assert rows.reads[0]["user:features"].reason is Reason.UNAVAILABLE
