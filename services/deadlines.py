"""Deadlines checked by one periodic task per event loop, for the per-request bounds of services/http_protocol.py
(receive timeout) and services/http_guard.py (request budget).

A timer handle per request (`loop.call_later`, or `asyncio.timeout`) costs 3–7 µs on these machines, twice per
/recall in remote mode (the recall server's request and its vector search); a deadline here is a dict insert and a
delete. The price is resolution: a deadline fires up to TICK_S late, which is nothing next to the bounds themselves
(seconds).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

TICK_S = 0.1


class Deadlines:
    """`add(key, at, callback)` runs `callback(key)` once `loop.time()` passes `at`, unless `discard(key)` first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = TICK_S):
        self.loop, self.tick_s = loop, tick_s
        self._due: dict[Hashable, tuple[float, Callable[[Hashable], None]]] = {}
        self._task: asyncio.Task | None = None

    def add(self, key: Hashable, at: float, callback: Callable[[Hashable], None]) -> None:
        self._due[key] = (at, callback)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._sweep())

    def discard(self, key: Hashable) -> None:
        self._due.pop(key, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            now = self.loop.time()
            for key in [k for k, (at, _) in self._due.items() if at <= now]:
                _, callback = self._due.pop(key)
                try:
                    callback(key)
                except Exception:  # one bad callback must not stop every other deadline
                    log.exception("deadline callback failed")


_per_loop: dict[asyncio.AbstractEventLoop, Deadlines] = {}


def deadlines() -> Deadlines:
    """The Deadlines of the running event loop (one per worker process in practice)."""
    loop = asyncio.get_running_loop()
    d = _per_loop.get(loop)
    if d is None:
        for old in [lp for lp in _per_loop if lp.is_closed()]:
            del _per_loop[old]
        d = _per_loop[loop] = Deadlines(loop)
    return d
