"""A small asyncio HTTP/1.1 load generator for `make bench` (e), (f) and (g).

Keep-alive connections, pre-encoded requests, nanosecond timings, and uvloop (`run`): light
enough that a 1-worker service, not the client, is what saturates. Locust rounds sub-100 ms times to
whole ms, so the sub-ms comparisons of the benchmark use this instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Awaitable[T]) -> T:
    """Run a load on uvloop. Against a server that answers a prebuilt 503 at once, 3000
    req/s over 256 connections come back with p99 1.5 ms on uvloop and 2.7 ms on asyncio's
    own loop (the client alone on one vCPU): the client's share of a measured tail."""
    return uvloop.run(main)  # type: ignore[arg-type]


def encode_requests(port: int, path: str, bodies: Sequence[Any]) -> list[bytes]:
    """Whole HTTP requests, ready to write."""
    out = []
    for body in bodies:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        out.append(head.encode() + payload)
    return out


DROPPED = 0  # the status of an exchange whose connection failed


class Connection:
    """One keep-alive connection; one request in flight at a time. One the server drops
    answers that request with status DROPPED and is opened again for the next; one the
    server ends (`Connection: close`) is opened again when the next request is sent, as a
    browser or an HTTP client library does, and that request's time includes the connect."""

    def __init__(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._port = port
        self._reader = reader
        self._writer = writer
        self._ended = False  # the last response said Connection: close

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(port, reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Send one request and read its whole response: status code, head and body."""
        try:
            if self._ended:
                await self._reopen()
                self._ended = False
            return await self._exchange(request)
        except (OSError, asyncio.IncompleteReadError):
            with contextlib.suppress(OSError):  # else the next send fails fast, tries again
                await self._reopen()
            return DROPPED, b"", b""

    async def _reopen(self) -> None:
        self._writer.close()
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)

    async def _exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self._ended = True
        if length is None:
            raise RuntimeError("response without Content-Length")
        return status, head, await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


def server_timing_ms(head: bytes, metric: str) -> float | None:
    """The `dur` (ms) of `metric` in a response head's Server-Timing headers, else None."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"server-timing":
            continue
        for entry in value.decode("latin-1").split(","):
            entry_name, *params = (part.strip() for part in entry.split(";"))
            if entry_name != metric:
                continue
            for param in params:
                key, _, dur = param.partition("=")
                if key.strip().lower() == "dur":
                    return float(dur.strip().strip('"'))
            return None  # the metric, without a duration
    return None


@dataclass(frozen=True, slots=True)
class Response:
    """One exchange of a traced run: perf_counter times, the status, head and body as read.

    Nothing is parsed while the run goes on; the readers below do it afterwards.
    """

    scheduled: float
    sent: float
    done: float
    status: int
    head: bytes
    body: bytes

    @property
    def latency_s(self) -> float:
        """From the scheduled send time: a client or server that fell behind shows."""
        return self.done - self.scheduled

    def timing_ms(self, metric: str = "features") -> float | None:
        return server_timing_ms(self.head, metric)


@dataclass
class Run:
    """Latencies (s) of successful requests, failures, and the run's wall time; with
    `trace` a list, every response as well."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    late: int = 0
    elapsed_s: float = 0.0
    trace: list[Response] | None = None

    async def send(
        self, conn: Connection, request: bytes, t0: float, scheduled: float | None = None
    ) -> None:
        """Send one request and record it: its latency from `t0`, or a failure."""
        status, head, body = await conn.send(request)
        done = time.perf_counter()
        if status == 200:
            self.latencies.append(done - t0)
        else:
            self.failures += 1
        if self.trace is not None:
            at = t0 if scheduled is None else scheduled
            self.trace.append(Response(at, t0, done, status, head, body))

    @property
    def rps(self) -> float:
        return (len(self.latencies) + self.failures) / self.elapsed_s if self.elapsed_s else 0.0


async def sequential(port: int, requests: Sequence[bytes], n: int) -> Run:
    """Concurrency 1: n requests one after the other on one connection."""
    conn = await Connection.open(port)
    run = Run()
    cycle = itertools.cycle(requests)
    started = time.perf_counter()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await run.send(conn, next(cycle), t0)
    finally:
        run.elapsed_s = time.perf_counter() - started
        await conn.close()
    return run


async def closed_loop(
    port: int, requests: Sequence[bytes], concurrency: int, duration_s: float
) -> Run:
    """As fast as the server answers, `concurrency` requests in flight: max throughput."""
    cycle = itertools.cycle(requests)
    run = Run()
    conns = [await Connection.open(port) for _ in range(concurrency)]
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker(conn: Connection) -> None:
        while (t0 := time.perf_counter()) < deadline:
            await run.send(conn, next(cycle), t0)

    return await _drive(run, conns, worker, started)


async def open_loop(
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    concurrency: int = 64,
    *,
    trace: bool = False,
) -> Run:
    """A fixed offered rate; latency measured from send. `late` counts requests sent
    more than 2 ms after their scheduled time (the client or server fell behind).
    With `trace`, `run.trace` keeps every response and its scheduled time."""
    cycle = itertools.cycle(requests)
    run = Run(trace=[] if trace else None)
    conns = [await Connection.open(port) for _ in range(concurrency)]
    ticks: Iterator[int] = itertools.count()
    started = time.perf_counter()
    total = int(rate * duration_s)

    async def worker(conn: Connection) -> None:
        while (i := next(ticks)) < total:
            scheduled = started + i / rate
            wait = scheduled - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            t0 = time.perf_counter()
            if t0 - scheduled > 0.002:
                run.late += 1
            await run.send(conn, next(cycle), t0, scheduled)

    return await _drive(run, conns, worker, started)


async def _drive(
    run: Run,
    conns: list[Connection],
    worker: Callable[[Connection], Awaitable[None]],
    started: float,
) -> Run:
    """Run `worker` on every connection; close them all and time the run, whatever happens."""
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        run.elapsed_s = time.perf_counter() - started
        for c in conns:
            await c.close()
    return run
