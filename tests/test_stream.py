"""The velocity consumer against a real redis-server: windows, duplicates, malformed,
out-of-order and late events, a consumer killed mid-batch, several consumers, the backing
store, and end to end behind a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster as SyncRedisCluster

import features.stream as stream
from features import (
    MERCHANT_VELOCITY,
    USER_FEATURES,
    FeatureWriter,
    Settings,
    open_redis,
)
from features.backing import BackingStore
from features.connection import Client
from features.errors import FeatureWriteError
from features.spec import EVENT_TS_FIELD, VERSION_FIELD
from features.stream import TransactionEvent, VelocityConsumer
from features.stream.consumer import ScriptFailed
from features.stream.metrics import consumer_registry
from features.stream.velocity import ACTIVITY_TTL_S, DAY_S, HOUR_S, MERCHANTS_TTL_S, version_key
from tests.conftest import Service
from tests.test_backing import dynamo_store
from tools.emulators import Dynalite
from tools.redis_cluster import LocalCluster
from tools.redis_server import RedisServer, find_tls_binary, free_port
from tools.stream_consumer import StreamConsumer

STREAM = "stream:transactions"
GROUP = "velocity"
DEAD = "stream:transactions:dead"
NOW = time.time()
POLL_S = 0.05


def consumer(client: Client, name: str = "c1", **options: object) -> VelocityConsumer:
    params: dict[str, object] = {
        "stream": STREAM,
        "group": GROUP,
        "name": name,
        "batch": 100,
        "block_ms": 50,
        "claim_idle_s": 0.2,
        "maxlen": 10_000,
        "max_user_events": 1000,
        "max_merchant_events": 1000,
    }
    writer = FeatureWriter(client, options.pop("backing", None))  # type: ignore[arg-type]
    return VelocityConsumer(client, writer, **(params | options))  # type: ignore[arg-type]


async def drain(*consumers: VelocityConsumer) -> None:
    """Step the consumers in turn until none finds anything."""
    for c in consumers:
        await c.ensure_group()
    while sum([await c.step(block=False) for c in consumers]):
        pass


def tx(tx_id: str, user: str = "u1", merchant: str = "m1", amount: float = 10.0,
       ago_s: float = 0.0) -> TransactionEvent:  # fmt: skip
    return TransactionEvent(tx_id, user, merchant, amount, NOW - ago_s, 0.5)


def publish(sync_redis: redis.Redis, *events: TransactionEvent | dict[str, object]) -> None:
    for e in events:
        sync_redis.xadd(STREAM, e.fields() if isinstance(e, TransactionEvent) else e)  # type: ignore[arg-type]


def entry(event: TransactionEvent, **changes: str) -> dict[Any, Any]:
    """A stream entry's fields, some changed."""
    return event.fields() | changes


def stored(sync_redis: redis.Redis, key: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in sync_redis.hgetall(key).items()}  # type: ignore[union-attr]


def pending(sync_redis: redis.Redis) -> int:
    return int(sync_redis.xpending(STREAM, GROUP)["pending"])


def test_public_names_are_pinned() -> None:
    assert stream.__all__ == [
        "Applied",
        "Counts",
        "TransactionEvent",
        "Velocity",
        "VelocityConsumer",
        "dead_letter_key",
        "merchant_activity_key",
        "user_activity_key",
        "user_merchants_key",
    ]
    assert stream.dead_letter_key(STREAM) == DEAD
    assert stream.user_activity_key("u1") == "user:{u1}:activity"  # the layout the reads use


# A user's day: two events in the last hour, one 2 h ago, one 3 days ago at another merchant.
DAY = [
    tx("t-old", merchant="m3", amount=99.0, ago_s=3 * DAY_S),
    tx("t-2h", merchant="m1", amount=20.5, ago_s=2 * HOUR_S),
    tx("t-30m", merchant="m2", amount=12.25, ago_s=1800),
    tx("t-now", merchant="m1", amount=7.0, ago_s=10),
]


