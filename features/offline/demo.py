"""Synthetic feature values for the demo population and for training.

Plausible, correlated values per group; ids like `u000001` and `m00001`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from features.spec import (
    MERCHANT_RISK,
    MERCHANT_VELOCITY,
    USER_FEATURES,
    USER_PROFILE,
    FeatureGroup,
)

Columns = dict[str, npt.NDArray[np.float64]]


def user_ids(n: int) -> list[str]:
    """Demo user ids, `u000001` upwards."""
    return [f"u{i:06d}" for i in range(1, n + 1)]


def merchant_ids(n: int) -> list[str]:
    """Demo merchant ids, `m00001` upwards."""
    return [f"m{i:05d}" for i in range(1, n + 1)]


def _user_velocity(rng: np.random.Generator, n: int, now: float) -> Columns:
    count_1h = rng.poisson(0.4, n).astype(np.float64)
    count_24h = count_1h + rng.poisson(2.5, n)
    ticket = np.round(rng.lognormal(3.7, 0.85, n), 2)
    return {
        "tx_count_1h": count_1h,
        "tx_sum_1h": np.round(count_1h * ticket, 2),
        "tx_count_24h": count_24h,
        "tx_sum_24h": np.round(count_24h * ticket, 2),
        "distinct_merchants_7d": rng.poisson(5.0, n).astype(np.float64),
    }


def _user_profile(rng: np.random.Generator, n: int, now: float) -> Columns:
    return {
        "account_age_days": np.floor(rng.exponential(700.0, n)),
        "avg_tx_90d": np.round(rng.lognormal(3.7, 0.8, n), 2),
        "credit_score_bucket": rng.choice(5, n, p=[0.1, 0.2, 0.4, 0.2, 0.1]).astype(np.float64),
        "is_premium": (rng.random(n) < 0.15).astype(np.float64),
        "last_login_ts": np.floor(now - rng.exponential(2 * 86400.0, n)),
    }


def _merchant_risk(rng: np.random.Generator, n: int, now: float) -> Columns:
    high_risk = rng.random(n) < 0.1
    return {
        "mcc_risk_score": np.round(np.clip(rng.beta(2, 12, n) + 0.3 * high_risk, 0.0, 1.0), 4),
        "chargeback_rate_90d": np.round(rng.beta(1, 300, n) * (1 + 4 * high_risk), 5),
        "refund_rate_30d": np.round(rng.beta(2, 60, n), 4),
        "avg_ticket_30d": np.round(rng.lognormal(3.8, 0.7, n), 2),
        "days_since_onboarding": np.floor(rng.exponential(900.0, n)),
        "is_high_risk_category": high_risk.astype(np.float64),
    }


def _merchant_velocity(rng: np.random.Generator, n: int, now: float) -> Columns:
    return {"merchant_tx_count_24h": rng.poisson(200.0, n).astype(np.float64)}


_GENERATORS: dict[str, Callable[[np.random.Generator, int, float], Columns]] = {
    USER_FEATURES.qualified_name: _user_velocity,
    USER_PROFILE.qualified_name: _user_profile,
    MERCHANT_RISK.qualified_name: _merchant_risk,
    MERCHANT_VELOCITY.qualified_name: _merchant_velocity,
}


def generate(
    group: FeatureGroup, n: int, rng: np.random.Generator, now: float
) -> npt.NDArray[np.float64]:
    """`n` rows of plausible values for `group`, columns in the group's field order."""
    generator = _GENERATORS.get(group.qualified_name)
    if generator is None:
        raise ValueError(f"no demo generator for {group.qualified_name}: add one to {__name__}")
    columns = generator(rng, n, now)
    if set(columns) != set(group.field_names):
        raise RuntimeError(f"demo generator for {group.qualified_name} is out of date")
    return np.column_stack([columns[name] for name in group.field_names])
