"""The tracer provider behind BentoML's request span and the service's own spans.

With the OTEL_* variables (runtime.Tracing.OTEL) the provider is the SDK's own, built
from them as the OpenTelemetry specification says (sampler, resource, batch processor,
OTLP/HTTP exporter all read their variables), and handed to BentoML before it builds its
middleware. BentoML's own provider samples with a ratio sampler that records every
request it does not export (to learn trace ids): ~30-45% of one worker's max RPS at a
10% rate in load_tests/bench_tracing.py. The SDK's drops them, and our spans are then
not made at all. With FRAUD_TRACING=1 alone (runtime.Tracing.BENTOML), BentoML's
configuration builds the provider, its sampler included."""

from __future__ import annotations

from collections.abc import Sequence

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
from opentelemetry.trace import TracerProvider
from prometheus_client import Counter

from serving.runtime import ALL_URLS, Tracing

EXPORTED_SPANS = Counter(
    "fraud_trace_spans_exported_total",
    "Spans the OTLP exporter sent (ok) or gave up on (failed), OTEL_* tracing only",
    ["result"],
)


def install_provider(mode: Tracing, service_name: str) -> None:
    """For OTEL, hand BentoML a provider built from the OTEL_* variables. Call it when
    service.py is imported: before BentoML builds its middleware, which asks for one."""
    if mode is Tracing.OTEL:
        # The container's documented override: BentoML then builds no provider of its own.
        BentoMLContainer.tracer_provider.set(sdk_provider(service_name))


def sdk_provider(service_name: str) -> SdkTracerProvider:
    """The SDK's provider: OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_EXPORTER_OTLP_*
    are read by the SDK; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the
    service name and worker index given here, as they do in BentoML's provider."""
    ours: dict[str, str | int] = {SERVICE_NAME: service_name}
    if server_context.worker_index is not None:
        ours[SERVICE_INSTANCE_ID] = server_context.worker_index
    resource = Resource.create(ours).merge(OTELResourceDetector().detect())
    provider = SdkTracerProvider(resource=resource)
    # Its queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, 2048): when full, spans are dropped,
    # never waited for; the export runs on the processor's own thread.
    provider.add_span_processor(BatchSpanProcessor(CountedExporter(OTLPSpanExporter())))
    return provider


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


def exporting_provider(mode: Tracing) -> TracerProvider | None:
    """The provider of BentoML's request span, if anything exports its spans, else None:
    then the service makes no span of its own. Call it once the service's configuration
    is in place (from the service's __init__, in a worker)."""
    if mode is Tracing.OFF:
        return None
    if mode is Tracing.BENTOML:
        # BentoML builds its provider from this configuration and sets no global one.
        tracing = BentoMLContainer.tracing
        if tracing.exporter_type.get() is None or tracing.excluded_urls.get() == ALL_URLS:
            return None
    provider: TracerProvider = BentoMLContainer.tracer_provider.get()
    return provider
