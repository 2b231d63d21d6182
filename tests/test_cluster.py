"""Redis Cluster (3 masters, 3 replicas) and Sentinel: real redis-server processes on loopback.

The cluster for reads and writes starts once for this module; the failover tests kill a
master, so each starts its own deployment.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.cluster import RedisCluster as SyncRedisCluster

from features import (
    HASH_GROUPS,
    MERCHANT_RISK,
    STORED_FEATURES,
    USER_FEATURES,
    FeatureStore,
    FeatureWriteError,
    FeatureWriter,
    Reason,
    Record,
    Settings,
    Source,
    metrics,
    open_redis,
    open_store,
)
from features.backing import restore_to_redis
from features.connection import SLOT_MAP_REFRESH_INTERVAL_S, Client
from features.online.structures import pack_embedding
from tests.conftest import EMBEDDING, FakeClock, Service, command_calls, sentinel_settings
from tools.redis_cluster import LocalCluster, LocalSentinel
from tools.redis_server import RedisServer, free_port

COLUMN = {f.name: i for i, f in enumerate(STORED_FEATURES)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        yield c


def cluster_settings(cluster: LocalCluster, **overrides: float) -> Settings:
    # Loopback on a busy 2-core VM: generous timeouts; production uses the defaults.
    values: dict[str, Any] = {
        "redis_socket_timeout_s": 1.0,
        "redis_cluster_deadline_s": 2.0,
        **overrides,
    }
    return Settings(
        redis_url=cluster.url, redis_mode="cluster", redis_nodes=cluster.nodes, **values
    )


@pytest.fixture
def admin(cluster: LocalCluster) -> Iterator[SyncRedisCluster]:
    """Direct access to the cluster; flushes every master after each test."""
    client = SyncRedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
    yield client
    client.flushall(target_nodes=SyncRedisCluster.PRIMARIES)
    client.close()


@pytest.fixture
async def client(cluster: LocalCluster, admin: SyncRedisCluster) -> AsyncIterator[Client]:
    c = open_redis(cluster_settings(cluster))
    yield c
    await c.aclose()


def tx(i: int) -> dict[str, str]:
    return {"user": f"u{i}", "merchant": f"m{i}"}


async def seed(client: Client, n: int) -> None:
    writer = FeatureWriter(client)
    await writer.write(USER_FEATURES, [(f"u{i}", {"tx_count_1h": i}) for i in range(n)])
    await writer.write(MERCHANT_RISK, [(f"m{i}", {"mcc_risk_score": 0.5}) for i in range(n)])


async def test_writes_set_values_and_ttls_on_every_master(client, admin, cluster) -> None:
    await seed(client, 100)
    owners = {cluster.master_of(USER_FEATURES.key(f"u{i}")).port for i in range(100)}
    assert len(owners) == 3  # the batch spans every master
    for i in (0, 42, 99):
        key = USER_FEATURES.key(f"u{i}")
        assert admin.hget(key, "tx_count_1h") == str(i).encode()
        assert USER_FEATURES.ttl_s - 2 <= admin.ttl(key) <= USER_FEATURES.ttl_s
        assert 0 < admin.ttl(MERCHANT_RISK.key(f"m{i}")) <= MERCHANT_RISK.ttl_s
    # An entity's groups share its hash tag, so one slot, whatever the group.
    assert admin.keyslot("user:{u7}:features") == admin.keyslot("user:{u7}:other")


async def test_batch_read_is_one_pipeline_per_master(client, cluster, monkeypatch) -> None:
    await seed(client, 100)
    store = FeatureStore(client, cache_ttl_s=5.0)
    await store.read([tx(100)])  # connect first: the handshake is not the read
    sends: list[int] = []
    original = Connection.send_packed_command

    async def counting(self: Connection, command: object, check_health: bool = True) -> None:
        sends.append(int(self.port))
        await original(self, command, check_health)  # type: ignore[arg-type]

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    rows = await store.read([tx(i) for i in range(100)])
    # 200 keys on 3 masters: one write per master, sent in parallel.
    masters = {port for port, role in cluster.roles().items() if role == "master"}
    assert len(sends) == len(set(sends)) == 3 and set(sends) == masters
    assert rows.source is Source.REDIS
    assert [rows.values[i, COLUMN["tx_count_1h"]] for i in (0, 50, 99)] == [0, 50, 99]
    assert rows.values[7, COLUMN["mcc_risk_score"]] == pytest.approx(0.5)


def test_loader_writes_the_demo_population_to_a_cluster(admin, cluster, monkeypatch) -> None:
    from features.offline.load import main

    monkeypatch.setenv("FEATURES_REDIS_MODE", "cluster")
    monkeypatch.setenv("FEATURES_REDIS_NODES", cluster.nodes)
    assert main(["--demo", "--users", "3000", "--merchants", "20", "--redis-url", cluster.url]) == 0
    # Summed over masters: each user's hashes and merchants paid, each merchant's hashes
    # and embedding.
    user_keys = sum(g.entity == "user" for g in HASH_GROUPS) + 1
    merchant_keys = len(HASH_GROUPS) - user_keys + 2
    assert admin.dbsize(target_nodes=SyncRedisCluster.PRIMARIES) == (
        3000 * user_keys + 20 * merchant_keys
    )
    assert 0 < admin.ttl("user:{u003000}:features") <= USER_FEATURES.ttl_s


async def test_sorted_sets_and_embeddings_are_read_on_every_master(client, admin, cluster) -> None:
    now = time.time()
    for i in range(30):
        admin.zadd(f"user:{{u{i}}}:activity", {"t0": now - 5, "t1": now - 700})
        admin.zadd(f"user:{{u{i}}}:merchants", {f"m{i}": now - 3600})
        admin.set(f"merchant:{{m{i}}}:embedding", pack_embedding(EMBEDDING))
    owners = {cluster.master_of(f"user:{{u{i}}}:merchants").port for i in range(30)}
    assert len(owners) == 3
    admin.set("user:{u3}:activity", "not a sorted set")
    rows = await FeatureStore(client).read([tx(i) for i in range(30)])
    start = COLUMN["merchant_emb_0"]
    for i in range(30):
        reads = rows.reads[i]
        assert reads["user:merchants"].source is Source.REDIS
        assert reads["merchant:embedding"].source is Source.REDIS
        assert now - rows.values[i, COLUMN["merchant_last_paid_ts"]] == pytest.approx(3600, abs=1)
        assert rows.values[i, start : start + len(EMBEDDING)].tolist() == EMBEDDING
        if i != 3:
            assert rows.values[i, COLUMN["tx_count_10m"]] == 1
    assert rows.reads[3]["user:activity"].reason is Reason.INVALID


async def test_unknown_and_wrong_type_keys_in_a_cluster(client, admin) -> None:
    admin.set(USER_FEATURES.key("u1"), "not a hash")
    rows = await FeatureStore(client).read([tx(1), tx(2)])
    assert rows.reads[0]["user:features"].reason is Reason.INVALID
    assert rows.reads[1]["user:features"].reason is Reason.MISSING


async def test_cluster_mode_has_no_invalidation_only_the_short_ttl(client, cluster) -> None:
    # docs/cache-invalidation.md: tracking is off in a cluster; reads work, entries last
    # the short TTL, and the state gauge says off.
    await seed(client, 1)
    settings = cluster_settings(cluster)
    assert settings.cache_invalidation  # asked for, as by default
    store = open_store(settings, client)
    assert store.tracking is None
    await store.open()
    try:
        assert (await store.read([tx(0)])).source is Source.REDIS
        assert (await store.read([tx(0)])).source is Source.CACHE
        assert metrics.TRACKING_STATE._value.get() == 0
    finally:
        await store.aclose()
    clock = FakeClock()
    short = FeatureStore(
        client, multiplex=True, invalidation=True, cache_tracked_ttl_s=60, timer=clock
    )
    await short.read([tx(0)])
    clock.tick(10)  # past the 5 s TTL, within the tracked one it never gets
    assert (await short.read([tx(0)])).source is Source.REDIS


async def test_write_refused_by_one_master_names_its_rows_only(client, admin, cluster) -> None:
    full = cluster.master_of(USER_FEATURES.key("u0"))
    node = redis.Redis("127.0.0.1", full.port)
    node.config_set("maxmemory", "1")
    node.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(FeatureWriteError) as info:
            await FeatureWriter(client).write(
                USER_FEATURES, [(f"u{i}", {"tx_count_1h": 1, "tx_sum_1h": 2.0}) for i in range(30)]
            )
    finally:
        node.config_set("maxmemory", "0")
    on_full = {f"u{i}" for i in range(30) if cluster.master_of(USER_FEATURES.key(f"u{i}")) is full}
    assert set(info.value.failed) == on_full
    assert "OOM" in str(info.value)
    for i in range(30):
        stored = admin.hgetall(USER_FEATURES.key(f"u{i}"))
        # Whole or absent, never half: both fields and the TTL, or nothing.
        if f"u{i}" in on_full:
            assert stored == {}
        else:
            assert float(stored.pop(b"_ts")) > 0  # the event time travels with the values
            assert stored == {b"tx_count_1h": b"1", b"tx_sum_1h": b"2.0"}
            assert admin.ttl(USER_FEATURES.key(f"u{i}")) > 0


async def test_scripts_run_by_sha_on_every_master_and_survive_a_flush(
    client, admin, cluster
) -> None:
    masters = [redis.Redis("127.0.0.1", port) for port, role in cluster.roles().items()]
    masters = [m for m in masters if m.info("replication")["role"] == "master"]
    values = tuple(b"3" for _ in USER_FEATURES.features)

    async def write_and_restore(prefix: str) -> None:
        await seed(client, 30)
        items = [(USER_FEATURES, f"{prefix}{i}", Record(values, None)) for i in range(30)]
        counts = await restore_to_redis(client, items, time.time())
        assert counts.written == 30

    for master in masters:
        master.script_flush()  # as after a restart or a failover: no script cached
    await write_and_restore("a")  # NOSCRIPT on each master: those calls sent again whole
    for master in masters:
        master.config_resetstat()
    await write_and_restore("b")
    for master in masters:
        assert command_calls(master, "eval") == 0
        assert command_calls(master, "evalsha") > 0
    assert admin.hget(USER_FEATURES.key("u7"), "tx_count_1h") == b"7"
    for restored in ("a7", "b7"):
        assert admin.hget(USER_FEATURES.key(restored), "tx_count_1h") == b"3"


async def test_ask_and_moved_are_followed_and_the_slot_map_updated(client, admin, cluster) -> None:
    await seed(client, 1)
    key = USER_FEATURES.key("u0")
    # A new store per read: no cache in the way.
    assert (await FeatureStore(client).read([tx(0)])).source is Source.REDIS  # slot known
    source, target = cluster.master_of(key), _other_master(cluster, key)
    slot = admin.keyslot(key)
    target_id = _start_migration(slot, source.port, target.port)
    rows = await FeatureStore(client).read([tx(0)])  # ASK: the key moved, the slot not yet
    assert rows.reads[0]["user:features"].source is Source.REDIS
    _finish_migration(slot, target_id, cluster)
    rows = await FeatureStore(client).read([tx(0)])  # MOVED, followed within the same read
    assert rows.reads[0]["user:features"].source is Source.REDIS
    assert rows.values[0, COLUMN["tx_count_1h"]] == 0
    assert client.get_node_from_key(key).port == target.port


async def test_a_stalled_master_costs_the_deadline_not_the_socket_timeout(client, cluster) -> None:
    await seed(client, 1)
    fast = open_redis(cluster_settings(cluster, redis_cluster_deadline_s=0.15))
    store = FeatureStore(fast, cache_ttl_s=0.001)
    try:
        assert (await store.read([tx(0)])).source is Source.REDIS
        stalled = redis.Redis("127.0.0.1", cluster.master_of(USER_FEATURES.key("u0")).port)
        stalled.client_pause(600)  # a real hang; the bus still runs
        started = time.perf_counter()
        rows = await store.read([tx(0)])
        elapsed = time.perf_counter() - started
        assert rows.reads[0]["user:features"].reason is Reason.UNAVAILABLE
        assert elapsed < 0.5  # the socket timeout is 1 s, the pause 0.6 s
        time.sleep(0.6)
        assert (await store.read([tx(0)])).source is Source.REDIS  # and back
    finally:
        await fast.aclose()


async def test_a_slot_map_load_outlives_the_deadline_that_gave_up_on_it(client, cluster) -> None:
    await seed(client, 1)
    fresh = open_redis(cluster_settings(cluster, redis_cluster_deadline_s=0.1))
    assert isinstance(fresh, RedisCluster)
    nodes = [redis.Redis("127.0.0.1", s.port) for s in cluster.alive()]
    try:
        for node in nodes:
            node.client_pause(500)  # the first read's slot-map load hangs
        started = time.perf_counter()
        rows = await FeatureStore(fresh).read([tx(0)])
        assert time.perf_counter() - started < 0.4  # the deadline, not the pause
        assert rows.reads[0]["user:features"].reason is Reason.UNAVAILABLE
        await asyncio.sleep(0.7)  # the pause ends; the load went on and finished
        assert not fresh._initialize  # RedisCluster's "must load first" flag
        rows = await FeatureStore(fresh).read([tx(0)])
        assert rows.reads[0]["user:features"].source is Source.REDIS
    finally:
        for node in nodes:
            node.client_unpause()
        await fresh.aclose()


def test_settings_select_the_client_with_tls_and_auth() -> None:
    url = "rediss://app:secret@127.0.0.1:7000/0?ssl_cert_reqs=none"
    standalone = open_redis(Settings(redis_url=url))
    assert isinstance(standalone, redis.asyncio.Redis)
    kwargs = standalone.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("app", "secret")
    assert standalone.connection_pool.connection_class is SSLConnection

    cluster = open_redis(Settings(redis_url=url, redis_mode="cluster", redis_nodes="h2:7001"))
    assert isinstance(cluster, RedisCluster)
    assert {n.name for n in cluster.startup_nodes} == {"127.0.0.1:7000", "h2:7001"}
    assert cluster.connection_kwargs["connection_class"] is SSLConnection
    assert cluster.connection_kwargs["password"] == "secret"
    assert cluster.connection_kwargs["socket_timeout"] == Settings().redis_socket_timeout_s
    assert cluster.retry.get_retries() == 0

    sentinel = open_redis(
        Settings(redis_url=url, redis_mode="sentinel", redis_nodes="s1:26379,s2:26379")
    )
    assert isinstance(sentinel, redis.asyncio.Redis)
    pool = sentinel.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert issubclass(pool.connection_class, SSLConnection)
    assert pool.connection_kwargs["password"] == "secret"
    assert pool.connection_kwargs["retry"].get_retries() == 0

    for env, key in [
        ({"FEATURES_REDIS_MODE": "replicated"}, "FEATURES_REDIS_MODE"),
        ({"FEATURES_REDIS_MODE": "sentinel"}, "FEATURES_REDIS_NODES"),
        ({"FEATURES_REDIS_NODES": "h1:7000,h2"}, "FEATURES_REDIS_NODES"),
    ]:
        with pytest.raises(ValueError, match=key):
            Settings.from_env(env)


async def test_unreachable_cluster_gives_defaults_not_errors() -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_mode="cluster",
        redis_nodes=f"127.0.0.1:{free_port()}",
    )
    client = open_redis(settings)
    try:
        started = time.perf_counter()
        rows = await FeatureStore(client).read([tx(1)])
        assert time.perf_counter() - started < 1.0
        for read in rows.reads[0].values():
            assert (read.source, read.reason) == (Source.DEFAULT, Reason.UNAVAILABLE)
    finally:
        await client.aclose()


async def test_failed_slot_map_reloads_warn_once_per_interval(caplog) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        redis_mode="cluster",
        redis_nodes=f"127.0.0.1:{free_port()}",
        error_log_interval_s=60.0,
    )
    client = open_redis(settings)
    try:
        with caplog.at_level(logging.DEBUG, logger="features.connection"):
            for _ in range(2):
                await FeatureStore(client).read([tx(1)])  # fails, and schedules a reload
                reload = getattr(client, "_refresh", None)
                assert reload is not None
                await reload
                await asyncio.sleep(SLOT_MAP_REFRESH_INTERVAL_S)  # the next may start
        logged = [r for r in caplog.records if "slot map reload failed" in r.getMessage()]
        assert [r.levelno for r in logged] == [logging.WARNING]  # the second within 60 s
    finally:
        await client.aclose()


def _other_master(cluster: LocalCluster, key: str) -> RedisServer:
    owner = cluster.master_of(key)
    roles = cluster.roles()
    return next(s for s in cluster.alive() if roles[s.port] == "master" and s is not owner)


def _start_migration(slot: int, source: int, target: int) -> bytes:
    """Move a slot's keys as `redis-cli --cluster reshard` does, but leave the slot with
    `source` (which now answers ASK for them); returns the target's node id."""
    src: Any = redis.Redis("127.0.0.1", source)
    dst: Any = redis.Redis("127.0.0.1", target)
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    return bytes(dst_id)


