"""`make bench` (f) and (g): tails at a fixed offered rate, from a cold start and behind a
slow Redis. Latency is taken from each request's scheduled send time, so a client or
server that falls behind shows in it; ids are skewed as in (e).

(f) tail: `bentoml serve` from cold (start, wait for /readyz), then straight away an open
    loop on /predict; the trivial endpoint first, started cold and run the same way, as
    the baseline. Client p50/p99/p99.9/max, the Server-Timing feature time of every
    response, and the worker's GC pauses from /metrics. After both, the baseline of the
    feature time: the service's FeatureStore alone in a process of its own (built from the
    same settings, cold, no HTTP; the heap frozen as the worker freezes its own), reading
    the same ids at the same rate, each read timed as Server-Timing times the step; and
    the floor of those reads: load_tests/floor.py's client alone, the same way, sending
    every group's commands (nothing cached, nothing decoded).
(g) slow Redis: one worker reading Redis through a proxy that holds every reply: after a
    2 s warm-up, fast, 30 ms slow (below the socket timeout), fast again, in one open
    loop. Per phase the Server-Timing feature time; when the breaker opened and the
    feature median after it; how soon after the delay ended Redis values came back.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from features import GROUPS, Settings, open_redis
from features.online.codec import codec_for
from features.online.from_settings import open_store
from features.online.keys import RowKeys
from load_tests import httpload
from load_tests._stack import RESULTS, one_worker_env, scrape
from load_tests.floor import FloorClient
from load_tests.httpload import Response, Run
from load_tests.report import gc_pauses
from load_tests.skew import transactions
from load_tests.stats import quantile, tail_summary
from tools.bento_server import BentoServer
from tools.delay_proxy import DelayProxy
from tools.redis_server import free_port

TARGETS = {
    "trivial": "load_tests.trivial_service:TrivialService",
    "predict": "service:FraudService",
}
SLOW_REPLY_S = 0.03
WARMUP_S = 2.0  # (g) only: (f) is about the cold start itself
GC_FLUSH_S = 1.5  # the worker moves GC pauses into /metrics once a second (features/collector)
BREAKER_OPEN = "circuit_open"
# Targets (ms, except where named).
TAIL_P99_MS, TAIL_P999_MS, TAIL_FEATURE_P99_MS, GC_PAUSE_MS = 10.0, 20.0, 1.0, 5.0
DEADLINE_SLACK_MS, OPEN_MEDIAN_MS, REDIS_BACK_S = 2.0, 1.0, 2.0


def _deadline_s(env: dict[str, str]) -> float:
    """The read deadline the service runs with in `env`."""
    return Settings.from_env(env).deadline_s


# --- reading a traced run -------------------------------------------------------------


def feature_ms(trace: Iterable[Response]) -> list[float]:
    """The Server-Timing feature time of every response that has one."""
    return [ms for r in trace if (ms := r.timing_ms("features")) is not None]


def client_ms(trace: Iterable[Response]) -> list[float]:
    """Latencies (ms, from the scheduled send) of the 200 responses."""
    return [r.latency_s * 1e3 for r in trace if r.status == 200]


def sources(response: Response) -> list[tuple[str, str | None]]:
    """(source, reason) of each feature group in a /predict answer; [] if none."""
    if response.status != 200:
        return []
    groups = json.loads(response.body).get("sources", {})
    return [(g["source"], g.get("reason")) for g in groups.values()]


def _breaker_open(response: Response) -> bool:
    return any(reason == BREAKER_OPEN for _, reason in sources(response))


def _from_redis(response: Response) -> bool:
    return any(source == "redis" for source, _ in sources(response))


def _done(response: Response) -> float:
    return response.done


def _source_counts(trace: Iterable[Response]) -> dict[str, int]:
    counts = Counter(
        source if reason is None else f"{source}/{reason}"
        for r in trace
        for source, reason in sources(r)
    )
    return dict(counts.most_common())


def phase_report(trace: Sequence[Response], slow_from: float, slow_until: float) -> dict[str, Any]:
    """Split a run at the start and end of a slow dependency (perf_counter times).

    Phases go by scheduled send time. The breaker counts as open from the first slow-phase
    answer carrying reason `circuit_open`; Redis counts as back at the first answer sent
    after the slow phase with a group read from Redis.
    """
    phases = {
        "fast": [r for r in trace if r.scheduled < slow_from],
        "slow": [r for r in trace if slow_from <= r.scheduled < slow_until],
        "fast_again": [r for r in trace if r.scheduled >= slow_until],
    }
    out: dict[str, Any] = {
        name: {
            "features_ms": tail_summary(feature_ms(rs)),
            "client_ms": tail_summary(client_ms(rs)),
            "non_200": sum(r.status != 200 for r in rs),
            "sources": _source_counts(rs),
        }
        for name, rs in phases.items()
    }
    slow = sorted(phases["slow"], key=_done)
    opened = next((r.done for r in slow if _breaker_open(r)), None)
    since_open = [] if opened is None else feature_ms(r for r in slow if r.sent >= opened)
    after = sorted((r for r in trace if r.sent >= slow_until), key=_done)
    back = next((r.done for r in after if _from_redis(r)), None)
    out["breaker_open_after_s"] = None if opened is None else opened - slow_from
    out["slow_features_p50_since_open_ms"] = quantile(since_open, 0.5) if since_open else None
    out["slow_since_open_n"] = len(since_open)
    out["redis_back_after_s"] = None if back is None else back - slow_until
    out["slow_s"] = slow_until - slow_from
    return out


# --- (f) tail from a cold start -------------------------------------------------------


@contextmanager
def _own_gc_pauses() -> Iterator[list[float]]:
    """This process's collections meanwhile (s): a stall of the client shows here."""
    pauses: list[float] = []
    started = 0.0

    def timed(phase: str, info: dict[str, Any]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started)

    gc.callbacks.append(timed)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(timed)


