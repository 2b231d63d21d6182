"""End to end: the real `bentoml serve` writes what it served to the served-feature log,
and the real `python -m features.skew` reads that log against the real model directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from features import GROUPS, MODEL_FEATURES, USER_FEATURES
from features.servedlog.columns import group_column
from features.servedlog.files import closed_files
from tests.conftest import ROOT, Service

pytestmark = pytest.mark.e2e

USER = {"tx_count_1h": 3, "tx_sum_1h": 120.0}
PROFILE = {"avg_tx_90d": 40.0, "account_age_days": 400}
MERCHANT = {"mcc_risk_score": 0.3, "chargeback_rate_90d": 0.01}
ROLL_ROWS = 8
WRITTEN = 'features_served_log_records_total{result="written"}'


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples over the workers' lines of a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def model_path(bentoml_home: Path) -> Path:
    """The model's directory, found the way the README says: `bentoml models get -o path`."""
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "models",
            "get",
            "fraud_mlp:latest",
            "-o",
            "path",
        ],
        env=os.environ | {"BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def test_each_scored_transaction_is_logged_as_served_and_the_skew_report_reads_it(
    bentoml_home: Path, redis_url: str, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    for i in range(3):
        sync_redis.hset(f"user:{{sl{i}}}:features", mapping=USER)  # type: ignore[arg-type]
        sync_redis.expire(f"user:{{sl{i}}}:features", USER_FEATURES.ttl_s)
        sync_redis.hset(f"user:{{sl{i}}}:profile", mapping=PROFILE)  # type: ignore[arg-type]
        sync_redis.hset(f"merchant:{{sls{i}}}:risk", mapping=MERCHANT)  # type: ignore[arg-type]
    log_dir = tmp_path / "served"
    svc = Service(
        bentoml_home,
        redis_url,
        FEATURES_SERVED_LOG_SAMPLE_RATE="1",
        FEATURES_SERVED_LOG_DIR=str(log_dir),
        FEATURES_SERVED_LOG_ROLL_ROWS=str(ROLL_ROWS),
        FRAUD_TRACING="1",  # so BentoML makes a request id to log
    ).start()
    try:
        with httpx.Client(base_url=svc.url, timeout=10) as client:
            singles: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
            for i in range(12):  # seeded entities, and unknown ones served defaults
                tx: dict[str, Any] = {"user_id": f"sl{i % 4}", "merchant_id": f"sls{i % 4}",
                      "amount": 10.0 + i, "timestamp": 1.765e9 + 3600 * i}  # fmt: skip
                r = client.post("/predict", json=tx)
                assert r.status_code == 200, r.text
                singles.append((tx, r.headers["x-bentoml-request-id"], r.json()))
            batch_txs = [{"user_id": f"sl{i}", "merchant_id": "sls0", "amount": 5.0 * i}
                         for i in range(5)]  # fmt: skip
            batch = client.post("/predict_batch", json={"transactions": batch_txs})
            assert batch.status_code == 200, batch.text
            deadline = time.monotonic() + 30
            while metric(client.get("/metrics").text, WRITTEN) < 2 * ROLL_ROWS:
                assert time.monotonic() < deadline, "two full files never closed"
                time.sleep(0.1)
            metrics = client.get("/metrics").text
        assert metric(metrics, "features_served_log_files_total") == 2
        assert metric(metrics, 'features_served_log_records_total{result="dropped"}') == 0
    finally:
        svc.stop()  # on_shutdown closes the last file

    assert not list(log_dir.glob(".*")), "a file left open at shutdown"
    paths = closed_files(log_dir)
    assert [pq.read_metadata(p).num_rows for p in paths] == [8, 8, 1]
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    rows: list[dict[str, Any]] = table.to_pylist()
    by_request: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_request.setdefault(row["request_id"], []).append(row)

    for tx, request_id, body in singles:
        (row,) = by_request[request_id]
        assert (row["user_id"], row["merchant_id"]) == (tx["user_id"], tx["merchant_id"])
        assert row["position"] == 0
        assert row["score"] == np.float32(body["fraud_probability"])
        assert row["amount"] == np.float32(tx["amount"])
        assert row["event_time"].timestamp() == tx["timestamp"]
        for group in GROUPS:
            sent = body["sources"][group.qualified_name]
            assert row[group_column(group, "source")] == sent["source"]
            assert row[group_column(group, "reason")] == sent["reason"]
            assert row[group_column(group, "defaulted")] == sent["defaulted"]
            assert row[group_column(group, "stale")] == sent["stale"]
        assert row["model_tag"].startswith("fraud_mlp:")
        assert len(row["model_fingerprint"]) == 16
    assert {r["user_features_source"] for r in rows} >= {"redis", "cache", "default"}

    (batch_rows,) = [v for v in by_request.values() if len(v) == 5]
    batch_rows.sort(key=lambda r: r["position"])
    assert [r["position"] for r in batch_rows] == [0, 1, 2, 3, 4]
    assert [r["user_id"] for r in batch_rows] == [t["user_id"] for t in batch_txs]
    predictions = batch.json()["predictions"]
    assert [r["score"] for r in batch_rows] == [
        np.float32(p["fraud_probability"]) for p in predictions
    ]

    # The skew report over this log and the real model: twelve entities are nothing like
    # the training population, so it finds skew (exit 1) and names every input.
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "features.skew",
            "--log",
            str(log_dir),
            "--model",
            str(model_path(bentoml_home)),
            "--min-rows",
            "10",
            "--png",
            str(tmp_path / "skew.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert report.returncode == 1, report.stdout + report.stderr
    named = {line.split()[0] for line in report.stdout.splitlines()[1 : len(MODEL_FEATURES) + 1]}
    assert named == {f.name for f in MODEL_FEATURES}
    assert "17 served rows in 3 files" in report.stdout
    assert (tmp_path / "skew.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FEATURES_SERVED_LOG_SAMPLE_RATE": "1.5"}, "FEATURES_SERVED_LOG_SAMPLE_RATE"),
        ({"FEATURES_SERVED_LOG_SAMPLE_RATE": "0.1"}, "FEATURES_SERVED_LOG_DIR must be set"),
        (
            {"FEATURES_SERVED_LOG_SAMPLE_RATE": "0.1", "FEATURES_SERVED_LOG_DIR": "{file}/log"},
            "FEATURES_SERVED_LOG_DIR=",
        ),
    ],
)
def test_bad_served_log_settings_stop_start_up(
    bentoml_home: Path, redis_url: str, tmp_path: Path, env: dict[str, str], named: str
) -> None:
    (tmp_path / "file").write_text("")
    env = {k: v.format(file=tmp_path / "file") for k, v in env.items()}
    svc = Service(bentoml_home, redis_url, **env)
    with pytest.raises(RuntimeError, match="bentoml serve exited") as info:
        svc.start(timeout_s=60)
    svc.stop()
    assert named in str(info.value)
