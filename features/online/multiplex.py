"""One multiplexed, auto-pipelining connection to a Redis server, for the read path.

Every read appends its packed commands to a buffer, and the buffer goes out in ONE
`transport.write` per event-loop iteration (the first append schedules it with
`call_soon`): reads of requests that arrive in the same iteration share one write and
one round trip, as ioredis and Lettuce auto-pipeline. A hiredis Reader fed from
`data_received` parses the replies, and a FIFO hands each read its own, in order. There
is no pool and no checkout: the connection belongs to the event loop (asyncpg's
protocol-per-connection design, features/online/ in STYLE.md).

- A read whose caller stopped waiting (deadline, cancellation) keeps its place in the
  FIFO: its replies are consumed and dropped, so later replies never shift onto the
  wrong read.
- The socket timeout bounds each read from its write. One lazy timer watches the oldest
  read in flight (replies come in order: it is the first to be late). When it is late,
  every read in flight fails with TimeoutError and the connection is closed, never
  reused. A lost connection, an unparsable stream and a connection-level error reply
  (NOAUTH, LOADING) do the same, with redis-py's error types and messages, so the Redis
  tier reports the same kinds on either path.
- The next read after a failure reconnects; at most one connect is in flight, and reads
  that arrive meanwhile wait behind it and its handshake (AUTH, SELECT). The connect,
  TLS handshake included, is bounded by the connect timeout; the handshake's replies by
  the socket timeout.
- `for_client` takes every option from the redis-py client open_redis built from the
  same settings: host and port or unix socket, db, credentials, TLS (redis-py's own
  SSLContext builder, over the same options), timeouts. In Sentinel mode every connect
  asks redis-py's Sentinel pool for the master's address, so after a failover the
  reconnect that follows the old master's failure finds the new one.
- RESP2, unless a `listener` asks for invalidations: then the handshake also sends
  `HELLO 3` and, if the server speaks RESP3, `CLIENT TRACKING ON`, so the server
  remembers the keys this connection reads and pushes an invalidation when one changes
  (features/online/tracking.py). Pushes arrive in line with the replies and go to the
  listener as they are parsed, never into the FIFO. A server or proxy without RESP3 or
  CLIENT TRACKING (or an ACL user denied them) gets an untracked RESP2 or RESP3
  connection that reads the same; the listener hears which. HMGET, PING, AUTH and
  SELECT reply alike in both protocols.

Redis Cluster keeps redis-py's cluster pipeline (features/connection.py): a cluster read
splits its keys by slot over several nodes, follows MOVED and ASK redirects, and reloads
the slot map when a node fails. One connection per node behind this FIFO would have to
split each read over nodes and re-route redirected replies into the right places; the
cluster pipeline already does that, bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

import hiredis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import RedisSSLContext, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import AuthenticationError, InvalidResponse, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import format_error_message

from features._log import RateLimitedLog

Replies = list[Any]
"""One read's replies in command order: bytes, lists, None, or ResponseError values."""

PING = b"*1\r\n$4\r\nPING\r\n"
HELLO_3 = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"
TRACKING_ON = b"*3\r\n$6\r\nCLIENT\r\n$8\r\nTRACKING\r\n$2\r\nON\r\n"


class Listener(Protocol):
    """Who hears a tracked connection's session: opened, its pushes, lost."""

    def opened(self, tracked: bool, why: str) -> None:
        """A connection opened, with tracking on (`tracked`) or not (`why` says why)."""

    def pushed(self, message: list[Any]) -> None:
        """A RESP3 push arrived (e.g. `[b"invalidate", [key, ...]]`)."""

    def lost(self) -> None:
        """The tracked connection failed or was closed: its session is over."""


logger = logging.getLogger(__name__)
_BUGS = RateLimitedLog(logger, 10.0, level=logging.ERROR, exc_info=True)

_MORE = object()  # hiredis: no whole reply buffered yet
_SSL_OPTIONS = frozenset(RedisSSLContext.__slots__) - {"context"}


def pack(*args: str | bytes | int) -> bytes:
    """One command in RESP."""
    return bytes(hiredis.pack_command(args))  # type: ignore[arg-type]  # the stub: 1-tuples


def hmget_packer(fields: Sequence[str]) -> Callable[[str], bytes]:
    """`key -> HMGET key *fields` in RESP, with the fields packed once."""
    head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)
    tail = b"".join(b"$%d\r\n%b\r\n" % (len(raw), raw) for raw in (f.encode() for f in fields))

    def packed(key: str) -> bytes:
        raw = key.encode()
        return b"%b$%d\r\n%b\r\n%b" % (head, len(raw), raw, tail)

    return packed


