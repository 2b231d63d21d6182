"""The served-feature log's writer on a real directory: sampling, rolling files, the
bounded queue, failures and a clean close."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from features import GROUPS, MODEL_FEATURES, GroupRead, Reason, Settings, Source
from features.servedlog import ROW_GROUP_ROWS, ServedLog, check_directory
from features.servedlog.columns import arrow_schema, group_column
from features.servedlog.files import RollingParquet, closed_files

N = len(MODEL_FEATURES)
READS = {
    GROUPS[0].qualified_name: GroupRead(Source.REDIS, ("tx_count_24h",), Reason.INVALID, False),
    **{g.qualified_name: GroupRead(Source.DEFAULT, (), Reason.MISSING, True) for g in GROUPS[1:]},
}
POLL_S = 0.01


def records_metric(result: str) -> float:
    return REGISTRY.get_sample_value("features_served_log_records_total", {"result": result}) or 0.0


def make_log(directory: Path, **overrides: object) -> ServedLog:
    options: dict[str, object] = {
        "sample_rate": 1.0,
        "directory": directory,
        "queue_size": 1000,
        "roll_rows": 1000,
        "roll_s": 600.0,
        "model_tag": "fraud_mlp:test",
        "fingerprint": "f" * 16,
    } | overrides
    return ServedLog(**options)  # type: ignore[arg-type]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "served"


@pytest.fixture
def opened() -> Iterator[list[ServedLog]]:
    """Logs a test starts; each is closed after it, whatever the test did."""
    logs: list[ServedLog] = []
    yield logs
    for log in logs:
        log.close()


def offer(log: ServedLog, n: int, first: int = 0, request_id: str | None = None) -> None:
    """One request of `n` transactions, numbered from `first`, each sampled by the log."""
    x = np.arange(first * N, (first + n) * N, dtype=np.float32).reshape(n, N)
    ids = [{"user": f"u{first + i}", "merchant": f"m{first + i}"} for i in range(n)]
    scores = [(first + i) / 1e4 for i in range(n)]
    log.offer(log.sample(n), request_id, ids, [1.7e9 + i for i in range(n)], x, [READS] * n, scores)


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(POLL_S)


def read_all(directory: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in closed_files(directory)])


def test_sampling_draws_once_per_transaction_and_not_at_all_when_off(log_dir: Path) -> None:
    draws = iter([0.1, 0.9, 0.2, 0.8, 0.3])
    drawn: list[float] = []

    def rand() -> float:
        drawn.append(next(draws))
        return drawn[-1]

    assert make_log(log_dir, sample_rate=0.0, rand=rand).sample(5) == ()
    assert drawn == []
    half = make_log(log_dir, sample_rate=0.5, rand=rand)
    assert half.sample(1) == (0,)
    assert list(half.sample(4)) == [1, 3]  # 0.9, 0.2, 0.8, 0.3
    assert len(drawn) == 5
    assert list(make_log(log_dir, sample_rate=1.0).sample(3)) == [0, 1, 2]


def test_files_roll_at_roll_rows_and_hold_every_record(
    log_dir: Path, opened: list[ServedLog]
) -> None:
    written = records_metric("written")
    log = make_log(log_dir, roll_rows=5)
    opened.append(log)
    log.start()
    offer(log, 1, first=0, request_id="00000000000000aa")
    offer(log, 11, first=1)
    assert log.close()
    paths = closed_files(log_dir)
    assert [pq.read_metadata(p).num_rows for p in paths] == [5, 5, 2]
    assert len({p.name for p in paths}) == 3
    assert not list(log_dir.glob(".*"))  # no temporary file left
    assert all(pq.read_schema(p).equals(arrow_schema()) for p in paths)
    table = read_all(log_dir)
    assert table.column("user_id").to_pylist() == [f"u{i}" for i in range(12)]
    assert table.column("merchant_id").to_pylist()[3] == "m3"
    assert table.column("position").to_pylist() == [0, *range(11)]
    ids = table.column("request_id").to_pylist()
    assert ids[0] == "00000000000000aa"
    assert len(set(ids[1:])) == 1 and len(ids[1]) == 16  # one drawn id for the request
    assert table.column("score").to_pylist()[7] == pytest.approx(7e-4)
    assert table.column(MODEL_FEATURES[2].name).to_pylist()[1] == float(1 * N + 2)
    assert table.column(group_column(GROUPS[0], "source")).to_pylist()[0] == "redis"
    assert table.column(group_column(GROUPS[0], "defaulted")).to_pylist()[0] == ["tx_count_24h"]
    assert table.column(group_column(GROUPS[1], "reason")).to_pylist()[0] == "missing"
    assert table.column(group_column(GROUPS[1], "stale")).to_pylist()[0] is True
    assert set(table.column("model_tag").to_pylist()) == {"fraud_mlp:test"}
    assert records_metric("written") - written == 12


def test_a_file_closes_roll_s_after_its_first_record(
    log_dir: Path, opened: list[ServedLog]
) -> None:
    log = make_log(log_dir, roll_s=0.05)
    opened.append(log)
    log.start()
    offer(log, 3)
    wait_until(lambda: len(closed_files(log_dir)) == 1)  # while the log stays open
    assert pq.read_metadata(closed_files(log_dir)[0]).num_rows == 3
    offer(log, 2, first=3)
    wait_until(lambda: len(closed_files(log_dir)) == 2)
    assert read_all(log_dir).column("user_id").to_pylist() == ["u0", "u1", "u2", "u3", "u4"]


def test_an_open_file_is_hidden_from_readers(log_dir: Path, opened: list[ServedLog]) -> None:
    log = make_log(log_dir, queue_size=2 * ROW_GROUP_ROWS, roll_rows=10 * ROW_GROUP_ROWS)
    opened.append(log)
    log.start()
    offer(log, ROW_GROUP_ROWS)  # a full row group: written at once, the file stays open
    wait_until(lambda: bool(list(log_dir.glob(".served-*.parquet.tmp"))))
    assert closed_files(log_dir) == []
    assert log.close()
    assert [pq.read_metadata(p).num_rows for p in closed_files(log_dir)] == [ROW_GROUP_ROWS]
    assert not list(log_dir.glob(".*"))


class BlockedSink(RollingParquet):
    """Rolling files whose writes wait for `release`: a writer thread stuck on its disk."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, arrow_schema(), roll_rows=1)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, table: pa.Table) -> None:
        self.entered.set()
        assert self.release.wait(30)
        super().write(table)


