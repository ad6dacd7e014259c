"""The vector server's search running inside another process (the recall server's workers, VECTOR_MODE=embedded).

Same search core as the HTTP server (`core.VectorService`: version watching, hot swaps, towers, faiss), minus
the HTTP hop: on small and medium catalogues that hop costs more CPU per request than the searches themselves.
Each process that embeds it holds its own copy of every index (see docs/vector_server.md for when to choose it).
It never imports the FastAPI app (services/vector_server/app.py).
"""

from __future__ import annotations

from typing import Any

from common.settings import Settings
from services.vector_server.client import VectorBadRequest, VectorServerUnavailable
from services.vector_server.core import HTTPError, UserSearchRequest, VectorService, configure_threads


class EmbeddedVectorSearch:
    """Drop-in for `VectorClient` on the recall server's path: `search_user_channels` and `healthz`."""

    def __init__(self, settings: Settings):
        configure_threads(settings.omp_threads)
        self.service = VectorService(settings)

    async def start(self) -> None:
        """Load the id maps and start watching versions (indexes load in the background)."""
        await self.service.start()

    async def aclose(self) -> None:
        await self.service.stop()

    async def search_user_channels(self, user_id: str, channels: dict[str, int], exclude: list[str] | None = None,
                                   recent: list[str] | None = None, attrs: dict[str, Any] | None = None,
                                   item_ids: bool = True, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Same contract as `VectorClient.search_user_channels` (per-channel status inside the result)."""
        req = UserSearchRequest(str(user_id), channels, exclude or [], recent, attrs, False, item_ids)
        try:
            return await self.service.user_searches(req)
        except HTTPError as exc:
            raise _client_error(exc) from None

    def search_user_channels_now(self, user_id: str, channels: dict[str, int], exclude: list[str] | None = None,
                                 recent: list[str] | None = None, attrs: dict[str, Any] | None = None,
                                 item_ids: bool = True) -> dict[str, dict[str, Any]] | None:
        """`search_user_channels` run synchronously when it needs no I/O (the caller sends `recent` and `attrs`,
        precomputed user vectors are in memory); None when it would have to read Redis."""
        req = UserSearchRequest(str(user_id), channels, exclude or [], recent, attrs, False, item_ids)
        try:
            return self.service.user_searches_now(req)
        except HTTPError as exc:
            raise _client_error(exc) from None

    async def healthz(self, timeout_s: float | None = None) -> dict[str, Any]:
        status, body = await self.service.health()
        if status != 200:
            raise VectorServerUnavailable(str(body.get("detail")), status)
        return body


def _client_error(exc: HTTPError) -> Exception:
    """The exception `VectorClient` raises for the same HTTP answer."""
    if exc.status < 500:
        return VectorBadRequest(exc.detail, exc.status)
    return VectorServerUnavailable(exc.detail, exc.status)
