"""Feature definitions: the one source of truth for training and serving.

Each entity type has feature groups; a group is one Redis structure per entity (its
`kind`), read in the request's one pipeline:

- hash: fields read with HMGET, written whole, with a freshness window; the key lives
  twice that window.
- embedding: a string of packed little-endian float32, one per dimension, read with GET;
  its features are the dimensions.
- recent count: a sorted set of events scored by event time; ZCOUNT over the last
  `window_s` seconds is the one feature. The writer trims it to `retention_s`.
- member score: a sorted set whose members are ids of another entity of the request
  (`member`), scored by a time; ZSCORE of the request's member is the one feature.

Every feature carries the default the model was trained with, so a missing value means
the same thing at serving time as it did in training.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from features.errors import InvalidEntityId

ENTITY_ID_MAX_LEN = 64
# No ':' (key separator), no '{}' (cluster hash tags), no spaces or control bytes:
# whatever passes cannot address a key other than its own.
ENTITY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_ENTITY_ID_RE = re.compile(ENTITY_ID_PATTERN)
# Reserved hash field (and backing-store attribute) holding the group's event time, unix s.
EVENT_TS_FIELD = "_ts"
# The backing stores' one attribute (DynamoDB binary, Bigtable cell) of an embedding.
EMBEDDING_FIELD = "vec"
# Reserved hash field of groups written with a version (the stream's): a write whose version
# is not above the stored one is skipped, so a slower writer cannot put older values back.
VERSION_FIELD = "_v"


class Kind(StrEnum):
    """The Redis structure a group is stored in, and so the command that reads it."""

    HASH = "hash"  # HMGET key *fields _ts
    EMBEDDING = "embedding"  # GET key: packed '<f4', 4 bytes a dimension
    RECENT_COUNT = "recent_count"  # ZCARD key; ZCOUNT key (now - window_s) +inf
    MEMBER_SCORE = "member_score"  # ZCARD key; ZSCORE key <the request's member id>


class Dtype(StrEnum):
    """How a stored value is parsed and checked; the model sees float32 either way."""

    FLOAT = "float32"
    INT = "int64"
    BOOL = "bool"


@dataclass(frozen=True, slots=True)
class Feature:
    """One named value: its dtype, and its value when unknown (the training default)."""

    name: str
    dtype: Dtype
    default: float
    description: str = ""


@dataclass(frozen=True, slots=True)
class FeatureGroup:
    """Features of one entity type stored together in one key, `{entity}:{{id}}:{name}`.

    The braces are a Redis Cluster hash tag: every group of one entity lands in one
    slot, so an entity can be read, written and expired together in any deployment.
    `kind` says which structure the key holds (module docstring); the sorted-set kinds
    hold one feature each and carry their own times, so they are never reported stale.
    """

    entity: str
    name: str
    freshness_s: int
    features: tuple[Feature, ...]
    kind: Kind = Kind.HASH
    window_s: int = 0
    """RECENT_COUNT: the count covers events of the last `window_s` seconds."""
    member: str = ""
    """MEMBER_SCORE: the entity type whose request id is the member looked up."""
    retention_s: int = 0
    """Sorted sets: the history kept (the writer trims older entries); also the TTL."""
    field_names: tuple[str, ...] = field(init=False)
    qualified_name: str = field(init=False)
    """`entity:group`, the group's name in metrics and responses."""
    defaults: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)
    key_parts: tuple[str, str] = field(init=False, repr=False, compare=False)
    """The Redis key's text before and after the entity id."""

    def __post_init__(self) -> None:
        _check_kind(self)
        object.__setattr__(self, "field_names", tuple(f.name for f in self.features))
        object.__setattr__(self, "qualified_name", f"{self.entity}:{self.name}")
        object.__setattr__(self, "key_parts", (f"{self.entity}:{{", f"}}:{self.name}"))
        defaults = np.array([f.default for f in self.features], dtype=np.float64)
        defaults.flags.writeable = False
        object.__setattr__(self, "defaults", defaults)

    @property
    def ttl_s(self) -> int:
        """Key lifetime in Redis: twice the freshness window; a sorted set's retention
        (written on each event, it expires when its newest entry would be trimmed)."""
        return self.retention_s or 2 * self.freshness_s

    @property
    def persisted(self) -> bool:
        """Whether the backing stores carry it: hashes and embeddings. The sorted sets
        are rebuilt from the transaction stream."""
        return self.kind in (Kind.HASH, Kind.EMBEDDING)

    @property
    def dim(self) -> int:
        """Features of the group: an embedding's dimension."""
        return len(self.features)

    def key(self, entity_id: str) -> str:
        """Redis key of this group for an already validated entity id."""
        before, after = self.key_parts
        return before + entity_id + after