def _finish_migration(slot: int, target_id: bytes, cluster: LocalCluster) -> None:
    for port, role in cluster.roles().items():
        if role == "master":
            node: Any = redis.Redis("127.0.0.1", port)
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


# --- failover under traffic, through the real BentoML service -------------------------


def traffic_through_failover(
    svc: Service,
    user: str,
    kill: Callable[[], None],
    wait_promoted: Callable[[], None],
    duration_s: float,
) -> dict[str, float]:
    """Send /predict for `user` before, during and after a kill; return the timings."""
    statuses: list[int] = []
    served: list[tuple[float, str, float]] = []  # (t since kill, user source, latency)
    server_ms: list[float] = []  # the service's own features_ms
    body = {"user_id": user, "merchant_id": "m0", "amount": 10.0}
    with httpx.Client(base_url=svc.url, timeout=10) as http:
        for _ in range(20):
            assert http.post("/predict", json=body).json()["sources"]["user:features"][
                "source"
            ] in ("redis", "cache")
        killed_at = time.monotonic()
        kill()
        while time.monotonic() - killed_at < duration_s:
            started = time.monotonic()
            r = http.post("/predict", json=body)
            statuses.append(r.status_code)
            source = r.json()["sources"]["user:features"]["source"] if r.is_success else "5xx"
            server_ms.append(r.json()["timings"]["features_ms"] if r.is_success else -1.0)
            now = time.monotonic() - killed_at
            served.append((started - killed_at, source, time.monotonic() - started))
            seen_default = [t for t, s, _ in served if s == "default"]
            if seen_default and now - max(seen_default) > 1.5:
                break  # served from Redis again for 1.5 s: recovered
            time.sleep(0.01)
        wait_promoted()
    assert set(statuses) == {200}, f"non-200 responses: {sorted(set(statuses))}"
    defaults = [t for t, s, _ in served if s == "default"]
    assert defaults, "the kill was never noticed"
    last_default = max(defaults)
    after = [s for t, s, _ in served if t > last_default]
    assert after and set(after) <= {"redis", "cache"}
    timings = {
        "requests": len(served),
        "first_default_s": min(defaults),
        "window_s": last_default,
        "defaults": len(defaults),
        "max_latency_ms": 1e3 * max(lat for _, _, lat in served),
        "max_latency_at_s": max(served, key=lambda x: x[2])[0],
        "its_features_ms": server_ms[max(range(len(served)), key=lambda i: served[i][2])],
        "max_features_ms": max(server_ms),
        "median_latency_ms": 1e3 * statistics.median(lat for _, _, lat in served),
        "max_latency_in_window_ms": 1e3 * max(lat for t, _, lat in served if t <= last_default),
    }
    print(f"\nfailover of {user}'s master: {timings}")
    return timings


