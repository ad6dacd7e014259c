"""Redis clients per store, for the trainer (sync) and the services (asyncio)."""

from __future__ import annotations

from urllib.parse import urlparse, urlunparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline as AsyncPipeline

from common.breaker import FAILURES, CircuitBreaker
from common.keyspace import Keyspace
from common.redis_cluster import ClusterReads, async_cluster, sync_cluster
from common.redis_reads import RedisPyReads, RedisReads


def _url_for_db(url: str, db: int) -> str:
    u = urlparse(url)
    return urlunparse(u._replace(path=f"/{db}"))


class RedisStores:
    """Sync clients keyed by store name (one per DB in 'db' mode, one shared in 'prefix' mode, one cluster client
    with `keyspace.cluster`)."""

    def __init__(self, url: str, keyspace: Keyspace, **kwargs):
        self.url, self.keyspace = url, keyspace
        self._kwargs = {"protocol": 2, **kwargs}
        self._clients: dict[int, redis.Redis] = {}

    def __call__(self, store: str) -> redis.Redis:
        db = self.keyspace.db(store)
        if db not in self._clients:
            if self.keyspace.cluster:
                self._clients[db] = sync_cluster(self.url, **self._kwargs)
            else:
                self._clients[db] = redis.Redis.from_url(_url_for_db(self.url, db), **self._kwargs)
        return self._clients[db]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()


class _BreakerRedis(aioredis.Redis):
    """redis-py's asyncio client whose commands and pipelines go through a CircuitBreaker (common/breaker.py)."""

    breaker: CircuitBreaker

    async def execute_command(self, *args, **options):
        self.breaker.check()
        try:
            result = await super().execute_command(*args, **options)
        except FAILURES as exc:
            self.breaker.failure(exc)
            raise
        self.breaker.success()
        return result

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> AsyncPipeline:
        pipe = _BreakerPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.breaker = self.breaker
        return pipe


class _BreakerPipeline(AsyncPipeline):
    breaker: CircuitBreaker

    async def execute(self, raise_on_error: bool = True) -> list:
        self.breaker.check()
        try:
            result = await super().execute(raise_on_error)
        except FAILURES as exc:
            self.breaker.failure(exc)
            raise
        self.breaker.success()
        return result


class AsyncRedisStores:
    """asyncio clients keyed by store name: redis-py (hiredis parser, RESP2) for everything, and `reads(store)`,
    a lean pipelined reader for the per-request reads (common/redis_reads.py says why). With a `breaker`, every
    call of both fails fast while Redis is known to be down (one breaker: all stores live on one server)."""

    def __init__(self, url: str, keyspace: Keyspace, timeout_s: float = 1.0, max_connections: int = 64,
                 breaker: CircuitBreaker | None = None):
        self.url, self.keyspace, self.timeout_s, self.breaker = url, keyspace, timeout_s, breaker
        self._kwargs = dict(protocol=2, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                            max_connections=max_connections, retry_on_timeout=False)
        self._clients: dict[int, aioredis.Redis] = {}
        self._reads: dict[int, RedisReads | RedisPyReads] = {}

    def reads(self, store: str) -> RedisReads | RedisPyReads:
        """The per-request reader of a store (GET, MGET, pipelined reads through `execute`)."""
        db = self.keyspace.db(store)
        r = self._reads.get(db)
        if r is None:
            if self.keyspace.cluster and urlparse(self.url).scheme == "redis":
                r = ClusterReads(self.url, self.timeout_s, self.breaker)
            elif self.keyspace.cluster:
                r = RedisPyReads(self(store))  # (rediss://) redis-py's cluster pipeline routes per slot
            elif urlparse(self.url).scheme == "redis":
                r = RedisReads(_url_for_db(self.url, db), db, self.timeout_s, self.breaker)
            else:
                r = RedisPyReads(self(store))
            self._reads[db] = r
        return r

    def __call__(self, store: str) -> aioredis.Redis:
        db = self.keyspace.db(store)
        if db not in self._clients:
            if self.keyspace.cluster:
                self._clients[db] = async_cluster(self.url, self.timeout_s, self.breaker,
                                                  self._kwargs["max_connections"])
            elif self.breaker is None:
                self._clients[db] = aioredis.Redis.from_url(_url_for_db(self.url, db), **self._kwargs)
            else:
                client = _BreakerRedis.from_url(_url_for_db(self.url, db), **self._kwargs)
                client.breaker = self.breaker
                self._clients[db] = client
        return self._clients[db]

    async def close(self) -> None:
        for r in self._reads.values():
            r.close()
        self._reads.clear()
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()