def _check_kind(group: FeatureGroup) -> None:
    """Refuse, at import, a group its kind cannot read."""
    what = f"{group.entity}:{group.name}"
    if group.kind in (Kind.RECENT_COUNT, Kind.MEMBER_SCORE):
        if len(group.features) != 1 or group.retention_s <= 0:
            raise ValueError(f"{what}: a sorted set holds one feature and needs retention_s")
    elif group.retention_s:
        raise ValueError(f"{what}: retention_s is for sorted sets")
    if (group.kind is Kind.RECENT_COUNT) != (group.window_s > 0):
        raise ValueError(f"{what}: window_s is for, and needed by, a recent count")
    if (group.kind is Kind.MEMBER_SCORE) != bool(group.member):
        raise ValueError(f"{what}: member is for, and needed by, a member score")
    if group.kind is Kind.EMBEDDING and any(f.dtype is not Dtype.FLOAT for f in group.features):
        raise ValueError(f"{what}: an embedding's dimensions are float32")


def embedding_features(prefix: str, dim: int, default: float = 0.0) -> tuple[Feature, ...]:
    """`dim` float32 dimensions, `{prefix}_0` upwards."""
    return tuple(
        Feature(f"{prefix}_{i}", Dtype.FLOAT, default, f"embedding dimension {i}")
        for i in range(dim)
    )


def validate_entity_id(field_name: str, value: object) -> str:
    """Return `value` if it may be used in a key, else raise InvalidEntityId."""
    if type(value) is str and _ENTITY_ID_RE.fullmatch(value) is not None:
        return value  # the common case, in one regex call; the checks below say why not
    if not isinstance(value, str):
        raise InvalidEntityId(field_name, "must be a string")
    if not value:
        raise InvalidEntityId(field_name, "must not be empty")
    if len(value) > ENTITY_ID_MAX_LEN:
        raise InvalidEntityId(field_name, f"longer than {ENTITY_ID_MAX_LEN} characters")
    if _ENTITY_ID_RE.fullmatch(value) is None:
        raise InvalidEntityId(
            field_name, "may hold only letters, digits, '_', '-', '.' (not first)"
        )
    return value


_F, _I, _B = Dtype.FLOAT, Dtype.INT, Dtype.BOOL

USER_FEATURES = FeatureGroup(
    entity="user",
    name="features",
    freshness_s=3600,  # velocity: rewritten by the stream on each transaction, or hourly
    features=(
        Feature("tx_count_1h", _I, 0, "transactions in the last hour"),
        Feature("tx_sum_1h", _F, 0.0, "amount spent in the last hour"),
        Feature("tx_count_24h", _I, 0, "transactions in the last 24 hours"),
        Feature("tx_sum_24h", _F, 0.0, "amount spent in the last 24 hours"),
        Feature("distinct_merchants_7d", _I, 0, "merchants paid in the last 7 days"),
    ),
)

USER_PROFILE = FeatureGroup(
    entity="user",
    name="profile",
    freshness_s=86400,  # daily batch: account facts and long-window aggregates
    features=(
        Feature("account_age_days", _I, 0, "days since the account was opened"),
        Feature("avg_tx_90d", _F, 0.0, "mean transaction amount over 90 days"),
        Feature("credit_score_bucket", _I, 2, "credit score bucket 0-4; 2 is median"),
        Feature("is_premium", _B, 0, "premium account"),
        Feature("last_login_ts", _I, 0, "unix seconds of the last login; 0 unknown"),
    ),
)

MERCHANT_RISK = FeatureGroup(
    entity="merchant",
    name="risk",
    freshness_s=86400,  # daily batch aggregates
    features=(
        Feature("mcc_risk_score", _F, 0.1, "prior fraud risk of the category, 0-1"),
        Feature("chargeback_rate_90d", _F, 0.0, "chargebacks per transaction, 90 days"),
        Feature("refund_rate_30d", _F, 0.0, "refunds per transaction, 30 days"),
        Feature("avg_ticket_30d", _F, 50.0, "mean transaction amount over 30 days"),
        Feature("days_since_onboarding", _I, 365, "days since the merchant joined"),
        Feature("is_high_risk_category", _B, 0, "category on the high-risk list"),
    ),
)

MERCHANT_VELOCITY = FeatureGroup(
    entity="merchant",
    name="velocity",
    freshness_s=3600,  # rewritten by the stream on each transaction, or hourly
    features=(Feature("merchant_tx_count_24h", _I, 0, "transactions in the last 24 hours"),),
)

