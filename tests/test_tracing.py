"""Traces: the OTEL_* variables mapped onto BentoML's tracing configuration, the read
path's spans in process (a real SDK provider, real Redis), and the real `bentoml serve`
exporting them to a real OTLP/HTTP receiver, parented under BentoML's request span."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import Context
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from bentoml._internal.configuration.containers import BentoMLConfiguration
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from features import (
    GROUPS,
    TRACING,
    USER_FEATURES,
    FeatureRows,
    FeatureStore,
    Reason,
    Settings,
    open_redis,
)
from serving.runtime import (
    RuntimeConfigError,
    TracingMode,
    service_config,
    tracing_config,
    tracing_mode,
)
from serving.trace_gate import TraceGate
from serving.tracing import head_sampler, sdk_provider
from tests.conftest import Service
from tools.delay_proxy import DelayProxy
from tools.otlp_receiver import OtlpReceiver, ReceivedSpan
from tools.redis_server import RedisServer, free_port

OFF = {"excluded_urls": [".*"]}
RECEIVER = "http://127.0.0.1:4318"
FLUSH = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # ms: spans leave the worker quickly
SERVER = 2  # SpanKind.SERVER in OTLP's numbering

# --- the environment, mapped --------------------------------------------------------

USER_GROUPS = sum(g.entity == "user" for g in GROUPS)


def test_tracing_is_off_by_default() -> None:
    assert tracing_mode({}) is TracingMode.OFF
    assert tracing_config({}) == OFF  # no request span either
    # A sampler alone exports nowhere: still off.
    assert tracing_mode({"OTEL_TRACES_SAMPLER": "always_on"}) is TracingMode.OFF


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": RECEIVER},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{RECEIVER}/v1/traces"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": RECEIVER, "FRAUD_TRACING": "1"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": RECEIVER, "OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio",
         "OTEL_TRACES_SAMPLER_ARG": "0.1"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": RECEIVER, "OTEL_TRACES_EXPORTER": "otlp",
         "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SDK_DISABLED": "false"},
    ],
)  # fmt: skip
def test_an_otlp_endpoint_turns_on_the_sdks_provider(env: dict[str, str]) -> None:
    assert tracing_mode(env) is TracingMode.OTEL
    assert tracing_config(env) == OFF  # the request span is the service's (trace_gate.py)


def test_fraud_tracing_1_alone_leaves_tracing_to_bentomls_configuration() -> None:
    assert tracing_mode({"FRAUD_TRACING": "1"}) is TracingMode.BENTOML
    assert tracing_config({"FRAUD_TRACING": "1"}) == {}


@pytest.mark.parametrize(
    "off",
    [
        {"FRAUD_TRACING": "0"},
        {"OTEL_SDK_DISABLED": "TRUE"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_SAMPLER": "always_off"},
    ],
)
def test_each_off_switch_wins_over_an_endpoint(off: dict[str, str]) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": RECEIVER, **off}
    assert tracing_mode(env) is TracingMode.OFF
    assert tracing_config(env) == OFF


@pytest.mark.parametrize("env", [{}, {"FRAUD_TRACING": "1"}])
def test_bentoml_accepts_the_section(env: dict[str, str]) -> None:
    # BentoML's own schema, after its merge of the decorator's options as the service's
    # defaults: our exclusion lands where its middleware reads it.
    config: Any = BentoMLConfiguration(
        override_defaults={"services": {"FraudService": service_config(env)}}, use_version=2
    ).to_dict()
    excluded = config["services"]["FraudService"]["tracing"]["excluded_urls"]
    assert excluded == (OFF["excluded_urls"] if env == {} else None)


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("FRAUD_TRACING", {"FRAUD_TRACING": "on"}),
        ("OTEL_SDK_DISABLED", {"OTEL_SDK_DISABLED": "1"}),
        ("OTEL_TRACES_EXPORTER", {"OTEL_TRACES_EXPORTER": "zipkin"}),
        ("OTEL_TRACES_EXPORTER", {"OTEL_TRACES_EXPORTER": "otlp,console"}),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"}),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://x"}),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}),
        ("OTEL_TRACES_SAMPLER", {"OTEL_TRACES_SAMPLER": "jaeger_remote"}),
        ("OTEL_TRACES_SAMPLER_ARG", {"OTEL_TRACES_SAMPLER": "traceidratio",
                                     "OTEL_TRACES_SAMPLER_ARG": "1.5"}),
        ("OTEL_TRACES_SAMPLER_ARG", {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                     "OTEL_TRACES_SAMPLER_ARG": "a tenth"}),
    ],
)  # fmt: skip
def test_bad_tracing_values_name_the_variable(name: str, env: dict[str, str]) -> None:
    # Checked whether or not tracing ends up on: a typo never passes silently (the SDK
    # itself would warn and fall back to sampling everything).
    with pytest.raises(RuntimeConfigError, match=f"^{name}="):
        tracing_mode(env)
    with pytest.raises(RuntimeConfigError, match=f"^{name}="):
        service_config(env)


@pytest.mark.parametrize(
    ("env", "description"),
    [
        ({}, "ParentBased{root:AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, "TraceIdRatioBased{1.0}"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
         "ParentBased{root:TraceIdRatioBased{0.25}"),
        ({"OTEL_TRACES_SAMPLER": "Always_Off"}, "AlwaysOffSampler"),
    ],
)  # fmt: skip
def test_the_sampler_is_the_one_the_standard_names(env: dict[str, str], description: str) -> None:
    assert head_sampler(env).get_description().startswith(description)


def test_the_sdks_provider_reads_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fraud-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    provider = sdk_provider("FraudService")
    try:
        assert provider.resource.attributes["service.name"] == "fraud-eu"
        assert provider.resource.attributes["deployment.environment"] == "test"
    finally:
        provider.shutdown()


@dataclass
class Gated:
    exporter: InMemorySpanExporter
    providers: list[TracerProvider]

    def gate(self, sampler: Any, app: Any = None) -> TraceGate:
        """A gate in front of `app` (by default one that answers 200) whose provider
        samples with `sampler`; `provider()` is that provider after this call."""
        provider = TracerProvider(sampler=sampler)
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.providers.append(provider)
        return TraceGate(app or _ok, paths=["/predict"], provider=lambda: provider)

    def provider(self) -> TracerProvider:
        return self.providers[-1]

    def names(self) -> list[str]:
        return [s.name for s in self.exporter.get_finished_spans()]


@pytest.fixture
def gated() -> Iterator[Gated]:
    providers: list[TracerProvider] = []
    yield Gated(InMemorySpanExporter(), providers)
    for provider in providers:
        provider.shutdown()


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _call(
    app: Any, path: str = "/predict", traceparent: str | None = None, user_agent: str | None = None
) -> None:
    headers = [(b"host", b"127.0.0.1")]
    if traceparent is not None:
        headers.append((b"traceparent", traceparent.encode()))
    if user_agent is not None:
        headers.append((b"user-agent", user_agent.encode()))
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "scheme": "http",
             "server": ("127.0.0.1", 3000), "client": ("127.0.0.1", 5000),
             "headers": headers, "root_path": ""}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    await app(scope, receive, send)


async def test_the_gate_traces_what_its_sampler_samples(gated: Gated) -> None:
    await _call(gated.gate(ALWAYS_ON))
    await _call(gated.gate(ALWAYS_ON), path="/metrics")  # not an API: never traced
    await _call(gated.gate(ALWAYS_OFF))
    assert gated.names() == ["POST /predict"]  # one span: no receive or send spans
    (request,) = gated.exporter.get_finished_spans()
    assert request.kind is SpanKind.SERVER and request.parent is None


async def test_the_request_span_carries_the_http_server_attributes(gated: Gated) -> None:
    await _call(gated.gate(ALWAYS_ON), user_agent="load/1")
    (request,) = gated.exporter.get_finished_spans()
    assert request.instrumentation_scope is not None
    assert request.instrumentation_scope.name == "fraud.http"
    assert dict(request.attributes or {}) == {
        "http.method": "POST",
        "http.scheme": "http",
        "http.flavor": "1.1",
        "http.target": "/predict",
        "http.host": "127.0.0.1:3000",
        "net.host.port": 3000,
        "net.peer.ip": "127.0.0.1",
        "http.user_agent": "load/1",
        "http.status_code": 200,
    }
    assert request.status.status_code is StatusCode.UNSET


async def test_the_apps_spans_are_the_request_spans_children(gated: Gated) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        with gated.provider().get_tracer("features").start_as_current_span("features.read"):
            await _ok(scope, receive, send)

    await _call(gated.gate(ALWAYS_ON, app))
    read, request = gated.exporter.get_finished_spans()  # no http send or receive spans
    assert (read.name, request.name) == ("features.read", "POST /predict")
    assert read.parent is not None and read.parent.span_id == request.context.span_id
    assert read.context.trace_id == request.context.trace_id


async def test_a_failed_request_is_an_error_span(gated: Gated) -> None:
    async def unavailable(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("no model")

    await _call(gated.gate(ALWAYS_ON, unavailable))
    with pytest.raises(RuntimeError):
        await _call(gated.gate(ALWAYS_ON, broken))
    failed, raised = gated.exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["http.status_code"] == 503
    assert raised.status.status_code is StatusCode.ERROR
    assert raised.status.description == "RuntimeError: no model"
    assert [e.name for e in raised.events] == ["exception"]


async def test_the_gate_follows_the_callers_decision(gated: Gated) -> None:
    parent_based = head_sampler({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                 "OTEL_TRACES_SAMPLER_ARG": "0"})  # fmt: skip
    sampled, unsampled = Caller(), Caller()
    await _call(gated.gate(parent_based))  # a root: ratio 0
    await _call(gated.gate(parent_based), traceparent=unsampled.header(sampled=False))
    await _call(gated.gate(parent_based), traceparent=sampled.header())
    (request,) = gated.exporter.get_finished_spans()
    assert format(request.context.trace_id, "032x") == sampled.trace_id
    assert request.parent is not None
    assert format(request.parent.span_id, "016x") == sampled.span_id


async def test_a_ratio_decides_on_the_trace_id_the_request_span_gets(gated: Gated) -> None:
    # TraceIdRatioBased samples a trace iff its id's low 64 bits are below ratio * 2^64:
    # every service sampling at that ratio then keeps the same traces. So the decision
    # must be on the id the span is given, the caller's or a new root's.
    ratio = head_sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    gate = gated.gate(ratio)
    for _ in range(200):
        await _call(gate)
    roots = gated.exporter.get_finished_spans()
    assert 50 < len(roots) < 150  # about half of 200
    bound = TraceIdRatioBased.get_bound_for_rate(0.5)
    assert all(s.context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound for s in roots)
    gated.exporter.clear()
    low = Caller(trace_id=f"{1:016x}{bound - 1:016x}")  # sampled at 0.5
    high = Caller(trace_id=f"{1:016x}{bound:016x}")  # not
    # Not parent-based: the caller's sampled flag is not asked, its trace id is.
    await _call(gate, traceparent=low.header(sampled=False))
    await _call(gate, traceparent=high.header())
    (child,) = gated.exporter.get_finished_spans()
    assert format(child.context.trace_id, "032x") == low.trace_id


def test_exported_spans_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    def count(result: str) -> float:
        return (
            REGISTRY.get_sample_value("fraud_trace_spans_exported_total", {"result": result}) or 0.0
        )

    ok, failed = count("ok"), count("failed")
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        provider = sdk_provider("FraudService")
        provider.get_tracer("t").start_span("sent").end()
        assert provider.force_flush()
        provider.shutdown()
    # Nothing listens there: the exporter gives up after its timeout.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
    provider = sdk_provider("FraudService")
    provider.get_tracer("t").start_span("lost").end()
    provider.force_flush()
    provider.shutdown()
    assert (count("ok") - ok, count("failed") - failed) == (1, 1)


# --- the read path's spans, in process ------------------------------------------------


@dataclass
class Exported:
    exporter: InMemorySpanExporter
    provider: TracerProvider

    async def read(self, store: FeatureStore, rows: list[dict[str, str]]) -> FeatureRows:
        """`store.read` under a recorded span, as BentoML's request span is in the service."""
        with self.provider.get_tracer("test").start_as_current_span("request"):
            return await store.read(rows)

    def spans(self) -> dict[str, list[ReadableSpan]]:
        named: dict[str, list[ReadableSpan]] = {}
        for span in self.exporter.get_finished_spans():
            named.setdefault(span.name, []).append(span)
        return named


