"""`python -m features.stream`: one velocity consumer of the transaction stream.

Reads FEATURES_* settings (FEATURES_STREAM_* for the stream); writes the velocity groups
through the backing store first when one is configured. Run more of them to scale: each
is a member of the consumer group, named host:pid unless --name says otherwise. SIGTERM or
Ctrl-C finishes the batch in hand, then leaves the group.
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

from pydantic import ValidationError

from features.backing import open_backing
from features.connection import open_redis
from features.offline.writer import FeatureWriter
from features.settings import Settings, redact_url
from features.stream.consumer import VelocityConsumer

logger = logging.getLogger("features.stream")


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
    try:
        await consumer.run(stop, settings.stream_report_interval_s)
        await consumer.leave()
    finally:
        await client.aclose()
        if backing is not None:
            await backing.aclose()
    logger.info("stream consumer %s stopped: %s", name, consumer.totals.line())


async def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
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
    asyncio.run(consume(settings, args.name, _die if args.die_after_append else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
