"""The service's runtime options from FRAUD_* environment variables (and the standard
OTEL_* ones for tracing), read when service.py is imported: BentoML's (the
`@bentoml.service` decorator takes them) and admission control."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from serving.admission import AdmissionConfig

# Matches every URL: BentoML's OpenTelemetry middleware then makes no span at all.
ALL_URLS = [".*"]
# OTEL_TRACES_SAMPLER values BentoML's parent-based ratio sampler can stand for: a fixed
# rate, or None for the ratio in OTEL_TRACES_SAMPLER_ARG. always_off turns tracing off.
_SAMPLERS: dict[str, float | None] = {
    "always_on": 1.0,
    "parentbased_always_on": 1.0,
    "parentbased_always_off": 0.0,
    "traceidratio": None,
    "parentbased_traceidratio": None,
}
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


def tracing_config(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """BentoML's `tracing` section: OTLP/HTTP export when an OTLP endpoint is given (or
    FRAUD_TRACING=1 leaves the exporter to BentoML's own configuration), else no span.

    Every variable that is set is checked, whether or not tracing ends up on. Keys set
    here are BentoML's service defaults: its configuration file or BENTOML_CONFIG_OPTIONS
    (`services.FraudService.tracing.*`) override them key by key."""
    asked = _tristate(env, "FRAUD_TRACING")
    disabled = _boolean(env, "OTEL_SDK_DISABLED")
    raw_exporter = env.get("OTEL_TRACES_EXPORTER", "")
    exporter = raw_exporter.strip().lower()
    if exporter not in ("", "otlp", "none"):
        raise RuntimeConfigError(f"OTEL_TRACES_EXPORTER={raw_exporter!r}: must be otlp or none")
    endpoint = _otlp_endpoint(env)
    _otlp_protocol(env)
    rate = _sample_rate(env)
    # BentoML records a span for every request even when nothing exports it: ~20
    # objects a request for the collector, and the most CPU of any middleware.
    off = {"excluded_urls": ALL_URLS}
    if asked is False or disabled or exporter == "none" or rate == "off":
        return off
    if endpoint is None:
        if not asked:
            return off
        # BentoML's own configuration names the exporter (or none: spans, no export).
        return {} if rate is None else {"sample_rate": rate}
    # The exporter reads the OTEL_EXPORTER_OTLP_* variables itself: endpoint (plus
    # /v1/traces for the generic one), headers, timeout, compression, certificate.
    return {
        "exporter_type": "otlp",
        "sample_rate": 1.0 if rate is None else rate,  # the standard's parentbased_always_on
        "otlp": {"protocol": "http"},
    }


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


def _sample_rate(env: Mapping[str, str]) -> float | str | None:
    """BentoML's sample_rate for OTEL_TRACES_SAMPLER (and _ARG): None when unset, "off"
    for always_off."""
    raw_name = env.get("OTEL_TRACES_SAMPLER", "")
    name = raw_name.strip().lower()
    if not name:
        return None
    if name == "always_off":
        return "off"
    if name not in _SAMPLERS:
        raise RuntimeConfigError(
            f"OTEL_TRACES_SAMPLER={raw_name!r}: must be always_off or one of "
            + ", ".join(_SAMPLERS)
        )
    fixed = _SAMPLERS[name]
    if fixed is not None:
        return fixed
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not raw:
        return 1.0  # the standard's default ratio
    try:
        ratio = float(raw)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:
        raise RuntimeConfigError(
            f"OTEL_TRACES_SAMPLER_ARG={raw!r}: must be a ratio from 0 to 1 for {name}"
        )
    return ratio


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
