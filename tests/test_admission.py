"""Admission control: the adaptive limit's rule, the middleware on a stand-in app, and the
real `bentoml serve` refusing a burst over its limit while /readyz still answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from load_tests.stats import counter_total, parse_prometheus
from serving.admission import Admission, AdmissionConfig, ConcurrencyLimit
from serving.runtime import RuntimeConfigError, admission_config
from tests.conftest import Service
from tools.delay_proxy import DelayProxy
from tools.redis_server import RedisServer

CONFIG = AdmissionConfig(initial_limit=10, min_limit=4, max_limit=12, target_s=0.02)


def test_latency_over_the_target_shrinks_the_limit_to_its_floor() -> None:
    limit = ConcurrencyLimit(CONFIG)
    assert limit.update(0.021, peak=10, limited=True) == 8  # 10 * 0.8
    for _ in range(20):
        limit.update(0.200, peak=10, limited=True)
    assert limit.limit == CONFIG.min_limit


def test_a_few_slow_requests_are_not_a_queue() -> None:
    limit = ConcurrencyLimit(CONFIG)
    assert limit.update(0.500, peak=4, limited=False) == 10  # 4 < 10 / 2 in flight
    assert limit.update(0.500, peak=5, limited=False) == 8


def test_the_limit_grows_only_while_it_refuses_and_latency_is_in_target() -> None:
    limit = ConcurrencyLimit(CONFIG)
    assert limit.update(0.001, peak=10, limited=False) == 10  # not binding: no reason to grow
    assert limit.update(0.001, peak=10, limited=True) == 11
    for _ in range(5):
        limit.update(0.0, peak=11, limited=True)
    assert limit.limit == CONFIG.max_limit


def test_admission_settings_from_env() -> None:
    assert admission_config({}) == AdmissionConfig()
    env = {"FRAUD_ADMISSION_MIN_LIMIT": "2", "FRAUD_ADMISSION_TARGET_MS": "30"}
    config = admission_config(env)
    assert (config.min_limit, config.target_s) == (2, 0.03)
    assert admission_config({"FRAUD_ADMISSION": "0"}).enabled is False
    with pytest.raises(RuntimeConfigError, match="FRAUD_ADMISSION_MIN_LIMIT <="):
        admission_config({"FRAUD_ADMISSION_MIN_LIMIT": "64", "FRAUD_ADMISSION_MAX_LIMIT": "8"})
    with pytest.raises(RuntimeConfigError, match=r"^FRAUD_ADMISSION_TARGET_MS="):
        admission_config({"FRAUD_ADMISSION_TARGET_MS": "0"})


class Recorder:
    """An ASGI `send` that keeps what the middleware sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.messages[1]["body"])
        return parsed


