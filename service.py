"""Card-fraud scoring: features from the online store, then a PyTorch model."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from prometheus_client import Histogram
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from features import (
    ENTITY_ID_PATTERN,
    GROUPS,
    CircuitBreaker,
    FeatureRows,
    FeatureStore,
    GroupRead,
    InvalidEntityId,
    Settings,
    collector,
    describe_skew,
    model_inputs,
    open_backing,
    open_redis,
    redact_url,
)
from features.metrics import LATENCY_BUCKETS_S
from models import MODEL_NAME
from models.scorer import SCHEMA_FILE, SchemaMismatch, Scorer

logger = logging.getLogger("fraud")

MODEL_TAG = f"{MODEL_NAME}:latest"
MIN_TIMESTAMP_S = 946_684_800.0  # 2000-01-01
MAX_TIMESTAMP_S = 4_102_444_800.0  # 2100-01-01
MAX_AMOUNT = 1e9
# Read at import: the request models below carry the configured limits.
SETTINGS = Settings.from_env()

INFERENCE_SECONDS = Histogram(
    "fraud_inference_seconds",
    "Model forward pass per request",
    buckets=LATENCY_BUCKETS_S,
)

EntityId = Annotated[
    str, Field(min_length=1, max_length=SETTINGS.max_id_length, pattern=ENTITY_ID_PATTERN)
]
# strict: a JSON number only, never true/false or a numeric string.
Amount = Annotated[float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False, strict=True)]
Timestamp = Annotated[
    float | None,
    Field(
        ge=MIN_TIMESTAMP_S,
        le=MAX_TIMESTAMP_S,
        allow_inf_nan=False,
        strict=True,
        description="unix s",
    ),
]


class Transaction(BaseModel):
    """One card transaction to score."""

    user_id: EntityId
    merchant_id: EntityId
    amount: Amount
    timestamp: Timestamp = None


# In the schema too: clients (and schemathesis) see the limit.
Transactions = Annotated[list[Transaction], Field(min_length=1, max_length=SETTINGS.max_batch)]


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


def refuse_skewed_model(model: bentoml.models.BentoModel) -> None:
    """Stop `bentoml serve` (and `bentoml build`) before any worker starts on a model
    trained on feature definitions other than those in features/."""
    stored = model.stored
    if stored is None:
        return  # BentoML itself reports a missing model
    trained = json.loads(Path(stored.path_of(SCHEMA_FILE)).read_text())
    diffs = describe_skew(trained)
    if diffs:
        raise SchemaMismatch(f"{stored.tag} was trained on other features: " + "; ".join(diffs))


class InvalidRequest(BentoMLException):
    """A request that is well-formed JSON but cannot be served as sent."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


ASGIApp = Any  # (scope, receive, send) -> awaitable; starlette's types are not needed here


