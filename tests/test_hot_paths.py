"""The hot-path shortcuts give exactly what the general paths give."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel
from redis.exceptions import ResponseError

from features import (
    GROUPS,
    STORED_FEATURES,
    USER_PROFILE,
    FeatureStore,
    GroupRead,
    Reason,
    Source,
)
from features.errors import InvalidEntityId
from features.ondemand import model_inputs
from features.online.codec import GroupCodec, codec_for
from features.online.keys import RowKeys, key_of
from features.online.multiplex import pack
from serving.schemas import GroupSource, Prediction, Score, Timings, built, group_source

COLUMN = {f.name: i for i, f in enumerate(STORED_FEATURES)}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the array path's int64 overflow
def test_one_row_inputs_equal_the_array_path() -> None:
    rng = np.random.default_rng(4)
    edge_logins = [0.0, -5.0, 1.7e9, 1.8e9]
    edge_averages = [0.0, 5e-324, -3.0, 40.0]
    for i in range(3000):
        stored = rng.normal(0, 1, (1, len(STORED_FEATURES))) * 10.0 ** rng.integers(-3, 10)
        stored[0, COLUMN["last_login_ts"]] = edge_logins[i % 4] + rng.integers(0, 10**6)
        stored[0, COLUMN["avg_tx_90d"]] = edge_averages[i // 4 % 4]
        amount = np.array([[0.0, -0.0, 1e9, rng.lognormal(3, 2)][i % 4]])
        ts = np.array([[9.5e8, 1.76e9 + rng.uniform(0, 1e7), 4.1e9, 1e19][i // 16 % 4]])
        one = model_inputs(stored, amount, ts)
        # Two identical rows take the array path.
        both = model_inputs(np.vstack([stored, stored]), np.repeat(amount, 2), np.repeat(ts, 2))
        assert one.dtype == np.float32 and one.shape == (1, both.shape[1])
        np.testing.assert_array_equal(one[0], both[0])


@pytest.mark.parametrize(
    ("raw", "expected", "reason"),
    [(b"1_000", 1000.0, None), (b" 7 ", 7.0, None), (b"7.0", 7.0, None),
     (b"3.4028235677973366e38", 0.0, Reason.INVALID), (b"-1e39", 0.0, Reason.INVALID)],
)  # fmt: skip
async def test_decoding_follows_float_parsing(client, sync_redis, raw, expected, reason) -> None:
    sync_redis.hset("user:{u1}:features", mapping={"tx_count_1h": raw, "tx_sum_1h": b"2.5"})
    rows = await FeatureStore(client).read([{"user": "u1", "merchant": "m1"}])
    assert rows.values[0, COLUMN["tx_count_1h"]] == expected
    assert rows.values[0, COLUMN["tx_sum_1h"]] == 2.5
    assert rows.reads[0]["user:features"].source is Source.REDIS


async def test_float32_limit_is_kept_for_float_features(client, sync_redis) -> None:
    sync_redis.hset("user:{u1}:features", mapping={"tx_sum_1h": b"3.4028235e38"})
    rows = await FeatureStore(client).read([{"user": "u1", "merchant": "m1"}])
    assert rows.values[0, COLUMN["tx_sum_1h"]] == 3.4028235e38
    assert np.isfinite(rows.values.astype(np.float32)).all()


async def test_empty_request_reads_nothing(client) -> None:
    rows = await FeatureStore(client).read([])
    assert rows.values.shape == (0, len(STORED_FEATURES)) and rows.reads == []


async def test_batch_decoding_equals_one_by_one(client, sync_redis) -> None:
    for group in GROUPS:
        complete = {f.name: 1 for f in group.features}
        for i in range(30):
            entity_id = f"u{i}" if group.entity == "user" else f"m{i}"
            sync_redis.hset(group.key(entity_id), mapping=complete)
    sync_redis.hset("user:{u3}:features", "tx_count_1h", b"1.5")  # not whole
    sync_redis.hset("user:{u4}:features", "tx_sum_1h", b"nan")
    sync_redis.hset("user:{u5}:profile", "is_premium", b"2")
    sync_redis.hset("merchant:{m6}:risk", "avg_ticket_30d", b"1e39")  # inf as float32
    sync_redis.hdel("user:{u7}:profile", "avg_tx_90d")  # one absent field
    sync_redis.delete("merchant:{m8}:risk")  # absent key
    sync_redis.set("user:{u9}:features", "not a hash")
    sync_redis.hset("user:{u10}:features", "tx_sum_24h", b"abc")
    rows = [{"user": f"u{i}", "merchant": f"m{i}"} for i in range(30)]
    batch = await FeatureStore(client).read(rows)
    for i, row in enumerate(rows):
        alone = await FeatureStore(client).read([row])
        np.testing.assert_array_equal(batch.values[i], alone.values[0])
        for name, read in alone.reads[0].items():
            assert batch.reads[i][name] == read, (i, name)
    assert batch.reads[3]["user:features"].defaulted == ("tx_count_1h",)
    assert batch.reads[8]["merchant:risk"].reason is Reason.MISSING


def test_built_response_models_equal_validated_ones() -> None:
    reads = [
        GroupRead(Source.REDIS),
        GroupRead(Source.CACHE, ("tx_count_1h",), Reason.DEADLINE, stale=True),
        GroupRead(Source.DEFAULT, ("a", "b"), Reason.UNAVAILABLE),
    ]
    timings = {"features_ms": 0.5, "inference_ms": 0.125, "total_ms": 0.625}
    sources = {f"g{i}": group_source(read) for i, read in enumerate(reads)}
    for read, part in zip(reads, sources.values(), strict=True):
        validated = GroupSource(
            source=read.source, defaulted=list(read.defaulted), reason=read.reason, stale=read.stale
        )
        assert part == validated and part.model_dump_json() == validated.model_dump_json()
    score = {"fraud_probability": 0.25, "sources": sources}
    cases: list[tuple[type[BaseModel], dict[str, Any]]] = [
        (Timings, timings),
        (Score, score),
        (Prediction, {**score, "timings": built(Timings, timings)}),
    ]
    for model, values in cases:
        fast, slow = built(model, dict(values)), model.model_validate(values)
        assert fast == slow
        assert fast.model_dump_json() == slow.model_dump_json()
        assert fast.model_fields_set == slow.model_fields_set


def test_group_source_is_built_once_per_read_and_never_for_another() -> None:
    read = GroupRead(Source.BACKING, ("x",), Reason.MISSING)
    assert group_source(read) is group_source(read)
    twin = GroupRead(Source.BACKING, ("x",), Reason.MISSING)  # equal, not the same object
    assert group_source(twin) == group_source(read)
    # Reads that come and go (ids may be reused) each get their own part.
    for i in range(5000):
        fleeting = GroupRead(Source.DEFAULT, (f"f{i}",), Reason.INVALID)
        assert group_source(fleeting).defaulted == [f"f{i}"]


@pytest.mark.parametrize("user, merchant", [("u1", "m1"), ("A.b-c_9", "0"), ("u" * 64, "m.x")])
def test_row_key_ids_are_the_ids_of_their_keys(user: str, merchant: str) -> None:
    row_keys = RowKeys(GROUPS)
    ids = row_keys.ids({"user": user, "merchant": merchant, "extra": "ignored"})
    assert ids == {"user": user, "merchant": merchant}
    key_ids = row_keys.key_ids(ids)
    keys = [row_keys.key(column, ids) for column in range(len(GROUPS))]
    assert key_ids == [key.id for key in keys]
    for group, key in zip(GROUPS, keys, strict=True):
        member = ids[group.member] if group.member else ""
        assert key == key_of(group, ids[group.entity], member)
        assert key.id.startswith(group.key(ids[group.entity]))
    assert len(set(key_ids)) == len(GROUPS)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"merchant": "m1"}, "user_id: is required"),
        ({"user": "u1"}, "merchant_id: is required"),
        ({"user": "u1#m", "merchant": "m1"}, "user_id"),
        ({"user": "u1", "merchant": ""}, "merchant_id: must not be empty"),
        ({"user": 7, "merchant": "m1"}, "user_id: must be a string"),
    ],
)
def test_row_keys_name_the_field_of_an_unfit_id(row: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidEntityId, match=message):
        RowKeys(GROUPS).ids(row)


@pytest.mark.parametrize("user, merchant", [("u1", "m1"), ("A.b-c_9", "0")])
def test_each_group_packs_its_commands_as_hiredis_does(user: str, merchant: str) -> None:
    row_keys, now = RowKeys(GROUPS), 1_790_000_000.125
    ids = row_keys.ids({"user": user, "merchant": merchant})
    for column, group in enumerate(GROUPS):
        codec, key = codec_for(group), row_keys.key(column, ids)
        commands = codec.commands(key, now)
        assert codec.pack(key, now) == b"".join(pack(*c) for c in commands), group.name
        assert len(commands) == codec.n_replies


def test_one_reply_answers_as_in_a_batch() -> None:
    codec, now = GroupCodec(USER_PROFILE), 1_700_000_100.0
    width = len(USER_PROFILE.features)  # the fields, then the event time
    good = [b"1"] * width + [b"1700000000.5"]
    replies: list[Any] = [
        good,
        [None] * (width + 1),  # absent
        [b"x", *good[1:]],  # unparsable: that field's default
        [*good[:-1], None],  # no event time
        [*good[:-1], b"1000.0"],  # stale
        ResponseError("WRONGTYPE"),
    ]
    # Twice over: past the size from which found replies are parsed as one array.
    batch = codec.answer(replies * 2, now)
    for reply, in_batch in zip(replies * 2, batch, strict=True):
        (alone,) = codec.answer([reply], now)
        if isinstance(in_batch, tuple):
            assert isinstance(alone, tuple)
            assert alone[0].tolist() == in_batch[0].tolist()
            assert codec.reads[alone[1]] == codec.reads[in_batch[1]]
            assert alone[2] == in_batch[2] or (np.isnan(alone[2]) and np.isnan(in_batch[2]))
        else:
            assert alone == in_batch
