"""`python -m features.stream`: one velocity consumer of the transaction stream.

Reads FEATURES_* settings (FEATURES_STREAM_* for the stream); writes the velocity groups
through the backing store first when one is configured. Run more of them to scale: each
is a member of the consumer group, named host:pid unless --name says otherwise. SIGTERM or
Ctrl-C finishes the batch in hand, then leaves the group. FEATURES_STREAM_METRICS_PORT
serves its metrics (`features_stream_*`) for Prometheus.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.multiprocess import mark_process_dead
from pydantic import ValidationError

from features.backing import open_backing
from features.connection import open_redis
from features.offline.writer import FeatureWriter
from features.settings import Settings, redact_url
from features.stream.consumer import VelocityConsumer
from features.stream.metrics import consumer_registry

logger = logging.getLogger("features.stream")

MULTIPROCESS_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
"""prometheus_client's multiprocess mode, chosen at its import from these."""


class MetricsPortError(Exception):
    """The metrics endpoint could not listen where the settings say."""


async def consume(
    settings: Settings, name: str, after_append: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run one consumer until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = open_redis(settings)
    backing = open_backing(settings)
    consumer = VelocityConsumer(
        client,
        FeatureWriter(client, backing),
        stream=settings.stream_key,
        group=settings.stream_group,
        name=name,
        batch=settings.stream_batch,
        block_ms=settings.stream_block_ms,
        claim_idle_s=settings.stream_claim_idle_s,
        maxlen=settings.stream_maxlen,
        max_user_events=settings.stream_max_user_events,
        max_merchant_events=settings.stream_max_merchant_events,
        max_deliveries=settings.stream_max_deliveries,
        error_log_interval_s=settings.error_log_interval_s,
        after_append=after_append,
    )
    logger.info(
        "stream consumer %s on %s, stream %s, group %s, backing store %s",
        name,
        redact_url(settings.redis_url),
        settings.stream_key,
        settings.stream_group,
        settings.backing_store,
    )
    server = None
    try:
        if settings.stream_metrics_port:
            server = _serve_metrics(consumer, settings)
        await consumer.run(stop, settings.stream_report_interval_s, watch_group=server is not None)
        await consumer.leave()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        await client.aclose()
        if backing is not None:
            await backing.aclose()
    logger.info("stream consumer %s stopped: %s", name, consumer.totals.line())


def _serve_metrics(consumer: VelocityConsumer, settings: Settings) -> WSGIServer:
    """prometheus_client's HTTP server (a thread) for the consumer's registry; a port in use
    or an address not here raises MetricsPortError naming the variables."""
    addr, port = settings.stream_metrics_addr, settings.stream_metrics_port
    try:
        server, _ = start_http_server(port, addr, registry=consumer_registry(consumer))
    except OSError as exc:
        raise MetricsPortError(f"FEATURES_STREAM_METRICS_PORT/_ADDR {addr}:{port}: {exc}") from exc
    logger.info("stream consumer %s: metrics on http://%s:%d/metrics", consumer.name, addr, port)
    return server


async def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _leave_multiprocess_mode() -> None:
    """Re-execute this command without prometheus_client's multiprocess variable, if set.

    Inherited from a service's environment, it would make every `features_*` metric of
    this process a file in the service's directory, which the service's /metrics reports
    (a `features_redis_up` of 0 with this pid, say). Importing `features` made two such
    files already; the pid's gauge files are removed as for a process that died (its
    counter file holds zeros), and the new image never makes any."""
    for variable in MULTIPROCESS_VARIABLES:
        directory = os.environ.get(variable)
        if directory:
            mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]
    env = {k: v for k, v in os.environ.items() if k not in MULTIPROCESS_VARIABLES}
    print(
        "python -m features.stream: ignoring PROMETHEUS_MULTIPROC_DIR (the service's"
        " metrics directory); FEATURES_STREAM_METRICS_PORT serves this consumer's metrics",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and any(v in os.environ for v in MULTIPROCESS_VARIABLES):
        _leave_multiprocess_mode()
    parser = argparse.ArgumentParser(prog="python -m features.stream", description=__doc__)
    parser.add_argument("--name", default=f"{socket.gethostname()}:{os.getpid()}")
    parser.add_argument("--redis-url", help="default: FEATURES_REDIS_URL or REDIS_URL")
    # For tests: SIGKILL this process after its first batch reached the logs, before
    # anything was written or acknowledged.
    parser.add_argument("--die-after-append", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # Not the request path: real timeouts (a blocked read waits stream_block_ms).
        settings = Settings.from_env().for_bulk(args.redis_url)
    except (ValidationError, ValueError) as exc:
        print(f"python -m features.stream: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(consume(settings, args.name, _die if args.die_after_append else None))
    except MetricsPortError as exc:
        print(f"python -m features.stream: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
