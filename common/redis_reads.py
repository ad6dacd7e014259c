"""Pipelined reads for the serving hot path: one shared asyncio connection per Redis DB, parsed by hiredis.

redis-py's asyncio client costs ≈100 µs of CPU per command on these machines (≈180 µs for the 3-command
user-state pipeline), almost all of it in its stream, connection-pool and command machinery rather than in the
protocol. The services' per-request reads need none of that: RESP answers arrive in the order the commands were
sent, so every concurrent request of a worker can write its commands to one connection and wait for as many
replies (≈25 µs for the same pipeline). Serialisation and parsing are hiredis's (`pack_command`, `Reader`);
errors are redis-py's exception classes, so callers handle both clients alike. Writes, scripts, pub/sub and
administration stay on redis-py (`common.redis_conn`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
import redis.exceptions

from common.breaker import FAILURES, CircuitBreaker

Command = tuple[Any, ...]


class _RespProtocol(asyncio.Protocol):
    """One connection: a FIFO of waiting calls, each taking the next `n` replies."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=redis.exceptions.ResponseError)
        self.waiting: deque[tuple[asyncio.Future, int, list]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        try:
            while waiting:
                reply = self.reader.gets()
                if reply is False:
                    return
                fut, n, replies = waiting[0]
                replies.append(reply)
                if len(replies) == n:
                    waiting.popleft()
                    if not fut.done():  # a caller that timed out or was cancelled no longer waits
                        fut.set_result(replies)
        except hiredis.ProtocolError as exc:
            self.abort(redis.exceptions.ConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.exceptions.ConnectionError(
            f"connection to Redis lost: {exc}" if exc else "connection to Redis closed"))

    def fail(self, err: Exception) -> None:
        self.closed = self.closed or err
        while self.waiting:
            fut, _, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(err)

    def abort(self, err: Exception) -> None:
        self.fail(err)
        if self.transport is not None:
            self.transport.abort()


class SharedCall:
    """Runs one coroutine at a time: callers arriving while it runs await the same result or exception."""

    def __init__(self) -> None:
        self._fut: asyncio.Future | None = None

    async def __call__(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        if self._fut is not None:
            return await asyncio.shield(self._fut)
        fut = self._fut = asyncio.get_running_loop().create_future()
        try:
            result = await fn()
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # concurrent callers get it through their shield; nobody else must
            raise
        except BaseException:
            fut.cancel()
            raise
        finally:
            self._fut = None
        fut.set_result(result)
        return result


class ExecuteReads:
    """`mget` and `get` on top of a reader's pipelined `execute` (RedisReads, the cluster reader)."""

    async def execute(self, commands: list[Command], raise_errors: bool = True) -> list:
        raise NotImplementedError

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return (await self.execute([("MGET", *keys)]))[0]

    async def get(self, key: str) -> bytes | None:
        return (await self.execute([("GET", key)]))[0]


class RedisReads(ExecuteReads):
    """Read commands against one Redis DB (a `redis://` URL) over one pipelined connection, opened on
    first use and re-opened after a failure. Raises `redis.exceptions.ConnectionError` / `TimeoutError` /
    `ResponseError`."""

    def __init__(self, url: str, db: int, timeout_s: float = 1.0, breaker: CircuitBreaker | None = None):
        u = urlparse(url)
        if u.scheme != "redis":
            raise ValueError(f"RedisReads takes redis:// URLs, not {u.scheme}:// (use RedisPyReads)")
        self.url, self.db, self.timeout_s, self.breaker = url, db, timeout_s, breaker
        self._addr = (u.hostname or "127.0.0.1", u.port or 6379)
        self._auth = [unquote(x) for x in (u.username, u.password) if x] if u.password else []
        self._proto: _RespProtocol | None = None
        self._connecting = SharedCall()

    async def _connect(self) -> _RespProtocol:
        proto = self._proto = await self._connecting(self._open)  # one connect at a time; callers share it
        return proto

    async def _open(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, proto = await loop.create_connection(_RespProtocol, *self._addr)
                hello = ([("AUTH", *self._auth)] if self._auth else []) + ([("SELECT", self.db)] if self.db else [])
                if hello:
                    try:
                        await self._send(proto, hello)
                    except BaseException:  # wrong password, no such DB, cancelled: do not leak the socket
                        proto.abort(redis.exceptions.ConnectionError("handshake failed"))
                        raise
        except TimeoutError:
            raise redis.exceptions.TimeoutError(f"Redis at {self._where()} did not accept a connection within "
                                                f"{self.timeout_s:g}s") from None
        except OSError as exc:
            raise redis.exceptions.ConnectionError(f"cannot connect to Redis at {self._where()}: {exc}") from None
        return proto

    def _where(self) -> str:
        return f"{self._addr[0]}:{self._addr[1]}"

    async def _send(self, proto: _RespProtocol, commands: list[Command], raise_errors: bool = True) -> list:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        proto.waiting.append((fut, len(commands), []))
        proto.transport.write(b"".join([hiredis.pack_command(c) for c in commands]))
        timer = loop.call_later(self.timeout_s, _expire, proto, fut, self.timeout_s)
        try:
            replies = await fut
        finally:
            timer.cancel()
        if raise_errors:
            for r in replies:
                if isinstance(r, redis.exceptions.ResponseError):
                    raise r
        return replies

    async def execute(self, commands: list[Command], raise_errors: bool = True) -> list:
        """Replies of `commands`, sent in one write (a pipeline without MULTI); with `raise_errors=False` an error
        reply is returned in its place (a `ResponseError`; common/redis_cluster.py reads MOVED/ASK from it)."""
        breaker = self.breaker
        if breaker is not None:
            breaker.check()
        try:
            proto = self._proto
            if proto is None or proto.closed is not None:
                proto = await self._connect()
            replies = await self._send(proto, commands, raise_errors)
        except FAILURES as exc:
            if breaker is not None:
                breaker.failure(exc)
            raise
        if breaker is not None:
            breaker.success()
        return replies

    def close(self) -> None:
        if self._proto is not None:
            self._proto.abort(redis.exceptions.ConnectionError("client closed"))
            self._proto = None


def _expire(proto: _RespProtocol, fut: asyncio.Future, timeout_s: float) -> None:
    """A call got no reply in time: fail it and drop the connection (its state is unknown; the next call
    reconnects)."""
    if not fut.done():
        proto.abort(redis.exceptions.TimeoutError(f"Redis did not answer within {timeout_s:g}s"))


class RedisPyReads:
    """The same calls over a redis-py asyncio client (URLs RedisReads does not handle, e.g. rediss://)."""

    def __init__(self, client):
        self.client = client

    async def execute(self, commands: list[Command]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c)
        return await pipe.execute()

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        return await self.client.mget(keys) if keys else []

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(key)

    def close(self) -> None:
        pass


def pairs(reply: list | dict) -> dict:
    """An HGETALL reply as a dict (RESP2 sends it flat: [field, value, ...]; redis-py already made a dict)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))
