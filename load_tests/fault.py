"""Load under a Redis outage: `make load-fault` (or python -m load_tests.fault --help).

A bounded run at a fixed request rate against its own `bentoml serve` and redis-server.
Partway through, Redis is killed (SIGKILL) and, later, restarted with the data it had
saved. Reports the error count (must be 0), the feature-retrieval latency before and
during the outage (server-side: each response's timings.features_ms, and the
features_retrieval_seconds histogram from /metrics), and the time to recover.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from load_tests._stack import Stack, paced, scrape, stack
from load_tests.stats import (
    Buckets,
    bucket_delta,
    bucket_quantile,
    histogram_buckets,
    parse_prometheus,
    quantile,
)

FAILED = {"unavailable", "circuit_open"}


@dataclass
class Sample:
    started: float
    status: int  # 0: no HTTP response at all
    latency_s: float
    features_ms: float = float("nan")
    reason: str | None = None


async def _client(
    url: str, ids: list[str], rate: float, end: float, samples: list[Sample], seed: int
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        async for _ in paced(rate, end):
            body = {
                "user_id": rng.choice(ids),
                "merchant_id": f"m{rng.randint(1, 2000):05d}",
                "amount": round(rng.lognormvariate(3.5, 1.0), 2),
            }
            started = time.monotonic()
            try:
                r = await client.post("/predict", json=body)
            except httpx.HTTPError:
                samples.append(Sample(started, 0, time.monotonic() - started))
                continue
            sample = Sample(started, r.status_code, time.monotonic() - started)
            if r.status_code == 200:
                data = r.json()
                sample.features_ms = data["timings"]["features_ms"]
                sample.reason = data["sources"]["user:features"]["reason"]
            samples.append(sample)


@dataclass
class Marks:
    """When things happened (time.monotonic) and the histogram around the outage."""

    t0: float
    kill: float = 0.0
    restart: float = 0.0
    buckets_before: Buckets = field(default_factory=list)
    buckets_during: Buckets = field(default_factory=list)


def retrieval_buckets(port: int) -> Buckets:
    """Cumulative features_retrieval_seconds buckets from /metrics, all sources."""
    return histogram_buckets(parse_prometheus(scrape(port)), "features_retrieval_seconds")


async def _faults(s: Stack, start_s: float, outage_s: float, marks: Marks) -> None:
    await asyncio.sleep(start_s)
    await asyncio.to_thread(_save, s)  # so the restart finds the data
    marks.buckets_before = await asyncio.to_thread(retrieval_buckets, s.server.port)
    marks.kill = time.monotonic()
    s.redis.kill()
    print(f"t={marks.kill - marks.t0:.1f}s redis-server killed")
    await asyncio.sleep(outage_s)
    marks.buckets_during = await asyncio.to_thread(retrieval_buckets, s.server.port)
    marks.restart = time.monotonic()
    await asyncio.to_thread(s.redis.start)
    print(f"t={marks.restart - marks.t0:.1f}s redis-server restarted with its data")


def _save(s: Stack) -> None:
    import redis

    with redis.Redis(port=s.redis.port) as admin:
        admin.save()


def _stats(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"n={len(values)} p50={quantile(values, 0.5):.3f} ms "
        f"p99={quantile(values, 0.99):.3f} ms max={max(values):.3f} ms"
    )


def _bucket_line(delta: Buckets) -> str:
    """Observations per bucket (not cumulative), e.g. `<=0.1ms:812`."""
    previous, parts = 0.0, []
    for bound, cumulative in delta:
        if cumulative > previous:
            parts.append(f"<={bound * 1e3:g}ms:{cumulative - previous:.0f}")
        previous = cumulative
    return " ".join(parts)


def report(samples: list[Sample], marks: Marks) -> int:
    """Print the figures; 0 if every request was served (the p99 target is reported)."""
    kill, restart = marks.kill, marks.restart
    errors = [x for x in samples if x.status != 200]
    base = [x.features_ms for x in samples if marks.t0 + 2 <= x.started < kill]
    outage = [
        x.features_ms for x in samples if kill <= x.started and x.started + x.latency_s <= restart
    ]
    after = sorted(
        (x for x in samples if x.started >= restart and x.reason not in FAILED),
        key=lambda x: x.started,
    )
    recovered = after[0].started + after[0].latency_s - restart if after else float("nan")
    reasons: dict[str, int] = {}
    for x in samples:
        if kill <= x.started < restart:
            reasons[str(x.reason)] = reasons.get(str(x.reason), 0) + 1
    latency = [x.latency_s * 1e3 for x in samples if x.status == 200]
    print()
    print(f"requests: {len(samples)}, errors (non-200 or no response): {len(errors)}")
    print(f"client round trip, whole run: {_stats(latency)}")
    print(f"features_ms before the outage (baseline): {_stats(base)}")
    print(f"features_ms during the outage:            {_stats(outage)}")
    delta = bucket_delta(marks.buckets_before, marks.buckets_during)
    p99 = bucket_quantile(delta, 0.99)
    observed = f"{p99 * 1e3:.3f} ms ({delta[-1][1]:.0f} observations)" if p99 is not None else "n/a"
    print(f"histogram p99 during the outage: {observed}")
    print(f"  per bucket: {_bucket_line(delta)}")
    print(f"user-group reasons during the outage: {reasons}")
    print(f"recovered (first Redis read after the restart was issued): {recovered:.3f} s")
    met = bool(outage) and quantile(outage, 0.99) <= 1.0
    print(f"outage p99 target (<= 1 ms): {'met' if met else 'MISSED'}")
    print("PASS: no errors" if not errors else f"FAIL: {len(errors)} errors")
    return 0 if not errors and outage else 1


async def run(args: argparse.Namespace) -> int:
    ids = [f"u{i:06d}" for i in range(1, args.users + 1)]
    with stack(args.users, 2000, workers=args.workers) as s:
        samples: list[Sample] = []
        t0 = time.monotonic()
        marks = Marks(t0)
        end = t0 + args.seconds
        per_client = args.rate / args.clients
        print(f"{args.seconds} s at {args.rate} req/s; outage from t={args.outage_at} s "
              f"for {args.outage} s")  # fmt: skip
        await asyncio.gather(
            *(
                _client(s.server.url, ids, per_client, end, samples, seed=i)
                for i in range(args.clients)
            ),
            _faults(s, args.outage_at, args.outage, marks),
        )
        return report(samples, marks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.fault", description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0, help="whole run")
    parser.add_argument("--outage-at", type=float, default=15.0, help="kill Redis at t=")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds without Redis")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--users", type=int, default=20_000, help="id pool (uniform)")
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers")
    args = parser.parse_args(argv)
    if args.outage_at + args.outage + 5 > args.seconds:
        parser.error("leave at least 5 s after the outage to see the recovery")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
