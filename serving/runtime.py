"""BentoML's runtime options for the service, from FRAUD_* environment variables, read
when service.py is imported (the `@bentoml.service` decorator takes them)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

# Matches every URL: BentoML's OpenTelemetry middleware then makes no span at all.
_ALL_URLS = [".*"]


class RuntimeConfigError(ValueError):
    """A FRAUD_* variable with a value the service cannot start with."""


def service_config(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Keyword arguments of `@bentoml.service` for this deployment."""
    return {
        "workers": _number(env, "FRAUD_WORKERS", "1", int),
        "logging": {"access": {"enabled": _flag(env, "FRAUD_ACCESS_LOG")}},
        # BentoML arms a timer per request and never cancels it: the timer keeps a little
        # of each request alive for this long (docs/latency-budget.md).
        "traffic": {"timeout": _number(env, "FRAUD_REQUEST_TIMEOUT_S", "1", float)},
        # BentoML records a span for every request even when nothing exports it: ~20
        # objects a request for the collector, and the most CPU of any middleware.
        "tracing": {} if _flag(env, "FRAUD_TRACING") else {"excluded_urls": _ALL_URLS},
    }


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "")
    if value not in ("", "0", "1"):
        raise RuntimeConfigError(f"{name}={value!r}: must be 0 or 1")
    return value == "1"


def _number(env: Mapping[str, str], name: str, default: str, kind: type[float]) -> Any:
    raw = env.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise RuntimeConfigError(f"{name}={raw!r}: must be a positive {kind.__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise RuntimeConfigError(f"{name}={raw!r}: must be a positive {kind.__name__}")
    return value
