"""The load harness on canned numbers: parsing, quantiles from buckets, the verdict,
Server-Timing, GC pauses and the phases of a traced run."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable

import pytest

from features.offline.demo import user_ids
from load_tests import bench_tail, httpload, report, stats
from load_tests.skew import SkewedPool

METRICS = """\
# HELP features_retrieval_seconds Feature retrieval time per request
# TYPE features_retrieval_seconds histogram
features_retrieval_seconds_bucket{le="0.0001",source="cache"} 80.0
features_retrieval_seconds_bucket{le="0.001",source="cache"} 100.0
features_retrieval_seconds_bucket{le="+Inf",source="cache"} 100.0
features_retrieval_seconds_bucket{le="0.0001",source="redis"} 0.0
features_retrieval_seconds_bucket{le="0.001",source="redis"} 90.0
features_retrieval_seconds_bucket{le="+Inf",source="redis"} 100.0
features_retrieval_seconds_count{source="cache"} 100.0
fraud_inference_seconds_bucket{le="0.0001"} 150.0
fraud_inference_seconds_bucket{le="0.001"} 200.0
fraud_inference_seconds_bucket{le="+Inf"} 200.0
features_cache_lookups_total{result="hit"} 300.0
features_cache_lookups_total{result="miss"} 100.0
features_defaults_total{group="user:features",reason="missing"} 4.0
features_defaults_total{group="merchant:risk",reason="invalid"} 1.0
features_redis_up 1.0
weird_total{path="a \\"quoted\\", one"} 2.0
"""

STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,\
Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,\
50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,/predict,900,0,3,3.5,1,40,150,15.0,0.0,3,4,4,5,6,8,10,12,30,40,40
,Aggregated,1000,2,3,4.1,1,60,160,16.7,0.03,3,4,5,5,7,9,12,15,50,60,60
"""

HISTORY_CSV = """\
Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,\
99.9%,99.99%,100%,Total Request Count,Total Failure Count
1700000000,32,,Aggregated,0.000000,0.000000,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,0,0
1700000001,32,POST,/predict,10,0,3,3,3,3,3,3,3,3,3,3,3,10,0
1700000001,32,,Aggregated,12.5,0,3,4,4,4,5,6,7,8,9,9,9,12,0
1700000002,32,,Aggregated,0,0,0,0,0,0,0,0,0,0,0,0,0,12,0
"""


def test_prometheus_text_is_parsed_with_labels() -> None:
    samples = stats.parse_prometheus(METRICS)
    assert len(samples) == 16
    weird = next(s for s in samples if s.name == "weird_total")
    assert weird.label("path") == 'a "quoted", one' and weird.value == 2.0


def test_quantiles_interpolate_within_buckets() -> None:
    buckets = [(0.001, 50.0), (0.002, 100.0), (float("inf"), 100.0)]
    assert stats.bucket_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert stats.bucket_quantile(buckets, 0.99) == pytest.approx(0.00198)
    assert stats.bucket_quantile(buckets, 0.25) == pytest.approx(0.0005)
    # Past the last finite bound: the largest finite bound, as Prometheus does.
    assert stats.bucket_quantile([(0.001, 1.0), (float("inf"), 10.0)], 0.9) == 0.001
    assert stats.bucket_quantile([], 0.5) is None


def test_server_stats_sum_series_across_labels() -> None:
    stats = report.server_stats(METRICS)
    # 200 requests: 80 under 0.1 ms, 190 under 1 ms, 10 above.
    assert stats.feature_p50_ms == pytest.approx(0.1 + 0.9 * (100 - 80) / 110)
    assert stats.feature_p99_ms == pytest.approx(1.0)
    assert stats.inference_p50_ms == pytest.approx(0.1 * 100 / 150)
    assert stats.cache_hit_ratio == pytest.approx(0.75)
    assert stats.defaults_served == 5.0


