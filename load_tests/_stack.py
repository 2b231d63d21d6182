"""What the fault and soak scenarios run against: their own redis-server with demo data,
a trained model, and `bentoml serve` on free loopback ports. Everything stops on exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tools.bento_server import BentoServer
from tools.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "load_tests" / "results"


async def paced(rate: float, end: float) -> AsyncIterator[None]:
    """Yield `rate` times a second until monotonic time `end`, on a fixed schedule: a
    slow request delays the next one, never the rate after it."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while (now := time.monotonic()) < end:
        if now < next_at:
            await asyncio.sleep(next_at - now)
        next_at += interval
        yield


@dataclass
class Stack:
    """A running service and the redis-server behind it."""

    redis: RedisServer
    server: BentoServer


def _run(*args: str, env: dict[str, str]) -> None:
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


@contextmanager
def stack(users: int, merchants: int, *, workers: int, **service_env: str) -> Iterator[Stack]:
    """Start redis-server, load demo features, train the model if missing, serve."""
    env = {
        **os.environ,
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(ROOT / ".bentoml")),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    with RedisServer(quiet=True) as redis:
        env["FEATURES_REDIS_URL"] = redis.url
        print(f"redis-server {redis.url}; loading {users} users, {merchants} merchants")
        _run(sys.executable, "-m", "features.offline.load", "--demo", "--users", str(users),
             "--merchants", str(merchants), env=env)  # fmt: skip
        _run(sys.executable, "-m", "models.train", "--if-missing", env=env)
        port = free_port()
        log = RESULTS / f"serve-{port}.log"
        server = BentoServer({**env, **service_env}, port=port, workers=workers, log=log)
        with server:
            print(f"bentoml serve {server.url} ready in {server.startup_s:.1f} s "
                  f"(log {log.relative_to(ROOT)})")  # fmt: skip
            yield Stack(redis, server)


def one_worker_env(redis_url: str) -> dict[str, str]:
    """This process's environment for one `bentoml serve` worker reading `redis_url`."""
    return {
        **os.environ,
        "FEATURES_REDIS_URL": redis_url,
        "FRAUD_WORKERS": "1",
        "BENTOML_DO_NOT_TRACK": "true",
    }


def scrape(port: int) -> str:
    """The /metrics page of the service on 127.0.0.1:`port`."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return response.text
