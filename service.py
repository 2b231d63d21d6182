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
    TRACING,
    FeatureRows,
    InvalidEntityId,
    Settings,
    collector,
    model_inputs,
    open_redis,
    open_store,
    redact_url,
)
from features.metrics import LATENCY_BUCKETS_S
from features.servedlog import ServedLog, check_directory
from features.tracing import Tracing
from models import MODEL_NAME
from models.scorer import Scorer, check_saved_schema
from serving import client_errors
from serving.admission import Admission
from serving.connections import RecycleConnections
from serving.events import EventAppender
from serving.limits import RequestLimits
from serving.runtime import (
    TracingMode,
    admission_config,
    events_config,
    max_requests_per_connection,
    service_config,
    tracing_mode,
)
from serving.schemas import (
    BatchPrediction,
    InvalidRequest,
    Prediction,
    Score,
    Timings,
    batch_model,
    built,
    entity_field,
    group_source,
    transaction_model,
)
from serving.trace_gate import TraceGate
from serving.tracing import exporting_provider, otel_provider

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
if SETTINGS.served_log_sample_rate > 0:  # a directory it cannot write stops start-up here
    check_directory(SETTINGS.served_log_dir)
TRACING_MODE = tracing_mode()
SERVICE_NAME = "FraudService"

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
        self.served_log = ServedLog.from_settings(
            self.settings, model_tag=str(self.model.tag), fingerprint=self.scorer.fingerprint
        )
        self.served_log.start()
        self.gc_pauses = collector.GcPauses()
        self._gc_flush: asyncio.Task[None] | None = None
        # Our spans, children of the request span; none at all unless something exports.
        self.tracing = Tracing("fraud")
        if (provider := exporting_provider(TRACING_MODE, SERVICE_NAME)) is not None:
            self.tracing.enable(provider)
            TRACING.enable(provider)
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
        for _ in range(3):  # the first calls are slower (TorchScript, if it serves, profiles them)
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
        await asyncio.to_thread(self.served_log.close)
        if self.events is not None:
            await self.events.aclose(EVENTS_FLUSH_S)
        await self.store.aclose()
        await self.redis.aclose()

    @bentoml.api(input_spec=Transaction)
    async def predict(self, ctx: bentoml.Context, **tx: Any) -> Prediction:
        """Fraud probability of one transaction."""
        scores, timings = await self._score([tx], ctx)
        score = scores[0]
        return built(
            Prediction,
            {
                "fraud_probability": score.fraud_probability,
                "sources": score.sources,
                "timings": timings,
            },
        )

    @bentoml.api(input_spec=TransactionBatch)
    async def predict_batch(self, ctx: bentoml.Context, transactions: list[Any]) -> BatchPrediction:
        """Fraud probabilities of many transactions: one Redis round trip, one forward pass."""
        txs = [t.__dict__ for t in transactions]  # BentoML has validated them already
        scores, timings = await self._score(txs, ctx)
        return built(BatchPrediction, {"predictions": scores, "timings": timings})

    async def _score(
        self, txs: list[dict[str, Any]], ctx: bentoml.Context
    ) -> tuple[list[Score], Timings]:
        started = time.perf_counter()
        entity_ids = [{entity: t[field] for entity, field in ID_FIELDS.items()} for t in txs]
        try:
            rows = await self.store.read(entity_ids)
        except InvalidEntityId as exc:
            raise InvalidRequest(str(exc)) from None
        fetched = time.perf_counter()
        now = time.time()
        event_times = np.array([now if t["timestamp"] is None else t["timestamp"] for t in txs])
        x = model_inputs(
            rows.values, np.array([t["amount"] for t in txs], dtype=np.float64), event_times
        )
        tracer = self.tracing.active()
        if tracer is None:
            probabilities = self.scorer.predict(x)
        else:
            with tracer.start_as_current_span(
                "fraud.inference", attributes={"fraud.rows": len(txs)}
            ):
                probabilities = self.scorer.predict(x)
        done = time.perf_counter()
        INFERENCE_SECONDS.observe(done - fetched)
        timings = built(
            Timings,
            {
                "features_ms": round((fetched - started) * 1e3, 3),
                "inference_ms": round((done - fetched) * 1e3, 3),
                "total_ms": round((done - started) * 1e3, 3),
            },
        )
        ctx.response.headers["Server-Timing"] = (
            f"features;dur={timings.features_ms}, inference;dur={timings.inference_ms}, "
            f"total;dur={timings.total_ms}"
        )
        scores = probabilities.tolist()
        picked = self.served_log.sample(len(txs))  # mostly none: one random() each
        if picked:
            self.served_log.offer(
                picked, _request_id(ctx), entity_ids, event_times, x, rows.reads, scores
            )
        if self.events is not None:  # a put on a bounded queue each: never a wait
            for t, p, event_ts in zip(txs, scores, event_times.tolist(), strict=True):
                self.events.offer(
                    (t["transaction_id"], t["user_id"], t["merchant_id"], t["amount"], event_ts, p)
                )
        return _scores(rows, scores), timings


# The decorator made FraudService a bentoml Service; its stub types it as the class.
# Outermost first; Admission moves its decision in front of BentoML's own middleware once
# the lifespan starts (serving/admission.py): refused before anything is read.
if TRACING_MODE is TracingMode.OTEL:  # the request span, for sampled requests only
    FraudService.add_asgi_middleware(  # type: ignore[attr-defined]
        TraceGate,
        paths=[api.route for api in FraudService.apis.values()],  # type: ignore[attr-defined]
        provider=functools.partial(otel_provider, SERVICE_NAME),  # built in the worker
    )
ADMISSION = admission_config()
if ADMISSION.enabled:
    FraudService.add_asgi_middleware(Admission, config=ADMISSION)  # type: ignore[attr-defined]
if (MAX_REQUESTS_PER_CONNECTION := max_requests_per_connection()) > 0:
    FraudService.add_asgi_middleware(  # type: ignore[attr-defined]
        RecycleConnections, max_requests=MAX_REQUESTS_PER_CONNECTION
    )
FraudService.add_asgi_middleware(RequestLimits, max_bytes=SETTINGS.max_body_bytes)  # type: ignore[attr-defined]


def _scores(rows: FeatureRows, probabilities: list[float]) -> list[Score]:
    # Built from values of known types: no second validation (serving/schemas.built).
    return [
        built(
            Score,
            {"fraud_probability": p, "sources": {g: group_source(r) for g, r in reads.items()}},
        )
        for p, reads in zip(probabilities, rows.reads, strict=True)
    ]


def _request_id(ctx: bentoml.Context) -> str | None:
    """BentoML's id of this request, as its X-BentoML-Request-ID header spells it; None
    when tracing is off (FRAUD_TRACING), as BentoML then makes none."""
    request_id = ctx.request.scope.get("request_id")
    return None if request_id is None else format(request_id, "016x")
