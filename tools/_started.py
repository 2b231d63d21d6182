"""`with Thing(...) as thing:` for the local servers in tools/: started on the way in,
stopped on the way out, whatever happened inside."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Started:
    """A base for anything with `start() -> Self` and `stop()`."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
