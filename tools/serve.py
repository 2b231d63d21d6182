"""`make serve`: embedded Redis (unless one is given), demo data, model, `bentoml serve`,
and one velocity consumer of the stream the service appends to (`python -m features.stream`).

Everything it starts, it stops: Ctrl-C or SIGTERM ends the service and the consumer, then
Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack

from tools.bento_server import ROOT, BentoServer
from tools.redis_server import RedisServer
from tools.stream_consumer import StreamConsumer


def _run(args: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, env=env, cwd=ROOT, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("FRAUD_PORT", "3000")))
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=10_000)
    parser.add_argument("--no-demo", action="store_true", help="skip loading demo features")
    parser.add_argument(
        "--no-consumer", action="store_true", help="run no velocity consumer beside the service"
    )
    args = parser.parse_args(argv)

    python = sys.executable
    env = dict(os.environ)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM acts as Ctrl-C
    with ExitStack() as stack:
        url = env.get("FEATURES_REDIS_URL") or env.get("REDIS_URL")
        if url is None:
            redis = stack.enter_context(RedisServer())
            url = redis.url
            print(f"embedded redis-server on {url} (pid {redis.process and redis.process.pid})")
        else:
            print("using the Redis given by FEATURES_REDIS_URL / REDIS_URL")
        env["FEATURES_REDIS_URL"] = url
        if not args.no_demo:
            demo = ["--demo", "--users", str(args.users), "--merchants", str(args.merchants)]
            _run([python, "-m", "features.offline.load", *demo], env)
        _run([python, "-m", "models.train", "--if-missing"], env)

        if not args.no_consumer:  # stopped after the service: it drains what it appended
            consumer = stack.enter_context(StreamConsumer(env, ["--name", "make-serve"]))
            print(f"velocity consumer: pid {consumer.process.pid}", flush=True)
        server = stack.enter_context(BentoServer(env, port=args.port))
        print(f"bentoml serve ready on {server.url} in {server.startup_s:.1f} s", flush=True)
        try:
            return server.process.wait()
        except KeyboardInterrupt:
            return 0  # leaving the stack stops the service, then Redis


if __name__ == "__main__":
    sys.exit(main())
