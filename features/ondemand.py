"""On-demand features, computed inline from the request and stored values.

The same function builds model inputs for training (models/train.py) and for serving,
so the two cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from features.spec import MODEL_FEATURES, ON_DEMAND_FEATURES, STORED_FEATURES

_STORED_INDEX = {f.name: i for i, f in enumerate(STORED_FEATURES)}
_ON_DEMAND = {f.name: f.default for f in ON_DEMAND_FEATURES}
_MAX_LOGIN_AGE_S = 30 * 86400.0
_NEW_MERCHANT_S = 30 * 86400.0  # also the cap of seconds_since_paid_merchant
_MAX_RATIO = 1000.0
_SECONDS_PER_DAY = 86400
_EPOCH_THURSDAY = 3  # 1970-01-01 was a Thursday; Monday is 0

# Columns of the stored matrix that reach the model, in model order.
_MODEL_STORED_COLUMNS = np.array(
    [_STORED_INDEX[f.name] for f in MODEL_FEATURES if f.name in _STORED_INDEX],
    dtype=np.intp,
)
_MODEL_STORED_LIST: list[int] = _MODEL_STORED_COLUMNS.tolist()
_LAST_LOGIN = _STORED_INDEX["last_login_ts"]
_AVG_TX = _STORED_INDEX["avg_tx_90d"]
_LAST_PAID = _STORED_INDEX["merchant_last_paid_ts"]
_MAX_INT_TS = 2.0**62  # beyond this, int64 arithmetic would differ: use the array path


def on_demand(
    stored: npt.NDArray[np.float64],
    amount: npt.NDArray[np.float64],
    timestamp: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """On-demand columns, in ON_DEMAND_FEATURES order, for rows of stored values."""
    last_login = stored[:, _STORED_INDEX["last_login_ts"]]
    avg_tx = stored[:, _STORED_INDEX["avg_tx_90d"]]
    ts = timestamp.astype(np.int64)

    # A login time of 0 is the default, meaning unknown; a future one is clock skew.
    since_login = np.where(
        last_login > 0,
        np.clip(timestamp - last_login, 0.0, _MAX_LOGIN_AGE_S),
        _ON_DEMAND["seconds_since_last_login"],
    )
    hour = (ts % _SECONDS_PER_DAY) // 3600
    weekday = (ts // _SECONDS_PER_DAY + _EPOCH_THURSDAY) % 7
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(
            avg_tx > 0,
            np.clip(amount / avg_tx, 0.0, _MAX_RATIO),
            _ON_DEMAND["amount_to_avg_ratio"],
        )
    # 0 (no score) is the default: never paid within the set's 30 days, so new.
    last_paid = stored[:, _LAST_PAID]
    since_paid = np.where(
        last_paid > 0,
        np.clip(timestamp - last_paid, 0.0, _NEW_MERCHANT_S),
        _ON_DEMAND["seconds_since_paid_merchant"],
    )
    columns = [since_login, hour, weekday >= 5, ratio, since_paid, since_paid >= _NEW_MERCHANT_S]
    return np.column_stack(columns).astype(np.float32)


def model_inputs(
    stored: npt.NDArray[np.float64],
    amount: npt.NDArray[np.float64],
    timestamp: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """The model's input matrix, in MODEL_FEATURES order."""
    if len(stored) == 1 and stored.dtype == amount.dtype == timestamp.dtype == np.float64:
        one = _one_row(stored[0].tolist(), float(amount[0]), float(timestamp[0]))
        if one is not None:
            return one
    return np.hstack(
        [
            stored[:, _MODEL_STORED_COLUMNS].astype(np.float32),
            amount.astype(np.float32)[:, None],
            on_demand(stored, amount, timestamp),
        ]
    )


def _one_row(row: list[float], amount: float, timestamp: float) -> npt.NDArray[np.float32] | None:
    """model_inputs() of one row in plain floats: a dozen numpy calls cost ~20 us at n=1.

    Same arithmetic in float64 and the same single rounding to float32; None sends
    values the array path handles differently (non-finite, huge) back to it.
    """
    last_login, avg_tx, last_paid = row[_LAST_LOGIN], row[_AVG_TX], row[_LAST_PAID]
    if not (
        math.isfinite(amount)
        and math.isfinite(last_login)
        and math.isfinite(avg_tx)
        and math.isfinite(last_paid)
        and -_MAX_INT_TS < timestamp < _MAX_INT_TS
    ):
        return None
    if last_login > 0:
        since_login = min(max(timestamp - last_login, 0.0), _MAX_LOGIN_AGE_S)
    else:
        since_login = _ON_DEMAND["seconds_since_last_login"]
    ts = int(timestamp)  # truncates toward zero, as astype(np.int64) does
    hour = (ts % _SECONDS_PER_DAY) // 3600
    weekday = (ts // _SECONDS_PER_DAY + _EPOCH_THURSDAY) % 7
    if avg_tx > 0:
        ratio = min(max(amount / avg_tx, 0.0), _MAX_RATIO)
    else:
        ratio = _ON_DEMAND["amount_to_avg_ratio"]
    if last_paid > 0:
        since_paid = min(max(timestamp - last_paid, 0.0), _NEW_MERCHANT_S)
    else:
        since_paid = _ON_DEMAND["seconds_since_paid_merchant"]
    values = [row[i] for i in _MODEL_STORED_LIST]
    values += (amount, since_login, float(hour), float(weekday >= 5), ratio)
    values += (since_paid, float(since_paid >= _NEW_MERCHANT_S))
    return np.array([values], dtype=np.float32)
