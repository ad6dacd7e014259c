"""Redis clients per store, for the trainer (sync) and the services (asyncio)."""

from __future__ import annotations

from urllib.parse import urlparse, urlunparse

import redis
import redis.asyncio as aioredis

from common.keyspace import Keyspace


def _url_for_db(url: str, db: int) -> str:
    u = urlparse(url)
    return urlunparse(u._replace(path=f"/{db}"))


class RedisStores:
    """Sync clients keyed by store name (one per DB in 'db' mode, one shared in 'prefix' mode)."""

    def __init__(self, url: str, keyspace: Keyspace, **kwargs):
        self.url, self.keyspace = url, keyspace
        self._kwargs = {"protocol": 2, **kwargs}
        self._clients: dict[int, redis.Redis] = {}

    def __call__(self, store: str) -> redis.Redis:
        db = self.keyspace.db(store)
        if db not in self._clients:
            self._clients[db] = redis.Redis.from_url(_url_for_db(self.url, db), **self._kwargs)
        return self._clients[db]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()


class AsyncRedisStores:
    """asyncio clients keyed by store name; hiredis parser, RESP2 (measurably faster here)."""

    def __init__(self, url: str, keyspace: Keyspace, timeout_s: float = 1.0, max_connections: int = 64):
        self.url, self.keyspace = url, keyspace
        self._kwargs = dict(protocol=2, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                            max_connections=max_connections, retry_on_timeout=False)
        self._clients: dict[int, aioredis.Redis] = {}

    def __call__(self, store: str) -> aioredis.Redis:
        db = self.keyspace.db(store)
        if db not in self._clients:
            self._clients[db] = aioredis.Redis.from_url(_url_for_db(self.url, db), **self._kwargs)
        return self._clients[db]

    async def close(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()
