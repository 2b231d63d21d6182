"""End to end: the real `bentoml serve` over HTTP, against a real redis-server."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import redis

from features import HASH_GROUPS, USER_FEATURES
from features.online.structures import pack_embedding
from tests.conftest import EMBEDDING, Service, command_calls
from tools.redis_server import free_port

pytestmark = pytest.mark.e2e

USER = {"tx_count_1h": 9, "tx_sum_1h": 4200.0, "avg_tx_90d": 35.0, "account_age_days": 12}
MERCHANT = {"mcc_risk_score": 0.8, "chargeback_rate_90d": 0.05, "is_high_risk_category": 1}


@pytest.fixture
def seeded(sync_redis: redis.Redis) -> redis.Redis:
    for i in range(5):
        sync_redis.hset(f"user:{{e2e{i}}}:features", mapping=USER)  # type: ignore[arg-type]
        sync_redis.expire(f"user:{{e2e{i}}}:features", USER_FEATURES.ttl_s)
        sync_redis.hset(f"merchant:{{shop{i}}}:risk", mapping=MERCHANT)  # type: ignore[arg-type]
    return sync_redis


def post(service: Service, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, timeout=10)


def test_predict_scores_with_stored_features(service: Service, seeded: redis.Redis) -> None:
    tx = {"user_id": "e2e0", "merchant_id": "shop0", "amount": 950.0, "timestamp": 1.76e9}
    r = post(service, "/predict", tx)
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["fraud_probability"] <= 1.0
    assert body["sources"]["user:features"]["source"] == "redis"
    assert body["sources"]["merchant:risk"]["source"] == "redis"
    assert "tx_count_24h" in body["sources"]["user:features"]["defaulted"]
    assert set(body["timings"]) == {"features_ms", "inference_ms", "total_ms"}
    assert re.fullmatch(
        r"features;dur=[\d.]+, inference;dur=[\d.]+, total;dur=[\d.]+",
        r.headers["server-timing"],
    )
    again = post(service, "/predict", tx).json()
    assert again["sources"]["user:features"]["source"] == "cache"
    assert again["fraud_probability"] == pytest.approx(body["fraud_probability"])


def test_sorted_sets_and_embeddings_reach_the_model(service: Service, seeded: redis.Redis) -> None:
    now = time.time()
    # A burst: 6 transactions in the last 10 minutes; the merchant paid an hour ago.
    seeded.zadd("user:{burst}:activity", {f"t{i}": now - 60 * i for i in range(6)})
    seeded.zadd("user:{burst}:merchants", {"emb-shop": now - 3600})
    seeded.set("merchant:{emb-shop}:embedding", pack_embedding(EMBEDDING))
    tx = {"user_id": "burst", "merchant_id": "emb-shop", "amount": 30.0, "timestamp": now}
    r = post(service, "/predict", tx)
    assert r.status_code == 200, r.text
    sources = r.json()["sources"]
    for group in ("user:activity", "user:merchants", "merchant:embedding"):
        assert sources[group] == {
            "source": "redis", "defaulted": [], "reason": None, "stale": False
        }, group  # fmt: skip
    # Another merchant of the same user: its own ZSCORE; the set holds no score for it.
    other = post(service, "/predict", {**tx, "merchant_id": "elsewhere"}).json()
    assert other["sources"]["user:merchants"]["reason"] is None
    assert other["sources"]["merchant:embedding"]["reason"] == "missing"
    # A user and merchant with no history at all: the same request on defaults.
    stranger = post(service, "/predict", {**tx, "user_id": "quiet", "merchant_id": "plain"})
    quiet = stranger.json()
    for group in ("user:activity", "user:merchants", "merchant:embedding"):
        assert quiet["sources"][group]["reason"] == "missing", group
    assert quiet["fraud_probability"] != pytest.approx(r.json()["fraud_probability"])


def test_unknown_entities_are_scored_on_defaults(service: Service, seeded: redis.Redis) -> None:
    r = post(service, "/predict", {"user_id": "stranger", "merchant_id": "nowhere", "amount": 5})
    assert r.status_code == 200, r.text
    for group in ("user:features", "merchant:risk"):
        assert r.json()["sources"][group]["source"] == "default"
        assert r.json()["sources"][group]["reason"] == "missing"


def test_predict_batch_reads_redis_once_per_key(service: Service, seeded: redis.Redis) -> None:
    txs = [
        {"user_id": f"e2e{i % 5}", "merchant_id": f"shop{i % 5}", "amount": i % 5}
        for i in range(40)
    ]
    txs += [{"user_id": f"b{i}", "merchant_id": "m-new", "amount": 1.0} for i in range(20)]
    seeded.config_resetstat()
    r = post(service, "/predict_batch", {"transactions": txs})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 60
    assert predictions[0]["fraud_probability"] == pytest.approx(predictions[5]["fraud_probability"])
    # 20 new users + 1 new merchant, a HMGET per hash; the 5 e2e users and merchants may
    # be cached by earlier tests. The structures: a ZCOUNT per user, a ZSCORE per (user,
    # merchant) pair, a GET per merchant.
    user_hashes = sum(g.entity == "user" for g in HASH_GROUPS)
    merchant_hashes = len(HASH_GROUPS) - user_hashes
    fewest = 20 * user_hashes + merchant_hashes
    assert fewest <= command_calls(seeded, "hmget") <= fewest + 5 * (user_hashes + merchant_hashes)
    assert 20 <= command_calls(seeded, "zcount") <= 25
    assert 20 <= command_calls(seeded, "zscore") <= 25
    assert 1 <= command_calls(seeded, "get") <= 6
    assert command_calls(seeded, "exec") == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1", "amount": 1}, "merchant_id"),
        ({"user_id": "u1", "merchant_id": "m1"}, "amount"),
        ({"user_id": "u:1", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1", "merchant_id": "*", "amount": 1}, "merchant_id"),
        ({"user_id": "u1\r\nFLUSHALL", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "x" * 10_000, "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "{u1}", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u 1", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": " u1", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1\n", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1\x00", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "usér", "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1", "merchant_id": "商店", "amount": 1}, "merchant_id"),
        ({"user_id": "u1", "merchant_id": "m" * 65, "amount": 1}, "merchant_id"),
        ({"user_id": "u1", "merchant_id": "x" * 10_000, "amount": 1}, "merchant_id"),
        ({"user_id": None, "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": ["u1"], "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1", "merchant_id": {"id": "m1"}, "amount": 1}, "merchant_id"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": True}, "amount"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": [1]}, "amount"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": 1, "timestamp": "soon"}, "timestamp"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": 1, "timestamp": 4.2e9}, "timestamp"),
        ({"user_id": 5, "merchant_id": "m1", "amount": 1}, "user_id"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": -1}, "amount"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": "lots"}, "amount"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": 1e300}, "amount"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": 1, "timestamp": 1e15}, "timestamp"),
        ({"user_id": "u1", "merchant_id": "m1", "amount": 1, "timestamp": -5}, "timestamp"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    service: Service, seeded: redis.Redis, body: dict[str, object], field: str
) -> None:
    seeded.config_resetstat()
    r = post(service, "/predict", body)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text
    good = {"user_id": "u1", "merchant_id": "m1", "amount": 1}
    r = post(service, "/predict_batch", {"transactions": [good, body]})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text
    # The server's command statistics: not one read was sent for either request.
    assert command_calls(seeded, "hmget") == 0


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_amount_is_a_4xx(service: Service, raw: str) -> None:
    content = f'{{"user_id": "u1", "merchant_id": "m1", "amount": {raw}}}'
    r = httpx.post(
        f"{service.url}/predict",
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert 400 <= r.status_code < 500, r.text
    assert "amount" in r.text


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        ('{"user_id": "u1", "merchant_id": "m1", "amo', "application/json"),
        ("not json at all", "application/json"),
        ("[1, 2, 3]", "application/json"),
        ("user_id=u1&merchant_id=m1&amount=1", "text/plain"),
        ('{"user_id": "u1", "merchant_id": "m1", "amount": 1}', "text/plain"),
        ('{"user_id": "u1", "merchant_id": "m1", "amount": 1}', "multipart/form-data"),
        ('{"user_id": "u1", "merchant_id": "m1", "amount": 1}', ""),
        ("", "application/json"),
    ],
)
def test_malformed_bodies_are_a_4xx(service: Service, content: str, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{service.url}/predict", content=content, headers=headers, timeout=10)
    assert 400 <= r.status_code < 500, r.text
    if content_type != "application/json":
        assert r.status_code == 415 and "content-type" in r.text


def test_batch_limits(service: Service, seeded: redis.Redis) -> None:
    tx = {"user_id": "u1", "merchant_id": "m1", "amount": 1}
    seeded.config_resetstat()
    r = post(service, "/predict_batch", {"transactions": [tx] * 257})
    assert r.status_code == 400 and "transactions" in r.text and "at most 256" in r.text
    r = post(service, "/predict_batch", {"transactions": []})
    assert r.status_code == 400 and "transactions" in r.text
    bad = [tx, {**tx, "user_id": "no spaces"}]
    r = post(service, "/predict_batch", {"transactions": bad})
    assert r.status_code == 400 and "user_id" in r.text
    assert command_calls(seeded, "hmget") == 0


def test_huge_bodies_are_refused_before_parsing(service: Service, seeded: redis.Redis) -> None:
    tx = {"user_id": "u1", "merchant_id": "m1", "amount": 1}
    seeded.config_resetstat()
    huge = {"transactions": [tx] * 20_000}  # ~1 MB, over the 256 KiB default
    r = post(service, "/predict_batch", huge)
    assert r.status_code == 413 and "body" in r.text and "at most 262144" in r.text
    # Chunked, so no Content-Length to judge by: counted as it arrives.
    chunks = (json.dumps(tx).encode() for _ in range(20_000))
    r = httpx.post(
        f"{service.url}/predict",
        content=chunks,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413 and "body" in r.text
    assert command_calls(seeded, "hmget") == 0
    # Under the limit still works, chunked or not, with or without a charset.
    body = json.dumps(tx).encode()
    r = httpx.post(
        f"{service.url}/predict",
        content=iter([body[:10], body[10:]]),
        headers={"content-type": "Application/JSON; charset=utf-8"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def test_metrics_expose_feature_retrieval(service: Service, seeded: redis.Redis) -> None:
    post(service, "/predict", {"user_id": "e2e1", "merchant_id": "shop1", "amount": 3})
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    for name in (
        "features_retrieval_seconds_bucket",
        'features_cache_lookups_total{result="hit"}',
        "features_defaults_total",
        "features_redis_up",
        "fraud_inference_seconds_bucket",
    ):
        assert name in text, name
    assert 'le="0.0001"' in text  # sub-millisecond buckets


def test_metrics_show_breakers_of_configured_stores_only(service: Service) -> None:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    breakers = re.findall(r'^features_breaker_state\{.*dependency="([^"]*)"', text, re.MULTILINE)
    assert set(breakers) == {"redis"}  # no backing store configured: no breaker for one


def test_redis_outage_serves_defaults_and_stays_ready(bentoml_home: Path) -> None:
    down = Service(bentoml_home, f"redis://127.0.0.1:{free_port()}/0").start()
    try:
        assert httpx.get(f"{down.url}/readyz", timeout=5).status_code == 200
        r = post(down, "/predict", {"user_id": "u1", "merchant_id": "m1", "amount": 10})
        assert r.status_code == 200, r.text
        assert r.json()["sources"]["user:features"]["reason"] == "unavailable"
        assert r.json()["timings"]["features_ms"] < 500
        metrics = httpx.get(f"{down.url}/metrics", timeout=5).text
        assert re.search(r"features_redis_up\S* 0\.0", metrics)
        assert "features_redis_errors_total" in metrics
    finally:
        down.stop()


def test_service_refuses_a_model_trained_on_other_features(
    bentoml_home: Path, redis_url: str, tmp_path: Path
) -> None:
    # The same trained model, with one default changed in its saved schema.
    home = tmp_path / "skewed"
    shutil.copytree(bentoml_home / "models", home / "models")
    (schema_path,) = (home / "models" / "fraud_mlp").glob("*/features.json")
    schema = json.loads(schema_path.read_text())
    schema[0]["default"] = 42.0
    schema_path.write_text(json.dumps(schema))
    svc = Service(home, redis_url)
    with pytest.raises(RuntimeError, match="bentoml serve exited") as info:
        svc.start(timeout_s=60)
    svc.stop()
    assert "default of 'tx_count_1h': model 42.0, features/ 0" in str(info.value)
