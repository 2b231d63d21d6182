"""The delaying TCP proxy, against the real redis-server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tools.delay_proxy import DelayProxy
from tools.redis_server import RedisServer


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    with DelayProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


@pytest.fixture
def through(proxy: DelayProxy) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(proxy.url(), socket_timeout=5)
    yield client
    client.close()


def timed_ping(client: redis.Redis) -> float:
    started = time.perf_counter()
    assert client.ping()
    return time.perf_counter() - started


def test_ping_passes_through_and_is_delayed(proxy: DelayProxy, through: redis.Redis) -> None:
    assert proxy.url(3) == f"redis://127.0.0.1:{proxy.port}/3"
    timed_ping(through)  # connects
    assert timed_ping(through) < 0.5
    proxy.set_delay(0.05)
    assert timed_ping(through) >= 0.05
    proxy.set_delay(0)
    assert timed_ping(through) < 0.5


def test_pipelined_replies_keep_their_order(proxy: DelayProxy, through: redis.Redis) -> None:
    proxy.set_delay(0.02)
    payloads = [f"{i}:" + "x" * (i * 97 % 5000) for i in range(300)]
    pipe = through.pipeline(transaction=False)
    for payload in payloads:
        pipe.echo(payload)
    assert [r.decode() for r in pipe.execute()] == payloads


def test_delays_do_not_add_up(proxy: DelayProxy) -> None:
    # Five PINGs 10 ms apart on one connection: each reply is released 100 ms after it
    # arrived (about 0.14 s in all), not 100 ms after the previous one (0.5 s).
    proxy.set_delay(0.1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
        started = time.perf_counter()
        for _ in range(5):
            conn.sendall(b"PING\r\n")
            time.sleep(0.01)
        received = b""
        while received.count(b"+PONG\r\n") < 5:
            chunk = conn.recv(4096)
            assert chunk, "proxy closed the connection"
            received += chunk
        elapsed = time.perf_counter() - started
    assert received == b"+PONG\r\n" * 5
    assert 0.1 <= elapsed < 0.4


def test_stop_closes_connections_and_leaves_no_thread(redis_server: RedisServer) -> None:
    proxy = DelayProxy("127.0.0.1", redis_server.port, delay_s=0.01).start()
    port = proxy.port
    client = redis.Redis.from_url(proxy.url(), socket_timeout=5, retry=Retry(NoBackoff(), 0))
    assert client.ping()
    proxy.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("delay-proxy-")]
    with pytest.raises(redis.ConnectionError):
        client.ping()  # its connection was closed, and nothing listens any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    client.close()
    proxy.stop()  # a second stop is harmless


def test_negative_delay_is_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="delay_s"):
        DelayProxy("127.0.0.1", redis_server.port, delay_s=-1)
