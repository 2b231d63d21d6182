"""Reading a load run: the service's /metrics, Locust's output, the latency budget, the report.

Pure functions over text and numbers, so the harness can be tested without a load.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from load_tests.stats import (
    Sample,
    bucket_delta,
    bucket_quantile,
    counter_total,
    gauge_max,
    highest_bucket,
    histogram_buckets,
    parse_prometheus,
    quantile,
)

FEATURE_P99_BUDGET_MS = 15.0
E2E_P99_BUDGET_MS = 100.0

GC_PAUSE = "python_gc_pause_seconds"
GC_PAUSE_MAX = "python_gc_pause_max_seconds"


def gc_pauses(before: str, after: str) -> dict[str, dict[str, float | None]]:
    """Per GC generation, from two scrapes of /metrics: collections between them, the
    ceiling of the longest pause between them (histogram), and the worst pause since the
    worker started (gauge) at each scrape. Generations absent from `after` are left out."""
    old, new = parse_prometheus(before), parse_prometheus(after)
    named = (s for s in new if s.name in (f"{GC_PAUSE}_bucket", GC_PAUSE_MAX))
    generations = sorted({g for s in named if (g := s.label("generation")) is not None})
    out: dict[str, dict[str, float | None]] = {}
    for g in generations:
        where = {"generation": g}
        delta = bucket_delta(
            histogram_buckets(old, GC_PAUSE, where), histogram_buckets(new, GC_PAUSE, where)
        )
        out[g] = {
            "count": delta[-1][1] if delta else None,
            "window_max_s": highest_bucket(delta),
            "max_at_start_s": gauge_max(old, GC_PAUSE_MAX, where),
            "max_s": gauge_max(new, GC_PAUSE_MAX, where),
        }
    return out


WORKER_REQUESTS = "fraud_worker_requests"


def worker_requests(before: str, after: str) -> dict[str, float]:
    """Requests each live worker (by pid) admitted between two scrapes of /metrics."""
    old = {s.label("pid"): s.value for s in parse_prometheus(before) if s.name == WORKER_REQUESTS}
    return {
        str(pid): s.value - old.get(pid, 0.0)
        for s in parse_prometheus(after)
        if s.name == WORKER_REQUESTS and (pid := s.label("pid")) is not None
    }


def imbalance(per_worker: dict[str, float]) -> float | None:
    """The largest distance of a worker's count from the mean, as a share of the mean."""
    if len(per_worker) < 2:
        return None
    mean = sum(per_worker.values()) / len(per_worker)
    return max(abs(n - mean) for n in per_worker.values()) / mean if mean else None


@dataclass(frozen=True, slots=True)
class ServerStats:
    """What the service's own /metrics says about a run."""

    feature_p50_ms: float | None
    feature_p99_ms: float | None
    inference_p50_ms: float | None
    inference_p99_ms: float | None
    cache_hits: float
    cache_misses: float
    defaults_served: float
    feature_buckets: list[tuple[float, float]] = field(default_factory=list)

    @property
    def cache_hit_ratio(self) -> float | None:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None


def server_stats(text: str) -> ServerStats:
    """Feature and inference quantiles, cache and defaults from a /metrics page."""
    return _server_stats(parse_prometheus(text))


def _server_stats(samples: list[Sample]) -> ServerStats:
    features = histogram_buckets(samples, "features_retrieval_seconds")
    inference = histogram_buckets(samples, "fraud_inference_seconds")

    def ms(buckets: list[tuple[float, float]], q: float) -> float | None:
        value = bucket_quantile(buckets, q)
        return None if value is None else value * 1e3

    return ServerStats(
        feature_p50_ms=ms(features, 0.5),
        feature_p99_ms=ms(features, 0.99),
        inference_p50_ms=ms(inference, 0.5),
        inference_p99_ms=ms(inference, 0.99),
        cache_hits=counter_total(samples, "features_cache_lookups_total", {"result": "hit"}),
        cache_misses=counter_total(samples, "features_cache_lookups_total", {"result": "miss"}),
        defaults_served=counter_total(samples, "features_defaults_total"),
        feature_buckets=features,
    )


def diff_stats(before: str, after: str) -> ServerStats:
    """Server stats of what happened between two scrapes of /metrics."""
    old = {(s.name, s.labels): s.value for s in parse_prometheus(before)}
    return _server_stats(
        [
            Sample(s.name, s.labels, s.value - old.get((s.name, s.labels), 0.0))
            for s in parse_prometheus(after)
        ]
    )


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Locust's aggregated view of a run."""

    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def locust_aggregate(stats_csv: str) -> ClientStats:
    """The `Aggregated` row of Locust's `<prefix>_stats.csv`."""
    for row in csv.DictReader(stats_csv.splitlines()):
        if row["Name"] == "Aggregated":
            return ClientStats(
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=float(row["Requests/s"]),
                p50_ms=float(row["50%"]),
                p95_ms=float(row["95%"]),
                p99_ms=float(row["99%"]),
            )
    raise ValueError("no Aggregated row in the Locust stats CSV")


