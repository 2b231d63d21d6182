"""The training distribution of each model input, saved beside the model: bin edges (the
training inputs' quantiles), the share of rows in each bin, and the default rate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from features.errors import SkewInputError
from features.spec import MODEL_FEATURES, Feature

STATS_FILE = "training_stats.json"
N_BINS = 10
_VERSION = 1


@dataclass(frozen=True, slots=True)
class FeatureStats:
    """One input in training. Bin i holds values in (edges[i-1], edges[i]]: the first bin
    everything up to edges[0], the last everything above edges[-1]."""

    name: str
    default: float
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    default_rate: float
    """Share of rows whose value is the feature's default: missing, or truly that value."""


@dataclass(frozen=True, slots=True)
class TrainingStats:
    """Every model input's training distribution, for the features with this fingerprint."""

    fingerprint: str
    rows: int
    features: tuple[FeatureStats, ...]


def bin_index(values: npt.NDArray[np.floating], edges: Sequence[float]) -> npt.NDArray[np.intp]:
    """The bin of each value: right-closed intervals between `edges` (see FeatureStats)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")


def bin_counts(values: npt.NDArray[np.floating], edges: Sequence[float]) -> npt.NDArray[np.int64]:
    """How many of `values` fall in each of the len(edges) + 1 bins."""
    counts = np.bincount(bin_index(values.astype(np.float64), edges), minlength=len(edges) + 1)
    return counts.astype(np.int64)


def is_default(values: npt.NDArray[np.floating], default: float) -> npt.NDArray[np.bool_]:
    """Which values equal `default` as the model sees it (float32)."""
    same: npt.NDArray[np.bool_] = values.astype(np.float32) == np.float32(default)
    return same


def training_stats(
    x: npt.NDArray[np.float32],
    fingerprint: str,
    features: Sequence[Feature] = MODEL_FEATURES,
    n_bins: int = N_BINS,
) -> TrainingStats:
    """Statistics of the training matrix `x` (rows of model inputs in `features` order)."""
    if x.ndim != 2 or x.shape[1] != len(features) or len(x) == 0:
        raise ValueError(f"expected a non-empty (n, {len(features)}) matrix, got {x.shape}")
    levels = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    out = []
    for j, feature in enumerate(features):
        column = x[:, j].astype(np.float64)
        # Values the data holds, deduplicated: a bool or a spike at the default is one edge.
        edges = tuple(np.unique(np.quantile(column, levels, method="nearest")).tolist())
        counts = bin_counts(column, edges)
        out.append(
            FeatureStats(
                name=feature.name,
                default=feature.default,
                edges=edges,
                proportions=tuple((counts / len(column)).tolist()),
                default_rate=float(is_default(column, feature.default).mean()),
            )
        )
    return TrainingStats(fingerprint=fingerprint, rows=len(x), features=tuple(out))


def save(stats: TrainingStats, path: Path) -> None:
    """Write `stats` as JSON to `path`."""
    data = {
        "version": _VERSION,
        "fingerprint": stats.fingerprint,
        "rows": stats.rows,
        "bins": "right-closed: (edges[i-1], edges[i]], open at both ends",
        "features": [
            {
                "name": f.name,
                "default": f.default,
                "edges": list(f.edges),
                "proportions": list(f.proportions),
                "default_rate": f.default_rate,
            }
            for f in stats.features
        ],
    }
    path.write_text(json.dumps(data, indent=1))


def load(directory: Path) -> TrainingStats:
    """The statistics saved in model directory `directory`; SkewInputError if it has none
    (a model saved before they were) or they are malformed."""
    path = directory / STATS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SkewInputError(
            f"{directory} has no {STATS_FILE}: the model was saved before training statistics"
            " were; train it again (python -m models.train) to compare its inputs"
        ) from None
    except (OSError, ValueError) as exc:
        raise SkewInputError(f"{path}: unreadable ({exc})") from None
    try:
        if data["version"] != _VERSION:
            raise SkewInputError(f"{path}: version {data['version']}, this reader knows 1")
        features = tuple(
            FeatureStats(
                name=str(f["name"]),
                default=float(f["default"]),
                edges=tuple(float(e) for e in f["edges"]),
                proportions=tuple(float(p) for p in f["proportions"]),
                default_rate=float(f["default_rate"]),
            )
            for f in data["features"]
        )
        stats = TrainingStats(str(data["fingerprint"]), int(data["rows"]), features)
    except (KeyError, TypeError, ValueError) as exc:
        raise SkewInputError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None
    for f in stats.features:
        if len(f.proportions) != len(f.edges) + 1:
            raise SkewInputError(
                f"{path}: {f.name} has {len(f.edges)} edges, {len(f.proportions)} proportions"
            )
    return stats
