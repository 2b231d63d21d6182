"""Train FraudNet on synthetic transactions and save it to the BentoML model store."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from features import ondemand, spec
from features.offline import demo
from features.skew import stats as skew_stats
from features.spec import GROUPS, MODEL_FEATURES, STORED_FEATURES
from models import MODEL_NAME
from models.net import FraudNet
from models.scorer import MODEL_FILE, SCHEMA_FILE, SchemaMismatch, check_saved_schema

# The model sees hour, weekday and time since login, never absolute time, so a fixed
# end date changes nothing it learns and makes a seed reproduce the same model.
_END_TS_S = 1_767_225_600.0  # 2026-01-01 00:00 UTC
_SPAN_S = 28 * 86400.0
_VALUE_MISSING_P = 0.08
_ENTITY_UNKNOWN_P = 0.05
_HELD_OUT_SHARE = 0.2
_BATCH_SIZE = 512
_LEARNING_RATE = 3e-3
_COLUMN = {f.name: i for i, f in enumerate(MODEL_FEATURES)}
_STORED = {f.name: i for i, f in enumerate(STORED_FEATURES)}

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TrainResult:
    """A trained model, its held-out ROC-AUC and what it was trained on."""

    model: FraudNet
    roc_auc: float
    fraud_rate: float
    schema: list[dict[str, object]]
    fingerprint: str
    rows: int
    seed: int
    epochs: int
    stats: skew_stats.TrainingStats
    """The distribution of each input in the rows trained on, for the skew report."""


def train(rows: int, seed: int, epochs: int) -> TrainResult:
    """Train on `rows` synthetic transactions; the same arguments give the same model."""
    rng = np.random.default_rng(seed)
    x, y = _transactions(rng, rows)
    order = rng.permutation(rows)
    n_held_out = int(rows * _HELD_OUT_SHARE)
    held_out, fit = order[:n_held_out], order[n_held_out:]

    torch.manual_seed(seed)
    model = _fit(torch.from_numpy(x[fit]), torch.from_numpy(y[fit]), epochs)
    with torch.inference_mode():
        scores = model(torch.from_numpy(x[held_out])).numpy()
    return TrainResult(
        model=model,
        roc_auc=roc_auc(y[held_out], scores),
        fraud_rate=float(y.mean()),
        schema=spec.schema(),
        fingerprint=spec.fingerprint(),
        rows=rows,
        seed=seed,
        epochs=epochs,
        stats=skew_stats.training_stats(x[fit], spec.fingerprint()),
    )


def roc_auc(labels: npt.NDArray[np.float32], scores: npt.NDArray[np.float32]) -> float:
    """Area under the ROC curve: the chance a random positive outscores a negative."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    # Mann-Whitney U from 1-based ranks; ties share their average rank.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def save(result: TrainResult) -> str:
    """Save `result` to the BentoML model store; return its tag."""
    import bentoml  # only here: training without saving needs no model store

    metadata = {
        "fingerprint": result.fingerprint,
        "roc_auc": result.roc_auc,
        "fraud_rate": result.fraud_rate,
        "rows": result.rows,
        "seed": result.seed,
        "epochs": result.epochs,
    }
    labels = {"framework": "torch", "features": result.fingerprint}
    with bentoml.models.create(MODEL_NAME, metadata=metadata, labels=labels) as model:
        saved = {"n_inputs": result.model.n_inputs, "state_dict": result.model.state_dict()}
        torch.save(saved, model.path_of(MODEL_FILE))
        with open(model.path_of(SCHEMA_FILE), "w") as f:
            json.dump(result.schema, f, indent=1)
        skew_stats.save(result.stats, Path(model.path_of(skew_stats.STATS_FILE)))
    return str(model.tag)


