"""Keep-alive connections recycled after a number of requests (serving/connections.py): on
a stand-in app, and through the real `bentoml serve` on one TCP connection."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from serving import connections
from serving.connections import RecycleConnections
from serving.runtime import RuntimeConfigError, max_requests_per_connection
from tests.conftest import Service


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
    await send({"type": "http.response.body", "body": b"{}"})


def scope(port: int) -> dict[str, Any]:
    return {"type": "http", "path": "/predict", "client": ("127.0.0.1", port), "headers": []}


async def respond(middleware: RecycleConnections, port: int) -> list[tuple[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    await middleware(scope(port), receive, send)
    return list(sent[0]["headers"])


async def test_every_nth_response_of_a_connection_closes_it() -> None:
    recycle = RecycleConnections(app, max_requests=3)
    seen = [await respond(recycle, 5000) for _ in range(7)]
    closes = [(b"connection", b"close") in headers for headers in seen]
    assert closes == [False, False, True, False, False, True, False]
    assert all((b"x-a", b"1") in headers for headers in seen)  # the app's own headers kept
    assert not any((b"connection", b"close") in h for h in [await respond(recycle, 5001)])
    # Lifespan and other scopes pass through untouched.
    passed: list[str] = []

    async def other(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope["type"])

    await RecycleConnections(other, 1)({"type": "lifespan"}, None, None)
    assert passed == ["lifespan"]


async def test_the_counts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "MAX_TRACKED", 10)
    recycle = RecycleConnections(app, max_requests=1000)
    for port in range(25):
        await respond(recycle, port)
    assert len(recycle._counts) <= 10


def test_the_setting_is_validated() -> None:
    assert max_requests_per_connection({}) == 100
    assert max_requests_per_connection({"FRAUD_MAX_REQUESTS_PER_CONNECTION": "0"}) == 0
    assert max_requests_per_connection({"FRAUD_MAX_REQUESTS_PER_CONNECTION": "7"}) == 7
    for bad in ("-1", "ten", "1.5", ""):
        with pytest.raises(RuntimeConfigError, match=r"^FRAUD_MAX_REQUESTS_PER_CONNECTION="):
            max_requests_per_connection({"FRAUD_MAX_REQUESTS_PER_CONNECTION": bad})


@pytest.mark.e2e
def test_the_service_closes_a_connection_after_its_hundredth_request(service: Service) -> None:
    port = int(service.url.rsplit(":", 1)[1])
    request = b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for n in range(1, 101):
            sock.sendall(request)
            head = []
            while (line := reader.readline()) not in (b"\r\n", b""):
                head.append(line.lower())
            length = next(int(h.split(b":")[1]) for h in head if h.startswith(b"content-length"))
            reader.read(length)
            assert head[0].startswith(b"http/1.1 200"), head
            assert (b"connection: close\r\n" in head) == (n == 100), n
        assert reader.read() == b""  # the server closed it
