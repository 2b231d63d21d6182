"""The skew report: PSI on known distributions, training statistics, and the real
`python -m features.skew` on logs written by the real writer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from features import GROUPS, MODEL_FEATURES, GroupRead, Source
from features.servedlog import ServedLog
from features.skew import report, served, stats
from features.skew.psi import psi

ROOT = Path(__file__).resolve().parent.parent
N = len(MODEL_FEATURES)
FINGERPRINT = "0123456789abcdef"
READS = {g.qualified_name: GroupRead(Source.REDIS) for g in GROUPS}
AMOUNT = [f.name for f in MODEL_FEATURES].index("amount")
IS_PREMIUM = [f.name for f in MODEL_FEATURES].index("is_premium")

Matrix = npt.NDArray[np.float32]


def inputs(rng: np.random.Generator, rows: int, amount_scale: float = 1.0) -> Matrix:
    """Model inputs of a made-up population: lognormal values, a bool, defaults mixed in."""
    x = rng.lognormal(3.0, 1.0, (rows, N))
    x[:, IS_PREMIUM] = rng.random(rows) < 0.3
    x[:, AMOUNT] *= amount_scale
    defaults = np.array([f.default for f in MODEL_FEATURES])
    missing = rng.random((rows, N)) < 0.08
    return np.where(missing, defaults, x).astype(np.float32)


def model_dir(tmp_path: Path, x: Matrix) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    stats.save(stats.training_stats(x, FINGERPRINT), directory / stats.STATS_FILE)
    return directory


def write_log(directory: Path, x: Matrix, fingerprint: str = FINGERPRINT) -> None:
    """`x` through the real served-log writer, one request per row."""
    log = ServedLog(
        sample_rate=1.0,
        directory=directory,
        queue_size=len(x) + 1,
        roll_rows=max(len(x) // 3, 1),
        roll_s=600.0,
        model_tag="fraud_mlp:test",
        fingerprint=fingerprint,
    )
    log.start()
    for i in range(len(x)):
        log.offer((0,), None, [{"user": f"u{i}", "merchant": "m"}], [1.7e9], x[i : i + 1],
                  [READS], [0.5])  # fmt: skip
    assert log.close(60)


def skew_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "features.skew", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # callers check the exit code
    )


def test_psi_of_known_distributions() -> None:
    assert psi([0.25, 0.25, 0.5], [0.25, 0.25, 0.5]) == pytest.approx(0.0, abs=1e-12)
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * np.log(2) + 0.25 * np.log(1.5))
    assert psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) > 5  # mass moved into a bin training left empty
    with pytest.raises(ValueError, match="bins"):
        psi([1.0], [0.5, 0.5])


def test_training_stats_bin_at_quantiles_and_survive_a_round_trip(tmp_path: Path) -> None:
    x = inputs(np.random.default_rng(1), 20_000)
    trained = stats.training_stats(x, FINGERPRINT)
    assert [f.name for f in trained.features] == [f.name for f in MODEL_FEATURES]
    amount = trained.features[AMOUNT]
    assert len(amount.edges) == stats.N_BINS - 1
    assert sum(amount.proportions) == pytest.approx(1.0)
    # 8% set to the default (0.0): all in the first bin, with a decile of the rest.
    assert amount.default_rate == pytest.approx(0.08, abs=0.01)
    premium = trained.features[IS_PREMIUM]
    assert premium.edges == (0.0, 1.0)  # a bool is two bins, whatever the quantiles
    assert premium.proportions[2] == 0.0
    stats.save(trained, tmp_path / stats.STATS_FILE)
    assert stats.load(tmp_path) == trained
    with pytest.raises(ValueError, match="matrix"):
        stats.training_stats(x[:, :3], FINGERPRINT)


def test_served_rows_like_training_score_low_and_shifted_ones_high(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    trained = stats.training_stats(inputs(rng, 20_000), FINGERPRINT)
    write_log(tmp_path / "same", inputs(rng, 3000))
    write_log(tmp_path / "shifted", inputs(rng, 3000, amount_scale=5.0))
    same = report.compare(trained, served.served_counts(tmp_path / "same", trained))
    assert max(r.psi for r in same) < 0.05
    shifted = report.compare(trained, served.served_counts(tmp_path / "shifted", trained))
    assert shifted[0].name == "amount"
    assert shifted[0].psi > 1.0
    assert shifted[1].psi < 0.05
    assert shifted[0].served_default_rate == pytest.approx(0.08, abs=0.02)


def test_rows_of_other_features_are_left_out_and_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    trained = stats.training_stats(inputs(rng, 5000), FINGERPRINT)
    write_log(tmp_path / "log", inputs(rng, 30))
    write_log(tmp_path / "log", inputs(rng, 20), fingerprint="another")
    counts = served.served_counts(tmp_path / "log", trained)
    assert counts.rows == 30
    assert counts.other_fingerprints == {"another": 20}


def test_cli_exits_0_below_the_threshold_1_past_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = model_dir(tmp_path, inputs(rng, 20_000))
    write_log(tmp_path / "same", inputs(rng, 1000))
    write_log(tmp_path / "shifted", inputs(rng, 1000, amount_scale=5.0))

    ok = skew_cli("--log", tmp_path / "same", "--model", model)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].split() == ["feature", "psi", "default:", "trained", "served"]
    assert {line.split()[0] for line in lines[1 : N + 1]} == {f.name for f in MODEL_FEATURES}
    assert "1000 served rows in 4 files" in ok.stdout  # 333 rows a file
    assert "0 inputs past PSI 0.2" in ok.stdout

    png = tmp_path / "worst.png"
    skewed = skew_cli("--log", tmp_path / "shifted", "--model", model, "--png", png)
    assert skewed.returncode == 1, skewed.stderr
    assert skewed.stdout.splitlines()[1].split()[0] == "amount"
    assert skewed.stdout.splitlines()[1].endswith("SKEW")
    assert "1 inputs past PSI 0.2" in skewed.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A looser gate passes the same log.
    assert (
        skew_cli("--log", tmp_path / "shifted", "--model", model, "--threshold", "50").returncode
        == 0
    )


def test_cli_exits_2_when_it_cannot_judge(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    model = model_dir(tmp_path, inputs(rng, 5000))
    write_log(tmp_path / "log", inputs(rng, 50))

    no_log = skew_cli("--log", tmp_path / "nowhere", "--model", model)
    assert no_log.returncode == 2
    assert "no served-feature log" in no_log.stderr
    (tmp_path / "empty").mkdir()
    assert (
        "no closed served-log file"
        in skew_cli("--log", tmp_path / "empty", "--model", model).stderr
    )

    old_model = tmp_path / "old-model"
    old_model.mkdir()
    (old_model / "features.json").write_text("[]")
    no_stats = skew_cli("--log", tmp_path / "log", "--model", old_model)
    assert no_stats.returncode == 2
    assert "has no training_stats.json" in no_stats.stderr
    assert "saved before training statistics" in no_stats.stderr

    few = skew_cli("--log", tmp_path / "log", "--model", model)
    assert few.returncode == 2
    assert "50 served rows" in few.stderr and "--min-rows 200" in few.stderr
    assert skew_cli("--log", tmp_path / "log", "--model", model, "--min-rows", "50").returncode in (
        0,
        1,
    )

    broken = json.loads((model / stats.STATS_FILE).read_text())
    del broken["features"][0]["edges"]
    (model / stats.STATS_FILE).write_text(json.dumps(broken))
    malformed = skew_cli("--log", tmp_path / "log", "--model", model, "--min-rows", "1")
    assert malformed.returncode == 2
    assert "malformed" in malformed.stderr


def test_since_counts_only_the_rows_served_after_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    model = model_dir(tmp_path, inputs(rng, 20_000))
    log = tmp_path / "log"
    write_log(log / "before", inputs(rng, 1000, amount_scale=5.0))  # shifted, then fixed
    boundary = datetime.now(UTC)
    time.sleep(0.01)
    write_log(log / "after", inputs(rng, 1000))
    for old in (log / "before").iterdir():  # one directory, as one worker would leave it
        old.rename(log / f"served-0-{old.name.removeprefix('served-')}")
    for new in (log / "after").iterdir():
        new.rename(log / f"served-1-{new.name.removeprefix('served-')}")

    everything = skew_cli("--log", log, "--model", model)
    assert everything.returncode == 1 and "2000 served rows" in everything.stdout
    recent = skew_cli("--log", log, "--model", model, "--since", boundary.isoformat())
    assert recent.returncode == 0, recent.stdout + recent.stderr
    assert "1000 served rows" in recent.stdout
    assert "2000 served rows" in skew_cli("--log", log, "--model", model, "--since", "1h").stdout
    future = skew_cli("--log", log, "--model", model, "--since", "2100-01-01T00:00:00")
    assert future.returncode == 2 and "in the --since window" in future.stderr
    bad = skew_cli("--log", log, "--model", model, "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr
