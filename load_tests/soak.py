"""Soak: `make soak` (SOAK_S=180 for a short one), or python -m load_tests.soak --help.

A bounded run at a steady request rate against its own `bentoml serve` (two workers) and
redis-server, with a deliberately small, bounded cache and ids drawn from a space far
larger than it (most are unknown, so the cache fills with entries of both kinds).
Samples the resident memory of every worker and reports it at the start, halfway and
at the end: with a bounded cache it must stay flat once the cache is full.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence

import httpx
import psutil  # type: ignore[import-untyped]

from load_tests._stack import paced, stack


def workers_rss_mb(arbiter_pid: int) -> dict[int, float]:
    """Resident set size of each BentoML worker process, by pid."""
    out = {}
    for child in psutil.Process(arbiter_pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                out[child.pid] = child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return out


async def _client(url: str, rate: float, end: float, id_space: int, seed: int,
                  counts: dict[str, int]) -> None:  # fmt: skip
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        async for _ in paced(rate, end):
            body = {
                "user_id": f"u{rng.randint(1, id_space):06d}",
                "merchant_id": f"m{rng.randint(1, 2000):05d}",
                "amount": round(rng.uniform(1, 500), 2),
            }
            try:
                r = await client.post("/predict", json=body)
                key = "ok" if r.status_code == 200 else f"http_{r.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1


async def _sampler(pid: int, end: float, every_s: float, t0: float,
                   rows: list[tuple[float, dict[int, float]]]) -> None:  # fmt: skip
    while True:
        rows.append((time.monotonic() - t0, await asyncio.to_thread(workers_rss_mb, pid)))
        print(f"t={rows[-1][0]:6.0f}s rss MB " + " ".join(f"{v:.1f}" for v in rows[-1][1].values()))
        if time.monotonic() + every_s > end:
            return
        await asyncio.sleep(every_s)


async def run(args: argparse.Namespace) -> int:
    env = {
        "FEATURES_CACHE_MAXSIZE": str(args.cache_maxsize),
        # Long enough that the size bound, not expiry, is what limits the cache.
        "FEATURES_CACHE_TTL_S": "3600",
        "FEATURES_STALE_MAX_AGE_S": "3600",  # may not be below the TTL
    }
    with stack(args.users, 2000, workers=2, **env) as s:
        t0 = time.monotonic()
        end = t0 + args.seconds
        counts: dict[str, int] = {}
        rows: list[tuple[float, dict[int, float]]] = []
        print(f"{args.seconds:.0f} s at {args.rate} req/s, ids from 1..{args.id_space}, "
              f"cache_maxsize {args.cache_maxsize} per worker")  # fmt: skip
        await asyncio.gather(
            *(
                _client(s.server.url, args.rate / args.clients, end, args.id_space, i, counts)
                for i in range(args.clients)
            ),
            _sampler(s.server.process.pid, end, args.every, t0, rows),
        )
        rows.append((time.monotonic() - t0, workers_rss_mb(s.server.process.pid)))
    start, mid, last = rows[0], rows[len(rows) // 2], rows[-1]
    print()
    print(f"requests: {sum(counts.values())} {counts}")
    worst = 0.0
    for pid in start[1]:
        a, m, b = start[1][pid], mid[1].get(pid, float("nan")), last[1].get(pid, float("nan"))
        growth = (b - m) / m * 100
        worst = max(worst, growth)
        print(f"worker {pid}: start {a:.1f} MB (t={start[0]:.0f}s), middle {m:.1f} MB "
              f"(t={mid[0]:.0f}s), end {b:.1f} MB (t={last[0]:.0f}s); "
              f"second half {b - m:+.1f} MB ({growth:+.1f}%)")  # fmt: skip
    errors = sum(v for k, v in counts.items() if k != "ok")
    flat = worst <= args.max_growth_pct
    print(f"errors: {errors}; RSS over the second half {'flat' if flat else 'GREW'} "
          f"(limit {args.max_growth_pct}%)")  # fmt: skip
    return 0 if flat and errors == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=20_000, help="users with stored features")
    parser.add_argument("--id-space", type=int, default=999_999, help="user ids drawn from")
    parser.add_argument("--cache-maxsize", type=int, default=5_000)
    parser.add_argument("--every", type=float, default=15.0, help="RSS sample interval, s")
    parser.add_argument("--max-growth-pct", type=float, default=5.0)
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
