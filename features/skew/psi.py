"""Population stability index: how far one binned distribution has moved from another."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPSILON = 1e-4
"""Floor of a bin's share, so an empty bin on either side gives a large, finite term."""


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """sum((a - e) * ln(a / e)) over bins of two proportion vectors (each summing to 1).

    Read as usual: below 0.1 no real change, 0.1-0.25 a moderate one, above 0.25 a large one.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape:
        raise ValueError(f"{len(e)} expected bins, {len(a)} actual")
    return float(np.sum((a - e) * np.log(a / e)))
