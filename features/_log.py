"""A log line per failure kind at most once per interval, with the count it stands for."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Logs repeated failures at most once per `interval_s`: at WARNING, or at `level`
    with the traceback for failures that betray a bug."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        timer: Callable[[], float] = time.monotonic,
        *,
        level: int = logging.WARNING,
        exc_info: bool = False,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._timer = timer
        self._level = level
        self._exc_info = exc_info
        self._last = -float("inf")
        self._unlogged = 0

    def failed(self, what: str, exc: BaseException, n_keys: int | None = None) -> None:
        """Count one failure of `what` (on `n_keys` keys); log it if the interval has passed."""
        self._unlogged += 1
        now = self._timer()
        if now - self._last < self._interval_s:
            return
        self._logger.log(
            self._level,
            "%s failed (%s: %s)%s; %d failures since the last report",
            what,
            type(exc).__name__,
            exc,
            "" if n_keys is None else f" for {n_keys} keys",
            self._unlogged,
            exc_info=exc if self._exc_info else None,
        )
        self._last = now
        self._unlogged = 0
