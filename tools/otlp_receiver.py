"""An OTLP/HTTP trace receiver on a loopback port: POST /v1/traces with a protobuf
ExportTraceServiceRequest, answered 200; what it received kept for inspection (tests), or
only counted (benchmarks)."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tools._started import Started

TRACES_PATH = "/v1/traces"
_MAX_BODY_BYTES = 64 << 20
_POLL_S = 0.05


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids in hex, attributes as Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int
    status_code: int
    attributes: dict[str, Any]
    scope: str
    resource: dict[str, Any]


class OtlpReceiver(Started):
    """A ThreadingHTTPServer on 127.0.0.1; `keep=False` only counts spans and requests."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.requests = 0
        self.span_count = 0
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it (no /v1/traces)."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
        self._server = self._thread = None

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far (keep=True), in arrival order."""
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, found: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 15.0
    ) -> list[ReceivedSpan]:
        """The spans once `found(spans)` holds; raises TimeoutError with what came."""
        deadline = time.monotonic() + timeout_s
        while not found(spans := self.spans()):
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise TimeoutError(f"{len(spans)} spans received, not the ones wanted: {names}")
            time.sleep(_POLL_S)
        return spans

    def receive(self, body: bytes) -> None:
        """Parse one export request and keep (or count) its spans."""
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            ReceivedSpan(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                kind=span.kind,
                status_code=span.status.code,
                attributes={a.key: _value(a.value) for a in span.attributes},
                scope=scoped.scope.name,
                resource={a.key: _value(a.value) for a in rs.resource.attributes},
            )
            for rs in request.resource_spans
            for scoped in rs.scope_spans
            for span in scoped.spans
        ]
        with self._lock:
            self.requests += 1
            self.span_count += len(spans)
            if self.keep:
                self._spans.extend(spans)


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != TRACES_PATH:
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= _MAX_BODY_BYTES:
                self.send_error(413)
                return
            body = _decode(self.rfile.read(length), self.headers.get("Content-Encoding"))
            try:
                receiver.receive(body)
            except Exception as exc:  # a malformed body: the exporter's fault, say so
                self.send_error(400, str(exc))
                return
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return  # one line per export would drown the test output

    return Handler


def _decode(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)
