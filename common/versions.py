"""Keeps the services' view of each channel's `current` version fresh without a read per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class VersionWatcher:
    """Polls `current` pointers (one MGET) every `interval_s`; calls `on_change(channel, old, new)`."""

    def __init__(self, astores, channels: list[str], interval_s: float = 1.0,
                 on_change: Callable[[str, str | None, str | None], Awaitable[None] | None] | None = None):
        self.astores, self.channels, self.interval_s, self.on_change = astores, list(channels), interval_s, on_change
        self.versions: dict[str, str | None] = {c: None for c in self.channels}
        self.healthy = False
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    async def refresh(self) -> dict[str, str | None]:
        ks = self.astores.keyspace
        values = await self.astores("meta").mget([ks.current(c) for c in self.channels])
        for c, v in zip(self.channels, values, strict=True):
            new = v.decode() if v else None
            old = self.versions.get(c)
            if new != old:
                self.versions[c] = new
                if self.on_change is not None:
                    r = self.on_change(c, old, new)
                    if asyncio.iscoroutine(r):
                        await r
        self.healthy, self.last_error = True, None
        return self.versions

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep serving the versions we know
                self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
                log.warning("version refresh failed: %s", self.last_error)
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