def test_diff_keeps_only_what_happened_between_scrapes() -> None:
    before = METRICS.replace('result="hit"} 300.0', 'result="hit"} 280.0')
    stats = report.diff_stats(before, METRICS)
    assert (stats.cache_hits, stats.cache_misses) == (20.0, 0.0)
    assert stats.feature_p99_ms is None  # no request in between


def test_locust_csvs_are_read() -> None:
    agg = report.locust_aggregate(STATS_CSV)
    assert (agg.requests, agg.failures, agg.rps) == (1000, 2, 16.7)
    assert (agg.p50_ms, agg.p95_ms, agg.p99_ms) == (3.0, 9.0, 15.0)
    history = report.locust_history(HISTORY_CSV)
    assert history == [{"t": 1700000001.0, "rps": 12.5, "p50": 3.0, "p95": 6.0, "p99": 8.0}]
    with pytest.raises(ValueError, match="Aggregated"):
        report.locust_aggregate(STATS_CSV.splitlines()[0])


FINAL_JSON = """[
 {"name": "/predict", "method": "POST", "last_request_timestamp": 1700000060.0,
  "start_time": 1700000000.0, "num_requests": 100, "num_none_requests": 0,
  "num_failures": 1, "total_response_time": 500, "max_response_time": 120,
  "min_response_time": 1, "total_content_length": 0,
  "response_times": {"2": 50, "4": 45, "9": 3, "120": 2},
  "num_reqs_per_sec": {}, "num_fail_per_sec": {}},
 {"name": "/predict_batch[20]", "method": "POST", "last_request_timestamp": 1700000059.0,
  "start_time": 1700000000.5, "num_requests": 20, "num_none_requests": 0,
  "num_failures": 0, "total_response_time": 100, "max_response_time": 6,
  "min_response_time": 3, "total_content_length": 0,
  "response_times": {"3": 10, "6": 10}, "num_reqs_per_sec": {}, "num_fail_per_sec": {}}
]"""


def test_locust_final_json_is_merged_as_locust_would() -> None:
    final = report.locust_final(FINAL_JSON)
    assert (final.requests, final.failures) == (120, 1)
    assert final.rps == pytest.approx(120 / 60.0)
    # 120 requests: 50 at 2 ms, 10 at 3, 45 at 4, 10 at 6, 3 at 9, 2 at 120.
    # Locust: the largest time with more than n - int(n * q) requests at or above it.
    assert (final.p50_ms, final.p95_ms, final.p99_ms) == (4.0, 6.0, 120.0)


def _client(p99_ms: float, failures: int = 0) -> report.ClientStats:
    return report.ClientStats(1000, failures, 500.0, 2.0, 5.0, p99_ms)


def _server(feature_p99_ms: float | None) -> report.ServerStats:
    return report.ServerStats(0.1, feature_p99_ms, 0.05, 0.2, 90.0, 10.0, 0.0)


@pytest.mark.parametrize(
    ("client", "server", "passed"),
    [
        (_client(99.0), _server(14.9), True),
        (_client(100.0), _server(15.0), True),  # the budget is inclusive
        (_client(101.0), _server(0.5), False),
        (_client(20.0), _server(16.0), False),
        (_client(20.0), _server(None), False),  # no server histogram: no verdict of pass
        (_client(20.0, failures=3), _server(0.5), False),
    ],
)
def test_budget_verdict(client, server, passed) -> None:
    result = report.verdict(client, server)
    assert result.passed is passed
    text = report.markdown(client, server, result, "canned")
    assert ("**Verdict: PASS**" in text) is passed
    assert "| cache hit ratio | 90.0% |" in text


def test_skewed_pool_gives_the_head_its_share() -> None:
    ids = user_ids(10_000)
    pool = SkewedPool(ids, head_fraction=0.01, head_share=0.2, seed=1)
    rng = random.Random(7)
    draws = [pool.draw(rng) for _ in range(50_000)]
    head = set(pool.by_rank[:100])
    assert 0.18 < sum(d in head for d in draws) / len(draws) < 0.22
    assert set(draws) <= set(ids)
    again = SkewedPool(ids, head_fraction=0.01, head_share=0.2, seed=1)
    rng = random.Random(7)
    assert [again.draw(rng) for _ in range(5)] == draws[:5]


