"""Bulk loader: `python -m features.offline.load --demo` or `--group user:features FILE`.

FILE is CSV or Parquet with an `entity_id` column and one column per feature; columns
not in the group are rejected, absent ones are left as stored. With a backing store
configured (FEATURES_BACKING_STORE), every batch is written to it first, then to Redis;
`--create` creates its table first. Every row is stamped with the load time as event time.
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
from features.connection import open_redis
from features.offline import demo
from features.offline.writer import FeatureWriter, Row
from features.settings import Settings
from features.spec import GROUPS, FeatureGroup

BATCH_ROWS = 2000


def demo_rows(group: FeatureGroup, ids: Sequence[str], seed: int) -> Iterator[list[Row]]:
    """Generated rows for `ids`, in batches."""
    rng = np.random.default_rng(seed)
    now = time.time()
    for start in range(0, len(ids), BATCH_ROWS):
        chunk = ids[start : start + BATCH_ROWS]
        matrix = demo.generate(group, len(chunk), rng, now)
        yield [
            (e, dict(zip(group.field_names, row.tolist(), strict=True)))
            for e, row in zip(chunk, matrix, strict=True)
        ]


def demo_jobs(
    users: int, merchants: int, seed: int
) -> list[tuple[FeatureGroup, Iterator[list[Row]]]]:
    """Every group of the demo population: `users` users and `merchants` merchants."""
    ids = {"user": demo.user_ids(users), "merchant": demo.merchant_ids(merchants)}
    return [(g, demo_rows(g, ids[g.entity], seed + i)) for i, g in enumerate(GROUPS)]


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
) -> None:
    """Write every batch of every job (backing store first, if any), printing counts.

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
    finally:
        await client.aclose()
        if backing is not None:
            await backing.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.offline.load", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="generated demo population")
    source.add_argument("--group", choices=[g.qualified_name for g in GROUPS])
    parser.add_argument("file", nargs="?", type=Path, help="CSV or Parquet file for --group")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--redis-url", help="default: FEATURES_REDIS_URL or REDIS_URL")
    parser.add_argument("--create", action="store_true", help="create the backing table if absent")
    args = parser.parse_args(argv)

    # Bulk and admin work is not the hot path: real timeouts.
    settings = Settings.from_env().for_bulk(args.redis_url)
    if args.demo:
        jobs = demo_jobs(args.users, args.merchants, args.seed)
    else:
        if args.file is None:
            parser.error("--group needs a FILE")
        group = next(g for g in GROUPS if g.qualified_name == args.group)
        jobs = [(group, file_rows(group, args.file))]
    asyncio.run(load(settings, jobs, create=args.create))
    return 0


if __name__ == "__main__":
    sys.exit(main())
