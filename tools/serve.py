"""`make serve`: embedded Redis (unless one is given), demo data, model, `bentoml serve`.

Everything it starts, it stops: Ctrl-C or SIGTERM ends the service, then Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from tools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, env=env, cwd=ROOT, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.serve", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("FRAUD_PORT", "3000")))
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=10_000)
    parser.add_argument("--no-demo", action="store_true", help="skip loading demo features")
    args = parser.parse_args(argv)

    python = sys.executable
    env = dict(os.environ)
    with ExitStack() as stack:
        url = env.get("FEATURES_REDIS_URL") or env.get("REDIS_URL")
        if url is None:
            server = stack.enter_context(RedisServer())
            url = server.url
            print(f"embedded redis-server on {url} (pid {server.process and server.process.pid})")
        else:
            print("using the Redis given by FEATURES_REDIS_URL / REDIS_URL")
        env["FEATURES_REDIS_URL"] = url
        if not args.no_demo:
            demo = ["--demo", "--users", str(args.users), "--merchants", str(args.merchants)]
            _run([python, "-m", "features.offline.load", *demo], env)
        _run([python, "-m", "models.train", "--if-missing"], env)

        serve = [
            str(Path(python).parent / "bentoml"),
            "serve", "service:FraudService",
            "--host", "127.0.0.1",
            "--port", str(args.port),
        ]  # fmt: skip
        print("+", " ".join(serve), flush=True)
        service = subprocess.Popen(serve, env=env, cwd=ROOT)
        # SIGTERM to us becomes SIGTERM to the service; Ctrl-C reaches it directly.
        signal.signal(signal.SIGTERM, lambda *_: service.terminate())
        try:
            return service.wait()
        except KeyboardInterrupt:
            service.send_signal(signal.SIGINT)
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
            return 0
        finally:
            if service.poll() is None:
                service.terminate()
                service.wait(15)


if __name__ == "__main__":
    sys.exit(main())
