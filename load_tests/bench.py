"""`make bench`: the feature layer against the raw limit and against Feast, then end to end.

(a) one transaction, cache miss: FeatureStore.read as the service builds it (over its
    multiplexed connection) vs the floor (load_tests/floor.py: a hiredis protocol client
    sending the project's two HMGETs in one write), vs the same store over redis-py's
    pool, and vs the raw redis-py pipeline of the same two HMGETs; (b) the same on a cache
    hit, assembled into the model vector;
(c) 100 transactions, miss: project vs the floor and the raw pipeline, and HMGET vs HGETALL;
(d) Feast 0.67 get_online_features for (a) and (c), in its own venv;
(e) /predict vs a constant BentoML endpoint: p50 at concurrency 1, max RPS, p99 at half;
(f) and (g), in load_tests/bench_tail.py: open-loop tails from a cold start, and behind a
    Redis whose replies turn slow;
(h) load_tests/bench_overload.py: 3x the max rate, admission control on and off;
(i) load_tests/bench_curve.py: latency and goodput against offered rate (a PNG).
Every comparison is measured in the same run, interleaved in rounds. Placement: the
client and redis-server pinned to one vCPU ("shared") or to different ones ("split").
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import redis

from features import GROUPS, HASH_GROUPS, FeatureStore, Settings, open_redis
from features.offline.demo import merchant_ids, user_ids
from features.offline.load import demo_jobs, load
from features.ondemand import model_inputs
from features.spec import EVENT_TS_FIELD
from load_tests import bench_curve, bench_overload, bench_tail, httpload
from load_tests._clock import Jump
from load_tests._stack import RESULTS, scrape
from load_tests.floor import FloorClient
from load_tests.report import diff_stats
from load_tests.skew import transactions
from load_tests.stats import quantile
from tools.bento_server import BentoServer
from tools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
FEAST_VENV = ROOT / ".venv-feast"
FEAST_REQUIREMENTS = ["feast[redis]==0.67.0", "hiredis==3.5.0"]
N_USERS, N_MERCHANTS = 20_000, 2_000
PLACEMENTS = {"shared": ({0}, {0}), "split": ({0}, {1})}  # (client, redis-server)

Timed = Callable[[int], Awaitable[None]]


def summary(samples_s: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (stats.quantile) in microseconds, and the sample count."""
    ordered = sorted(samples_s)
    p50, p99 = quantile(ordered, 0.5), quantile(ordered, 0.99)
    return {"p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "n": len(ordered)}


async def interleaved(
    cases: dict[str, Timed], n: int, rounds: int = 10, warmup: int = 100
) -> dict[str, dict[str, float]]:
    """Time each case n times, alternating in rounds so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        for i in range(warmup):
            await fn(i)
    per_round = max(1, n // rounds)
    clock = time.perf_counter
    counter = itertools.count()
    for _ in range(rounds):
        for name, fn in cases.items():
            out = samples[name]
            for _ in range(per_round):
                i = next(counter)
                t0 = clock()
                await fn(i)
                out.append(clock() - t0)
    return {name: summary(s) for name, s in samples.items()}


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    users, merchants = user_ids(N_USERS), merchant_ids(N_MERCHANTS)
    return [(rng.choice(users), rng.choice(merchants)) for _ in range(n)]


async def micro(port: int, n: int) -> dict[str, dict[str, float]]:
    """(a), (b) and (c) against the Redis on 127.0.0.1:`port`."""
    url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(redis_url=url, redis_socket_timeout_s=1.0, redis_pool_timeout_s=1.0)
    client = open_redis(settings)
    floor = await FloorClient.connect("127.0.0.1", port)
    deadline_s = Settings().deadline_s  # as the service runs it
    # (a) and (c) compare the project's read with the floor's and raw HMGETs: the hashes
    # only. The sorted sets and embeddings add commands of their own to a real request.
    miss_store = FeatureStore(
        client, groups=HASH_GROUPS, deadline_s=deadline_s, timer=Jump(), multiplex=True
    )
    pool_store = FeatureStore(client, groups=HASH_GROUPS, deadline_s=deadline_s, timer=Jump())
    hit_store = FeatureStore(client, deadline_s=deadline_s, cache_ttl_s=1e9)
    pairs = _pairs(4000, seed=3)
    width = sum(len(g.features) for g in GROUPS)
    results: dict[str, dict[str, float]] = {}
    try:
        await client.ping()
        await miss_store.open()

        async def project_one(i: int) -> None:
            u, m = pairs[i % len(pairs)]
            await miss_store.read([{"user": u, "merchant": m}])

        async def pool_one(i: int) -> None:
            u, m = pairs[i % len(pairs)]
            await pool_store.read([{"user": u, "merchant": m}])

        async def floor_one(i: int) -> None:
            u, m = pairs[i % len(pairs)]
            await floor.hmget(_commands(u, m))

        async def raw_one(i: int) -> None:
            u, m = pairs[i % len(pairs)]
            async with client.pipeline(transaction=False) as pipe:
                for key, fields in _commands(u, m, event_ts=False):
                    pipe.hmget(key, fields)
                await pipe.execute()

        cases: dict[str, Timed] = {
            "project": project_one,
            "floor": floor_one,
            "project_pool": pool_one,
            "raw": raw_one,
        }
        results |= _named("a", await interleaved(cases, n))

        hot = pairs[:512]
        for u, m in hot:
            await hit_store.read([{"user": u, "merchant": m}])
        amount, now = np.array([42.0]), np.array([time.time()])
        flat_cache = {(u, m): np.ones(width, dtype=np.float32) for u, m in hot}

        async def project_hit(i: int) -> None:
            u, m = hot[i % len(hot)]
            rows = await hit_store.read([{"user": u, "merchant": m}])
            model_inputs(rows.values, amount, now)

        async def dict_hit(i: int) -> None:
            # The floor: one dict lookup of a ready vector, copied.
            flat_cache[hot[i % len(hot)]].copy()

        results |= _named(
            "b", await interleaved({"project": project_hit, "dict": dict_hit}, n * 10)
        )

        batches = [pairs[i : i + 100] for i in range(0, len(pairs), 100)]

        async def project_batch(i: int) -> None:
            batch = batches[i % len(batches)]
            await miss_store.read([{"user": u, "merchant": m} for u, m in batch])

        async def pool_batch(i: int) -> None:
            batch = batches[i % len(batches)]
            await pool_store.read([{"user": u, "merchant": m} for u, m in batch])

        async def floor_batch(i: int) -> None:
            batch = batches[i % len(batches)]
            await floor.hmget([command for u, m in batch for command in _commands(u, m)])

        def raw_batch(command: str) -> Timed:
            async def run(i: int) -> None:
                batch = batches[i % len(batches)]
                async with client.pipeline(transaction=False) as pipe:
                    for u, m in batch:
                        for key, fields in _commands(u, m, event_ts=False):
                            if command == "hmget":
                                pipe.hmget(key, fields)
                            else:
                                pipe.hgetall(key)
                    await pipe.execute()

            return run

        cases = {
            "project": project_batch,
            "floor": floor_batch,
            "project_pool": pool_batch,
            "raw": raw_batch("hmget"),
            "raw_hgetall": raw_batch("hgetall"),
        }
        results |= _named("c", await interleaved(cases, max(200, n // 5)))
    finally:
        floor.close()
        await miss_store.aclose()
        await client.aclose()
    return results


def _commands(u: str, m: str, *, event_ts: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    """Every group's HMGET for one transaction: the floor sends exactly the project's
    commands (the fields and the event time); the raw pipeline asks for the fields."""
    ids = {"user": u, "merchant": m}
    extra = (EVENT_TS_FIELD,) if event_ts else ()
    return [(g.key(ids[g.entity]), (*g.field_names, *extra)) for g in HASH_GROUPS]


def _named(prefix: str, stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {f"{prefix}.{name}": s for name, s in stats.items()}


def ensure_feast() -> Path:
    """The Feast venv, installed on first use (Feast needs redis<8: not beside ours)."""
    python = FEAST_VENV / "bin" / "python"
    stamp = FEAST_VENV / ".installed"
    if not stamp.exists():
        print(f"installing Feast into {FEAST_VENV} (once; several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FEAST_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *FEAST_REQUIREMENTS], check=True)
        stamp.touch()
    return python


def run_feast(url_port: int, n: int, cpus: set[int] | None) -> dict[str, dict[str, float]]:
    """(d): the same entities and values in Feast's Redis online store (db 1)."""
    python = ensure_feast()
    sync = redis.Redis(port=url_port)
    pairs = _pairs(4000, seed=3)
    rows: dict[str, dict[str, dict[str, float]]] = {g.qualified_name: {} for g in HASH_GROUPS}
    for u, m in pairs:
        for group in HASH_GROUPS:
            entity_id = {"user": u, "merchant": m}[group.entity]
            values = sync.hmget(group.key(entity_id), group.field_names)
            rows[group.qualified_name][entity_id] = {
                f: float(v) for f, v in zip(group.field_names, values, strict=True) if v
            }
    sync.close()
    spec = {
        "redis": f"127.0.0.1:{url_port},db=1",
        "groups": [
            {
                "name": g.qualified_name.replace(":", "_"),
                "entity": g.entity,
                "features": [[f.name, str(f.dtype)] for f in g.features],
                "rows": rows[g.qualified_name],
            }
            for g in HASH_GROUPS
        ],
        "pairs": pairs,
        "n": n,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run(
            [str(python), str(ROOT / "load_tests" / "feast_bench.py"), f.name],
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    finally:
        os.unlink(f.name)
    timings: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return {case: summary(samples) for case, samples in timings.items()}


# --- (e) end to end -------------------------------------------------------------------


def _train_if_missing() -> None:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run(
        [sys.executable, "-m", "models.train", "--if-missing"], env=env, cwd=ROOT, check=True
    )


async def _compare(
    ports: dict[str, int], bodies: list[dict[str, Any]], seq_n: int, dur_s: float, rounds: int
) -> dict[str, dict[str, Any]]:
    """Concurrency 1, then max throughput, alternating the endpoints round by round."""
    reqs = {
        name: httpload.encode_requests(port, "/predict", bodies) for name, port in ports.items()
    }
    for name, port in ports.items():  # warm-up
        await httpload.sequential(port, reqs[name], 300)
        await httpload.closed_loop(port, reqs[name], 16, 1.0)
    c1: dict[str, list[float]] = {name: [] for name in ports}
    peaks: dict[str, list[float]] = {name: [] for name in ports}
    failures = dict.fromkeys(ports, 0)
    for _ in range(rounds):
        for name, port in ports.items():
            run = await httpload.sequential(port, reqs[name], seq_n // rounds)
            c1[name] += run.latencies
            failures[name] += run.failures
    for _ in range(rounds):
        for name, port in ports.items():
            run = await httpload.closed_loop(port, reqs[name], 32, dur_s / rounds)
            peaks[name].append(run.rps)
            failures[name] += run.failures
    return {
        name: {
            "c1": summary(c1[name]),
            "max_rps": quantile(peaks[name], 0.5),
            "max_rps_rounds": peaks[name],
            "max_failures": failures[name],
        }
        for name in ports
    }


async def _half(
    port: int, bodies: list[dict[str, Any]], rate: float, dur_s: float
) -> dict[str, Any]:
    requests = httpload.encode_requests(port, "/predict", bodies)
    half = await httpload.open_loop(port, requests, rate, dur_s)
    return {
        "half_rate": rate,
        "half": summary(half.latencies),
        "half_failures": half.failures,
        "half_late": half.late,
    }


def end_to_end(
    url: str, seq_n: int, dur_s: float, rounds: int = 3, *, pinned: bool = False
) -> dict[str, Any]:
    """(e): /predict and the trivial endpoint, one worker each, both up at once and
    measured alternately. Pinned: both services and redis-server on vCPU 1, the client
    on vCPU 0; unpinned: the scheduler places everything (better on a shared machine)."""
    bodies = transactions(20_000)
    targets = {
        "trivial": "load_tests.trivial_service:TrivialService",
        "predict": "service:FraudService",
    }
    cpus = {1} if pinned else os.sched_getaffinity(0)
    ports: dict[str, int] = {}
    with ExitStack() as stack:
        for name, target in targets.items():
            log = RESULTS / f"serve-{target.split(':')[-1]}.log"
            # (e) measures capacity: a closed loop of 32 is overload, which admission
            # control answers with 503s; (h) measures admission control.
            env = {"FEATURES_REDIS_URL": url, "FRAUD_ADMISSION": "0"}
            serve = BentoServer(env, target=target, workers=1, log=log, cpus=cpus)
            ports[name] = stack.enter_context(serve).port
        if pinned:
            os.sched_setaffinity(0, {0})
        out = httpload.run(_compare(ports, bodies, seq_n, dur_s, rounds))
        for name, port in ports.items():
            before = scrape(port)
            out[name] |= httpload.run(_half(port, bodies, out[name]["max_rps"] / 2, dur_s))
            if name == "predict":
                server = diff_stats(before, scrape(port))
                out[name]["server_feature_p50_ms"] = server.feature_p50_ms
                out[name]["server_feature_p99_ms"] = server.feature_p99_ms
                out[name]["server_inference_p99_ms"] = server.inference_p99_ms
                out[name]["cache_hit_ratio"] = server.cache_hit_ratio
    return out


# --- the table ------------------------------------------------------------------------


def _ratio(r: dict[str, Any], num: str, den: str) -> float:
    return float(r[num]["p50_us"] / r[den]["p50_us"])


def table(results: dict[str, Any]) -> str:
    """Every measurement with its same-run baseline, and each target's verdict."""
    lines = ["| case | placement | p50 | p99 | n | vs baseline (p50) | target | met |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def row(
        case: str, mode: str, s: dict[str, float], vs: str, target: str, met: bool | str
    ) -> None:
        verdict = _ok(met) if isinstance(met, bool) else met
        lines.append(
            f"| {case} | {mode} | {s['p50_us']:.1f} us | {s['p99_us']:.1f} us | {s['n']:.0f} "
            f"| {vs} | {target} | {verdict} |"
        )

    for mode, r in results.get("micro", {}).items():
        feast = results.get("feast", {}).get(mode)
        a, a_raw = _ratio(r, "a.project", "a.floor"), _ratio(r, "a.project", "a.raw")
        fl = _ratio(r, "a.raw", "a.floor")
        row("(a) 1 tx miss: floor (hiredis protocol)", mode, r["a.floor"], "baseline", "", "")
        row("(a) 1 tx miss: raw pipeline", mode, r["a.raw"], f"{fl:.2f}x floor", "", "")
        ap = f"{_ratio(r, 'a.project_pool', 'a.floor'):.2f}x floor"
        row("(a) 1 tx miss: project over the pool", mode, r["a.project_pool"], ap, "", "")
        vs = f"{a:.2f}x floor, {a_raw:.2f}x raw"
        row("(a) 1 tx miss: project", mode, r["a.project"], vs, "<= 1.15x floor", a <= 1.15)
        if feast:
            fa = feast["single"]["p50_us"] / r["a.project"]["p50_us"]
            row("(d) 1 tx: Feast", mode, feast["single"], f"{fa:.1f}x project", ">= 3x", fa >= 3)
        b = r["b.project"]["p50_us"]
        row("(b) 1 tx hit: dict of ready vectors", mode, r["b.dict"], "floor", "", "")
        row("(b) 1 tx hit + model vector", mode, r["b.project"], f"{b:.2f} us", "<= 5 us", b <= 5)
        c, c_raw = _ratio(r, "c.project", "c.floor"), _ratio(r, "c.project", "c.raw")
        h = _ratio(r, "c.raw_hgetall", "c.raw")
        cl = _ratio(r, "c.raw", "c.floor")
        row("(c) 100 tx miss: floor (hiredis protocol)", mode, r["c.floor"], "baseline", "", "")
        row("(c) 100 tx miss: raw HMGET pipeline", mode, r["c.raw"], f"{cl:.2f}x floor", "", "")
        row("(c) 100 tx miss: raw HGETALL", mode, r["c.raw_hgetall"], f"{h:.2f}x HMGET", "", "")
        cp = f"{_ratio(r, 'c.project_pool', 'c.floor'):.2f}x floor"
        row("(c) 100 tx miss: project over the pool", mode, r["c.project_pool"], cp, "", "")
        vs = f"{c:.2f}x floor, {c_raw:.2f}x raw"
        row("(c) 100 tx miss: project", mode, r["c.project"], vs, "<= 1.3x floor", c <= 1.3)
        if feast:
            fc = feast["batch"]["p50_us"] / r["c.project"]["p50_us"]
            row("(d) 100 tx: Feast", mode, feast["batch"], f"{fc:.1f}x project", ">= 4x", fc >= 4)
    e = results.get("e2e")
    if e:
        t, p = e["trivial"], e["predict"]
        lines += [
            "",
            f"| (e) end to end, {e.get('placement')} | trivial | /predict | target | met |",
        ]
        lines.append("| --- | --- | --- | --- | --- |")
        d = (p["c1"]["p50_us"] - t["c1"]["p50_us"]) / 1e3
        lines.append(
            f"| p50 at concurrency 1 (n={p['c1']['n']:.0f}) | {t['c1']['p50_us'] / 1e3:.3f} ms "
            f"| {p['c1']['p50_us'] / 1e3:.3f} ms | +{d:.3f} ms <= 0.3 ms | {_ok(d <= 0.3)} |"
        )
        lines.append(
            f"| p99 at concurrency 1 | {t['c1']['p99_us'] / 1e3:.3f} ms "
            f"| {p['c1']['p99_us'] / 1e3:.3f} ms | | |"
        )
        share = p["max_rps"] / t["max_rps"]
        lines.append(
            f"| max RPS (32 conns) | {t['max_rps']:.0f} | {p['max_rps']:.0f} "
            f"| {share:.0%} >= 70% | {_ok(share >= 0.7)} |"
        )
        lines.append(
            f"| p99 at half max rate ({t['half_rate']:.0f} / {p['half_rate']:.0f} RPS, "
            f"n={p['half']['n']:.0f}) | {t['half']['p99_us'] / 1e3:.2f} ms "
            f"| {p['half']['p99_us'] / 1e3:.2f} ms | <= 10 ms | {_ok(p['half']['p99_us'] <= 1e4)} |"
        )
        f99 = p.get("server_feature_p99_ms")
        lines.append(
            f"| server feature p50 / p99 at half rate (histogram) | | "
            f"{p.get('server_feature_p50_ms') or 0:.3f} / {f99 or 0:.3f} ms | p99 <= 1 ms "
            f"| {_ok(f99 is not None and f99 <= 1.0)} |"
        )
        ratio = p.get("cache_hit_ratio")
        lines.append(f"| cache hit ratio at half rate | | {ratio or 0:.1%} | | |")
        lines.append(
            f"| failures (peak / half) | {t['max_failures']} / {t['half_failures']} "
            f"| {p['max_failures']} / {p['half_failures']} | 0 | "
            f"{_ok(p['max_failures'] + p['half_failures'] == 0)} |"
        )
    lines += bench_tail.table_lines(results)
    if "overload" in results:
        lines += bench_overload.table_lines(results["overload"])
    if "curve" in results:
        lines += bench_curve.table_lines(results["curve"])
    return "\n".join(lines)


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench", description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="samples per single-tx case")
    parser.add_argument("--placement", choices=["both", "shared", "split"], default="both")
    parser.add_argument("--no-micro", action="store_true", help="skip (a)-(d)")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--e2e-seconds", type=float, default=10.0)
    parser.add_argument(
        "--e2e-placement",
        choices=["pinned", "unpinned"],
        default="unpinned",
        help="pinned: service and redis-server on vCPU 1, client on 0",
    )
    parser.add_argument("--no-tail", action="store_true", help="skip (f)")
    parser.add_argument("--tail-seconds", type=float, default=30.0)
    parser.add_argument("--tail-rate", type=float, default=250.0, help="req/s")
    parser.add_argument("--no-slow-redis", action="store_true", help="skip (g)")
    parser.add_argument("--slow-redis-seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--slow-redis-rate", type=float, default=120.0, help="req/s")
    parser.add_argument("--no-overload", action="store_true", help="skip (h)")
    parser.add_argument("--overload-seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--no-curve", action="store_true", help="skip (i)")
    parser.add_argument("--curve-step-seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    modes = list(PLACEMENTS) if args.placement == "both" else [args.placement]
    if args.no_micro:
        modes = []
    results: dict[str, Any] = {"micro": {}, "feast": {}, "started": time.time()}
    own_cpus = os.sched_getaffinity(0)
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(quiet=True))
        stack.callback(os.sched_setaffinity, 0, own_cpus)
        settings = Settings(redis_url=server.url, redis_socket_timeout_s=10.0)
        asyncio.run(load(settings, demo_jobs(100_000, 10_000, 11)))
        assert server.process is not None
        for mode in modes:
            client_cpus, redis_cpus = PLACEMENTS[mode]
            os.sched_setaffinity(server.process.pid, redis_cpus)
            os.sched_setaffinity(0, client_cpus)
            print(f"micro-benchmarks, placement {mode}", flush=True)
            results["micro"][mode] = asyncio.run(micro(server.port, args.n))
            if not args.no_feast:
                print(f"Feast, placement {mode}", flush=True)
                results["feast"][mode] = run_feast(server.port, args.n, client_cpus)
            os.sched_setaffinity(0, own_cpus)
        if not (
            args.no_e2e
            and args.no_tail
            and args.no_slow_redis
            and args.no_overload
            and args.no_curve
        ):
            _train_if_missing()
        if not args.no_e2e:
            pinned = args.e2e_placement == "pinned"
            # Redis work is part of serving /predict: pinned, it shares the server's vCPU.
            os.sched_setaffinity(server.process.pid, {1} if pinned else own_cpus)
            print(f"end to end ({args.e2e_placement}): trivial and /predict", flush=True)
            results["e2e"] = end_to_end(server.url, args.n, args.e2e_seconds, pinned=pinned)
            results["e2e"]["placement"] = args.e2e_placement
        os.sched_setaffinity(server.process.pid, own_cpus)
        if not args.no_tail:
            print(
                f"tail from a cold start: {args.tail_rate:g} req/s, trivial then /predict",
                flush=True,
            )
            results["tail"] = bench_tail.tail(server.url, args.tail_rate, args.tail_seconds)
        if not args.no_slow_redis:
            print(f"slow Redis: {args.slow_redis_rate:g} req/s, fast / slow / fast", flush=True)
            results["slow_redis"] = bench_tail.slow_redis(
                server.port, args.slow_redis_rate, args.slow_redis_seconds
            )
        if not args.no_overload:
            print("overload: 3x the max rate, admission control off then on", flush=True)
            results["overload"] = bench_overload.overload(
                server.url, server.process.pid, args.overload_seconds
            )
        if not args.no_curve:
            print("latency against offered rate", flush=True)
            results["curve"] = bench_curve.curve(
                server.url, server.process.pid, args.curve_step_seconds
            )
    text = table(results)
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (RESULTS / f"bench-{stamp}.json", RESULTS / "bench-latest.json"):
        path.write_text(json.dumps(results, indent=1))
    (RESULTS / "bench-latest.md").write_text(text + "\n")
    print(f"saved {RESULTS / 'bench-latest.json'} and bench-{stamp}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
