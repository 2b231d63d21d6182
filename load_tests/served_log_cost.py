"""What the served-feature log costs the request path: python -m load_tests.served_log_cost.

(a) In process: `sample()` then, when it picks, `offer()` for one scored transaction, at
sample rates 0, 0.01 and 1 with the writer thread running into a temporary directory, at
rate 1 without it, and a batch of 64 at rate 1. Cases take turns, round after round, so a
neighbour's load falls on all alike. Wall time per call, quantiles over every call.
(c) The writer thread's own CPU per record: conversion to Arrow, the Parquet write.
(b) End to end: two `bentoml serve` (one worker each), the log off and at rate 1, over one
redis-server with demo data; closed-loop /predict rounds, alternating, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from features import GROUPS, MODEL_FEATURES, GroupRead, Reason, Source
from features.offline.demo import merchant_ids, user_ids
from features.servedlog import ROW_GROUP_ROWS, ServedLog
from features.servedlog.ring import Ring
from load_tests import httpload
from load_tests._stack import one_worker_env, scrape
from load_tests.stats import counter_total, parse_prometheus, quantile, tail_summary
from tools.bento_server import BentoServer
from tools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
READS = {
    GROUPS[0].qualified_name: GroupRead(Source.REDIS),
    GROUPS[1].qualified_name: GroupRead(Source.DEFAULT, (), Reason.MISSING),
}
CASES = (  # name, sample rate, transactions a request, writer thread running
    ("rate 0", 0.0, 1, True),
    ("rate 0.01", 0.01, 1, True),
    ("rate 1", 1.0, 1, True),
    ("rate 1, no writer", 1.0, 1, False),
    ("rate 1, batch 64", 1.0, 64, True),
)


def micro(n: int, rounds: int) -> None:
    """(a): ns per request through sample() and offer(), each case in turn per round, with
    only its own log (and writer thread) open; the writer's backlog drains untimed."""
    per_call: dict[str, list[float]] = {name: [] for name, *_ in CASES}
    dropped = dict.fromkeys(per_call, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, rate, size, writing in CASES:
                log = ServedLog(sample_rate=rate, directory=Path(tmp) / f"{r}-{size}-{rate}",
                                queue_size=100_000, roll_rows=100_000, roll_s=60.0,
                                model_tag="fraud_mlp:bench", fingerprint="0" * 16)  # fmt: skip
                if writing:
                    log.start()
                per_call[name] += _calls(log, n if size == 1 else n // 64, size)
                log.close(120)
                dropped[name] += log.dropped
    print(f"(a) sample() + offer() per request, wall us, {rounds} rounds")
    for name, _, size, _ in CASES:
        us = np.array(per_call[name]) / 1e3
        print(f"  {name:<17} n={len(us)} mean={us.mean():.3f} p50={quantile(us, 0.5):.3f} "
              f"p99={quantile(us, 0.99):.3f} p99.9={quantile(us, 0.999):.3f} "
              f"max={us.max():.1f} (mean per transaction {us.mean() / size:.3f}); "
              f"dropped {dropped[name]}")  # fmt: skip


def _calls(log: ServedLog, n: int, size: int) -> list[float]:
    x = np.random.default_rng(0).random((size, len(MODEL_FEATURES))).astype(np.float32)
    ids = [{"user": f"u{i}", "merchant": f"m{i}"} for i in range(size)]
    times, reads, scores = np.full(size, 1.7e9), [READS] * size, [0.5] * size
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        picked = log.sample(size)
        if picked:
            log.offer(picked, None, ids, times, x, reads, scores)
        out.append(clock() - t0)
    return out


def writer(batches: int) -> None:
    """(c): the writer thread's own work per record: converting a row group of records
    to Arrow, and writing it to a Parquet file (thread CPU and wall)."""
    from features.servedlog.columns import arrow_schema, to_table
    from features.servedlog.files import RollingParquet

    n = ROW_GROUP_ROWS
    x = np.random.default_rng(0).random((n, len(MODEL_FEATURES))).astype(np.float32)
    ring = Ring(n, len(MODEL_FEATURES), list(READS))
    ids = [{"user": f"u{i:06d}", "merchant": f"m{i % 999:05d}"} for i in range(n)]
    with ring.lock:
        ring.put(range(n), 1.7e9, "0123456789abcdef", ids, np.full(n, 1.7e9), x, [READS] * n,
                 [0.5] * n)  # fmt: skip
    records = ring.take(n)
    timings: dict[str, tuple[list[float], list[float]]] = {"to_table": ([], []), "write": ([], [])}
    with tempfile.TemporaryDirectory() as tmp:
        sink = RollingParquet(Path(tmp), arrow_schema(), roll_rows=n * batches)
        for _ in range(batches):
            w0, c0 = time.perf_counter(), time.thread_time()
            table = to_table(records, sink.schema, "fraud_mlp:bench", "0" * 16)
            w1, c1 = time.perf_counter(), time.thread_time()
            sink.write(table)
            w2, c2 = time.perf_counter(), time.thread_time()
            timings["to_table"][0].append(w1 - w0)
            timings["to_table"][1].append(c1 - c0)
            timings["write"][0].append(w2 - w1)
            timings["write"][1].append(c2 - c1)
        sink.close()
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.parquet"))
    print(f"(c) writer, {batches} row groups of {n} records, us per record (median over groups)")
    for step, (wall, cpu) in timings.items():
        print(f"  {step:<9} wall {np.median(wall) / n * 1e6:.2f}  thread cpu "
              f"{np.median(cpu) / n * 1e6:.2f}")  # fmt: skip
    print(f"  file: {size / (n * batches):.0f} bytes per record (snappy)")


def end_to_end(seconds: float, rounds: int, concurrency: int) -> None:
    """(b): closed-loop /predict throughput, the log off vs at rate 1, interleaved."""
    with tempfile.TemporaryDirectory() as tmp, RedisServer(quiet=True) as redis:
        # Admission control off: this measures the most the worker serves, not the limit.
        env = one_worker_env(redis.url) | {"BENTOML_HOME": str(Path(tmp) / "home"),
                                           "FRAUD_ADMISSION": "0"}  # fmt: skip
        subprocess.run([sys.executable, "-m", "features.offline.load", "--demo", "--users",
                        "20000", "--merchants", "2000"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([sys.executable, "-m", "models.train", "--rows", "20000", "--epochs",
                        "3"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        configs = {
            "log off": {},
            "log rate 1": {"FEATURES_SERVED_LOG_SAMPLE_RATE": "1",
                           "FEATURES_SERVED_LOG_DIR": str(Path(tmp) / "served"),
                           "FEATURES_SERVED_LOG_ROLL_S": "2"},
        }  # fmt: skip
        rng = random.Random(3)
        users, merchants = user_ids(20000), merchant_ids(2000)
        bodies = [{"user_id": rng.choice(users), "merchant_id": rng.choice(merchants),
                   "amount": round(rng.uniform(1, 500), 2)} for _ in range(5000)]  # fmt: skip
        servers = {
            name: BentoServer({**env, **extra, "BENTOML_HOME": str(Path(tmp) / "home")},
                              log=Path(tmp) / f"{name.replace(' ', '')}.log")
            for name, extra in configs.items()
        }  # fmt: skip
        results: dict[str, list[httpload.Run]] = {name: [] for name in servers}
        try:
            for server in servers.values():
                server.start()
            warm = {
                name: asyncio.run(
                    httpload.closed_loop(server.port, _encode(server, bodies), 8, 2.0)
                )
                for name, server in servers.items()
            }  # the cache and the model warm up
            for _ in range(rounds):
                for name, server in servers.items():
                    run = asyncio.run(httpload.closed_loop(
                        server.port, _encode(server, bodies), concurrency, seconds))  # fmt: skip
                    results[name].append(run)
            logged = parse_prometheus(scrape(servers["log rate 1"].port))
        finally:
            for server in servers.values():
                server.stop()
        print(f"(b) /predict closed loop, concurrency {concurrency}, {rounds} x {seconds:.0f} s"
              " rounds each, alternating, 1 worker each")  # fmt: skip
        for name, runs in results.items():
            rps = [r.rps for r in runs]
            lat = tail_summary(ms * 1e3 for r in runs for ms in r.latencies)
            failures = sum(r.failures for r in runs)
            print(f"  {name:<11} rps per round {[round(v) for v in rps]} mean {np.mean(rps):.0f};"
                  f" latency ms p50={lat['p50']:.2f} p99={lat['p99']:.2f} "
                  f"p99.9={lat['p99_9']:.2f} max={lat['max']:.1f} n={lat['n']} "
                  f"failures={failures}")  # fmt: skip
        counts = {
            result: counter_total(logged, "features_served_log_records_total", {"result": result})
            for result in ("written", "dropped", "failed")
        }
        files = sorted((Path(tmp) / "served").glob("served-*.parquet"))
        rows = sum(pq.read_metadata(p).num_rows for p in files)
        runs = [warm["log rate 1"], *results["log rate 1"]]
        served = sum(len(r.latencies) for r in runs)
        print(
            f"  served log, rate 1, before stop: {counts}; after stop: {rows} rows in "
            f"{len(files)} files, {sum(p.stat().st_size for p in files) / max(rows, 1):.0f}"
            f" bytes a row, for {served} requests answered 200 (warm-up included)"
        )


def _encode(server: BentoServer, bodies: list[dict[str, object]]) -> list[bytes]:
    return httpload.encode_requests(server.port, "/predict", bodies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="calls per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writer-batches", type=int, default=20)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--e2e-seconds", type=float, default=8.0, help="per round")
    parser.add_argument("--e2e-rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(f"pid {os.getpid()}, {os.cpu_count()} CPUs (shared with other jobs)")
    micro(args.n, args.rounds)
    writer(args.writer_batches)
    if not args.no_e2e:
        end_to_end(args.e2e_seconds, args.e2e_rounds, args.concurrency)


if __name__ == "__main__":
    main()
