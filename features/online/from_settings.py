"""The FeatureStore a deployment's settings describe: its tiers, breakers and deadline."""

from __future__ import annotations

from features.backing import open_backing
from features.breaker import CircuitBreaker
from features.connection import Client
from features.online.store import FeatureStore
from features.settings import Settings


def open_store(settings: Settings, client: Client) -> FeatureStore:
    """The store reading with `client`'s options (the client is the caller's, closed by
    the caller) over its own multiplexed connection (outside cluster mode), with the
    backing store `settings` name, if any. Nothing connects until `FeatureStore.open`."""
    backing = open_backing(settings)
    return FeatureStore(
        client,
        deadline_s=settings.deadline_s,
        stale_max_age_s=settings.stale_max_age_s,
        cache_ttl_s=settings.cache_ttl_s,
        cache_maxsize=settings.cache_maxsize,
        invalidation=settings.cache_invalidation,
        cache_tracked_ttl_s=settings.cache_tracked_ttl_s,
        error_log_interval_s=settings.error_log_interval_s,
        backing=backing,
        backing_timeout_s=settings.backing_timeout_s,
        # A breaker sets its state gauge when built: none for a store that is not there.
        backing_breaker=None
        if backing is None
        else CircuitBreaker(
            name=backing.name,
            failure_threshold=settings.backing_breaker_failures,
            slow_threshold=settings.breaker_slow_calls,
            window=settings.breaker_window,
            reset_s=settings.backing_breaker_cooldown_s,
        ),
        read_repair_max_tasks=settings.read_repair_max_tasks,
        multiplex=True,
        breaker=CircuitBreaker(
            failure_threshold=settings.breaker_failures,
            slow_threshold=settings.breaker_slow_calls,
            window=settings.breaker_window,
            reset_s=settings.breaker_reset_s,
        ),
    )
