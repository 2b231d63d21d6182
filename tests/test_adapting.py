"""Adapting the bundle: a spec of this test's own, the project's groups plus one for a new
entity type, goes through the writer, the loader and the read path (Redis, then each
backing store) with no code that knows the new group."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import redis

from features import GROUPS, Dtype, Feature, FeatureGroup, FeatureStore, FeatureWriter, Settings
from features.backing import open_backing
from features.connection import Client
from features.errors import InvalidEntityId
from features.offline import demo
from features.offline.load import file_rows, load
from features.online import Reason, Source
from tools.emulators import Dynalite

DEVICE = FeatureGroup(
    entity="device",
    name="signals",
    freshness_s=600,
    features=(
        Feature("cards_seen_24h", Dtype.INT, 0, "distinct cards used on the device, 24 h"),
        Feature("emulator_score", Dtype.FLOAT, 0.5, "likelihood the device is an emulator"),
        Feature("is_rooted", Dtype.BOOL, 0, "rooted or jailbroken"),
    ),
)
SPEC = (*GROUPS, DEVICE)
SIGNALS = {"cards_seen_24h": 3.0, "emulator_score": 0.9, "is_rooted": 1.0}


def row(device: str) -> dict[str, str]:
    return {"user": "u1", "merchant": "m1", "device": device}


def device_values(values: npt.NDArray[np.float64]) -> list[float]:
    """The new group's columns: the last of the row, in the spec's order."""
    return [float(v) for v in values[-len(DEVICE.features) :]]


async def test_an_extra_group_is_written_and_read(client: Client, sync_redis: redis.Redis) -> None:
    await FeatureWriter(client).write(DEVICE, [("d1", SIGNALS)])
    assert sync_redis.hget("device:{d1}:signals", "emulator_score") == b"0.9"
    assert 0 < sync_redis.ttl("device:{d1}:signals") <= DEVICE.ttl_s

    store = FeatureStore(client, groups=SPEC)
    rows = await store.read([row("d1"), row("d2")])
    assert rows.values.shape == (2, sum(len(g.features) for g in SPEC))
    assert device_values(rows.values[0]) == list(SIGNALS.values())
    assert device_values(rows.values[1]) == DEVICE.defaults.tolist()
    found, unknown = (r[DEVICE.qualified_name] for r in rows.reads)
    assert (found.source, found.reason, found.stale) == (Source.REDIS, None, False)
    assert (unknown.source, unknown.reason) == (Source.DEFAULT, Reason.MISSING)
    with pytest.raises(InvalidEntityId, match="device_id"):
        await store.read([{"user": "u1", "merchant": "m1"}])


def test_the_demo_data_names_the_generator_a_new_group_lacks() -> None:
    with pytest.raises(ValueError, match="no demo generator for device:signals"):
        demo.generate(DEVICE, 1, np.random.default_rng(0), 1.7e9)


def signals_csv(tmp_path: Path) -> Path:
    path = tmp_path / "devices.csv"
    path.write_text("entity_id,cards_seen_24h,is_rooted\nd1,3,1\nd2,7,0\n")
    return path  # no emulator_score column: it keeps its stored value or default


async def test_an_extra_group_is_loaded_from_a_file(
    settings: Settings, client: Client, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    await load(settings, [(DEVICE, file_rows(DEVICE, signals_csv(tmp_path)))])
    rows = await FeatureStore(client, groups=SPEC).read([row("d1"), row("d2")])
    assert [device_values(v) for v in rows.values] == [[3.0, 0.5, 1.0], [7.0, 0.5, 0.0]]
    assert {r[DEVICE.qualified_name].source for r in rows.reads} == {Source.REDIS}


@pytest.mark.parametrize("kind", ["dynamodb", "bigtable"])
async def test_an_extra_group_is_loaded_into_and_read_from_a_backing_store(
    kind: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    client: Client,
    sync_redis: redis.Redis,
    tmp_path: Path,
) -> None:
    table = f"adapt-{uuid.uuid4().hex[:12]}"
    if kind == "dynamodb":
        dynalite: Dynalite = request.getfixturevalue("dynalite")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # dynalite checks a signature, not whose
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        options = {"dynamodb_table": table, "dynamodb_endpoint_url": dynalite.url}
    else:
        request.getfixturevalue("bigtable_emulator")  # sets BIGTABLE_EMULATOR_HOST
        options = {"bigtable_project": "test", "bigtable_instance": "inst", "bigtable_table": table}
    with_backing = Settings(**settings.model_dump() | options | {"backing_store": kind})

    jobs = [(DEVICE, file_rows(DEVICE, signals_csv(tmp_path)))]
    await load(with_backing, jobs, create=True, groups=SPEC)
    sync_redis.flushall()  # what is read now comes from the backing store

    backing = open_backing(with_backing, SPEC)
    assert backing is not None
    store = FeatureStore(client, groups=SPEC, backing=backing, backing_timeout_s=2.0)
    try:
        rows = await store.read([row("d1"), row("d2")])
    finally:
        await store.aclose()  # and the backing store
    assert [device_values(v) for v in rows.values] == [[3.0, 0.5, 1.0], [7.0, 0.5, 0.0]]
    assert {r[DEVICE.qualified_name].source for r in rows.reads} == {Source.BACKING}
