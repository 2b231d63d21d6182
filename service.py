"""Card-fraud scoring: features from the online store, then a PyTorch model.

Wiring only: the API's types are in serving/schemas.py, the limits applied before
parsing in serving/limits.py, BentoML's runtime options in serving/runtime.py, the
read path in features/ and the model in models/.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import bentoml
import numpy as np
from prometheus_client import Histogram
from redis.exceptions import RedisError

from features import (
    ENTITY_TYPES,
    GROUPS,
    FeatureRows,
    GroupRead,
    InvalidEntityId,
    Settings,
    collector,
    model_inputs,
    open_redis,
    open_store,
    redact_url,
)
from features.metrics import LATENCY_BUCKETS_S
from models import MODEL_NAME
from models.scorer import Scorer, check_saved_schema
from serving import client_errors
from serving.admission import Admission
from serving.events import EventAppender
from serving.limits import RequestLimits
from serving.runtime import admission_config, events_config, service_config
from serving.schemas import (
    BatchPrediction,
    GroupSource,
    InvalidRequest,
    Prediction,
    Score,
    Timings,
    batch_model,
    entity_field,
    transaction_model,
)

logger = logging.getLogger("fraud")

MODEL_TAG = f"{MODEL_NAME}:latest"
# Read at import: the request types carry the configured limits.
SETTINGS = Settings.from_env()
Transaction = transaction_model(SETTINGS)
TransactionBatch = batch_model(SETTINGS, Transaction)
ID_FIELDS = {entity: entity_field(entity) for entity in ENTITY_TYPES}

EVENTS = events_config()
# Longest shutdown waits to append what is still queued.
EVENTS_FLUSH_S = 1.0

client_errors.install(SETTINGS.error_log_interval_s)

INFERENCE_SECONDS = Histogram(
    "fraud_inference_seconds",
    "Model forward pass per request",
    buckets=LATENCY_BUCKETS_S,
)


@bentoml.service(**service_config())
class FraudService:
    """Scores card transactions for fraud risk."""

    model = bentoml.models.BentoModel(MODEL_TAG)
    # Refuse, before any worker starts, a model trained on other feature definitions.
    if model.stored is not None:  # else BentoML itself reports the missing model
        check_saved_schema(model.stored.path, str(model.stored.tag))

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.scorer = Scorer.load(self.model.path)
        self.scorer.check_schema()  # the model may have changed since import
        self.redis = open_redis(self.settings)
        self.store = open_store(self.settings, self.redis)
        self.gc_pauses = collector.GcPauses()
        self._gc_flush: asyncio.Task[None] | None = None
        # Scored transactions to the stream that recomputes velocity (features/stream/).
        self.events = (
            EventAppender(
                self.redis,
                stream=self.settings.stream_key,
                maxlen=self.settings.stream_maxlen,
                queue_size=EVENTS.queue_size,
                batch=EVENTS.batch,
                interval_s=EVENTS.interval_s,
                error_log_interval_s=self.settings.error_log_interval_s,
            )
            if EVENTS.enabled
            else None
        )
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
        if self.events is not None:
            self.events.start()
        logger.info("start-up objects frozen out of garbage collection: %d", frozen)

    @bentoml.on_shutdown
    async def close(self) -> None:
        if self._gc_flush is not None:
            self._gc_flush.cancel()
        self.gc_pauses.uninstall()
        if self.events is not None:
            await self.events.aclose(EVENTS_FLUSH_S)
        await self.store.aclose()
        await self.redis.aclose()

    @bentoml.api(input_spec=Transaction)
    async def predict(self, ctx: bentoml.Context, **tx: Any) -> Prediction:
        """Fraud probability of one transaction."""
        scores, timings = await self._score([tx], ctx)
        score = scores[0]
        return Prediction.model_construct(
            fraud_probability=score.fraud_probability, sources=score.sources, timings=timings
        )

    @bentoml.api(input_spec=TransactionBatch)
    async def predict_batch(self, ctx: bentoml.Context, transactions: list[Any]) -> BatchPrediction:
        """Fraud probabilities of many transactions: one Redis round trip, one forward pass."""
        txs = [t.__dict__ for t in transactions]  # BentoML has validated them already
        scores, timings = await self._score(txs, ctx)
        return BatchPrediction(predictions=scores, timings=timings)

    async def _score(
        self, txs: list[dict[str, Any]], ctx: bentoml.Context
    ) -> tuple[list[Score], Timings]:
        started = time.perf_counter()
        try:
            rows = await self.store.read(
                [{entity: t[field] for entity, field in ID_FIELDS.items()} for t in txs]
            )
        except InvalidEntityId as exc:
            raise InvalidRequest(str(exc)) from None
        fetched = time.perf_counter()
        now = time.time()
        x = model_inputs(
            rows.values,
            np.array([t["amount"] for t in txs], dtype=np.float64),
            np.array([now if t["timestamp"] is None else t["timestamp"] for t in txs]),
        )
        probabilities = self.scorer.predict(x).tolist()
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
        if self.events is not None:  # a put on a bounded queue each: never a wait
            for t, p in zip(txs, probabilities, strict=True):
                event_ts = now if t["timestamp"] is None else t["timestamp"]
                self.events.offer(
                    (t["transaction_id"], t["user_id"], t["merchant_id"], t["amount"], event_ts, p)
                )
        return _scores(rows, probabilities), timings


# The decorator made FraudService a bentoml Service; its stub types it as the class.
# Outermost first: refuse what cannot be served before reading any body.
ADMISSION = admission_config()
if ADMISSION.enabled:
    FraudService.add_asgi_middleware(Admission, config=ADMISSION)  # type: ignore[attr-defined]
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