async def test_velocity_over_each_window_with_ttls_and_event_time(client, sync_redis) -> None:
    publish(sync_redis, *DAY)
    c = consumer(client)
    await drain(c)
    user = stored(sync_redis, USER_FEATURES.key("u1"))
    assert user == {
        "tx_count_1h": 2,
        "tx_sum_1h": 19.25,
        "tx_count_24h": 3,
        "tx_sum_24h": 39.75,
        "distinct_merchants_7d": 3,  # m1, m2, and m3 three days ago
        EVENT_TS_FIELD: NOW - 10,  # the newest event time used
        VERSION_FIELD: 4,  # script calls on the user's logs
    }
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m1")) == {
        "merchant_tx_count_24h": 2,
        EVENT_TS_FIELD: NOW - 10,
        VERSION_FIELD: 2,
    }
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m3")) == {
        "merchant_tx_count_24h": 1,
        EVENT_TS_FIELD: NOW - 3 * DAY_S,
        VERSION_FIELD: 1,
    }
    for key, ttl_s in [
        (USER_FEATURES.key("u1"), USER_FEATURES.ttl_s),
        (MERCHANT_VELOCITY.key("m1"), MERCHANT_VELOCITY.ttl_s),
        (stream.user_activity_key("u1"), ACTIVITY_TTL_S),
        (stream.user_merchants_key("u1"), MERCHANTS_TTL_S),
        (stream.merchant_activity_key("m1"), ACTIVITY_TTL_S),
    ]:
        assert ttl_s - 60 < sync_redis.ttl(key) <= ttl_s, key
    # The 24 h log holds only the last 24 h; the merchants' set every merchant of 30 days.
    assert sync_redis.zcard(stream.user_activity_key("u1")) == 3
    assert sync_redis.zscore(stream.user_merchants_key("u1"), "m1") == NOW - 10
    assert c.totals.new == 4 and c.totals.read == 4
    assert pending(sync_redis) == 0


async def test_out_of_order_events_give_the_values_of_in_order(client, sync_redis) -> None:
    def as_user(user: str, events: list[TransactionEvent]) -> list[TransactionEvent]:
        return [
            TransactionEvent(
                f"{user}-{e.tx_id}", user, f"{user}{e.merchant_id}", e.amount, e.event_ts
            )
            for e in events
        ]

    shuffled = [DAY[2], DAY[3], DAY[0], DAY[1]]
    publish(sync_redis, *as_user("ordered", DAY), *as_user("reversed", DAY[::-1]))
    publish(sync_redis, *as_user("shuffled", shuffled))
    await drain(consumer(client, batch=3))  # batches cut across users
    ordered = sync_redis.hgetall(USER_FEATURES.key("ordered"))
    assert ordered[b"tx_count_1h"] == b"2" and ordered[b"tx_sum_24h"] == b"39.75"
    for user in ("reversed", "shuffled"):
        assert sync_redis.hgetall(USER_FEATURES.key(user)) == ordered, user
        for m in ("m1", "m2", "m3"):
            assert sync_redis.hgetall(MERCHANT_VELOCITY.key(user + m)) == sync_redis.hgetall(
                MERCHANT_VELOCITY.key("ordered" + m)
            )


async def test_late_events_count_only_as_merchants_paid_within_7_days(client, sync_redis) -> None:
    publish(sync_redis, tx("t1", amount=5.0), tx("t2", merchant="m2", amount=6.0, ago_s=60))
    c = consumer(client)
    await drain(c)
    before = stored(sync_redis, USER_FEATURES.key("u1"))
    # Older than the 24 h window of the user's newest event: late.
    publish(sync_redis, tx("late-2d", merchant="m8", amount=50.0, ago_s=2 * DAY_S))
    publish(sync_redis, tx("late-10d", merchant="m9", amount=60.0, ago_s=10 * DAY_S))
    await drain(c)
    after = stored(sync_redis, USER_FEATURES.key("u1"))
    assert after == before | {"distinct_merchants_7d": 3, VERSION_FIELD: 4}  # m1, m2, m8; not m9
    assert sync_redis.zcard(stream.user_activity_key("u1")) == 2
    assert c.totals.late == 2 and pending(sync_redis) == 0
    # A merchant with no other events takes the late event as its newest.
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m8"))["merchant_tx_count_24h"] == 1


async def test_duplicates_are_counted_once(client, sync_redis) -> None:
    first = tx("dup-1", amount=10.0)
    publish(sync_redis, first, first, tx("dup-2", amount=2.5, ago_s=5), first)
    # The same id with another event time is the same transaction, delivered again.
    publish(sync_redis, TransactionEvent("dup-1", "u1", "m1", 10.0, NOW - 1))
    c = consumer(client)
    await drain(c)
    publish(sync_redis, first)  # and once more, in a later batch
    await drain(c)
    user = stored(sync_redis, USER_FEATURES.key("u1"))
    assert (user["tx_count_1h"], user["tx_sum_1h"], user["tx_count_24h"]) == (2, 12.5, 2)
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m1"))["merchant_tx_count_24h"] == 2
    assert (c.totals.new, c.totals.duplicate, c.totals.read) == (2, 4, 6)
    assert pending(sync_redis) == 0


