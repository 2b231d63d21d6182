"""Size Redis for this feature store:
`python -m features.offline.sizing --entities 10000000 --rps 20000`.

Measures MEMORY USAGE of real stored keys of every group the writer writes (hashes and
embeddings: existing keys if there are enough, else a few probe entities it writes with
demo values and deletes), and the latency of reading them as one /predict does; then
applies the sizing rules. The transaction stream's sorted sets are not measured: their
size follows the traffic (entries per user within their retention).

- memory = bytes per entity (all its groups) x active entities x 1.3 (Redis overhead),
  provisioned so that it fills only 60-70% of the nodes' memory;
- connection pool = peak RPS x average read latency (s) x 1.5, per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from features.connection import Client, open_redis
from features.offline.load import demo_rows
from features.offline.writer import FeatureWriter
from features.online.codec import codec_for
from features.online.keys import Key
from features.settings import Settings
from features.spec import GROUPS, FeatureGroup

OVERHEAD = 1.3
FILL_LOW, FILL_HIGH = 0.6, 0.7
POOL_FACTOR = 1.5
COMFORTABLE_OPS = 100_000  # commands/s one Redis node serves comfortably
CLUSTER_OPS = 500_000  # above this, spread the load over a cluster
PROBE_PREFIX = "sizing"


@dataclasses.dataclass(frozen=True)
class Sample:
    """The keys of one group that are measured, and where they came from."""

    keys: list[str]
    source: str  # "stored keys" or "probe keys"


@dataclasses.dataclass(frozen=True)
class GroupSize:
    """Measured bytes per key of one group."""

    group: FeatureGroup
    keys: int
    mean_bytes: float
    source: str  # "stored keys" or "probe keys"


@contextlib.asynccontextmanager
async def sample_keys(client: Client, group: FeatureGroup, sample: int) -> AsyncIterator[Sample]:
    """Up to `sample` stored keys of `group`; if none is stored, probe keys written with
    demo values for the block and deleted after it, even if writing them failed."""
    keys: list[str] = []
    async for key in client.scan_iter(match=group.key("*"), count=1000):
        keys.append(key.decode() if isinstance(key, bytes) else str(key))
        if len(keys) >= sample:
            break
    if keys:
        yield Sample(keys, "stored keys")
        return
    ids = [f"{PROBE_PREFIX}{i:05d}" for i in range(sample)]
    probes = [group.key(i) for i in ids]
    try:
        for rows in demo_rows(group, ids, seed=5):
            await FeatureWriter(client).write(group, rows)
        yield Sample(probes, "probe keys")
    finally:
        for key in probes:
            await client.delete(key)


async def measure_group(client: Client, group: FeatureGroup, sample: Sample) -> GroupSize:
    """Mean MEMORY USAGE of the sampled keys."""
    sizes = [await client.memory_usage(key, samples=0) for key in sample.keys]
    measured = [s for s in sizes if s is not None]
    if not measured:
        raise RuntimeError(f"{group.qualified_name}: MEMORY USAGE returned nothing")
    return GroupSize(group, len(measured), statistics.fmean(measured), sample.source)


async def measure_latency_s(
    client: Client, commands: Sequence[tuple[Any, ...]], reads: int
) -> float:
    """Mean time of the read one /predict makes: `commands` (a key's HMGET or GET each)
    in one pipeline."""
    timings = []
    for _ in range(reads):
        started = time.perf_counter()
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()
        timings.append(time.perf_counter() - started)
    return statistics.fmean(timings[reads // 10 :])  # the first reads open connections


def report(
    sizes: Sequence[GroupSize],
    counts: dict[str, int],
    rps: float,
    latency_s: float,
    workers: int,
    hit_rate: float,
    node_gb: float,
) -> str:
    """The sizing rules applied to measured sizes, as text."""
    lines = ["Measured MEMORY USAGE (bytes per key):"]
    data = 0.0
    for s in sizes:
        n = counts[s.group.entity]
        group_bytes = s.mean_bytes * n
        data += group_bytes
        lines.append(
            f"  {s.group.qualified_name:<16} {s.mean_bytes:7.1f} B  x {n:>12,} "
            f"{s.group.entity}s = {group_bytes / 1e9:8.3f} GB   ({s.keys} {s.source})"
        )
    with_overhead = data * OVERHEAD
    low, high = with_overhead / FILL_HIGH, with_overhead / FILL_LOW
    lines += [
        f"Data {data / 1e9:.3f} GB x {OVERHEAD} overhead = {with_overhead / 1e9:.3f} GB",
        f"Provision {low / 1e9:.2f}-{high / 1e9:.2f} GB of Redis memory "
        f"(data fills {FILL_LOW:.0%}-{FILL_HIGH:.0%}); replicas double it.",
    ]
    shards = max(1, math.ceil(high / (node_gb * 1e9)))
    per_miss = sum(codec_for(g).n_replies for g in GROUPS)
    ops = rps * per_miss * (1 - hit_rate)
    lines.append(
        f"Redis commands at {rps:,.0f} RPS, cache hit rate {hit_rate:.0%}: {ops:,.0f}/s "
        f"({per_miss} per uncached request: an HMGET per hash, a GET per embedding, "
        "ZCARD and ZCOUNT or ZSCORE per sorted set)."
    )
    if ops > CLUSTER_OPS or shards > 1:
        by_ops = math.ceil(ops / COMFORTABLE_OPS)
        lines.append(
            f"Cluster: at least {max(shards, by_ops)} masters ({shards} for memory at "
            f"{node_gb:g} GB per node, {by_ops} for {COMFORTABLE_OPS:,}/s per node), "
            "each with a replica."
        )
    elif ops > COMFORTABLE_OPS:
        lines.append("One master can serve this, near its comfortable load: plan a cluster.")
    else:
        lines.append("One master and a replica (Sentinel for failover) serve this.")
    pool = rps * latency_s * POOL_FACTOR
    per_worker = max(1, math.ceil(pool / workers))
    lines += [
        f"Read latency {latency_s * 1e3:.3f} ms (mean, this client to this Redis).",
        f"Pool: {rps:,.0f} RPS x {latency_s:.6f} s x {POOL_FACTOR} = {pool:.1f} connections "
        f"in use at peak; FEATURES_REDIS_MAX_CONNECTIONS={per_worker} per worker "
        f"with {workers} worker(s) (in cluster mode, per node).",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace, settings: Settings) -> str:
    client = open_redis(settings)
    try:
        async with contextlib.AsyncExitStack() as probes:  # deleted before the client closes
            samples = {
                g: await probes.enter_async_context(sample_keys(client, g, args.sample))
                for g in GROUPS
                if g.persisted
            }
            sizes = [await measure_group(client, g, sample) for g, sample in samples.items()]
            now = time.time()
            read = [
                command
                for g, sample in samples.items()
                for command in codec_for(g).commands(Key(g, "", sample.keys[0]), now)
            ]
            latency_s = (
                args.latency_ms / 1e3
                if args.latency_ms is not None
                else await measure_latency_s(client, read, args.reads)
            )
    finally:
        await client.aclose()
    counts = {"user": args.entities, "merchant": args.merchants or max(1, args.entities // 100)}
    return report(sizes, counts, args.rps, latency_s, args.workers, args.hit_rate, args.node_gb)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.offline.sizing", description=__doc__)
    parser.add_argument("--entities", type=int, default=10_000_000, help="active users")
    parser.add_argument("--merchants", type=int, help="active merchants (default: 1%%)")
    parser.add_argument("--rps", type=float, default=20_000, help="peak requests/s")
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers in total")
    parser.add_argument("--hit-rate", type=float, default=0.0, help="in-process cache, 0-1")
    parser.add_argument("--node-gb", type=float, default=25.0, help="memory per Redis node")
    parser.add_argument("--sample", type=int, default=200, help="keys measured per group")
    parser.add_argument("--reads", type=int, default=500, help="reads timed for latency")
    parser.add_argument("--latency-ms", type=float, help="use this instead of measuring")
    parser.add_argument("--redis-url", help="default: FEATURES_REDIS_URL or REDIS_URL")
    args = parser.parse_args(argv)
    # Bulk and admin work is not the hot path: real timeouts.
    settings = Settings.from_env().for_bulk(args.redis_url)
    print(asyncio.run(run(args, settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
