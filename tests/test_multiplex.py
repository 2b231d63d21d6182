"""The multiplexed connection (features/online/multiplex.py) against real redis-servers:
one write for concurrent reads, replies in order, replies after a timeout or a caller's
give-up, reconnects, AUTH, SELECT, TLS and Sentinel."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features import (
    MERCHANT_RISK,
    USER_FEATURES,
    FeatureStore,
    FeatureWriter,
    Reason,
    Settings,
    Source,
    open_redis,
    open_store,
)
from features.online.multiplex import Multiplexed, hmget_packer, pack
from tests.conftest import sentinel_settings
from tests.test_security import (
    PASSWORD,
    READER,
    READER_PASSWORD,
    REFUSALS,
    SECRETS,
    TLSRedis,
    tls_redis,
)
from tools.delay_proxy import DelayProxy
from tools.redis_server import RedisServer

__all__ = ["tls_redis"]  # a fixture, imported for the TLS tests

FIELDS = ("a", "b", "_ts")
HMGET = hmget_packer(FIELDS)
CLIENT_ID = pack("CLIENT", "ID")


def settings_for(url: str, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"redis_url": url, "redis_socket_timeout_s": 1.0}
    return Settings(**(options | overrides))


def connect(settings: Settings) -> tuple[aioredis.Redis, Multiplexed]:
    """A client as open_redis builds it, and a multiplexed connection with its options."""
    client = open_redis(settings)
    assert isinstance(client, aioredis.Redis)
    return client, Multiplexed.for_client(client)


@pytest.fixture
async def mux(redis_url: str, sync_redis: redis.Redis) -> AsyncIterator[Multiplexed]:
    client, connection = connect(settings_for(redis_url))
    yield connection
    await connection.aclose()
    await client.aclose()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    with DelayProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


async def hmget(connection: Multiplexed, *keys: str) -> list[Any]:
    return await connection.request(b"".join(HMGET(k) for k in keys), len(keys))


async def client_id(connection: Multiplexed) -> int:
    (reply,) = await connection.request(CLIENT_ID, 1)
    return int(reply)


def stat(admin: redis.Redis, name: str) -> int:
    return int(admin.info("stats")[name])


def test_hmget_is_packed_as_hiredis_packs_it() -> None:
    for key in ("user:{u1}:features", "k", "x" * 300):
        assert HMGET(key) == pack("HMGET", key, *FIELDS)


async def test_reads_of_one_loop_iteration_go_out_in_one_write(quiet_redis: RedisServer) -> None:
    client, mux = connect(settings_for(quiet_redis.url))
    sync_redis = redis.Redis.from_url(quiet_redis.url)
    try:
        await _one_write_per_iteration(mux, sync_redis)
    finally:
        await mux.aclose()
        await client.aclose()
        sync_redis.close()


async def _one_write_per_iteration(mux: Multiplexed, sync_redis: redis.Redis) -> None:
    for i in range(20):
        sync_redis.hset(f"k{i}", mapping={"a": i, "b": -i})
    await mux.connect()
    # The server counts the socket reads it makes: one per write of ours (a few KB on
    # loopback), plus one for each INFO.
    before = stat(sync_redis, "total_reads_processed")
    replies = await asyncio.gather(*(hmget(mux, f"k{i}", f"k{i + 1}") for i in range(19)))
    assert stat(sync_redis, "total_reads_processed") - before == 1 + 1
    for i, reply in enumerate(replies):  # each caller got its own, in order
        assert reply == [[b"%d" % i, b"%d" % -i, None], [b"%d" % (i + 1), b"%d" % -(i + 1), None]]
    assert int(sync_redis.info("commandstats")["cmdstat_hmget"]["calls"]) == 38

    before = stat(sync_redis, "total_reads_processed")
    for i in range(3):  # one after the other: a write each
        assert await hmget(mux, f"k{i}") == [[b"%d" % i, b"%d" % -i, None]]
    assert stat(sync_redis, "total_reads_processed") - before == 3 + 1


async def test_many_concurrent_readers_each_get_their_own_replies(
    mux: Multiplexed, sync_redis: redis.Redis
) -> None:
    pipe = sync_redis.pipeline(transaction=False)
    for i in range(500):
        pipe.hset(f"r{i}", mapping={"a": i, "b": "x" * (i % 50)})
    pipe.execute()

    async def one(i: int) -> None:
        await asyncio.sleep(0.001 * (i % 7))  # spread over several loop iterations
        keys = [f"r{(i + j) % 500}" for j in range(i % 5 + 1)]
        replies = await hmget(mux, *keys)
        assert [r[0] for r in replies] == [k[1:].encode() for k in keys]

    await asyncio.gather(*(one(i) for i in range(500)))


async def test_error_replies_are_values_and_later_replies_stay_in_place(
    mux: Multiplexed, sync_redis: redis.Redis
) -> None:
    sync_redis.set("s", "not a hash")
    sync_redis.hset("h", "a", "1")
    wrong, right = await hmget(mux, "s", "h")
    assert isinstance(wrong, redis.ResponseError) and "WRONGTYPE" in str(wrong)
    assert right == [b"1", None, None]
    assert await hmget(mux, "h") == [[b"1", None, None]]


async def test_a_reply_its_caller_gave_up_on_does_not_shift_later_replies(
    proxy: DelayProxy, sync_redis: redis.Redis
) -> None:
    sync_redis.hset("late", "a", "late")
    sync_redis.hset("next", "a", "next")
    client, connection = connect(settings_for(proxy.url()))
    try:
        first = await client_id(connection)
        proxy.set_delay(0.2)
        with pytest.raises(TimeoutError):  # the caller's own deadline, not the socket's
            await asyncio.wait_for(hmget(connection, "late"), 0.02)
        cancelled = asyncio.ensure_future(hmget(connection, "late", "late"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        proxy.set_delay(0)
        for _ in range(3):  # behind the two dropped reads' replies, on the same socket
            assert await hmget(connection, "next") == [[b"next", None, None]]
        assert await client_id(connection) == first
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_late_deadline_reply_does_not_shift_the_next_reads_of_a_store(
    proxy: DelayProxy, sync_redis: redis.Redis
) -> None:
    client = open_redis(settings_for(proxy.url()))
    await FeatureWriter(client).write(USER_FEATURES, [("u1", {"tx_count_1h": 1})])
    await FeatureWriter(client).write(USER_FEATURES, [("u2", {"tx_count_1h": 2})])
    store = FeatureStore(client, deadline_s=0.015, multiplex=True)
    try:
        await store.open()
        proxy.set_delay(0.1)
        rows = await store.read([{"user": "u1", "merchant": "m"}])
        assert rows.reads[0]["user:features"].reason is Reason.DEADLINE
        proxy.set_delay(0)
        await asyncio.sleep(0.15)  # u1's late reply lands (one socket: nothing passes it)
        for user, value in (("u2", 2.0), ("u3", 0.0), ("u2", 2.0)):
            rows = await store.read([{"user": user, "merchant": "m"}])
            assert rows.values[0, 0] == value, user
        rows = await store.read([{"user": "u1", "merchant": "m"}])
        assert rows.reads[0]["user:features"].source is Source.CACHE  # filled late
        assert rows.values[0, 0] == 1.0
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_socket_timeout_fails_every_read_in_flight_then_reconnects(
    proxy: DelayProxy, sync_redis: redis.Redis
) -> None:
    sync_redis.hset("h", "a", "1")
    client, connection = connect(settings_for(proxy.url(), redis_socket_timeout_s=0.05))
    try:
        first = await client_id(connection)
        proxy.set_delay(0.3)
        reads = [asyncio.ensure_future(hmget(connection, "h")) for _ in range(3)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert loop.time() - started < 0.25
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert "Timeout reading from" in str(results[0])
        proxy.set_delay(0)
        assert await hmget(connection, "h") == [[b"1", None, None]]
        assert await client_id(connection) != first  # a new connection
    finally:
        await connection.aclose()
        await client.aclose()


async def test_reconnects_after_the_server_is_killed_and_restarted() -> None:
    with RedisServer(quiet=True) as server:
        admin = redis.Redis(port=server.port)
        admin.hset("h", "a", "1")
        admin.save()
        client, connection = connect(settings_for(server.url, redis_connect_timeout_s=0.2))
        try:
            assert await hmget(connection, "h") == [[b"1", None, None]]
            server.kill()
            with pytest.raises(RedisConnectionError):  # the socket's EOF, or a reset
                await hmget(connection, "h")
            # Down: the reads that come meanwhile share one connect, and its error.
            results = await asyncio.gather(
                *(hmget(connection, "h") for _ in range(10)), return_exceptions=True
            )
            assert all(isinstance(r, RedisConnectionError) for r in results)
            assert len({id(r) for r in results}) == 1
            assert f"connecting to 127.0.0.1:{server.port}" in str(results[0])
            server.start()
            assert await hmget(connection, "h") == [[b"1", None, None]]
            # Killed and back before the loop noticed: the reads sent on the dead socket
            # fail, the next one reconnects, once.
            server.kill()
            server.start()
            before = stat(admin, "total_connections_received")
            results = await asyncio.gather(
                *(hmget(connection, "h") for _ in range(10)), return_exceptions=True
            )
            assert all(isinstance(r, RedisConnectionError) for r in results), results
            assert await hmget(connection, "h") == [[b"1", None, None]]
            assert stat(admin, "total_connections_received") == before + 1
        finally:
            await connection.aclose()
            await client.aclose()
            admin.close()


async def test_one_connect_for_many_concurrent_first_reads(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    client, connection = connect(settings_for(redis_url))
    try:
        before = stat(sync_redis, "total_connections_received")
        replies = await asyncio.gather(*(hmget(connection, "none") for _ in range(50)))
        assert replies == [[[None, None, None]]] * 50
        assert stat(sync_redis, "total_connections_received") == before + 1
    finally:
        await connection.aclose()
        await client.aclose()


async def test_reads_after_close_fail_at_once(mux: Multiplexed) -> None:
    await mux.connect()
    await mux.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await hmget(mux, "h")


async def test_auth_and_select_from_the_url_and_from_settings() -> None:
    password = "pw-Mux-41c9"
    with RedisServer(extra_args=["--requirepass", password], quiet=True) as server:
        admin = redis.Redis(port=server.port, password=password, db=3)
        admin.hset("h", "a", "db3")
        admin.acl_setuser(
            "reader", enabled=True, passwords=["+pw-r"], keys=["*"], commands=["+@all"]
        )
        at = f"127.0.0.1:{server.port}/3"
        ways: list[tuple[str, dict[str, str]]] = [
            (f"redis://:{password}@{at}", {}),
            (f"redis://{at}", {"redis_password": password}),
            (f"redis://reader:pw-r@{at}", {}),
            (f"redis://{at}", {"redis_username": "reader", "redis_password": "pw-r"}),
        ]
        for url, overrides in ways:
            client, connection = connect(settings_for(url, **overrides))
            try:
                assert await hmget(connection, "h") == [[b"db3", None, None]], url
            finally:
                await connection.aclose()
                await client.aclose()
        client, connection = connect(settings_for(server.url, redis_password="wrong"))
        try:
            with pytest.raises(AuthenticationError):
                await hmget(connection, "h")
            with pytest.raises(AuthenticationError):  # and again, on a new connection
                await connection.ping()
        finally:
            await connection.aclose()
            await client.aclose()
        admin.close()


async def test_tls_with_client_certificate_and_password(tls_redis: TLSRedis) -> None:
    for settings in (
        tls_redis.settings(redis_password=PASSWORD),
        tls_redis.settings(tls_redis.url(f"{READER}:{READER_PASSWORD}")),
    ):
        client = open_redis(settings)
        store = FeatureStore(client, multiplex=True)
        try:
            await store.open()
            rows = await store.read([{"user": "u1", "merchant": "m1"}])
        finally:
            await store.aclose()
            await client.aclose()
        read = rows.reads[0]["user:features"]
        assert (read.source, read.reason, rows.values[0, 0]) == (Source.REDIS, Reason.INVALID, 7.0)


@pytest.mark.parametrize("refusal", REFUSALS)
async def test_refused_tls_connections_serve_defaults_and_leak_no_secret(
    tls_redis: TLSRedis, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = open_redis(tls_redis.refused(refusal))
    store = FeatureStore(client, multiplex=True)
    try:
        with caplog.at_level(logging.WARNING, logger="features.online.redis_tier"):
            rows = await store.read([{"user": "u1", "merchant": "m1"}])
    finally:
        await store.aclose()
        await client.aclose()
    read = rows.reads[0]["user:features"]
    assert (read.source, read.reason) == (Source.DEFAULT, Reason.UNAVAILABLE)
    assert "Redis read failed" in caplog.text
    assert re.search(REFUSALS[refusal][1], caplog.text), caplog.text
    for secret in SECRETS:
        assert secret not in caplog.text


async def test_sentinel_master_is_resolved_at_connect() -> None:
    from tools.redis_cluster import LocalSentinel

    with LocalSentinel() as sentinel:
        assert sentinel.master is not None
        redis.Redis(port=sentinel.master.port).hset(MERCHANT_RISK.key("s1"), "mcc_risk_score", 1)
        client = open_redis(sentinel_settings(sentinel))
        store = FeatureStore(client, multiplex=True)
        try:
            rows = await store.read([{"user": "s1", "merchant": "s1"}])
        finally:
            await store.aclose()
            await client.aclose()
        assert rows.reads[0]["merchant:risk"].source is Source.REDIS


def test_under_uvloop_as_the_service_runs(
    proxy: DelayProxy, sync_redis: redis.Redis, tls_redis: TLSRedis
) -> None:
    import uvloop

    for i in range(10):
        sync_redis.hset(f"k{i}", "a", i)

    async def scenario() -> None:
        client, connection = connect(settings_for(proxy.url(), redis_socket_timeout_s=0.05))
        try:
            replies = await asyncio.gather(*(hmget(connection, f"k{i}") for i in range(10)))
            assert [r[0][0] for r in replies] == [b"%d" % i for i in range(10)]
            first = await client_id(connection)
            proxy.set_delay(0.2)
            with pytest.raises(RedisTimeoutError):
                await hmget(connection, "k1")
            proxy.set_delay(0)
            assert await hmget(connection, "k2") == [[b"2", None, None]]
            assert await client_id(connection) != first
        finally:
            await connection.aclose()
            await client.aclose()
        client, connection = connect(tls_redis.settings(redis_password=PASSWORD))
        try:
            assert (await hmget(connection, "user:{u1}:features"))[0][0] is None
        finally:
            await connection.aclose()
            await client.aclose()

    uvloop.run(scenario())


async def test_the_service_store_reads_over_its_own_connection(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """open_store (what the service builds) reads without a pooled connection."""
    settings = settings_for(redis_url, redis_max_connections=2, redis_pool_timeout_s=0.01)
    client, _ = connect(settings)
    await FeatureWriter(client).write(USER_FEATURES, [("u1", {"tx_count_1h": 4})])
    store = open_store(settings, client)
    pool = client.connection_pool
    held = [await pool.get_connection() for _ in range(2)]  # type: ignore[no-untyped-call]
    try:
        await store.open()
        rows = await store.read([{"user": "u1", "merchant": "m1"}])
        assert rows.reads[0]["user:features"].source is Source.REDIS
        assert rows.values[0, 0] == 4.0
    finally:
        for connection in held:
            await pool.release(connection)
        await store.aclose()
        await client.aclose()


async def test_request_then_answers_inside_the_parsing_callback(
    proxy: DelayProxy, sync_redis: redis.Redis
) -> None:
    # No future and no task: `then` runs in data_received, in order, and a connection's
    # failure reaches it as the error.
    sync_redis.hset("h", "a", "1")
    client, connection = connect(settings_for(proxy.url(), redis_socket_timeout_s=0.05))
    got: list[Any] = []
    try:
        await client_id(connection)
        payload = HMGET("h") + HMGET("absent")
        connection.request_then(payload, 2, got.append)
        connection.request_then(HMGET("h"), 1, got.append)
        assert await hmget(connection, "h") == [[b"1", None, None]]  # queued behind them
        assert got == [[[b"1", None, None], [None, None, None]], [[b"1", None, None]]]
        proxy.set_delay(0.3)
        connection.request_then(HMGET("h"), 1, got.append)
        with pytest.raises(RedisTimeoutError):
            await hmget(connection, "h")
        assert isinstance(got[2], RedisTimeoutError)
        proxy.set_delay(0)
        await connection.aclose()
        connection.request_then(HMGET("h"), 1, got.append)  # closed: the error, soon after
        assert len(got) == 3
        await asyncio.sleep(0)
        assert isinstance(got[3], RedisConnectionError)
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_callback_that_raises_leaves_the_connection_working(
    mux: Multiplexed, sync_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    sync_redis.hset("h", "a", "1")

    def broken(_: object) -> None:
        raise RuntimeError("a bug in the caller")

    mux.request_then(HMGET("h"), 1, broken)
    with caplog.at_level(logging.ERROR, logger="features.online.multiplex"):
        assert await hmget(mux, "h") == [[b"1", None, None]]
    assert "a bug in the caller" in caplog.text


async def test_a_store_read_on_the_multiplexed_connection_needs_no_task(
    client: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    await FeatureWriter(client).write(USER_FEATURES, [("u1", {"tx_count_1h": 4})])
    store = FeatureStore(client, multiplex=True)
    try:
        await store.open()
        read = asyncio.ensure_future(store.read([{"user": "u1", "merchant": "m1"}]))
        await asyncio.sleep(0)  # the request runs until it waits for Redis
        assert store._started == 1 and not store._reads
        rows = await read
        assert rows.values[0, 0] == 4.0 and rows.reads[0]["user:features"].source is Source.REDIS
        assert store._started == 0 and not store._reads
        # Keys Redis cannot answer go on to the next tier in a task (tests/test_backing,
        # test_invalidation's held backing store); with none, they get their defaults
        # in the same callback: no task, no loop iteration more.
        spawned: list[object] = []
        spawn = store._spawn

        def counted(fetch: Any) -> None:
            spawned.append(fetch)
            spawn(fetch)

        store._spawn = counted  # type: ignore[method-assign]
        unknown = await store.read([{"user": "nobody", "merchant": "nowhere"}])
        assert unknown.reads[0]["user:features"].reason is Reason.MISSING
        assert unknown.reads[0]["merchant:risk"].source is Source.DEFAULT
        assert not spawned and store._started == 0
    finally:
        await store.aclose()
