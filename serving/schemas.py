"""Request and response types of the API. The entity id fields come from the feature
spec: a new entity type in features/spec.py is a new `<entity>_id` field here."""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field, create_model

from features import ENTITY_ID_MAX_LEN, ENTITY_ID_PATTERN, ENTITY_TYPES, GroupRead, Settings

MIN_TIMESTAMP_S = 946_684_800.0  # 2000-01-01
MAX_TIMESTAMP_S = 4_102_444_800.0  # 2100-01-01
MAX_AMOUNT = 1e9


def entity_field(entity: str) -> str:
    """The request field that carries an entity's id: `user` -> `user_id`."""
    return f"{entity}_id"


def transaction_model(
    settings: Settings, entities: Sequence[str] = ENTITY_TYPES
) -> type[BaseModel]:
    """One card transaction to score: an id per entity type, the amount, the time."""
    entity_id = Annotated[
        str, Field(min_length=1, max_length=settings.max_id_length, pattern=ENTITY_ID_PATTERN)
    ]
    # strict: a JSON number only, never true/false or a numeric string.
    amount = Annotated[float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False, strict=True)]
    timestamp = Annotated[
        float | None,
        Field(
            ge=MIN_TIMESTAMP_S,
            le=MAX_TIMESTAMP_S,
            allow_inf_nan=False,
            strict=True,
            description="unix s",
        ),
    ]
    # Names the transaction on the stream (velocity counts it once); absent: one is made.
    transaction_id = Annotated[
        str, Field(min_length=1, max_length=ENTITY_ID_MAX_LEN, pattern=ENTITY_ID_PATTERN)
    ]
    fields: dict[str, Any] = {entity_field(e): (entity_id, ...) for e in entities}
    return create_model(
        "Transaction",
        __doc__="One card transaction to score.",
        **fields,
        amount=(amount, ...),
        timestamp=(timestamp, None),
        transaction_id=(transaction_id | None, None),
    )


def batch_model(settings: Settings, transaction: type[BaseModel]) -> type[BaseModel]:
    """Many transactions, at most FEATURES_MAX_BATCH (in the schema too: clients see it)."""
    many: Any = Annotated[
        list[transaction],  # type: ignore[valid-type]
        Field(min_length=1, max_length=settings.max_batch),
    ]
    return create_model(
        "TransactionBatch", __doc__="Transactions to score in one call.", transactions=(many, ...)
    )


class GroupSource(BaseModel):
    """Where a feature group came from: cache, redis, backing or default."""

    source: str
    defaulted: list[str]
    reason: str | None
    stale: bool = Field(description="event time older than the group's freshness window")


class Timings(BaseModel):
    """Server-side time in milliseconds."""

    features_ms: float
    inference_ms: float
    total_ms: float


class Score(BaseModel):
    """Fraud probability of one transaction and where its features came from."""

    fraud_probability: float
    sources: dict[str, GroupSource]


class Prediction(Score):
    """Response of /predict."""

    timings: Timings


class BatchPrediction(BaseModel):
    """Response of /predict_batch, in request order."""

    predictions: list[Score]
    timings: Timings


_M = TypeVar("_M", bound=BaseModel)
_new = object.__new__
_set = object.__setattr__


def built(model: type[_M], values: dict[str, Any]) -> _M:
    """A response model of values the service made itself (every field given, each of its
    type), without validating them: what `model_construct` makes, for ~0.3 us instead of
    its ~2 us of Python (defaults, aliases, extras). Only for models without private
    attributes or extras, as these are (tests/test_hot_paths.py compares the two)."""
    instance = _new(model)
    _set(instance, "__dict__", values)
    _set(instance, "__pydantic_fields_set__", set(values))
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance


_SOURCES: dict[int, tuple[GroupRead, GroupSource]] = {}
"""Response parts by the identity of their GroupRead, which the value keeps alive (so its
id is not reused while cached). GroupReads repeat (a handful per group, built once by the
codecs): a lookup by id is ~0.2 us, one by value hashes the dataclass in Python (~1 us)."""
_SOURCES_MAX = 4096


def group_source(read: GroupRead) -> GroupSource:
    """The response part of a group's read, built once per GroupRead."""
    cached = _SOURCES.get(id(read))
    if cached is not None and cached[0] is read:
        return cached[1]
    part = built(
        GroupSource,
        {
            "source": read.source.value,
            "defaulted": list(read.defaulted),
            "reason": None if read.reason is None else read.reason.value,
            "stale": read.stale,
        },
    )
    if len(_SOURCES) >= _SOURCES_MAX:  # a bound, should a caller pass reads it made itself
        _SOURCES.clear()
    _SOURCES[id(read)] = (read, part)
    return part


class InvalidRequest(BentoMLException):
    """A request that is well-formed JSON but cannot be served as sent."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY
