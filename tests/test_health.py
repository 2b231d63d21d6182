"""Feature health metrics against a real redis-server (and the backing-store emulators):
groups served by source, features served as defaults, corrupt values, the age of what is
served, from Redis, the cache and the backing store."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence

import pytest
import redis
from prometheus_client import REGISTRY

from features import GROUPS, MERCHANT_RISK, USER_PROFILE, FeatureStore, FeatureWriter, metrics
from features.backing import BackingStore
from features.connection import Client
from features.online.cache import EntryCache
from features.online.codec import GroupCodec, codec_for
from features.online.entry import Reason, Source
from features.online.health import HealthTally
from features.online.keys import Key
from features.online.tier import Answer
from features.spec import FeatureGroup
from tests.conftest import FakeClock
from tests.test_backing import T0, backing, emulator  # noqa: F401 (the emulators' fixtures)

USER = {f.name: 1.0 for f in USER_PROFILE.features}
MERCHANT = {"mcc_risk_score": 0.25, "chargeback_rate_90d": 0.01, "refund_rate_30d": 0.02}
ABSENT = [n for n in MERCHANT_RISK.field_names if n not in MERCHANT]  # no field, no value
U, M = USER_PROFILE.qualified_name, MERCHANT_RISK.qualified_name


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Metrics:
    """The health series' values when made, and how much each has grown since."""

    def __init__(self) -> None:
        self.before = self.now()

    @staticmethod
    def now() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        names = {
            "features_served_total",
            "features_feature_defaults_total",
            "features_corrupt_values_total",
            "features_served_age_seconds_bucket",
            "features_served_age_seconds_count",
            "features_served_age_seconds_sum",
            "features_defaults_total",
            "features_stale_total",
            "features_cache_lookups_total",
        }
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in REGISTRY.collect()
            for s in family.samples
            if s.name in names
        }

    def grown(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.now().get(key, 0.0) - self.before.get(key, 0.0)

    def changed(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        now = self.now()
        return {k: v - self.before.get(k, 0.0) for k, v in now.items() if v != self.before.get(k)}


def tx(user: str, merchant: str) -> dict[str, str]:
    return {"user": user, "merchant": merchant}


def store_for(
    client: Client, wall: FakeClock, flush_s: float = 0.0, **kwargs: object
) -> FeatureStore:
    # The cache runs on a timer of its own that never moves: entries stay fresh. One
    # group per entity is all the tallies need.
    kwargs.setdefault("groups", (USER_PROFILE, MERCHANT_RISK))
    return FeatureStore(
        client,
        clock=wall,
        timer=FakeClock(),
        health_flush_s=flush_s,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_defaults_per_feature_the_denominator_corrupt_values_and_ages(
    client: Client, sync_redis: redis.Redis, clock: FakeClock
) -> None:
    writer = FeatureWriter(client)
    await writer.write(USER_PROFILE, [("ok", USER)], event_ts=clock.now - 100)
    await writer.write(USER_PROFILE, [("bad", USER)], event_ts=clock.now - 200)
    # A whole number that is not, and a flag that is not 0 or 1: corrupt, served as defaults.
    sync_redis.hset(USER_PROFILE.key("bad"), mapping={"account_age_days": "1.5", "is_premium": "7"})
    await writer.write(MERCHANT_RISK, [("m1", MERCHANT)], event_ts=clock.now - 7200)
    store = store_for(client, clock)
    seen = Metrics()
    rows = await store.read([tx("ok", "m1"), tx("bad", "m1"), tx("nobody", "m1")])
    assert rows.reads[1][U].defaulted == ("account_age_days", "is_premium")

    assert seen.grown("features_served_total", group=U, source="redis") == 2
    assert seen.grown("features_served_total", group=U, source="default") == 1
    assert seen.grown("features_served_total", group=M, source="redis") == 3  # per row
    # Per group, once per defaulted read (what features_defaults_total always counted).
    assert seen.grown("features_defaults_total", group=U, reason="invalid") == 1
    assert seen.grown("features_defaults_total", group=U, reason="missing") == 1
    assert seen.grown("features_defaults_total", group=M, reason="invalid") == 3
    for feature in ("account_age_days", "is_premium"):
        labels = {"group": U, "feature": feature}
        assert seen.grown("features_feature_defaults_total", **labels, reason="invalid") == 1
        assert seen.grown("features_corrupt_values_total", **labels) == 1
    for feature in USER_PROFILE.field_names:  # the unknown user: every feature
        labels = {"group": U, "feature": feature, "reason": "missing"}
        assert seen.grown("features_feature_defaults_total", **labels) == 1
    for feature in ABSENT:  # absent fields: defaults, but no stored value was corrupt
        labels = {"group": M, "feature": feature}
        assert seen.grown("features_feature_defaults_total", **labels, reason="invalid") == 3
        assert seen.grown("features_corrupt_values_total", **labels) == 0
    # Defaults have no event time: two user ages (100 s, 200 s), three merchant ones.
    assert seen.grown("features_served_age_seconds_count", group=U) == 2
    assert seen.grown("features_served_age_seconds_sum", group=U) == 300
    assert seen.grown("features_served_age_seconds_bucket", group=U, le="60.0") == 0
    assert seen.grown("features_served_age_seconds_bucket", group=U, le="300.0") == 2
    assert seen.grown("features_served_age_seconds_count", group=M) == 3
    assert seen.grown("features_served_age_seconds_sum", group=M) == 3 * 7200
    assert seen.grown("features_served_age_seconds_bucket", group=M, le="3600.0") == 0
    assert seen.grown("features_served_age_seconds_bucket", group=M, le="7200.0") == 3

    # From the cache, 30 s later on the wall clock: the same values, 30 s older.
    clock.tick(30)
    seen = Metrics()
    rows = await store.read([tx("ok", "m1"), tx("nobody", "m1")])
    assert {read.source for read in rows.reads[0].values()} == {Source.CACHE}
    assert seen.grown("features_served_total", group=U, source="cache") == 1
    assert seen.grown("features_served_total", group=U, source="default") == 1
    assert seen.grown("features_served_total", group=M, source="cache") == 2
    assert seen.grown("features_served_age_seconds_count", group=U) == 1
    assert seen.grown("features_served_age_seconds_sum", group=U) == 130
    assert seen.grown("features_served_age_seconds_sum", group=M) == 2 * 7230
    # A cache hit of a defaulted read counts its defaults again, and no corrupt value.
    labels = {"group": U, "feature": "account_age_days"}
    assert seen.grown("features_feature_defaults_total", **labels, reason="missing") == 1
    assert seen.grown("features_corrupt_values_total", **labels) == 0
    await store.aclose()


async def test_an_event_time_ahead_of_the_clock_is_age_zero(
    client: Client, clock: FakeClock
) -> None:
    await FeatureWriter(client).write(USER_PROFILE, [("ahead", USER)], event_ts=clock.now + 50)
    store = store_for(client, clock)
    seen = Metrics()
    await store.read([tx("ahead", "nobody")])
    assert seen.grown("features_served_age_seconds_count", group=U) == 1
    assert seen.grown("features_served_age_seconds_sum", group=U) == 0
    assert seen.grown("features_served_age_seconds_bucket", group=U, le="1.0") == 1
    await store.aclose()


async def test_tallies_are_written_once_an_interval_and_on_close(
    client: Client, clock: FakeClock
) -> None:
    await FeatureWriter(client).write(USER_PROFILE, [("u1", USER)], event_ts=clock.now - 10)
    store = store_for(client, clock, flush_s=1.0)
    seen = Metrics()
    await store.read([tx("u1", "m1")])
    assert not seen.changed()  # tallied, not written yet
    clock.tick(1.0)
    await store.read([tx("u1", "m1")])
    assert seen.grown("features_served_total", group=U, source="redis") == 1
    assert seen.grown("features_served_total", group=U, source="cache") == 1
    assert seen.grown("features_served_age_seconds_sum", group=U) == 10 + 11
    # The cache's lookups go with them: two keys missed, then found (an absent one too).
    assert seen.grown("features_cache_lookups_total", result="miss") == 2
    assert seen.grown("features_cache_lookups_total", result="hit") == 2
    await store.read([tx("u1", "m1")])
    assert seen.grown("features_served_total", group=U, source="cache") == 1
    assert seen.grown("features_cache_lookups_total", result="hit") == 2
    await store.aclose()
    assert seen.grown("features_served_total", group=U, source="cache") == 2
    assert seen.grown("features_cache_lookups_total", result="hit") == 4
    assert seen.grown("features_served_total", group=M, source="default") == 3


async def test_a_full_log_is_written_whatever_the_interval(
    client: Client, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("features.online.store.MAX_PENDING", 4)  # rows x groups
    store = store_for(client, clock, flush_s=3600.0)
    seen = Metrics()
    await store.read([tx("nobody", "m1")])
    assert not seen.changed()
    await store.read([tx("nobody", "m1")])  # 4 logged: written now
    assert seen.grown("features_served_total", group=U, source="default") == 2
    assert seen.grown("features_served_total", group=M, source="default") == 2
    await store.aclose()


async def test_a_failed_metrics_write_is_logged_and_the_read_still_answers(
    client: Client, clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    def broken(self: HealthTally) -> None:
        raise OSError("no space left for the metrics file")

    monkeypatch.setattr(HealthTally, "flush", broken)
    store = store_for(client, clock)
    with caplog.at_level(logging.ERROR, logger="features.online.store"):
        rows = await store.read([tx("u1", "m1")])
    assert rows.values.shape == (1, len(USER_PROFILE.features) + len(MERCHANT_RISK.features))
    assert "feature health metrics write failed (OSError" in caplog.text
    await store.aclose()


async def test_values_from_the_backing_store_are_counted_and_aged(
    backing: BackingStore,  # noqa: F811 (the fixture imported above)
    client: Client,
    sync_redis: redis.Redis,
    clock: FakeClock,
) -> None:
    clock.now = T0  # not the fake clock's 1970: the Bigtable emulator sweeps such cells
    writer = FeatureWriter(client, backing)
    await writer.write(USER_PROFILE, [("u1", USER)], event_ts=clock.now - 40)
    sync_redis.flushall()  # Redis lost it: the store of record still has it
    store = store_for(client, clock, backing=backing, backing_timeout_s=2.0)
    seen = Metrics()
    rows = await store.read([tx("u1", "nobody")])
    assert rows.reads[0][U].source is Source.BACKING
    assert seen.grown("features_served_total", group=U, source="backing") == 1
    assert seen.grown("features_served_age_seconds_sum", group=U) == 40
    assert seen.grown("features_served_total", group=M, source="default") == 1
    labels = {"group": M, "feature": "avg_ticket_30d", "reason": "missing"}
    assert seen.grown("features_feature_defaults_total", **labels) == 1
    await store.aclose()


class HeldTier:
    """An in-memory tier: user u1 with an event time, merchants missing; while `held` is
    set it answers nothing until released (the deadline passes first)."""

    name = "held"

    def __init__(self, event_ts: float) -> None:
        self.event_ts = event_ts
        self.held: asyncio.Event | None = None

    def carries(self, group: FeatureGroup) -> bool:
        return True

    async def open(self) -> None:
        pass

    async def read(self, keys: Sequence[Key], deadline: float) -> list[Answer]:
        if self.held is not None:
            await self.held.wait()
        user = codec_for(USER_PROFILE)
        stored = [b"1"] * len(USER_PROFILE.features)
        return [
            user.decode_values(stored, self.event_ts, self.event_ts, Source.REDIS)
            if key.group is USER_PROFILE
            else codec_for(key.group).missing
            for key in keys
        ]

    async def aclose(self) -> None:
        pass


async def test_the_deadline_fallback_is_aged_from_the_cached_event_time(clock: FakeClock) -> None:
    tier = HeldTier(event_ts=clock.now - 100)
    timer = FakeClock()
    store = FeatureStore(
        tiers=[tier], deadline_s=0.01, timer=timer, clock=clock, health_flush_s=0.0
    )
    await store.read([tx("u1", "m1")])
    timer.tick(10)  # past the cache's 5 s: the next read asks the tier again
    clock.tick(60)
    tier.held = asyncio.Event()
    seen = Metrics()
    rows = await store.read([tx("u1", "m1")])
    assert {r.reason for r in rows.reads[0].values()} == {Reason.DEADLINE}
    assert seen.grown("features_served_total", group=U, source="cache") == 1
    assert seen.grown("features_served_age_seconds_sum", group=U) == 160
    # The merchant's last read was its defaults: served again, counted with reason deadline.
    assert seen.grown("features_served_total", group=M, source="cache") == 1
    assert seen.grown("features_served_age_seconds_count", group=M) == 0
    labels = {"group": M, "feature": "mcc_risk_score", "reason": "deadline"}
    assert seen.grown("features_feature_defaults_total", **labels) == 1
    tier.held.set()
    await store.aclose()


def test_entries_with_their_event_time_stay_untracked_by_the_collector() -> None:
    codec = codec_for(USER_PROFILE)
    assert isinstance(codec, GroupCodec)
    reply: list[bytes | None] = [*([b"1"] * len(USER_PROFILE.features)), b"1700000000.5"]
    entry = codec.decode(reply, 1.7e9)
    assert entry[2] == 1700000000.5
    cache = EntryCache(maxsize=1, ttl_s=5.0, keep_s=5.0)
    cache.put("k", entry, now=1.0)
    cached = cache.fresh("k", 1.0)
    gc.collect()  # a tuple of untracked objects is untracked after the pass that sees it
    assert not gc.is_tracked(entry) and not gc.is_tracked(cached)
    assert not gc.is_tracked(codec.missing)


def test_label_sets_and_buckets_come_from_the_spec(client: Client) -> None:
    FeatureStore(client)  # binds every child of the spec's groups
    fields = {g.qualified_name: set(g.field_names) for g in GROUPS}
    for family in REGISTRY.collect():
        if family.name not in {
            "features_served",
            "features_feature_defaults",
            "features_served_age_seconds",
            "features_freshness_window_seconds",
        }:
            continue
        for s in family.samples:
            name = s.labels["group"]
            if name not in fields:
                continue  # a group some other test built its store with
            assert "feature" not in s.labels or s.labels["feature"] in fields[name], s
            assert "reason" not in s.labels or s.labels["reason"] in set(Reason), s
            assert "source" not in s.labels or s.labels["source"] in set(Source), s
    for group in GROUPS:
        assert group.freshness_s in metrics.AGE_BUCKETS_S
        window = sample("features_freshness_window_seconds", group=group.qualified_name)
        assert window == group.freshness_s
        # Every (feature, reason) series exists at 0 before any default: rates read 0.
        assert (
            REGISTRY.get_sample_value(
                "features_feature_defaults_total",
                {
                    "group": group.qualified_name,
                    "feature": group.field_names[0],
                    "reason": "deadline",
                },
            )
            is not None
        )
