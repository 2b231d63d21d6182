"""Shared fixtures: a real redis-server and backing-store emulators on loopback, clients,
a fake clock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.connection import Connection

from features import (
    HASH_GROUPS,
    MERCHANT_EMBEDDING,
    USER_ACTIVITY,
    USER_MERCHANTS,
    Feature,
    FeatureWriter,
    Settings,
    open_redis,
)
from features.connection import Client
from features.online.structures import pack_embedding
from tools.bento_server import BentoServer
from tools.emulators import BigtableEmulator, Dynalite, EmulatorMissing
from tools.redis_cluster import LocalSentinel
from tools.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(quiet=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def quiet_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own: tests that count the server's socket reads need
    one no other client (a session service's heartbeat, say) talks to meanwhile."""
    with RedisServer(quiet=True) as server:
        yield server


@pytest.fixture(params=[False, True], ids=["pool", "multiplex"])
def multiplex(request: pytest.FixtureRequest) -> bool:
    """FeatureStore's two read paths: redis-py's pool, or the multiplexed connection the
    service reads through (features/online/multiplex.py). A test asking for it runs on both."""
    return bool(request.param)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    # Loopback on a busy 2-core VM: allow for scheduling hiccups in tests.
    return Settings(
        redis_url=redis_url,
        redis_socket_timeout_s=1.0,
        redis_pool_timeout_s=1.0,
        redis_connect_timeout_s=1.0,
    )


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    """Direct access for arranging and inspecting data; flushes the db after each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.config_resetstat()
    yield client
    client.flushall()
    client.close()


@pytest.fixture
async def client(settings: Settings, sync_redis: redis.Redis) -> AsyncIterator[Client]:
    client = open_redis(settings)
    yield client
    await client.aclose()


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def entity_features(entity: str) -> list[Feature]:
    """Every feature of `entity` stored in a hash, over all its hashes, in GROUPS order."""
    return [f for g in HASH_GROUPS if g.entity == entity for f in g.features]


async def write_entities(
    writer: FeatureWriter, entity: str, rows: list[tuple[str, dict[str, Any]]]
) -> None:
    """Write flat {feature: value} rows of `entity` into each of its hashes they touch."""
    for group in HASH_GROUPS:
        if group.entity != entity:
            continue
        fields = set(group.field_names)
        part = [(i, {k: v for k, v in values.items() if k in fields}) for i, values in rows]
        part = [(i, values) for i, values in part if values]
        if part:
            await writer.write(group, part)


EMBEDDING = [round(0.25 * i - 1.0, 2) for i in range(MERCHANT_EMBEDDING.dim)]
"""The embedding structure_commands stores: exact in float32."""
PAID_AGO_S = 3600.0
"""How long before `now` each seeded user paid each seeded merchant."""


def structure_commands(
    users: Sequence[str], merchants: Sequence[str], now: float | None = None
) -> list[tuple[str | bytes | float, ...]]:
    """Commands seeding the structures: per user, one transaction inside the last 10
    minutes and one outside them, and every merchant paid PAID_AGO_S ago; per merchant,
    EMBEDDING. Each key gets its TTL."""
    now = time.time() if now is None else now
    commands: list[tuple[str | bytes | float, ...]] = []
    for user in users:
        activity, paid = USER_ACTIVITY.key(user), USER_MERCHANTS.key(user)
        commands.append(("ZADD", activity, now - 30, f"{user}-t1", now - 1200, f"{user}-t0"))
        commands.append(("EXPIRE", activity, USER_ACTIVITY.ttl_s))
        if merchants:
            pairs = [part for m in merchants for part in (now - PAID_AGO_S, m)]
            commands.append(("ZADD", paid, *pairs))
            commands.append(("EXPIRE", paid, USER_MERCHANTS.ttl_s))
    for merchant in merchants:
        key = MERCHANT_EMBEDDING.key(merchant)
        commands.append(("SET", key, pack_embedding(EMBEDDING), "EX", MERCHANT_EMBEDDING.ttl_s))
    return commands


async def write_structures(
    client: Client, users: Sequence[str], merchants: Sequence[str], now: float | None = None
) -> None:
    """structure_commands() in one pipeline."""
    async with client.pipeline(transaction=False) as pipe:
        for command in structure_commands(users, merchants, now):
            pipe.execute_command(*command)
        await pipe.execute()


def sentinel_settings(sentinel: LocalSentinel) -> Settings:
    """Settings that find `sentinel`'s master through its sentinels."""
    return Settings(
        redis_mode="sentinel",
        redis_nodes=sentinel.nodes,
        redis_sentinel_service=sentinel.service,
        redis_socket_timeout_s=1.0,
    )


