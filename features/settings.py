"""Settings of the feature layer and the service, on pydantic-settings."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    AliasGenerator,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from features.spec import ENTITY_ID_MAX_LEN

PREFIX = "FEATURES_"


def _env_name(field_name: str) -> str:
    """The environment variable of a Settings field: `FEATURES_<FIELD NAME IN CAPS>`."""
    return PREFIX + field_name.upper()


class Settings(BaseSettings):
    """Every knob, with its environment variable `FEATURES_<FIELD NAME IN CAPS>`.

    `Settings(**fields)` takes defaults and keywords only; `Settings.from_env()` reads the
    environment. A bad value raises pydantic's ValidationError (a ValueError) naming its
    variable. Each field's description is its row in the README's table."""

    model_config = SettingsConfigDict(
        # The variable is the alias, so pydantic's errors name it; keywords use the field name.
        alias_generator=AliasGenerator(validation_alias=_env_name),
        validate_by_name=True,
        env_prefix=PREFIX,  # so the field name itself is no variable (`deadline_s` is not read)
        case_sensitive=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,  # a bad URL or TLS option must not echo its password
        frozen=True,
    )

    # Descriptions in Field(), not attribute docstrings: those make pydantic parse this
    # module's source at import (~40 ms).
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices(_env_name("redis_url"), "REDIS_URL"),
        description=(
            "Online store. `redis://[user:password@]host:port/db`, `rediss://` for TLS; `REDIS_URL`"
            " works too. Scheme, credentials and TLS apply in every mode; the host is a seed node"
            " in cluster mode, unused in sentinel mode. Logged only with its password redacted."
        ),
    )
    redis_mode: Literal["standalone", "cluster", "sentinel"] = Field(
        default="standalone",
        description=(
            "`standalone` (one server or a proxy), `cluster` (Redis Cluster) or `sentinel`."
        ),
    )
    redis_nodes: str = Field(
        default="",
        description=(
            "`host:port,host:port`: more cluster seed nodes (cluster), or the sentinels (sentinel)."
        ),
    )
    redis_sentinel_service: str = Field(
        default="mymaster",
        description="Name of the master the sentinels monitor (sentinel mode).",
    )
    redis_sentinel_password: str = Field(
        default="",
        description="Password of the sentinels themselves, if they require one (sentinel mode).",
    )
    redis_cluster_deadline_s: PositiveFloat = Field(
        default=0.1,
        description="Longest one cluster read may take, redirects and slot-map reloads included.",
    )
    redis_username: str = Field(
        default="",
        description="ACL user for Redis AUTH, if not in the URL (empty: the default user).",
    )
    redis_password: str = Field(
        default="",
        description="Password for Redis AUTH, if not in the URL. Never logged.",
    )
    redis_tls_ca_file: str = Field(
        default="",
        description=(
            "PEM CA bundle that verifies the server's certificate (rediss:// only; empty: system"
            " CAs)."
        ),
    )
    redis_tls_cert_file: str = Field(
        default="",
        description="PEM client certificate, for servers that require one (rediss:// only).",
    )
    redis_tls_key_file: str = Field(
        default="",
        description="PEM private key of the client certificate (rediss:// only).",
    )
    redis_socket_timeout_s: PositiveFloat = Field(
        default=0.05,
        description="Longest wait for a Redis reply before the request gets defaults.",
    )
    redis_connect_timeout_s: PositiveFloat = Field(
        default=0.1,
        description="Longest wait to open a connection to Redis.",
    )
    redis_max_connections: PositiveInt = Field(
        default=16,
        description=(
            "Pooled connections per worker (per node in cluster mode): cluster reads, writes and"
            " read repair; standalone and Sentinel reads use one connection of their own. Size as"
            " peak_rps x avg latency s x 1.5, plus headroom."
        ),
    )
    redis_pool_timeout_s: PositiveFloat = Field(
        default=0.01,
        description=(
            "Longest wait for a free pooled connection (cluster reads, writes) before serving"
            " defaults."
        ),
    )
    deadline_s: PositiveFloat = Field(
        default=0.015,
        description=(
            "Longest the feature step may take, every tier included (the 15 ms slice). At the"
            " deadline, groups not yet read get their last value read (flagged stale) or defaults,"
            " with reason `deadline`; reads still in flight fill the cache when they land."
        ),
    )
    stale_max_age_s: PositiveFloat = Field(
        default=300.0,
        description=(
            "Oldest last-read value served at the deadline; older ones give way to defaults."
        ),
    )
    breaker_failures: PositiveInt = Field(
        default=5,
        description=(
            "Failed Redis reads in a row that open the circuit breaker (defaults, no waiting)."
        ),
    )
    breaker_slow_calls: PositiveInt = Field(
        default=5,
        description=(
            "Slow reads (answered after the deadline), among the last FEATURES_BREAKER_WINDOW, that"
            " open the Redis or backing-store breaker."
        ),
    )
    breaker_window: PositiveInt = Field(
        default=10,
        description="How many recent reads the slow-call rule looks at.",
    )
    breaker_reset_s: PositiveFloat = Field(
        default=1.0,
        description="How long the breaker stays open before one probe read may go to Redis.",
    )
    cache_ttl_s: PositiveFloat = Field(
        default=5.0,
        description="How long a value read from Redis is served from the in-process cache.",
    )
    cache_invalidation: bool = Field(
        default=True,
        description=(
            "Redis pushes an invalidation when a key this worker read changes (CLIENT TRACKING"
            " over RESP3, standalone and Sentinel): the key leaves the cache at once. Off, or"
            " where unsupported (cluster mode, a server or proxy without RESP3), entries last"
            " FEATURES_CACHE_TTL_S (docs/cache-invalidation.md)."
        ),
    )
    cache_tracked_ttl_s: PositiveFloat = Field(
        default=60.0,
        description=(
            "How long a cached value is served while invalidation is live (never less than"
            " FEATURES_CACHE_TTL_S); when its connection is lost, FEATURES_CACHE_TTL_S again until"
            " the values are read anew."
        ),
    )
    cache_maxsize: PositiveInt = Field(
        default=100_000,
        description="Most (entity, group) entries the in-process cache holds per worker (LRU).",
    )
    max_batch: PositiveInt = Field(
        default=256,
        description="Most transactions one /predict_batch request may carry.",
    )
    max_body_bytes: PositiveInt = Field(
        default=262_144,
        description="Largest request body accepted; larger ones get 413 before they are read.",
    )
    max_id_length: PositiveInt = Field(
        default=ENTITY_ID_MAX_LEN,
        le=ENTITY_ID_MAX_LEN,
        description=(
            "Longest user_id or merchant_id accepted; at most 64, the key format's ceiling."
        ),
    )
    error_log_interval_s: PositiveFloat = Field(
        default=10.0,
        description="At most one log line per this many seconds for repeated Redis errors.",
    )
    backing_store: Literal["none", "dynamodb", "bigtable"] = Field(
        default="none",
        description=(
            "Persistent tier behind Redis: `none`, `dynamodb` or `bigtable`"
            " (docs/backing-store.md)."
        ),
    )
    backing_timeout_s: PositiveFloat = Field(
        default=0.01,
        description="Deadline of one backing-store read for the keys Redis missed or failed.",
    )
    backing_breaker_failures: PositiveInt = Field(
        default=5,
        description="Consecutive failed backing reads that open its circuit breaker.",
    )
    backing_breaker_cooldown_s: PositiveFloat = Field(
        default=5.0,
        description="How long an open backing breaker skips reads before one probe is let through.",
    )
    read_repair_max_tasks: PositiveInt = Field(
        default=8,
        description=(
            "Most read-repair writes to Redis in flight per worker; beyond that they are dropped."
        ),
    )
    dynamodb_table: str = Field(
        default="features",
        description="DynamoDB table: partition key `pk` (string) = the group's Redis key.",
    )
    dynamodb_region: str = Field(
        default="us-east-1",
        description="AWS region of the table; credentials come from the usual AWS chain.",
    )
    dynamodb_endpoint_url: str = Field(
        default="",
        description="Endpoint override, e.g. a local DynamoDB-API server; empty = AWS.",
    )
    bigtable_project: str = Field(
        default="local",
        description="Google Cloud project of the Bigtable instance.",
    )
    bigtable_instance: str = Field(
        default="features",
        description=(
            "Bigtable instance id; BIGTABLE_EMULATOR_HOST (read by the client) selects an emulator."
        ),
    )
    bigtable_table: str = Field(
        default="features",
        description="Bigtable table: row key `{entity}#{id}`, one column family per feature group.",
    )
    backing_retention_s: PositiveInt = Field(
        default=7 * 86400,
        description=(
            "Bigtable max-age GC policy of each column family, set when the table is created."
        ),
    )

    served_log_sample_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Share of scored transactions written to the served-feature log, 0-1 (0: off)."
        ),
    )
    served_log_dir: str = Field(
        default="",
        description=(
            "Directory of the served-feature log's Parquet files; required when the sample rate"
            " is above 0, created if absent."
        ),
    )
    served_log_queue_size: PositiveInt = Field(
        default=10_000,
        description=(
            "Most sampled records waiting for the log's writer per worker; beyond that they are"
            " dropped and counted."
        ),
    )
    served_log_roll_rows: PositiveInt = Field(
        default=100_000,
        description="Most records in one served-log file before it is closed and a new one begun.",
    )
    served_log_roll_s: PositiveFloat = Field(
        default=300.0,
        description=(
            "Longest a served-log file stays open: its records become readable when it closes."
        ),
    )
    stream_key: str = Field(
        default="stream:transactions",
        min_length=1,
        description=(
            "Redis Stream of scored transactions: the service appends to it, `python -m"
            " features.stream` consumes it; malformed events go to `<key>:dead`."
        ),
    )
    stream_group: str = Field(
        default="velocity",
        min_length=1,
        description="Consumer group of the velocity consumers on the stream.",
    )
    stream_maxlen: PositiveInt = Field(
        default=1_000_000,
        description=(
            "Length the stream and its dead-letter stream are trimmed to (about: `XADD MAXLEN ~`)."
        ),
    )
    stream_batch: PositiveInt = Field(
        default=500,
        description="Most events a consumer reads, applies and acknowledges at once.",
    )
    stream_block_ms: PositiveInt = Field(
        default=1000,
        le=5000,
        description=(
            "Longest a consumer's read waits for new events before it looks again (at most 5000)."
        ),
    )
    stream_claim_idle_s: PositiveFloat = Field(
        default=30.0,
        description=(
            "Events read but unacknowledged for this long (their consumer died) are claimed by"
            " another consumer and applied again (idempotently)."
        ),
    )
    stream_max_deliveries: PositiveInt = Field(
        default=5,
        description=(
            "An event delivered more times than this (retried after its own failure, or claimed"
            " from consumers that died) goes to the dead-letter stream, reason `delivery_limit`."
        ),
    )
    stream_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description=("Port of a consumer's Prometheus endpoint (`features_stream_*`); 0: none."),
    )
    stream_metrics_addr: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the consumer's Prometheus endpoint listens on.",
    )
    stream_report_interval_s: PositiveFloat = Field(
        default=10.0,
        description="A consumer logs its counts once per this many seconds.",
    )
    stream_max_user_events: PositiveInt = Field(
        default=10_000,
        description=(
            "Most events a user's 24 h activity log keeps (the oldest go first); its 24 h"
            " counts stop there."
        ),
    )
    stream_max_merchant_events: PositiveInt = Field(
        default=1_000_000,
        description=(
            "Most events a merchant's 24 h activity log keeps (the oldest go first);"
            " merchant_tx_count_24h stops there."
        ),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read every field from `environ`; a bad value raises ValueError naming its key."""
        return cls(**_EnvironSource(cls, environ)())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keywords only: the environment comes in through from_env, so nothing exported in
        # a shell changes the settings a test builds, and no .env or secrets file is read.
        return (init_settings,)

    @model_validator(mode="after")
    def _check(self) -> Settings:
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
        if self.served_log_sample_rate > 0 and not self.served_log_dir:
            raise ValueError(
                f"{PREFIX}SERVED_LOG_DIR must be set when {PREFIX}SERVED_LOG_SAMPLE_RATE is above 0"
            )
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{PREFIX}REDIS_URL must start with redis://, rediss:// or unix://")
        tls_files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        if any(tls_files) and url.scheme != "rediss":
            raise ValueError(f"{PREFIX}REDIS_TLS_* files need a rediss:// {PREFIX}REDIS_URL")
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise ValueError(f"set both {PREFIX}REDIS_TLS_CERT_FILE and _KEY_FILE, or neither")
        if self.redis_password and url.password:
            raise ValueError(f"a password is in {PREFIX}REDIS_URL and {PREFIX}REDIS_PASSWORD")
        return self

    def for_bulk(self, redis_url: str | None = None) -> Settings:
        """These settings with real timeouts, for loaders and admin commands (not the
        hot path), optionally for another Redis."""
        return type(self)(
            **self.model_dump()
            | {
                "redis_url": redis_url or self.redis_url,
                "redis_socket_timeout_s": 10.0,
                "redis_connect_timeout_s": 2.0,
                "redis_pool_timeout_s": 10.0,
                "redis_cluster_deadline_s": 60.0,
            }
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

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # pydantic's repr and str both come from here: no password leaves through either.
        for name, value in super().__repr_args__():
            yield name, _shown(name, value)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return dict(self._environ)  # case-sensitive, as Settings' config asks


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


def _shown(name: str | None, value: object) -> object:
    if name in ("redis_password", "redis_sentinel_password"):
        return "***" if value else ""
    if name == "redis_url":
        return redact_url(str(value))
    return value