Then = Callable[["Replies | RedisError"], None]
"""Called, inside the connection's callback, with a read's replies or the error that
failed it."""


class _Read:
    """One read in flight: its future (or `then`), how many replies it still awaits, when
    it is late."""

    __slots__ = ("due", "future", "left", "replies", "then")

    def __init__(
        self, future: asyncio.Future[Replies] | None, n_replies: int, then: Then | None = None
    ) -> None:
        self.future = future
        self.then = then
        self.left = n_replies
        self.replies: Replies = []
        self.due = math.inf  # set when written

    def answered(self) -> None:
        then = self.then
        if then is not None:
            _call(then, self.replies)
        elif self.future is not None and not self.future.done():  # else its caller gave up
            self.future.set_result(self.replies)

    def failed(self, error: RedisError) -> None:
        then = self.then
        if then is not None:
            _call(then, error)
        elif self.future is not None and not self.future.done():
            self.future.set_exception(error)


def _call(then: Then, outcome: Replies | RedisError) -> None:
    # `then` is the caller's and must not raise; if it does, the connection goes on.
    try:
        then(outcome)
    except Exception:
        _BUGS.failed("a multiplexed read's callback", sys.exc_info()[1] or Exception())


class _Connection(asyncio.Protocol):
    """One socket: reads buffered until the next flush, then in a FIFO until answered.

    Nothing is written until `open()` (after the handshake), except the handshake itself.
    Once `error` is set the connection is done: every read it held has failed with it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float | None,
        handshake: bytes = b"",
        n_handshake: int = 0,
        listener: Listener | None = None,
    ) -> None:
        self.peer = "?"  # host:port, for error messages; known once resolved
        self.error: RedisError | None = None
        self.listener = listener
        self.tracked = False  # CLIENT TRACKING is on: its loss ends the session
        self._loop = loop
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,  # redis-py's classes for error replies
            notEnoughData=_MORE,
        )
        self._buffer: list[bytes] = []
        self._unsent: list[_Read] = []
        self._pending: deque[_Read] = deque()
        self._open = False
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None
        self._handshake = handshake
        self.handshake: asyncio.Future[Replies] | None = None
        if handshake:
            self.handshake = loop.create_future()
            self._handshake_read = _Read(self.handshake, n_handshake)

    def send(self, payload: bytes, n_replies: int) -> asyncio.Future[Replies]:
        """Queue `payload` (`n_replies` commands) for the next flush; the future gets
        their replies, or the connection's error."""
        future: asyncio.Future[Replies] = self._loop.create_future()
        self._queue(payload, _Read(future, n_replies))
        return future

    def send_then(self, payload: bytes, n_replies: int, then: Then) -> None:
        """As `send`, but `then` gets the replies (or the error) in the callback that
        parsed them, not a task one loop iteration later."""
        self._queue(payload, _Read(None, n_replies, then))

    def _queue(self, payload: bytes, read: _Read) -> None:
        self._buffer.append(payload)
        self._unsent.append(read)
        if self._open and not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    @property
    def is_open(self) -> bool:
        """Connected, handshake done, not failed."""
        return self._open and self.error is None

    def exchange(self, payload: bytes, n_replies: int) -> asyncio.Future[Replies]:
        """Write `payload` at once, ahead of the reads queued (a later handshake step)."""
        future: asyncio.Future[Replies] = self._loop.create_future()
        future.add_done_callback(_retrieve)  # its connect may be gone when it fails
        transport = self._transport
        if self.error is not None or transport is None:
            future.set_exception(self.error or RedisConnectionError("not connected"))
            return future
        transport.write(payload)
        self._sent([_Read(future, n_replies)])
        return future

    def open(self) -> None:
        """The handshake succeeded: send what has queued, and everything after it."""
        self._open = True
        self._flush()

    def close(self, error: RedisError) -> None:
        """Fail every read held with `error` and drop the socket at once."""
        if self.error is not None:
            return
        self.error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reads = (*self._pending, *self._unsent)
        self._pending.clear()
        self._unsent.clear()
        for read in reads:
            read.failed(error)
        self._buffer.clear()
        if self.handshake is not None:
            if not self.handshake.done():
                self.handshake.set_exception(error)
            if not self.handshake.cancelled():
                self.handshake.exception()  # ours: retrieved, even if the connect is gone
        if self._transport is not None:
            self._transport.abort()
        if self.tracked:
            self.tracked = False
            assert self.listener is not None
            self.listener.lost()

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A write transport, though not always an asyncio.Transport instance (uvloop's).
        self._transport = cast(asyncio.Transport, transport)
        if self._handshake:  # alone: reads wait until it has succeeded
            self._transport.write(self._handshake)
            self._sent([self._handshake_read])

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        reader.feed(data)
        try:
            reply = reader.gets()
            while reply is not _MORE:
                if reply.__class__ is not list:  # HMGET replies skip both checks
                    if reply.__class__ is hiredis.PushNotification:
                        if self.listener is not None:
                            self.listener.pushed(reply)
                        reply = reader.gets()
                        continue
                    if isinstance(reply, RedisConnectionError):
                        raise reply  # e.g. NOAUTH, LOADING: the connection, not the key
                if not pending:
                    raise InvalidResponse("a reply to no command in flight")
                read = pending[0]
                read.replies.append(reply)
                read.left -= 1
                if not read.left:
                    pending.popleft()
                    read.answered()  # a future whose caller gave up drops them
                reply = reader.gets()
        except RedisError as exc:  # InvalidResponse from the parser, or the reply above
            self.close(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.close(RedisConnectionError("Connection closed by server."))
        else:
            self.close(RedisConnectionError(f"Error while reading from {self.peer} : {exc.args}"))

    # --- writing and timing ---------------------------------------------------------------

    def _flush(self) -> None:
        self._flushing = False
        buffer = self._buffer
        if self.error is not None or not buffer:
            return
        self._buffer = []
        transport = self._transport
        assert transport is not None  # open() follows the handshake, so connection_made()
        transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))
        self._sent(self._unsent)
        self._unsent = []

    def _sent(self, reads: list[_Read]) -> None:
        """`reads` were written: into the FIFO, due a socket timeout from now."""
        if self._timeout_s is not None:
            due = self._loop.time() + self._timeout_s
            for read in reads:
                read.due = due
            if self._timer is None:
                self._timer = self._loop.call_at(due, self._check_late)
        self._pending.extend(reads)

    def _check_late(self) -> None:
        # Lazy: armed for the oldest read when written, re-armed for the one then oldest.
        self._timer = None
        if self.error is not None or not self._pending:
            return
        due = self._pending[0].due
        if due <= self._loop.time():
            self.close(RedisTimeoutError(f"Timeout reading from {self.peer}"))
        else:
            self._timer = self._loop.call_at(due, self._check_late)


