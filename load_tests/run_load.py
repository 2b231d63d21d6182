"""`make load`: embedded Redis, demo data, model, `bentoml serve`, Locust, one report.

Locust runs headless for a bounded time; the feature and inference times come from the
service's own histograms (Locust rounds sub-100 ms times to whole ms). Everything it
starts, it stops. Output: load_tests/results/load-report.md, load.png, load.html, load.json, CSVs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from load_tests import report
from load_tests._stack import stop_serve
from tools.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "load_tests" / "results"


def _get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}")
        try:
            if _get(port, "/readyz", 1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"bentoml serve not ready on port {port}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.run_load", description=__doc__)
    parser.add_argument(
        "--run-time", default=os.environ.get("LOAD_RUN_TIME", "60s"), help="Locust --run-time"
    )
    parser.add_argument(
        "--users",
        type=int,
        default=int(os.environ.get("LOAD_USERS", "20")),
        help="simulated clients, each offering 10 requests/s",
    )
    parser.add_argument(
        "--workers",
        default=os.environ.get("FRAUD_WORKERS", "2"),
        help="service workers: one per vCPU of this 2-vCPU machine",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    bindir = Path(python).parent
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "FRAUD_WORKERS": args.workers}
    with ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer(quiet=True))
        env["FEATURES_REDIS_URL"] = redis_server.url
        print(f"redis-server on {redis_server.url}", flush=True)
        subprocess.run(
            [python, "-m", "features.offline.load", "--demo"], env=env, cwd=ROOT, check=True
        )
        subprocess.run(
            [python, "-m", "models.train", "--if-missing"], env=env, cwd=ROOT, check=True
        )

        port = free_port()
        log_path = RESULTS / "serve.log"
        with log_path.open("wb") as log:
            serve = subprocess.Popen(
                [str(bindir / "bentoml"), "serve", "service:FraudService",
                 "--host", "127.0.0.1", "--port", str(port)],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        stack.callback(stop_serve, serve)
        _wait_ready(serve, port)
        print(f"bentoml serve on 127.0.0.1:{port}, {args.workers} workers", flush=True)
        before = _get(port, "/metrics")[1]

        prefix = RESULTS / "load"
        locust = [
            str(bindir / "locust"),
            "--config", str(ROOT / "load_tests" / "locust.conf"),
            "-f", str(ROOT / "load_tests" / "locustfile.py"),
            "--host", f"http://127.0.0.1:{port}",
            "--users", str(args.users), "--spawn-rate", str(args.users),
            "--run-time", args.run_time,
            "--csv", str(prefix), "--csv-full-history",
            "--html", str(RESULTS / "load.html"),
            "--json-file", str(prefix),
            "--exit-code-on-error", "0",
        ]  # fmt: skip
        print("+", " ".join(locust[1:]), flush=True)
        subprocess.run(locust, env=env, cwd=ROOT, check=True)
        after = _get(port, "/metrics")[1]

    client = report.locust_final(Path(f"{prefix}.json").read_text())
    history = report.locust_history(Path(f"{prefix}_stats_history.csv").read_text())
    server = report.diff_stats(before, after)
    result = report.verdict(client, server)
    title = (
        f"make load: {args.users} users (~{args.users * 10} RPS offered), {args.run_time}, "
        f"{args.workers} workers"
    )
    text = report.markdown(client, server, result, title)
    (RESULTS / "load-report.md").write_text(text)
    report.plot(history, server, RESULTS / "load.png")
    print(text)
    print(f"wrote {RESULTS}/load-report.md, load.png, load.html, load_*.csv")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
