"""FraudNet: training on tiny synthetic data, saving, loading and the skew guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

import models
from features import spec
from features.skew import stats as skew_stats
from models import MODEL_NAME, FraudNet, SchemaMismatch, Scorer
from models.numpy_net import NumpyNet, UnsupportedNet
from models.train import TrainResult, roc_auc, train

ROWS, SEED, EPOCHS = 20_000, 7, 3
ROOT = Path(__file__).resolve().parents[1]
N_FEATURES = len(spec.MODEL_FEATURES)

Matrix = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    return train(ROWS, SEED, EPOCHS, baseline=True)


@pytest.fixture(scope="module")
def inputs() -> Matrix:
    # Any scale and sign: the net's own transform has to cope with raw values.
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (256, N_FEATURES)) * rng.lognormal(0.0, 3.0, (256, N_FEATURES))
    return x.astype(np.float32)


def _eager(result: TrainResult, x: Matrix) -> Matrix:
    with torch.inference_mode():
        probabilities: torch.Tensor = result.model(torch.from_numpy(x))
    return probabilities.numpy()


def _train_cli(bentoml_home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # A subprocess, because bentoml resolves its home once per process and keeps it.
    env = os.environ | {"BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    args = ["--rows", str(ROWS), "--seed", str(SEED), "--epochs", str(EPOCHS), *extra]
    return subprocess.run(
        [sys.executable, "-m", "models.train", *args],
        check=False,  # callers read the return code and output
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BentoML home holding one model saved by `python -m models.train`."""
    home = tmp_path_factory.mktemp("bentoml")
    done = _train_cli(home)
    assert done.returncode == 0, done.stderr
    assert f"saved {MODEL_NAME}:" in done.stdout
    return home


def _saved_dirs(home: Path) -> list[Path]:
    return [p.parent for p in (home / "models" / MODEL_NAME).glob("*/model.pt")]


def test_public_names_are_pinned() -> None:
    assert sorted(models.__all__) == ["FraudNet", "MODEL_NAME", "SchemaMismatch", "Scorer"]


def test_importing_models_leaves_bentoml_out() -> None:
    code = "import sys, models; assert 'bentoml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_same_seed_same_model(trained: TrainResult, inputs: Matrix) -> None:
    again = train(ROWS, SEED, EPOCHS)
    np.testing.assert_array_equal(_eager(again, inputs), _eager(trained, inputs))
    assert again.roc_auc == trained.roc_auc


def test_one_probability_per_row(trained: TrainResult, inputs: Matrix) -> None:
    for predictions in (
        _eager(trained, inputs),
        Scorer(trained.model, trained.schema).predict(inputs),
    ):
        assert predictions.shape == (len(inputs),)
        assert predictions.dtype == np.float32
        assert ((predictions >= 0.0) & (predictions <= 1.0)).all()


def test_learns_the_hidden_rule(trained: TrainResult) -> None:
    assert 0.02 < trained.fraud_rate < 0.05
    assert trained.roc_auc > 0.85  # chance is 0.5; this run reaches ~0.90


def test_the_structures_inputs_are_learned_and_in_the_schema(trained: TrainResult) -> None:
    # Same rows and seed without the sorted sets' and the embedding's inputs: the hidden
    # rule uses them, so the model of every input must do better (~0.87 against ~0.90).
    assert trained.baseline_roc_auc is not None
    assert trained.roc_auc > trained.baseline_roc_auc + 0.01
    names = [f["name"] for f in trained.schema]
    new = ["tx_count_10m", "seconds_since_paid_merchant", "is_new_merchant_30d"]
    assert set(new) | set(spec.MERCHANT_EMBEDDING.field_names) <= set(names)
    assert trained.model.n_inputs == len(names) == N_FEATURES
    # The skew guard covers them: a model without the embedding is refused.
    without = [f for f in trained.schema if not str(f["name"]).startswith("merchant_emb_")]
    diffs = spec.describe_skew(without)
    assert "feature 'merchant_emb_0' is in features/ but not in the model" in diffs


def test_roc_auc_counts_pairs_and_halves_ties() -> None:
    labels = np.array([0, 0, 1, 1], dtype=np.float32)
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8], dtype=np.float32)) == 0.75
    assert roc_auc(labels, np.full(4, 0.5, dtype=np.float32)) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.zeros(4, dtype=np.float32), np.arange(4, dtype=np.float32))


