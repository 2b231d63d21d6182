"""Local backing-store servers on loopback, for tests and benchmarks.

- dynalite (DynamoDB API, in memory), from the repo's node_modules (`make install`);
- cbtemulator (Google's Bigtable emulator), from the Google Cloud CLI's platform folder,
  PATH, or `gcloud info`; absent, an `apt-get install` is tried once (it needs Google's
  apt repository), else EmulatorMissing says why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from tools._started import Started
from tools.redis_server import _die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
CBT_SUBPATH = "platform/bigtable-emulator/cbtemulator"
CBT_PACKAGE = "google-cloud-cli-bigtable-emulator"


class EmulatorMissing(RuntimeError):
    """The emulator's binary is not installed and could not be installed."""


def find_dynalite() -> str:
    """Path of the dynalite launcher installed by `npm ci`."""
    path = ROOT / "node_modules" / ".bin" / "dynalite"
    if not path.exists():
        raise EmulatorMissing(f"{path} missing: run `make install` (npm ci)")
    return str(path)


def _cbt_candidates() -> list[Path]:
    roots = [Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk")]
    gcloud = shutil.which("gcloud")
    if gcloud is not None:
        try:
            out = subprocess.run(
                [gcloud, "info", "--format=value(installation.sdk_root)"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out:
            roots.append(Path(out))
    found = [r / CBT_SUBPATH for r in roots]
    on_path = shutil.which("cbtemulator")
    if on_path is not None:
        found.insert(0, Path(on_path))
    return found


def find_cbtemulator(install: bool = True) -> str:
    """Path of cbtemulator; tries `apt-get install` once as root if it is absent."""
    for path in _cbt_candidates():
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", CBT_PACKAGE],
            capture_output=True,
            timeout=300,
            check=False,
        )
        return find_cbtemulator(install=False)
    raise EmulatorMissing(
        f"cbtemulator not found (package {CBT_PACKAGE} from Google's apt repository,"
        " or `gcloud components install bigtable`)"
    )


def _stopped(task: Path) -> bool:
    """Whether a /proc task is in the stopped state (its thread may exit meanwhile)."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "Tt"


class _Process(Started):
    """A server process on a free loopback port that answers TCP connects when ready."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout_s: float = 20.0) -> Self:
        self.process = subprocess.Popen(
            self._args(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self._args()[0]} exited") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self._args()[0]} not listening") from None
                time.sleep(0.02)

    def pause(self, timeout_s: float = 5.0) -> None:
        """SIGSTOP: connections are accepted by the kernel, never answered.

        Returns once every thread shows stopped: the signal is only queued when kill()
        returns, and a thread on the other core can answer one more request before it
        stops (a failed test on CI was that race).
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        deadline = time.monotonic() + timeout_s
        while not all(_stopped(task) for task in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._args()[0]} did not stop")
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Dynalite(_Process):
    """dynalite in memory, tables created at once (`--createTableMs 0`)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        return [
            find_dynalite(),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--createTableMs", "0",
            "--deleteTableMs", "0",
            "--updateTableMs", "0",
        ]  # fmt: skip


class BigtableEmulator(_Process):
    """cbtemulator: any project and instance id, no credentials."""

    @property
    def host(self) -> str:
        """Value for BIGTABLE_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        return [find_cbtemulator(), "-host", "127.0.0.1", "-port", str(self.port)]
