"""Feature definitions: the one source of truth for training and serving.

Each entity type has feature groups; a group is one Redis hash per entity, read and
written whole, with a freshness window. Its key lives twice that window. Every feature
carries the default the model was trained with, so a missing value means the same
thing at serving time as it did in training.
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
# Reserved hash field of groups written with a version (the stream's): a write whose version
# is not above the stored one is skipped, so a slower writer cannot put older values back.
VERSION_FIELD = "_v"


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
    """Features of one entity type stored together in one hash, `{entity}:{{id}}:{name}`.

    The braces are a Redis Cluster hash tag: every group of one entity lands in one
    slot, so an entity can be read, written and expired together in any deployment.
    """

    entity: str
    name: str
    freshness_s: int
    features: tuple[Feature, ...]
    field_names: tuple[str, ...] = field(init=False)
    qualified_name: str = field(init=False)
    """`entity:group`, the group's name in metrics and responses."""
    defaults: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "field_names", tuple(f.name for f in self.features))
        object.__setattr__(self, "qualified_name", f"{self.entity}:{self.name}")
        defaults = np.array([f.default for f in self.features], dtype=np.float64)
        defaults.flags.writeable = False
        object.__setattr__(self, "defaults", defaults)

    @property
    def ttl_s(self) -> int:
        """Key lifetime in Redis: twice the freshness window."""
        return 2 * self.freshness_s

    def key(self, entity_id: str) -> str:
        """Redis key of this group for an already validated entity id."""
        return f"{self.entity}:{{{entity_id}}}:{self.name}"


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

GROUPS: tuple[FeatureGroup, ...] = (USER_FEATURES, USER_PROFILE, MERCHANT_RISK, MERCHANT_VELOCITY)
ENTITY_TYPES: tuple[str, ...] = tuple(dict.fromkeys(g.entity for g in GROUPS))

# Values that come with the request itself.
REQUEST_FEATURES: tuple[Feature, ...] = (Feature("amount", _F, 0.0, "transaction amount"),)

# Computed inline from the request and stored values (features/ondemand.py).
ON_DEMAND_FEATURES: tuple[Feature, ...] = (
    Feature("seconds_since_last_login", _F, 2_592_000.0, "capped at 30 days"),
    Feature("hour_of_day", _I, 12, "UTC hour of the transaction"),
    Feature("is_weekend", _B, 0, "Saturday or Sunday, UTC"),
    Feature("amount_to_avg_ratio", _F, 1.0, "amount / avg_tx_90d, capped at 1000"),
)

# Raw timestamps are inputs to on-demand features, never to the model itself.
_NOT_MODEL_INPUTS = frozenset({"last_login_ts"})

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
