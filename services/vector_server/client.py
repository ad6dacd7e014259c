"""Async client of the vector server (used by the recall server): keep-alive connections, typed errors.

Built on aiohttp rather than httpx: on the recall server's request path the client's CPU is part of every
request, and aiohttp spends ≈0.10 ms of CPU per call here against httpx's ≈0.47 ms (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson


class VectorServerError(Exception):
    """Base class of every error raised by `VectorClient`; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class VectorServerUnavailable(VectorServerError):
    """The server cannot be reached or answered 5xx (e.g. Redis down, channel not loaded yet)."""


class VectorServerTimeout(VectorServerError):
    """No answer within the time budget."""


class VectorNotFound(VectorServerError):
    """404: the channel has no vector for this user (no tower, no precomputed vector)."""


class VectorBadRequest(VectorServerError):
    """4xx other than 404: the request is wrong (unknown channel, bad k, wrong dimension)."""


def _detail(content: bytes) -> str:
    try:
        return str(orjson.loads(content).get("detail"))
    except Exception:
        return content[:300].decode("utf-8", "replace")


class VectorClient:
    """`await VectorClient(url, timeout_s).search_user(channel, user_id, k)` → the /search response dict.

    The aiohttp session is opened on first use, inside the running event loop."""

    def __init__(self, base_url: str, timeout_s: float = 0.5, max_connections: int = 64,
                 headers: dict[str, str] | None = None):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self.headers = {"content-type": "application/json", **(headers or {})}  # e.g. the API key
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def __aenter__(self) -> VectorClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=None)
            self._session = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode(),
                                                  headers=self.headers)
        return self._session

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        t = self._timeouts.get(seconds)
        if t is None:
            t = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return t

    async def _request(self, method: str, path: str, body: dict | None, timeout_s: float | None) -> dict[str, Any]:
        seconds = timeout_s if timeout_s is not None else self.timeout_s
        data = None if body is None else orjson.dumps(body)
        url = self.base_url + path
        for attempt in (0, 1):
            try:
                async with self._open().request(method, url, data=data, timeout=self._timeout(seconds)) as resp:
                    status, content = resp.status, await resp.read()
                break
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                raise VectorServerTimeout(f"vector server {url}: timed out ({seconds:.3f}s): "
                                          f"{type(exc).__name__}") from exc
            except aiohttp.ServerDisconnectedError as exc:  # a kept-alive connection the server had closed
                if attempt:
                    raise VectorServerUnavailable(f"vector server {self.base_url} disconnected: {exc}") from exc
            except aiohttp.ClientError as exc:
                raise VectorServerUnavailable(f"vector server {self.base_url} unreachable: {type(exc).__name__}: "
                                              f"{exc}") from exc
        if status == 200:
            return orjson.loads(content)
        msg = f"vector server {path} → {status}: {_detail(content)}"
        if status == 404:
            raise VectorNotFound(msg, status)
        if 400 <= status < 500:
            raise VectorBadRequest(msg, status)
        raise VectorServerUnavailable(msg, status)

    async def search_user(self, channel: str, user_id: str, k: int, exclude: list[str] | None = None,
                          recent: list[str] | None = None, exclude_seen: bool = False,
                          timeout_s: float | None = None) -> dict[str, Any]:
        """Top-k of `channel` for a user: {"channel","version","source","ids","item_ids","scores"}."""
        body: dict[str, Any] = {"channel": channel, "user_id": str(user_id), "k": int(k)}
        if exclude:
            body["exclude"] = [str(x) for x in exclude]
        if recent is not None:
            body["recent"] = [str(x) for x in recent]
        if exclude_seen:
            body["exclude_seen"] = True
        return await self._request("POST", "/search", body, timeout_s)

    async def search_user_channels(self, user_id: str, channels: dict[str, int], exclude: list[str] | None = None,
                                   recent: list[str] | None = None, attrs: dict[str, Any] | None = None,
                                   item_ids: bool = True, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Top-k of several channels for one user in one call (POST /search/user): {channel: result}, where a
        result is {"status": 200, "version", "source", "ids", "scores"[, "item_ids"]} or {"status", "detail"}.
        Passing the user's `recent` items and `attrs` spares the server its own read of the user's state."""
        body: dict[str, Any] = {"user_id": str(user_id), "channels": channels, "item_ids": item_ids}
        if exclude:
            body["exclude"] = exclude
        if recent is not None:
            body["recent"] = recent
        if attrs is not None:
            body["attrs"] = attrs
        return (await self._request("POST", "/search/user", body, timeout_s))["results"]

    async def search_vector(self, channel: str, vector, k: int, exclude: list[str] | None = None,
                            timeout_s: float | None = None) -> dict[str, Any]:
        """Top-k of `channel` for an explicit query vector."""
        body: dict[str, Any] = {"channel": channel, "vector": [float(x) for x in vector], "k": int(k)}
        if exclude:
            body["exclude"] = [str(x) for x in exclude]
        return await self._request("POST", "/search", body, timeout_s)

    async def healthz(self, timeout_s: float | None = None) -> dict[str, Any]:
        """GET /healthz (raises VectorServerUnavailable on 503)."""
        return await self._request("GET", "/healthz", None, timeout_s)
