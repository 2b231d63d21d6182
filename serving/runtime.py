"""The service's runtime options from FRAUD_* environment variables (and the standard
OTEL_* ones for tracing), read when service.py is imported: BentoML's (the
`@bentoml.service` decorator takes them), admission control and the appending of scored
transactions to the stream."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from serving.admission import AdmissionConfig
from serving.events import EventsConfig

# Matches every URL: BentoML's OpenTelemetry middleware then makes no span at all.
ALL_URLS = [".*"]
# The samplers the SDK knows by name (it reads OTEL_TRACES_SAMPLER itself).
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
_OTLP_HTTP = "http/protobuf"  # the one OTLP exporter installed


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


def max_requests_per_connection(env: Mapping[str, str] = os.environ) -> int:
    """Requests a keep-alive connection serves before the worker closes it (serving/
    connections.py), from FRAUD_MAX_REQUESTS_PER_CONNECTION; 0 keeps connections open."""
    raw = env.get("FRAUD_MAX_REQUESTS_PER_CONNECTION", "100")
    if raw.strip() == "0":
        return 0
    value: int = _number(env, "FRAUD_MAX_REQUESTS_PER_CONNECTION", "100", int)
    return value


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
        "tracing": tracing_config(env),
    }


class TracingMode(StrEnum):
    """Who makes the spans, and who exports them."""

    OFF = "off"  # no span at all, not even BentoML's request span
    OTEL = "otel"  # the SDK, from the OTEL_* variables (serving/tracing.py, trace_gate.py)
    BENTOML = "bentoml"  # BentoML's provider, from its own tracing configuration


def tracing_mode(env: Mapping[str, str] = os.environ) -> TracingMode:
    """OTEL when an OTLP endpoint is given, BENTOML for FRAUD_TRACING=1 without one, else
    OFF; FRAUD_TRACING=0, OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none and
    OTEL_TRACES_SAMPLER=always_off each turn it off. Every variable that is set is
    checked, whether or not tracing ends up on: the SDK would only warn about a typo."""
    asked = _tristate(env, "FRAUD_TRACING")
    disabled = _boolean(env, "OTEL_SDK_DISABLED")
    raw_exporter = env.get("OTEL_TRACES_EXPORTER", "")
    exporter = raw_exporter.strip().lower()
    if exporter not in ("", "otlp", "none"):
        raise RuntimeConfigError(f"OTEL_TRACES_EXPORTER={raw_exporter!r}: must be otlp or none")
    endpoint = _otlp_endpoint(env)
    _otlp_protocol(env)
    sampler = _sampler(env)
    if asked is False or disabled or exporter == "none" or sampler == "always_off":
        return TracingMode.OFF
    if endpoint is not None:
        return TracingMode.OTEL
    return TracingMode.BENTOML if asked else TracingMode.OFF


def tracing_config(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """BentoML's `tracing` section: for BENTOML nothing, so its own configuration applies;
    otherwise no request span from BentoML (its URL exclusion matches every URL). With
    OTEL the service's own middleware makes the request span (serving/trace_gate.py)."""
    # BentoML's middleware makes a span for every request even when nothing exports it
    # or its sampler drops it: the most CPU of any middleware (load_tests/bench_tracing.py).
    return {} if tracing_mode(env) is TracingMode.BENTOML else {"excluded_urls": ALL_URLS}


def trace_sampler(env: Mapping[str, str] = os.environ) -> tuple[str, float]:
    """OTEL_TRACES_SAMPLER and its ratio, as the specification defaults them:
    parentbased_always_on, and 1.0 for a ratio sampler without OTEL_TRACES_SAMPLER_ARG."""
    name = _sampler(env) or "parentbased_always_on"
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    return name, float(raw) if name in _RATIO_SAMPLERS and raw else 1.0


def _otlp_endpoint(env: Mapping[str, str]) -> str | None:
    endpoint = None
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        raw = env.get(name, "").strip()
        if not raw:
            continue
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RuntimeConfigError(f"{name}={raw!r}: must be an http:// or https:// URL")
        endpoint = raw  # the signal's own variable, checked last, wins
    return endpoint


def _otlp_protocol(env: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        raw = env.get(name, "").strip()
        if raw and raw != _OTLP_HTTP:
            raise RuntimeConfigError(f"{name}={raw!r}: only {_OTLP_HTTP} is supported")


def _sampler(env: Mapping[str, str]) -> str:
    """OTEL_TRACES_SAMPLER, lower case ("" if unset), checked with its ratio."""
    raw_name = env.get("OTEL_TRACES_SAMPLER", "")
    name = raw_name.strip().lower()
    if name and name not in _SAMPLERS:
        raise RuntimeConfigError(
            f"OTEL_TRACES_SAMPLER={raw_name!r}: must be one of {', '.join(_SAMPLERS)}"
        )
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if name in _RATIO_SAMPLERS and raw:
        try:
            ratio = float(raw)
        except ValueError:
            ratio = math.nan
        if not 0.0 <= ratio <= 1.0:
            raise RuntimeConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={raw!r}: must be a ratio from 0 to 1 for {name}"
            )
    return name


def _tristate(env: Mapping[str, str], name: str) -> bool | None:
    """1, 0, or None when unset (or empty)."""
    value = env.get(name, "")
    if value not in ("", "0", "1"):
        raise RuntimeConfigError(f"{name}={value!r}: must be 0 or 1")
    return None if value == "" else value == "1"


def _boolean(env: Mapping[str, str], name: str) -> bool:
    """The OpenTelemetry spelling: true or false, any case; unset is false."""
    raw = env.get(name, "")
    value = raw.strip().lower()
    if value not in ("", "true", "false"):
        raise RuntimeConfigError(f"{name}={raw!r}: must be true or false")
    return value == "true"


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
