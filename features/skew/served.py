"""The served-feature log, binned as in training: counts per bin and defaults per feature,
read file by file and batch by batch, so memory stays flat however long the log."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from features.errors import SkewInputError
from features.skew.stats import TrainingStats, bin_counts, is_default

_BATCH_ROWS = 65_536


@dataclass
class ServedCounts:
    """What the log's rows served with the training statistics' fingerprint hold."""

    bins: dict[str, npt.NDArray[np.int64]]
    defaults: dict[str, int]
    rows: int = 0
    files: int = 0
    other_fingerprints: dict[str, int] = field(default_factory=dict)
    """Rows served for other feature definitions, by fingerprint: left out."""
    unreadable: list[str] = field(default_factory=list)


def served_counts(
    directory: Path, stats: TrainingStats, since: float | None = None
) -> ServedCounts:
    """Bin every closed log file in `directory` against `stats` (only rows served at or
    after `since`, Unix seconds, if given); SkewInputError if there is no such directory or
    no closed file in it."""
    import pyarrow.parquet as pq

    from features.servedlog.files import closed_files

    if not directory.is_dir():
        raise SkewInputError(f"no served-feature log at {directory}")
    paths = closed_files(directory)
    if not paths:
        raise SkewInputError(f"{directory} holds no closed served-log file (served-*.parquet)")
    counts = _empty(stats)
    for path in paths:
        try:
            one = _file_counts(pq.ParquetFile(path), stats, since)
        except (OSError, ValueError) as exc:  # pyarrow's errors are both
            counts.unreadable.append(f"{path.name}: {exc}")
            continue
        _merge(counts, one)
    return counts


def _empty(stats: TrainingStats) -> ServedCounts:
    return ServedCounts(
        bins={f.name: np.zeros(len(f.edges) + 1, dtype=np.int64) for f in stats.features},
        defaults={f.name: 0 for f in stats.features},
    )


def _file_counts(parquet: Any, stats: TrainingStats, since: float | None) -> ServedCounts:
    """One file's counts; ValueError if its rows of our fingerprint lack a feature."""
    from features.servedlog.columns import FINGERPRINT, SERVED_AT

    counts = _empty(stats)
    counts.files = 1
    names = set(parquet.schema_arrow.names)
    if FINGERPRINT not in names or SERVED_AT not in names:
        raise ValueError(f"no {FINGERPRINT} or {SERVED_AT} column")
    columns = [FINGERPRINT, SERVED_AT, *(f.name for f in stats.features if f.name in names)]
    since_us = None if since is None else round(since * 1e6)
    for whole in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        batch = whole
        if since_us is not None:  # older rows are not counted at all
            served_us = whole.column(SERVED_AT).cast("int64").to_numpy(zero_copy_only=False)
            batch = whole.filter(served_us >= since_us)
        fingerprints = batch.column(FINGERPRINT).to_numpy(zero_copy_only=False)
        ours = fingerprints == stats.fingerprint
        others, n_others = np.unique(fingerprints[~ours], return_counts=True)
        for other, n in zip(others.tolist(), n_others.tolist(), strict=True):
            counts.other_fingerprints[other] = counts.other_fingerprints.get(other, 0) + n
        if not ours.any():
            continue
        for feature in stats.features:
            if feature.name not in names:
                raise ValueError(f"rows of fingerprint {stats.fingerprint} lack {feature.name!r}")
            values = batch.column(feature.name).to_numpy()[ours]
            counts.bins[feature.name] += bin_counts(values, feature.edges)
            counts.defaults[feature.name] += int(is_default(values, feature.default).sum())
        counts.rows += int(ours.sum())
    return counts


def _merge(into: ServedCounts, one: ServedCounts) -> None:
    for name, bins in one.bins.items():
        into.bins[name] += bins
        into.defaults[name] += one.defaults[name]
    into.rows += one.rows
    into.files += one.files
    for other, n in one.other_fingerprints.items():
        into.other_fingerprints[other] = into.other_fingerprints.get(other, 0) + n
