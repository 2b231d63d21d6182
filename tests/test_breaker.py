"""CircuitBreaker state machine under a fake clock."""

from __future__ import annotations

import pytest

from features import CircuitBreaker, metrics
from features.breaker import State
from tests.conftest import FakeClock


def state(breaker: CircuitBreaker) -> State:
    return breaker.state  # a call, so mypy does not narrow the property between steps


def test_opens_after_threshold_failures_in_a_row(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_s=1.0, timer=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.allow()
    breaker.success()  # a success resets the count
    for _ in range(2):
        breaker.failure()
    assert state(breaker) is State.CLOSED
    breaker.failure()
    assert state(breaker) is State.OPEN
    assert metrics.BREAKER_STATE.labels("redis")._value.get() == State.OPEN
    assert not breaker.allow()


def test_half_open_sends_one_probe_and_closes_on_its_success(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_s=1.0, timer=clock)
    breaker.failure()
    clock.tick(0.99)
    assert not breaker.allow()
    clock.tick(0.02)
    assert state(breaker) is State.HALF_OPEN
    assert not breaker.allow()  # reads still get defaults...
    assert breaker.claim_probe()  # ...while one caller sends the probe
    assert not breaker.claim_probe()
    breaker.success()
    assert state(breaker) is State.CLOSED and breaker.allow()
    assert metrics.BREAKER_STATE.labels("redis")._value.get() == State.CLOSED


def test_failed_probe_opens_for_another_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_s=1.0, timer=clock)
    breaker.failure()
    clock.tick(1.0)
    assert breaker.claim_probe()
    breaker.failure()
    assert state(breaker) is State.OPEN
    clock.tick(0.5)
    assert not breaker.claim_probe()
    clock.tick(0.5)
    assert breaker.claim_probe()


def test_abandoned_probe_lets_the_next_caller_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_s=1.0, timer=clock)
    breaker.failure()
    clock.tick(1.0)
    assert breaker.claim_probe()
    breaker.abandon()  # e.g. the probe found no free connection
    assert breaker.claim_probe()


def test_late_failures_do_not_extend_the_open_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_s=1.0, timer=clock)
    transitions = metrics.BREAKER_TRANSITIONS.labels("redis", "open")
    before = transitions._value.get()
    breaker.failure()
    clock.tick(0.9)
    breaker.failure()  # a read that started before the breaker opened
    clock.tick(0.1)
    assert state(breaker) is State.HALF_OPEN
    assert transitions._value.get() == before + 1


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
