"""Cache invalidation, measured: write->drop latency, and what a bulk load costs a worker
and Redis under per-key tracking (the project's) and under BCAST with prefixes.

(1) write->drop: a worker's store (tracking on) has `--cached` user keys cached; another
    connection HSETs them one at a time; each sample is from just before the HSET is
    sent to the moment the worker has dropped the key (the store's invalidation hook).
(2) bulk load: the loader writes `--load` user keys (FeatureWriter, its batches) three
    times against a fresh server: with no tracking client, with one per-key worker that
    has read `--cached` of those keys, and with one raw RESP3 connection tracking in BCAST
    mode with the prefix `user:`. Per run: invalidation messages and keys the tracking
    client received, the CPU time it spent on them (per-key: the worker's push handler,
    decoding and dropping; BCAST: everything its connection received, parsing included,
    as nothing else travels on it), Redis CPU (INFO used_cpu_user + used_cpu_sys) and
    the load's wall time.
(3) cache hit: FeatureStore.read of one cached transaction, interleaved in rounds
    (load_tests/bench.py `interleaved`): tracking off, entries younger than the TTL (the
    short branch of EntryCache.fresh), against tracking live, entries past the short TTL
    and within the tracked one (the second comparison).

    python -m load_tests.bench_invalidation [--cached 1000] [--load 100000] [--n 1000]
        [--hits 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis

from features import USER_FEATURES, FeatureStore, Settings, open_redis
from features.offline.demo import user_ids
from features.offline.load import demo_rows
from features.offline.writer import FeatureWriter
from features.online.multiplex import HELLO_3, pack
from load_tests._stack import RESULTS
from load_tests.bench import interleaved
from load_tests.stats import quantile
from tools.redis_server import RedisServer


def _quantiles_us(samples_s: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "n": len(ordered),
        "p50_us": quantile(ordered, 0.5) * 1e6,
        "p99_us": quantile(ordered, 0.99) * 1e6,
        "p99.9_us": quantile(ordered, 0.999) * 1e6,
        "max_us": ordered[-1] * 1e6,
    }


class _TimedStore:
    """A tracking store whose invalidations are timed and counted (the hook wraps the
    store's own handler; nothing else changes)."""

    def __init__(self, url: str, *, cached: int) -> None:
        settings = Settings(redis_url=url, redis_socket_timeout_s=1.0)
        self.client = open_redis(settings)
        self.store = FeatureStore(
            self.client,
            multiplex=True,
            invalidation=True,
            cache_tracked_ttl_s=3600.0,
            cache_maxsize=max(cached, 1) * 2,
        )
        self.ids = user_ids(cached)
        self.dropped_at: dict[str, float] = {}
        self.messages = self.keys = 0
        self.cpu_s = 0.0
        tracking = self.store.tracking
        assert tracking is not None
        handler, pushed = tracking._invalidate, tracking.pushed

        def timed_invalidate(key_ids: list[str] | None) -> None:
            handler(key_ids)
            now = time.perf_counter()
            for key_id in key_ids or ():
                self.dropped_at[key_id] = now

        def timed_pushed(message: list[Any]) -> None:
            started = time.process_time()
            pushed(message)
            self.cpu_s += time.process_time() - started
            self.messages += 1
            self.keys += len(message[1] or ())

        tracking._invalidate = timed_invalidate
        tracking.pushed = timed_pushed  # type: ignore[method-assign]

    async def warm(self) -> None:
        await self.store.open()
        for start in range(0, len(self.ids), 100):
            chunk = self.ids[start : start + 100]
            await self.store.read([{"user": u, "merchant": "m1"} for u in chunk])

    async def aclose(self) -> None:
        await self.store.aclose()
        await self.client.aclose()


async def write_to_drop(url: str, n: int) -> dict[str, float]:
    worker = _TimedStore(url, cached=n)
    writer = aioredis.Redis.from_url(url)
    samples: list[float] = []
    try:
        await writer.ping()
        await worker.warm()
        for entity_id in worker.ids:
            key = USER_FEATURES.key(entity_id)
            started = time.perf_counter()
            await writer.hset(key, "tx_count_1h", 1)
            for _ in range(10_000):  # bounded: 10 s at most per key
                if key in worker.dropped_at:
                    break
                await asyncio.sleep(0.001)
            else:
                raise RuntimeError(f"{key} was never invalidated")
            samples.append(worker.dropped_at[key] - started)
    finally:
        await worker.aclose()
        await writer.aclose()
    return _quantiles_us(samples)


class _Bcast(asyncio.Protocol):
    """A raw RESP3 connection tracking in BCAST mode: counts what Redis pushes and drops
    each key from a dict as a cache would."""

    def __init__(self, cache: dict[str, int]) -> None:
        self.reader = hiredis.Reader(notEnoughData=False)
        self.cache = cache
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.messages = self.keys = 0
        self.cpu_s = 0.0

    def data_received(self, data: bytes) -> None:
        started = time.process_time()
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if reply.__class__ is hiredis.PushNotification:
                self.messages += 1
                for key in reply[1] or ():
                    self.cache.pop(key.decode(), None)
                    self.keys += 1
            else:
                self.replies.put_nowait(reply)
        self.cpu_s += time.process_time() - started


async def _load(url: str, ids: Sequence[str]) -> float:
    client = open_redis(Settings(redis_url=url).for_bulk())
    writer = FeatureWriter(client)
    started = time.perf_counter()
    try:
        for rows in demo_rows(USER_FEATURES, ids, 11):
            await writer.write(USER_FEATURES, rows)
    finally:
        await client.aclose()
    return time.perf_counter() - started


def _redis_cpu_s(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def bulk_load(mode: str, n_load: int, n_cached: int) -> dict[str, float]:
    """One load of `n_load` keys into a fresh server with `mode`'s tracking client."""
    ids = user_ids(n_load)
    with RedisServer(quiet=True) as server:
        admin = redis.Redis(port=server.port)
        await _load(server.url, ids)  # the keys exist; the measured load rewrites them
        worker: _TimedStore | None = None
        bcast: _Bcast | None = None
        transport = None
        if mode == "per-key":
            worker = _TimedStore(server.url, cached=n_cached)
            await worker.warm()
        elif mode == "bcast":
            loop = asyncio.get_running_loop()
            cache = {USER_FEATURES.key(u): 0 for u in ids[:n_cached]}
            transport, bcast = await loop.create_connection(
                lambda: _Bcast(cache), "127.0.0.1", server.port
            )
            transport.write(HELLO_3 + pack("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "user:"))
            for _ in range(2):
                await asyncio.wait_for(bcast.replies.get(), 5)
        cpu = _redis_cpu_s(admin)
        wall_s = await _load(server.url, ids)
        await asyncio.sleep(0.5)  # the last pushes in flight
        out = {"load_wall_s": wall_s, "redis_cpu_s": _redis_cpu_s(admin) - cpu}
        for client in (worker, bcast):
            if client is not None:
                out |= {
                    "messages": client.messages,
                    "keys": client.keys,
                    "client_cpu_s": client.cpu_s,
                }
        if worker is not None:
            await worker.aclose()
        if transport is not None:
            transport.close()
        admin.close()
    return out


class _Timer:
    """A store timer the bench moves: reads are timed at `now`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def hits(url: str, n: int) -> dict[str, dict[str, float]]:
    settings = Settings(redis_url=url, redis_socket_timeout_s=1.0)
    client = open_redis(settings)
    timer = _Timer()
    untracked = FeatureStore(client, cache_ttl_s=1e9, timer=timer)
    tracked = FeatureStore(
        client,
        multiplex=True,
        invalidation=True,
        cache_ttl_s=5.0,
        cache_tracked_ttl_s=1e9,
        timer=timer,
    )
    hot = [{"user": u, "merchant": "m1"} for u in user_ids(512)]
    try:
        await tracked.open()
        for row in hot:
            await untracked.read([row])
            await tracked.read([row])
        timer.now = 10.0  # past the tracked store's short TTL

        async def untracked_hit(i: int) -> None:
            await untracked.read([hot[i % len(hot)]])

        async def tracked_hit(i: int) -> None:
            await tracked.read([hot[i % len(hot)]])

        out = await interleaved({"untracked": untracked_hit, "tracked": tracked_hit}, n)
        for store in (untracked, tracked):
            assert all(store._cache.fresh(USER_FEATURES.key(r["user"]), 10.0) for r in hot)
        return out
    finally:
        await tracked.aclose()
        await untracked.aclose()
        await client.aclose()


async def run(n: int, n_load: int, n_cached: int, n_hits: int) -> dict[str, Any]:
    results: dict[str, Any] = {"started": time.time(), "n": n, "load": n_load, "cached": n_cached}
    with RedisServer(quiet=True) as server:
        print(f"cache hits, {n_hits} per case", flush=True)
        results["hits"] = await hits(server.url, n_hits)
        print(f"write->drop, {n} keys", flush=True)
        results["write_to_drop"] = await write_to_drop(server.url, n)
    results["bulk"] = {}
    for mode in ("none", "per-key", "bcast"):
        print(f"bulk load of {n_load} keys, tracking: {mode}", flush=True)
        results["bulk"][mode] = await bulk_load(mode, n_load, n_cached)
    return results


def table(results: dict[str, Any]) -> str:
    d = results["write_to_drop"]
    lines = [
        *(
            f"cache hit, {name}: p50 {h['p50_us']:.1f} us, p99 {h['p99_us']:.1f} us (n={h['n']})"
            for name, h in results["hits"].items()
        ),
        f"write->drop (n={d['n']}): p50 {d['p50_us']:.0f} us, p99 {d['p99_us']:.0f} us,"
        f" p99.9 {d['p99.9_us']:.0f} us, max {d['max_us']:.0f} us",
        "",
        f"| bulk load of {results['load']} keys ({results['cached']} cached) | messages | keys"
        " | tracking client CPU | Redis CPU | load wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in results["bulk"].items():
        lines.append(
            f"| {mode} | {r.get('messages', 0)} | {r.get('keys', 0)}"
            f" | {r.get('client_cpu_s', 0.0) * 1e3:.1f} ms | {r['redis_cpu_s'] * 1e3:.0f} ms"
            f" | {r['load_wall_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_invalidation")
    parser.add_argument("--n", type=int, default=1000, help="write->drop samples")
    parser.add_argument("--load", type=int, default=100_000, help="keys in the bulk load")
    parser.add_argument("--cached", type=int, default=1000, help="keys the worker read")
    parser.add_argument("--hits", type=int, default=30_000, help="cache-hit samples per case")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.n, args.load, args.cached, args.hits))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"invalidation-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
