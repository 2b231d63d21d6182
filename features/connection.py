"""The Redis client every reader and writer uses: bounded pool, short timeouts, no retries."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from features.settings import Settings


def open_redis(settings: Settings) -> aioredis.Redis:
    """A client for the online store; connections open lazily, in the running loop.

    The pool holds at most `redis_max_connections`; a read that finds none free waits
    `redis_pool_timeout_s`, then fails (and is served defaults): no unbounded queue.
    """
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
        **_auth_and_tls(settings),
    )
    return aioredis.Redis(connection_pool=pool)


def _auth_and_tls(settings: Settings) -> dict[str, Any]:
    # Credentials in the URL win over these (redis-py applies the URL last);
    # Settings refuses a password given both ways.
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password
    if urlsplit(settings.redis_url).scheme == "rediss":
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        if settings.redis_tls_ca_file:
            options["ssl_ca_certs"] = settings.redis_tls_ca_file
        if settings.redis_tls_cert_file:
            options["ssl_certfile"] = settings.redis_tls_cert_file
            options["ssl_keyfile"] = settings.redis_tls_key_file
    return options
