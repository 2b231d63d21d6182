"""A scored transaction as it travels on the stream: its fields, encoded and checked."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from features.errors import InvalidEntityId, MalformedEvent
from features.spec import validate_entity_id

MAX_AMOUNT = 1e9
MIN_EVENT_TS = 946_684_800.0  # 2000-01-01, as the API accepts
MAX_EVENT_TS = 4_102_444_800.0  # 2100-01-01
MAX_AHEAD_S = 300.0
"""Latest an event may be ahead of the consumer's clock (skew between hosts): a later one
would move its user's windows into the future, so it is dead-lettered instead."""

_IDS = ("tx_id", "user_id", "merchant_id")


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    """One scored transaction: ids, amount, event time (unix s), fraud probability."""

    tx_id: str
    user_id: str
    merchant_id: str
    amount: float
    event_ts: float
    score: float | None = None

    def fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        out = {
            "tx_id": self.tx_id,
            "user_id": self.user_id,
            "merchant_id": self.merchant_id,
            "amount": repr(self.amount),
            "event_ts": repr(self.event_ts),
        }
        if self.score is not None:
            out["score"] = repr(self.score)
        return out

    @classmethod
    def parse(cls, fields: Mapping[bytes, bytes], now: float) -> TransactionEvent:
        """The event a stream entry holds; MalformedEvent names the first bad field."""
        text = {_text(k, "a field name"): v for k, v in fields.items()}
        ids = []
        for name in _IDS:
            try:
                ids.append(validate_entity_id(name, _text(_field(text, name), name)))
            except InvalidEntityId as exc:
                raise MalformedEvent(str(exc)) from None
        amount = _number(text, "amount")
        if not 0 <= amount <= MAX_AMOUNT:
            raise MalformedEvent(f"amount: {amount!r} is outside 0-{MAX_AMOUNT:g}")
        event_ts = _number(text, "event_ts")
        if not MIN_EVENT_TS <= event_ts <= MAX_EVENT_TS:
            raise MalformedEvent(f"event_ts: {event_ts!r} is outside 2000-2100")
        if event_ts > now + MAX_AHEAD_S:
            raise MalformedEvent(
                f"event_ts: {event_ts - now:.0f} s ahead of the consumer's clock"
                f" (at most {MAX_AHEAD_S:g})"
            )
        score = _number(text, "score") if "score" in text else None
        if score is not None and not 0 <= score <= 1:
            raise MalformedEvent(f"score: {score!r} is not a probability")
        return cls(ids[0], ids[1], ids[2], amount, event_ts, score)


def _field(fields: Mapping[str, bytes], name: str) -> bytes:
    value = fields.get(name)
    if value is None:
        raise MalformedEvent(f"{name}: missing")
    return value


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise MalformedEvent(f"{what}: not UTF-8") from None


def _number(fields: Mapping[str, bytes], name: str) -> float:
    raw = _text(_field(fields, name), name)
    try:
        value = float(raw)
    except ValueError:
        raise MalformedEvent(f"{name}: {raw[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise MalformedEvent(f"{name}: {raw[:40]!r} is not finite")
    return value
