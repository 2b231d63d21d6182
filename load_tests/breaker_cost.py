"""What a read costs while the breaker is open: python -m load_tests.breaker_cost.

FeatureStore.read of one uncached row, in process, with the breaker held open against a
port where nothing listens. Prints wall and thread-CPU time per read (the difference is
time the OS gave to other processes).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import numpy as np

from features import CircuitBreaker, FeatureStore, Reason, Settings, open_redis
from load_tests.stats import quantile
from tools.redis_server import free_port


async def measure(n: int) -> None:
    client = open_redis(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    store = FeatureStore(client, breaker=CircuitBreaker(failure_threshold=1, reset_s=3600))
    await store.read([{"user": "warm", "merchant": "up"}])  # refused: opens the breaker
    wall, cpu = np.empty(n), np.empty(n)
    for i in range(n):
        rows = [{"user": f"u{i}", "merchant": f"m{i}"}]
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        read = await store.read(rows)
        cpu[i], wall[i] = time.thread_time_ns() - c0, time.perf_counter_ns() - w0
        assert read.reads[0]["user:features"].reason is Reason.CIRCUIT_OPEN
    await client.aclose()
    for name, ns in (("wall", wall), ("thread cpu", cpu)):
        ms = ns / 1e6
        print(
            f"{name}: n={n} p50={quantile(ms, 0.5):.4f} ms "
            f"p99={quantile(ms, 0.99):.4f} ms max={ms.max():.3f} ms"
        )


if __name__ == "__main__":
    logging.disable(logging.WARNING)  # the one refused connection
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
