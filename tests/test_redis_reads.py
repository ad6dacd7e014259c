"""The pipelined hot-path reader (common/redis_reads.py) against real Redis servers."""

from __future__ import annotations

import asyncio

import pytest
import redis

from common.local_redis import LocalRedis, free_port
from common.redis_conn import _url_for_db
from common.redis_reads import RedisPyReads, RedisReads, pairs


def test_concurrent_calls_get_their_own_replies(redis_url):
    c = redis.Redis.from_url(_url_for_db(redis_url, 3))
    for i in range(200):
        c.set(f"k{i}", f"v{i}")
        if i % 7:
            c.rpush(f"l{i}", *[f"{i}-{j}" for j in range(i % 7)])
        if i % 3:
            c.hset(f"h{i}", mapping={"n": i})

    async def main():
        r = RedisReads(redis_url, 3)
        try:
            async def one(i):
                got = await r.execute([("GET", f"k{i}"), ("LRANGE", f"l{i}", 0, 2), ("HGETALL", f"h{i}")])
                assert got[0] == f"v{i}".encode()
                assert got[1] == [f"{i}-{j}".encode() for j in range(min(3, i % 7))]
                assert pairs(got[2]) == ({b"n": str(i).encode()} if i % 3 else {})
                assert await r.mget([f"k{i}", "missing", f"k{i + 1}"]) == [f"v{i}".encode(), None,
                                                                            (f"v{i + 1}".encode() if i < 199 else None)]
            await asyncio.gather(*[one(i) for i in range(200)])  # all share one connection
        finally:
            r.close()
    asyncio.run(main())


def test_error_reply_raises_and_connection_stays_usable(redis_url):
    redis.Redis.from_url(_url_for_db(redis_url, 3)).set("s", "x")

    async def main():
        r = RedisReads(redis_url, 3)
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await r.execute([("GET", "s"), ("LRANGE", "s", 0, 1)])
        assert await r.get("s") == b"x"
        r.close()
    asyncio.run(main())


def test_redis_down_then_back(tmp_path):
    port = free_port()
    server = LocalRedis(data_dir=tmp_path / "r", port=port).start()
    redis.Redis.from_url(_url_for_db(server.url, 1)).set("a", "1")
    redis.Redis.from_url(server.url).save()  # LocalRedis reloads dump.rdb from its dir
    again = LocalRedis(data_dir=tmp_path / "r", port=port)

    async def main():
        r = RedisReads(server.url, 1, timeout_s=1.0)
        assert await r.get("a") == b"1"
        server.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await r.get("a")
        with pytest.raises(redis.exceptions.ConnectionError):  # refused while it is down
            await r.get("a")
        again.start()
        assert await r.get("a") == b"1"  # reconnected by itself
        r.close()
    try:
        asyncio.run(main())
    finally:
        server.stop()
        again.stop()


def test_password_and_redis_py_fallback(tmp_path):
    server = LocalRedis(data_dir=tmp_path / "r", port=free_port()).start()
    url = server.url.replace("redis://", "redis://:s3cret@")
    try:
        redis.Redis.from_url(_url_for_db(server.url, 2)).set("p", "ok")
        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret")

        async def main():
            r = RedisReads(url, 2)
            assert await r.get("p") == b"ok"
            r.close()
            bad = RedisReads(server.url, 2)
            with pytest.raises(redis.exceptions.ResponseError):  # NOAUTH
                await bad.get("p")
            bad.close()
            import redis.asyncio as aioredis
            client = aioredis.Redis.from_url(_url_for_db(url, 2), protocol=2)
            py = RedisPyReads(client)
            assert await py.execute([("GET", "p"), ("HGETALL", "none")]) == [b"ok", {}]
            assert pairs({}) == {}
            await client.aclose()
        asyncio.run(main())
    finally:
        server.stop()


def test_timeout_then_recovery(redis_url):
    redis.Redis.from_url(_url_for_db(redis_url, 3)).set("t", "1")

    async def main():
        r = RedisReads(redis_url, 3, timeout_s=0.3)
        assert await r.get("t") == b"1"
        redis.Redis.from_url(redis_url).client_pause(1200, all=True)  # Redis answers nobody for 1.2 s
        with pytest.raises(redis.exceptions.TimeoutError, match="did not answer within 0.3s"):
            await r.get("t")
        await asyncio.sleep(1.2)
        assert await r.get("t") == b"1"  # a fresh connection, no stale reply in the way
        r.close()
    asyncio.run(main())