class Multiplexed:
    """All reads of one event loop over one connection, reopened after a failure."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        tls: RedisSSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        socket_timeout_s: float | None,
        connect_timeout_s: float | None,
        listener: Listener | None = None,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._listener = listener  # asks for CLIENT TRACKING at every connect
        self._resolve = resolve  # Sentinel: the master's address, asked at each connect
        self._tls = tls
        self._timeout_s = socket_timeout_s
        self._connect_timeout_s = connect_timeout_s
        handshake = []
        if username or password:
            auth = (username, password or "") if username else (password or "",)
            handshake.append(pack("AUTH", *auth))
        if db:
            handshake.append(pack("SELECT", db))
        if listener is not None:
            handshake.append(HELLO_3)  # last: its reply decides whether to track
        self._handshake = b"".join(handshake)
        self._checks: tuple[Callable[[Any], None], ...] = (
            *([_auth_ok] if username or password else []),
            *([_select_ok] if db else []),
        )
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def for_client(cls, client: aioredis.Redis, listener: Listener | None = None) -> Multiplexed:
        """A connection with every option of `client`'s pool (open_redis, standalone or
        sentinel), tracked for `listener` if one is given; nothing connects until the
        first read."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        tls = None
        if issubclass(pool.connection_class, SSLConnection):
            options = {k[4:]: v for k, v in kwargs.items() if k[4:] in _SSL_OPTIONS}
            tls = RedisSSLContext(**options)  # its SSLContext is built at the first connect
        unix = issubclass(pool.connection_class, UnixDomainSocketConnection)
        return cls(
            str(kwargs.get("host", "localhost")),
            int(kwargs.get("port", 6379)),
            path=kwargs.get("path") if unix else None,
            resolve=pool.get_master_address if isinstance(pool, SentinelConnectionPool) else None,
            tls=tls,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            db=int(kwargs.get("db") or 0),
            socket_timeout_s=kwargs.get("socket_timeout"),
            connect_timeout_s=kwargs.get("socket_connect_timeout"),
            listener=listener,
        )

    def request(self, payload: bytes, n_replies: int) -> asyncio.Future[Replies]:
        """Send `payload` (`n_replies` packed commands) with the next flush; the future
        gets their replies in order, or fails with a RedisError."""
        conn = self._conn
        if conn is None or conn.error is not None:
            if self._closed:
                future: asyncio.Future[Replies] = asyncio.get_running_loop().create_future()
                future.set_exception(RedisConnectionError("the connection is closed"))
                return future
            conn = self._reconnect()
        return conn.send(payload, n_replies)

    def request_then(self, payload: bytes, n_replies: int, then: Then) -> None:
        """As `request`, but `then` gets the replies in order (or the RedisError) inside
        the connection's callback that parsed them: a read without a task of its own."""
        conn = self._conn
        if conn is None or conn.error is not None:
            if self._closed:
                loop = asyncio.get_running_loop()  # never inside the caller's own call
                loop.call_soon(then, RedisConnectionError("the connection is closed"))
                return
            conn = self._reconnect()
        conn.send_then(payload, n_replies, then)

    def connected(self) -> bool:
        """Connected, handshake done, not failed."""
        return self._conn is not None and self._conn.is_open

    async def ping(self) -> None:
        """PING through the same connection (and its timeouts)."""
        (reply,) = await self.request(PING, 1)
        if isinstance(reply, Exception):
            raise reply

    async def connect(self) -> None:
        """Open the connection now if none is open or opening; errors are raised."""
        conn = self._conn
        if conn is None or conn.error is not None:
            conn = self._reconnect()
        if self._connecting is not None:
            await asyncio.shield(self._connecting)
        if conn.error is not None:
            raise conn.error

    async def aclose(self) -> None:
        """Fail what is in flight, close the socket; later reads fail at once."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._conn is not None:
            self._conn.close(RedisConnectionError("the connection is closed"))

    def _reconnect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        n_handshake = len(self._checks) + (self._listener is not None)
        conn = _Connection(loop, self._timeout_s, self._handshake, n_handshake, self._listener)
        self._conn = conn  # later reads queue here: one connect at a time
        self._connecting = loop.create_task(self._connect(conn))
        self._connecting.add_done_callback(self._connected)
        return conn

    def _connected(self, task: asyncio.Task[None]) -> None:
        if self._connecting is task:
            self._connecting = None

    async def _connect(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        # Until it opens, reads wait behind it unwritten, with no timer: every way out
        # must close it.
        error: RedisError = RedisConnectionError("the connection is closed")
        try:
            host, port = (
                (self._host, self._port) if self._resolve is None else await self._resolve()
            )
            conn.peer = self._path or f"{host}:{port}"
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    if self._path is not None:
                        await loop.create_unix_connection(lambda: conn, self._path)
                    else:
                        tls = None if self._tls is None else self._tls.get()
                        await loop.create_connection(lambda: conn, host, port, ssl=tls)
            except TimeoutError:
                raise RedisTimeoutError("Timeout connecting to server") from None
            except OSError as exc:  # refused, reset, TLS (ssl.SSLError), a missing CA file
                raise RedisConnectionError(format_error_message(conn.peer, exc)) from exc
            if conn.handshake is not None:
                replies = await conn.handshake
                n_checks = len(self._checks)
                for check, reply in zip(self._checks, replies[:n_checks], strict=True):
                    check(reply)
                if self._listener is not None:
                    await self._track(conn, replies[-1])
            conn.open()
        except RedisError as exc:
            error = exc
        except ValueError as exc:  # a bad TLS option: redis-py wraps it the same way
            error = RedisConnectionError(str(exc))
        finally:
            if not conn.is_open:
                conn.close(error)

    async def _track(self, conn: _Connection, hello: Any) -> None:
        """Turn CLIENT TRACKING on if the server answered HELLO 3; tell the listener."""
        assert self._listener is not None
        if not isinstance(hello, dict) or hello.get(b"proto") != 3:
            self._listener.opened(False, f"HELLO 3 answered {_shown(hello)}")
            return
        (reply,) = await conn.exchange(TRACKING_ON, 1)
        if isinstance(reply, RedisConnectionError):
            raise reply
        if reply != b"OK":
            self._listener.opened(False, f"CLIENT TRACKING ON answered {_shown(reply)}")
            return
        # Before the queued reads go out: every read on this connection is tracked.
        conn.tracked = True
        self._listener.opened(True, "")


def _shown(reply: Any) -> str:
    return f"{type(reply).__name__}: {reply}" if isinstance(reply, Exception) else repr(reply)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _auth_ok(reply: Any) -> None:
    if isinstance(reply, RedisError):
        raise reply
    if reply != b"OK":
        raise AuthenticationError("Invalid Username or Password")


def _select_ok(reply: Any) -> None:
    if isinstance(reply, RedisError):
        raise reply
    if reply != b"OK":
        raise RedisConnectionError("Invalid Database")