MALFORMED: list[tuple[dict[str, object], str]] = [
    ({"user_id": "u1", "merchant_id": "m1", "amount": "1", "event_ts": str(NOW)}, "tx_id: missing"),
    ({**tx("b1").fields(), "user_id": "u:1"}, "user_id: may hold only"),
    ({**tx("b2").fields(), "merchant_id": ""}, "merchant_id: must not be empty"),
    ({**tx("b3").fields(), "amount": "ten"}, "amount: 'ten' is not a number"),
    ({**tx("b4").fields(), "amount": "nan"}, "amount: 'nan' is not finite"),
    ({**tx("b5").fields(), "amount": "inf"}, "amount: 'inf' is not finite"),
    ({**tx("b6").fields(), "amount": "-3"}, "amount: -3.0 is outside"),
    ({**tx("b7").fields(), "event_ts": "-inf"}, "event_ts: '-inf' is not finite"),
    ({**tx("b8").fields(), "event_ts": str(NOW + 3600)}, "s ahead of the consumer's clock"),
    ({**tx("b9").fields(), "event_ts": "12"}, "event_ts: 12.0 is outside 2000-2100"),
    ({**tx("b10").fields(), "score": "2"}, "score: 2.0 is not a probability"),
    ({**tx("b11").fields(), "tx_id": b"\xff\xfe"}, "tx_id: not UTF-8"),
]


async def test_malformed_events_are_dead_lettered_with_a_reason(client, sync_redis) -> None:
    publish(sync_redis, tx("good-1", amount=1.0))
    for fields, _ in MALFORMED:
        publish(sync_redis, fields)
    publish(sync_redis, tx("good-2", amount=2.0))
    c = consumer(client, batch=5)
    await drain(c)
    assert stored(sync_redis, USER_FEATURES.key("u1"))["tx_count_1h"] == 2  # it kept going
    dead = sync_redis.xrange(DEAD)
    assert len(dead) == len(MALFORMED) == c.totals.dead
    originals = {entry_id: fields for entry_id, fields in sync_redis.xrange(STREAM)}
    for (_, record), (_fields, reason) in zip(dead, MALFORMED, strict=True):
        assert reason in record[b"_reason"].decode()
        assert record[b"_consumer"] == b"c1"
        original = originals[record[b"_entry_id"]]
        assert {k: v for k, v in record.items() if not k.startswith(b"_")} == original
    assert pending(sync_redis) == 0  # all acknowledged


async def test_an_event_on_a_key_of_another_type_is_dead_lettered(client, sync_redis) -> None:
    sync_redis.set(stream.user_activity_key("u-bad"), "not a sorted set")
    publish(sync_redis, tx("w1", user="u-bad"), tx("w2", user="u-ok"))
    c = consumer(client)
    await drain(c)
    (_, record), = sync_redis.xrange(DEAD)  # fmt: skip
    assert b"WRONGTYPE" in record[b"_reason"]
    assert record[b"tx_id"] == b"w1"
    assert stored(sync_redis, USER_FEATURES.key("u-ok"))["tx_count_1h"] == 1
    assert pending(sync_redis) == 0


async def test_an_event_whose_group_key_holds_another_type_is_dead_lettered(
    client, sync_redis
) -> None:
    # The scripts apply it, but its velocity row can never be written: dead-lettered,
    # while the rest of the batch is written and acknowledged (not retried for ever).
    sync_redis.set(USER_FEATURES.key("u-bad"), "not a hash")
    publish(sync_redis, tx("w1", user="u-bad"), tx("w2", user="u-ok"))
    c = consumer(client)
    await drain(c)
    (_, record), = sync_redis.xrange(DEAD)  # fmt: skip
    assert record[b"tx_id"] == b"w1"
    assert f"write: {USER_FEATURES.key('u-bad')} holds another type" in record[b"_reason"].decode()
    assert stored(sync_redis, USER_FEATURES.key("u-ok"))["tx_count_1h"] == 1
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m1"))["merchant_tx_count_24h"] == 2
    assert c.dead_totals["wrong_type"] == 1 and c.totals.failed == 0
    assert pending(sync_redis) == 0


def deliveries(sync_redis: redis.Redis, entry_id: bytes) -> int:
    (info,) = sync_redis.xpending_range(STREAM, GROUP, entry_id, entry_id, 1)
    return int(info["times_delivered"])