@pytest.fixture
def exported() -> Iterator[Exported]:
    """The read path traced through a real SDK provider into a real in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    TRACING.enable(provider)
    yield Exported(exporter, provider)
    TRACING.disable()
    provider.shutdown()


@dataclass
class Slow:
    proxy: DelayProxy
    url: str


@pytest.fixture
def slow_redis(redis_server: RedisServer) -> Iterator[Slow]:
    with DelayProxy("127.0.0.1", redis_server.port) as proxy:
        yield Slow(proxy, proxy.url())


async def _store(url: str, deadline_s: float) -> AsyncIterator[FeatureStore]:
    settings = Settings(redis_url=url, redis_socket_timeout_s=1.0, redis_pool_timeout_s=1.0)
    client = open_redis(settings)
    store = FeatureStore(client, deadline_s=deadline_s, multiplex=True)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()
        await client.aclose()


async def test_the_feature_step_and_its_redis_round_trip_are_spans(
    exported: Exported, redis_url: str, sync_redis: redis.Redis
) -> None:
    sync_redis.hset(USER_FEATURES.key("u1"), mapping={"tx_count_1h": 2})
    async for store in _store(redis_url, 1.0):
        await exported.read(store, [{"user": "u1", "merchant": "m1"}])
        await exported.read(
            store, [{"user": "u1", "merchant": "m1"}, {"user": "u2", "merchant": "m1"}]
        )
    spans = exported.spans()
    first, second = spans["features.read"]
    assert dict(first.attributes or {}) == {
        "features.rows": 1,
        "features.keys": len(GROUPS),
        "features.cache_hits": 0,
        "features.joined": 0,
        "features.source": "redis",
        "features.deadline_groups": (),
    }
    assert second.attributes is not None
    # u2's user groups are new; u1's and m1's groups come from the cache.
    assert (second.attributes["features.keys"], second.attributes["features.cache_hits"]) == (
        len(GROUPS) + USER_GROUPS,
        len(GROUPS),
    )
    trips = spans["features.redis"]
    assert len(trips) == 2  # the second read sent only its misses: u2's user groups
    for trip, read in zip(trips, (first, second), strict=True):
        assert trip.parent is not None and trip.parent.span_id == read.context.span_id
        assert trip.context.trace_id == read.context.trace_id
        assert trip.kind is SpanKind.CLIENT
    assert dict(trips[1].attributes or {})["db.operation.batch.size"] == USER_GROUPS


async def test_a_round_trip_past_the_deadline_stays_the_steps_child(
    exported: Exported, slow_redis: Slow, sync_redis: redis.Redis
) -> None:
    slow_redis.proxy.set_delay(0.3)
    async for store in _store(slow_redis.url, 0.05):
        rows = await exported.read(store, [{"user": "late", "merchant": "late"}])
        assert rows.source == "default"
        await store.wait_repairs()  # the read lands after the step has ended
    spans = exported.spans()
    (read,) = spans["features.read"]
    (trip,) = spans["features.redis"]
    assert read.attributes is not None
    assert read.attributes["features.deadline_groups"] == tuple(
        sorted(g.qualified_name for g in GROUPS)
    )
    assert trip.parent is not None and trip.parent.span_id == read.context.span_id
    assert trip.end_time is not None and read.end_time is not None
    assert trip.end_time > read.end_time  # it ended in its own task, after the deadline


async def test_a_failed_round_trip_carries_its_error_kind(
    exported: Exported,
) -> None:
    async for store in _store(f"redis://127.0.0.1:{free_port()}/0", 1.0):  # nothing listens
        await exported.read(store, [{"user": "u", "merchant": "m"}])
    (trip,) = exported.spans()["features.redis"]
    assert trip.attributes is not None
    assert trip.attributes["error.type"] == "ConnectionError"
    assert not trip.status.is_ok


async def test_a_read_failed_in_another_callback_logs_under_its_request(
    exported: Exported, slow_redis: Slow
) -> None:
    # A connection found lost by the callback that reads it (not by the request's own
    # write) fails the reads in flight there: their log lines must still carry their
    # request's trace, as BentoML's log filter takes it from the current span.
    traced: list[int] = []

    class CurrentTrace(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Redis read failed" in record.getMessage():
                traced.append(trace.get_current_span().get_span_context().trace_id)

    handler, tier_log = CurrentTrace(), logging.getLogger("features.online.redis_tier")
    tier_log.addHandler(handler)
    try:
        async for store in _store(slow_redis.url, 1.0):
            await exported.read(store, [{"user": "warm", "merchant": "warm"}])  # connected
            slow_redis.proxy.set_delay(0.5)
            read = asyncio.ensure_future(exported.read(store, [{"user": "u", "merchant": "m"}]))
            await asyncio.sleep(0.05)  # written; its replies held by the proxy
            mux = store._tiers[0]._mux  # type: ignore[attr-defined]
            lost = RedisConnectionError("Connection closed by server.")
            asyncio.get_running_loop().call_soon(mux._conn.close, lost, context=Context())
            rows = await read
            assert rows.reads[0]["user:features"].reason is Reason.UNAVAILABLE
    finally:
        tier_log.removeHandler(handler)
    _, request = exported.spans()["request"]
    assert traced == [request.context.trace_id]


async def test_no_span_at_all_while_tracing_is_off(redis_url: str, sync_redis: redis.Redis) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # A provider exists (as BentoML's always does) but the read path was never handed it.
    assert TRACING.tracer is None
    async for store in _store(redis_url, 1.0):
        with provider.get_tracer("test").start_as_current_span("request"):
            await store.read([{"user": "u1", "merchant": "m1"}])
    assert [s.name for s in exporter.get_finished_spans()] == ["request"]
    provider.shutdown()


async def test_no_span_of_ours_under_an_unsampled_request(
    exported: Exported, redis_url: str, sync_redis: redis.Redis
) -> None:
    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    async for store in _store(redis_url, 1.0):
        with unsampled.get_tracer("test").start_as_current_span("request") as request:
            assert not request.is_recording()
            await store.read([{"user": "u1", "merchant": "m1"}])
        await store.read([{"user": "u2", "merchant": "m1"}])  # no request span at all
    assert exported.exporter.get_finished_spans() == ()
    unsampled.shutdown()


# --- the real server, a real receiver ----------------------------------------------


@dataclass
class Traced:
    service: Service
    receiver: OtlpReceiver
    redis_server: RedisServer
    admin: redis.Redis


@pytest.fixture(scope="module")
def traced(bentoml_home: Path) -> Iterator[Traced]:
    with OtlpReceiver() as receiver, RedisServer(quiet=True) as server:
        service = Service(
            bentoml_home,
            server.url,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_TRACES_SAMPLER="parentbased_always_on",
            OTEL_SERVICE_NAME="fraud-test",
            **FLUSH,
        ).start()
        admin = redis.Redis(port=server.port, socket_timeout=5)
        try:
            yield Traced(service, receiver, server, admin)
        finally:
            service.stop()
            admin.close()


def predict(service: Service, user: str, traceparent: str | None = None) -> httpx.Response:
    body = {"user_id": user, "merchant_id": "m1", "amount": 3.0}
    headers = {} if traceparent is None else {"traceparent": traceparent}
    response = httpx.post(f"{service.url}/predict", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response


@dataclass(frozen=True)
class Caller:
    """A caller's span, as a W3C traceparent header names it."""

    trace_id: str = field(default_factory=lambda: secrets.token_hex(16))
    span_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def header(self, sampled: bool = True) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if sampled else '00'}"


