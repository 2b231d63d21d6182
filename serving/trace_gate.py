"""The request span of a sampled request, and nothing for the others: an ASGI
middleware, the outermost of the service's but admission control (which decides in front
of the whole stack: a refused request gets no span).

The provider's sampler decides, when the span starts, on the trace id the span gets (the
caller's, from its W3C `traceparent`, or a new one), so a ratio sampler here agrees with
every other service sampling the same trace. An unsampled request costs one look through
its headers and one non-recording span, and goes straight on. A sampled one gets the
server span `POST /predict`, made here rather than by OpenTelemetry's ASGI middleware (the
one BentoML uses): that one cost ~130 us of CPU a sampled request here, this ~20 us (it
reads every header twice, builds its attributes twice and feeds meters nothing reads;
README.md, "Tracing", has the profile). The span carries OpenTelemetry's HTTP server
attributes under their default (pre-1.0 semantic conventions) names, as that middleware
writes them, less the three that repeat others (http.url, http.server_name) or change on
every connection (net.peer.port); they are set once the span is sampled, so the sampler
sees none of them. No receive or send spans: one body each way says nothing a request
span does not.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from opentelemetry import context
from opentelemetry.propagate import extract
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
    set_span_in_context,
)
from opentelemetry.util.types import AttributeValue

Scope = dict[str, Any]
SCOPE_NAME = "fraud.http"  # the request span's instrumentation scope
# The headers the gate reads: the caller's trace context, and the client's name.
_PARENT = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
_USER_AGENT = b"user-agent"
_READ = {*_PARENT, _USER_AGENT}


class TraceGate:
    """Traces the requests to `paths` that the sampler of `provider()` samples (the
    provider is built when the middleware is, in the worker)."""

    def __init__(
        self, app: Any, *, paths: Collection[str], provider: Callable[[], TracerProvider]
    ) -> None:
        self._app = app
        self._paths = frozenset(paths)
        self._tracer = provider().get_tracer(SCOPE_NAME)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self._paths:
            await self._app(scope, receive, send)
            return
        headers = {name: value for name, value in scope["headers"] if name in _READ}
        carrier = {
            key: headers[name].decode("latin-1") for name, key in _PARENT.items() if name in headers
        }
        parent = extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"{scope['method']} {scope['path']}", context=parent, kind=SpanKind.SERVER
        )
        if span.is_recording():
            span.set_attributes(_request_attributes(scope, headers))
            await self._traced(scope, receive, send, span)
        else:  # unsampled: nothing to end, nothing exported
            await self._app(scope, receive, send)

    async def _traced(self, scope: Scope, receive: Any, send: Any, span: Span) -> None:
        """The app under the request span, current for the spans it makes. The span ends
        when the app returns: its status code set, an error status for a 5xx or a raise."""
        status = 0

        async def traced_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = context.attach(set_span_in_context(span))
        try:
            await self._app(scope, receive, traced_send)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        else:
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        finally:
            context.detach(token)
            if status:
                span.set_attribute("http.status_code", status)
            span.end()


def _request_attributes(scope: Scope, headers: dict[bytes, bytes]) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "http.method": scope["method"],
        "http.scheme": scope.get("scheme", "http"),
        "http.flavor": scope.get("http_version", "1.1"),
        "http.target": scope["path"],
    }
    if (server := scope.get("server")) is not None:  # as the ASGI middleware names it
        host, port = server
        attributes["http.host"] = host if port == 80 else f"{host}:{port}"
        attributes["net.host.port"] = port
    if (client := scope.get("client")) is not None:
        attributes["net.peer.ip"] = client[0]
    if (agent := headers.get(_USER_AGENT)) is not None:
        attributes["http.user_agent"] = agent.decode("latin-1")
    return attributes
