"""Prometheus metrics of the feature layer (names start with `features_`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from features.spec import GROUPS

# Sub-millisecond resolution: the layer should sit far below its 15 ms budget.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025,
    0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip

# Seconds to a week, and every group's freshness window (1 h, 24 h) as a bound: the share
# of served values older than their window reads straight off one bucket.
AGE_BUCKETS_S = tuple(
    sorted(
        {1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 172800, 604800}
        | {group.freshness_s for group in GROUPS}
    )
)

RETRIEVAL_SECONDS = Histogram(
    "features_retrieval_seconds",
    "Feature retrieval time per request, by the slowest source it needed",
    ["source"],
    buckets=LATENCY_BUCKETS_S,
)
CACHE_LOOKUPS = Counter(
    "features_cache_lookups_total",
    "In-process cache lookups per (entity, group) key",
    ["result"],
)
SHARED_READS = Counter(
    "features_singleflight_shared_total",
    "Keys that joined a Redis read already in flight instead of sending their own",
)
DEFAULTS = Counter(
    "features_defaults_total",
    "Feature groups or single features served their training defaults, by reason",
    ["group", "reason"],
)
SERVED = Counter(
    "features_served_total",
    "Feature groups served, by where their values came from: the denominator of the"
    " per-feature default and corrupt rates",
    ["group", "source"],
)
FEATURE_DEFAULTS = Counter(
    "features_feature_defaults_total",
    "Single features served their training default, by reason",
    ["group", "feature", "reason"],
)
SERVED_AGE = Histogram(
    "features_served_age_seconds",
    "Age of the values served per group: the wall clock when served minus their event"
    " time (defaults have none)",
    ["group"],
    buckets=AGE_BUCKETS_S,
)
FRESHNESS_WINDOW = Gauge(
    "features_freshness_window_seconds",
    "Each group's freshness window (features/spec.py), to compare served ages with",
    ["group"],
    multiprocess_mode="livemax",
)
REDIS_ERRORS = Counter(
    "features_redis_errors_total",
    "Failed Redis reads, by kind",
    ["kind"],
)
REDIS_UP = Gauge(
    "features_redis_up",
    "1 if the last Redis read succeeded, 0 if it failed",
    multiprocess_mode="liveall",
)
CORRUPT_VALUES = Counter(
    "features_corrupt_values_total",
    "Stored values that failed to parse or check, served as their default",
    ["group", "feature"],
)
DEADLINE_EXCEEDED = Counter(
    "features_deadline_exceeded_total",
    "Feature groups no store answered within the deadline, by what was served instead",
    ["group", "served"],  # served: stale (the last value read) or default
)
BACKING_READS = Counter(
    "features_backing_reads_total",
    "Reads of the backing store for keys Redis missed or failed, by outcome",
    ["store", "result"],
)
BACKING_SECONDS = Histogram(
    "features_backing_read_seconds",
    "Backing-store read time per batch of keys",
    ["store"],
    buckets=LATENCY_BUCKETS_S,
)
READ_REPAIRS = Counter(
    "features_read_repairs_total",
    "Keys written back to Redis from the backing store, by outcome",
    ["result"],
)
STALE = Counter(
    "features_stale_total",
    "Feature groups served with an event time older than their freshness window",
    ["group", "source"],
)
BREAKER_STATE = Gauge(
    "features_breaker_state",
    "Circuit breaker per store: 0 closed, 1 half-open (probing), 2 open (no reads sent)",
    ["dependency"],
    multiprocess_mode="liveall",
)
BREAKER_TRANSITIONS = Counter(
    "features_breaker_transitions_total",
    "Circuit breaker state changes, by store and the state entered",
    ["dependency", "state"],
)
GC_PAUSE_SECONDS = Histogram(
    "python_gc_pause_seconds",
    "Stop-the-world garbage collections in the serving worker, by generation",
    ["generation"],
    buckets=LATENCY_BUCKETS_S,
)
GC_PAUSE_MAX_SECONDS = Gauge(
    "python_gc_pause_max_seconds",
    "Longest garbage collection since the worker started, by generation",
    ["generation"],
    multiprocess_mode="livemax",
)
SERVED_LOG_RECORDS = Counter(
    "features_served_log_records_total",
    "Sampled records of the served-feature log, by outcome",
    ["result"],  # written (in a closed file), dropped (queue full or log closed), failed
)
SERVED_LOG_FILES = Counter(
    "features_served_log_files_total",
    "Served-feature log files closed and renamed into place",
)
INVALIDATIONS = Counter(
    "features_cache_invalidations_total",
    "Invalidation messages Redis pushed to this worker: keys changed, or the server flushed",
    ["kind"],  # keys / flush
)
INVALIDATED_KEYS = Counter(
    "features_cache_invalidated_keys_total",
    "Keys named by invalidations, by their effect on the cache",
    # dropped / absent (of every key named); in_flight (of those, also): a read of it was
    # in flight, so its reply is not cached
    ["result"],
)
TRACKING_STATE = Gauge(
    "features_cache_tracking",
    "Cache invalidation: 0 off (not asked, cluster mode or not supported), 1 lost (short"
    " TTL, reconnecting), 2 live (tracked TTL)",
    multiprocess_mode="liveall",
)
TRACKING_SESSIONS = Counter(
    "features_cache_tracking_sessions_total",
    "Invalidation sessions started and lost, and background reconnects that failed",
    ["event"],  # started / lost / reconnect_failed
)