def in_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, list[ReceivedSpan]]:
    named: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.trace_id == trace_id:
            named.setdefault(span.name, []).append(span)
    return named


def _complete(trace_id: str, *names: str) -> Any:
    wanted = {"POST /predict", "features.read", "fraud.inference", *names}
    return lambda spans: wanted <= set(in_trace(spans, trace_id))


@pytest.mark.e2e
def test_our_spans_arrive_under_the_request_span(traced: Traced) -> None:
    traced.admin.hset(USER_FEATURES.key("traced1"), mapping={"tx_count_1h": 2})
    caller = Caller()
    predict(traced.service, "traced1", caller.header())
    spans = traced.receiver.wait_for(_complete(caller.trace_id, "features.redis"))
    named = in_trace(spans, caller.trace_id)
    (request,) = named["POST /predict"]
    (read,) = named["features.read"]
    (trip,) = named["features.redis"]
    (inference,) = named["fraud.inference"]
    # The request span continues the caller's trace (W3C trace context, parent-based).
    assert request.kind == SERVER and request.parent_span_id == caller.span_id
    assert set(named) == {"POST /predict", "features.read", "features.redis", "fraud.inference"}
    assert request.attributes["http.target"] == "/predict"
    assert (request.attributes["http.method"], request.attributes["http.status_code"]) == (
        "POST",
        200,
    )
    assert request.resource["service.name"] == "fraud-test"  # OTEL_SERVICE_NAME
    assert read.parent_span_id == request.span_id
    assert inference.parent_span_id == request.span_id
    assert trip.parent_span_id == read.span_id
    assert read.scope == "features" and inference.scope == "fraud"
    assert read.attributes == {
        "features.rows": 1,
        "features.keys": len(GROUPS),
        "features.cache_hits": 0,
        "features.joined": 0,
        "features.source": "redis",
        "features.deadline_groups": [],
    }
    assert trip.attributes["db.system.name"] == "redis"
    assert trip.attributes["db.operation.batch.size"] == len(GROUPS)
    assert inference.attributes == {"fraud.rows": 1}

    # Again: both groups now come from this worker's cache, and Redis is not asked.
    again = Caller()
    predict(traced.service, "traced1", again.header())
    named = in_trace(traced.receiver.wait_for(_complete(again.trace_id)), again.trace_id)
    assert "features.redis" not in named
    assert named["features.read"][0].attributes["features.cache_hits"] == len(GROUPS)
    assert named["features.read"][0].attributes["features.source"] == "cache"


