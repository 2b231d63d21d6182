"""The service's side of the stream: the appender (bounded queue, batched XADD, drops
counted), its FRAUD_EVENTS* settings and the request's transaction_id."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest
from pydantic import ValidationError

from features import Settings, open_redis
from features.connection import Client
from features.stream import TransactionEvent
from serving.events import APPENDED, DROPPED, EventAppender, EventsConfig
from serving.runtime import RuntimeConfigError, events_config
from serving.schemas import transaction_model
from tools.redis_server import free_port

STREAM = "stream:transactions"


def appender(client: Client, queue_size: int = 100, batch: int = 16) -> EventAppender:
    return EventAppender(client, stream=STREAM, maxlen=1000, queue_size=queue_size, batch=batch)


def dropped(reason: str) -> float:
    return float(DROPPED.labels(reason)._value.get())


async def test_a_full_queue_drops_and_counts_without_waiting(client) -> None:
    events = appender(client, queue_size=3)  # not started: nothing drains it
    before = dropped("queue_full")
    offered = [events.offer((None, "u1", "m1", 1.0, time.time(), 0.1)) for _ in range(5)]
    assert offered == [True, True, True, False, False]
    assert dropped("queue_full") - before == 2


async def test_batches_reach_the_stream_as_events(client, sync_redis) -> None:
    events = appender(client, batch=4)
    events.start()
    appended = APPENDED._value.get()
    now = time.time()
    for n in range(10):
        tx_id = f"given-{n}" if n % 2 else None  # absent: the appender makes one
        assert events.offer((tx_id, "u1", f"m{n}", n + 0.5, now - n, 0.25))
    await events.aclose(timeout_s=10)
    entries = sync_redis.xrange(STREAM)
    assert len(entries) == 10 and APPENDED._value.get() - appended == 10
    parsed = [TransactionEvent.parse(fields, now) for _, fields in entries]
    assert [e.merchant_id for e in parsed] == [f"m{n}" for n in range(10)]  # queue order
    assert [e.amount for e in parsed] == [n + 0.5 for n in range(10)]
    assert parsed[3] == TransactionEvent("given-3", "u1", "m3", 3.5, now - 3, 0.25)
    made = [e.tx_id for e in parsed[::2]]
    assert all(re.fullmatch("[0-9a-f]{32}", t) for t in made) and len(set(made)) == 5


async def test_redis_down_loses_the_batch_counted_never_raising() -> None:
    down = open_redis(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    events = appender(down)
    events.start()
    before = dropped("redis")
    assert all(events.offer((None, "u1", "m1", 1.0, time.time(), 0.5)) for _ in range(3))
    await events.aclose(timeout_s=10)
    await down.aclose()
    assert dropped("redis") - before == 3


async def test_after_close_offers_are_dropped_as_shutdown(client) -> None:
    events = appender(client)
    events.start()
    await events.aclose(timeout_s=1)
    before = dropped("shutdown")
    assert not events.offer((None, "u1", "m1", 1.0, time.time(), 0.5))
    assert dropped("shutdown") - before == 1


async def test_close_is_bounded_when_redis_does_not_answer() -> None:
    # A port that accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mute = open_redis(Settings(redis_url=f"redis://127.0.0.1:{port}/0",
                                   redis_socket_timeout_s=600.0))  # fmt: skip
        events = appender(mute)
        events.start()
        before = dropped("shutdown")
        events.offer((None, "u1", "m1", 1.0, time.time(), 0.5))
        await asyncio.sleep(0.1)  # the batch is in flight
        await asyncio.wait_for(events.aclose(timeout_s=0.2), 60)
        await mute.aclose()
    # It gave up on the batch in flight (a reply would have made it appended).
    assert dropped("shutdown") - before == 1


def test_events_settings_and_bad_values_name_the_variable() -> None:
    assert events_config({}) == EventsConfig(
        enabled=True, queue_size=10_000, batch=256, interval_s=0.05
    )
    assert events_config({"FRAUD_EVENTS_INTERVAL_MS": "5"}).interval_s == 0.005
    assert events_config({"FRAUD_EVENTS": "0", "FRAUD_EVENTS_QUEUE": "5"}).enabled is False
    bad = [("FRAUD_EVENTS", "yes"), ("FRAUD_EVENTS_QUEUE", "0"), ("FRAUD_EVENTS_BATCH", "many"),
           ("FRAUD_EVENTS_INTERVAL_MS", "-1")]  # fmt: skip
    for name, raw in bad:
        with pytest.raises(RuntimeConfigError, match=name):
            events_config({name: raw})


def test_transaction_id_is_optional_and_validated_like_an_id() -> None:
    model = transaction_model(Settings())
    base = {"user_id": "u1", "merchant_id": "m1", "amount": 1.0}
    assert model(**base).transaction_id is None  # type: ignore[attr-defined]
    assert model(**base, transaction_id="tx-1.a").transaction_id == "tx-1.a"  # type: ignore[attr-defined]
    for bad in ["", "a|b", "a:b", "x" * 65, 7]:
        with pytest.raises(ValidationError) as info:
            model(**base, transaction_id=bad)
        assert info.value.errors()[0]["loc"] == ("transaction_id",)


async def test_close_without_start_returns_at_once(client) -> None:
    events = appender(client)
    await asyncio.wait_for(events.aclose(timeout_s=60), 1)
    assert not events.offer((None, "u1", "m1", 1.0, time.time(), 0.5))
