"""Bulk loader: `python -m features.offline.load --demo` or `--group user:features FILE`.

FILE is CSV or Parquet with an `entity_id` column and one column per feature; columns
not in the group are rejected, absent ones are left as stored (an embedding, e.g.
`merchant:embedding` with columns `merchant_emb_0`..., is written whole). With a backing
store configured (FEATURES_BACKING_STORE), every batch is written to it first, then to
Redis; `--create` creates its table first. Every row is stamped with the load time as
event time.

The demo also seeds each user's merchants paid recently (`user:{u}:merchants`, which the
transaction stream writes in production): user `u000001`..`uN` paid merchant number
(n - 1) mod M + 1 a few hours ago, and two others within 30 days. The recent-activity log
(`user:{u}:activity`) is the stream's alone: demo requests read it as missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from features.backing import open_backing
from features.connection import Client, open_redis
from features.offline import demo
from features.offline.writer import FeatureWriter, Row
from features.settings import Settings
from features.spec import GROUPS, USER_MERCHANTS, FeatureGroup

BATCH_ROWS = 2000
Paid = tuple[str, str, float]
"""(user id, merchant id, when the user paid it: unix s)"""


def demo_rows(
    group: FeatureGroup, ids: Sequence[str], seed: int, base_seed: int = 0
) -> Iterator[list[Row]]:
    """Generated rows for `ids`, in batches. A group generated from another's rows
    (demo.DEPENDS) replays that group's rows for the same ids from `base_seed`."""
    rng = np.random.default_rng(seed)
    base = demo.DEPENDS.get(group.qualified_name)
    base_rng = np.random.default_rng(base_seed)
    now = time.time()
    for start in range(0, len(ids), BATCH_ROWS):
        chunk = ids[start : start + BATCH_ROWS]
        given = None if base is None else demo.generate(base, len(chunk), base_rng, now)
        matrix = demo.generate(group, len(chunk), rng, now, given)
        yield [
            (e, dict(zip(group.field_names, row.tolist(), strict=True)))
            for e, row in zip(chunk, matrix, strict=True)
        ]


def demo_jobs(
    users: int, merchants: int, seed: int
) -> list[tuple[FeatureGroup, Iterator[list[Row]]]]:
    """Every group the writer writes (hashes, embeddings) of the demo population:
    `users` users and `merchants` merchants."""
    ids = {"user": demo.user_ids(users), "merchant": demo.merchant_ids(merchants)}
    seeds = {g.qualified_name: seed + i for i, g in enumerate(GROUPS)}
    jobs = []
    for group in GROUPS:
        if not group.persisted:  # a sorted set: the stream's (see demo_paid)
            continue
        base = demo.DEPENDS.get(group.qualified_name)
        base_seed = 0 if base is None else seeds[base.qualified_name]
        rows = demo_rows(group, ids[group.entity], seeds[group.qualified_name], base_seed)
        jobs.append((group, rows))
    return jobs


def demo_paid(users: int, merchants: int, seed: int) -> Iterator[list[Paid]]:
    """Merchants each demo user paid recently, in batches of users (module docstring)."""
    rng = np.random.default_rng(seed)
    now = time.time()
    merchant_ids = demo.merchant_ids(merchants)
    user_ids = demo.user_ids(users)
    for start in range(0, users, BATCH_ROWS):
        batch: list[Paid] = []
        for i in range(start, min(start + BATCH_ROWS, users)):
            others = rng.integers(0, merchants, 2).tolist()
            ago = [rng.uniform(600, 6 * 3600), *rng.uniform(3600, 29 * 86400, 2).tolist()]
            for m, ago_s in zip([i % merchants, *others], ago, strict=True):
                batch.append((user_ids[i], merchant_ids[m], float(np.floor(now - ago_s))))
        yield batch


