"""A loopback TCP proxy that delays replies: a slow network for tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self

from tools._started import Started

_CHUNK_BYTES = 65_536
_MAX_QUEUED_CHUNKS = 1024  # per connection: a client that stops reading stalls its server side
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0

_Queue = asyncio.Queue[tuple[float, bytes] | None]


class DelayProxy(Started):
    """A TCP proxy on 127.0.0.1 that delays each chunk sent back to the client by `delay_s`.

    Requests go to the target at once. Each reply chunk is released `delay_s` after it
    arrived (not after the previous chunk was released), in arrival order per connection.
    """

    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._delay_s = _checked(delay_s)
        self._lock = threading.Lock()  # set_delay() runs on the caller's thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def url(self, db: int = 0) -> str:
        """A Redis URL that connects through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def set_delay(self, delay_s: float) -> None:
        """Delay replies that arrive from now on by `delay_s`; safe from any thread."""
        checked = _checked(delay_s)
        with self._lock:
            self._delay_s = checked

    def _delay(self) -> float:
        with self._lock:
            return self._delay_s

    def start(self) -> Self:
        """Listen on a free port, serving from an event loop in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("DelayProxy already started")
        self._ready.clear()
        self._thread = threading.Thread(
            target=asyncio.run,
            args=(self._serve(),),
            name=f"delay-proxy-{self.target_port}",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.stop()
            raise TimeoutError("DelayProxy did not start listening")
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join(_STOP_TIMEOUT_S)
            self._thread = None
            raise RuntimeError(f"DelayProxy could not listen: {error}") from error
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then join the thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("DelayProxy thread did not stop")
        self._thread = self._loop = self._stopping = None
        self.port = 0

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._proxy(client_reader, client_writer)
        except asyncio.CancelledError:
            # stop() cancelled it. Ended here, not re-raised: Python 3.11's start_server
            # callback calls exception() on the task, which raises for a cancelled one.
            return
        finally:
            await _close(client_writer)
            self._connections.discard(task)

    async def _proxy(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            return  # the target is down: the client's connection is closed at once
        queue: _Queue = asyncio.Queue(_MAX_QUEUED_CHUNKS)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_forward(client_reader, server_writer))
                tasks.create_task(self._receive(server_reader, queue))
                tasks.create_task(_deliver(queue, client_writer))
        except* OSError:
            pass  # a reset on either side ends the connection; both sides are closed
        finally:
            await _close(server_writer)

    async def _receive(self, reader: asyncio.StreamReader, queue: _Queue) -> None:
        """Stamp each reply chunk with its release time as it arrives."""
        loop = asyncio.get_running_loop()
        while data := await reader.read(_CHUNK_BYTES):
            await queue.put((loop.time() + self._delay(), data))
        await queue.put(None)


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Client to server, undelayed; the client's EOF is passed on."""
    while data := await reader.read(_CHUNK_BYTES):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def _deliver(queue: _Queue, writer: asyncio.StreamWriter) -> None:
    """Server to client: each chunk at its release time, in order; the server's EOF closes."""
    loop = asyncio.get_running_loop()
    while (item := await queue.get()) is not None:
        release_at, data = item
        wait_s = release_at - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        writer.write(data)
        await writer.drain()
    writer.close()  # its reader sees EOF too, which ends _forward


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _checked(delay_s: float) -> float:
    if not delay_s >= 0:  # also refuses NaN
        raise ValueError(f"delay_s must be >= 0, got {delay_s}")
    return float(delay_s)
