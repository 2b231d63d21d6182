"""A PNG of the worst inputs: training and served shares per training bin, side by side.

matplotlib is imported here only, when a PNG is asked for: it is a development
requirement (requirements-dev.txt), not one of the service's.
"""

from __future__ import annotations

from pathlib import Path

from features.skew.report import FeatureSkew

_COLUMNS = 3


def write_png(rows: list[FeatureSkew], path: Path, threshold: float) -> None:
    """Bar charts of `rows` (the worst first) into `path`; matplotlib must be installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    n_rows = (n + _COLUMNS - 1) // _COLUMNS
    fig, axes = plt.subplots(
        n_rows, _COLUMNS, figsize=(4.2 * _COLUMNS, 2.8 * n_rows), squeeze=False
    )
    for ax, row in zip(axes.flat, rows, strict=False):
        bins = range(len(row.trained))
        ax.bar([b - 0.2 for b in bins], row.trained, width=0.4, label="training")
        ax.bar([b + 0.2 for b in bins], row.served, width=0.4, label="served")
        color = "tab:red" if row.psi > threshold else "black"
        ax.set_title(f"{row.name}: PSI {row.psi:.3f}", color=color, fontsize=10)
        ax.set_xlabel("training bin (quantiles)", fontsize=8)
        ax.set_ylabel("share of rows", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Served vs training inputs, worst first (threshold {threshold})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
