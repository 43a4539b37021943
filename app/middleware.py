"""ASGI middleware of the service: the request-body limit, enforced while the body streams in
(before any parsing), so an oversized body is a 413 in the stable error shape."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from app.http_errors import envelope


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a body over ``limit`` bytes, declared or streamed.

    The body (at most ``limit`` bytes) is read here and replayed to the app, so an oversized
    chunked upload is refused before any handler sees it.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_large = envelope("payload_too_large", f"request body exceeds {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, too_large)
            return
        buffered: list[dict[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await _send_json(send, 413, too_large)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Any:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Callable[[Any], Awaitable[None]], status: int,
                     body: dict[str, Any]) -> None:

    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
