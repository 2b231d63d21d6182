"""serving/otlp_encode.py against the SDK's own OTLP encoder: spans made by a real SDK
provider, both encodings parsed by the official protobuf classes and compared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from serving import otlp_encode
from serving.otlp_encode import encode_request


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    resource = Resource.create({"service.name": "FraudService", "service.instance.id": 1})
    provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_attributes=12))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _same(spans: tuple[ReadableSpan, ...]) -> ExportTraceServiceRequest:
    ours: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(encode_request(spans))
    assert ours == encode_spans(spans)
    return ours


def test_the_request_span_tree_encodes_as_the_sdk_encodes_it(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = provider
    http = tracer_provider.get_tracer("fraud.http", "1.0", schema_url="https://x/1.26.0")
    features = tracer_provider.get_tracer("features")
    caller = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1),
                         trace_state=TraceState([("vendor", "v1")]))  # fmt: skip
    attrs: dict[str, str | int] = {
        "http.method": "POST",
        "http.target": "/predict",
        "net.host.port": 3000,
    }
    with http.start_as_current_span(
        "POST /predict", set_span_in_context(NonRecordingSpan(caller)), SpanKind.SERVER, attrs
    ) as request:
        request.set_attribute("http.status_code", 200)
        for i in range(2):  # the second time, every attribute comes from the cache
            with features.start_as_current_span("features.read") as read:
                read.set_attributes(
                    {"features.rows": i, "features.source": "", "features.deadline_groups": ()}
                )
                with features.start_as_current_span("features.redis", kind=SpanKind.CLIENT) as r:
                    r.set_attributes({"features.multiplexed": i == 0, "ratio": -0.5})
                    r.set_status(StatusCode.ERROR, "ConnectionError: refused")
    got = _same(exporter.get_finished_spans())
    (resource_spans,) = got.resource_spans
    assert [s.scope.name for s in resource_spans.scope_spans] == ["features", "fraud.http"]
    server = resource_spans.scope_spans[1].spans[0]
    assert server.parent_span_id == (0xDEF).to_bytes(8, "big") and server.flags == 0x300
    assert server.trace_state == "vendor=v1"


def test_every_kind_of_value_events_links_and_drops(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = provider
    tracer = tracer_provider.get_tracer("t")
    other = SpanContext(1 << 100, 7, is_remote=False)
    with tracer.start_as_current_span("all", links=[Link(other, {"why": "retry"})]) as span:
        span.set_attributes({"big": 1 << 62, "negative": -3, "zero": 0, "false": False,
                             "float": 1.5, "strs": ["a", "é"], "ints": [1, -2], "empty": [],
                             "long": "x" * 300})  # fmt: skip
        span.set_attributes({f"extra{i}": i for i in range(5)})  # past the limit: dropped
        span.add_event("retry", {"attempt": 2})
        span.record_exception(ValueError("boom"))
    for kind in (SpanKind.PRODUCER, SpanKind.CONSUMER):
        tracer.start_span("k", kind=kind).end()
    spans = exporter.get_finished_spans()
    got = _same(spans)
    first = got.resource_spans[0].scope_spans[0].spans[0]
    assert first.dropped_attributes_count == 2 and len(first.events) == 2
    assert first.links[0].span_id == (7).to_bytes(8, "big")


def test_a_value_otlp_cannot_carry_is_left_out(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    _, exporter = provider

    class Odd:
        pass

    # Past the SDK's own checks (it drops such values): as a span from elsewhere might be.
    tracer_provider = provider[0]
    span = tracer_provider.get_tracer("t").start_span("odd", attributes={"ok": 1})
    span._attributes._dict["odd"] = Odd()  # type: ignore[attr-defined]
    span.end()
    (encoded,) = exporter.get_finished_spans()
    got: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
        encode_request((encoded,))
    )
    kept = got.resource_spans[0].scope_spans[0].spans[0].attributes
    assert [kv.key for kv in kept] == ["ok"]


def test_the_cache_of_encoded_attributes_stays_bounded(
    provider: tuple[TracerProvider, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otlp_encode, "_CACHE_MAX", 8)
    tracer_provider, exporter = provider
    for i in range(20):
        tracer_provider.get_tracer("t").start_span("s", attributes={"i": i}).end()
    _same(exporter.get_finished_spans())
    assert 0 < len(otlp_encode._cache) <= 8
