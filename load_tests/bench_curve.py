"""`make bench` (i): latency against offered rate, one worker, admission control on; the
trivial endpoint (served with the same runtime options) swept the same way as baseline.

An open loop at fixed fractions of the max rate, a few seconds each, from the scheduled
send. The max is measured first, on a service of its own started with admission control
off (FRAUD_ADMISSION=0; a closed loop of 32 connections, 200s only), as (h) takes its
baseline: a closed loop that re-sends at once on a refusal would make the max depend on
the admission target. Per step: client p99 and the server's Server-Timing feature
p99 per step, goodput and refusals. The knee is the highest rate whose p99 stays within
10 ms. Drawn to docs/latency-vs-throughput.png. The service and redis-server on the last
vCPU, the client on the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from load_tests import httpload
from load_tests._stack import RESULTS, one_worker_env
from load_tests.bench_overload import placement
from load_tests.skew import transactions
from load_tests.stats import tail_summary
from tools.bento_server import BentoServer
from tools.redis_server import free_port

FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0, 3.0)
KNEE_P99_MS = 10.0
KNEE_TARGET = 0.8  # of the max rate
PNG = Path(__file__).resolve().parent.parent / "docs" / "latency-vs-throughput.png"
T = TypeVar("T")


async def _warmed(port: int, bodies: list[dict[str, Any]]) -> list[bytes]:
    """The requests of `bodies`, after a warm-up of the fresh service with them."""
    requests = httpload.encode_requests(port, "/predict", bodies)
    await httpload.closed_loop(port, requests, 16, 3.0)
    return requests


async def _max_rate(port: int, bodies: list[dict[str, Any]], step_s: float) -> float:
    """Requests answered with 200 a second by a closed loop of 32, after a warm-up."""
    requests = await _warmed(port, bodies)
    peak = await httpload.closed_loop(port, requests, 32, 2 * step_s)
    return len(peak.latencies) / peak.elapsed_s


async def _sweep(
    port: int, bodies: list[dict[str, Any]], max_rps: float, step_s: float
) -> dict[str, Any]:
    requests = await _warmed(port, bodies)
    steps = []
    for fraction in FRACTIONS:
        rate = fraction * max_rps
        run = await httpload.open_loop(port, requests, rate, step_s, 256, trace=True)
        trace = run.trace or []
        ok = [r for r in trace if r.status == 200]
        features = [f for r in ok if (f := r.timing_ms("features")) is not None]
        steps.append(
            {
                "fraction": fraction,
                "offered_rps": rate,
                "goodput_rps": len(ok) / run.elapsed_s,
                "refused": sum(r.status in (429, 503) for r in trace),
                "other": sum(r.status not in (200, 429, 503) for r in trace),
                "client_ms": tail_summary(r.latency_s * 1e3 for r in ok),
                "feature_ms": tail_summary(features),
            }
        )
    return {"steps": steps}


def knee(result: dict[str, Any]) -> float | None:
    """The highest offered rate, as a fraction of max, whose client p99 is within 10 ms
    with every step below it too."""
    best = None
    for step in result["steps"]:
        p99 = step["client_ms"]["p99"]
        if p99 is None or p99 > KNEE_P99_MS:
            break
        best = step["fraction"]
    return best


TARGETS = {
    "predict": "service:FraudService",
    "trivial": "load_tests.trivial_service:TrivialService",
}


def curve(redis_url: str, redis_pid: int, step_s: float) -> dict[str, Any]:
    """The sweep for /predict, then for the trivial endpoint as the same-run baseline."""
    result = {name: _one(target, redis_url, redis_pid, step_s) for name, target in TARGETS.items()}
    draw(result, PNG)
    return result


def _one(target: str, redis_url: str, redis_pid: int, step_s: float) -> dict[str, Any]:
    """The max on a service without admission control, then the sweep on a fresh one
    with it (as deployed)."""
    env = one_worker_env(redis_url)
    bodies = transactions(20_000)
    off = {**env, "FRAUD_ADMISSION": "0"}
    max_rps = _served(target, off, redis_pid, "max", lambda port: _max_rate(port, bodies, step_s))
    result = _served(
        target, env, redis_pid, "sweep", lambda port: _sweep(port, bodies, max_rps, step_s)
    )
    result["max_rps"] = max_rps
    result["step_s"] = step_s
    result["knee"] = knee(result)
    return result


def _served(
    target: str,
    env: dict[str, str],
    redis_pid: int,
    what: str,
    load: Callable[[int], Coroutine[Any, Any, T]],
) -> T:
    """`load` against a fresh one-worker service of `target`, the service and redis-server
    on the last vCPU, this process on the others."""
    own = os.sched_getaffinity(0)
    server_cpus, client_cpus = placement(redis_pid)
    port = free_port()
    log = RESULTS / f"serve-curve-{target.split(':')[-1]}-{what}.log"
    server = BentoServer(env, target=target, port=port, log=log, cpus=server_cpus).start()
    try:
        os.sched_setaffinity(0, client_cpus)
        return httpload.run(load(port))
    finally:
        os.sched_setaffinity(0, own)
        server.stop()


def draw(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("predict", "-"), ("trivial", "--")):
        steps = result[name]["steps"]
        x = [s["offered_rps"] for s in steps]
        lat.plot(x, [s["client_ms"]["p99"] for s in steps], "o" + style, label=f"{name} p99")
        lat.plot(x, [s["client_ms"]["p50"] for s in steps], "." + style, label=f"{name} p50")
        thr.plot(x, [s["goodput_rps"] for s in steps], "o" + style, label=f"{name} goodput")
    steps = result["predict"]["steps"]
    x = [s["offered_rps"] for s in steps]
    lat.plot(x, [s["feature_ms"]["p99"] for s in steps], "s-", label="predict: server feature p99")
    lat.axhline(KNEE_P99_MS, color="red", linestyle="--", label="10 ms")
    lat.axvline(result["predict"]["max_rps"], color="grey", linestyle=":", label="predict max")
    lat.set(xlabel="offered req/s", ylabel="ms (accepted)", yscale="log",
            title="Latency vs offered rate, 1 worker")  # fmt: skip
    lat.legend(fontsize="small")
    step_s = result["predict"]["step_s"]
    thr.plot(x, [s["refused"] / step_s for s in steps], "o-", label="predict refused (503)/s")
    thr.plot(x, x, color="grey", linestyle=":", label="offered")
    thr.set(xlabel="offered req/s", ylabel="req/s", title="Goodput and refusals, 1 worker")
    thr.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """(i)'s part of the `make bench` table: /predict, then the trivial endpoint."""
    return [line for name in TARGETS for line in _lines(name, result[name])]


def _lines(name: str, i: dict[str, Any]) -> list[str]:
    at = "-" if i["knee"] is None else f"{i['knee']:.0%}"
    lines = [
        "",
        f"(i) {name}: latency vs offered rate, 1 worker, {i['step_s']:g} s a step; max "
        f"{i['max_rps']:.0f} req/s; knee (p99 <= {KNEE_P99_MS:g} ms) at {at} of max "
        f"({'met' if (i['knee'] or 0) >= KNEE_TARGET else 'MISSED'}: >= {KNEE_TARGET:.0%}); "
        f"{PNG.name}",
        "",
        "| offered | req/s | goodput | refused | client p50 / p99 / p99.9 ms | feature p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in i["steps"]:
        c = s["client_ms"]
        lines.append(
            f"| {s['fraction']:.0%} | {s['offered_rps']:.0f} | {s['goodput_rps']:.0f} | "
            f"{s['refused']} | {_f(c['p50'])} / {_f(c['p99'])} / {_f(c['p99_9'])} | "
            f"{_f(s['feature_ms']['p99'])} |"
        )
    return lines