GC_BEFORE = """\
python_gc_pause_seconds_bucket{generation="0",le="0.001"} 10.0
python_gc_pause_seconds_bucket{generation="0",le="0.005"} 10.0
python_gc_pause_seconds_bucket{generation="0",le="+Inf"} 10.0
python_gc_pause_seconds_bucket{generation="2",le="0.001"} 0.0
python_gc_pause_seconds_bucket{generation="2",le="0.005"} 0.0
python_gc_pause_seconds_bucket{generation="2",le="+Inf"} 1.0
python_gc_pause_max_seconds{generation="0",pid="7"} 0.0004
python_gc_pause_max_seconds{generation="2",pid="7"} 0.12
"""
GC_AFTER = """\
python_gc_pause_seconds_bucket{generation="0",le="0.001"} 40.0
python_gc_pause_seconds_bucket{generation="0",le="0.005"} 42.0
python_gc_pause_seconds_bucket{generation="0",le="+Inf"} 42.0
python_gc_pause_seconds_bucket{generation="2",le="0.001"} 0.0
python_gc_pause_seconds_bucket{generation="2",le="0.005"} 0.0
python_gc_pause_seconds_bucket{generation="2",le="+Inf"} 1.0
python_gc_pause_max_seconds{generation="0",pid="7"} 0.0031
python_gc_pause_max_seconds{generation="0",pid="8"} 0.0007
python_gc_pause_max_seconds{generation="2",pid="7"} 0.12
"""


def test_highest_bucket_of_a_delta_bounds_the_longest_observation() -> None:
    before = [(0.001, 5.0), (0.005, 6.0), (float("inf"), 6.0)]
    after = [(0.001, 9.0), (0.005, 11.0), (float("inf"), 11.0)]
    delta = stats.bucket_delta(before, after)
    assert delta == [(0.001, 4.0), (0.005, 5.0), (float("inf"), 5.0)]
    assert stats.highest_bucket(delta) == 0.005
    assert stats.highest_bucket([(0.001, 0.0), (float("inf"), 1.0)]) == float("inf")
    assert stats.highest_bucket(stats.bucket_delta(after, after)) is None
    assert stats.highest_bucket([]) is None


def test_gc_pauses_per_generation_between_scrapes() -> None:
    gc = report.gc_pauses(GC_BEFORE, GC_AFTER)
    assert list(gc) == ["0", "2"]
    assert gc["0"] == {
        "count": 32.0,
        "window_max_s": 0.005,
        "max_at_start_s": 0.0004,
        "max_s": 0.0031,  # the worst worker
    }
    # The start-up collection: in the gauge, not in the run window.
    assert gc["2"]["count"] == 0.0 and gc["2"]["window_max_s"] is None
    assert gc["2"]["max_s"] == 0.12
    assert report.gc_pauses("", METRICS) == {}  # a service without the GC metrics


def test_tail_summary_by_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 1001)]
    random.Random(1).shuffle(samples)
    tail = stats.tail_summary(samples)
    assert tail == {"p50": 501.0, "p99": 991.0, "p99_9": 1000.0, "max": 1000.0, "n": 1000}
    assert stats.tail_summary([]) == {
        "p50": None,
        "p99": None,
        "p99_9": None,
        "max": None,
        "n": 0,
    }