def test_numpy_serves_what_pytorch_computes_at_any_scale(trained: TrainResult) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (512, N_FEATURES)) * rng.choice([1e-3, 1.0, 1e3, 1e9], (512, 1))
    x = x.astype(np.float32)
    x[0] = 0.0
    net = NumpyNet.of(trained.model)
    # float32 in another order (the scaling folded into the first layer): ~5e-6 at 1e9.
    np.testing.assert_allclose(net(x), _eager(trained, x), rtol=0, atol=1e-5)
    assert net(x).dtype == np.float32
    one = net(x[:1])
    assert one.shape == (1,) and one[0] == pytest.approx(float(_eager(trained, x[:1])[0]), abs=1e-6)


def test_a_net_numpy_cannot_express_is_served_by_torchscript(
    trained: TrainResult, inputs: Matrix, caplog: pytest.LogCaptureFixture
) -> None:
    net = FraudNet(N_FEATURES, trained.model.mean, trained.model.std)
    net.load_state_dict(trained.model.state_dict())
    net.layers[1] = torch.nn.Tanh()  # same weights, another activation
    with pytest.raises(UnsupportedNet, match="layer 1: Tanh"):
        NumpyNet.of(net)
    with caplog.at_level("WARNING", logger="models.scorer"):
        scorer = Scorer(net, trained.schema)
    assert "served by TorchScript, not NumPy: layer 1: Tanh" in caplog.text
    with torch.inference_mode():
        expected = net(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(scorer.predict(inputs), expected, rtol=0, atol=1e-6)


def test_wrong_column_count_is_rejected(trained: TrainResult) -> None:
    scorer = Scorer(trained.model, trained.schema)
    with pytest.raises(ValueError, match=rf"expected shape \(n, {N_FEATURES}\), got \(2, 3\)"):
        scorer.predict(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="got"):
        scorer.predict(np.zeros(N_FEATURES, dtype=np.float32))


def test_changed_default_is_named_in_the_mismatch(trained: TrainResult) -> None:
    Scorer(trained.model, trained.schema).check_schema()  # unchanged: no complaint
    schema = [dict(f) for f in trained.schema]
    bucket = next(f for f in schema if f["name"] == "credit_score_bucket")
    bucket["default"] = 3  # features/ says 2
    with pytest.raises(SchemaMismatch, match=r"'credit_score_bucket': model 3, features/ 2"):
        Scorer(trained.model, schema).check_schema()


def test_saved_model_scores_like_the_trained_one(
    store: Path, trained: TrainResult, inputs: Matrix
) -> None:
    [directory] = _saved_dirs(store)
    scorer = Scorer.load(directory)
    scorer.check_schema()
    assert scorer.schema == spec.schema()
    assert scorer.fingerprint == spec.fingerprint()
    # Another process and a frozen trace: equal up to float rounding.
    np.testing.assert_allclose(scorer.predict(inputs), _eager(trained, inputs), rtol=0, atol=1e-6)


def test_training_statistics_are_saved_with_the_model(store: Path, trained: TrainResult) -> None:
    [directory] = _saved_dirs(store)
    saved = skew_stats.load(directory)
    assert saved == trained.stats  # the same seed, in another process
    assert saved.fingerprint == spec.fingerprint()
    assert saved.rows == ROWS - int(ROWS * 0.2)  # the rows fitted, not the held-out ones
    assert [f.name for f in saved.features] == [f.name for f in spec.MODEL_FEATURES]
    by_name = {f.name: f for f in saved.features}
    # ~8% of values and ~5% of whole groups hidden behind defaults; 50.0 is no real ticket.
    assert 0.1 < by_name["avg_ticket_30d"].default_rate < 0.16
    assert by_name["is_premium"].edges == (0.0, 1.0)
    assert all(sum(f.proportions) == pytest.approx(1.0) for f in saved.features)


def test_if_missing_keeps_the_saved_model(store: Path) -> None:
    before = _saved_dirs(store)
    done = _train_cli(store, "--if-missing")
    assert done.returncode == 0, done.stderr
    assert "not training" in done.stdout
    assert _saved_dirs(store) == before
