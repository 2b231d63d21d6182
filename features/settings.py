"""Settings of the feature layer and the service, read once from the environment."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

PREFIX = "FEATURES_"
MODES = ("standalone", "cluster", "sentinel")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob, with its environment variable `FEATURES_<FIELD NAME IN CAPS>`."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Online store. `redis://[user:password@]host:port/db`, `rediss://` for TLS (TLS
    options as query parameters); `REDIS_URL` works too. Scheme, credentials and TLS
    apply in every mode; the host is a seed node in cluster mode, unused in sentinel mode."""
    redis_mode: str = "standalone"
    """`standalone` (one server or a proxy), `cluster` (Redis Cluster) or `sentinel`."""
    redis_nodes: str = ""
    """`host:port,host:port`: more cluster seed nodes (cluster), or the sentinels (sentinel)."""
    redis_sentinel_service: str = "mymaster"
    """Name of the master the sentinels monitor (sentinel mode)."""
    redis_sentinel_password: str = ""
    """Password of the sentinels themselves, if they require one (sentinel mode)."""
    redis_cluster_deadline_s: float = 0.1
    """Longest one cluster read may take, redirects and slot-map reloads included."""
    redis_socket_timeout_s: float = 0.05
    """Longest wait for a Redis reply before the request gets defaults."""
    redis_connect_timeout_s: float = 0.1
    """Longest wait to open a connection to Redis."""
    redis_max_connections: int = 16
    """Connections per worker; size as peak_rps x avg latency s x 1.5, plus headroom."""
    redis_pool_timeout_s: float = 0.01
    """Longest wait for a free pooled connection before serving defaults."""
    cache_ttl_s: float = 5.0
    """How long a value read from Redis is served from the in-process cache."""
    cache_maxsize: int = 100_000
    """Most (entity, group) entries the in-process cache holds per worker (LRU)."""
    max_batch: int = 256
    """Most transactions one /predict_batch request may carry."""
    error_log_interval_s: float = 10.0
    """At most one log line per this many seconds for repeated Redis errors."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read every field from `environ`; a bad value raises ValueError naming its key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = PREFIX + f.name.upper()
            raw = environ.get(key)
            if raw is None and f.name == "redis_url":
                key, raw = "REDIS_URL", environ.get("REDIS_URL")
            if raw is None:
                continue
            values[f.name] = _parse(key, raw, type(f.default))
        return cls(**values)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and value <= 0:
                raise ValueError(f"{PREFIX}{f.name.upper()} must be positive, got {value}")
        if self.redis_mode not in MODES:
            raise ValueError(
                f"{PREFIX}REDIS_MODE must be one of {', '.join(MODES)}, got {self.redis_mode!r}"
            )
        nodes = self.node_addresses()  # raises for a malformed list
        if self.redis_mode == "sentinel" and not nodes:
            raise ValueError(f"{PREFIX}REDIS_NODES must list the sentinels in sentinel mode")

    def node_addresses(self) -> list[tuple[str, int]]:
        """`redis_nodes` as (host, port) pairs."""
        addresses = []
        for item in filter(None, (part.strip() for part in self.redis_nodes.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{PREFIX}REDIS_NODES: {item!r} is not host:port")
            addresses.append((host, int(port)))
        return addresses


def _parse(key: str, raw: str, kind: type) -> Any:
    if kind is str:
        return raw
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ValueError(f"{key} must be a {kind.__name__}, got {raw!r}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {raw!r}")
    return value
