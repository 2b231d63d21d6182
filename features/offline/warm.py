"""Re-warm Redis from the backing store: `python -m features.offline.warm [--create]`.

Scans the store named by FEATURES_BACKING_STORE in batches and writes each batch to Redis
in one pipeline, with a bounded number of batches in flight. Only absent keys are written,
each with the TTL left from its event time: running it twice, or while writers run, changes
nothing that is already there. Exits 1 if any record was not written.
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
from features.errors import BackingStoreError, FeatureWriteError
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
    """Copy every record of `backing` whose key Redis lacks into Redis.

    Records Redis refuses one by one (e.g. when full) are counted in `counts.failed`; a
    batch Redis does not take at all stops the scan and raises FeatureWriteError.
    """
    report = WarmReport()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []  # what the batches raised
    bar = tqdm(unit=" records", disable=not progress, file=sys.stderr)

    async def restore(batch: list[tuple[FeatureGroup, str, Record]]) -> None:
        try:
            counts = await restore_to_redis(client, batch, time.time())
        except (RedisError, OSError) as exc:
            what = f"{len(batch)} records not written to Redis: {type(exc).__name__}: {exc}"
            raise FeatureWriteError(what) from exc
        finally:
            slots.release()
        report.counts.add(counts)
        bar.update(len(batch))

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            failed.append(exc)

    try:
        async for batch in backing.scan(batch_size):
            for group, _, _ in batch:
                name = group.qualified_name
                report.scanned[name] = report.scanned.get(name, 0) + 1
            await slots.acquire()  # bounded: the scan waits for Redis, not the reverse
            if failed:
                break  # the next batch would fare no better; a rerun skips what is there
            task = asyncio.create_task(restore(list(batch)))
            tasks.add(task)
            task.add_done_callback(finished)
        await asyncio.gather(*tasks, return_exceptions=True)  # `finished` keeps them
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    if failed:
        raise failed[0]
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
    except (BackingStoreError, FeatureWriteError, RedisError, OSError) as exc:
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
        f"{c.present} already there, {c.expired} past their TTL, {c.empty} with no values, "
        f"{c.failed} refused by Redis"
    )
    if c.failed:
        print(
            f"warm incomplete: {c.failed} of {report.total} records not written to Redis: "
            f"{c.error}",
            file=sys.stderr,
        )
        return 1
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
