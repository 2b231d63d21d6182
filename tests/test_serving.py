"""The HTTP side: BentoML's runtime options, the request types the spec defines, and the
request span BentoML makes only when tracing is asked for."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from features import Settings
from models.scorer import SCHEMA_FILE, SchemaMismatch, check_saved_schema
from serving.runtime import RuntimeConfigError, service_config
from serving.schemas import transaction_model
from tests.conftest import Service

REQUEST_ID = "x-bentoml-request-id"


def test_runtime_defaults() -> None:
    config = service_config({})
    assert config["workers"] == 1
    assert config["traffic"] == {"timeout": 1.0}
    assert config["logging"] == {"access": {"enabled": False}}
    assert config["tracing"] == {"excluded_urls": [".*"]}  # no span for any URL


def test_runtime_options_from_env() -> None:
    env = {
        "FRAUD_WORKERS": "2",
        "FRAUD_REQUEST_TIMEOUT_S": "2.5",
        "FRAUD_ACCESS_LOG": "1",
        "FRAUD_TRACING": "1",
    }
    config = service_config(env)
    assert (config["workers"], config["traffic"]["timeout"]) == (2, 2.5)
    assert config["logging"]["access"]["enabled"] is True
    assert config["tracing"] == {}  # BentoML's own tracing settings apply


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("FRAUD_WORKERS", "0"),
        ("FRAUD_WORKERS", "two"),
        ("FRAUD_REQUEST_TIMEOUT_S", "nan"),
        ("FRAUD_REQUEST_TIMEOUT_S", "-1"),
        ("FRAUD_ACCESS_LOG", "yes"),
        ("FRAUD_TRACING", "on"),
    ],
)
def test_bad_runtime_options_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(RuntimeConfigError, match=f"^{name}="):
        service_config({name: raw})


def test_request_fields_come_from_the_entity_types() -> None:
    model = transaction_model(Settings.from_env({}), ("user", "merchant", "device"))
    ids = {"user_id", "merchant_id", "device_id"}
    assert set(model.model_fields) == ids | {"amount", "timestamp", "transaction_id"}
    with pytest.raises(ValidationError, match="device_id"):
        model.model_validate({"user_id": "u", "merchant_id": "m", "amount": 1.0})
    tx = model.model_validate({"user_id": "u", "merchant_id": "m", "device_id": "d", "amount": 1})
    assert tx.__dict__["timestamp"] is None and tx.__dict__["transaction_id"] is None


def test_a_malformed_saved_schema_is_a_mismatch(tmp_path: Path) -> None:
    (tmp_path / SCHEMA_FILE).write_text(json.dumps([{"name": "x", "dtype": "float"}]))
    with pytest.raises(SchemaMismatch, match="feature 'x'"):
        check_saved_schema(tmp_path, "fraud_mlp:test")
    (tmp_path / SCHEMA_FILE).write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SchemaMismatch, match="expected a list"):
        check_saved_schema(tmp_path, "fraud_mlp:test")


def _predict(service: Service) -> httpx.Response:
    body = {"user_id": "u1", "merchant_id": "m1", "amount": 3.0}
    response = httpx.post(f"{service.url}/predict", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.e2e
def test_no_request_span_unless_tracing_is_asked_for(
    service: Service, bentoml_home: Path, redis_url: str
) -> None:
    # BentoML's request id header comes from the span its tracing middleware makes.
    assert REQUEST_ID not in _predict(service).headers
    traced = Service(bentoml_home, redis_url, FRAUD_TRACING="1").start()
    try:
        assert REQUEST_ID in _predict(traced).headers
    finally:
        traced.stop()
