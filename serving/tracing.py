"""The tracer provider of a worker's own spans: BentoML's, the one its request span comes
from (so ours are its children and go out through the same exporter), but only when
BentoML's resolved configuration exports request spans at all."""

from __future__ import annotations

from bentoml._internal.configuration.containers import BentoMLContainer
from opentelemetry.trace import TracerProvider

from serving.runtime import ALL_URLS


def exporting_provider() -> TracerProvider | None:
    """BentoML's tracer provider if it has an exporter and request spans are made, else
    None: then the service makes no span of its own. Call it once the service's
    configuration is in place (from the service's __init__, in a worker)."""
    # BentoML builds its provider from this configuration and keeps it in its container;
    # it sets no global provider, so the container is the one place to find it.
    tracing = BentoMLContainer.tracing
    if tracing.exporter_type.get() is None or tracing.excluded_urls.get() == ALL_URLS:
        return None
    provider: TracerProvider = BentoMLContainer.tracer_provider.get()
    return provider