async def _open_loop(port: int, bodies: list[dict[str, Any]], rate: float, dur_s: float) -> Run:
    requests = httpload.encode_requests(port, "/predict", bodies)
    return await httpload.open_loop(port, requests, rate, dur_s, trace=True)


async def _store_alone(
    settings: Settings, rows: list[dict[str, str]], rate: float, dur_s: float
) -> list[float]:
    """The service's read of each row, one at a time at `rate` (open loop): ms from each
    read's start to its end, as Server-Timing times the feature step. (Not from the
    scheduled start: uvloop's timers fire on whole milliseconds.)"""
    client = open_redis(settings)
    store = open_store(settings, client)
    out: list[float] = []
    try:
        await store.open()
        # time.monotonic, not loop.time: uvloop's clock is cached per loop iteration.
        start = time.monotonic() + 0.05
        for i in range(int(rate * dur_s)):
            due = start + i / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            started = time.perf_counter()
            await store.read([rows[i % len(rows)]])
            out.append((time.perf_counter() - started) * 1e3)
    finally:
        await store.aclose()
        await client.aclose()
    return out


async def _floor_alone(
    settings: Settings, rows: list[dict[str, str]], rate: float, dur_s: float
) -> list[float]:
    """The floor of the same reads, timed the same way: load_tests/floor.py's client
    sending each row's commands for every group in one write (what the store sends when
    nothing is cached: the HMGETs, the GET, the sorted sets' pairs; built beforehand),
    with no cache, no decoding and no deadline."""
    url = urlsplit(settings.redis_url)
    floor = await FloorClient.connect(url.hostname or "127.0.0.1", url.port or 6379)
    row_keys, codecs = RowKeys(GROUPS), [codec_for(group) for group in GROUPS]
    now, n = time.time(), int(rate * dur_s)
    commands = []
    for row in rows[:n]:
        ids = row_keys.ids(row)
        keys = [row_keys.key(column, ids) for column in range(len(codecs))]
        commands.append(
            [c for key, codec in zip(keys, codecs, strict=True) for c in codec.commands(key, now)]
        )
    out: list[float] = []
    try:
        start = time.monotonic() + 0.05
        for i in range(n):
            due = start + i / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            started = time.perf_counter()
            await floor.execute(commands[i % len(commands)])
            out.append((time.perf_counter() - started) * 1e3)
    finally:
        floor.close()
    return out


ALONE = {"store-alone": _store_alone, "floor-alone": _floor_alone}