async def write_paid(client: Client, paid: Sequence[Paid], now: float) -> None:
    """ZADD GT each (user, merchant, time) into the user's set of merchants paid, trim
    it to its retention and set its TTL, in one pipeline: what the stream does."""
    by_user: dict[str, dict[str, float]] = {}
    for user, merchant, ts in paid:
        by_user.setdefault(user, {})[merchant] = ts
    group = USER_MERCHANTS
    async with client.pipeline(transaction=False) as pipe:
        for user, scores in by_user.items():
            key = group.key(user)
            pipe.zadd(key, scores, gt=True)
            pipe.zremrangebyscore(key, "-inf", f"({now - group.retention_s!r}")
            pipe.expire(key, group.ttl_s)
        await pipe.execute()


def file_rows(group: FeatureGroup, path: Path) -> Iterator[list[Row]]:
    """Rows of a CSV or Parquet file, in batches."""
    import pyarrow.csv
    import pyarrow.parquet

    if path.suffix == ".parquet":
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
    else:
        convert = pyarrow.csv.ConvertOptions(column_types={"entity_id": pyarrow.string()})
        batches = pyarrow.csv.open_csv(path, convert_options=convert)
    for batch in batches:
        columns = batch.to_pydict()
        ids = columns.pop("entity_id", None)
        if ids is None:
            raise ValueError(f"{path}: no entity_id column")
        unknown = set(columns) - set(group.field_names)
        if unknown:
            raise ValueError(f"{path}: {group.qualified_name} has no {sorted(unknown)}")
        rows: list[Row] = []
        for i, entity_id in enumerate(ids):
            values = {k: v[i] for k, v in columns.items() if v[i] is not None}
            rows.append((str(entity_id), values))
        yield rows


async def load(
    settings: Settings,
    jobs: Sequence[tuple[FeatureGroup, Iterator[list[Row]]]],
    *,
    create: bool = False,
    groups: Sequence[FeatureGroup] = GROUPS,
    paid: Sequence[list[Paid]] | Iterator[list[Paid]] = (),
) -> None:
    """Write every batch of every job (backing store first, if any), then the merchants
    `paid`, printing counts.

    `groups` is the spec the backing store is laid out for (a Bigtable column family
    each, made by `create`); every job's group must be among them."""
    client = open_redis(settings)
    backing = open_backing(settings, groups)
    writer = FeatureWriter(client, backing)
    try:
        if backing is not None and create:
            await backing.create_layout()
        await client.ping()
        for group, batches in jobs:
            started, written = time.perf_counter(), 0
            for rows in batches:
                written += await writer.write(group, rows)
            elapsed = time.perf_counter() - started
            print(f"{group.qualified_name}: {written} entities in {elapsed:.1f} s")
        started, written = time.perf_counter(), 0
        for batch in paid:
            await write_paid(client, batch, time.time())
            written += len(batch)
        if written:
            elapsed = time.perf_counter() - started
            print(f"{USER_MERCHANTS.qualified_name}: {written} payments in {elapsed:.1f} s")
    finally:
        await client.aclose()
        if backing is not None:
            await backing.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.offline.load", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="generated demo population")
    source.add_argument("--group", choices=[g.qualified_name for g in GROUPS if g.persisted])
    parser.add_argument("file", nargs="?", type=Path, help="CSV or Parquet file for --group")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--redis-url", help="default: FEATURES_REDIS_URL or REDIS_URL")
    parser.add_argument("--create", action="store_true", help="create the backing table if absent")
    args = parser.parse_args(argv)

    # Bulk and admin work is not the hot path: real timeouts.
    settings = Settings.from_env().for_bulk(args.redis_url)
    paid: Iterator[list[Paid]] = iter(())
    if args.demo:
        jobs = demo_jobs(args.users, args.merchants, args.seed)
        paid = demo_paid(args.users, args.merchants, args.seed + len(GROUPS))
    else:
        if args.file is None:
            parser.error("--group needs a FILE")
        group = next(g for g in GROUPS if g.qualified_name == args.group)
        jobs = [(group, file_rows(group, args.file))]
    asyncio.run(load(settings, jobs, create=args.create, paid=paid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
