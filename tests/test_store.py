"""FeatureStore and FeatureWriter against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis.asyncio as aioredis

from features import (
    GROUPS,
    HASH_GROUPS,
    MERCHANT_EMBEDDING,
    MERCHANT_RISK,
    STORED_FEATURES,
    USER_FEATURES,
    USER_MERCHANTS,
    USER_PROFILE,
    FeatureStore,
    FeatureWriteError,
    FeatureWriter,
    InvalidEntityId,
    Reason,
    Settings,
    Source,
    metrics,
    open_redis,
)
from features.connection import Client
from tests.conftest import (
    FakeClock,
    command_calls,
    entity_features,
    socket_writes,
    write_entities,
    write_structures,
)
from tools.redis_server import free_port

USER = {f.name: float(i + 1) for i, f in enumerate(entity_features("user"))}
USER["is_premium"] = 1.0
MERCHANT = {"mcc_risk_score": 0.25, "chargeback_rate_90d": 0.01, "merchant_tx_count_24h": 7}
USER_GROUPS = sum(g.entity == "user" for g in HASH_GROUPS)  # hashes: one HMGET each
MERCHANT_GROUPS = len(HASH_GROUPS) - USER_GROUPS
PROFILE = {k: v for k, v in USER.items() if k in USER_PROFILE.field_names}
COLUMN = {f.name: i for i, f in enumerate(STORED_FEATURES)}


def store_for(
    client: Client, clock: FakeClock | None = None, cache_maxsize: int = 1000
) -> FeatureStore:
    return FeatureStore(
        client, cache_ttl_s=5.0, cache_maxsize=cache_maxsize, timer=clock or time.monotonic
    )


async def seed(
    client: aioredis.Redis, users: list[str], merchants: list[str], structures: bool = True
) -> None:
    writer = FeatureWriter(client)
    await write_entities(writer, "user", [(u, USER) for u in users])
    await write_entities(writer, "merchant", [(m, MERCHANT) for m in merchants])
    if structures:
        await write_structures(client, users, merchants)


def tx(user: str, merchant: str) -> dict[str, str]:
    return {"user": user, "merchant": merchant}


async def test_hit_returns_stored_values_and_defaults_for_absent_fields(client) -> None:
    await seed(client, ["u1"], ["m1"])
    rows = await store_for(client).read([tx("u1", "m1")])
    assert rows.values.shape == (1, len(STORED_FEATURES))
    assert rows.values[0, COLUMN["tx_count_1h"]] == USER["tx_count_1h"]
    assert rows.values[0, COLUMN["mcc_risk_score"]] == pytest.approx(0.25)
    # avg_ticket_30d was never written: its training default, and it is reported.
    assert rows.values[0, COLUMN["avg_ticket_30d"]] == 50.0
    user, merchant = rows.reads[0]["user:features"], rows.reads[0]["merchant:risk"]
    assert (user.source, user.defaulted, user.reason) == (Source.REDIS, (), None)
    assert merchant.source is Source.REDIS and merchant.reason is Reason.INVALID
    assert "avg_ticket_30d" in merchant.defaulted and "mcc_risk_score" not in merchant.defaulted
    assert rows.source is Source.REDIS


async def test_unknown_entity_gets_every_default(client) -> None:
    rows = await store_for(client).read([tx("nobody", "nowhere")])
    expected = np.concatenate([g.defaults for g in GROUPS])
    np.testing.assert_array_equal(rows.values[0], expected)
    for read in rows.reads[0].values():
        assert (read.source, read.reason) == (Source.DEFAULT, Reason.MISSING)


async def test_one_round_trip_for_a_whole_batch(client, sync_redis) -> None:
    users = [f"u{i}" for i in range(40)]
    merchants = [f"m{i}" for i in range(10)]
    await seed(client, users, merchants)
    sync_redis.config_resetstat()
    batch = [tx(users[i], merchants[i % 10]) for i in range(40)] + [tx("u0", "m0")]  # dup
    with socket_writes() as writes:
        rows = await store_for(client).read(batch)
    assert writes.count == 1  # every key in ONE write to the socket: one round trip
    # One HMGET per unique key: each user's hashes and each merchant's.
    assert command_calls(sync_redis, "hmget") == 40 * USER_GROUPS + 10 * MERCHANT_GROUPS
    assert command_calls(sync_redis, "multi") == 0  # non-transactional
    np.testing.assert_array_equal(rows.values[0], rows.values[-1])


async def test_cache_serves_within_ttl_then_expires(client, sync_redis, clock) -> None:
    await seed(client, ["u1"], ["m1"])
    store = store_for(client, clock)
    await store.read([tx("u1", "m1")])
    sync_redis.config_resetstat()
    clock.tick(4.9)
    cached = await store.read([tx("u1", "m1")])
    assert command_calls(sync_redis, "hmget") == 0
    assert {r.source for r in cached.reads[0].values()} == {Source.CACHE}
    assert cached.source is Source.CACHE
    clock.tick(0.2)
    again = await store.read([tx("u1", "m1")])
    assert command_calls(sync_redis, "hmget") == len(HASH_GROUPS)
    assert {r.source for r in again.reads[0].values()} >= {Source.REDIS}


async def test_missing_keys_are_cached_too(client, sync_redis) -> None:
    store = store_for(client)
    await store.read([tx("ghost", "m1")])
    sync_redis.config_resetstat()
    rows = await store.read([tx("ghost", "m1")])
    assert command_calls(sync_redis, "hmget") == 0
    assert rows.reads[0]["user:features"].reason is Reason.MISSING


async def test_cache_is_bounded_lru(client, sync_redis) -> None:
    await seed(client, ["u1", "u2"], ["m1"])
    store = store_for(client, cache_maxsize=len(GROUPS))
    await store.read([tx("u1", "m1")])  # cache: u1's groups, m1's
    await store.read([tx("u1", "m1")])  # touches them all
    await store.read([tx("u2", "m1")])  # u2's groups evict u1's, the least recently used
    sync_redis.config_resetstat()
    await store.read([tx("u1", "m1")])
    assert command_calls(sync_redis, "hmget") == USER_GROUPS


async def test_concurrent_misses_share_one_read(client, sync_redis) -> None:
    await seed(client, ["u1"], ["m1"])
    store = store_for(client)
    sync_redis.config_resetstat()
    shared_before = metrics.SHARED_READS._value.get()
    results = await asyncio.gather(*(store.read([tx("u1", "m1")]) for _ in range(20)))
    assert command_calls(sync_redis, "hmget") == len(HASH_GROUPS)
    assert metrics.SHARED_READS._value.get() - shared_before == 19 * len(GROUPS)
    for rows in results:
        np.testing.assert_array_equal(rows.values, results[0].values)


async def test_cancelled_reader_does_not_strand_joined_readers(client) -> None:
    await seed(client, ["u1"], ["m1"])
    store = store_for(client)
    first = asyncio.create_task(store.read([tx("u1", "m1")]))
    await asyncio.sleep(0)  # first has sent its pipeline
    second = asyncio.create_task(store.read([tx("u1", "m1")]))
    await asyncio.sleep(0)
    first.cancel()
    rows = await asyncio.wait_for(second, 2)
    assert rows.values.shape == (1, len(STORED_FEATURES))


@pytest.mark.parametrize(
    ("raw", "field"),
    [(b"abc", "tx_count_1h"), (b"1.5", "tx_count_1h"), (b"nan", "tx_sum_1h"),
     (b"inf", "avg_tx_90d"), (b"1e39", "tx_sum_24h"), (b"2", "is_premium"),
     (b"", "account_age_days"), (b"\xff\xfe", "credit_score_bucket"),
     (b"9" * 100_000, "tx_sum_1h")],
)  # fmt: skip
async def test_corrupt_value_gets_its_default_and_a_count(client, sync_redis, raw, field) -> None:
    await seed(client, ["u1"], [])
    group = next(g for g in GROUPS if field in g.field_names)
    sync_redis.hset(group.key("u1"), field, raw)
    counter = metrics.CORRUPT_VALUES.labels(group.qualified_name, field)
    before = counter._value.get()
    rows = await store_for(client).read([tx("u1", "m1")])
    default = next(f.default for f in group.features if f.name == field)
    assert rows.values[0, COLUMN[field]] == default
    read = rows.reads[0][group.qualified_name]
    assert read.defaulted == (field,) and read.reason is Reason.INVALID
    # The group's other values are served as stored.
    other = next(name for name in group.field_names if name != field)
    assert rows.values[0, COLUMN[other]] == USER[other]
    assert counter._value.get() == before + 1


async def test_key_of_the_wrong_type_gets_defaults(client, sync_redis) -> None:
    sync_redis.set("user:{u1}:features", "not a hash")
    rows = await store_for(client).read([tx("u1", "m1")])
    read = rows.reads[0]["user:features"]
    assert (read.source, read.reason) == (Source.DEFAULT, Reason.INVALID)
    np.testing.assert_array_equal(
        rows.values[0, : len(USER_FEATURES.features)], USER_FEATURES.defaults
    )


async def test_invalid_id_is_rejected_before_any_redis_command(client, sync_redis) -> None:
    store = store_for(client)
    sync_redis.config_resetstat()
    for bad in ["u1:features", "*", "u 1", "x" * 65, ""]:
        with pytest.raises(InvalidEntityId, match="user_id"):
            await store.read([tx("ok", "m1"), tx(bad, "m1")])
    with pytest.raises(InvalidEntityId, match="merchant_id: is required"):
        await store.read([{"user": "u1"}])
    assert command_calls(sync_redis, "hmget") == 0


async def test_closed_port_gives_defaults_within_the_timeout() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = open_redis(settings)
    errors = metrics.REDIS_ERRORS.labels("ConnectionError")
    before = errors._value.get()
    try:
        store = store_for(client)
        started = time.perf_counter()
        rows = await store.read([tx("u1", "m1")])
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5  # redis-py's defaults would retry for seconds
        for read in rows.reads[0].values():
            assert (read.source, read.reason) == (Source.DEFAULT, Reason.UNAVAILABLE)
        assert rows.source is Source.DEFAULT
        assert errors._value.get() == before + 1
        again = await store.read([tx("u1", "m1")])  # failures are not cached
        assert again.reads[0]["user:features"].source is Source.DEFAULT
        assert errors._value.get() == before + 2
    finally:
        await client.aclose()


async def test_writer_sets_ttl_to_twice_the_freshness(client, sync_redis) -> None:
    await seed(client, ["u1"], ["m1"])
    for key, group in [
        ("user:{u1}:features", USER_FEATURES),
        ("merchant:{m1}:risk", MERCHANT_RISK),
    ]:
        assert group.ttl_s - 2 <= sync_redis.ttl(key) <= group.ttl_s
    assert sync_redis.hget("user:{u1}:features", "tx_count_1h") == b"1"
    assert sync_redis.hget("user:{u1}:features", "tx_sum_1h") == b"2.0"


async def test_writer_rejects_bad_values_before_writing(client, sync_redis) -> None:
    writer = FeatureWriter(client)
    cases: list[tuple[dict[str, float], str]] = [
        ({"nope": 1.0}, "no feature 'nope'"),
        ({"account_age_days": 1.5}, "account_age_days"),
        ({"is_premium": 2}, "is_premium"),
        ({"avg_tx_90d": float("nan")}, "avg_tx_90d"),
    ]
    for values, match in cases:
        with pytest.raises(ValueError, match=match):
            await writer.write(USER_PROFILE, [("u1", PROFILE), ("u2", values)])
    with pytest.raises(InvalidEntityId):
        await writer.write(USER_PROFILE, [("u:1", PROFILE)])
    assert sync_redis.dbsize() == 0


async def test_write_to_a_full_redis_is_reported_and_not_half_applied(client, sync_redis) -> None:
    sync_redis.config_set("maxmemory", "1")
    sync_redis.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(FeatureWriteError, match="2 user:profile rows not written"):
            await FeatureWriter(client).write(USER_PROFILE, [("u1", PROFILE), ("u2", PROFILE)])
    finally:
        sync_redis.config_set("maxmemory", "0")
    assert sync_redis.dbsize() == 0


async def test_writer_runs_its_script_by_sha_and_resends_it_after_a_flush(
    client, sync_redis
) -> None:
    sync_redis.script_flush()  # as after a restart: the server knows no script
    await seed(client, ["u1", "u2"], ["m1"], structures=False)  # NOSCRIPT: sent again whole
    sync_redis.config_resetstat()
    await seed(client, ["u3", "u4"], ["m2"], structures=False)
    assert command_calls(sync_redis, "eval") == 0
    # One per row and group: two users and a merchant, each in its two groups.
    assert command_calls(sync_redis, "evalsha") == 6
    assert sync_redis.dbsize() == 12
    for user in ("u1", "u4"):
        assert sync_redis.hget(USER_FEATURES.key(user), "tx_count_1h") == b"1"
        assert sync_redis.ttl(USER_FEATURES.key(user)) > 0


def test_a_store_from_settings_has_a_breaker_per_configured_store(settings, client) -> None:
    from prometheus_client import REGISTRY

    from features import open_store

    def gauge(dependency: str) -> float | None:
        labels = {"dependency": dependency}
        return REGISTRY.get_sample_value("features_breaker_state", labels)

    assert settings.backing_store == "none"
    open_store(settings, client)
    assert gauge("redis") is not None
    assert gauge("none") is None


def test_settings_reach_the_client(settings: Settings) -> None:
    client = open_redis(settings)
    assert isinstance(client, aioredis.Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == settings.redis_socket_timeout_s
    assert kwargs["socket_connect_timeout"] == settings.redis_connect_timeout_s
    assert client.connection_pool.max_connections == settings.redis_max_connections
    assert kwargs["retry"].get_retries() == 0


def test_loader_writes_demo_csv_and_parquet(redis_url, sync_redis, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    from features.offline.load import main

    assert main(["--demo", "--users", "300", "--merchants", "20", "--redis-url", redis_url]) == 0
    # Each user's hashes and merchants paid; each merchant's hashes and embedding.
    assert sync_redis.dbsize() == 300 * (USER_GROUPS + 1) + 20 * (MERCHANT_GROUPS + 1)
    assert sync_redis.strlen("merchant:{m00020}:embedding") == 4 * MERCHANT_EMBEDDING.dim
    paid = sync_redis.zscore("user:{u000001}:merchants", "m00001")
    assert paid is not None and 0 < time.time() - paid < 6 * 3600 + 60
    assert 0 < sync_redis.ttl("user:{u000001}:merchants") <= USER_MERCHANTS.ttl_s
    assert 0 < sync_redis.ttl("user:{u000300}:features") <= USER_FEATURES.ttl_s
    assert sync_redis.hlen("merchant:{m00020}:risk") == len(MERCHANT_RISK.features) + 1  # _ts

    table = pa.table({"entity_id": ["007", "x9"], "tx_count_1h": [4, 5], "tx_sum_1h": [1.5, None]})
    pyarrow.csv.write_csv(table, tmp_path / "users.csv")
    pyarrow.parquet.write_table(table, tmp_path / "users.parquet")
    sync_redis.flushall()
    assert (
        main(["--group", "user:features", str(tmp_path / "users.csv"), "--redis-url", redis_url])
        == 0
    )
    stored = sync_redis.hgetall("user:{007}:features")
    assert abs(float(stored.pop(b"_ts")) - time.time()) < 60  # the load time
    assert stored == {b"tx_count_1h": b"4", b"tx_sum_1h": b"1.5"}
    sync_redis.flushall()
    assert (
        main(
            ["--group", "user:features", str(tmp_path / "users.parquet"), "--redis-url", redis_url]
        )
        == 0
    )
    assert sync_redis.hmget("user:{x9}:features", ["tx_count_1h", "tx_sum_1h"]) == [b"5", None]
    with pytest.raises(ValueError, match="no entity_id column"):
        pyarrow.csv.write_csv(pa.table({"id": ["a"]}), tmp_path / "bad.csv")
        main(["--group", "user:features", str(tmp_path / "bad.csv"), "--redis-url", redis_url])
