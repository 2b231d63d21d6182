"""Sorted sets and embeddings on the read path, against a real redis-server (and the
backing-store emulators): one round trip with the hashes, values, defaults, corruption."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from features import (
    HASH_GROUPS,
    MERCHANT_EMBEDDING,
    MODEL_FEATURES,
    STORED_FEATURES,
    USER_ACTIVITY,
    USER_MERCHANTS,
    BackingStore,
    FeatureStore,
    FeatureWriter,
    Reason,
    Settings,
    Source,
    metrics,
    model_inputs,
    open_redis,
)
from features.online.structures import pack_embedding
from tests.conftest import (
    EMBEDDING,
    FakeClock,
    command_calls,
    entity_features,
    socket_writes,
    write_entities,
    write_structures,
)
from tests.test_backing import backing, emulator
from tools.redis_server import RedisServer, free_port

__all__ = ["backing", "emulator"]  # fixtures, imported for the backing-store tests

COLUMN = {f.name: i for i, f in enumerate(STORED_FEATURES)}
INPUT = {f.name: i for i, f in enumerate(MODEL_FEATURES)}
CAP_S = 30 * 86400.0
STRUCTURES = ("user:activity", "user:merchants", "merchant:embedding")


def tx(user: str, merchant: str) -> dict[str, str]:
    return {"user": user, "merchant": merchant}


def inputs(values: np.ndarray, now: float) -> np.ndarray:
    n = len(values)
    return model_inputs(values, np.full(n, 10.0), np.full(n, now))


async def seed_hashes(client: aioredis.Redis, users: list[str], merchants: list[str]) -> None:
    writer = FeatureWriter(client)
    user = {f.name: 1.0 for f in entity_features("user")}
    merchant = {f.name: 1.0 for f in entity_features("merchant")}
    await write_entities(writer, "user", [(u, user) for u in users])
    await write_entities(writer, "merchant", [(m, merchant) for m in merchants])


def batch_of(users: list[str], merchants: list[str]) -> list[dict[str, str]]:
    return [tx(u, merchants[i % len(merchants)]) for i, u in enumerate(users)]


def expect_commands(sync_redis: redis.Redis, users: int, merchants: int) -> None:
    """One HMGET per hash key, ZCARD and ZCOUNT per user, ZCARD and ZSCORE per (user,
    merchant) pair (one per user here), GET per merchant."""
    user_hashes = sum(g.entity == "user" for g in HASH_GROUPS)
    merchant_hashes = len(HASH_GROUPS) - user_hashes
    assert command_calls(sync_redis, "hmget") == users * user_hashes + merchants * merchant_hashes
    assert command_calls(sync_redis, "zcount") == users
    assert command_calls(sync_redis, "zscore") == users
    assert command_calls(sync_redis, "zcard") == 2 * users
    assert command_calls(sync_redis, "get") == merchants


async def test_pooled_pipeline_reads_every_structure_in_one_write(client, sync_redis) -> None:
    users, merchants = [f"u{i}" for i in range(12)], ["m0", "m1", "m2"]
    await seed_hashes(client, users, merchants)
    await write_structures(client, users, merchants)
    sync_redis.config_resetstat()
    with socket_writes() as writes:
        rows = await FeatureStore(client).read(batch_of(users, merchants))
    assert writes.count == 1  # hashes, sorted sets and strings in ONE write: one round trip
    expect_commands(sync_redis, len(users), len(merchants))
    assert command_calls(sync_redis, "multi") == 0
    assert {r.source for row in rows.reads for r in row.values()} == {Source.REDIS}


async def test_multiplexed_connection_reads_every_structure_in_one_write(
    quiet_redis: RedisServer,
) -> None:
    users, merchants = [f"u{i}" for i in range(12)], ["m0", "m1", "m2"]
    client = open_redis(Settings(redis_url=quiet_redis.url, redis_socket_timeout_s=1.0))
    assert isinstance(client, aioredis.Redis)
    admin = redis.Redis.from_url(quiet_redis.url)
    store = FeatureStore(client, multiplex=True)
    try:
        await seed_hashes(client, users, merchants)
        await write_structures(client, users, merchants)
        await store.open()
        await store.read([tx("warm", "warm")])  # the connection is open before counting
        admin.config_resetstat()
        before = int(admin.info("stats")["total_reads_processed"])
        rows = await store.read(batch_of(users, merchants))
        # The server counts its socket reads: one for our one write, one for the INFO.
        assert int(admin.info("stats")["total_reads_processed"]) - before == 1 + 1
        expect_commands(admin, len(users), len(merchants))
        assert {r.source for row in rows.reads for r in row.values()} == {Source.REDIS}
        assert rows.values[0, COLUMN["tx_count_10m"]] == 1
    finally:
        await store.aclose()
        await client.aclose()
        admin.close()


@pytest.mark.parametrize("multiplex", [False, True])
async def test_values_of_the_structures_and_their_model_inputs(
    redis_url, sync_redis, multiplex: bool
) -> None:
    now = time.time()
    sync_redis.zadd("user:{u1}:activity", {f"t{i}": now - 60 * i for i in range(3)})  # inside
    sync_redis.zadd("user:{u1}:activity", {"old1": now - 601, "old2": now - 5000})  # outside
    sync_redis.zadd("user:{u1}:merchants", {"m1": now - 3600, "m2": now - 40 * 86400})
    sync_redis.set("merchant:{m1}:embedding", pack_embedding(EMBEDDING))
    client = open_redis(Settings(redis_url=redis_url, redis_socket_timeout_s=1.0))
    store = FeatureStore(client, multiplex=multiplex)
    try:
        rows = await store.read([tx("u1", "m1"), tx("u1", "m2"), tx("u1", "m3"), tx("new", "m1")])
    finally:
        await store.aclose()
        await client.aclose()
    x = inputs(rows.values, now)
    paid, recent, same, unseen, nobody = 0, 0, 1, 2, 3
    assert x[recent, INPUT["tx_count_10m"]] == 3
    assert x[paid, INPUT["seconds_since_paid_merchant"]] == pytest.approx(3600, abs=60)
    assert x[paid, INPUT["is_new_merchant_30d"]] == 0
    # Paid 40 days ago (older than the set's retention): new, and the capped default.
    assert (
        x[same, INPUT["is_new_merchant_30d"]],
        x[same, INPUT["seconds_since_paid_merchant"]],
    ) == (
        1,
        CAP_S,
    )
    # A set without this merchant: a value (never paid it), read from Redis, not a default.
    read = rows.reads[unseen]["user:merchants"]
    assert (read.source, read.reason, read.defaulted) == (Source.REDIS, None, ())
    assert x[unseen, INPUT["is_new_merchant_30d"]] == 1
    emb = [x[paid, INPUT[name]] for name in MERCHANT_EMBEDDING.field_names]
    assert emb == pytest.approx(EMBEDDING)
    assert rows.reads[unseen]["merchant:embedding"].reason is Reason.MISSING  # m3 has none
    # No history at all: every structure of the user is missing, served as its default.
    for name in ("user:activity", "user:merchants"):
        read = rows.reads[nobody][name]
        assert (read.source, read.reason) == (Source.DEFAULT, Reason.MISSING), name
    assert x[nobody, INPUT["tx_count_10m"]] == 0
    assert x[nobody, INPUT["is_new_merchant_30d"]] == 1
    assert x[nobody, INPUT["seconds_since_paid_merchant"]] == CAP_S


async def test_each_user_merchant_pair_is_a_key_of_its_own(client, sync_redis) -> None:
    now = time.time()
    sync_redis.zadd("user:{u1}:merchants", {"m1": now - 100, "m2": now - 200})
    store = FeatureStore(client)
    rows = await store.read([tx("u1", "m1"), tx("u1", "m2"), tx("u1", "m1")])
    assert command_calls(sync_redis, "zscore") == 2  # the duplicate pair read once
    paid = rows.values[:, COLUMN["merchant_last_paid_ts"]]
    assert paid.tolist() == pytest.approx([now - 100, now - 200, now - 100], abs=1e-3)
    sync_redis.config_resetstat()
    await store.read([tx("u1", "m2")])  # cached under its pair
    assert command_calls(sync_redis, "zscore") == 0


async def test_a_recent_count_is_cached_for_the_cache_ttl_only(client, sync_redis) -> None:
    clock = FakeClock()
    now = time.time()
    sync_redis.zadd("user:{u1}:activity", {"t0": now - 10})
    store = FeatureStore(client, cache_ttl_s=5.0, timer=clock)
    first = await store.read([tx("u1", "m1")])
    assert first.values[0, COLUMN["tx_count_10m"]] == 1
    sync_redis.zadd("user:{u1}:activity", {"t1": now - 5})
    clock.tick(4.9)
    cached = await store.read([tx("u1", "m1")])
    assert cached.values[0, COLUMN["tx_count_10m"]] == 1  # as counted 4.9 s ago
    assert cached.reads[0]["user:activity"].source is Source.CACHE
    clock.tick(0.2)
    again = await store.read([tx("u1", "m1")])
    assert again.values[0, COLUMN["tx_count_10m"]] == 2


def packed(values: list[float]) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        packed(EMBEDDING)[:-1],  # one byte short
        packed(EMBEDDING) + b"\x00" * 4,  # a dimension too many
        packed([0.0] * 4),  # another dimension
        packed([float("nan"), *EMBEDDING[1:]]),
        packed([*EMBEDDING[:-1], float("inf")]),
        packed([float("-inf")] * 8),
        b"[0.12, -0.34, 0.89, 0.1, 0.2, 0.3, 0.4, 0.5]",  # the seed's JSON text
    ],
)
async def test_a_corrupt_embedding_gets_the_defaults_and_a_count(
    client, sync_redis, raw: bytes
) -> None:
    sync_redis.set("merchant:{m1}:embedding", raw)
    counter = metrics.CORRUPT_VALUES.labels("merchant:embedding", "embedding")
    before = counter._value.get()
    rows = await FeatureStore(client).read([tx("u1", "m1")])
    read = rows.reads[0]["merchant:embedding"]
    assert (read.reason, read.defaulted) == (Reason.INVALID, MERCHANT_EMBEDDING.field_names)
    start = COLUMN["merchant_emb_0"]
    np.testing.assert_array_equal(
        rows.values[0, start : start + MERCHANT_EMBEDDING.dim], MERCHANT_EMBEDDING.defaults
    )
    assert counter._value.get() == before + 1


@pytest.mark.parametrize("score", [float("-inf"), float("inf"), -5.0])
async def test_a_score_that_is_no_time_gets_the_default_and_a_count(
    client, sync_redis, score: float
) -> None:
    sync_redis.zadd("user:{u1}:merchants", {"m1": score})
    counter = metrics.CORRUPT_VALUES.labels("user:merchants", "merchant_last_paid_ts")
    before = counter._value.get()
    rows = await FeatureStore(client, multiplex=False).read([tx("u1", "m1")])
    read = rows.reads[0]["user:merchants"]
    assert read.reason is Reason.INVALID
    assert rows.values[0, COLUMN["merchant_last_paid_ts"]] == 0.0
    assert counter._value.get() == before + 1


@pytest.mark.parametrize("multiplex", [False, True])
async def test_keys_of_the_wrong_type_get_invalid_defaults(
    redis_url, sync_redis, multiplex: bool
) -> None:
    sync_redis.set("user:{u1}:activity", "a string")
    sync_redis.hset("user:{u1}:merchants", "m1", "1")
    sync_redis.zadd("merchant:{m1}:embedding", {"a": 1})
    client = open_redis(Settings(redis_url=redis_url, redis_socket_timeout_s=1.0))
    store = FeatureStore(client, multiplex=multiplex)
    try:
        rows = await store.read([tx("u1", "m1")])
    finally:
        await store.aclose()
        await client.aclose()
    for name in STRUCTURES:
        read = rows.reads[0][name]
        assert (read.source, read.reason) == (Source.DEFAULT, Reason.INVALID), name
    assert rows.reads[0]["user:features"].reason is Reason.MISSING  # the rest still read


async def test_unreachable_redis_gives_unavailable_for_every_structure() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = open_redis(Settings(redis_url=url, redis_socket_timeout_s=0.2))
    try:
        rows = await FeatureStore(client).read([tx("u1", "m1")])
    finally:
        await client.aclose()
    for name in STRUCTURES:
        assert rows.reads[0][name].reason is Reason.UNAVAILABLE, name


async def test_the_writer_writes_embeddings_and_refuses_sorted_sets(client, sync_redis) -> None:
    writer = FeatureWriter(client)
    values = dict(zip(MERCHANT_EMBEDDING.field_names, EMBEDDING, strict=True))
    assert await writer.write(MERCHANT_EMBEDDING, [("m1", values)]) == 1
    raw = sync_redis.get("merchant:{m1}:embedding")
    assert raw == pack_embedding(EMBEDDING) and len(raw) == 4 * MERCHANT_EMBEDDING.dim
    ttl = sync_redis.ttl("merchant:{m1}:embedding")
    assert MERCHANT_EMBEDDING.ttl_s - 5 <= ttl <= MERCHANT_EMBEDDING.ttl_s
    with pytest.raises(ValueError, match="written whole"):
        await writer.write(MERCHANT_EMBEDDING, [("m2", {"merchant_emb_0": 1.0})])
    with pytest.raises(ValueError, match="finite"):
        await writer.write(MERCHANT_EMBEDDING, [("m2", {**values, "merchant_emb_3": 1e39})])
    for group in (USER_ACTIVITY, USER_MERCHANTS):
        with pytest.raises(ValueError, match="the stream writes it"):
            await writer.write(group, [("u1", {group.field_names[0]: 1.0})])
    assert sync_redis.exists("merchant:{m2}:embedding", "user:{u1}:activity") == 0


async def test_embeddings_persist_in_the_backing_store_and_are_repaired(
    backing: BackingStore, client, sync_redis
) -> None:
    values = dict(zip(MERCHANT_EMBEDDING.field_names, EMBEDDING, strict=True))
    await FeatureWriter(client, backing).write(MERCHANT_EMBEDDING, [("m1", values)])
    sync_redis.flushall()  # Redis lost everything: the backing store has the embedding
    store = FeatureStore(client, backing=backing, backing_timeout_s=2.0)
    try:
        rows = await store.read([tx("u1", "m1")])
        await store.wait_repairs()
    finally:
        await store.aclose()
    read = rows.reads[0]["merchant:embedding"]
    assert (read.source, read.reason) == (Source.BACKING, None)
    start = COLUMN["merchant_emb_0"]
    assert rows.values[0, start : start + MERCHANT_EMBEDDING.dim].tolist() == EMBEDDING
    assert sync_redis.get("merchant:{m1}:embedding") == pack_embedding(EMBEDDING)  # repaired
    assert 0 < sync_redis.ttl("merchant:{m1}:embedding") <= MERCHANT_EMBEDDING.ttl_s
    # The sorted sets are not persisted: the backing store is never asked for them, and
    # Redis's answer (no such key) stands.
    for name in ("user:activity", "user:merchants"):
        assert rows.reads[0][name].reason is Reason.MISSING, name