USER_ACTIVITY = FeatureGroup(
    entity="user",
    name="activity",
    freshness_s=86400,
    kind=Kind.RECENT_COUNT,
    window_s=600,
    retention_s=86400,  # the stream trims it to a day and refreshes the TTL per event
    features=(Feature("tx_count_10m", _I, 0, "transactions in the 10 minutes before the read"),),
)

USER_MERCHANTS = FeatureGroup(
    entity="user",
    name="merchants",
    freshness_s=30 * 86400,
    kind=Kind.MEMBER_SCORE,
    member="merchant",
    retention_s=30 * 86400,
    features=(
        Feature(
            "merchant_last_paid_ts", _F, 0.0, "unix s this user last paid this merchant; 0 none"
        ),
    ),
)

MERCHANT_EMBEDDING_DIM = 8
MERCHANT_EMBEDDING = FeatureGroup(
    entity="merchant",
    name="embedding",
    freshness_s=7 * 86400,  # recomputed weekly from the payment graph
    kind=Kind.EMBEDDING,
    # 0.0: the training mean of every dimension (demo embeddings are centred).
    features=embedding_features("merchant_emb", MERCHANT_EMBEDDING_DIM),
)

GROUPS: tuple[FeatureGroup, ...] = (
    USER_FEATURES,
    USER_PROFILE,
    MERCHANT_RISK,
    MERCHANT_VELOCITY,
    USER_ACTIVITY,
    USER_MERCHANTS,
    MERCHANT_EMBEDDING,
)
HASH_GROUPS: tuple[FeatureGroup, ...] = tuple(g for g in GROUPS if g.kind is Kind.HASH)
ENTITY_TYPES: tuple[str, ...] = tuple(dict.fromkeys(g.entity for g in GROUPS))

# Values that come with the request itself.
REQUEST_FEATURES: tuple[Feature, ...] = (Feature("amount", _F, 0.0, "transaction amount"),)

# Computed inline from the request and stored values (features/ondemand.py).
ON_DEMAND_FEATURES: tuple[Feature, ...] = (
    Feature("seconds_since_last_login", _F, 2_592_000.0, "capped at 30 days"),
    Feature("hour_of_day", _I, 12, "UTC hour of the transaction"),
    Feature("is_weekend", _B, 0, "Saturday or Sunday, UTC"),
    Feature("amount_to_avg_ratio", _F, 1.0, "amount / avg_tx_90d, capped at 1000"),
    Feature("seconds_since_paid_merchant", _F, 2_592_000.0, "this user, this merchant; cap 30 d"),
    Feature("is_new_merchant_30d", _B, 1, "user has not paid this merchant in 30 days"),
)

# Raw timestamps are inputs to on-demand features, never to the model itself.
_NOT_MODEL_INPUTS = frozenset({"last_login_ts", "merchant_last_paid_ts"})

STORED_FEATURES: tuple[Feature, ...] = tuple(f for g in GROUPS for f in g.features)
MODEL_FEATURES: tuple[Feature, ...] = (
    tuple(f for f in STORED_FEATURES if f.name not in _NOT_MODEL_INPUTS)
    + REQUEST_FEATURES
    + ON_DEMAND_FEATURES
)


def schema(features: tuple[Feature, ...] = MODEL_FEATURES) -> list[dict[str, object]]:
    """The model's inputs as plain data, in order: stored with the model."""
    return [{"name": f.name, "dtype": str(f.dtype), "default": f.default} for f in features]


def fingerprint(features: tuple[Feature, ...] = MODEL_FEATURES) -> str:
    """Hash of names, dtypes and defaults in model order."""
    blob = json.dumps(schema(features), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_skew(trained: list[dict[str, object]]) -> list[str]:
    """What differs between a model's stored schema and these definitions."""
    current = schema()
    old = {str(f["name"]): f for f in trained}
    new = {str(f["name"]): f for f in current}
    diffs = [f"feature {n!r} is in the model but not in features/" for n in old if n not in new]
    diffs += [f"feature {n!r} is in features/ but not in the model" for n in new if n not in old]
    for name in old.keys() & new.keys():
        for attr in ("dtype", "default"):
            if old[name][attr] != new[name][attr]:
                diffs.append(
                    f"{attr} of {name!r}: model {old[name][attr]!r}, features/ {new[name][attr]!r}"
                )
    diffs.sort()
    if not diffs and list(old) != list(new):
        diffs.append("feature order differs")
    return diffs
