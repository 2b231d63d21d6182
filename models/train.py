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
from features.spec import GROUPS, MODEL_FEATURES, STORED_FEATURES, Kind
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
# Inputs read from the sorted sets and the embedding, and those computed from them: the
# baseline model is trained without them, to show what they add.
_STRUCTURE_INPUTS = frozenset(
    {f.name for g in GROUPS if g.kind is not Kind.HASH for f in g.features}
    | {"seconds_since_paid_merchant", "is_new_merchant_30d"}
)
BASELINE_COLUMNS = [i for i, f in enumerate(MODEL_FEATURES) if f.name not in _STRUCTURE_INPUTS]
"""Columns of the model inputs from hashes and the request only."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TrainResult:
    """A trained model, its held-out ROC-AUC and what it was trained on."""

    model: FraudNet
    roc_auc: float
    baseline_roc_auc: float | None
    """Held-out ROC-AUC of a model of the same data without the structures' inputs."""
    fraud_rate: float
    schema: list[dict[str, object]]
    fingerprint: str
    rows: int
    seed: int
    epochs: int
    stats: skew_stats.TrainingStats
    """The distribution of each input in the rows trained on, for the skew report."""


def train(rows: int, seed: int, epochs: int, *, baseline: bool = False) -> TrainResult:
    """Train on `rows` synthetic transactions; the same arguments give the same model.

    `baseline` also trains, on the same rows and seed, a model without the inputs of the
    sorted sets and the embedding, and reports its held-out ROC-AUC (it is not kept)."""
    rng = np.random.default_rng(seed)
    x, y = _transactions(rng, rows)
    order = rng.permutation(rows)
    n_held_out = int(rows * _HELD_OUT_SHARE)
    held_out, fit = order[:n_held_out], order[n_held_out:]

    model, auc = _fit_and_score(x, y, fit, held_out, seed, epochs)
    baseline_auc = None
    if baseline:
        x_old = np.ascontiguousarray(x[:, BASELINE_COLUMNS])
        _, baseline_auc = _fit_and_score(x_old, y, fit, held_out, seed, epochs)
    return TrainResult(
        model=model,
        roc_auc=auc,
        baseline_roc_auc=baseline_auc,
        fraud_rate=float(y.mean()),
        schema=spec.schema(),
        fingerprint=spec.fingerprint(),
        rows=rows,
        seed=seed,
        epochs=epochs,
        stats=skew_stats.training_stats(x[fit], spec.fingerprint()),
    )


def _fit_and_score(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    fit: npt.NDArray[np.int64],
    held_out: npt.NDArray[np.int64],
    seed: int,
    epochs: int,
) -> tuple[FraudNet, float]:
    torch.manual_seed(seed)
    model = _fit(torch.from_numpy(x[fit]), torch.from_numpy(y[fit]), epochs)
    with torch.inference_mode():
        scores = model(torch.from_numpy(x[held_out])).numpy()
    return model, roc_auc(y[held_out], scores)


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
    generated: dict[str, FloatArray] = {}  # by group, for the groups that depend on one
    for group in GROUPS:
        base = demo.DEPENDS.get(group.qualified_name)
        given = None if base is None else generated[base.qualified_name]
        n = n_merchants if group.entity == "merchant" else rows
        values = demo.generate(group, n, rng, _END_TS_S, given)
        generated[group.qualified_name] = values
        # A user, and a (user, merchant) pair, per transaction; merchants repeat.
        parts.append(values[merchant] if group.entity == "merchant" else values)
    true_stored = np.hstack(parts)
    true_stored[:, _STORED["last_login_ts"]] -= _END_TS_S - timestamp
    last_paid = true_stored[:, _STORED["merchant_last_paid_ts"]]
    last_paid -= np.where(last_paid > 0, _END_TS_S - timestamp, 0.0)  # 0: none, stays 0

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
    embedding = np.column_stack([col(name) for name in spec.MERCHANT_EMBEDDING.field_names])
    logit: FloatArray = (
        -8.3
        + 1.3 * np.log(np.clip(col("amount_to_avg_ratio"), 0.1, 100.0))
        + 0.6 * col("tx_count_1h")
        + 5.0 * col("mcc_risk_score")
        + 120.0 * col("chargeback_rate_90d")
        + 1.5 * (col("account_age_days") < 30)
        + 0.8 * ((hour >= 1) & (hour < 5))
        + 0.4 * np.log1p(col("seconds_since_last_login") / 86400.0)
        - 0.8 * col("is_premium")
        # The structures: a burst of transactions, a merchant new to the user, and the
        # part of the merchant's risk only its embedding carries.
        + 0.35 * col("tx_count_10m")
        + 1.2 * col("is_new_merchant_30d")
        + 0.9 * (embedding @ demo.EMBEDDING_RISK_DIRECTION)
        + rng.normal(0.0, 0.5, len(x))  # what no feature explains
    )
    probability: FloatArray = 1.0 / (1.0 + np.exp(-logit))
    return probability


def _hide_values(stored: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Replace values by their training default, as the feature store does when absent:
    a hash's fields one by one; an embedding or a sorted-set read, which is one value,
    whole; and every group of an unknown entity."""
    stored = stored.copy()
    start = 0
    for group in GROUPS:
        end = start + len(group.features)
        part = stored[:, start:end]  # a view: written in place
        if group.kind is Kind.HASH:
            hidden = rng.random(part.shape) < _VALUE_MISSING_P
        else:
            hidden = np.broadcast_to(rng.random((len(part), 1)) < _VALUE_MISSING_P, part.shape)
        part[...] = np.where(hidden, group.defaults, part)
        unknown = rng.random(len(stored)) < _ENTITY_UNKNOWN_P
        part[unknown] = group.defaults
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
        "--baseline",
        action="store_true",
        help="also train without the sorted sets' and embedding's inputs; print both ROC-AUCs",
    )
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
    result = train(args.rows, args.seed, args.epochs, baseline=args.baseline)
    took_s = time.perf_counter() - started_s
    print(
        f"trained on {result.rows} rows ({result.fraud_rate:.2%} fraud) in {took_s:.1f} s: "
        f"held-out ROC-AUC {result.roc_auc:.4f}"
    )
    if result.baseline_roc_auc is not None:
        print(
            f"held-out ROC-AUC without the sorted-set and embedding inputs "
            f"{result.baseline_roc_auc:.4f}, with them {result.roc_auc:.4f} (same rows, seed)"
        )
    print(f"saved {save(result)}")


if __name__ == "__main__":
    main()
