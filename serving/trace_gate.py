"""The head-sampling decision before any span: an ASGI middleware that sends a sampled
request through OpenTelemetry's ASGI middleware (the one BentoML uses) and every other
request straight past it.

BentoML's own tracing middleware makes a request span (and its receive and send spans)
for every request, sampled or not: with a 10% sampler that cost about a third of one
worker's capacity (load_tests/bench_tracing.py). Here an unsampled request costs one
look through its headers and one sampler call."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.propagate import extract
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import TracerProvider

Scope = dict[str, Any]
_PARENT_HEADERS = {b"traceparent": "traceparent", b"tracestate": "tracestate"}


class TraceGate:
    """Traces the requests to `paths` that `sampler` samples, through the provider that
    `provider` returns (built when the middleware is, in the worker). That provider should
    sample everything it is given: the decision was made here."""

    def __init__(
        self,
        app: Any,
        *,
        paths: Collection[str],
        sampler: Sampler,
        provider: Callable[[], TracerProvider],
    ) -> None:
        self._app = app
        self._paths = frozenset(paths)
        self._sampler = sampler
        self._ids = RandomIdGenerator()
        # The receive and send spans say little here (one body each way), and cost.
        self._traced = OpenTelemetryMiddleware(
            app, tracer_provider=provider(), exclude_spans=["receive", "send"]
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in self._paths and self._sampled(scope):
            await self._traced(scope, receive, send)
        else:
            await self._app(scope, receive, send)

    def _sampled(self, scope: Scope) -> bool:
        """The sampler's decision for a new span under the caller's trace context, if the
        request carries one (W3C traceparent), else for a root span."""
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = _PARENT_HEADERS.get(name)
            if key is not None:
                carrier[key] = value.decode("latin-1")
        parent = extract(carrier) if carrier else None
        trace_id = self._ids.generate_trace_id()
        decision = self._sampler.should_sample(parent, trace_id, "request").decision
        return decision is Decision.RECORD_AND_SAMPLE
