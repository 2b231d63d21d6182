"""Synthetic feature values for the demo population and for training.

Plausible, correlated values per group; ids like `u000001` and `m00001`. A group may
draw on the values of an earlier group of the same entity (`DEPENDS`): a merchant's
embedding carries part of its risk, and part of a risk no other feature shows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from features.spec import (
    MERCHANT_EMBEDDING,
    MERCHANT_RISK,
    MERCHANT_VELOCITY,
    USER_ACTIVITY,
    USER_FEATURES,
    USER_MERCHANTS,
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


def _user_activity(rng: np.random.Generator, n: int, now: float) -> Columns:
    # Mostly none in the last 10 minutes; now and then a burst.
    burst = rng.random(n) < 0.04
    count = rng.poisson(0.2, n) + burst * rng.poisson(5.0, n)
    return {"tx_count_10m": count.astype(np.float64)}


def _user_merchants(rng: np.random.Generator, n: int, now: float) -> Columns:
    # When this user last paid the transaction's merchant: 0 for none in the set's 30
    # days (the set is trimmed to them), else mostly days ago.
    ago = rng.exponential(6 * 86400.0, n)
    paid = (rng.random(n) < 0.65) & (ago < USER_MERCHANTS.retention_s)
    return {"merchant_last_paid_ts": np.where(paid, np.floor(now - ago), 0.0)}


# Directions of the merchant embedding, fixed: what the category risk moves, and what a
# risk no other feature shows moves. Both unit vectors; dimensions are centred at 0.
_EMB_RISK = np.array([0.6, -0.3, 0.2, 0.5, -0.2, 0.3, 0.1, -0.35])
_EMB_RISK /= np.linalg.norm(_EMB_RISK)
_EMB_HIDDEN = np.array([-0.2, 0.5, 0.4, -0.1, 0.5, 0.1, -0.5, 0.2])
_EMB_HIDDEN -= _EMB_HIDDEN @ _EMB_RISK * _EMB_RISK  # orthogonal to the risk direction
_EMB_HIDDEN /= np.linalg.norm(_EMB_HIDDEN)
EMBEDDING_RISK_DIRECTION = _EMB_HIDDEN + 0.5 * _EMB_RISK
"""What the training data's hidden rule reads of a merchant's embedding."""


def _merchant_embedding(rng: np.random.Generator, n: int, now: float, risk: Columns) -> Columns:
    category = (risk["mcc_risk_score"] - 0.17) / 0.12  # about centred and scaled
    hidden = rng.normal(0.0, 1.0, n)  # this merchant's own risk, shown nowhere else
    noise = rng.normal(0.0, 0.35, (n, len(_EMB_RISK)))
    emb = np.outer(category, _EMB_RISK) + np.outer(hidden, _EMB_HIDDEN) + noise
    # As stored: float32, so training sees what serving decodes.
    emb = emb.astype(np.float32).astype(np.float64)
    return {name: emb[:, i] for i, name in enumerate(MERCHANT_EMBEDDING.field_names)}


_Generator = Callable[[np.random.Generator, int, float], Columns]
_GENERATORS: dict[str, _Generator] = {
    USER_FEATURES.qualified_name: _user_velocity,
    USER_PROFILE.qualified_name: _user_profile,
    MERCHANT_RISK.qualified_name: _merchant_risk,
    MERCHANT_VELOCITY.qualified_name: _merchant_velocity,
    USER_ACTIVITY.qualified_name: _user_activity,
    USER_MERCHANTS.qualified_name: _user_merchants,
}
_DEPENDENT: dict[str, Callable[[np.random.Generator, int, float, Columns], Columns]] = {
    MERCHANT_EMBEDDING.qualified_name: _merchant_embedding,
}
DEPENDS: dict[str, FeatureGroup] = {MERCHANT_EMBEDDING.qualified_name: MERCHANT_RISK}
"""Groups generated from another group's rows of the same entities."""


def generate(
    group: FeatureGroup,
    n: int,
    rng: np.random.Generator,
    now: float,
    given: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """`n` rows of plausible values for `group`, columns in the group's field order.

    A group in DEPENDS needs `given`: the same entities' rows of the group it depends on.
    """
    name = group.qualified_name
    dependent = _DEPENDENT.get(name)
    if dependent is not None:
        if given is None or len(given) != n:
            raise ValueError(f"{name} is generated from {n} rows of {DEPENDS[name].qualified_name}")
        base = DEPENDS[name]
        columns = dependent(rng, n, now, dict(zip(base.field_names, given.T, strict=True)))
    else:
        generator = _GENERATORS.get(name)
        if generator is None:
            raise ValueError(f"no demo generator for {name}: add one to {__name__}")
        columns = generator(rng, n, now)
    if set(columns) != set(group.field_names):
        raise RuntimeError(f"demo generator for {name} is out of date")
    return np.column_stack([columns[name] for name in group.field_names])
