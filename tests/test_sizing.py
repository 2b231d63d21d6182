"""`python -m features.offline.sizing` against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from features import MERCHANT_RISK, USER_FEATURES, FeatureWriteError, FeatureWriter, open_redis
from tests.conftest import command_calls


def test_sizing_measures_stored_keys_and_applies_the_rules(redis_url, sync_redis, capsys) -> None:
    from features.offline.sizing import GroupSize, main, report

    assert main(["--redis-url", redis_url, "--sample", "20", "--reads", "50"]) == 0
    assert sync_redis.dbsize() == 0  # probe keys were deleted
    out = capsys.readouterr().out
    assert "20 probe keys" in out and "Provision" in out and "MAX_CONNECTIONS=" in out

    sizes = [GroupSize(USER_FEATURES, 10, 200.0, "stored keys")]
    text = report(sizes, {"user": 10_000_000}, 20_000, 0.001, 2, 0.0, 25.0)
    assert "Data 2.000 GB x 1.3 overhead = 2.600 GB" in text  # the design's own example
    assert "Provision 3.71-4.33 GB" in text  # 2.6 GB filling 70%..60%
    assert "= 30.0 connections" in text and "MAX_CONNECTIONS=15 per worker" in text


def test_sizing_deletes_probe_keys_when_writing_them_fails(redis_url, sync_redis) -> None:
    from features.offline.sizing import main

    used = int(sync_redis.info("memory")["used_memory"])
    sync_redis.config_set("maxmemory", used + 100_000)  # room for some probe keys, not all
    sync_redis.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(FeatureWriteError):
            main(["--redis-url", redis_url, "--sample", "2000", "--latency-ms", "1"])
    finally:
        sync_redis.config_set("maxmemory", 0)
    assert command_calls(sync_redis, "hset") > 0  # some were written before Redis filled up
    assert sync_redis.dbsize() == 0


@pytest.mark.parametrize("stored", [False, True], ids=["probe-keys", "stored-keys"])
def test_sizing_times_reads_of_keys_that_exist(redis_url, settings, sync_redis, stored) -> None:
    from features.offline.sizing import main

    async def seed() -> None:
        client = open_redis(settings)
        writer = FeatureWriter(client)
        await writer.write(USER_FEATURES, [(f"u{i}", {"tx_count_1h": i}) for i in range(5)])
        await writer.write(MERCHANT_RISK, [("m1", {"mcc_risk_score": 0.5})])
        await client.aclose()

    if stored:
        asyncio.run(seed())
    sync_redis.config_resetstat()
    assert main(["--redis-url", redis_url, "--sample", "20", "--reads", "50"]) == 0
    stats = sync_redis.info("stats")
    assert stats["keyspace_misses"] == 0  # every timed HMGET found its key
    assert stats["keyspace_hits"] >= 50 * 2  # one HMGET per group per read
    assert sync_redis.dbsize() == (6 if stored else 0)
