"""The served-feature log's columns: records of scored transactions as an Arrow table.

One row per transaction: when it was scored, the request and its position in it, the
entity ids, the transaction's time, every model input as served (float32, MODEL_FEATURES
order), per group where it came from, which features were defaulted, why, and whether it
was stale, then the model's tag and feature fingerprint and the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from features.servedlog.ring import Batch
from features.spec import ENTITY_TYPES, GROUPS, MODEL_FEATURES, Feature, FeatureGroup

SERVED_AT = "served_at"
REQUEST_ID = "request_id"
POSITION = "position"
EVENT_TIME = "event_time"
MODEL_TAG = "model_tag"
FINGERPRINT = "model_fingerprint"
SCORE = "score"
GROUP_ATTRIBUTES = ("source", "defaulted", "reason", "stale")

_TIME = pa.timestamp("us", tz="UTC")


def entity_column(entity: str) -> str:
    """The column of an entity type's id: `user` -> `user_id`."""
    return f"{entity}_id"


def group_column(group: FeatureGroup, attribute: str) -> str:
    """A per-group column: `user:features`, `source` -> `user_features_source`."""
    return f"{group.entity}_{group.name}_{attribute}"


def arrow_schema(
    features: Sequence[Feature] = MODEL_FEATURES,
    groups: Sequence[FeatureGroup] = GROUPS,
    entities: Sequence[str] = ENTITY_TYPES,
) -> pa.Schema:
    """The log's schema; ValueError if a feature's name collides with another column."""
    attribute_types = {
        "source": pa.string(),
        "defaulted": pa.list_(pa.string()),
        "reason": pa.string(),
        "stale": pa.bool_(),
    }
    fields = [
        pa.field(SERVED_AT, _TIME, nullable=False),
        pa.field(REQUEST_ID, pa.string(), nullable=False),
        pa.field(POSITION, pa.int32(), nullable=False),
        *(pa.field(entity_column(e), pa.string(), nullable=False) for e in entities),
        pa.field(EVENT_TIME, _TIME, nullable=False),
        *(pa.field(f.name, pa.float32(), nullable=False) for f in features),
        *(
            pa.field(group_column(g, a), attribute_types[a], nullable=a == "reason")
            for g in groups
            for a in GROUP_ATTRIBUTES
        ),
        pa.field(MODEL_TAG, pa.string(), nullable=False),
        pa.field(FINGERPRINT, pa.string(), nullable=False),
        pa.field(SCORE, pa.float32(), nullable=False),
    ]
    names = [f.name for f in fields]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"served-log columns named twice: {clashes}")
    return pa.schema(fields)


def to_table(
    batch: Batch,
    schema: pa.Schema,
    model_tag: str,
    fingerprint: str,
    groups: Sequence[FeatureGroup] = GROUPS,
    entities: Sequence[str] = ENTITY_TYPES,
) -> pa.Table:
    """`batch` as one table of `schema` (from arrow_schema with the same groups)."""
    n = len(batch)
    n_features = len(schema) - len(_fixed_names(groups, entities))
    if batch.inputs.shape[1] != n_features:
        raise ValueError(
            f"records carry {batch.inputs.shape[1]} model inputs, the log {n_features}"
        )
    columns: list[Any] = [
        _times(batch.served_at),
        pa.array(batch.request_id, pa.string()),
        pa.array(batch.position, pa.int32()),
        *(pa.array([ids[e] for ids in batch.entity_ids], pa.string()) for e in entities),
        _times(batch.event_time),
        *(pa.array(batch.inputs[:, j]) for j in range(n_features)),
    ]
    for group in groups:
        reads = batch.reads[group.qualified_name]
        columns += [
            pa.array([str(g.source) for g in reads], pa.string()),
            pa.array([list(g.defaulted) for g in reads], pa.list_(pa.string())),
            pa.array([None if g.reason is None else str(g.reason) for g in reads], pa.string()),
            pa.array([g.stale for g in reads], pa.bool_()),
        ]
    columns += [
        pa.array([model_tag] * n, pa.string()),
        pa.array([fingerprint] * n, pa.string()),
        pa.array(np.array(batch.score, dtype=np.float32)),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _times(seconds: list[float]) -> pa.Array:
    micros = np.round(np.array(seconds, dtype=np.float64) * 1e6).astype(np.int64)
    return pa.array(micros, _TIME)


def _fixed_names(groups: Sequence[FeatureGroup], entities: Sequence[str]) -> list[str]:
    """Every column but the model inputs."""
    return [
        SERVED_AT,
        REQUEST_ID,
        POSITION,
        *(entity_column(e) for e in entities),
        EVENT_TIME,
        *(group_column(g, a) for g in groups for a in GROUP_ATTRIBUTES),
        MODEL_TAG,
        FINGERPRINT,
        SCORE,
    ]
