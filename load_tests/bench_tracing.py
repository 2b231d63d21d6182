"""What tracing costs: max RPS of /predict on one worker, tracing off and on, same run.

Cases, each its own `bentoml serve` (one worker, admission control off: a closed loop of
32 is overload), all up at once and measured in interleaved rounds:
  base    the code before tracing was added (`git archive` of --base), default settings
  off     this code, default settings (tracing off: no span at all)
  spans   FRAUD_TRACING=1 with no exporter: BentoML's request spans, made and dropped
  on10    OTLP/HTTP export to a local receiver, parentbased_traceidratio at 0.1, from
          the OTEL_* variables (the request span only for sampled requests)
  on10-bentoml  the same rate through BentoML's own tracing configuration instead
          (FRAUD_TRACING=1, BENTOML_CONFIG_OPTIONS): BentoML's middleware makes a request
          span for every request, and its sampler records what it does not export
  on100   OTEL_* as on10, always_on
Targets: `off` within 1% of `base`, `on10` within 5% of `off`.

`--micro` times FeatureStore.read in process instead (real Redis, cache hits and
misses): the body alone (no tracing code), tracing off, on under an unsampled request,
on under a sampled one exporting to a local receiver. It isolates what the read path's
own spans cost from BentoML's request span.

    .venv/bin/python -m load_tests.bench_tracing --rounds 5 --seconds 4
    .venv/bin/python -m load_tests.bench_tracing --micro --n 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from features import MERCHANT_RISK, USER_FEATURES, Settings, open_redis
from features.offline.demo import merchant_ids, user_ids
from features.offline.load import demo_rows, load
from load_tests import httpload
from load_tests._stack import RESULTS
from load_tests.skew import transactions
from load_tests.stats import quantile, tail_summary
from tools.bento_server import BentoServer
from tools.otlp_receiver import OtlpReceiver
from tools.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 32
OFF_TARGET, ON10_TARGET = 0.01, 0.05


def _base_tree(rev: str, into: Path) -> Path:
    """The source tree at `rev`, unpacked (no checkout: the repository is left alone)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _home(base: Path, name: str) -> Path:
    # A home per server, sharing the model store: `bentoml serve` empties its home's
    # prometheus_multiproc_dir when it starts (tests/conftest.py Service says more).
    home = base / f"home-{name}"
    home.mkdir(parents=True, exist_ok=True)
    models = ROOT / ".bentoml" / "models"
    if not (home / "models").exists():
        (home / "models").symlink_to(models)
    return home


def _cases(endpoints: dict[str, str]) -> dict[str, dict[str, str]]:
    return {
        "base": {},
        "off": {},
        "spans": {"FRAUD_TRACING": "1"},
        "on10": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoints["on10"],
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
        "on10-bentoml": {
            "FRAUD_TRACING": "1",
            "BENTOML_CONFIG_OPTIONS": " ".join(
                f"services.FraudService.tracing.{key}={value}"
                for key, value in (
                    ("exporter_type", "otlp"),
                    ("sample_rate", "0.1"),
                    ("otlp.protocol", "http"),
                    ("otlp.endpoint", f"{endpoints['on10-bentoml']}/v1/traces"),
                )
            ),
        },
        "on100": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoints["on100"],
            "OTEL_TRACES_SAMPLER": "always_on",
        },
    }


