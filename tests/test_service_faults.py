"""Real Redis faults under live HTTP traffic to the real `bentoml serve`.

The service gets its own password-protected redis-server, which the tests kill, stop
and fill. Every request must get a 200 within a bound, served from the cache or from
counted defaults, and fresh reads must come back from Redis within seconds."""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from features import USER_FEATURES
from tests.conftest import Service
from tools.redis_server import RedisServer

pytestmark = pytest.mark.e2e

PASSWORD = "pw-Service-5c0ffee"
SEEDED = {"tx_count_1h": 2, "tx_sum_1h": 80.0, "avg_tx_90d": 40.0}
FAILED = {"unavailable", "circuit_open"}
SERVER_BOUND_MS = 500.0  # socket timeout 0.1 s, plus room for a busy 2-core VM
CLIENT_BOUND_S = 2.0


@dataclass
class Rig:
    server: RedisServer
    admin: redis.Redis
    service: Service


@pytest.fixture(scope="module")
def rig(bentoml_home: Path) -> Iterator[Rig]:
    with RedisServer(extra_args=["--requirepass", PASSWORD], quiet=True) as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        service = Service(
            bentoml_home,
            url,
            FEATURES_REDIS_SOCKET_TIMEOUT_S="0.1",
            FEATURES_BREAKER_RESET_S="0.2",
            FEATURES_CACHE_TTL_S="4",
            # Limits other than the defaults, to see the settings reach the service.
            FEATURES_MAX_ID_LENGTH="32",
            FEATURES_MAX_BATCH="4",
            FEATURES_MAX_BODY_BYTES="2048",
        ).start()
        admin = redis.Redis(port=server.port, password=PASSWORD, socket_timeout=5)
        try:
            yield Rig(server, admin, service)
        finally:
            service.stop()
            admin.close()


@dataclass
class Sample:
    at: float
    status: int
    elapsed_s: float
    body: dict[str, Any] = field(default_factory=dict)

    def reason(self, group: str = "user:features") -> str | None:
        reason: str | None = self.body["sources"][group]["reason"]
        return reason


class Traffic(threading.Thread):
    """Sequential /predict calls: a cached user, then a never-seen one, in turn."""

    def __init__(self, url: str, cached_user: str) -> None:
        super().__init__(daemon=True)
        self.url, self.cached_user = url, cached_user
        self.samples: list[tuple[str, Sample]] = []
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.done.is_set():
                n += 1
                fresh = f"t{n}-{uuid.uuid4().hex[:12]}"
                for kind, user in (("cached", self.cached_user), ("fresh", fresh)):
                    body = {"user_id": user, "merchant_id": "fm", "amount": 10.0}
                    started = time.perf_counter()
                    r = client.post("/predict", json=body)
                    sample = Sample(time.monotonic(), r.status_code, time.perf_counter() - started)
                    if r.status_code == 200:
                        sample.body = r.json()
                    self.samples.append((kind, sample))

    def between(self, start: float, end: float, kind: str) -> list[Sample]:
        return [s for k, s in self.samples if k == kind and start <= s.at <= end]


def post(rig: Rig, user: str, merchant: str = "fm") -> dict[str, Any]:
    r = httpx.post(
        f"{rig.service.url}/predict",
        json={"user_id": user, "merchant_id": merchant, "amount": 1.0},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def metric(rig: Rig, pattern: str) -> float:
    text = httpx.get(f"{rig.service.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{pattern}\S* (\S+)$", text, re.MULTILINE))


def under_fault(
    rig: Rig, fault: Callable[[], object], end_fault: Callable[[], object], seconds: float = 1.0
) -> tuple[Traffic, float, float]:
    """Run traffic through a fault; return it with the fault's start and end times."""
    hot = f"hot{time.monotonic_ns()}"
    seed(rig, [hot])
    assert post(rig, hot)["sources"]["user:features"]["source"] == "redis"  # now cached
    traffic = Traffic(rig.service.url, hot)
    traffic.start()
    time.sleep(0.3)
    began = time.monotonic()
    fault()
    time.sleep(seconds)
    ended = time.monotonic()  # before the restart: from here on Redis may answer
    end_fault()
    deadline = ended + 5.0
    while time.monotonic() < deadline:
        fresh = traffic.between(ended, float("inf"), "fresh")
        if any(s.status == 200 and s.reason() not in FAILED for s in fresh):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    traffic.done.set()
    traffic.join(10)
    return traffic, began, ended