@pytest.mark.e2e
def test_a_caller_that_did_not_sample_gets_no_spans(traced: Traced) -> None:
    unsampled, sampled = Caller(), Caller()
    predict(traced.service, "traced2", unsampled.header(sampled=False))
    predict(traced.service, "traced2", sampled.header())
    spans = traced.receiver.wait_for(_complete(sampled.trace_id))  # later: the first is out
    assert in_trace(spans, unsampled.trace_id) == {}


@pytest.mark.e2e
def test_our_log_lines_carry_the_trace_id(traced: Traced) -> None:
    # Runs last in this module: it stops the service's Redis.
    traced.redis_server.stop()
    logged = len(traced.service.output())
    caller = Caller()
    predict(traced.service, "unseen-user", caller.header())
    spans = traced.receiver.wait_for(_complete(caller.trace_id, "features.redis"))
    (read,) = in_trace(spans, caller.trace_id)["features.read"]
    (trip,) = in_trace(spans, caller.trace_id)["features.redis"]
    assert trip.attributes["error.type"] == "ConnectionError"
    assert trip.status_code == 2  # STATUS_CODE_ERROR
    deadline = time.monotonic() + 10.0
    while "Redis read failed" not in (added := traced.service.output()[logged:]):
        assert time.monotonic() < deadline, added
        time.sleep(0.05)
    (line,) = [line for line in added.splitlines() if "Redis read failed" in line]
    # BentoML's log filter adds the current span: the feature step's, in the read's task.
    assert f"trace={caller.trace_id},span={read.span_id}" in line


