"""`python -m features.stream` as a child process: started with an environment, stopped
with SIGTERM (SIGKILL after a grace period)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from tools._started import Started

ROOT = Path(__file__).resolve().parent.parent


class StreamConsumer(Started):
    """One velocity consumer process, run from the project root."""

    def __init__(
        self,
        env: Mapping[str, str],
        args: Sequence[str] = (),
        *,
        log: Path | None = None,
    ) -> None:
        """`env` is the whole environment; output goes to `log`, else to this process's."""
        self._env = dict(env)
        self._args = list(args)
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The consumer's process."""
        if self._process is None:
            raise RuntimeError("stream consumer not started")
        return self._process

    def start(self) -> Self:
        """Spawn the consumer (it joins the group on its own; nothing is awaited here)."""
        out = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = self.log.open("ab")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "features.stream", *self._args],
                env=self._env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (it finishes its batch and leaves the group), SIGKILL after `grace_s`."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def output(self) -> str:
        """What the consumer has written to its log so far; "" without a log."""
        return "" if self.log is None else self.log.read_text(errors="replace")