def locust_final(stats_json: str) -> ClientStats:
    """All endpoints of Locust's final `--json-file` stats, merged.

    The `_stats.csv` is rewritten every few seconds while Locust runs and not at exit, so
    it can miss the last requests; this is written after the run. Percentiles as Locust
    computes them, from its rounded response-time counts (whole ms below 100 ms).
    """
    entries = json.loads(stats_json)
    times: list[float] = []  # one per request, in Locust's rounded ms
    requests = failures = 0
    starts, ends = [], []
    for entry in entries:
        requests += int(entry["num_requests"])
        failures += int(entry["num_failures"])
        starts.append(float(entry["start_time"]))
        if entry.get("last_request_timestamp") is not None:
            ends.append(float(entry["last_request_timestamp"]))
        for ms, count in entry["response_times"].items():
            times += itertools.repeat(float(ms), int(count))
    elapsed = max(ends) - min(starts) if starts and ends else 0.0

    def percentile(q: float) -> float:
        # quantile's rule is that of Locust's calculate_response_time_percentile.
        return quantile(times, q) if times else 0.0

    return ClientStats(
        requests=requests,
        failures=failures,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(0.5),
        p95_ms=percentile(0.95),
        p99_ms=percentile(0.99),
    )


def locust_history(history_csv: str) -> list[dict[str, float]]:
    """Aggregated rows of `<prefix>_stats_history.csv`: time, rps and percentiles (ms)."""
    rows = []
    for row in csv.DictReader(history_csv.splitlines()):
        if row["Name"] != "Aggregated":
            continue
        try:
            rows.append(
                {
                    "t": float(row["Timestamp"]),
                    "rps": float(row["Requests/s"]),
                    "p50": float(row["50%"]),
                    "p95": float(row["95%"]),
                    "p99": float(row["99%"]),
                }
            )
        except ValueError:
            continue  # "N/A" before the first request
        if rows[-1]["p50"] <= 0:
            rows.pop()  # no completed request in this window yet
    return rows


@dataclass(frozen=True, slots=True)
class Verdict:
    """Each budget line and whether the run met it."""

    lines: list[tuple[str, bool]]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.lines)


def verdict(client: ClientStats, server: ServerStats) -> Verdict:
    """Feature p99 <= 15 ms (server histogram), end-to-end p99 <= 100 ms, no errors."""
    feature = server.feature_p99_ms
    lines = [
        (
            f"feature retrieval p99 {_fmt(feature)} ms <= {FEATURE_P99_BUDGET_MS:g} ms",
            feature is not None and feature <= FEATURE_P99_BUDGET_MS,
        ),
        (
            f"end-to-end p99 {client.p99_ms:g} ms <= {E2E_P99_BUDGET_MS:g} ms",
            client.requests > 0 and client.p99_ms <= E2E_P99_BUDGET_MS,
        ),
        (f"{client.failures} failed requests", client.failures == 0),
    ]
    return Verdict(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(
    client: ClientStats,
    server: ServerStats,
    result: Verdict,
    title: str,
    per_worker: dict[str, float] | None = None,
) -> str:
    """One table of the run and its verdict."""
    ratio = server.cache_hit_ratio
    e2e = f"{client.p50_ms:g} / {client.p95_ms:g} / {client.p99_ms:g}"
    feature = f"{_fmt(server.feature_p50_ms)} / {_fmt(server.feature_p99_ms)}"
    inference = f"{_fmt(server.inference_p50_ms)} / {_fmt(server.inference_p99_ms)}"
    rows = [
        ("requests", f"{client.requests}"),
        ("throughput (RPS)", f"{client.rps:.1f}"),
        ("end-to-end p50 / p95 / p99 (ms, Locust)", e2e),
        ("feature retrieval p50 / p99 (ms, server histogram)", feature),
        ("inference p50 / p99 (ms, server histogram)", inference),
        ("cache hit ratio", "n/a" if ratio is None else f"{ratio:.1%}"),
        ("feature groups served defaults", f"{server.defaults_served:g}"),
        ("errors (failed requests)", f"{client.failures}"),
    ]
    if per_worker:
        spread = imbalance(per_worker)
        counts = " / ".join(f"{n:g}" for n in sorted(per_worker.values(), reverse=True))
        share = "" if spread is None else f" (largest gap from the mean: {spread:.1%})"
        rows.append(("requests per worker", counts + share))
    out = [f"## {title}", "", "| metric | value |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", f"**Verdict: {'PASS' if result.passed else 'FAIL'}**", ""]
    out += [f"- [{'x' if ok else ' '}] {line}" for line, ok in result.lines]
    return "\n".join(out) + "\n"


def plot(history: list[dict[str, float]], server: ServerStats, path: Path) -> None:
    """Latency percentiles over time (Locust) and the server's feature-time histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if history:
        t0 = history[0]["t"]
        ts = [r["t"] - t0 for r in history]
        for key in ("p50", "p95", "p99"):
            left.plot(ts, [r[key] for r in history], label=key)
        left.axhline(E2E_P99_BUDGET_MS, color="red", linestyle="--", label="p99 budget")
        left.set_yscale("log")
    left.set(title="End-to-end latency (Locust, whole ms)", xlabel="s", ylabel="ms")
    left.legend()
    buckets = [(b, c) for b, c in server.feature_buckets if not math.isinf(b)]
    if buckets:
        labels, counts, previous = [], [], 0.0
        for bound, count in buckets:
            labels.append(f"{bound * 1e3:g}")
            counts.append(count - previous)
            previous = count
        right.bar(range(len(counts)), counts)
        right.set_xticks(range(len(labels)), labels, rotation=60)
    right.set(title="Feature retrieval time (server histogram)", xlabel="<= ms", ylabel="requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
