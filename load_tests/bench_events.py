"""What appending scored transactions costs a request: `python -m load_tests.bench_events`.

One redis-server with demo features, one velocity consumer (unless `--no-consumer`), and
two one-worker services on it: FRAUD_EVENTS=1 (each scored transaction appended to the
stream) and FRAUD_EVENTS=0 (the same-run baseline). In interleaved rounds, each gets `--n`
sequential /predict calls (concurrency 1: latency) and `--seconds` of closed-loop load at
`--concurrency` (max RPS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack

from load_tests._stack import RESULTS, ROOT, one_worker_env
from load_tests.httpload import closed_loop, encode_requests, sequential
from load_tests.stats import quantile
from tools.bento_server import BentoServer
from tools.redis_server import RedisServer, free_port
from tools.stream_consumer import StreamConsumer

USERS, MERCHANTS = 10_000, 1_000


def bodies(seed: int, n: int = 2000) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "user_id": f"u{rng.randrange(USERS):06d}",
            "merchant_id": f"m{rng.randrange(MERCHANTS):05d}",
            "amount": round(rng.uniform(1, 500), 2),
        }
        for _ in range(n)
    ]


def line(name: str, latencies_s: list[float]) -> str:
    ms = sorted(x * 1e3 for x in latencies_s)
    qs = "  ".join(f"p{q * 100:g} {quantile(ms, q):6.3f}" for q in (0.5, 0.99, 0.999))
    return f"{name:<12} {qs}  max {ms[-1]:7.3f} ms  n={len(ms)}"


async def measure(ports: dict[str, int], args: argparse.Namespace) -> None:
    requests = {name: encode_requests(port, "/predict", bodies(7)) for name, port in ports.items()}
    latencies: dict[str, list[float]] = {name: [] for name in ports}
    rps: dict[str, list[float]] = {name: [] for name in ports}
    for name, port in ports.items():  # warm-up: connections, caches
        await sequential(port, requests[name], 200)
    for round_ in range(args.rounds):
        order = list(ports) if round_ % 2 == 0 else list(ports)[::-1]
        for name in order:
            run = await sequential(ports[name], requests[name], args.n)
            latencies[name] += run.latencies
            loaded = await closed_loop(ports[name], requests[name], args.concurrency, args.seconds)
            rps[name].append(loaded.rps)
    print(f"/predict at concurrency 1, {args.rounds} interleaved rounds:")
    for name in ports:
        print(line(name, latencies[name]))
    print(f"max RPS at concurrency {args.concurrency} ({args.seconds:g} s a round):")
    for name in ports:
        print(f"{name:<12} " + ", ".join(f"{r:.0f}" for r in rps[name]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_events", description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--no-consumer", action="store_true", help="no velocity consumer: the appender alone"
    )
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(ROOT / ".bentoml")),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer(quiet=True))
        env["FEATURES_REDIS_URL"] = redis.url
        demo = ["--demo", "--users", str(USERS), "--merchants", str(MERCHANTS)]
        for command in (["features.offline.load", *demo], ["models.train", "--if-missing"]):
            subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, check=True)
        if not args.no_consumer:  # on the same vCPUs: its work competes with the service's
            log = RESULTS / "consumer.log"
            stack.enter_context(StreamConsumer(env, ["--name", "bench"], log=log))
        ports = {}
        for name, flag in (("events on", "1"), ("events off", "0")):
            port = free_port()
            service_env = one_worker_env(redis.url) | {
                "BENTOML_HOME": env["BENTOML_HOME"],
                "FRAUD_EVENTS": flag,
            }
            stack.enter_context(
                BentoServer(service_env, port=port, log=RESULTS / f"serve-{port}.log")
            )
            ports[name] = port
        asyncio.run(measure(ports, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
