"""Client errors are logged as one rate-limited line and counted; server errors stay loud."""

from __future__ import annotations

import logging
import sys

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from serving.client_errors import CLIENT_ERRORS, ClientErrorLog
from serving.schemas import InvalidRequest
from tests.conftest import FakeClock, Service


class Body(BaseModel):
    user_id: str


def record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord(
        "bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/predict", "POST"), info
    )


def validation_error() -> ValidationError:
    try:
        Body.model_validate({"user_id": 5})
    except ValidationError as exc:
        return exc
    raise AssertionError("validated")


def count(status: str) -> float:
    return float(CLIENT_ERRORS.labels(status)._value.get())


def test_a_client_error_becomes_one_warning_without_traceback(clock: FakeClock) -> None:
    log = ClientErrorLog(10.0, timer=clock)
    before = count("400")
    first = record(validation_error())
    assert log.filter(first)
    assert first.levelno == logging.WARNING and first.exc_info is None
    message = first.getMessage()
    assert message.startswith("client error 400 on /predict [POST]: '1 invalid: user_id: ")
    assert message.endswith("(1 client errors since the last line)")
    assert not log.filter(record(validation_error()))  # inside the interval: counted only
    assert not log.filter(record(InvalidRequest("user_id: bad")))
    clock.tick(10.0)
    later = record(InvalidRequest("merchant_id: bad\nforged line"))
    assert log.filter(later)
    assert "422" in later.getMessage() and "\n" not in later.getMessage()
    assert "(3 client errors since the last line)" in later.getMessage()
    assert count("400") - before == 2


def test_server_errors_pass_untouched(clock: FakeClock) -> None:
    log = ClientErrorLog(10.0, timer=clock)
    for _ in range(3):
        server = record(RuntimeError("boom"))
        assert log.filter(server)
        assert server.levelno == logging.ERROR and server.exc_info is not None


@pytest.mark.e2e
def test_serve_logs_a_flood_of_bad_requests_in_a_few_lines(service: Service) -> None:
    def scrape() -> float:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        prefix = 'fraud_client_errors_total{status="400"}'
        found = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(found[0].split()[-1]) if found else 0.0

    logged, counted = len(service.output()), scrape()
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for i in range(200):
            r = client.post("/predict", json={"user_id": i, "merchant_id": "m", "amount": 1})
            assert r.status_code == 400
    added = service.output()[logged:]
    assert scrape() - counted == 200
    assert "Traceback" not in added
    lines = [line for line in added.splitlines() if "client error 400" in line]
    assert 1 <= len(lines) <= 2, lines  # one per FEATURES_ERROR_LOG_INTERVAL_S (10 s)