@pytest.mark.parametrize(
    ("head", "metric", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nserver-timing: features;dur=0.125, total;dur=1.5", "features", 0.125),
        (b"HTTP/1.1 200 OK\r\nServer-Timing: total;dur=1.5, features;dur=2", "features", 2.0),
        (b'HTTP/1.1 200 OK\r\nServer-Timing: features;desc="x";dur="3.5"', "features", 3.5),
        (
            b"HTTP/1.1 200 OK\r\nServer-Timing: db;dur=1\r\nServer-Timing: features;dur=4",
            "features",
            4.0,
        ),
        (b"HTTP/1.1 200 OK\r\nServer-Timing: featuresx;dur=1, features", "features", None),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2", "features", None),
    ],
)
def test_server_timing_duration(head: bytes, metric: str, expected: float | None) -> None:
    assert httpload.server_timing_ms(head, metric) == expected


async def read_request(reader: asyncio.StreamReader) -> bool:
    """Read one request (head and Content-Length body); False once the client has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return True


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def traced_open_loop(handle: Handler, rate: float, concurrency: int) -> httpload.Run:
    """0.1 s of open-loop /predict requests against a stand-in server answering with `handle`."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    requests = httpload.encode_requests(port, "/predict", [{"a": 1}])
    async with server:
        return await httpload.open_loop(port, requests, rate, 0.1, concurrency, trace=True)


