"""`make load`: embedded Redis, demo data, model, `bentoml serve`, Locust, one report.

Locust runs headless for a bounded time; the feature and inference times come from the
service's own histograms (Locust rounds sub-100 ms times to whole ms). Everything it
starts, it stops. Output: load_tests/results/load-report.md, load.png, load.html, load.json, CSVs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from load_tests import report
from load_tests._stack import RESULTS, ROOT, scrape
from tools.bento_server import BentoServer
from tools.redis_server import RedisServer


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
        type=int,
        default=int(os.environ.get("FRAUD_WORKERS", "2")),
        help="service workers: one per vCPU of this 2-vCPU machine",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    bindir = Path(python).parent
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
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

        serve = BentoServer(env, workers=args.workers, log=RESULTS / "serve.log")
        port = stack.enter_context(serve).port
        print(f"bentoml serve on 127.0.0.1:{port}, {args.workers} workers, ready in "
              f"{serve.startup_s:.1f} s", flush=True)  # fmt: skip
        before = scrape(port)

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
        after = scrape(port)

    client = report.locust_final(Path(f"{prefix}.json").read_text())
    history = report.locust_history(Path(f"{prefix}_stats_history.csv").read_text())
    server = report.diff_stats(before, after)
    result = report.verdict(client, server)
    title = (
        f"make load: {args.users} users (~{args.users * 10} RPS offered), {args.run_time}, "
        f"{args.workers} workers"
    )
    per_worker = report.worker_requests(before, after)
    text = report.markdown(client, server, result, title, per_worker)
    (RESULTS / "load-report.md").write_text(text)
    report.plot(history, server, RESULTS / "load.png")
    print(text)
    print(f"wrote {RESULTS}/load-report.md, load.png, load.html, load_*.csv")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