def _transactions(
    rng: np.random.Generator, rows: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Model inputs as serving will see them, and labels from the true values."""
    timestamp = _END_TS_S - rng.uniform(0.0, _SPAN_S, rows)
    # One user snapshot per transaction, taken at its time: logins precede it.
    # A user per transaction; merchants from a smaller population, so they repeat.
    n_merchants = max(rows // 100, 100)
    merchant = rng.integers(0, n_merchants, rows)
    parts = []
    for group in GROUPS:
        if group.entity == "merchant":
            parts.append(demo.generate(group, n_merchants, rng, _END_TS_S)[merchant])
        else:
            parts.append(demo.generate(group, rows, rng, _END_TS_S))
    true_stored = np.hstack(parts)
    true_stored[:, _STORED["last_login_ts"]] -= _END_TS_S - timestamp

    avg_tx = true_stored[:, _STORED["avg_tx_90d"]]
    # Mostly near the user's usual amount; now and then many times it.
    spike = np.where(rng.random(rows) < 0.05, rng.lognormal(2.0, 0.8, rows), 1.0)
    amount = np.round(avg_tx * rng.lognormal(0.0, 0.5, rows) * spike, 2)

    true_x = ondemand.model_inputs(true_stored, amount, timestamp)
    labels = rng.random(rows) < _fraud_probability(true_x, rng)
    stored = _hide_values(true_stored, rng)
    return ondemand.model_inputs(stored, amount, timestamp), labels.astype(np.float32)


def _fraud_probability(x: npt.NDArray[np.float32], rng: np.random.Generator) -> FloatArray:
    """The hidden rule the model has to find, on true (never missing) values."""

    def col(name: str) -> FloatArray:
        return x[:, _COLUMN[name]].astype(np.float64)

    hour = col("hour_of_day")
    logit: FloatArray = (
        -7.2
        + 1.3 * np.log(np.clip(col("amount_to_avg_ratio"), 0.1, 100.0))
        + 0.6 * col("tx_count_1h")
        + 5.0 * col("mcc_risk_score")
        + 120.0 * col("chargeback_rate_90d")
        + 1.5 * (col("account_age_days") < 30)
        + 0.8 * ((hour >= 1) & (hour < 5))
        + 0.4 * np.log1p(col("seconds_since_last_login") / 86400.0)
        - 0.8 * col("is_premium")
        + rng.normal(0.0, 0.5, len(x))  # what no feature explains
    )
    probability: FloatArray = 1.0 / (1.0 + np.exp(-logit))
    return probability


def _hide_values(stored: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Replace values by their training default, as the feature store does when absent."""
    defaults = np.concatenate([g.defaults for g in GROUPS])
    stored = np.where(rng.random(stored.shape) < _VALUE_MISSING_P, defaults, stored)
    start = 0
    for group in GROUPS:  # an unknown entity: the whole group falls back to defaults
        end = start + len(group.features)
        unknown = rng.random(len(stored)) < _ENTITY_UNKNOWN_P
        stored[unknown, start:end] = group.defaults
        start = end
    return stored


def _fit(x: torch.Tensor, y: torch.Tensor, epochs: int) -> FraudNet:
    model = FraudNet.for_inputs(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=_LEARNING_RATE)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        for batch in torch.split(torch.randperm(len(x)), _BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model.logits(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help=f"do nothing if {MODEL_NAME} exists, trained on the current feature definitions",
    )
    args = parser.parse_args()

    if args.if_missing:
        import bentoml

        try:
            existing = bentoml.models.get(MODEL_NAME)
        except bentoml.exceptions.NotFound:
            pass  # nothing saved yet: train below
        else:
            try:
                check_saved_schema(existing.path, str(existing.tag))
            except SchemaMismatch as exc:
                print(f"{exc}: training a new one")  # serving would refuse this one
            else:
                print(f"{existing.tag} exists; not training")
                return

    started_s = time.perf_counter()
    result = train(args.rows, args.seed, args.epochs)
    took_s = time.perf_counter() - started_s
    print(
        f"trained on {result.rows} rows ({result.fraud_rate:.2%} fraud) in {took_s:.1f} s: "
        f"held-out ROC-AUC {result.roc_auc:.4f}"
    )
    print(f"saved {save(result)}")


if __name__ == "__main__":
    main()