async def test_open_loop_traces_each_response_from_its_schedule() -> None:
    body = b'{"ok": true}'
    answer = (
        b"HTTP/1.1 200 OK\r\nServer-Timing: features;dur=0.25\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(answer)
        writer.close()

    run = await traced_open_loop(handle, 200.0, concurrency=2)
    assert run.trace is not None and len(run.trace) == 20 == len(run.latencies)
    scheduled = sorted(r.scheduled for r in run.trace)
    assert scheduled[1] - scheduled[0] == pytest.approx(1 / 200.0, rel=1e-6)
    for r in run.trace:
        assert r.scheduled <= r.sent < r.done and r.body == body
        assert r.latency_s >= r.done - r.sent
        assert r.timing_ms() == 0.25


async def test_a_connection_the_server_ends_is_opened_again_for_the_next_request() -> None:
    # As serving/connections.py does: every third response says Connection: close, and the
    # server then closes the socket. No request is lost; each such connection is reopened.
    body = b"{}"
    connects = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connects
        connects += 1
        for n in range(1, 4):
            if not await read_request(reader):
                break
            close = b"Connection: close\r\n" if n == 3 else b""
            writer.write(b"HTTP/1.1 200 OK\r\n%bContent-Length: 2\r\n\r\n%b" % (close, body))
            await writer.drain()
        writer.close()

    run = await traced_open_loop(handle, 300.0, concurrency=1)
    assert run.trace is not None and len(run.trace) == 30
    assert all(r.status == 200 for r in run.trace) and run.failures == 0
    assert connects == 10  # the first, then one after every third response


def _response(
    at: float, done: float, sources: dict[str, tuple[str, str | None]] | None, ms: float = 0.5
) -> httpload.Response:
    head = b"HTTP/1.1 200 OK\r\nServer-Timing: features;dur=%g" % ms
    if sources is None:
        return httpload.Response(at, at, done, 503, b"HTTP/1.1 503 X", b"{}")
    groups = {g: {"source": s, "reason": why} for g, (s, why) in sources.items()}
    return httpload.Response(at, at, done, 200, head, json.dumps({"sources": groups}).encode())


def test_phase_report_finds_the_breaker_and_the_recovery() -> None:
    redis, cache = ("redis", None), ("cache", None)
    deadline, opened = ("default", "deadline"), ("default", "circuit_open")
    trace = [
        _response(0.0, 0.001, {"u": redis, "m": cache}, ms=0.3),
        _response(0.5, 0.501, {"u": cache, "m": cache}, ms=0.01),
        # slow from 1.0 to 2.0
        _response(1.0, 1.016, {"u": deadline, "m": cache}, ms=15.5),
        _response(1.1, 1.117, {"u": deadline, "m": cache}, ms=16.0),
        _response(1.2, 1.2001, {"u": opened, "m": cache}, ms=0.05),
        _response(1.3, 1.3001, {"u": opened, "m": opened}, ms=0.02),
        _response(1.4, 1.4001, {"u": cache, "m": cache}, ms=0.04),
        _response(1.9, 1.95, None),
        # fast again: the breaker still open, then Redis
        _response(2.1, 2.1001, {"u": opened, "m": cache}, ms=0.02),
        _response(2.6, 2.601, {"u": cache, "m": redis}, ms=0.4),
    ]
    out = bench_tail.phase_report(trace, 1.0, 2.0)
    assert out["fast"]["features_ms"]["n"] == 2 and out["fast"]["non_200"] == 0
    slow = out["slow"]
    assert slow["features_ms"]["n"] == 5 and slow["features_ms"]["max"] == 16.0
    assert slow["non_200"] == 1 and slow["client_ms"]["n"] == 5
    assert slow["sources"] == {
        "cache": 5,
        "default/deadline": 2,
        "default/circuit_open": 3,
    }
    assert out["breaker_open_after_s"] == pytest.approx(0.2001)
    # Sent after the first circuit_open answer: 0.02 and 0.04 ms; p50 by stats.quantile.
    assert out["slow_features_p50_since_open_ms"] == pytest.approx(0.04)
    assert out["slow_since_open_n"] == 2
    assert out["redis_back_after_s"] == pytest.approx(0.601)
    assert out["fast_again"]["features_ms"]["n"] == 2


def test_phase_report_without_breaker_or_recovery() -> None:
    trace = [_response(1.5, 1.53, {"u": ("redis", None)}, ms=30.0)]
    out = bench_tail.phase_report(trace, 1.0, 2.0)
    assert out["breaker_open_after_s"] is None
    assert out["slow_features_p50_since_open_ms"] is None
    assert out["redis_back_after_s"] is None  # a slow answer does not count as back
    lines = bench_tail.table_lines(
        {"slow_redis": {"rate": 100, "phase_s": 1, "delay_ms": 30, "deadline_ms": 15, **out}}
    )
    assert any("slow p99 <= 17 ms" in line and "**no**" in line for line in lines)


def test_tail_table_without_gc_metrics_or_server_timing() -> None:
    empty = stats.tail_summary([])
    client = stats.tail_summary([1.0, 2.0, 30.0])
    side = {"client_ms": client, "non_200": 0, "late": 0, "features_ms": empty, "gc": {}}
    tail = {"rate": 250, "seconds": 1, "trivial": side, "predict": side}
    lines = bench_tail.table_lines({"tail": tail})
    assert any(line.startswith("| client p99.9 / max") and "30.00" in line for line in lines)
    gc_line = next(line for line in lines if "since start-up" in line)
    assert "n/a" in gc_line and gc_line.endswith("| **no** |")


def test_quantile_is_the_sample_at_index_floor_q_n() -> None:
    assert stats.quantile([0.04, 0.02], 0.5) == 0.04
    assert stats.quantile([3.0, 1.0, 2.0], 0.0) == 1.0
    assert stats.quantile([3.0, 1.0, 2.0], 1.0) == 3.0
    with pytest.raises(ValueError, match="no samples"):
        stats.quantile([], 0.5)


def test_requests_per_worker_between_scrapes_and_their_imbalance() -> None:
    before = 'fraud_worker_requests{pid="11"} 5.0\nfraud_worker_requests{pid="12"} 0.0\n'
    after = (
        'fraud_worker_requests{pid="11"} 125.0\nfraud_worker_requests{pid="12"} 80.0\n'
        'fraud_worker_requests{pid="13"} 40.0\n'  # a worker restarted during the run
    )
    per_worker = report.worker_requests(before, after)
    assert per_worker == {"11": 120.0, "12": 80.0, "13": 40.0}
    assert report.imbalance(per_worker) == pytest.approx(0.5)  # 120 and 40 vs a mean of 80
    assert report.imbalance({"11": 10.0}) is None
    assert report.imbalance({"11": 0.0, "12": 0.0}) is None