def _alone_process(mode: str, env: dict[str, str], rate: float, dur_s: float) -> dict[str, Any]:
    """`_store_alone` or `_floor_alone` (`mode`, a key of ALONE) in a fresh process, as a
    worker is one: this one's heap (the loaded population, the traces) would give its reads
    GC pauses a worker has not."""
    done = subprocess.run(
        [sys.executable, "-m", "load_tests.bench_tail", mode, str(rate), str(dur_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=dur_s + 120,
        check=True,
    )
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def _alone_main(mode: str, rate: float, dur_s: float) -> None:
    bodies = transactions(20_000)
    rows = [{"user": b["user_id"], "merchant": b["merchant_id"]} for b in bodies]
    gc.collect()
    gc.freeze()  # as the worker does once it is set up
    samples = httpload.run(ALONE[mode](Settings.from_env(os.environ), rows, rate, dur_s))
    print(json.dumps(tail_summary(samples)))


def tail(redis_url: str, rate: float, dur_s: float) -> dict[str, Any]:
    """(f): each endpoint started cold and run alone, the trivial one first, then the
    store alone."""
    env, cpus = one_worker_env(redis_url), os.sched_getaffinity(0)
    bodies = transactions(20_000)
    out: dict[str, Any] = {"rate": rate, "seconds": dur_s}
    for name, target in TARGETS.items():
        port = free_port()
        log = RESULTS / f"serve-tail-{name}.log"
        server = BentoServer(env, target=target, port=port, log=log, cpus=cpus).start()
        try:
            before = scrape(port)
            with _own_gc_pauses() as client_gc:
                run = httpload.run(_open_loop(port, bodies, rate, dur_s))
            time.sleep(GC_FLUSH_S)
            after = scrape(port)
        finally:
            server.stop()
        trace = run.trace or []
        out[name] = {
            "client_ms": tail_summary(client_ms(trace)),
            "non_200": sum(r.status != 200 for r in trace),
            "late": run.late,
            "features_ms": tail_summary(feature_ms(trace)),
            "gc": gc_pauses(before, after),
            "client_gc_max_ms": max(client_gc, default=0.0) * 1e3,
        }
    # Last: reads right after the population's load were slower in every probe (Redis
    # still growing its tables, most likely), and the services' cold runs stay as before.
    out["store_alone_ms"] = _alone_process("store-alone", env, rate, dur_s)
    out["floor_alone_ms"] = _alone_process("floor-alone", env, rate, dur_s)
    return out


# --- (g) slow Redis -------------------------------------------------------------------


async def _phases(
    port: int,
    bodies: list[dict[str, Any]],
    rate: float,
    phase_s: float,
    proxy: DelayProxy,
) -> tuple[Run, float, float]:
    """A warm-up, then one open loop over three phases; the proxy turns slow for the
    middle one."""

    async def switch() -> tuple[float, float]:
        await asyncio.sleep(phase_s)
        proxy.set_delay(SLOW_REPLY_S)
        slow_from = time.perf_counter()
        await asyncio.sleep(phase_s)
        proxy.set_delay(0.0)
        return slow_from, time.perf_counter()

    # Past start-up, for a fair fast phase; on ids from the far end of the list, so the
    # phases do not start on a cache the warm-up has just filled.
    await _open_loop(port, bodies[len(bodies) // 2 :], rate, WARMUP_S)
    run, (slow_from, slow_until) = await asyncio.gather(
        _open_loop(port, bodies, rate, 3 * phase_s), switch()
    )
    return run, slow_from, slow_until


def slow_redis(redis_port: int, rate: float, phase_s: float) -> dict[str, Any]:
    """(g): one worker whose Redis replies arrive 30 ms late for the middle phase."""
    bodies = transactions(20_000, seed=6)
    port = free_port()
    with DelayProxy("127.0.0.1", redis_port) as proxy:
        env = one_worker_env(proxy.url())
        log = RESULTS / "serve-slow-redis.log"
        server = BentoServer(env, port=port, log=log, cpus=os.sched_getaffinity(0)).start()
        try:
            run, slow_from, slow_until = httpload.run(_phases(port, bodies, rate, phase_s, proxy))
        finally:
            server.stop()
    return {
        "rate": rate,
        "phase_s": phase_s,
        "delay_ms": SLOW_REPLY_S * 1e3,
        "deadline_ms": _deadline_s(env) * 1e3,
        **phase_report(run.trace or [], slow_from, slow_until),
    }


# --- the table ------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _within(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def _tail_lines(f: dict[str, Any]) -> list[str]:
    t, p = f["trivial"], f["predict"]
    tc, pc, pf = t["client_ms"], p["client_ms"], p["features_ms"]
    gc = p["gc"]
    gens = "/".join(gc) or "0/1/2"

    def per_gen(key: str, scale: float = 1e3, digits: int = 2) -> str:
        values = [None if g[key] is None else g[key] * scale for g in gc.values()]
        return " / ".join(_f(v, digits) for v in values) or "n/a"

    def worst(key: str) -> float | None:
        values = [g[key] for g in gc.values() if g[key] is not None]
        return max(values) * 1e3 if values else None

    gauge = worst("max_s")
    return [
        "",
        f"| (f) tail from a cold start, open loop {f['rate']:g} req/s x {f['seconds']:g} s "
        "| trivial | /predict | target | met |",
        "| --- | --- | --- | --- | --- |",
        f"| client p50 / p99 (ms, from the scheduled send; n={pc['n']}) "
        f"| {_f(tc['p50'])} / {_f(tc['p99'])} | {_f(pc['p50'])} / {_f(pc['p99'])} "
        f"| p99 <= {TAIL_P99_MS:g} ms | {_ok(_within(pc['p99'], TAIL_P99_MS))} |",
        f"| client p99.9 / max (ms) | {_f(tc['p99_9'])} / {_f(tc['max'])} "
        f"| {_f(pc['p99_9'])} / {_f(pc['max'])} "
        f"| p99.9 <= {TAIL_P999_MS:g} ms | {_ok(_within(pc['p99_9'], TAIL_P999_MS))} |",
        f"| non-200 / sent > 2 ms late | {t['non_200']} / {t['late']} "
        f"| {p['non_200']} / {p['late']} | 0 non-200 | {_ok(p['non_200'] == 0)} |",
        f"| the client's own longest GC pause (ms) | {_f(t.get('client_gc_max_ms'))} "
        f"| {_f(p.get('client_gc_max_ms'))} | | |",
        f"| Server-Timing features p50 / p99 / max (ms; n={pf['n']}) | "
        f"| {_f(pf['p50'], 3)} / {_f(pf['p99'], 3)} / {_f(pf['max'])} "
        f"| p99 <= {TAIL_FEATURE_P99_MS:g} ms | {_ok(_within(pf['p99'], TAIL_FEATURE_P99_MS))} |",
        *_alone_line(
            "baseline: the store alone in its own process, same ids and rate, no HTTP",
            f.get("store_alone_ms"),
        ),
        *_alone_line(
            "floor: load_tests/floor.py's client alone, every group's commands for the same "
            "ids in one write, nothing cached or decoded",
            f.get("floor_alone_ms"),
        ),
        f"| GC collections in the run, gen {gens} | | {per_gen('count', 1.0, 0)} | | |",
        f"| longest GC pause in the run, gen {gens} (ms; its histogram bucket's bound) "
        f"| | {per_gen('window_max_s')} | | |",
        f"| longest GC pause since start-up, gen {gens} (ms; gauge; worst at /readyz: "
        f"{_f(worst('max_at_start_s'))}) | | {per_gen('max_s')} "
        f"| all <= {GC_PAUSE_MS:g} ms | {_ok(_within(gauge, GC_PAUSE_MS))} |",
    ]


def _alone_line(what: str, a: dict[str, Any] | None) -> list[str]:
    """A baseline of the feature time: the same reads without the service (absent in
    older results)."""
    if a is None:
        return []
    return [
        f"| {what}: p50 / p99 / max (ms; n={a['n']}) | "
        f"| {_f(a['p50'], 3)} / {_f(a['p99'], 3)} / {_f(a['max'])} | | |"
    ]


def _slow_lines(g: dict[str, Any]) -> list[str]:
    names = ("fast", "slow", "fast_again")
    limit = g["deadline_ms"] + DEADLINE_SLACK_MS
    slow_p99 = g["slow"]["features_ms"]["p99"]
    since = g["slow_features_p50_since_open_ms"]
    back = g["redis_back_after_s"]
    opened = g["breaker_open_after_s"]
    non_200 = sum(g[n]["non_200"] for n in names)

    def cells(fmt: Any) -> str:
        return " | ".join(fmt(g[n]) for n in names)

    def feature(phase: dict[str, Any]) -> str:
        s = phase["features_ms"]
        return f"{_f(s['p50'], 3)} / {_f(s['p99'])} / {_f(s['max'])} (n={s['n']})"

    def reads(phase: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in phase["sources"].items()) or "none"

    return [
        "",
        f"| (g) slow Redis: {g['delay_ms']:g} ms replies, 1 worker, {g['rate']:g} req/s, "
        f"{g['phase_s']:g} s per phase | fast | slow | fast again | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| Server-Timing features p50 / p99 / max (ms) | {cells(feature)} "
        f"| slow p99 <= {limit:g} ms (deadline + {DEADLINE_SLACK_MS:g}) "
        f"| {_ok(_within(slow_p99, limit))} |",
        f"| client p99 (ms, from the scheduled send) "
        f"| {cells(lambda p: _f(p['client_ms']['p99']))} | | |",
        f"| group reads by source | {cells(reads)} | | |",
        f"| breaker open after / feature median since (n) | "
        f"| {_f(opened, 3)} s / {_f(since, 3)} ms (n={g['slow_since_open_n']}) | "
        f"| median <= {OPEN_MEDIAN_MS:g} ms | {_ok(_within(since, OPEN_MEDIAN_MS))} |",
        f"| Redis values back after the delay ended | | | {_f(back, 3)} s "
        f"| <= {REDIS_BACK_S:g} s | {_ok(_within(back, REDIS_BACK_S))} |",
        f"| non-200 responses | {cells(lambda p: str(p['non_200']))} | 0 | {_ok(non_200 == 0)} |",
    ]


def table_lines(results: dict[str, Any]) -> list[str]:
    """The (f) and (g) tables, each target with its verdict; none for a case not run."""
    lines = []
    if "tail" in results:
        lines += _tail_lines(results["tail"])
    if "slow_redis" in results:
        lines += _slow_lines(results["slow_redis"])
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ALONE:
        sys.exit("usage: python -m load_tests.bench_tail store-alone|floor-alone RATE SECONDS")
    _alone_main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
