"""What the fault and soak scenarios run against: their own redis-server with demo data,
a trained model, and `bentoml serve` on free loopback ports. Everything stops on exit."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tools.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "load_tests" / "results"


async def paced(rate: float, end: float) -> AsyncIterator[None]:
    """Yield `rate` times a second until monotonic time `end`, on a fixed schedule: a
    slow request delays the next one, never the rate after it."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while (now := time.monotonic()) < end:
        if now < next_at:
            await asyncio.sleep(next_at - now)
        next_at += interval
        yield


@dataclass
class Stack:
    """A running service and the redis-server behind it."""

    redis: RedisServer
    url: str
    serve: subprocess.Popen[bytes]
    log: Path


def _run(*args: str, env: dict[str, str]) -> None:
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


@contextmanager
def stack(users: int, merchants: int, **service_env: str) -> Iterator[Stack]:
    """Start redis-server, load demo features, train the model if missing, serve."""
    env = {
        **os.environ,
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(ROOT / ".bentoml")),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    with RedisServer(quiet=True) as redis:
        env["FEATURES_REDIS_URL"] = redis.url
        print(f"redis-server {redis.url}; loading {users} users, {merchants} merchants")
        _run(sys.executable, "-m", "features.offline.load", "--demo", "--users", str(users),
             "--merchants", str(merchants), env=env)  # fmt: skip
        _run(sys.executable, "-m", "models.train", "--if-missing", env=env)
        port = free_port()
        log = ROOT / "load_tests" / "results" / f"serve-{port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            serve = subprocess.Popen(
                [str(BIN / "bentoml"), "serve", "service:FraudService",
                 "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT, env={**env, **service_env}, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, serve, log)
            print(f"bentoml serve {url} (log {log.relative_to(ROOT)})")
            yield Stack(redis, url, serve, log)
        finally:
            stop_serve(serve)


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    """Stop a `bentoml serve`: SIGTERM to the arbiter stops its workers; SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_serve(
    target: str, port: int, env: dict[str, str], cpus: set[int], *, log_name: str | None = None
) -> subprocess.Popen[bytes]:
    """`bentoml serve target` on 127.0.0.1:port, pinned to `cpus`; returns once /readyz
    answers 200. The log goes to results/serve-<log_name or the class name>.log."""
    log = open(RESULTS / f"serve-{log_name or target.split(':')[-1]}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # noqa: PLW1509
    )
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{target} exited; see {log.name}")
        if is_ready(port):
            return proc
        time.sleep(0.3)
    proc.terminate()
    raise TimeoutError(f"{target} not ready on {port}")


def is_ready(port: int) -> bool:
    """True if the service on `port` answers GET /readyz with 200."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/readyz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def scrape(port: int) -> str:
    """The service's /metrics page."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def _wait_ready(url: str, serve: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("bentoml serve not ready")


_SAMPLE = re.compile(r"^features_retrieval_seconds_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LE = re.compile(r'le="([^"]+)"')


def retrieval_buckets(url: str) -> dict[float, float]:
    """Cumulative counts of features_retrieval_seconds by bucket bound, all sources."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        le = _LE.search(m["labels"])
        if le is not None:
            bound = float(le[1])
            buckets[bound] = buckets.get(bound, 0.0) + float(m["value"])
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The bucket bound under which fraction `q` of the observations between two scrapes fall."""
    delta = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return "n/a (no observations)"
    for bound in sorted(delta):
        if delta[bound] >= q * total:
            return f"<= {bound * 1e3:g} ms ({total:.0f} observations)"
    return "n/a"


def bucket_counts(before: dict[float, float], after: dict[float, float]) -> str:
    """Non-cumulative observations per bucket between two scrapes, e.g. `<=0.1ms:812`."""
    previous, parts = 0.0, []
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0.0)
        if cumulative > previous:
            parts.append(f"<={bound * 1e3:g}ms:{cumulative - previous:.0f}")
        previous = cumulative
    return " ".join(parts)
