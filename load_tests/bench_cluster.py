"""Batch reads on a 3-master Redis Cluster vs one standalone node, in the same run.

`python -m load_tests.bench_cluster [--samples 2000]`: starts both on loopback, seeds
100 users and 100 merchants, and times reading a batch of 100 transactions (200 keys,
spanning all masters) as a raw pipeline and through FeatureStore (cache off). The
third cluster row runs the per-node pipelines one after another instead of in parallel.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio.cluster import RedisCluster

from features import (
    HASH_GROUPS,
    MERCHANT_RISK,
    USER_FEATURES,
    FeatureStore,
    FeatureWriter,
    Settings,
)
from features.connection import Client, open_redis
from load_tests.stats import quantile
from tools.redis_cluster import LocalCluster
from tools.redis_server import RedisServer

BATCH = 100


def rows() -> list[dict[str, str]]:
    return [{"user": f"u{i}", "merchant": f"m{i}"} for i in range(BATCH)]


def keys() -> list[tuple[str, tuple[str, ...]]]:
    return [(g.key(row[g.entity]), g.field_names) for row in rows() for g in HASH_GROUPS]


async def raw_pipeline(client: Client) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for key, fields in keys():
            pipe.hmget(key, fields)
        await pipe.execute()


async def per_node_in_turn(client: Client) -> None:
    """The same commands, one node's pipeline after another (what parallel fan-out saves)."""
    assert isinstance(client, RedisCluster)
    by_node: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for key, fields in keys():
        node = client.get_node_from_key(key)
        assert node is not None
        by_node.setdefault(node.name, []).append((key, fields))
    for batch in by_node.values():
        async with client.pipeline(transaction=False) as pipe:
            for key, fields in batch:
                pipe.hmget(key, fields)
            await pipe.execute()


Variant = tuple[str, Callable[[], Awaitable[object]]]


async def variants(name: str, client: Client) -> list[Variant]:
    writer = FeatureWriter(client)
    await writer.write(USER_FEATURES, [(f"u{i}", {"tx_count_1h": i}) for i in range(BATCH)])
    await writer.write(MERCHANT_RISK, [(f"m{i}", {"mcc_risk_score": 0.1}) for i in range(BATCH)])
    # The hashes only, as keys() reads them.
    store = FeatureStore(client, groups=HASH_GROUPS, cache_maxsize=1)  # every read misses
    batch = rows()
    out: list[Variant] = [
        (f"{name}: raw pipeline", lambda: raw_pipeline(client)),
        (f"{name}: FeatureStore.read (cache off)", lambda: store.read(batch)),
    ]
    if isinstance(client, RedisCluster):
        out.append(
            (f"{name}: per-node pipelines one after another", lambda: per_node_in_turn(client))
        )
    return out


async def bench(settings: dict[str, Settings], samples: int) -> list[str]:
    """Time every variant, interleaved sample by sample so that noise hits all alike."""
    clients = [open_redis(s) for s in settings.values()]
    try:
        todo = [
            v for name, c in zip(settings, clients, strict=True) for v in await variants(name, c)
        ]
        timings: dict[str, list[float]] = {name: [] for name, _ in todo}
        for i in range(samples + samples // 10):
            for name, fn in todo[i % len(todo) :] + todo[: i % len(todo)]:
                started = time.perf_counter()
                await fn()
                if i >= samples // 10:  # the first tenth warms connections and slot maps
                    timings[name].append(time.perf_counter() - started)
    finally:
        for c in clients:
            await c.aclose()
    lines = [
        f"| batch of {BATCH} transactions ({2 * BATCH} keys) | p50 (ms) | p99 (ms) | n |",
        "|---|---:|---:|---:|",
    ]
    return lines + [row(name, t) for name, t in timings.items()]


def row(name: str, timings: list[float]) -> str:
    ms = sorted(t * 1e3 for t in timings)
    return f"| {name} | {quantile(ms, 0.5):.3f} | {quantile(ms, 0.99):.3f} | {len(ms)} |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_cluster", description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args(argv)
    with LocalCluster() as cluster, RedisServer(quiet=True) as single:
        settings = {
            "standalone": Settings(redis_url=single.url, redis_socket_timeout_s=1.0),
            "cluster (3 masters)": Settings(
                redis_url=cluster.url,
                redis_mode="cluster",
                redis_nodes=cluster.nodes,
                redis_socket_timeout_s=1.0,
                redis_cluster_deadline_s=2.0,
            ),
        }
        print("\n".join(asyncio.run(bench(settings, args.samples))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
