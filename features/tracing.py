"""The read path's OpenTelemetry spans, made only once the service hands over a tracer
provider: until then (tracing off) no span at all is made, not even a non-recording one.

Span names and attributes (docs in README.md, "Tracing"):
  features.read     the feature step: rows, keys, cache hits, reads joined, source, the
                    groups that got the deadline's fallback
  features.redis    one pipelined round trip: its HMGETs, the error kind if it failed
  features.backing  one backing-store read: its keys, its outcome
"""

from __future__ import annotations

from opentelemetry.trace import Tracer, TracerProvider

SCOPE = "features"
"""The instrumentation scope of these spans."""


class Tracing:
    """Where the read path finds its tracer: one attribute, read once per span site."""

    __slots__ = ("tracer",)

    def __init__(self) -> None:
        self.tracer: Tracer | None = None

    def enable(self, provider: TracerProvider) -> None:
        """Make spans from now on, through `provider` (the service's, once per worker)."""
        self.tracer = provider.get_tracer(SCOPE)

    def disable(self) -> None:
        """Make no spans from now on."""
        self.tracer = None


TRACING = Tracing()
"""This process's one switch: None until the service enables it."""
