"""Shared fixtures: a real redis-server on loopback, clients, a fake clock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from features import Settings, open_redis
from tools.redis_server import RedisServer

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(quiet=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    # Loopback on a busy 2-core VM: allow for scheduling hiccups in tests.
    return Settings(redis_url=redis_url, redis_socket_timeout_s=1.0, redis_pool_timeout_s=1.0)


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
async def client(settings: Settings, sync_redis: redis.Redis) -> AsyncIterator[aioredis.Redis]:
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


def command_calls(client: redis.Redis, command: str) -> int:
    """How many times the server ran `command` since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0
