"""The tracer provider behind the request span and the service's own spans.

OTEL (runtime.TracingMode): the SDK's own provider, built once per worker from the OTEL_*
variables (resource, sampler, batch processor, OTLP/HTTP exporter read theirs, as the
specification says); the request span of serving/trace_gate.py asks its sampler once per
request, on the span's own trace id. BENTOML
(FRAUD_TRACING=1 alone): BentoML's provider, from its own tracing configuration; its
sampler records every request it does not export (to learn trace ids)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence

from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.context import server_context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import TracerProvider
from prometheus_client import Counter

from serving.otlp_encode import encode_request
from serving.runtime import ALL_URLS, TracingMode, trace_sampler

logger = logging.getLogger(__name__)

EXPORTED_SPANS = Counter(
    "fraud_trace_spans_exported_total",
    "Spans the OTLP exporter sent (ok) or gave up on (failed), OTEL_* tracing only",
    ["result"],
)


@functools.cache
def otel_provider(service_name: str) -> SdkTracerProvider:
    """This process's one SDK provider for OTEL (built on first use: in a worker)."""
    return sdk_provider(service_name)


def head_sampler(env: Mapping[str, str] = os.environ) -> Sampler:
    """The SDK's sampler that OTEL_TRACES_SAMPLER(_ARG) name (checked by runtime.py)."""
    name, ratio = trace_sampler(env)
    fixed: dict[str, Sampler] = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}
    if name in fixed:
        return fixed[name]
    if name == "traceidratio":
        return TraceIdRatioBased(ratio)
    root = {"parentbased_always_on": ALWAYS_ON, "parentbased_always_off": ALWAYS_OFF}.get(name)
    return ParentBased(TraceIdRatioBased(ratio) if root is None else root)


def sdk_provider(service_name: str) -> SdkTracerProvider:
    """The SDK's provider: OTEL_TRACES_SAMPLER(_ARG) pick its sampler (head_sampler),
    OTEL_BSP_* and OTEL_EXPORTER_OTLP_* are read by the SDK;
    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the
    service name and worker index given here, as they do in BentoML's provider."""
    ours: dict[str, str | int] = {SERVICE_NAME: service_name}
    if server_context.worker_index is not None:
        ours[SERVICE_INSTANCE_ID] = server_context.worker_index
    resource = Resource.create(ours).merge(OTELResourceDetector().detect())
    # The request span (trace_gate.py) is the root of our spans: the sampler decides there,
    # and for its children on the same trace id (a ratio sampler answers the same again).
    provider = SdkTracerProvider(sampler=head_sampler(), resource=resource)
    # Its queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, 2048): when full, spans are dropped,
    # never waited for; the export runs on the processor's own thread.
    provider.add_span_processor(BatchSpanProcessor(CountedExporter(OtlpExporter())))
    return provider


class OtlpExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (its endpoint, headers, timeout, compression, retries
    and transport, all from OTEL_EXPORTER_OTLP_*), with the batch encoded by
    serving/otlp_encode.py: the same bytes at a fraction of the CPU, on a thread that holds
    the GIL the requests need. Its HTTP client is the SDK's (pinned version)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            data = encode_request(spans)
        except Exception:  # a bug of ours must not stop the processor's thread: one a batch
            logger.exception("spans not exported: their batch could not be encoded")
            return SpanExportResult.FAILURE
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


class CountedExporter(SpanExporter):
    """An exporter that counts what it sent and what it gave up on. The exporter logs
    each failed batch itself: at most one line per batch, one batch per schedule delay."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self._ok = EXPORTED_SPANS.labels("ok")
        self._failed = EXPORTED_SPANS.labels("failed")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        (self._ok if result is SpanExportResult.SUCCESS else self._failed).inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


def exporting_provider(mode: TracingMode, service_name: str) -> TracerProvider | None:
    """The provider of the request span, if anything exports its spans, else None: then
    the service makes no span of its own. Call it once the service's configuration is
    in place (from the service's __init__, in a worker)."""
    if mode is TracingMode.OTEL:
        return otel_provider(service_name)
    if mode is TracingMode.OFF:
        return None
    # BentoML builds its provider from this configuration and sets no global one: its
    # container is the one place to find it.
    tracing = BentoMLContainer.tracing
    if tracing.exporter_type.get() is None or tracing.excluded_urls.get() == ALL_URLS:
        return None
    provider: TracerProvider = BentoMLContainer.tracer_provider.get()
    return provider
