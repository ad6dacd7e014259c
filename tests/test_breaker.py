"""The Redis circuit breaker (common/breaker.py) on both service clients, against a real Redis that is SIGSTOPped
(hung: every call would wait the whole timeout) and then SIGCONTed."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis.exceptions

from common.breaker import CircuitBreaker, CircuitOpen
from common.keyspace import Keyspace
from common.local_redis import LocalRedis
from common.redis_conn import AsyncRedisStores
from common.settings import Settings


@pytest.fixture
def hung_redis(tmp_path):
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


async def _until_ok(call, attempts: int = 200) -> int:
    """Retry `call` until it succeeds; returns how many attempts failed first."""
    for n in range(attempts):
        try:
            await call()
            return n
        except redis.exceptions.ConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("never recovered")


def test_breaker_opens_on_a_hung_redis_fails_fast_and_closes_after_recovery(hung_redis):
    async def run() -> None:
        breaker = CircuitBreaker(failures=2, reset_s=0.2, probe_s=0.3)
        stores = AsyncRedisStores(hung_redis.url, Keyspace.from_settings(Settings()), timeout_s=0.3, breaker=breaker)
        reads, client = stores.reads("meta"), stores("meta")
        await reads.get("k")
        await client.set("k", "v")
        os.kill(hung_redis.proc.pid, signal.SIGSTOP)
        for call in (lambda: reads.get("k"), lambda: client.get("k")):  # timeouts, not yet the breaker
            with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)) as exc:
                await call()
            assert not isinstance(exc.value, CircuitOpen)
        assert breaker.is_open
        # open: every client refuses at once, without touching the socket (pipelines and scripts too)
        for call in (lambda: reads.get("k"), lambda: reads.execute([("GET", "k")]), lambda: client.get("k"),
                     lambda: client.pipeline(transaction=False).get("k").execute()):
            with pytest.raises(CircuitOpen, match="failing fast"):
                await call()
        os.kill(hung_redis.proc.pid, signal.SIGCONT)
        await _until_ok(lambda: reads.get("k"))  # a probe after reset_s gets through and closes it
        assert not breaker.is_open
        assert await client.get("k") == b"v"
        await stores.close()

    asyncio.run(run())


def test_answers_from_redis_even_errors_keep_the_breaker_closed(hung_redis):
    async def run() -> None:
        breaker = CircuitBreaker(failures=1, reset_s=10)
        stores = AsyncRedisStores(hung_redis.url, Keyspace.from_settings(Settings()), timeout_s=1, breaker=breaker)
        await stores("meta").set("s", "text")
        for _ in range(3):
            with pytest.raises(redis.exceptions.ResponseError):
                await stores.reads("meta").execute([("LRANGE", "s", 0, 1)])  # WRONGTYPE: Redis is fine
            with pytest.raises(redis.exceptions.ResponseError):
                await stores("meta").lrange("s", 0, 1)
        assert not breaker.is_open
        await stores.close()

    asyncio.run(run())


def test_no_breaker_when_disabled(hung_redis):
    async def run() -> None:
        breaker = CircuitBreaker(failures=0)
        stores = AsyncRedisStores(hung_redis.url, Keyspace.from_settings(Settings()), timeout_s=0.2, breaker=breaker)
        await stores.reads("meta").get("k")
        os.kill(hung_redis.proc.pid, signal.SIGSTOP)
        for _ in range(3):
            with pytest.raises(redis.exceptions.TimeoutError):  # each call waits its timeout: never CircuitOpen
                await stores.reads("meta").get("k")
        assert not breaker.is_open
        os.kill(hung_redis.proc.pid, signal.SIGCONT)
        await stores.close()

    asyncio.run(run())
