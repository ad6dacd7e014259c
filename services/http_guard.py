"""The request policy of the three services, as one ASGI layer in front of each app (outside FastAPI, so the fast
paths of common/fast_path.py pass through it too): Host allow-list, API keys, JSON-only bodies, body size, and
the whole-request time budget. Every refusal is JSON {"detail": ...} naming the setting involved.

Order: Host (400) → API key (401 missing, 403 wrong) → Content-Type of a body (415) → declared body size (413)
→ the app, whose body reads are counted (413 as soon as a chunked or streamed body passes the bound) and which must
answer within REQUEST_BUDGET_S (503). /healthz is always open (probes); /metrics and the docs per settings.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from common.settings import Settings
from services.deadlines import Deadlines, deadlines

OPEN_PATHS = frozenset({"/healthz"})
DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CLIENT_CLOSED = 499  # nginx's "client closed request": what a request whose client went away is recorded as


class BodyTooLarge(Exception):
    """Raised by the guarded `receive` once a request body passes the bound (answered 413)."""

    def __init__(self, limit: int):
        super().__init__(f"request body exceeds {limit} bytes (HTTP_MAX_BODY_BYTES)")
        self.limit = limit


def _json(status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    body = orjson.dumps({"detail": detail})
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    return start, {"type": "http.response.body", "body": body}


def _media_type(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip().lower()


def client_headers(settings: Settings, write: bool = False) -> dict[str, str]:
    """Headers a client of ours (the recall server's vector client, the demo) sends to a service: the read key, or
    with `write` the write key (which also reads); none when no key is set."""
    read, wr = settings.api_read_key, settings.api_write_key
    key = (wr or read) if write else (read or wr)
    return {"x-api-key": key} if key else {}


class HttpGuard:
    """`HttpGuard(app, settings, write_routes={("POST", "/events")})`: the policy in front of `app`."""

    def __init__(self, app: Any, settings: Settings, write_routes: Iterable[tuple[str, str]] = ()):
        self.app = app
        self.write_routes = frozenset(write_routes)
        read, write = settings.api_read_key, settings.api_write_key
        self.read_keys = tuple(k.encode() for k in (read, write) if k) if read else None
        self.write_keys = (write.encode(),) if write else ((read.encode(),) if read else None)
        self.keys_on, self.write_key_set = self.write_keys is not None, bool(write)
        self.metrics_open, self.docs_open = not settings.api_key_metrics, not settings.api_key_docs
        hosts = [h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()]
        self.hosts = frozenset(h for h in hosts if not h.startswith("*.")) if hosts else None
        self.host_suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))  # "*.x.com" → ".x.com"
        self.max_body, self.budget = settings.http_max_body_bytes, settings.request_budget_s
        self._expired: set[asyncio.Task] = set()  # requests cancelled for running past the budget
        self._deadlines: Deadlines | None = None
        self.screen = self.hosts is not None or self.keys_on  # every request needs a look at its headers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.screen or scope["method"] in BODY_METHODS:
            refusal = self.refusal(scope)
            if refusal is not None:
                start, body = refusal
                await send(start)
                await send(body)
                return
            if scope["method"] in BODY_METHODS:
                receive = self._bounded(receive)
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        task = asyncio.current_task()
        dl = self._deadlines
        if dl is None or dl.loop is not task.get_loop():
            dl = self._deadlines = deadlines()
        dl.add(task, dl.loop.time() + self.budget, self._over_budget)
        try:
            try:
                await self.app(scope, receive, send_tracked)
            finally:
                dl.discard(task)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            if not started:
                for m in _json(503, f"request not answered within its time budget of {self.budget:g}s "
                                    "(REQUEST_BUDGET_S)"):
                    await send(m)
        except BodyTooLarge as exc:  # raised through an app without a handler for it (the fast paths)
            if not started:
                for m in _json(413, str(exc), [(b"connection", b"close")]):
                    await send(m)
        except ClientDisconnect:
            pass
        finally:
            self._expired.discard(task)

    def _over_budget(self, task: asyncio.Task) -> None:
        self._expired.add(task)
        task.cancel()

    def refusal(self, scope: dict) -> tuple[dict, dict] | None:
        """The answer that refuses this request before the app sees it, or None."""
        headers = scope["headers"]
        if self.hosts is not None:
            host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            name = name.strip("[]")
            if name not in self.hosts and not (self.host_suffixes and name.endswith(self.host_suffixes)):
                return _json(400, f"Host {host[:100]!r} is not served here (ALLOWED_HOSTS)")
        if self.keys_on:
            keys = self._required_keys(scope["method"], scope["path"])
            if keys is not None:
                given = None
                for k, v in headers:
                    if k == b"x-api-key":
                        given = v.strip()
                        break
                    if k == b"authorization" and v[:7].lower() == b"bearer ":
                        given = v[7:].strip()
                        break
                write = self.write_key_set and (scope["method"], scope["path"]) in self.write_routes
                setting = "API_WRITE_KEY" if write else "API_READ_KEY"
                if not given:
                    return _json(401, f"an API key is required ({setting}): send it as `X-API-Key: <key>` or "
                                      "`Authorization: Bearer <key>`", [(b"www-authenticate", b"Bearer")])
                if not any(hmac.compare_digest(given, k) for k in keys):
                    return _json(403, f"this API key is not valid for {scope['method']} {scope['path']} ({setting})")
        if scope["method"] in BODY_METHODS:
            ctype = length = None
            for k, v in headers:
                if k == b"content-type":
                    ctype = v
                elif k == b"content-length":
                    length = v
            # only POST routes take bodies here: a PUT/PATCH goes on to the router's 405
            if scope["method"] == "POST" and (ctype is None or _media_type(ctype) != b"application/json"):
                got = "none" if ctype is None else repr(ctype.decode("latin-1")[:60])
                return _json(415, f"{scope['method']} {scope['path']} takes a JSON body: send "
                                  f"`Content-Type: application/json` (got {got})")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return _json(413, f"request body of {int(length)} bytes exceeds {self.max_body} bytes "
                                  "(HTTP_MAX_BODY_BYTES)", [(b"connection", b"close")])
        return None

    def _required_keys(self, method: str, path: str) -> tuple[bytes, ...] | None:
        if path in OPEN_PATHS:
            return None
        if (method, path) in self.write_routes:
            return self.write_keys
        if (path == "/metrics" and self.metrics_open) or (path in DOCS_PATHS and self.docs_open):
            return None
        return self.read_keys

    def _bounded(self, receive):
        limit, seen = self.max_body, 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return bounded_receive


def install(app: FastAPI) -> None:
    """Register the answers to the guard's in-app exceptions on a FastAPI app: 413 for a body past the bound
    (raised while the endpoint reads it), and nothing but a quiet 499 record for a client that went away mid-body
    (not an error of the server: no 500, no traceback)."""

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
        return Response(orjson.dumps({"detail": str(exc)}), status_code=413, media_type="application/json",
                        headers={"connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(orjson.dumps({"detail": "client closed the connection before its request body was complete"}),
                        status_code=CLIENT_CLOSED, media_type="application/json")
