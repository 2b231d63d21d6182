"""The Redis client every reader and writer uses: bounded pool, short timeouts, no retries.

`open_redis` returns a standalone client, a Redis Cluster client or a Sentinel-managed
master client, by `Settings.redis_mode`; readers and writers use all three the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features._log import RateLimitedLog
from features.settings import Settings

logger = logging.getLogger(__name__)

Client = aioredis.Redis | RedisCluster
"""What `open_redis` returns; both have `pipeline()` with the same read and write calls."""

SLOT_MAP_REFRESH_INTERVAL_S = 0.2
"""Least time between two slot-map reloads that errors trigger (cluster mode)."""

# Replies that say "this node cannot answer now", not "this key holds bad data".
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    AskError,  # MOVED too: a redirect still failing means the topology is in flux
)


def open_redis(settings: Settings) -> Client:
    """A client for the online store; connections open lazily, in the running loop.

    A pool holds at most `redis_max_connections` (per node in a cluster); a read that
    finds none free waits `redis_pool_timeout_s`, then fails and is served defaults.
    """
    if settings.redis_mode == "cluster":
        return _open_cluster(settings)
    if settings.redis_mode == "sentinel":
        return _open_sentinel(settings)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        **_connection_kwargs(settings),
    )
    return aioredis.Redis(connection_pool=pool)


def _connection_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        # redis-py 8 retries 10 times by default; on the hot path a failed read
        # is answered with defaults instead.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
        **_auth_and_tls(settings),
    }


def _open_cluster(settings: Settings) -> RedisCluster:
    kwargs = _connection_kwargs(settings)
    del kwargs["retry_on_timeout"]  # the cluster client retries by `retry` alone
    return _Cluster.from_url(
        settings.redis_url,
        startup_nodes=[ClusterNode(host, port) for host, port in settings.node_addresses()],
        max_connections=settings.redis_max_connections,  # per node
        deadline_s=settings.redis_cluster_deadline_s,
        error_log_interval_s=settings.error_log_interval_s,
        **kwargs,
    )


def _open_sentinel(settings: Settings) -> aioredis.Redis:
    kwargs: dict[str, Any] = dict(parse_url(settings.redis_url))
    for name in ("host", "port", "path"):
        kwargs.pop(name, None)
    ssl = kwargs.pop("connection_class", None) is SSLConnection
    tls = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "password": settings.redis_sentinel_password or None,
        "ssl": ssl,
        **tls,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.node_addresses(), sentinel_kwargs=sentinel_kwargs
    )
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_sentinel_service,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        **(kwargs | _connection_kwargs(settings) | {"ssl": ssl}),
    )
    return client


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel-resolved master connections, waiting `timeout` for a free one like
    standalone mode does (the plain SentinelConnectionPool fails at once when full)."""


class _Cluster(RedisCluster):
    """RedisCluster whose pipelines end by a deadline, raise only RedisError, and
    reload the slot map in the background after a node fails.

    redis-py 8.1 with retries off never reloads the slot map after a pipeline's
    connection error, re-sends redirected commands one by one, and sleeps 0.25 s on
    CLUSTERDOWN: without this a failed master's keys would fail until a restart, or
    a request could wait seconds.
    """

    def __init__(
        self, *args: Any, deadline_s: float, error_log_interval_s: float = 10.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.deadline_s = deadline_s
        self._reload_log = RateLimitedLog(logger, error_log_interval_s)
        self._refresh: asyncio.Task[None] | None = None
        self._last_refresh = -float("inf")
        self._loading: asyncio.Task[Any] | None = None

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _Pipeline(self, transaction)  # type: ignore[abstract]

    async def ready(self) -> None:
        """Load the slot map (and command table) if the client must, in a task that a
        request's deadline cannot cancel: on a slow host a load that each deadline
        restarted could never finish."""
        if not self._initialize:  # RedisCluster's own flag: set after errors too
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.get_running_loop().create_task(self.initialize())
            self._loading.add_done_callback(_retrieve)
        await asyncio.shield(self._loading)

    def refresh_slot_map_soon(self) -> None:
        """Reload the slot map in the background, at most once per interval."""
        now = time.monotonic()
        if self._refresh is not None and not self._refresh.done():
            return
        if now - self._last_refresh < SLOT_MAP_REFRESH_INTERVAL_S:
            return
        self._last_refresh = now
        self._refresh = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            async with asyncio.timeout(max(self.deadline_s, 1.0)):
                await self.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            # Until one succeeds, reads of a moved or failed master's keys get defaults.
            # The next failing read schedules another attempt.
            self._reload_log.failed("cluster slot map reload", exc)

    async def aclose(self) -> None:
        for task in (self._refresh, self._loading):
            if task is not None:
                task.cancel()
        await super().aclose()


class _Pipeline(ClusterPipeline):
    """A ClusterPipeline bounded by its client's deadline (see `_Cluster`)."""

    cluster_client: _Cluster

    async def initialize(self) -> _Pipeline:
        # `async with` would load the slot map here, unbounded and raising
        # RedisClusterException; execute() does it within the deadline instead.
        return self

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        client = self.cluster_client
        try:
            async with asyncio.timeout(client.deadline_s):
                await client.ready()
                replies = await super().execute(raise_on_error, allow_redirections)
        except RedisClusterException as exc:  # not a RedisError: e.g. no reachable node
            client.refresh_slot_map_soon()
            raise RedisConnectionError(str(exc)) from exc
        except (RedisError, OSError, TimeoutError) as exc:
            if not _is_data_error(exc) and not isinstance(exc, MaxConnectionsError):
                client.refresh_slot_map_soon()  # a full pool is no topology change
            raise
        failed = next((r for r in replies if isinstance(r, _UNAVAILABLE)), None)
        if failed is not None:
            # A node failed part way: report the pipeline as failed, not its keys as bad.
            client.refresh_slot_map_soon()
            raise failed
        return replies


def _retrieve(task: asyncio.Task[Any]) -> None:
    # The requests that awaited it saw the error; this one is only not to be logged
    # as "never retrieved" when none did.
    if not task.cancelled():
        task.exception()


def _is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and not isinstance(exc, _UNAVAILABLE)


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
