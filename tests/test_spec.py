"""Feature definitions, ids, settings, on-demand features: no I/O."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import AliasChoices
from pydantic.fields import FieldInfo

import features
from features import spec
from features.errors import InvalidEntityId
from features.ondemand import model_inputs, on_demand
from features.settings import Settings


def test_public_names_are_pinned() -> None:
    assert sorted(features.__all__) == sorted(
        [
            "ENTITY_ID_MAX_LEN", "ENTITY_ID_PATTERN", "GROUPS", "MERCHANT_RISK",
            "MERCHANT_VELOCITY", "MODEL_FEATURES", "STORED_FEATURES", "USER_FEATURES",
            "USER_PROFILE", "CircuitBreaker", "Dtype",
            "Feature",
            "FeatureError", "FeatureGroup", "FeatureRows", "FeatureStore",
            "FeatureWriteError", "FeatureWriter", "GroupRead",
            "InvalidEntityId", "Key", "Reason", "Settings", "Source", "Tier", "describe_skew",
            "fingerprint", "model_inputs", "open_redis", "redact_url", "schema",
            "validate_entity_id",
            "BackingStore", "BackingStoreError", "Record", "open_backing",
            "ENTITY_TYPES", "open_store", "TRACING",
            "HASH_GROUPS", "MERCHANT_EMBEDDING", "USER_ACTIVITY", "USER_MERCHANTS", "Kind",
        ]
    )  # fmt: skip


def test_keys_and_ttls_follow_the_groups() -> None:
    assert spec.USER_FEATURES.key("u12345") == "user:{u12345}:features"
    assert spec.MERCHANT_RISK.key("m1") == "merchant:{m1}:risk"
    for group in spec.GROUPS:
        # A sorted set lives as long as its history: it expires when its newest entry
        # would be trimmed.
        expected = group.retention_s if group.retention_s else 2 * group.freshness_s
        assert group.ttl_s == expected
        assert group.defaults.dtype == np.float64
        assert not group.defaults.flags.writeable
    assert spec.USER_ACTIVITY.key("u1") == "user:{u1}:activity"
    assert spec.USER_MERCHANTS.key("u1") == "user:{u1}:merchants"
    assert spec.MERCHANT_EMBEDDING.key("m1") == "merchant:{m1}:embedding"
    assert spec.USER_ACTIVITY.ttl_s == 86400 and spec.USER_MERCHANTS.ttl_s == 30 * 86400


def test_structures_are_groups_with_a_kind() -> None:
    kinds = {g.qualified_name: g.kind for g in spec.GROUPS}
    assert kinds["user:activity"] is spec.Kind.RECENT_COUNT
    assert kinds["user:merchants"] is spec.Kind.MEMBER_SCORE
    assert kinds["merchant:embedding"] is spec.Kind.EMBEDDING
    assert spec.USER_MERCHANTS.member == "merchant" and spec.USER_ACTIVITY.window_s == 600
    assert spec.MERCHANT_EMBEDDING.dim == spec.MERCHANT_EMBEDDING_DIM == 8
    assert spec.MERCHANT_EMBEDDING.field_names == tuple(f"merchant_emb_{i}" for i in range(8))
    assert [g.persisted for g in spec.GROUPS] == [
        g.kind in ("hash", "embedding") for g in spec.GROUPS
    ]
    assert tuple(g for g in spec.GROUPS if g.kind is spec.Kind.HASH) == spec.HASH_GROUPS
    names = [f.name for f in spec.MODEL_FEATURES]
    new = ["tx_count_10m", "seconds_since_paid_merchant", "is_new_merchant_30d"]
    assert set(new) | set(spec.MERCHANT_EMBEDDING.field_names) <= set(names)
    assert "merchant_last_paid_ts" not in names  # a raw time, like last_login_ts


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": spec.Kind.RECENT_COUNT, "retention_s": 60},  # no window
        {"kind": spec.Kind.MEMBER_SCORE, "retention_s": 60},  # no member
        {"kind": spec.Kind.RECENT_COUNT, "window_s": 60},  # no retention
        {"window_s": 60},  # a hash with a window
        {"kind": spec.Kind.EMBEDDING, "retention_s": 60},
    ],
)
def test_a_group_its_kind_cannot_read_is_refused(bad: dict[str, object]) -> None:
    feature = spec.Feature("x", spec.Dtype.INT, 0)
    with pytest.raises(ValueError, match="x:y"):
        spec.FeatureGroup("x", "y", 60, (feature,), **bad)  # type: ignore[arg-type]


def test_user_groups_hold_the_seed_features() -> None:
    # Velocity (rewritten per transaction) apart from the daily profile: each group is
    # written whole by one producer.
    assert spec.USER_FEATURES.field_names == (
        "tx_count_1h", "tx_sum_1h", "tx_count_24h", "tx_sum_24h", "distinct_merchants_7d",
    )  # fmt: skip
    assert spec.USER_PROFILE.field_names == (
        "account_age_days", "avg_tx_90d", "credit_score_bucket", "is_premium", "last_login_ts",
    )  # fmt: skip
    assert (
        dict(zip(spec.USER_PROFILE.field_names, spec.USER_PROFILE.defaults, strict=True))[
            "credit_score_bucket"
        ]
        == 2
    )


def test_model_features_are_unique_and_exclude_raw_timestamps() -> None:
    names = [f.name for f in spec.MODEL_FEATURES]
    assert len(names) == len(set(names))
    assert "last_login_ts" not in names
    assert {"amount", "seconds_since_last_login", "hour_of_day"} <= set(names)


@pytest.mark.parametrize("good", ["u1", "U_12-3.x", "a" * 64, "0"])
def test_valid_entity_ids_pass(good: str) -> None:
    assert spec.validate_entity_id("user_id", good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "*", "u1:features", "u:1", "{u1}", "u 1", "u\r\nFLUSHALL", "u\x00", "a" * 65,
     "é", "ü1", "-u", ".u", "u1*", None, 12, b"u1"],
)  # fmt: skip
def test_hostile_entity_ids_are_rejected_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidEntityId) as info:
        spec.validate_entity_id("merchant_id", bad)
    assert info.value.field == "merchant_id"
    assert str(info.value).startswith("merchant_id: ")


def test_fingerprint_changes_with_any_default() -> None:
    base = spec.fingerprint()
    assert base == spec.fingerprint()
    changed = tuple(
        dataclasses.replace(f, default=f.default + 1) if f.name == "credit_score_bucket" else f
        for f in spec.MODEL_FEATURES
    )
    assert spec.fingerprint(changed) != base


def test_describe_skew_names_each_difference() -> None:
    trained = spec.schema()
    assert spec.describe_skew(trained) == []
    trained[0] = {**trained[0], "default": 99.0}
    trained.append({"name": "retired", "dtype": "float32", "default": 0.0})
    diffs = spec.describe_skew(trained)
    assert any("default of 'tx_count_1h'" in d and "99.0" in d for d in diffs)
    assert any("'retired' is in the model but not in features/" in d for d in diffs)
    swapped = spec.schema()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert spec.describe_skew(swapped) == ["feature order differs"]


def _stored(**values: float) -> np.ndarray:
    row = np.array([f.default for f in spec.STORED_FEATURES], dtype=np.float64)
    for name, value in values.items():
        row[[f.name for f in spec.STORED_FEATURES].index(name)] = value
    return row[None, :]


def test_on_demand_features_from_request_and_stored_values() -> None:
    saturday_1430_utc = 1_764_945_000.0  # 2025-12-05 is a Friday; +1 day below
    ts = np.array([saturday_1430_utc + 86400])
    stored = _stored(last_login_ts=saturday_1430_utc, avg_tx_90d=40.0)
    since, hour, weekend, ratio, since_paid, new = on_demand(stored, np.array([100.0]), ts)[0]
    assert since == 86400
    assert hour == time.gmtime(ts[0]).tm_hour
    assert weekend == (time.gmtime(ts[0]).tm_wday >= 5) == 1
    assert ratio == pytest.approx(2.5)
    assert (since_paid, new) == (2_592_000.0, 1.0)  # never paid this merchant: new


@pytest.mark.parametrize(
    ("ago_s", "since", "new"),
    [(3600.0, 3600.0, 0.0), (29 * 86400.0, 29 * 86400.0, 0.0), (40 * 86400.0, 2_592_000.0, 1.0),
     (-60.0, 0.0, 0.0)],  # a score ahead of the request's time: clock skew, just paid
)  # fmt: skip
def test_seconds_since_paid_merchant_and_new_merchant(
    ago_s: float, since: float, new: float
) -> None:
    ts = 1_764_945_000.0
    stored = _stored(merchant_last_paid_ts=ts - ago_s)
    names = [f.name for f in spec.MODEL_FEATURES]
    for x in (
        model_inputs(stored, np.array([10.0]), np.array([ts])),  # the one-row path
        model_inputs(np.vstack([stored, stored]), np.array([10.0, 10.0]), np.array([ts, ts])),
    ):
        assert x[0, names.index("seconds_since_paid_merchant")] == since
        assert x[0, names.index("is_new_merchant_30d")] == new


def test_on_demand_defaults_when_stored_inputs_are_defaults() -> None:
    since, _, _, ratio, since_paid, new = on_demand(
        _stored(), np.array([100.0]), np.array([1.7e9])
    )[0]
    defaults = {f.name: f.default for f in spec.ON_DEMAND_FEATURES}
    assert since == defaults["seconds_since_last_login"]
    assert ratio == defaults["amount_to_avg_ratio"]
    assert since_paid == defaults["seconds_since_paid_merchant"]
    assert new == defaults["is_new_merchant_30d"]


def test_model_inputs_follow_model_order() -> None:
    stored = _stored(tx_count_1h=3, mcc_risk_score=0.7)
    x = model_inputs(stored, np.array([12.5]), np.array([1.7e9]))
    assert x.shape == (1, len(spec.MODEL_FEATURES)) and x.dtype == np.float32
    names = [f.name for f in spec.MODEL_FEATURES]
    assert x[0, names.index("tx_count_1h")] == 3
    assert x[0, names.index("mcc_risk_score")] == pytest.approx(0.7)
    assert x[0, names.index("amount")] == 12.5


def test_settings_from_env_parses_and_names_bad_keys() -> None:
    s = Settings.from_env(
        {"FEATURES_CACHE_TTL_S": "2.5", "FEATURES_MAX_BATCH": "10", "REDIS_URL": "redis://h:1/0"}
    )
    assert (s.cache_ttl_s, s.max_batch, s.redis_url) == (2.5, 10, "redis://h:1/0")
    limits = Settings.from_env(
        {"FEATURES_MAX_BODY_BYTES": "1024", "FEATURES_MAX_ID_LENGTH": "12",
         "FEATURES_BREAKER_FAILURES": "2", "FEATURES_BREAKER_RESET_S": "0.5"}
    )  # fmt: skip
    assert (limits.max_body_bytes, limits.max_id_length) == (1024, 12)
    assert (limits.breaker_failures, limits.breaker_reset_s) == (2, 0.5)
    assert Settings.from_env({"FEATURES_REDIS_URL": "redis://a/0", "REDIS_URL": "x"}).redis_url == (
        "redis://a/0"
    )
    assert Settings.from_env({}) == Settings()
    for env, key in [
        ({"FEATURES_MAX_BATCH": "ten"}, "FEATURES_MAX_BATCH"),
        ({"FEATURES_CACHE_TTL_S": "nan"}, "FEATURES_CACHE_TTL_S"),
        ({"FEATURES_REDIS_SOCKET_TIMEOUT_S": "0"}, "FEATURES_REDIS_SOCKET_TIMEOUT_S"),
        ({"FEATURES_BREAKER_FAILURES": "0"}, "FEATURES_BREAKER_FAILURES"),
        ({"FEATURES_MAX_BODY_BYTES": "-1"}, "FEATURES_MAX_BODY_BYTES"),
        ({"FEATURES_MAX_ID_LENGTH": "65"}, "FEATURES_MAX_ID_LENGTH"),
    ]:
        with pytest.raises(ValueError, match=key):
            Settings.from_env(env)


def test_features_imports_neither_bentoml_nor_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, features, features.offline.load, features.servedlog.columns, "
        "features.servedlog.files, features.skew.__main__; "
        "print({'bentoml', 'torch'} & set(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


def test_readme_settings_table_is_the_settings_class() -> None:
    # One row per field, in the class's order, with its variable, default and description;
    # no FEATURES_ row without a field. On a mismatch the diff shows the rows to paste.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = [line for line in readme.splitlines() if line.startswith("| `FEATURES_")]
    assert documented == [settings_row(f) for f in Settings.model_fields.values()]


def settings_row(field: FieldInfo) -> str:
    alias = field.validation_alias
    first, *others = alias.choices if isinstance(alias, AliasChoices) else [alias]
    variable = f"`{first}`" + "".join(f" (or `{other}`)" for other in others)
    default = f"`{field.default}`" if field.default != "" else ""
    return f"| {variable} | {default} | {field.description} |"


def test_settings_read_only_the_environment_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURES_DEADLINE_S", "0.5")
    monkeypatch.setenv("features_cache_ttl_s", "1")  # names are case-sensitive, as before
    assert Settings().deadline_s == Settings.from_env({}).deadline_s == 0.015
    assert Settings.from_env().deadline_s == 0.5
    assert Settings.from_env().cache_ttl_s == 5.0
    assert Settings.from_env({"FEATURES_DEADLINE_S": "0.02"}).for_bulk().deadline_s == 0.02


def test_settings_errors_never_echo_a_password() -> None:
    env = {"FEATURES_REDIS_URL": "redis://:hunter2@h:1/0", "FEATURES_REDIS_PASSWORD": "hunter3"}
    with pytest.raises(ValueError, match="a password is in") as info:
        Settings.from_env(env)
    assert "hunter" not in str(info.value)
    with pytest.raises(ValueError, match="FEATURES_REDIS_URL must start with") as info:
        Settings().for_bulk("http://:hunter2@h:1/0")
    assert "hunter" not in str(info.value)
