"""Settings of the feature layer and the service, read once from the environment."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from features.spec import ENTITY_ID_MAX_LEN

PREFIX = "FEATURES_"
BACKING_STORES = ("none", "dynamodb", "bigtable")
MODES = ("standalone", "cluster", "sentinel")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob, with its environment variable `FEATURES_<FIELD NAME IN CAPS>`."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Online store. `redis://[user:password@]host:port/db`, `rediss://` for TLS;
    `REDIS_URL` works too. Scheme, credentials and TLS apply in every mode; the host is a
    seed node in cluster mode, unused in sentinel mode. Logged only with its password
    redacted."""
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
    redis_username: str = ""
    """ACL user for Redis AUTH, if not in the URL (empty: the default user)."""
    redis_password: str = ""
    """Password for Redis AUTH, if not in the URL. Never logged."""
    redis_tls_ca_file: str = ""
    """PEM CA bundle that verifies the server's certificate (rediss:// only; empty: system CAs)."""
    redis_tls_cert_file: str = ""
    """PEM client certificate, for servers that require one (rediss:// only)."""
    redis_tls_key_file: str = ""
    """PEM private key of the client certificate (rediss:// only)."""
    redis_socket_timeout_s: float = 0.05
    """Longest wait for a Redis reply before the request gets defaults."""
    redis_connect_timeout_s: float = 0.1
    """Longest wait to open a connection to Redis."""
    redis_max_connections: int = 16
    """Connections per worker; size as peak_rps x avg latency s x 1.5, plus headroom."""
    redis_pool_timeout_s: float = 0.01
    """Longest wait for a free pooled connection before serving defaults."""
    deadline_s: float = 0.015
    """Longest the feature step may take, every tier included (the 15 ms slice). At the
    deadline, groups not yet read get their last value read (flagged stale) or defaults,
    with reason `deadline`; reads still in flight fill the cache when they land."""
    stale_max_age_s: float = 300.0
    """Oldest last-read value served at the deadline; older ones give way to defaults."""
    breaker_failures: int = 5
    """Failed Redis reads in a row that open the circuit breaker (defaults, no waiting)."""
    breaker_slow_calls: int = 5
    """Slow reads (answered after the deadline), among the last FEATURES_BREAKER_WINDOW,
    that open the Redis or backing-store breaker."""
    breaker_window: int = 10
    """How many recent reads the slow-call rule looks at."""
    breaker_reset_s: float = 1.0
    """How long the breaker stays open before one probe read may go to Redis."""
    cache_ttl_s: float = 5.0
    """How long a value read from Redis is served from the in-process cache."""
    cache_maxsize: int = 100_000
    """Most (entity, group) entries the in-process cache holds per worker (LRU)."""
    max_batch: int = 256
    """Most transactions one /predict_batch request may carry."""
    max_body_bytes: int = 262_144
    """Largest request body accepted; larger ones get 413 before they are read."""
    max_id_length: int = ENTITY_ID_MAX_LEN
    """Longest user_id or merchant_id accepted; at most 64, the key format's ceiling."""
    error_log_interval_s: float = 10.0
    """At most one log line per this many seconds for repeated Redis errors."""
    backing_store: str = "none"
    """Persistent tier behind Redis: `none`, `dynamodb` or `bigtable` (docs/backing-store.md)."""
    backing_timeout_s: float = 0.01
    """Deadline of one backing-store read for the keys Redis missed or failed."""
    backing_breaker_failures: int = 5
    """Consecutive failed backing reads that open its circuit breaker."""
    backing_breaker_cooldown_s: float = 5.0
    """How long an open backing breaker skips reads before one probe is let through."""
    read_repair_max_tasks: int = 8
    """Most read-repair writes to Redis in flight per worker; beyond that they are dropped."""
    dynamodb_table: str = "features"
    """DynamoDB table: partition key `pk` (string) = the group's Redis key."""
    dynamodb_region: str = "us-east-1"
    """AWS region of the table; credentials come from the usual AWS chain."""
    dynamodb_endpoint_url: str = ""
    """Endpoint override, e.g. a local DynamoDB-API server; empty = AWS."""
    bigtable_project: str = "local"
    """Google Cloud project of the Bigtable instance."""
    bigtable_instance: str = "features"
    """Bigtable instance id; BIGTABLE_EMULATOR_HOST (read by the client) selects an emulator."""
    bigtable_table: str = "features"
    """Bigtable table: row key `{entity}#{id}`, one column family per feature group."""
    backing_retention_s: int = 7 * 86400
    """Bigtable max-age GC policy of each column family, set when the table is created."""

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
        if self.backing_store not in BACKING_STORES:
            raise ValueError(
                f"{PREFIX}BACKING_STORE must be one of {', '.join(BACKING_STORES)},"
                f" got {self.backing_store!r}"
            )
        if self.redis_mode not in MODES:
            raise ValueError(
                f"{PREFIX}REDIS_MODE must be one of {', '.join(MODES)}, got {self.redis_mode!r}"
            )
        nodes = self.node_addresses()  # raises for a malformed list
        if self.redis_mode == "sentinel" and not nodes:
            raise ValueError(f"{PREFIX}REDIS_NODES must list the sentinels in sentinel mode")

        if self.breaker_slow_calls > self.breaker_window:
            raise ValueError(
                f"{PREFIX}BREAKER_SLOW_CALLS must be at most {PREFIX}BREAKER_WINDOW"
                f" ({self.breaker_window}), got {self.breaker_slow_calls}"
            )
        if self.stale_max_age_s < self.cache_ttl_s:
            raise ValueError(f"{PREFIX}STALE_MAX_AGE_S must be at least {PREFIX}CACHE_TTL_S")
        if self.max_id_length > ENTITY_ID_MAX_LEN:
            raise ValueError(f"{PREFIX}MAX_ID_LENGTH must be at most {ENTITY_ID_MAX_LEN}")
        url = urlsplit(self.redis_url)
        scheme = url.scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{PREFIX}REDIS_URL must start with redis://, rediss:// or unix://")
        tls_files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        if any(tls_files) and scheme != "rediss":
            raise ValueError(f"{PREFIX}REDIS_TLS_* files need a rediss:// {PREFIX}REDIS_URL")
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise ValueError(f"set both {PREFIX}REDIS_TLS_CERT_FILE and _KEY_FILE, or neither")
        if self.redis_password and url.password:
            raise ValueError(f"a password is in {PREFIX}REDIS_URL and {PREFIX}REDIS_PASSWORD")

    def for_bulk(self, redis_url: str | None = None) -> Settings:
        """These settings with real timeouts, for loaders and admin commands (not the
        hot path), optionally for another Redis."""
        return dataclasses.replace(
            self,
            redis_url=redis_url or self.redis_url,
            redis_socket_timeout_s=10.0,
            redis_connect_timeout_s=2.0,
            redis_pool_timeout_s=10.0,
            redis_cluster_deadline_s=60.0,
        )

    def node_addresses(self) -> list[tuple[str, int]]:
        """`redis_nodes` as (host, port) pairs."""
        addresses = []
        for item in filter(None, (part.strip() for part in self.redis_nodes.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{PREFIX}REDIS_NODES: {item!r} is not host:port")
            addresses.append((host, int(port)))
        return addresses

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={_shown(f.name, getattr(self, f.name))!r}" for f in fields(self)
        )
        return f"Settings({shown})"


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, in the netloc and the query."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostport}"
        query = "&".join(
            f"{k}=***" if k.lower() == "password" else f"{k}={v}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable url>"


def _shown(name: str, value: object) -> object:
    if name in ("redis_password", "redis_sentinel_password"):
        return "***" if value else ""
    if name == "redis_url":
        return redact_url(str(value))
    return value


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
