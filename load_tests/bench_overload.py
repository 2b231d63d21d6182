"""`make bench` (h): one worker offered 3x what it can serve.

The worker's max rate first (closed loop, 32 connections), then an open loop at 3x that
over 256 connections, then half the max rate to see it recover. Latency is taken from
each request's scheduled send. The same run is made twice, admission control on (the
default) and off (FRAUD_ADMISSION=0), the second as the baseline. Placement: the
service and redis-server on the last vCPU, the client on the others.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from features.offline.load import main as load_main
from load_tests import httpload
from load_tests._stack import RESULTS, one_worker_env, scrape
from load_tests.httpload import Response
from load_tests.skew import transactions
from load_tests.stats import counter_total, parse_prometheus, tail_summary
from tools.bento_server import BentoServer
from tools.redis_server import RedisServer, free_port

OVERLOAD = 3.0
CONNECTIONS = 256
RECOVERY_AFTER_S = 5.0  # the p99 target applies from this long after the overload ends
# Targets: ms, fractions.
GOODPUT_FRACTION, ACCEPTED_P99_MS, REFUSED_P99_MS, RECOVERED_P99_MS = 0.8, 50.0, 5.0, 10.0
ALLOWED = {200, 429, 503}


def placement(redis_pid: int) -> tuple[set[int], set[int]]:
    """(service vCPUs, client vCPUs): apart when there are two or more, unless
    BENCH_PLACEMENT=unpinned leaves all of them to the scheduler. redis-server joins the
    service: its work is part of serving /predict, and a client busy at 1000s of req/s
    would hold up every reply."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or os.environ.get("BENCH_PLACEMENT") == "unpinned":
        server, client = set(cpus), set(cpus)
    else:
        server, client = {cpus[-1]}, set(cpus[:-1])
    os.sched_setaffinity(redis_pid, server)
    return server, client


def phase(trace: Sequence[Response], elapsed_s: float) -> dict[str, Any]:
    """Statuses, goodput, and tails (ms from the scheduled send) of one open-loop phase."""
    statuses = Counter(r.status for r in trace)
    return {
        "n": len(trace),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "goodput_rps": statuses[200] / elapsed_s if elapsed_s else 0.0,
        "accepted_ms": tail_summary(r.latency_s * 1e3 for r in trace if r.status == 200),
        "refused_ms": tail_summary(r.latency_s * 1e3 for r in trace if r.status in (429, 503)),
        "dropped": statuses[httpload.DROPPED],
        "other": sum(v for k, v in statuses.items() if k not in ALLOWED),
    }


async def _run(
    port: int, bodies: list[dict[str, Any]], seconds: float, base_rps: float | None
) -> dict[str, Any]:
    """Max rate, then 3x `base_rps` (else 3x the max just measured), then half of it."""
    requests = httpload.encode_requests(port, "/predict", bodies)
    await httpload.closed_loop(port, requests, 16, 3.0)  # warm-up: cache, model, loop
    peak = await httpload.closed_loop(port, requests, 32, seconds)
    max_rps = len(peak.latencies) / peak.elapsed_s  # answered with 200
    rate = OVERLOAD * (base_rps or max_rps)
    over = await httpload.open_loop(port, requests, rate, seconds, CONNECTIONS, trace=True)
    ended = over.elapsed_s
    after = await httpload.open_loop(
        port, requests, rate / OVERLOAD / 2, 2 * RECOVERY_AFTER_S, trace=True
    )
    trace = after.trace or []
    settled = [r for r in trace if r.scheduled - trace[0].scheduled >= RECOVERY_AFTER_S]
    return {
        "max_rps": max_rps,
        "max_not_200": peak.failures,
        "offered_rps": rate,
        "overload": phase(over.trace or [], ended),
        "overload_late": over.late,
        "recovery": phase(settled, RECOVERY_AFTER_S),
    }


