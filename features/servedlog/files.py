"""Rolling Parquet files in one directory: each holds at most a set number of rows, is
written under a hidden temporary name and renamed when closed, so readers see whole files
only."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from features.metrics import SERVED_LOG_FILES

PREFIX = "served-"
SUFFIX = ".parquet"
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:32] or "host"


def closed_files(directory: Path) -> list[Path]:
    """The log's closed files in `directory`, oldest first (names start with the UTC time
    the file was opened); open ones, hidden under a temporary name, are left out."""
    return sorted(p for p in directory.glob(f"{PREFIX}*{SUFFIX}") if p.is_file())


class RollingParquet:
    """Writes tables of one schema into files of at most `roll_rows` rows each.

    Names are unique per process: `served-<UTC time opened>-<host>-<pid>-<n>.parquet`,
    written as `.<name>.tmp` until closed. Not thread-safe: one writer thread owns it.
    """

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        roll_rows: int,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.schema = schema
        self.roll_rows = roll_rows
        self._wall = wall
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows = 0
        self._opened = 0

    @property
    def room(self) -> int:
        """Rows the current file (or the next, if none is open) can still take."""
        return self.roll_rows - self._rows

    @property
    def rows(self) -> int:
        """Rows in the open file; 0 when none is open."""
        return self._rows

    def write(self, table: pa.Table) -> None:
        """Append `table` (at most `room` rows) to the open file, opening one if needed;
        close the file once it is full."""
        if table.num_rows > self.room:
            raise ValueError(f"{table.num_rows} rows, room for {self.room}")
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write_table(table)
        self._rows += table.num_rows
        if self._rows >= self.roll_rows:
            self.close()

    def close(self) -> int:
        """Close the open file under its final name; return its rows (0 if none was open)."""
        writer, path, rows = self._writer, self._path, self._rows
        if writer is None or path is None:
            return 0
        self._writer, self._path, self._rows = None, None, 0
        try:
            writer.close()
            os.replace(_temporary(path), path)
        except BaseException:
            with contextlib.suppress(OSError):
                _temporary(path).unlink()
            raise
        SERVED_LOG_FILES.inc()
        return rows

    def discard(self) -> int:
        """Give up the open file after a failure, deleting it; return the rows lost."""
        writer, path, rows = self._writer, self._path, self._rows
        self._writer, self._path, self._rows = None, None, 0
        if writer is not None:
            with contextlib.suppress(Exception):  # it has failed once already
                writer.close()
        if path is not None:
            with contextlib.suppress(OSError):
                _temporary(path).unlink()
        return rows

    def _open(self) -> None:
        self._opened += 1
        opened = datetime.fromtimestamp(self._wall(), UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{PREFIX}{opened}-{_HOST}-{os.getpid()}-{self._opened:06d}{SUFFIX}"
        path = self.directory / name
        self._writer = pq.ParquetWriter(_temporary(path), self.schema)
        self._path = path


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")
