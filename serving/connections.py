"""Keep-alive connections recycled after a number of requests, so workers share the load.

Every worker accepts from one listening socket, and a keep-alive connection stays with the
worker that accepted it. A client that opens its connections at once (a load balancer, a
gateway's pool) leaves them where they first landed: `make load` saw splits of 8023 / 3425
requests between two workers. After `max_requests` on one connection the response says
`Connection: close`, the client connects again, and the kernel hands the new connection to
a worker waiting in accept, which is more often the less busy one: Envoy's
max_requests_per_connection, from the server's side.
"""

from __future__ import annotations

from typing import Any

ASGIApp = Any

MAX_TRACKED = 65_536
"""Connections counted at once; past it the counts start again (a few connections then live
a little longer)."""

_CLOSE = (b"connection", b"close")


class RecycleConnections:
    """ASGI middleware: `Connection: close` on each connection's `max_requests`-th response."""

    def __init__(self, app: ASGIApp, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self._counts: dict[tuple[Any, ...], int] = {}  # the peer's (host, port): one connection

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        client = scope.get("client") if scope["type"] == "http" else None
        if client is None:
            await self.app(scope, receive, send)
            return
        peer = tuple(client)
        counts = self._counts
        served = counts.get(peer, 0) + 1
        if served < self.max_requests:
            if len(counts) >= MAX_TRACKED and peer not in counts:
                counts.clear()
            counts[peer] = served
            await self.app(scope, receive, send)
            return
        counts.pop(peer, None)

        async def closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        await self.app(scope, receive, closing)
