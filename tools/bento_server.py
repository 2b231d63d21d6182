"""`bentoml serve` of this project on a loopback port: start, wait for /readyz, stop.

Stopping sends SIGTERM to the arbiter, which stops its workers, then SIGKILL to whatever
is left. circus starts every worker in a session of its own, so a SIGKILL to the arbiter
alone would orphan them: the kill goes to each process group of the arbiter's family.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Set
from functools import partial
from pathlib import Path
from typing import Self

import httpx
import psutil  # type: ignore[import-untyped]

from tools._started import Started
from tools.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "service:FraudService"
_TAIL_LINES = 60
_POLL_S = 0.1


class BentoServer(Started):
    """One `bentoml serve` (arbiter and workers) on 127.0.0.1, run from the project root."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        target: str = SERVICE,
        port: int | None = None,
        workers: int | None = None,
        log: Path | None = None,
        cpus: Set[int] | None = None,
        root: Path = ROOT,
    ) -> None:
        """`env` is set over this process's environment; `workers` sets FRAUD_WORKERS;
        output goes to `log`, else to this process's stdout; `cpus` pins the server;
        `root` is the source tree served (another revision's, for a benchmark)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.target = target
        self.root = root
        self.startup_s: float | None = None  # from spawn to the first 200 on /readyz
        self._env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **env}
        if workers is not None:
            self._env["FRAUD_WORKERS"] = str(workers)
        self._cpus = cpus
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The arbiter."""
        if self._process is None:
            raise RuntimeError("bentoml serve not started")
        return self._process

    def start(self, timeout_s: float = 120.0) -> Self:
        """Start the server; return once /readyz answers 200. If the server exits or is
        not ready within `timeout_s`, stop it and raise with the tail of its output."""
        args = [str(Path(sys.executable).parent / "bentoml"), "serve", self.target,
                "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        out = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = self.log.open("wb")
        pin = partial(os.sched_setaffinity, 0, self._cpus) if self._cpus else None
        started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                args,
                env=self._env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,  # its own process group, for stop() to kill
                preexec_fn=pin,  # noqa: PLW1509 (before exec: the workers inherit it)
            )
        finally:
            if out is not None:
                out.close()
        try:
            self._wait_ready(started + timeout_s)
        except BaseException:
            self.stop()  # also on Ctrl-C: nothing outlives a failed start
            raise
        self.startup_s = time.monotonic() - started
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the arbiter; after it exits or `grace_s` passes, SIGKILL to every
        process group of its family (its own and each worker's)."""
        if self._process is None or self._process.poll() is not None:
            return
        groups = _process_groups(self._process.pid)  # before: orphans lose their parent
        self._process.terminate()
        try:
            self._process.wait(grace_s)
        except subprocess.TimeoutExpired:
            groups |= _process_groups(self._process.pid)  # workers (re)started since
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self._process.wait()

    def output(self) -> str:
        """What the server has written to its log so far; "" without a log."""
        return "" if self.log is None else self.log.read_text(errors="replace")

    def _tail(self) -> str:
        if self.log is None:
            return "(its output is above)"
        return "\n".join(self.output().splitlines()[-_TAIL_LINES:])

    def _wait_ready(self, deadline: float) -> None:
        # One client for every poll: httpx.get builds an SSL context per call (~20 ms of
        # CPU), taken from the server starting up beside it.
        with httpx.Client(timeout=1.0) as client:
            while not _answers_200(client, f"{self.url}/readyz"):
                code = self.process.poll()
                if code is not None:
                    raise RuntimeError(
                        f"bentoml serve exited with {code} ({self.target}):\n{self._tail()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"bentoml serve not ready on {self.url} ({self.target}):\n{self._tail()}"
                    )
                time.sleep(_POLL_S)


def _answers_200(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _process_groups(pid: int) -> set[int]:
    """Process groups of `pid` and its descendants, this process's own left out."""
    try:
        arbiter = psutil.Process(pid)
        family = [arbiter, *arbiter.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    groups = set()
    for process in family:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(process.pid))
    groups.discard(os.getpgrp())
    return groups
