"""The bench's floor client (load_tests/floor.py) against a real redis-server: the replies
it measures are the ones redis-py gets for the same commands, in one write, in order."""

from __future__ import annotations

import time

import redis

from features import GROUPS, HASH_GROUPS, FeatureWriter
from features.connection import Client
from features.online.codec import codec_for
from features.online.keys import RowKeys
from load_tests import bench_tail, stats
from load_tests.floor import FloorClient
from tests.conftest import entity_features, write_entities, write_structures


async def test_every_group_s_commands_get_redis_py_s_replies(
    client: Client, sync_redis: redis.Redis
) -> None:
    writer = FeatureWriter(client)
    await write_entities(writer, "user", [("u1", {f.name: 1.0 for f in entity_features("user")})])
    await write_structures(client, ["u1"], ["m1"])
    row_keys, now = RowKeys(GROUPS), time.time()
    ids = row_keys.ids({"user": "u1", "merchant": "m1"})
    commands = [
        command
        for column, group in enumerate(GROUPS)
        for command in codec_for(group).commands(row_keys.key(column, ids), now)
    ]
    assert {c[0] for c in commands} >= {"HMGET", "GET", "ZCARD"}
    port = sync_redis.connection_pool.connection_kwargs["port"]
    floor = await FloorClient.connect("127.0.0.1", port)
    try:
        replies = await floor.execute(commands)
        # The hash groups' commands alone, as (a) sends them, give the same replies.
        hmgets = [(c[1], c[2:]) for c in commands if c[0] == "HMGET"]
        assert len(hmgets) == len(HASH_GROUPS)
        assert await floor.hmget(hmgets) == [
            r for c, r in zip(commands, replies, strict=True) if c[0] == "HMGET"
        ]
    finally:
        floor.close()
    expected = [sync_redis.execute_command(*c) for c in commands]  # type: ignore[no-untyped-call]
    assert [_plain(r) for r in replies] == [_plain(r) for r in expected]
    assert any(r not in (None, [None] * len(r or [])) for r in replies)  # some values found


def _plain(reply: object) -> object:
    """hiredis and redis-py give scores in their own types: compare as floats."""
    if isinstance(reply, bytes | str):
        try:
            return float(reply)
        except ValueError:
            return reply
    if isinstance(reply, list):
        return [_plain(r) for r in reply]
    return reply


def test_the_tail_table_shows_both_baselines() -> None:
    client = stats.tail_summary([1.0, 2.0, 3.0])
    side = {"client_ms": client, "non_200": 0, "late": 0, "features_ms": client, "gc": {}}
    tail = {
        "rate": 250,
        "seconds": 1,
        "trivial": side,
        "predict": side,
        "store_alone_ms": stats.tail_summary([0.5, 0.7]),
        "floor_alone_ms": stats.tail_summary([0.25, 0.375]),
    }
    lines = bench_tail.table_lines({"tail": tail})
    assert any(line.startswith("| baseline: the store alone") and "0.700" in line for line in lines)
    assert any(line.startswith("| floor:") and "0.375" in line for line in lines)