@pytest.mark.e2e
def test_tracing_off_exports_nothing_and_logs_no_trace(bentoml_home: Path) -> None:
    with OtlpReceiver() as receiver:
        closed = f"redis://127.0.0.1:{free_port()}/0"  # every read fails, and is logged
        off = Service(
            bentoml_home, closed, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_TRACES_SAMPLER="always_on", FRAUD_TRACING="0", **FLUSH,
        ).start()  # fmt: skip
        try:
            for i in range(5):
                response = predict(off, f"off{i}")
                assert "x-bentoml-request-id" not in response.headers  # no request span
            time.sleep(1.0)  # ten schedule delays: a span would have been exported
            line = next(ln for ln in off.output().splitlines() if "Redis read failed" in ln)
        finally:
            off.stop()
        assert (receiver.requests, receiver.span_count) == (0, 0)
        assert not re.search(r"trace=[0-9a-f]{32}", line)


def test_the_receiver_parses_what_the_sdk_exporter_sends() -> None:
    # The receiver the end-to-end tests trust, against the real exporter in process.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    with OtlpReceiver() as receiver:
        provider = TracerProvider()
        exporter = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("t").start_as_current_span("outer") as outer:
            provider.get_tracer("t").start_span("inner", attributes={"n": 3, "g": ["a"]}).end()
        provider.shutdown()
        inner, got_outer = receiver.spans()
    assert (inner.name, got_outer.name) == ("inner", "outer")
    assert inner.parent_span_id == format(outer.get_span_context().span_id, "016x")
    assert inner.attributes == {"n": 3, "g": ["a"]}
