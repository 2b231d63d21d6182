"""Velocity features from a Redis Stream of scored transactions (`python -m features.stream`)."""

from features.stream.consumer import Counts, VelocityConsumer, dead_letter_key
from features.stream.event import TransactionEvent
from features.stream.velocity import (
    Applied,
    Velocity,
    merchant_activity_key,
    user_activity_key,
    user_merchants_key,
)

__all__ = [
    "Applied",
    "Counts",
    "TransactionEvent",
    "Velocity",
    "VelocityConsumer",
    "dead_letter_key",
    "merchant_activity_key",
    "user_activity_key",
    "user_merchants_key",
]
