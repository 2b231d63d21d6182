"""Backing-store read latency: `python -m load_tests.bench_backing` (or `make bench-backing`).

Starts redis-server, dynalite and cbtemulator on loopback, loads the same entities into
each, then times sequential reads of 1 and 100 keys: DynamoDB through aiobotocore and
through botocore on a thread (the two client choices), Bigtable through the async data
client, and the Redis pipeline for the same keys as the same-run baseline.

Emulator latencies are NOT cloud latencies: dynalite is Node on LevelDB and cbtemulator an
in-memory Go server, both on loopback, without a network hop, replication or throttling.
They compare the client paths and show the shape (1 vs 100 keys), not production numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from typing import Any

import botocore.session

from features import USER_FEATURES, FeatureWriter, Settings, open_redis
from features.backing import BackingStore
from features.backing.bigtable import BigtableStore
from features.backing.dynamo import DynamoStore
from load_tests.stats import quantile
from tools.emulators import BigtableEmulator, Dynalite, EmulatorMissing
from tools.redis_server import RedisServer

CREDENTIALS = ("bench", "bench")


def summary(name: str, keys: int, samples: list[float]) -> str:
    ms = sorted(s * 1e3 for s in samples)
    return (
        f"{name:<30} {keys:>4} keys  median {quantile(ms, 0.5):7.3f} ms"
        f"  p99 {quantile(ms, 0.99):7.3f} ms  n={len(ms)}"
    )


async def timed(
    calls: dict[str, Callable[[list[str]], Awaitable[Any]]],
    ids: list[str],
    keys: int,
    n: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Round-robin over the calls, same keys for each, so they share the VM's noise."""
    rng = random.Random(7)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + n):
        chosen = rng.sample(ids, keys)
        for name, call in calls.items():
            started = time.perf_counter()
            await call(chosen)
            if i >= warmup:
                samples[name].append(time.perf_counter() - started)
    return samples


async def run(args: argparse.Namespace, redis_url: str, stores: dict[str, BackingStore]) -> None:
    ids = [f"u{i:06d}" for i in range(args.entities)]
    rows = [(e, {f.name: float(i % 2) for f in USER_FEATURES.features}) for i, e in enumerate(ids)]
    client = open_redis(Settings(redis_url=redis_url, redis_socket_timeout_s=5.0))
    for store in stores.values():
        await store.create_layout()
        writer = FeatureWriter(client, store)
        for start in range(0, len(rows), 500):
            await writer.write(USER_FEATURES, rows[start : start + 500])
    fields = (*USER_FEATURES.field_names, "_ts")

    async def redis_pipeline(chosen: list[str]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for e in chosen:
                pipe.hmget(USER_FEATURES.key(e), fields)
            await pipe.execute()

    calls: dict[str, Callable[[list[str]], Awaitable[Any]]] = {"redis pipeline": redis_pipeline}
    for name, store in stores.items():
        calls[name] = lambda chosen, s=store: s.read([(USER_FEATURES, e) for e in chosen])  # type: ignore[misc]
    if isinstance(dynamo := stores.get("dynamodb (aiobotocore)"), DynamoStore):
        # The client choice, compared on the bare call (no decoding into records).
        aio = await dynamo._dynamodb()

        async def raw_aio(chosen: list[str]) -> Any:
            keys = [{"pk": {"S": USER_FEATURES.key(e)}} for e in chosen]
            return await aio.batch_get_item(RequestItems={dynamo.table: {"Keys": keys}})

        calls["dynamodb raw aiobotocore"] = raw_aio
        calls["dynamodb raw botocore thread"] = _thread_reader(dynamo, args.dynamodb_url)

    print(
        f"{args.entities} entities; {args.n} sequential reads per row after {args.warmup} warm-up"
    )
    for keys in (1, 100):
        for name, samples in (await timed(calls, ids, keys, args.n, args.warmup)).items():
            print(summary(name, keys, samples), flush=True)
    await client.aclose()
    for store in stores.values():
        await store.aclose()


def _thread_reader(store: DynamoStore, url: str) -> Callable[[list[str]], Awaitable[Any]]:
    """The alternative to aiobotocore: botocore's sync client, one call per thread hop."""
    session = botocore.session.get_session()
    sync = session.create_client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id=CREDENTIALS[0],
        aws_secret_access_key=CREDENTIALS[1],
    )

    def read(chosen: list[str]) -> Any:
        keys = [{"pk": {"S": USER_FEATURES.key(e)}} for e in chosen]
        return sync.batch_get_item(RequestItems={store.table: {"Keys": keys}})

    return lambda chosen: asyncio.to_thread(read, chosen)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_backing", description=__doc__)
    parser.add_argument("--entities", type=int, default=2000)
    parser.add_argument("--n", type=int, default=300, help="timed reads per row")
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", "Connecting to Bigtable emulator", RuntimeWarning)
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer(quiet=True))
        dynalite = stack.enter_context(Dynalite())
        args.dynamodb_url = dynalite.url
        stores: dict[str, BackingStore] = {
            "dynamodb (aiobotocore)": DynamoStore(
                "bench-features", endpoint_url=dynalite.url, credentials=CREDENTIALS
            )
        }
        try:
            emulator = stack.enter_context(BigtableEmulator())
            os.environ["BIGTABLE_EMULATOR_HOST"] = emulator.host
            stores["bigtable (async data)"] = BigtableStore("bench", "bench", "features")
        except EmulatorMissing as exc:
            print(f"bigtable skipped: {exc}", file=sys.stderr)
        asyncio.run(run(args, redis_server.url, stores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
