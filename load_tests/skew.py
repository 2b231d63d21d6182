"""Seeded, Zipf-like id pools: a chosen share of traffic goes to the hottest ids."""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from features.offline.demo import merchant_ids, user_ids


def zipf_exponent(n: int, head: int, share: float) -> float:
    """Exponent s of weights 1/rank**s that gives the top `head` of `n` ids `share`."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    low, high = 0.0, 4.0
    for _ in range(50):
        s = (low + high) / 2
        w = ranks**-s
        if w[:head].sum() / w.sum() < share:
            low = s
        else:
            high = s
    return (low + high) / 2


class SkewedPool:
    """Ids drawn so that the top `head_fraction` of them get `head_share` of draws."""

    def __init__(
        self,
        ids: Sequence[str],
        *,
        head_fraction: float = 0.01,
        head_share: float = 0.2,
        seed: int = 0,
    ) -> None:
        n = len(ids)
        head = max(1, round(n * head_fraction))
        s = zipf_exponent(n, head, head_share)
        weights = np.arange(1, n + 1, dtype=np.float64) ** -s
        self._cumulative = np.cumsum(weights / weights.sum()).tolist()
        order = list(ids)
        random.Random(seed).shuffle(order)  # hot ids are spread over the population
        self.by_rank = order

    def draw(self, rng: random.Random) -> str:
        """One id; each simulated client passes its own seeded generator."""
        i = bisect.bisect_left(self._cumulative, rng.random())
        return self.by_rank[min(i, len(self.by_rank) - 1)]


def transactions(
    n: int, *, users: int = 100_000, merchants: int = 10_000, seed: int = 5
) -> list[dict[str, Any]]:
    """n /predict bodies over the demo ids, skewed users and merchants, log-normal amounts."""
    pool_u = SkewedPool(user_ids(users), seed=1)
    pool_m = SkewedPool(merchant_ids(merchants), seed=2)
    rng = random.Random(seed)
    return [
        {
            "user_id": pool_u.draw(rng),
            "merchant_id": pool_m.draw(rng),
            "amount": round(rng.lognormvariate(3.7, 0.9), 2),
        }
        for _ in range(n)
    ]
