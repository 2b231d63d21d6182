"""`make bench` (d), run inside .venv-feast: Feast 0.67 reading the same entities.

Usage: python feast_bench.py SPEC.json. SPEC gives the Redis (host:port,db=N), the groups
with their rows, the (user, merchant) pairs and the sample count. It materializes the
rows into Feast's Redis online store, times get_online_features(...).to_dict() for one
pair and for 100 pairs, and prints one JSON line of the timings (s), which bench.py
summarises as it does its own.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import redis
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.types import Float64, Int64

_TYPES = {"float32": Float64, "int64": Int64, "bool": Int64}


def main(spec_path: str) -> None:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    host, _, rest = spec["redis"].partition(":")
    port, _, db = rest.partition(",db=")
    redis.Redis(host=host, port=int(port), db=int(db or 0)).flushdb()
    work = Path(tempfile.mkdtemp(prefix="feast-bench-"))
    config = RepoConfig(
        project="fraud_bench",
        registry=str(work / "registry.db"),
        provider="local",
        online_store=RedisOnlineStoreConfig(connection_string=spec["redis"]),
        entity_key_serialization_version=3,
    )
    store = FeatureStore(config=config)
    now = datetime.now(UTC)
    objects: list[Any] = []
    frames: dict[str, pd.DataFrame] = {}
    refs: list[str] = []
    for group in spec["groups"]:
        join_key = f"{group['entity']}_id"
        names = [name for name, _ in group["features"]]
        records = [
            {join_key: entity_id, **{n: values.get(n, 0.0) for n in names}}
            for entity_id, values in group["rows"].items()
        ]
        df = pd.DataFrame.from_records(records)
        for name, dtype in group["features"]:
            if dtype != "float32":
                df[name] = df[name].astype("int64")
        df["event_timestamp"] = now
        path = work / f"{group['name']}.parquet"
        df.to_parquet(path)
        entity = Entity(name=group["entity"], join_keys=[join_key], value_type=ValueType.STRING)
        view = FeatureView(
            name=group["name"],
            entities=[entity],
            ttl=timedelta(days=7),
            schema=[Field(name=n, dtype=_TYPES[d]) for n, d in group["features"]],
            source=FileSource(path=str(path), timestamp_field="event_timestamp"),
            online=True,
        )
        objects += [entity, view]
        frames[group["name"]] = df
        refs += [f"{group['name']}:{n}" for n in names]
    store.apply(objects)
    for name, df in frames.items():
        store.write_to_online_store(name, df)

    pairs = [{"user_id": u, "merchant_id": m} for u, m in spec["pairs"]]
    n = int(spec["n"])

    def read(rows: list[dict[str, str]]) -> dict[str, Any]:
        result: dict[str, Any] = store.get_online_features(
            features=refs, entity_rows=rows
        ).to_dict()
        return result

    check = read(pairs[:1])
    assert check[refs[0].split(":")[1]][0] is not None, "Feast returned no value"
    single, batch = [], []
    batches = [pairs[i : i + 100] for i in range(0, len(pairs), 100)]
    for i in range(100):
        read([pairs[i % len(pairs)]])
    rounds = 10
    for r in range(rounds):
        for i in range(n // rounds):
            row = [pairs[(r * n // rounds + i) % len(pairs)]]
            t0 = time.perf_counter()
            read(row)
            single.append(time.perf_counter() - t0)
        for i in range(max(200, n // 5) // rounds):
            rows = batches[(r + i) % len(batches)]
            t0 = time.perf_counter()
            read(rows)
            batch.append(time.perf_counter() - t0)
    print(json.dumps({"single": single, "batch": batch}))


if __name__ == "__main__":
    main(sys.argv[1])