async def test_an_event_that_keeps_failing_is_dead_lettered_at_the_delivery_limit(
    client, sync_redis
) -> None:
    # The user's version counter holds no integer: its script's INCR fails on every try,
    # with an error that is not WRONGTYPE, so the event is delivered again each time.
    sync_redis.set(version_key("user", "u-poison"), "not a number")
    publish(sync_redis, tx("p1", user="u-poison", merchant="m-p"), tx("p2", user="u-ok"))
    c = consumer(client, max_deliveries=3)
    await c.ensure_group()
    failures = 0
    for _ in range(10):
        try:
            await c.step(block=False)
        except ScriptFailed as exc:
            assert "not an integer" in str(exc)
            failures += 1
            continue
        if not pending(sync_redis):
            break
    assert failures == 3  # delivered 3 times and tried; the 4th delivery dead-letters it
    (_, record), = sync_redis.xrange(DEAD)  # fmt: skip
    assert record[b"_reason"] == b"delivery_limit: delivered 4 times, at most 3"
    assert (record[b"tx_id"], record[b"_consumer"]) == (b"p1", b"c1")
    assert stored(sync_redis, USER_FEATURES.key("u-ok"))["tx_count_1h"] == 1  # applied at once
    assert not sync_redis.exists(USER_FEATURES.key("u-poison"))
    assert c.dead_totals == {"malformed": 0, "wrong_type": 0, "delivery_limit": 1}
    assert (c.totals.new, c.totals.dead, c.totals.failed) == (1, 1, 3)
    assert pending(sync_redis) == 0


async def test_claimed_entries_over_the_delivery_limit_are_dead_lettered(
    client, sync_redis
) -> None:
    # A consumer that crashed on these entries again and again (Redis counted each claim):
    # one of them is over the limit, the other is claimed and applied.
    publish(sync_redis, tx("c1", user="u-crash"), tx("c2", user="u-fine"))
    sync_redis.xgroup_create(STREAM, GROUP, id="0")
    ((_, read),) = sync_redis.xreadgroup(GROUP, "ghost", {STREAM: ">"})
    (crashed, _), (fine, _) = read
    sync_redis.xclaim(STREAM, GROUP, "ghost", 0, [crashed], retrycount=5)
    assert (deliveries(sync_redis, crashed), deliveries(sync_redis, fine)) == (5, 1)
    c = consumer(client, max_deliveries=5, claim_idle_s=0.2)
    await asyncio.sleep(0.3)
    await drain(c)
    (_, record), = sync_redis.xrange(DEAD)  # fmt: skip
    assert record[b"tx_id"] == b"c1" and record[b"_entry_id"] == crashed
    assert record[b"_reason"].startswith(b"delivery_limit: delivered 6 times")  # the claim: 6
    assert stored(sync_redis, USER_FEATURES.key("u-fine"))["tx_count_1h"] == 1
    assert not sync_redis.exists(USER_FEATURES.key("u-crash"))
    assert (c.totals.claimed, c.totals.new, c.totals.dead) == (2, 1, 1)
    assert pending(sync_redis) == 0


async def test_new_entries_cost_no_delivery_lookup(quiet_redis) -> None:
    quiet = open_redis(Settings(redis_url=quiet_redis.url, redis_socket_timeout_s=1.0))
    admin = redis.Redis.from_url(quiet_redis.url)
    try:
        admin.xadd(STREAM, tx("n1").fields())  # type: ignore[arg-type]
        c = consumer(quiet)
        await c.ensure_group()
        await c.step(block=False)  # its own pending entries at start: none
        admin.config_resetstat()
        admin.xadd(STREAM, tx("n2").fields())  # type: ignore[arg-type]
        assert await c.step(block=False) == 1
        calls = {k: v["calls"] for k, v in admin.info("commandstats").items()}
        assert "cmdstat_xpending" not in calls
        assert calls["cmdstat_xreadgroup"] == 1
    finally:
        admin.close()
        await quiet.aclose()


async def test_two_consumers_share_the_stream(client, sync_redis) -> None:
    users = [f"u{i}" for i in range(6)]
    publish(sync_redis, *(tx(f"{u}-{n}", user=u, amount=n) for n in range(10) for u in users))
    a, b = consumer(client, "a", batch=7), consumer(client, "b", batch=7)
    await drain(a, b)
    assert a.totals.read > 0 and b.totals.read > 0
    assert a.totals.read + b.totals.read == 60 == a.totals.new + b.totals.new
    for u in users:
        values = stored(sync_redis, USER_FEATURES.key(u))
        assert (values["tx_count_1h"], values["tx_sum_1h"]) == (10, 45.0)
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m1"))["merchant_tx_count_24h"] == 60