class RequestLimits:
    """ASGI middleware, before the API parses anything: a body that is not JSON gets
    415, and one over `max_bytes` gets 413.

    Checks Content-Length first, then counts what arrives (chunked bodies declare
    none), so at most `max_bytes` of a request is ever held in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            shown = media_type.decode("latin-1")[:50] or "none"
            await _refuse(send, HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"content-type: {shown}, must be application/json")  # fmt: skip
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send, declared.decode("latin-1")[:20])
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, f"over {size}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                message: dict[str, Any] = await receive()  # the disconnect, later
                return message
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, size: str) -> None:
        message = f"body: {size} bytes, at most {self.max_bytes}"
        await _refuse(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)


async def _refuse(send: Any, status: HTTPStatus, message: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})


@bentoml.service(
    workers=int(os.environ.get("FRAUD_WORKERS", "1")),
    logging={"access": {"enabled": os.environ.get("FRAUD_ACCESS_LOG", "") == "1"}},
    # BentoML arms a timer per request and never cancels it: each one keeps the request's
    # context alive, into the oldest GC generation, for this long (docs/latency-budget.md).
    traffic={"timeout": float(os.environ.get("FRAUD_REQUEST_TIMEOUT_S", "1"))},
)
class FraudService:
    """Scores card transactions for fraud risk."""

    model = bentoml.models.BentoModel(MODEL_TAG)
    refuse_skewed_model(model)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.scorer = Scorer.load(self.model.path)
        self.scorer.check_schema()  # the model may have changed since import
        self.redis = open_redis(self.settings)
        self.store = FeatureStore(
            self.redis,
            deadline_s=self.settings.deadline_s,
            stale_max_age_s=self.settings.stale_max_age_s,
            cache_ttl_s=self.settings.cache_ttl_s,
            cache_maxsize=self.settings.cache_maxsize,
            error_log_interval_s=self.settings.error_log_interval_s,
            backing=open_backing(self.settings),
            backing_timeout_s=self.settings.backing_timeout_s,
            backing_breaker=CircuitBreaker(
                name=self.settings.backing_store,
                failure_threshold=self.settings.backing_breaker_failures,
                slow_threshold=self.settings.breaker_slow_calls,
                window=self.settings.breaker_window,
                reset_s=self.settings.backing_breaker_cooldown_s,
            ),
            read_repair_max_tasks=self.settings.read_repair_max_tasks,
            breaker=CircuitBreaker(
                failure_threshold=self.settings.breaker_failures,
                slow_threshold=self.settings.breaker_slow_calls,
                window=self.settings.breaker_window,
                reset_s=self.settings.breaker_reset_s,
            ),
        )
        self.gc_pauses = collector.GcPauses()
        self._gc_flush: asyncio.Task[None] | None = None
        logger.info(
            "model %s loaded, fingerprint %s; online store %s",
            self.model.tag,
            self.scorer.fingerprint,
            redact_url(self.settings.redis_url),
        )

    @bentoml.on_startup
    async def warm_up(self) -> None:
        """Build the stores' clients, run the model once, then freeze what start-up made,
        so no later collection walks it (features/collector.py)."""
        await self.store.open()
        try:
            await self.redis.ping()  # one pooled connection, opened outside any deadline
        except (RedisError, OSError, TimeoutError) as exc:  # down at start: serve defaults
            logger.warning("Redis not reachable at start-up (%s); serving defaults", exc)
        x = model_inputs(
            np.concatenate([g.defaults for g in GROUPS]).reshape(1, -1),
            np.ones(1),
            np.full(1, time.time()),
        )
        for _ in range(3):  # TorchScript profiles the first calls, then optimises
            self.scorer.predict(x)
        frozen = collector.freeze()
        self.gc_pauses.install()
        self._gc_flush = asyncio.create_task(self.gc_pauses.run())
        logger.info("start-up objects frozen out of garbage collection: %d", frozen)

    @bentoml.on_shutdown
    async def close(self) -> None:
        if self._gc_flush is not None:
            self._gc_flush.cancel()
        self.gc_pauses.uninstall()
        await self.store.aclose()
        await self.redis.aclose()

    @bentoml.api
    async def predict(
        self,
        user_id: EntityId,
        merchant_id: EntityId,
        amount: Amount,
        ctx: bentoml.Context,
        timestamp: Timestamp = None,
    ) -> Prediction:
        """Fraud probability of one transaction."""
        # BentoML has validated each argument against these very types already.
        tx = Transaction.model_construct(
            user_id=user_id, merchant_id=merchant_id, amount=amount, timestamp=timestamp
        )
        scores, timings = await self._score([tx], ctx)
        score = scores[0]
        return Prediction.model_construct(
            fraud_probability=score.fraud_probability, sources=score.sources, timings=timings
        )

    @bentoml.api
    async def predict_batch(
        self, transactions: Transactions, ctx: bentoml.Context
    ) -> BatchPrediction:
        """Fraud probabilities of many transactions: one Redis round trip, one forward pass."""
        scores, timings = await self._score(transactions, ctx)
        return BatchPrediction(predictions=scores, timings=timings)

    async def _score(
        self, txs: list[Transaction], ctx: bentoml.Context
    ) -> tuple[list[Score], Timings]:
        started = time.perf_counter()
        try:
            rows = await self.store.read(
                [{"user": t.user_id, "merchant": t.merchant_id} for t in txs]
            )
        except InvalidEntityId as exc:
            raise InvalidRequest(str(exc)) from None
        fetched = time.perf_counter()
        now = time.time()
        x = model_inputs(
            rows.values,
            np.array([t.amount for t in txs], dtype=np.float64),
            np.array([now if t.timestamp is None else t.timestamp for t in txs]),
        )
        probabilities = self.scorer.predict(x)
        done = time.perf_counter()
        INFERENCE_SECONDS.observe(done - fetched)
        timings = Timings.model_construct(
            features_ms=round((fetched - started) * 1e3, 3),
            inference_ms=round((done - fetched) * 1e3, 3),
            total_ms=round((done - started) * 1e3, 3),
        )
        ctx.response.headers["Server-Timing"] = (
            f"features;dur={timings.features_ms}, inference;dur={timings.inference_ms}, "
            f"total;dur={timings.total_ms}"
        )
        return _scores(rows, probabilities.tolist()), timings


# The decorator made FraudService a bentoml Service; its stub types it as the class.
FraudService.add_asgi_middleware(RequestLimits, max_bytes=SETTINGS.max_body_bytes)  # type: ignore[attr-defined]


def _scores(rows: FeatureRows, probabilities: list[float]) -> list[Score]:
    # Built from values of known types: construct without validating them again.
    return [
        Score.model_construct(
            fraud_probability=p, sources={g: _source(r) for g, r in reads.items()}
        )
        for p, reads in zip(probabilities, rows.reads, strict=True)
    ]


@functools.lru_cache(maxsize=4096)
def _source(read: GroupRead) -> GroupSource:
    # GroupReads repeat (a handful per group): build each response part once.
    return GroupSource(
        source=read.source, defaulted=list(read.defaulted), reason=read.reason, stale=read.stale
    )
