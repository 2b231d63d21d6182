"""A small asyncio HTTP/1.1 load generator for `make bench` (e).

Keep-alive connections, pre-encoded requests, nanosecond timings: light enough that a
1-worker service, not the client, is what saturates. Locust rounds sub-100 ms times to
whole ms, so the sub-ms comparisons of the benchmark use this instead.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


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


class Connection:
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> int:
        """Send one request and read its whole response; return the status code."""
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        if length is None:
            raise RuntimeError("response without Content-Length")
        await self._reader.readexactly(length)
        return status

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


@dataclass
class Run:
    """Latencies (s) of successful requests, failures, and the run's wall time."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    late: int = 0
    elapsed_s: float = 0.0

    async def send(self, conn: Connection, request: bytes, t0: float) -> None:
        """Send one request and record it: its latency from `t0`, or a failure."""
        if await conn.send(request) == 200:
            self.latencies.append(time.perf_counter() - t0)
        else:
            self.failures += 1

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
    port: int, requests: Sequence[bytes], rate: float, duration_s: float, concurrency: int = 64
) -> Run:
    """A fixed offered rate; latency measured from send. `late` counts requests sent
    more than 2 ms after their scheduled time (the client or server fell behind)."""
    cycle = itertools.cycle(requests)
    run = Run()
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
            await run.send(conn, next(cycle), t0)

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