def check(traffic: Traffic, began: float, ended: float) -> float:
    """Assert the fault's promises; return the seconds it took to recover."""
    statuses = {s.status for _, s in traffic.samples}
    assert statuses == {200}, statuses  # no 5xx, and no 4xx either
    for _, s in traffic.samples:
        assert s.elapsed_s < CLIENT_BOUND_S
        assert s.body["timings"]["features_ms"] < SERVER_BOUND_MS
    during = traffic.between(began + 0.15, ended, "fresh")
    assert len(during) >= 5
    assert all(s.reason() in FAILED for s in during)
    assert any(s.reason() == "circuit_open" for s in during)
    cached = traffic.between(began, ended, "cached")
    assert cached and all(s.body["sources"]["user:features"]["source"] == "cache" for s in cached)
    recovered = [
        s for s in traffic.between(ended, float("inf"), "fresh") if s.reason() not in FAILED
    ]
    assert recovered, "no fresh read came back from Redis"
    return recovered[0].at - ended


def seed(rig: Rig, users: list[str]) -> None:
    for user in users:
        rig.admin.hset(USER_FEATURES.key(user), mapping=SEEDED)  # type: ignore[arg-type]


@pytest.mark.parametrize("with_data", [False, True], ids=["restart-empty", "restart-with-data"])
def test_redis_killed_mid_traffic_then_restarted(rig: Rig, with_data: bool) -> None:
    users = [f"k{int(with_data)}-{i}" for i in range(3)]
    seed(rig, users)
    if with_data:
        rig.admin.save()
    opened = metric(rig, 'features_defaults_total{group="user:features",reason="circuit_open"')
    traffic, began, ended = under_fault(rig, rig.server.kill, rig.server.start)
    assert check(traffic, began, ended) < 3.0
    assert metric(rig, 'features_defaults_total{group="user:features",reason="circuit_open"') > (
        opened
    )
    rig.admin.close()  # its connection died with the server
    body = post(rig, users[0])
    assert body["sources"]["user:features"]["source"] == ("redis" if with_data else "default")
    assert body["sources"]["user:features"]["reason"] == ("invalid" if with_data else "missing")


def test_redis_hung_by_sigstop_then_sigcont(rig: Rig) -> None:
    timeouts = metric(rig, 'features_redis_errors_total{kind="timeout"')
    traffic, began, ended = under_fault(
        rig,
        lambda: rig.server.kill(signal.SIGSTOP),
        lambda: rig.server.kill(signal.SIGCONT),
    )
    assert check(traffic, began, ended) < 3.0
    assert metric(rig, 'features_redis_errors_total{kind="timeout"') > timeouts
    assert metric(rig, "features_breaker_state") == 0  # closed again


def test_full_redis_keeps_serving_reads(rig: Rig) -> None:
    seed(rig, ["full1"])
    rig.admin.config_set("maxmemory", 1)
    rig.admin.config_set("maxmemory-policy", "noeviction")
    try:
        body = post(rig, "full1", merchant="fullm")
    finally:
        rig.admin.config_set("maxmemory", 0)
    assert body["sources"]["user:features"]["source"] == "redis"


def test_garbage_in_redis_is_served_as_counted_defaults(rig: Rig) -> None:
    rig.admin.set(USER_FEATURES.key("junk1"), "not a hash")
    rig.admin.hset(USER_FEATURES.key("junk2"), mapping={"tx_count_1h": "NaN", "tx_sum_24h": "x"})
    corrupt = metric(rig, 'features_corrupt_values_total{feature="tx_sum_24h"')
    first, second = post(rig, "junk1", "gm"), post(rig, "junk2", "gm")
    assert first["sources"]["user:features"] == {
        "source": "default",
        "defaulted": list(USER_FEATURES.field_names),
        "reason": "invalid",
        "stale": False,
    }
    assert second["sources"]["user:features"]["reason"] == "invalid"
    assert {"tx_count_1h", "tx_sum_24h"} <= set(second["sources"]["user:features"]["defaulted"])
    assert metric(rig, 'features_corrupt_values_total{feature="tx_sum_24h"') == corrupt + 1


def test_configured_request_limits_apply(rig: Rig) -> None:
    url = rig.service.url
    tx = {"user_id": "u" * 32, "merchant_id": "m1", "amount": 1.0}
    assert httpx.post(f"{url}/predict", json=tx, timeout=10).status_code == 200
    r = httpx.post(f"{url}/predict", json={**tx, "user_id": "u" * 33}, timeout=10)
    assert r.status_code == 400 and "user_id" in r.text
    r = httpx.post(f"{url}/predict_batch", json={"transactions": [tx] * 5}, timeout=10)
    assert r.status_code == 400 and "at most 4" in r.text
    r = httpx.post(f"{url}/predict", json={**tx, "pad": "x" * 2048}, timeout=10)
    assert r.status_code == 413 and "at most 2048" in r.text


def test_credentials_never_reach_logs_or_metrics(rig: Rig) -> None:
    # Runs last: by now the service has logged startup, failures and recoveries.
    log = rig.service.output()
    assert "Redis read failed" in log
    metrics_text = httpx.get(f"{rig.service.url}/metrics", timeout=10).text
    for text in (log, metrics_text):
        assert PASSWORD not in text
