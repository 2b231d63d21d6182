"""Feature retrieval for online scoring: cache, one Redis round trip, backing store, defaults."""

from features.backing import BackingStore, Record, open_backing
from features.breaker import CircuitBreaker
from features.connection import open_redis
from features.errors import (
    BackingStoreError,
    FeatureError,
    FeatureWriteError,
    InvalidEntityId,
)
from features.offline.writer import FeatureWriter
from features.ondemand import model_inputs
from features.online import (
    FeatureRows,
    FeatureStore,
    GroupRead,
    Key,
    Reason,
    Source,
    Tier,
    open_store,
)
from features.settings import Settings, redact_url
from features.spec import (
    ENTITY_ID_MAX_LEN,
    ENTITY_ID_PATTERN,
    ENTITY_TYPES,
    GROUPS,
    MERCHANT_RISK,
    MERCHANT_VELOCITY,
    MODEL_FEATURES,
    STORED_FEATURES,
    USER_FEATURES,
    USER_PROFILE,
    Dtype,
    Feature,
    FeatureGroup,
    describe_skew,
    fingerprint,
    schema,
    validate_entity_id,
)
from features.tracing import TRACING

__all__ = [
    "ENTITY_ID_MAX_LEN",
    "ENTITY_ID_PATTERN",
    "ENTITY_TYPES",
    "GROUPS",
    "MERCHANT_RISK",
    "MERCHANT_VELOCITY",
    "MODEL_FEATURES",
    "STORED_FEATURES",
    "TRACING",
    "USER_FEATURES",
    "USER_PROFILE",
    "BackingStore",
    "BackingStoreError",
    "CircuitBreaker",
    "Dtype",
    "Feature",
    "FeatureError",
    "FeatureGroup",
    "FeatureRows",
    "FeatureStore",
    "FeatureWriteError",
    "FeatureWriter",
    "GroupRead",
    "InvalidEntityId",
    "Key",
    "Reason",
    "Record",
    "Settings",
    "Source",
    "Tier",
    "describe_skew",
    "fingerprint",
    "model_inputs",
    "open_backing",
    "open_redis",
    "open_store",
    "redact_url",
    "schema",
    "validate_entity_id",
]