def command_calls(client: redis.Redis, command: str) -> int:
    """How many times the server ran `command` since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


class SocketWrites:
    """How many writes redis-py's asyncio connections made to their sockets."""

    def __init__(self) -> None:
        self.count = 0


@contextmanager
def socket_writes() -> Iterator[SocketWrites]:
    """Count the socket writes of every asyncio redis-py connection (a whole pipeline is
    one) while the block runs: one write is one round trip."""
    writes = SocketWrites()
    original = Connection.send_packed_command

    async def counting(self: Connection, command: object, check_health: bool = True) -> None:
        writes.count += 1
        await original(self, command, check_health)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Connection, "send_packed_command", counting)
        yield writes


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A BentoML home holding a small model trained for the tests."""
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "models.train", "--rows", "20000", "--epochs", "3"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    yield home


class Service(BentoServer):
    """`bentoml serve` of the test model against `redis_url`, its log in `home`.

    Each service runs in a BentoML home of its own that links to `home`'s model store:
    `bentoml serve` empties its home's prometheus_multiproc_dir when it starts, and its
    /metrics reports every file in there, so services sharing a home would erase and mix
    each other's metrics.
    """

    def __init__(self, home: Path, redis_url: str, **env: str) -> None:
        port = free_port()
        own_home = home / f"serve-{port}"
        own_home.mkdir(exist_ok=True)
        if not (own_home / "models").is_symlink():
            (own_home / "models").symlink_to(home / "models")
        super().__init__(
            {
                "BENTOML_HOME": str(own_home),
                "FEATURES_REDIS_URL": redis_url,
                # Functional tests check what each fault is answered with; a 15 ms deadline
                # on a busy 2-vCPU runner would turn some into `deadline`. tests/test_deadline.py
                # tests the deadline itself, and `make bench` measures the default.
                "FEATURES_DEADLINE_S": "1.0",
                "FRAUD_REQUEST_TIMEOUT_S": "10",
                # The same reason: with a 1 s deadline, a fault would look like overload.
                "FRAUD_ADMISSION_TARGET_MS": "2000",
                **env,
            },
            port=port,
            log=home / f"serve-{port}.log",
        )


@pytest.fixture(scope="session")
def service(bentoml_home: Path, redis_url: str) -> Iterator[Service]:
    svc = Service(bentoml_home, redis_url).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def dynalite() -> Iterator[Dynalite]:
    """One dynalite (DynamoDB API) server for the session; tests use their own tables."""
    with Dynalite() as server:
        yield server


@pytest.fixture(scope="session")
def bigtable_emulator() -> Iterator[BigtableEmulator]:
    """One cbtemulator for the session; the client library finds it through the env."""
    try:
        emulator = BigtableEmulator().start()
    except EmulatorMissing as exc:
        pytest.skip(f"Bigtable emulator unavailable: {exc}")
    previous = os.environ.get("BIGTABLE_EMULATOR_HOST")
    os.environ["BIGTABLE_EMULATOR_HOST"] = emulator.host
    yield emulator
    if previous is None:
        del os.environ["BIGTABLE_EMULATOR_HOST"]
    else:
        os.environ["BIGTABLE_EMULATOR_HOST"] = previous
    emulator.stop()
