"""The read path's OpenTelemetry spans, made only once the service hands over a tracer
provider, and only under a span that is recorded (a sampled request): until then no span
at all is made, not even a non-recording one.

Span names and attributes (docs in README.md, "Tracing"):
  features.read     the feature step: rows, keys, cache hits, reads joined, source, the
                    groups that got the deadline's fallback
  features.redis    one pipelined round trip: its HMGETs, the error kind if it failed
  features.backing  one backing-store read: its keys, what it found, the error kind
"""

from __future__ import annotations

from opentelemetry.trace import Tracer, TracerProvider, get_current_span


class Tracing:
    """Where one instrumentation scope finds its tracer: None until enabled."""

    __slots__ = ("scope", "tracer")

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.tracer: Tracer | None = None

    def enable(self, provider: TracerProvider) -> None:
        """Make spans from now on, through `provider` (the service's, once per worker)."""
        self.tracer = provider.get_tracer(self.scope)

    def disable(self) -> None:
        """Make no spans from now on."""
        self.tracer = None

    def active(self) -> Tracer | None:
        """The tracer if a span should be made here: tracing is on and the current span
        is recorded. An unsampled request's children would be dropped: none is made."""
        tracer = self.tracer
        if tracer is None or not get_current_span().is_recording():
            return None
        return tracer


TRACING = Tracing("features")
"""The read path's switch, off until the service enables it."""
