"""ASGI middleware that refuses, before the API parses anything, a body that is not JSON
(415) or is over the size limit (413)."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

ASGIApp = Any  # (scope, receive, send) -> awaitable; starlette's types are not needed here


class RequestLimits:
    """ASGI middleware, before the API parses anything: a body that is not JSON gets
    415, and one over `max_bytes` gets 413.

    Checks Content-Length first, then counts what arrives (chunked bodies declare
    none), so at most `max_bytes` of a request is ever held in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            shown = media_type.decode("latin-1")[:50] or "none"
            await refuse(send, HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"content-type: {shown}, must be application/json")  # fmt: skip
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send, declared.decode("latin-1")[:20])
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, f"over {size}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                message: dict[str, Any] = await receive()  # the disconnect, later
                return message
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, size: str) -> None:
        message = f"body: {size} bytes, at most {self.max_bytes}"
        await refuse(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)


async def refuse(send: Any, status: HTTPStatus, message: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})
