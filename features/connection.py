"""The Redis client every reader and writer uses: bounded pool, short timeouts, no retries."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from features.settings import Settings


def open_redis(settings: Settings) -> aioredis.Redis:
    """A client for the online store; connections open lazily, in the running loop."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        # redis-py 8 retries 10 times by default; on the hot path a failed read
        # is answered with defaults instead.
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)