def http_scope(path: str = "/predict", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


async def nothing() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_requests_over_the_limit_are_refused_at_once() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    admission = Admission(slow_app, AdmissionConfig(initial_limit=2, min_limit=2, max_limit=2))
    held = [Recorder() for _ in range(2)]
    tasks = [asyncio.create_task(admission(http_scope(), nothing, r)) for r in held]
    await asyncio.sleep(0.01)
    assert admission.admitted == 2
    refused = Recorder()
    await admission(http_scope(), nothing, refused)  # returns without waiting
    assert refused.status == 503
    assert refused.headers[b"retry-after"] == b"1"
    assert int(refused.headers[b"content-length"]) == len(refused.messages[1]["body"])
    assert refused.body["reason"] == "limit"
    probe = asyncio.create_task(admission(http_scope("/readyz"), nothing, Recorder()))
    await asyncio.sleep(0.01)
    assert not probe.done()  # not refused: it waits on the app like the others
    release.set()
    await asyncio.gather(*tasks, probe)
    assert [r.status for r in held] == [200, 200]
    assert admission.admitted == 0
    after = Recorder()
    await admission(http_scope(), nothing, after)
    assert after.status == 200


async def test_a_budget_shorter_than_requests_take_is_refused() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    admission = Admission(app, CONFIG)
    budget = b"x-envoy-expected-rq-timeout-ms"
    first = Recorder()
    await admission(http_scope(headers=[(budget, b"1")]), nothing, first)
    assert first.status == 200  # nothing measured yet: no grounds to refuse
    short = Recorder()
    await admission(http_scope(headers=[(budget, b"0.5")]), nothing, short)
    assert short.status == 503 and short.body["reason"] == "budget"
    for value in (b"5000", b"junk", b"-3", b"nan"):  # enough, or unreadable: admitted
        ok = Recorder()
        await admission(http_scope(headers=[(budget, value)]), nothing, ok)
        assert ok.status == 200, value


async def test_the_lag_monitor_stops_with_the_lifespan() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    def refused() -> float:
        value = REGISTRY.get_sample_value("fraud_admission_refused_total", {"reason": "budget"})
        return value or 0.0

    admission = Admission(app, CONFIG)
    await admission(http_scope(), nothing, Recorder())
    lag = admission._lag
    assert lag is not None and lag._handle is not None  # sampling
    before = refused()
    short = [(b"x-envoy-expected-rq-timeout-ms", b"0")]
    for _ in range(3):
        await admission(http_scope(headers=short), nothing, Recorder())
    assert refused() == before  # counted once an interval, not per refusal
    await admission({"type": "lifespan"}, nothing, Recorder())
    assert refused() == before + 3  # the last interval's refusals are not lost
    assert admission._lag is None and lag._handle is None  # its last user left


class Counting:
    """A middleware that counts the requests it sees: BentoML's own stand in front."""

    def __init__(self, app: Any, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)


async def test_admission_decides_in_front_of_the_whole_stack_once_the_lifespan_starts() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    release = asyncio.Event()

    async def slow(request: Any) -> JSONResponse:
        await release.wait()
        return JSONResponse({})

    one = AdmissionConfig(initial_limit=1, min_limit=1, max_limit=1)
    seen: list[str] = []
    app: Any = Starlette(  # called with the stand-in ASGI callables above
        routes=[Route("/predict", slow, methods=["POST"])],
        middleware=[Middleware(Counting, seen=seen), Middleware(Admission, config=one)],
    )
    started, stop = asyncio.Event(), asyncio.Event()

    async def lifespan_receive() -> dict[str, Any]:
        if not started.is_set():
            started.set()
            return {"type": "lifespan.startup"}
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    lifespan = asyncio.create_task(app({"type": "lifespan"}, lifespan_receive, Recorder()))
    await started.wait()
    await asyncio.sleep(0.01)
    held = Recorder()
    first = asyncio.create_task(app(http_scope(), nothing, held))
    await asyncio.sleep(0.01)
    refused = Recorder()
    await app(http_scope(), nothing, refused)
    assert refused.status == 503
    assert seen == ["/predict"]  # the refusal never reached the middleware ahead
    release.set()
    await first
    assert held.status == 200
    ok = Recorder()
    await app(http_scope(), nothing, ok)
    assert ok.status == 200 and seen == ["/predict", "/predict"]
    stop.set()
    await lifespan


@pytest.fixture
def slow_redis(redis_server: RedisServer) -> Iterator[DelayProxy]:
    with DelayProxy("127.0.0.1", redis_server.port, delay_s=0.3) as proxy:
        yield proxy


def worker_requests(url: str) -> list[float]:
    samples = parse_prometheus(httpx.get(f"{url}/metrics", timeout=5).text)
    return [s.value for s in samples if s.name == "fraud_worker_requests" and s.label("pid")]


@pytest.mark.e2e
def test_serve_refuses_a_burst_over_its_limit_and_recovers(
    bentoml_home: Path, slow_redis: DelayProxy
) -> None:
    # Replies 300 ms late and a 1 s deadline keep each request in flight for ~300 ms.
    svc = Service(
        bentoml_home,
        slow_redis.url(),
        FRAUD_ADMISSION_INITIAL_LIMIT="3",
        FRAUD_ADMISSION_MIN_LIMIT="3",
        FRAUD_ADMISSION_MAX_LIMIT="3",
        FEATURES_REDIS_SOCKET_TIMEOUT_S="2",
        FEATURES_REDIS_POOL_TIMEOUT_S="2",
        FEATURES_CACHE_TTL_S="0.001",
    ).start()

    def predict(i: int) -> httpx.Response:
        body = {"user_id": f"burst{i}", "merchant_id": f"m{i}", "amount": 1.0}
        return httpx.post(f"{svc.url}/predict", json=body, timeout=10)

    try:
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(predict, i) for i in range(12)]
            time.sleep(0.1)  # the burst is in flight
            ready = httpx.get(f"{svc.url}/readyz", timeout=5)
            burst = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in burst)
        assert set(statuses) == {200, 503}, statuses
        assert statuses.count(200) >= 3
        refused = [r for r in burst if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert all(r.json()["reason"] == "limit" for r in refused)
        assert ready.status_code == 200
        counted = f'fraud_admission_refused_total{{reason="limit"}} {len(refused)}.0'
        until = time.monotonic() + 5.0  # counted once an admission interval (100 ms)
        while counted not in (metrics := httpx.get(f"{svc.url}/metrics", timeout=5).text):
            assert time.monotonic() < until, metrics
            time.sleep(0.1)
        # Refused in front of BentoML's own middleware: its request counter never saw them.
        samples = parse_prometheus(metrics)
        bentoml_total = "bentoml_service_request_total"
        assert counter_total(samples, bentoml_total, {"http_response_code": "503"}) == 0
        assert counter_total(samples, bentoml_total, {"http_response_code": "200"}) >= 3
        assert predict(99).status_code == 200  # recovered once the burst is served
        admitted = statuses.count(200) + 1
        until = time.monotonic() + 5.0  # the gauge is written once an interval (100 ms)
        while (served := worker_requests(svc.url)) != [admitted] and time.monotonic() < until:
            time.sleep(0.1)
        assert served == [admitted]  # one worker: one series, labelled with its pid
    finally:
        svc.stop()