def consumer_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FEATURES_REDIS_URL": redis_url,
        "FEATURES_STREAM_BLOCK_MS": "100",
        "FEATURES_STREAM_REPORT_INTERVAL_S": "0.5",
        **extra,
    }


def wait_for(condition: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(POLL_S)


async def test_a_consumer_killed_mid_batch_is_reclaimed_without_double_counting(
    client, sync_redis, redis_url, tmp_path
) -> None:
    users = ["k1", "k2", "k3", "k4"]
    publish(sync_redis, *(tx(f"{u}-{n}", user=u, amount=n + 1) for n in range(5) for u in users))
    doomed = StreamConsumer(
        consumer_env(redis_url), ["--name", "doomed", "--die-after-append"], log=tmp_path / "log"
    ).start()
    assert doomed.process.wait(60) == -signal.SIGKILL, doomed.output()
    # It applied the batch to the logs, then died before writing or acknowledging it.
    assert sync_redis.xpending(STREAM, GROUP)["consumers"] == [{"name": b"doomed", "pending": 20}]
    assert sync_redis.zcard(stream.user_activity_key("k1")) == 5
    assert not sync_redis.exists(USER_FEATURES.key("k1"))
    heir = consumer(client, "heir", claim_idle_s=0.3)
    await heir.ensure_group()
    deadline = time.monotonic() + 30
    while pending(sync_redis) and time.monotonic() < deadline:
        await heir.step(block=False)
        await asyncio.sleep(POLL_S)
    assert pending(sync_redis) == 0
    assert (heir.totals.claimed, heir.totals.duplicate, heir.totals.new) == (20, 20, 0)
    for u in users:
        values = stored(sync_redis, USER_FEATURES.key(u))
        assert (values["tx_count_1h"], values["tx_sum_1h"]) == (5, 15.0)
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m1"))["merchant_tx_count_24h"] == 20


def test_sigterm_finishes_the_batch_and_leaves_the_group(sync_redis, redis_url, tmp_path) -> None:
    publish(sync_redis, tx("s1", user="s"), tx("s2", user="s", ago_s=1))
    proc = StreamConsumer(consumer_env(redis_url), ["--name", "polite"], log=tmp_path / "log")
    with proc:
        wait_for(lambda: sync_redis.exists(USER_FEATURES.key("s")) and not pending(sync_redis))
        wait_for(lambda: "read 2, new 2" in proc.output())  # the interval report
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(30) == 0
    assert stored(sync_redis, USER_FEATURES.key("s"))["tx_count_1h"] == 2
    assert sync_redis.xinfo_consumers(STREAM, GROUP) == []
    assert "stream consumer polite stopped: read 2, new 2" in proc.output()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FEATURES_STREAM_BATCH", "0"),
        ("FEATURES_STREAM_MAX_DELIVERIES", "0"),
        ("FEATURES_STREAM_MAX_DELIVERIES", "five"),
        ("FEATURES_STREAM_METRICS_PORT", "70000"),
    ],
)
def test_bad_settings_stop_the_consumer_naming_the_variable(
    redis_url, tmp_path, variable: str, value: str
) -> None:
    env = consumer_env(redis_url, **{variable: value})
    proc = StreamConsumer(env, log=tmp_path / "log").start()
    assert proc.process.wait(30) == 2
    assert variable in proc.output()