@pytest.mark.e2e
def test_cluster_failover_under_traffic_no_5xx(bentoml_home: Path) -> None:
    with LocalCluster() as cluster:
        seeder = SyncRedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        user = "f1"
        key = USER_FEATURES.key(user)
        seeder.hset(key, mapping={"tx_count_1h": 5})
        seeder.expire(key, 3600)
        victim = cluster.master_of(key)
        assert redis.Redis("127.0.0.1", victim.port).wait(1, 2000) == 1  # on the replica too
        svc = Service(
            bentoml_home,
            cluster.url,
            FEATURES_REDIS_MODE="cluster",
            FEATURES_REDIS_NODES=cluster.nodes,
            FEATURES_CACHE_TTL_S="0.02",  # so that reads reach Redis
            FEATURES_REDIS_SOCKET_TIMEOUT_S="0.25",
            FEATURES_REDIS_CLUSTER_DEADLINE_S="0.5",
        ).start()
        try:
            timings = traffic_through_failover(
                svc, user, victim.kill, lambda: cluster.wait_promoted(victim), duration_s=8
            )
        finally:
            svc.stop()
        seeder.close()
    assert timings["window_s"] < 8
    assert timings["max_latency_ms"] < 1000


async def write_through_sentinel(sentinel: LocalSentinel) -> None:
    client = open_redis(sentinel_settings(sentinel))
    try:
        await FeatureWriter(client).write(USER_FEATURES, [("s1", {"tx_count_1h": 5})])
        rows = await FeatureStore(client).read([{"user": "s1", "merchant": "m"}])
        assert rows.values[0, COLUMN["tx_count_1h"]] == 5
        assert rows.reads[0]["merchant:risk"].reason is Reason.MISSING
    finally:
        await client.aclose()


@pytest.mark.e2e
def test_sentinel_failover_under_traffic_no_5xx(bentoml_home: Path) -> None:
    with LocalSentinel() as sentinel:
        assert sentinel.master is not None
        asyncio.run(write_through_sentinel(sentinel))
        master = redis.Redis("127.0.0.1", sentinel.master.port)
        assert master.hget(USER_FEATURES.key("s1"), "tx_count_1h") == b"5"
        assert master.wait(1, 2000) == 1  # on the replica too
        old_port = sentinel.master.port
        svc = Service(
            bentoml_home,
            "redis://unused/0",
            FEATURES_REDIS_MODE="sentinel",
            FEATURES_REDIS_NODES=sentinel.nodes,
            FEATURES_REDIS_SENTINEL_SERVICE=sentinel.service,
            FEATURES_CACHE_TTL_S="0.02",
            FEATURES_REDIS_SOCKET_TIMEOUT_S="0.25",
        ).start()
        try:
            timings = traffic_through_failover(
                svc,
                "s1",
                sentinel.master.kill,
                lambda: sentinel.wait_promoted(old_port),
                duration_s=8,
            )
        finally:
            svc.stop()
    assert timings["window_s"] < 8
    assert timings["max_latency_ms"] < 1000
