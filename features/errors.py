"""Errors raised by the feature layer. Reads raise none for a store failure: they serve
defaults and say why (`GroupRead.reason`).

FeatureError
├── InvalidEntityId           a client-supplied id that may not become a key
├── FeatureWriteError         a write was not applied; nothing was reported as written
├── BackingStoreError         the persistent store behind Redis failed or timed out
├── SkewInputError            the skew report's log or training statistics are missing or unusable
└── MalformedEvent            a stream event that cannot be applied (it is dead-lettered)
"""

from __future__ import annotations

from collections.abc import Sequence


class FeatureError(Exception):
    """Base of every error the feature layer raises."""


class InvalidEntityId(FeatureError, ValueError):
    """An entity id that fails validation; `field` names the offending input."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class FeatureWriteError(FeatureError):
    """The online store rejected or did not acknowledge a write; `failed` names the rows,
    and `wrong_type` those of them whose key holds another type (a data problem: writing
    them again fails again, unlike a timeout)."""

    def __init__(
        self, message: str, failed: Sequence[str] = (), wrong_type: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.failed = tuple(failed)
        self.wrong_type = tuple(wrong_type)


class BackingStoreError(FeatureError):
    """The backing store (DynamoDB or Bigtable) failed, refused, or did not answer in time."""


class SkewInputError(FeatureError):
    """The skew report cannot run: no served-feature log, no training statistics, or a
    log written for other features."""


class MalformedEvent(FeatureError, ValueError):
    """A transaction event with a missing or bad field; `reason` says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