def test_a_metrics_port_in_use_stops_the_consumer_naming_it(redis_url, tmp_path) -> None:
    with RedisServer(quiet=True) as taken:  # something listening on the port
        env = consumer_env(redis_url, FEATURES_STREAM_METRICS_PORT=str(taken.port))
        proc = StreamConsumer(env, log=tmp_path / "log").start()
        assert proc.process.wait(30) == 2
    assert f"FEATURES_STREAM_METRICS_PORT/_ADDR 127.0.0.1:{taken.port}" in proc.output()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_consumer_serves_its_counts_to_prometheus(sync_redis, redis_url, tmp_path) -> None:
    # The service's multiprocess directory in the environment: the consumer must leave it be.
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    env = consumer_env(
        redis_url,
        FEATURES_STREAM_METRICS_PORT=str(port),
        FEATURES_STREAM_MAX_DELIVERIES="2",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    sync_redis.set(version_key("user", "u-stuck"), "x")  # its script fails on each delivery
    publish(
        sync_redis, tx("m1", user="mu"), tx("m1", user="mu"), tx("m2", user="mu", ago_s=2 * DAY_S)
    )
    publish(sync_redis, entry(tx("m3"), amount="nan"), tx("m4", user="u-stuck"))
    url = f"http://127.0.0.1:{port}/metrics"
    with StreamConsumer(env, ["--name", "metered"], log=tmp_path / "log") as proc:
        wait_for(lambda: sync_redis.xlen(DEAD) == 2 and not pending(sync_redis))

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            try:
                samples = scrape(url)
            except httpx.HTTPError:
                return None
            done = samples.get(
                ("features_stream_dead_letters_total", (("reason", "delivery_limit"),))
            )
            return samples if done == 1 else None

        wait_for(counted)
        samples = counted()
        assert samples is not None
        # Read once per report interval: it comes down to 0.
        wait_for(lambda: scrape(url).get(("features_stream_pending", ())) == 0)
        assert ("features_stream_lag", ()) not in samples  # Redis 6.2 does not tell it
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(30) == 0, proc.output()
    events = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "features_stream_events_total"
    }
    # m1 new and once more a duplicate, m2 late, m4 read at each of its 2 deliveries, then
    # once more and dead-lettered; m3 malformed.
    assert events == {"read": 7, "new": 1, "duplicate": 1, "late": 1, "claimed": 0}
    dead = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "features_stream_dead_letters_total"
    }
    assert dead == {"malformed": 1, "wrong_type": 0, "delivery_limit": 1}
    assert samples[("features_stream_failures_total", ())] == 4  # 2 events, 2 batches
    assert samples[("features_stream_backing_skipped_total", ())] == 0
    assert "ignoring PROMETHEUS_MULTIPROC_DIR" in proc.output()
    # What importing `features` wrote before the consumer re-executed: no gauge of its pid.
    assert not list(multiproc.glob("gauge_*")), sorted(p.name for p in multiproc.iterdir())


async def test_the_group_lag_is_read_where_redis_tells_it(client, sync_redis) -> None:
    publish(sync_redis, tx("l1"), tx("l2"), tx("l3"))
    c = consumer(client)
    await c.ensure_group()
    await c.watch_group()
    assert (c.lag, c.pending) == (None, 0)  # Redis 6.2: no lag in XINFO GROUPS
    with RedisServer(quiet=True, binary=find_tls_binary()) as seven:  # Debian's Redis 7
        seven_client = open_redis(Settings(redis_url=seven.url, redis_socket_timeout_s=1.0))
        admin = redis.Redis.from_url(seven.url)
        try:
            publish(admin, tx("l1"), tx("l2"), tx("l3"))
            c7 = consumer(seven_client, batch=2)
            await c7.ensure_group()
            await c7.watch_group()
            assert (c7.lag, c7.pending) == (3, 0)
            await c7.step(block=False)  # its own pending (none), then 2 new
            assert await c7.step(block=False) == 1
            await c7.watch_group()
            assert (c7.lag, c7.pending) == (0, 0)
            exported = generate_latest(consumer_registry(c7)).decode()
            assert "features_stream_lag 0.0" in exported
            assert 'features_stream_events_total{outcome="new"} 3.0' in exported
        finally:
            admin.close()
            await seven_client.aclose()


async def test_redis_down_is_survived_and_retried(sync_redis) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    down = open_redis(settings)  # no retries, a 0.1 s connect timeout
    c = consumer(down)
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop, report_interval_s=60))
    deadline = time.monotonic() + 10
    while c.totals.failed < 2 and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    stop.set()
    await asyncio.wait_for(task, 10)  # it stops within the backoff, having raised nothing
    await down.aclose()
    assert c.totals.failed >= 2


@pytest.fixture
async def dynamo_backing(dynalite: Dynalite) -> AsyncIterator[BackingStore]:
    store = dynamo_store(dynalite.url, timeout_s=5.0)
    await store.create_layout()
    yield store
    await store.aclose()


async def test_velocity_is_written_to_the_backing_store_first(
    client, sync_redis, dynamo_backing: BackingStore
) -> None:
    publish(sync_redis, *DAY)
    await drain(consumer(client, backing=dynamo_backing))
    user, merchant = await dynamo_backing.read([(USER_FEATURES, "u1"), (MERCHANT_VELOCITY, "m1")])
    assert user is not None and merchant is not None
    assert user.event_ts == NOW - 10 == merchant.event_ts
    assert user.fields == tuple(
        sync_redis.hget(USER_FEATURES.key("u1"), name) for name in USER_FEATURES.field_names
    )
    assert merchant.fields == (b"2",)


