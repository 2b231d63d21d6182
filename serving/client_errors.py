"""A client's error is not the server's. BentoML logs every request it refuses at ERROR with
a ~22-line traceback: a client sending bad requests at ~900/s wrote 172k lines in 8 s.
`ClientErrorLog` turns each such record into one WARNING line, at most one per interval
(with the count it stands for), and counts every one by status; server errors (5xx and
anything unexpected) pass through untouched, traceback and all."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from bentoml.exceptions import BentoMLException
from prometheus_client import Counter
from pydantic import ValidationError

# The logger of BentoML's `log_exception`, which its API wrapper calls on every error.
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"
MAX_DETAIL_CHARS = 200

CLIENT_ERRORS = Counter(
    "fraud_client_errors_total",
    "Requests refused as the client's error, by HTTP status",
    ["status"],
)


class ClientErrorLog(logging.Filter):
    """A logging filter for BentoML's HTTP logger; see the module docstring."""

    def __init__(self, interval_s: float = 10.0, timer: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval_s = interval_s
        self._timer = timer
        self._last = -float("inf")
        self._unlogged = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_status(exc)
        if exc is None or status is None:
            return True
        CLIENT_ERRORS.labels(str(status)).inc()
        self._unlogged += 1
        now = self._timer()
        if now - self._last < self._interval_s:
            return False
        path, method = record.args if isinstance(record.args, tuple) else ("?", "?")
        record.msg = "client error %d on %s [%s]: %s (%d client errors since the last line)"
        record.args = (status, path, method, _detail(exc), self._unlogged)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last = now
        self._unlogged = 0
        return True


def client_status(exc: BaseException | None) -> int | None:
    """The 4xx status BentoML answers `exc` with, or None for a server error."""
    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, BentoMLException) and 400 <= exc.error_code.value < 500:
        return int(exc.error_code.value)
    return None


def install(interval_s: float = 10.0) -> ClientErrorLog:
    """Attach the filter to BentoML's HTTP logger (once per process)."""
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, ClientErrorLog):
            return existing
    log = ClientErrorLog(interval_s)
    logger.addFilter(log)
    return log


def _detail(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False, include_input=False)[0]
        text = f"{exc.error_count()} invalid: {'.'.join(map(str, first['loc']))}: {first['msg']}"
    else:
        text = str(exc)
    # What a client sent may reach this line: one line, bounded, no control characters.
    return repr(text[:MAX_DETAIL_CHARS])