def overload(redis_url: str, redis_pid: int, seconds: float) -> dict[str, Any]:
    """(h), admission control off then on, each on a fresh one-worker service, both
    offered 3x the max rate measured without it."""
    own = os.sched_getaffinity(0)
    server_cpus, client_cpus = placement(redis_pid)
    base = one_worker_env(redis_url)
    bodies = transactions(20_000)
    out: dict[str, Any] = {
        "seconds": seconds,
        "placement": {"service": sorted(server_cpus), "client": sorted(client_cpus)},
    }
    base_rps = None
    for name, admission in (("no_admission", "0"), ("admission", "1")):
        port = free_port()
        env = {**base, "FRAUD_ADMISSION": admission}
        log = RESULTS / f"serve-overload-{name}.log"
        server = BentoServer(env, port=port, log=log, cpus=server_cpus).start()
        try:
            os.sched_setaffinity(0, client_cpus)
            result = httpload.run(_run(port, bodies, seconds, base_rps))
            base_rps = base_rps or result["max_rps"]
            metrics = parse_prometheus(scrape(port))
            result["refused_by_reason"] = {
                reason: counter_total(metrics, "fraud_admission_refused_total", {"reason": reason})
                for reason in ("limit", "budget")
            }
        finally:
            os.sched_setaffinity(0, own)
            server.stop()
        out[name] = result
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ok(flag: bool) -> str:
    return "met" if flag else "MISSED"


def table_lines(h: dict[str, Any]) -> list[str]:
    """(h)'s part of the `make bench` table."""
    names = ["admission", "no_admission"]
    lines = [
        "",
        f"(h) 3x overload, 1 worker, {h['seconds']:g} s per phase; service and Redis on vCPU "
        f"{h['placement']['service']}, client on {h['placement']['client']}",
        "",
        "| | admission on | off (baseline) | target |",
        "| --- | --- | --- | --- |",
    ]
    on, off = (h[n] for n in names)

    def row(label: str, get: Any, target: str = "") -> None:
        lines.append(f"| {label} | {get(on)} | {get(off)} | {target} |")

    def ms(part: str, key: str, q: str) -> Any:
        return lambda r: _f(r[part][key][q])

    row("max rate (closed loop, 32 conns, 200s)", lambda r: f"{r['max_rps']:.0f} req/s")
    row("offered", lambda r: f"{r['offered_rps']:.0f} req/s over {CONNECTIONS} conns")
    row(
        "goodput",
        lambda r: (
            f"{r['overload']['goodput_rps']:.0f} req/s "
            f"({r['overload']['goodput_rps'] / off['max_rps']:.0%} of the max without)"
        ),
        _ok(on["overload"]["goodput_rps"] >= GOODPUT_FRACTION * off["max_rps"])
        + f" (>= {GOODPUT_FRACTION:.0%})",
    )
    row(
        "goodput vs what the worker served without admission control",
        lambda r: f"{r['overload']['goodput_rps'] / off['overload']['goodput_rps']:.0%}",
    )
    row(
        "accepted p50 / p99 / max ms",
        lambda r: " / ".join(_f(r["overload"]["accepted_ms"][q]) for q in ("p50", "p99", "max")),
        _ok((on["overload"]["accepted_ms"]["p99"] or 1e9) <= ACCEPTED_P99_MS)
        + f" (p99 <= {ACCEPTED_P99_MS:g})",
    )
    row(
        "refused p50 / p99 ms",
        lambda r: " / ".join(_f(r["overload"]["refused_ms"][q]) for q in ("p50", "p99")),
        _ok((on["overload"]["refused_ms"]["p99"] or 1e9) <= REFUSED_P99_MS)
        + f" (p99 <= {REFUSED_P99_MS:g})",
    )
    row(
        "sent > 2 ms late (the client fell behind)",
        lambda r: f"{r['overload_late']} of {r['overload']['n']}",
    )
    row("statuses", lambda r: ", ".join(f"{k}: {v}" for k, v in r["overload"]["statuses"].items()))
    row(
        "dropped / other statuses",
        lambda r: f"{r['overload']['dropped']} / {r['overload']['other']}",
        _ok(on["overload"]["dropped"] == 0 and on["overload"]["other"] == 0) + " (0 / 0)",
    )
    row(
        f"p99 from {RECOVERY_AFTER_S:g} s after, at half max",
        ms("recovery", "accepted_ms", "p99"),
        _ok((on["recovery"]["accepted_ms"]["p99"] or 1e9) <= RECOVERED_P99_MS)
        + f" (<= {RECOVERED_P99_MS:g} ms)",
    )
    row("refused: limit / budget", lambda r: " / ".join(
        f"{v:.0f}" for v in r["refused_by_reason"].values()))  # fmt: skip
    return lines


def main() -> int:
    """`python -m load_tests.bench_overload [seconds]`: (h) alone, on its own redis-server."""
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    with RedisServer(quiet=True) as redis:
        os.environ["FEATURES_REDIS_URL"] = redis.url
        load_main(["--demo"])
        assert redis.process is not None
        print("\n".join(table_lines(overload(redis.url, redis.process.pid, seconds))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
