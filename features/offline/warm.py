"""Re-warm Redis from the backing store: `python -m features.offline.warm [--create]`.

Scans the store named by FEATURES_BACKING_STORE in batches and writes each batch to Redis
in one pipeline, with a bounded number of batches in flight. Only absent keys are written,
each with the TTL left from its event time: running it twice, or while writers run, changes
nothing that is already there.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence

from redis.exceptions import RedisError
from tqdm import tqdm

from features.backing import (
    BackingStore,
    Record,
    RestoreCounts,
    open_backing,
    restore_to_redis,
)
from features.connection import Client, open_redis
from features.errors import BackingStoreError
from features.settings import Settings
from features.spec import FeatureGroup


@dataclasses.dataclass(slots=True)
class WarmReport:
    """What a warm run read and wrote."""

    scanned: dict[str, int] = dataclasses.field(default_factory=dict)  # per group
    counts: RestoreCounts = dataclasses.field(default_factory=RestoreCounts)

    @property
    def total(self) -> int:
        """Records read from the backing store."""
        return sum(self.scanned.values())


async def warm(
    backing: BackingStore,
    client: Client,
    *,
    batch_size: int = 500,
    concurrency: int = 4,
    progress: bool = False,
) -> WarmReport:
    """Copy every record of `backing` whose key Redis lacks into Redis."""
    report = WarmReport()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    bar = tqdm(unit=" records", disable=not progress, file=sys.stderr)

    async def restore(batch: list[tuple[FeatureGroup, str, Record]]) -> None:
        try:
            counts = await restore_to_redis(client, batch, time.time())
            report.counts.add(counts)
            bar.update(len(batch))
        finally:
            slots.release()

    try:
        async for batch in backing.scan(batch_size):
            for group, _, _ in batch:
                name = group.qualified_name
                report.scanned[name] = report.scanned.get(name, 0) + 1
            await slots.acquire()  # bounded: the scan waits for Redis, not the reverse
            task = asyncio.create_task(restore(list(batch)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return report


async def _main(settings: Settings, args: argparse.Namespace) -> int:
    backing = open_backing(settings)
    if backing is None:
        print("FEATURES_BACKING_STORE is 'none': nothing to warm from", file=sys.stderr)
        return 2
    client = open_redis(settings)
    try:
        if args.create:
            await backing.create_layout()
        await client.ping()
        started = time.perf_counter()
        report = await warm(
            backing,
            client,
            batch_size=args.batch,
            concurrency=args.concurrency,
            progress=not args.quiet,
        )
        elapsed = time.perf_counter() - started
    except (BackingStoreError, RedisError, OSError) as exc:
        # Safe to run again: keys already written are skipped.
        print(f"warm failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
        await backing.aclose()
    for name, n in sorted(report.scanned.items()):
        print(f"{name}: {n} records in {backing.name}")
    c = report.counts
    print(
        f"{report.total} records read in {elapsed:.1f} s: {c.written} written to Redis, "
        f"{c.present} already there, {c.expired} past their TTL"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.offline.warm", description=__doc__)
    parser.add_argument("--batch", type=int, default=500, help="records per scan page / pipeline")
    parser.add_argument("--concurrency", type=int, default=4, help="pipelines in flight")
    parser.add_argument("--create", action="store_true", help="create the table first if absent")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--redis-url", help="default: FEATURES_REDIS_URL or REDIS_URL")
    args = parser.parse_args(argv)
    if args.batch <= 0 or args.concurrency <= 0:
        parser.error("--batch and --concurrency must be positive")
    # Bulk and admin work is not the hot path: real timeouts.
    settings = Settings.from_env().for_bulk(args.redis_url)
    return asyncio.run(_main(settings, args))


if __name__ == "__main__":
    sys.exit(main())
