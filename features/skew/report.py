"""Training against serving, per model input: PSI over the training bins and default rates,
worst first, as rows and as a printed table."""

from __future__ import annotations

from dataclasses import dataclass

from features.skew.psi import psi
from features.skew.served import ServedCounts
from features.skew.stats import TrainingStats


@dataclass(frozen=True, slots=True)
class FeatureSkew:
    """One input's distribution in training and as served."""

    name: str
    psi: float
    trained: tuple[float, ...]
    served: tuple[float, ...]
    trained_default_rate: float
    served_default_rate: float


def compare(stats: TrainingStats, counts: ServedCounts) -> list[FeatureSkew]:
    """Every input of `stats`, the largest PSI first; `counts` must hold rows."""
    if counts.rows == 0:
        raise ValueError("no served rows to compare")
    rows = []
    for feature in stats.features:
        served = tuple((counts.bins[feature.name] / counts.rows).tolist())
        rows.append(
            FeatureSkew(
                name=feature.name,
                psi=psi(feature.proportions, served),
                trained=feature.proportions,
                served=served,
                trained_default_rate=feature.default_rate,
                served_default_rate=counts.defaults[feature.name] / counts.rows,
            )
        )
    rows.sort(key=lambda r: (-r.psi, r.name))
    return rows


def table(rows: list[FeatureSkew], threshold: float) -> str:
    """A fixed-width table of `rows`, past-threshold ones marked."""
    width = max([len("feature"), *(len(r.name) for r in rows)])
    lines = [f"{'feature':<{width}}  {'psi':>8}  {'default: trained':>16}  {'served':>7}"]
    for r in rows:
        mark = "  SKEW" if r.psi > threshold else ""
        lines.append(
            f"{r.name:<{width}}  {r.psi:8.4f}  {r.trained_default_rate:16.2%}"
            f"  {r.served_default_rate:7.2%}{mark}"
        )
    return "\n".join(lines)
