"""uvicorn's httptools protocol with two bounds on what a connection can make a worker do before its request
reaches the app: the size of a request's head (HTTP_MAX_HEAD_BYTES) and the time to receive the request
(HTTP_RECEIVE_TIMEOUT_S). All three services run with it (`uvicorn_options`).

Why: httptools gathers a header value that arrives over many reads by concatenation, so one 64 MB header held a
recall worker busy for seconds while every other client waited; and a connection that sent its head a byte at a
time, or nothing at all, was held for ever (slowloris). A rejection is a JSON answer with `connection: close`;
the connection then lingers a moment, discarding what the client still sends, so that the client reads the
answer rather than a reset. Per request this costs a few additions and one deadline (services/deadlines.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from common.settings import Settings, get_settings
from services.deadlines import deadlines

PROTOCOL = "services.http_protocol:GuardedHttpToolsProtocol"
LINGER_S = 2.0  # after a rejection: how long the rest of the client's data is read and discarded


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keyword arguments every service passes (the guarded protocol; its limits come
    from the settings of the worker process, read from the environment)."""
    return {"http": PROTOCOL}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that answers 431 to an oversized head, 408 to one that arrives too slowly, closes a
    connection whose body arrives too slowly or that starts no request in time, and answers parse errors in JSON."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.max_head, self.receive_timeout = settings.http_max_head_bytes, settings.http_receive_timeout_s
        self.head_bytes = 0  # bytes read while the current request's head is incomplete; -1 once it is complete
        self.armed = False  # a receive deadline is pending
        self.rejected = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.deadlines = deadlines()
        self._arm()  # a new connection must start (and finish) a request in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.deadlines.add(self, self.loop.time() + self.receive_timeout, self._receive_timed_out)
        self.armed = True

    def _disarm(self) -> None:
        if self.armed:
            self.deadlines.discard(self)
            self.armed = False

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return  # lingering after a rejection: discard
        if self.head_bytes < 0:
            super().data_received(data)
            return
        if not self.armed:
            self._arm()
        self.head_bytes += len(data)
        super().data_received(data)  # at most max_head + one read (≤ 256 KiB) of a head is ever parsed
        if self.head_bytes > self.max_head and not self.rejected and not self.transport.is_closing():
            self._reject(431, f"request line and headers exceed {self.max_head} bytes (HTTP_MAX_HEAD_BYTES); "
                              "send long id lists in a JSON body (POST)")

    def on_headers_complete(self) -> None:
        self.head_bytes = -1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head_bytes = 0  # what follows is the next request's head
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        self._reject(400, f"{msg.rstrip('.')}: malformed HTTP, or a URL over 64 KiB (the parser's bound; send long "
                          "id lists in a JSON body with POST)")

    def _receive_timed_out(self, _key: object = None) -> None:
        self.armed = False
        if self.rejected or self.transport.is_closing():
            return
        idle = self.cycle is None or self.cycle.response_complete
        if self.head_bytes > 0 and idle:
            self._reject(408, f"request head not received within {self.receive_timeout:g}s (HTTP_RECEIVE_TIMEOUT_S)")
        else:  # nothing sent at all, or a body still arriving (the app sees the client go away)
            self.transport.close()

    def _reject(self, status: int, detail: str) -> None:
        """Answer `status` with a JSON detail, then close (lingering) — unless a response is under way, in
        which case only close."""
        self.rejected = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        body = orjson.dumps({"detail": detail})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is complete; keep reading (and dropping) for a moment
            self.flow.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
