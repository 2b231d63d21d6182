"""Events per second of velocity consumers: `python -m load_tests.bench_stream`.

Starts redis-server on loopback, appends `--events` scored transactions over `--users`
users and `--merchants` merchants to the stream, then times `--consumers` consumers in this
process draining it (batches of `--batch`: XREADGROUP, the two scripts per event, the two
group writes, XACK). Same-run baseline: the XADDs that filled the stream, pipelined.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence

from features import FeatureWriter, Settings, open_redis
from features.stream import TransactionEvent, VelocityConsumer
from tools.redis_server import RedisServer

STREAM = "stream:transactions"


async def bench(url: str, args: argparse.Namespace) -> None:
    settings = Settings(redis_url=url).for_bulk()
    client = open_redis(settings)
    rng = random.Random(3)
    now = time.time()
    events = [
        TransactionEvent(
            f"t{n}",
            f"u{rng.randrange(args.users)}",
            f"m{rng.randrange(args.merchants)}",
            round(rng.lognormvariate(3, 1), 2),
            now - rng.uniform(0, 86400),  # a day of traffic, out of order
        )
        for n in range(args.events)
    ]
    started = time.perf_counter()
    for i in range(0, len(events), 1000):
        async with client.pipeline(transaction=False) as pipe:
            for e in events[i : i + 1000]:
                pipe.xadd(STREAM, e.fields())  # type: ignore[arg-type]
            await pipe.execute()
    appended_s = time.perf_counter() - started
    consumers = [
        VelocityConsumer(
            client,
            FeatureWriter(client),
            stream=STREAM,
            group="velocity",
            name=f"bench-{i}",
            batch=args.batch,
            block_ms=10,
            claim_idle_s=60.0,
            maxlen=settings.stream_maxlen,
            max_user_events=settings.stream_max_user_events,
            max_merchant_events=settings.stream_max_merchant_events,
        )
        for i in range(args.consumers)
    ]
    await consumers[0].ensure_group()

    async def drain(c: VelocityConsumer) -> None:
        while await c.step(block=False):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(drain(c) for c in consumers))
    consumed_s = time.perf_counter() - started
    read = sum(c.totals.read for c in consumers)
    await client.aclose()
    print(f"{args.events} events, {args.users} users, {args.merchants} merchants")
    print(f"append (pipelined XADD, baseline): {args.events / appended_s:9.0f} events/s")
    print(
        f"{args.consumers} consumer(s), batch {args.batch}: {read / consumed_s:9.0f} events/s"
        f" ({read} in {consumed_s:.2f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_stream", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--merchants", type=int, default=500)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--consumers", type=int, default=1)
    args = parser.parse_args(argv)
    with RedisServer(quiet=True) as server:
        asyncio.run(bench(server.url, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
