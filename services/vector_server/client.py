"""Async client of the vector server (used by the recall server): keep-alive connections, typed errors."""

from __future__ import annotations

from typing import Any

import httpx
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


def _detail(resp: httpx.Response) -> str:
    try:
        return str(orjson.loads(resp.content).get("detail"))
    except Exception:
        return resp.text[:300]


class VectorClient:
    """`await VectorClient(url, timeout_s).search_user(channel, user_id, k)` → the /search response dict."""

    def __init__(self, base_url: str, timeout_s: float = 0.5, max_connections: int = 64):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"content-type": "application/json"})

    async def __aenter__(self) -> VectorClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, body: dict | None, timeout_s: float | None) -> dict[str, Any]:
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        try:
            resp = await self._client.request(method, path, content=None if body is None else orjson.dumps(body),
                                              timeout=timeout)
        except httpx.TimeoutException as exc:
            raise VectorServerTimeout(f"vector server {self.base_url}{path}: timed out "
                                      f"({timeout_s or self.timeout_s:.3f}s): {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise VectorServerUnavailable(f"vector server {self.base_url} unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code == 200:
            return orjson.loads(resp.content)
        msg = f"vector server {path} → {resp.status_code}: {_detail(resp)}"
        if resp.status_code == 404:
            raise VectorNotFound(msg, resp.status_code)
        if 400 <= resp.status_code < 500:
            raise VectorBadRequest(msg, resp.status_code)
        raise VectorServerUnavailable(msg, resp.status_code)

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
