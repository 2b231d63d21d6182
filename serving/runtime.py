"""The service's runtime options from FRAUD_* environment variables, read when service.py
is imported: BentoML's (the `@bentoml.service` decorator takes them), admission control and
the appending of scored transactions to the stream."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from serving.admission import AdmissionConfig
from serving.events import EventsConfig

# Matches every URL: BentoML's OpenTelemetry middleware then makes no span at all.
_ALL_URLS = [".*"]


def admission_config(env: Mapping[str, str] = os.environ) -> AdmissionConfig:
    """The admission control serving/admission.py applies, from FRAUD_ADMISSION_*."""
    config = AdmissionConfig(
        enabled=_flag(env, "FRAUD_ADMISSION", "1"),
        initial_limit=_number(env, "FRAUD_ADMISSION_INITIAL_LIMIT", "32", int),
        min_limit=_number(env, "FRAUD_ADMISSION_MIN_LIMIT", "4", int),
        max_limit=_number(env, "FRAUD_ADMISSION_MAX_LIMIT", "256", int),
        target_s=_number(env, "FRAUD_ADMISSION_TARGET_MS", "20", float) / 1e3,
    )
    if not config.min_limit <= config.initial_limit <= config.max_limit:
        raise RuntimeConfigError(
            "FRAUD_ADMISSION_MIN_LIMIT <= FRAUD_ADMISSION_INITIAL_LIMIT <= "
            f"FRAUD_ADMISSION_MAX_LIMIT: got {config.min_limit}, {config.initial_limit}, "
            f"{config.max_limit}"
        )
    return config


def events_config(env: Mapping[str, str] = os.environ) -> EventsConfig:
    """Whether and how serving/events.py appends scored transactions, from FRAUD_EVENTS*."""
    return EventsConfig(
        enabled=_flag(env, "FRAUD_EVENTS", "1"),
        queue_size=_number(env, "FRAUD_EVENTS_QUEUE", "10000", int),
        batch=_number(env, "FRAUD_EVENTS_BATCH", "256", int),
        interval_s=_number(env, "FRAUD_EVENTS_INTERVAL_MS", "50", float) / 1e3,
    )


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


def _flag(env: Mapping[str, str], name: str, default: str = "") -> bool:
    value = env.get(name, default)
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
