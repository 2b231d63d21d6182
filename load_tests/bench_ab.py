"""FeatureStore.read of another git revision's features/ against this tree's, in one process.

`python -m load_tests.bench_ab --base REF` exports REF's features/ to a temporary directory,
imports both packages side by side (the base first, under its own module objects), and
times the cases of load_tests/bench.py's (a) and (b) plus two batches, interleaved in
rounds so drift and the other jobs of a shared machine hit both alike:

  hit       one transaction from the cache, assembled into the model vector (bench (b))
  hit100    100 transactions, all from the cache
  miss      one transaction, cache miss, over the multiplexed connection (bench (a))
  miss100   100 transactions, cache miss (bench (c))

`--multiprocess` runs prometheus_client in multiprocess mode (mmapped values), as the
service does under BentoML. Quantiles as load_tests/stats.py takes them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from load_tests._clock import Jump

ROOT = Path(__file__).resolve().parent.parent
N_USERS, N_MERCHANTS = 20_000, 2_000

Timed = Callable[[int], Awaitable[None]]


def _import_features(path: Path) -> dict[str, ModuleType]:
    """The features package under `path`, imported afresh: the modules it needs here.

    Modules already imported from another copy are dropped from sys.modules first (their
    objects live on in what holds them), and the default Prometheus registry is emptied,
    so both copies can define the same metric names."""
    from prometheus_client import REGISTRY

    for name in [m for m in sys.modules if m == "features" or m.startswith("features.")]:
        del sys.modules[name]
    for collector in list(REGISTRY._collector_to_names):
        REGISTRY.unregister(collector)
    sys.path.insert(0, str(path))
    try:
        names = ("features", "features.ondemand", "features.offline.demo", "features.offline.load")
        modules = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(path))
    origin = Path(str(modules["features"].__file__)).resolve()
    if not origin.is_relative_to(path.resolve()):
        raise RuntimeError(f"features imported from {origin}, not from {path}")
    return modules


def _export(ref: str, into: Path) -> Path:
    """REF's features/ under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "features"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def summary(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max in microseconds, and the sample count."""
    from load_tests.stats import quantile

    ordered = sorted(samples_s)
    return {
        "n": len(ordered),
        **{f"p{q * 100:g}": quantile(ordered, q) * 1e6 for q in (0.5, 0.99, 0.999)},
        "max": ordered[-1] * 1e6,
    }


async def interleaved(
    cases: dict[str, Timed], n: int, rounds: int = 20, warmup: int = 200
) -> dict[str, dict[str, float]]:
    """Time each case n times, alternating in rounds."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        for i in range(warmup):
            await fn(i)
    counter = itertools.count()
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(max(1, n // rounds)):
                i = next(counter)
                started = time.perf_counter()
                await fn(i)
                samples[name].append(time.perf_counter() - started)
    return {name: summary(s) for name, s in samples.items()}


class _Side:
    """One revision's stores against the shared Redis: a missing one and a hitting one."""

    def __init__(self, modules: dict[str, ModuleType], url: str) -> None:
        features: Any = modules["features"]
        settings = features.Settings(
            redis_url=url, redis_socket_timeout_s=1.0, redis_pool_timeout_s=1.0
        )
        self.client = features.open_redis(settings)
        deadline_s = settings.deadline_s
        self.miss = features.FeatureStore(
            self.client, deadline_s=deadline_s, timer=Jump(), multiplex=True
        )
        self.hit = features.FeatureStore(self.client, deadline_s=deadline_s, cache_ttl_s=1e9)
        self.model_inputs = modules["features.ondemand"].model_inputs

    async def aclose(self) -> None:
        await self.miss.aclose()
        await self.hit.aclose()
        await self.client.aclose()


async def run(base: Path, n: int) -> dict[str, dict[str, dict[str, float]]]:
    """Both sides, every case; results by case, then side."""
    import numpy as np

    from tools.redis_server import RedisServer

    sides_modules = {"base": _import_features(base), "this": _import_features(ROOT)}
    this = sides_modules["this"]
    demo, loader = this["features.offline.demo"], this["features.offline.load"]
    features: Any = this["features"]
    with RedisServer(quiet=True) as server:
        assert server.process is not None
        os.sched_setaffinity(server.process.pid, {1})  # bench.py's "split" placement
        os.sched_setaffinity(0, {0})
        users, merchants = demo.user_ids(N_USERS), demo.merchant_ids(N_MERCHANTS)
        await loader.load(
            features.Settings(redis_url=server.url, redis_socket_timeout_s=10.0),
            [
                (features.USER_FEATURES, loader.demo_rows(features.USER_FEATURES, users, 11)),
                (features.MERCHANT_RISK, loader.demo_rows(features.MERCHANT_RISK, merchants, 12)),
            ],
        )
        rng = random.Random(3)
        pairs = [(rng.choice(users), rng.choice(merchants)) for _ in range(4000)]
        hot = pairs[:512]
        sides = {name: _Side(modules, server.url) for name, modules in sides_modules.items()}
        try:
            for side in sides.values():
                await side.miss.open()
                for u, m in hot:
                    await side.hit.read([{"user": u, "merchant": m}])
            amount, now = np.array([42.0]), np.array([time.time()])

            def rows(batch: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
                return [{"user": u, "merchant": m} for u, m in batch]

            def case(name: str, side: _Side) -> Timed:
                async def hit(i: int) -> None:
                    found = await side.hit.read(rows([hot[i % len(hot)]]))
                    side.model_inputs(found.values, amount, now)

                async def hit100(i: int) -> None:
                    await side.hit.read(rows(hot[(i % 5) * 100 : (i % 5 + 1) * 100]))

                async def miss(i: int) -> None:
                    await side.miss.read(rows([pairs[i % len(pairs)]]))

                async def miss100(i: int) -> None:
                    await side.miss.read(rows(pairs[(i % 40) * 100 : (i % 40 + 1) * 100]))

                cases: dict[str, Timed] = {
                    "hit": hit,
                    "hit100": hit100,
                    "miss": miss,
                    "miss100": miss100,
                }
                return cases[name]

            sizes = {"hit": n * 10, "hit100": n, "miss": n, "miss100": max(200, n // 5)}
            return {
                name: await interleaved({s: case(name, side) for s, side in sides.items()}, size)
                for name, size in sizes.items()
            }
        finally:
            for side in sides.values():
                await side.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_ab", description=__doc__)
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--n", type=int, default=3000, help="samples per single-tx miss case")
    parser.add_argument("--multiprocess", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.multiprocess:  # before prometheus_client is imported
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tmp) / "metrics")
            os.mkdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        base = _export(args.base, Path(tmp))
        results = asyncio.run(run(base, args.n))
    mode = "multiprocess" if args.multiprocess else "in-process"
    print(f"base {args.base} vs this tree; prometheus_client {mode}; microseconds")
    for name, sides in results.items():
        for side, s in sides.items():
            print(
                f"{name:8} {side:5} n={s['n']:6.0f}  p50 {s['p50']:8.1f}  p99 {s['p99']:8.1f}"
                f"  p99.9 {s['p99.9']:8.1f}  max {s['max']:8.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
