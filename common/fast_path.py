"""An ASGI front that serves one hot route past FastAPI's middleware stack, routing and request object.

Both services put their per-request endpoints behind it (GET /recall, POST /search, POST /search/user): that machinery costs
≈ 0.15 ms of CPU a request here. The handler takes the query string (GET) or the whole body (POST) and returns
(status, JSON bytes), turning every error into its answer itself; every other path, and /docs' description of
the route, stays with the FastAPI app, whose own route for it answers the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

_JSON = (b"content-type", b"application/json")

Answer = Callable[[bytes], Awaitable[tuple[int, bytes]]]


class FastPath:
    """`FastPath(app, "GET", "/recall", answer)`: `answer(query_string)` for GET, `answer(body)` for POST."""

    def __init__(self, app: Any, method: str, path: str, answer: Answer):
        self.app, self.method, self.path, self.answer = app, method, path, answer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method:
            return await self.app(scope, receive, send)
        if self.method == "GET":
            arg = scope["query_string"]
        else:
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            arg = b"".join(chunks)
        status, body = await self.answer(arg)
        await send({"type": "http.response.start", "status": status,
                    "headers": [_JSON, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