def _worker(server: BentoServer) -> psutil.Process:
    """The one worker process of `server` (its CPU time includes the exporter's thread)."""
    for process in psutil.Process(server.process.pid).children(recursive=True):
        if any("_bentoml_impl.worker" in part for part in process.cmdline()):
            return process
    raise RuntimeError(f"no worker process under {server.url}")


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _compare(
    ports: dict[str, int],
    workers: dict[str, psutil.Process],
    bodies: list[dict[str, Any]],
    seconds: float,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    reqs = {
        name: httpload.encode_requests(port, "/predict", bodies) for name, port in ports.items()
    }
    for name, port in ports.items():  # warm-up: the cache and TorchScript's profiling
        await httpload.closed_loop(port, reqs[name], 16, 3.0)
    peaks: dict[str, list[float]] = {name: [] for name in ports}
    cpu_us: dict[str, list[float]] = {name: [] for name in ports}
    latencies: dict[str, list[float]] = {name: [] for name in ports}
    sent = dict.fromkeys(ports, 0)
    failures = dict.fromkeys(ports, 0)
    order = list(ports)
    for i in range(rounds):
        # Rotate the order each round, so no case always follows the same one.
        for name in order[i % len(order) :] + order[: i % len(order)]:
            cpu = _cpu_s(workers[name])
            run = await httpload.closed_loop(ports[name], reqs[name], CONCURRENCY, seconds)
            served = len(run.latencies) + run.failures
            cpu_us[name].append((_cpu_s(workers[name]) - cpu) / max(served, 1) * 1e6)
            peaks[name].append(run.rps)
            latencies[name] += run.latencies
            sent[name] += len(run.latencies) + run.failures
            failures[name] += run.failures
    return {
        name: {
            "max_rps": quantile(sorted(peaks[name]), 0.5),
            "max_rps_rounds": peaks[name],
            "cpu_us_per_request": quantile(sorted(cpu_us[name]), 0.5),
            "cpu_us_rounds": cpu_us[name],
            "requests": sent[name],
            "failures": failures[name],
            "latency_ms": tail_summary(s * 1e3 for s in latencies[name]),
        }
        for name in ports
    }


def run(base_rev: str, rounds: int, seconds: float) -> dict[str, Any]:
    bodies = transactions(20_000)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tracing-")))
        base = _base_tree(base_rev, tmp / "base")
        redis = stack.enter_context(RedisServer(quiet=True))
        settings = Settings(redis_url=redis.url, redis_socket_timeout_s=10.0)
        jobs = [
            (USER_FEATURES, demo_rows(USER_FEATURES, user_ids(100_000), 11)),
            (MERCHANT_RISK, demo_rows(MERCHANT_RISK, merchant_ids(10_000), 12)),
        ]
        asyncio.run(load(settings, jobs))
        receivers = {
            name: stack.enter_context(OtlpReceiver(keep=False))
            for name in ("on10", "on10-bentoml", "on100")
        }
        cases = _cases({name: r.endpoint for name, r in receivers.items()})
        ports: dict[str, int] = {}
        workers: dict[str, psutil.Process] = {}
        for name, extra in cases.items():
            env = {
                "BENTOML_HOME": str(_home(tmp, name)),
                "FEATURES_REDIS_URL": redis.url,
                "FRAUD_ADMISSION": "0",
                **extra,
            }
            log = RESULTS / f"serve-tracing-{name}.log"
            server = BentoServer(
                env, port=free_port(), workers=1, log=log, root=base if name == "base" else ROOT
            )
            ports[name] = stack.enter_context(server).port
            workers[name] = _worker(server)
            print(f"{name}: bentoml serve on {server.url}", flush=True)
        result = httpload.run(_compare(ports, workers, bodies, seconds, rounds))
        time.sleep(2.0)  # the last batches leave the workers
        for name, receiver in receivers.items():
            result[name]["spans_received"] = receiver.span_count
            result[name]["exports"] = receiver.requests
    return {"base_rev": base_rev, "rounds": rounds, "seconds": seconds, "cases": result}


def table(result: dict[str, Any]) -> str:
    cases = result["cases"]
    base, off = cases["base"], cases["off"]
    lines = [
        f"Tracing cost, 1 worker, closed loop of {CONCURRENCY}, {result['rounds']} rounds x "
        f"{result['seconds']:g} s each, interleaved; base = {result['base_rev']}. "
        "CPU = the worker process's CPU time (all its threads) per request served.",
        "",
        "| case | max req/s (median; rounds) | vs base | CPU us/req (median; rounds) "
        "| capacity vs base | vs off | vs off, paired | p50 / p99 / p99.9 / max ms | n "
        "| spans received |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in cases.items():
        lat = c["latency_ms"]
        rps = ", ".join(f"{r:.0f}" for r in c["max_rps_rounds"])
        cpu = ", ".join(f"{r:.0f}" for r in c["cpu_us_rounds"])
        lines.append(
            f"| {name} | {c['max_rps']:.0f} ({rps}) | {c['max_rps'] / base['max_rps'] - 1:+.1%} "
            f"| {c['cpu_us_per_request']:.0f} ({cpu}) | {_capacity(base, c):+.1%} "
            f"| {_capacity(off, c):+.1%} | {_paired(off, c):+.1%} "
            f"| {lat['p50']:.1f} / {lat['p99']:.1f} / "
            f"{lat['p99_9']:.1f} / {lat['max']:.1f} | {lat['n']} | {c.get('spans_received', '-')} |"
        )
    off_cost = -_capacity(base, off)
    on_cost = -_capacity(off, cases["on10"])
    lines += [
        "",
        "capacity = the max RPS one CPU-bound worker's CPU time per request allows, against "
        "the reference; paired = the median over rounds of that round's capacity against "
        "off's in the same round (on a shared machine the load drifts between rounds more "
        "than between the cases of one round).",
        f"off vs base: {off_cost:.1%} of capacity lost (target <= {OFF_TARGET:.0%}: "
        f"{'met' if off_cost <= OFF_TARGET else 'MISSED'}); on10 vs off: {on_cost:.1%} "
        f"(target <= {ON10_TARGET:.0%}: {'met' if on_cost <= ON10_TARGET else 'MISSED'}; "
        f"paired: {-_paired(off, cases['on10']):.1%})",
    ]
    return "\n".join(lines)


def _capacity(reference: dict[str, Any], case: dict[str, Any]) -> float:
    """Relative capacity: + means more requests per CPU-second than the reference."""
    return float(reference["cpu_us_per_request"] / case["cpu_us_per_request"] - 1)


def _paired(reference: dict[str, Any], case: dict[str, Any]) -> float:
    """The median of the rounds' relative capacities, each against the same round's
    reference: what the load drifting from round to round moves least."""
    ratios = sorted(
        r / c - 1 for r, c in zip(reference["cpu_us_rounds"], case["cpu_us_rounds"], strict=True)
    )
    return quantile(ratios, 0.5)


async def _micro(redis_url: str, n: int) -> dict[str, dict[str, float]]:
    from opentelemetry import context as otel_context
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
    from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, set_span_in_context

    from features import TRACING, open_store
    from load_tests.bench import interleaved

    settings = Settings(redis_url=redis_url, redis_socket_timeout_s=1.0)
    client = open_redis(settings)
    store = open_store(settings, client)
    await store.open()
    with OtlpReceiver(keep=False) as receiver:
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        )
        tracer = provider.get_tracer(TRACING.scope)
        sampled = TracerProvider(sampler=ALWAYS_ON).get_tracer("bench").start_span("request")
        contexts = {
            "none": otel_context.Context(),
            "unsampled": set_span_in_context(NonRecordingSpan(INVALID_SPAN_CONTEXT)),
            "sampled": set_span_in_context(sampled),
        }
        hot = [{"user": "u000001", "merchant": "m00001"}]
        await store.read(hot)  # cached from here on

        def case(kind: str, parent: str, enabled: bool, body: bool = False) -> Any:
            ctx = contexts[parent]

            async def run(i: int) -> None:
                rows = (
                    hot if kind == "hit" else [{"user": f"x{kind}{parent}{i}", "merchant": f"y{i}"}]
                )
                TRACING.tracer = tracer if enabled else None  # a tracer built once
                token = otel_context.attach(ctx)
                try:
                    if body:
                        await store._read(rows, None)
                    else:
                        await store.read(rows)
                finally:
                    otel_context.detach(token)

            return run

        results: dict[str, dict[str, float]] = {}
        for kind in ("hit", "miss"):
            cases = {
                f"{kind}: no tracing code": case(kind, "none", False, body=True),
                f"{kind}: off": case(kind, "none", False),
                f"{kind}: on, unsampled request": case(kind, "unsampled", True),
                f"{kind}: on, sampled request": case(kind, "sampled", True),
            }
            results |= await interleaved(cases, n if kind == "hit" else max(1000, n // 5))
        TRACING.disable()
        provider.shutdown()
        results["exported spans"] = {"n": receiver.span_count}
    await store.aclose()
    await client.aclose()
    return results


def micro(n: int) -> dict[str, Any]:
    with RedisServer(quiet=True) as redis:
        return asyncio.run(_micro(redis.url, n))


def micro_table(result: dict[str, Any]) -> str:
    lines = [
        "FeatureStore.read in process, real Redis; interleaved rounds",
        "",
        "| case | p50 us | p99 us | n | p50 vs no tracing code |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in result.items():
        if "p50_us" not in r:
            continue
        ref = result[f"{name.split(':')[0]}: no tracing code"]["p50_us"]
        lines.append(
            f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['n']:.0f} | "
            f"{r['p50_us'] - ref:+.1f} us |"
        )
    lines.append(f"\nspans exported: {result['exported spans']['n']}")
    return "\n".join(lines)


def _merge_base() -> str:
    out = subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()[:12]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench_tracing", description=__doc__)
    parser.add_argument("--base", default=None, help="revision without tracing (merge-base)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="per case and round")
    parser.add_argument("--micro", action="store_true", help="FeatureStore.read in process")
    parser.add_argument("--n", type=int, default=20_000, help="--micro: samples per hit case")
    args = parser.parse_args(argv)
    if args.micro:
        text = micro_table(micro(args.n))
        print(text)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bench-tracing-micro-latest.md").write_text(text + "\n")
        return 0
    if not (ROOT / ".bentoml" / "models").exists():
        env = {**os.environ, "BENTOML_HOME": str(ROOT / ".bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        subprocess.run(
            [sys.executable, "-m", "models.train", "--if-missing"], env=env, cwd=ROOT, check=True
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = run(args.base or _merge_base(), args.rounds, args.seconds)
    text = table(result)
    print(text)
    (RESULTS / "bench-tracing-latest.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "bench-tracing-latest.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
