"""`python -m features.offline.sizing` against a real redis-server."""

from __future__ import annotations

from features import USER_FEATURES


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