@pytest.fixture
def velocity_consumer(redis_url: str, tmp_path: Path) -> Iterator[StreamConsumer]:
    with StreamConsumer(consumer_env(redis_url), ["--name", "e2e"], log=tmp_path / "c.log") as c:
        yield c


def test_end_to_end_scored_transactions_become_velocity(
    service: Service, sync_redis, velocity_consumer: StreamConsumer
) -> None:
    user = f"new-{uuid.uuid4().hex[:8]}"
    amounts = [12.5, 30.25, 7.0]
    with httpx.Client(base_url=service.url, timeout=10) as http:
        first = http.post("/predict", json={"user_id": user, "merchant_id": "m1", "amount": 12.5})
        assert first.status_code == 200, first.text
        source = first.json()["sources"]["user:features"]
        assert (source["source"], source["reason"]) == ("default", "missing")  # no history
        for n, amount in enumerate(amounts[1:]):
            body = {"user_id": user, "merchant_id": "m1", "amount": amount,
                    "transaction_id": f"{user}-{n}"}  # fmt: skip
            assert http.post("/predict", json=body).status_code == 200
        bad = http.post(
            "/predict",
            json={"user_id": user, "merchant_id": "m1", "amount": 1, "transaction_id": "a|b"},
        )
        assert bad.status_code == 400 and "transaction_id" in bad.text
    key = USER_FEATURES.key(user)
    wait_for(lambda: sync_redis.hget(key, "tx_count_1h") == b"3", timeout_s=30)
    values = stored(sync_redis, key)
    assert values["tx_sum_1h"] == pytest.approx(sum(amounts))
    assert values["tx_count_24h"] == 3 and values["distinct_merchants_7d"] == 1
    ids = {f[b"tx_id"] for _, f in sync_redis.xrange(STREAM) if f[b"user_id"] == user.encode()}
    assert {f"{user}-0".encode(), f"{user}-1".encode()} < ids and len(ids) == 3


async def test_the_writer_takes_one_event_time_per_row(client, sync_redis) -> None:
    writer = FeatureWriter(client)
    rows = [("a", {"merchant_tx_count_24h": 1}), ("b", {"merchant_tx_count_24h": 2})]
    assert await writer.write(MERCHANT_VELOCITY, rows, event_ts=[NOW - 5, NOW]) == 2
    assert stored(sync_redis, MERCHANT_VELOCITY.key("a"))[EVENT_TS_FIELD] == NOW - 5
    assert stored(sync_redis, MERCHANT_VELOCITY.key("b"))[EVENT_TS_FIELD] == NOW
    with pytest.raises(ValueError, match="1 event times for 2 rows"):
        await writer.write(MERCHANT_VELOCITY, rows, event_ts=[NOW])
    with pytest.raises(ValueError, match="not a finite number"):
        await writer.write(MERCHANT_VELOCITY, rows, event_ts=[NOW, float("nan")])


async def test_the_consumer_runs_on_a_cluster() -> None:
    # Every key of one script call shares its entity's slot; the stream has a slot of its own.
    with LocalCluster(masters=3) as cluster:
        settings = Settings(
            redis_url=cluster.url,
            redis_mode="cluster",
            redis_nodes=cluster.nodes,
            redis_socket_timeout_s=2.0,
            redis_cluster_deadline_s=5.0,
        )
        client = open_redis(settings)
        admin = SyncRedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        try:
            users = [f"cu{i}" for i in range(8)]
            for n in range(3):
                for u in users:
                    event = tx(f"{u}-{n}", user=u, merchant=f"m-{u}", amount=n + 1)
                    admin.xadd(STREAM, entry(event))
            admin.xadd(STREAM, entry(tx("cu0-0", user="cu0")))
            admin.xadd(STREAM, entry(tx("bad"), amount="nan"))
            c = consumer(client, batch=10)
            await drain(c)
            for u in users:
                values = admin.hgetall(USER_FEATURES.key(u))
                assert (values[b"tx_count_1h"], values[b"tx_sum_1h"]) == (b"3", b"6.0")
                assert admin.hget(MERCHANT_VELOCITY.key(f"m-{u}"), "merchant_tx_count_24h") == b"3"
            assert (c.totals.new, c.totals.duplicate, c.totals.dead) == (24, 1, 1)
            assert admin.xlen(DEAD) == 1 and admin.xpending(STREAM, GROUP)["pending"] == 0
        finally:
            admin.close()
            await client.aclose()