def test_a_full_queue_drops_and_counts_and_the_request_side_never_waits(
    log_dir: Path, opened: list[ServedLog]
) -> None:
    dropped = records_metric("dropped")
    log = make_log(log_dir, queue_size=3, roll_rows=1)
    opened.append(log)
    sink = BlockedSink(log_dir)
    log.start(sink)
    offer(log, 1)
    assert sink.entered.wait(30)  # the writer holds that record, blocked in its write
    offer(log, 5, first=1)  # 3 fit in the queue; had this waited, the test would hang
    assert log.dropped == 2
    assert records_metric("dropped") - dropped == 2
    sink.release.set()
    assert log.close()
    assert read_all(log_dir).column("user_id").to_pylist() == ["u0", "u1", "u2", "u3"]


def test_after_close_records_are_dropped_and_counted(
    log_dir: Path, opened: list[ServedLog]
) -> None:
    log = make_log(log_dir)
    opened.append(log)
    log.start()
    offer(log, 2)
    assert log.close()
    offer(log, 3, first=2)
    assert log.dropped == 3
    assert read_all(log_dir).num_rows == 2
    assert log.close()  # twice is harmless


def test_a_failed_write_is_counted_and_the_writer_goes_on(
    log_dir: Path, opened: list[ServedLog]
) -> None:
    failed = records_metric("failed")
    log = make_log(log_dir, roll_rows=2)
    opened.append(log)
    log.start()
    shutil.rmtree(log_dir)  # the next file cannot be created
    offer(log, 2)
    wait_until(lambda: records_metric("failed") - failed == 2)
    log_dir.mkdir()
    offer(log, 2, first=2)
    assert log.close()
    assert read_all(log_dir).column("user_id").to_pylist() == ["u2", "u3"]


def test_a_bad_record_never_raises_into_the_request(log_dir: Path) -> None:
    failed = records_metric("failed")
    log = make_log(log_dir)
    x = np.zeros((1, N), dtype=np.float32)
    # Two positions picked, one transaction given: both counted, nothing queued.
    log.offer([0, 1], None, [{"user": "u", "merchant": "m"}], [1.7e9], x, [READS], [0.5])
    assert records_metric("failed") - failed == 2
    log.offer([0], None, [{"user": "u", "merchant": "m"}], [1.7e9], x[:, :3], [READS], [0.5])
    assert records_metric("failed") - failed == 3  # inputs of the wrong width
    log.offer([0], None, [{"user": "u", "merchant": "m"}], [1.7e9], x, [READS], [0.5])
    log.start()
    assert log.close()
    assert read_all(log_dir).column("user_id").to_pylist() == ["u"]


def test_a_sample_rate_of_zero_starts_nothing(log_dir: Path) -> None:
    log = make_log(log_dir, sample_rate=0.0)
    log.start()
    assert not log_dir.exists()
    assert log.close()


def test_bad_settings_name_their_variable(tmp_path: Path) -> None:
    for rate in ("1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match="FEATURES_SERVED_LOG_SAMPLE_RATE"):
            Settings.from_env(
                {"FEATURES_SERVED_LOG_SAMPLE_RATE": rate, "FEATURES_SERVED_LOG_DIR": "x"}
            )
    with pytest.raises(ValueError, match="FEATURES_SERVED_LOG_DIR must be set"):
        Settings.from_env({"FEATURES_SERVED_LOG_SAMPLE_RATE": "0.5"})
    for name in ("QUEUE_SIZE", "ROLL_ROWS", "ROLL_S"):
        with pytest.raises(ValueError, match=f"FEATURES_SERVED_LOG_{name}"):
            Settings.from_env({f"FEATURES_SERVED_LOG_{name}": "0"})
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="FEATURES_SERVED_LOG_DIR"):
        check_directory(str(tmp_path / "a-file" / "log"))