async def test_of_two_consumers_racing_on_one_user_the_last_applied_stays(
    client, sync_redis
) -> None:
    # A applies t1 to the logs; before A writes, B applies t2 and writes; then A writes
    # its older aggregates, which the version keeps out.
    publish(sync_redis, tx("r1", amount=1.0, ago_s=5))
    b = consumer(client, "b")

    async def b_overtakes() -> None:
        publish(sync_redis, tx("r2", amount=2.0))
        await b.step(block=False)

    a = consumer(client, "a", after_append=b_overtakes)
    await a.ensure_group()
    await a.step(block=False)
    user = stored(sync_redis, USER_FEATURES.key("u1"))
    assert (user["tx_count_1h"], user["tx_sum_1h"], user[VERSION_FIELD]) == (2, 3.0, 2)
    assert user[EVENT_TS_FIELD] == NOW
    assert stored(sync_redis, MERCHANT_VELOCITY.key("m1"))["merchant_tx_count_24h"] == 2
    assert pending(sync_redis) == 0


async def test_a_versioned_write_never_puts_an_older_version_back(client, sync_redis) -> None:
    writer = FeatureWriter(client)
    key = MERCHANT_VELOCITY.key("v")

    async def write(count: int, version: int) -> int:
        rows = [("v", {"merchant_tx_count_24h": count})]
        return await writer.write(MERCHANT_VELOCITY, rows, event_ts=NOW, versions=[version])

    assert await write(5, 5) == 1
    assert await write(4, 4) == 0 and await write(9, 5) == 0  # not above the stored one
    assert stored(sync_redis, key)["merchant_tx_count_24h"] == 5
    assert await write(6, 6) == 1
    assert stored(sync_redis, key) == {
        "merchant_tx_count_24h": 6,
        EVENT_TS_FIELD: NOW,
        VERSION_FIELD: 6,
    }
    assert MERCHANT_VELOCITY.ttl_s - 60 < sync_redis.ttl(key) <= MERCHANT_VELOCITY.ttl_s


async def test_of_two_racing_consumers_the_backing_store_keeps_the_last_applied(
    client, sync_redis, dynamo_backing: BackingStore
) -> None:
    publish(sync_redis, tx("r1", amount=1.0, ago_s=5))
    b = consumer(client, "b", backing=dynamo_backing)

    async def b_overtakes() -> None:
        publish(sync_redis, tx("r2", amount=2.0))
        await b.step(block=False)

    a = consumer(client, "a", backing=dynamo_backing, after_append=b_overtakes)
    await a.ensure_group()
    await a.step(block=False)
    user, merchant = await dynamo_backing.read([(USER_FEATURES, "u1"), (MERCHANT_VELOCITY, "m1")])
    assert user is not None and merchant is not None
    by_name = {
        n: float(v or b"nan") for n, v in zip(USER_FEATURES.field_names, user.fields, strict=True)
    }
    assert (by_name["tx_count_1h"], by_name["tx_sum_1h"], user.event_ts) == (2, 3.0, NOW)
    assert merchant.fields == (b"2",)
    assert (a.totals.older, b.totals.older) == (2, 0)  # a's user and merchant rows
    assert pending(sync_redis) == 0


async def test_a_backing_store_outage_uses_up_no_deliveries(
    client, sync_redis, dynalite: Dynalite
) -> None:
    store = dynamo_store(dynalite.url, timeout_s=0.3)
    await store.create_layout()
    c = consumer(client, backing=store, max_deliveries=1)
    await c.ensure_group()
    await c.step(block=False)  # its own pending entries at start: none
    publish(sync_redis, tx("o1", user="u-out"))
    dynalite.pause()
    try:
        for _ in range(3):  # each retry applies the batch in hand: no new delivery
            with pytest.raises(FeatureWriteError, match="backing store"):
                await c.step(block=False)
        ((entry_id, _),) = sync_redis.xrange(STREAM)
        assert deliveries(sync_redis, entry_id) == 1
    finally:
        dynalite.resume()
    assert await c.step(block=False) == 1
    assert stored(sync_redis, USER_FEATURES.key("u-out"))["tx_count_1h"] == 1
    assert not sync_redis.exists(DEAD) and pending(sync_redis) == 0
    await store.aclose()
