"""Redis Cluster clients (REDIS_CLUSTER=true; docs/redis_cluster.md).

Writes, scripts, administration and the cold reads go through redis-py's cluster clients, which route every command
to the master of its key's slot, follow MOVED/ASK and re-read the slot map after a failover. Their MGET is split
per slot (`mget_nonatomic`): every multi-key read of this project either stays in one slot (the `{meta}` keys) or
reads immutable versioned keys, for which a per-slot read is as good as an atomic one.

The serving hot path uses `ClusterReads`: the pipelined hiredis reader of common/redis_reads.py, one connection per
master, each command sent to the master of its key's slot (the commands of one node in one write, the nodes in
parallel, an MGET split per slot). A MOVED reply updates that slot and retries; ASK is followed once with ASKING;
an unreachable node or CLUSTERDOWN fails the call (the services answer 503) and re-reads the slot map (CLUSTER
SLOTS, from any node known) before the next call, at most every `refresh_s`, so the services follow a failover
without a restart.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote, unquote, urlparse

import redis
import redis.asyncio.cluster as aiocluster
import redis.cluster
import redis.exceptions
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from common.breaker import FAILURES, CircuitBreaker
from common.redis_reads import Command, ExecuteReads, RedisReads, SharedCall

Addr = tuple[str, int]


class SyncCluster(redis.cluster.RedisCluster):
    """redis-py's cluster client whose MGET may span slots (split per slot, not atomic across them)."""

    def mget(self, keys, *args) -> list[Any]:
        return self.mget_nonatomic(keys, *args)


class AsyncCluster(aiocluster.RedisCluster):
    """redis-py's asyncio cluster client: MGET split per slot, every command through the services' breaker."""

    breaker: CircuitBreaker | None = None

    async def execute_command(self, *args, **kwargs):
        return await self._guarded(super().execute_command(*args, **kwargs))

    async def mget(self, keys, *args) -> list[Any]:
        return await self._guarded(self.mget_nonatomic(keys, *args))

    async def _guarded(self, call):
        breaker = self.breaker
        if breaker is None:
            return await call
        try:
            breaker.check()
        except BaseException:
            call.close()  # never awaited
            raise
        try:
            result = await call
        except FAILURES as exc:
            breaker.failure(exc)
            raise
        breaker.success()
        return result


def sync_cluster(url: str, **kwargs) -> SyncCluster:
    """A sync cluster client from the URL of any node (the trainer's; redis-py's default retries ride out a
    failover)."""
    return SyncCluster.from_url(url, **kwargs)


def async_cluster(url: str, timeout_s: float, breaker: CircuitBreaker | None = None,
                  max_connections: int = 64) -> AsyncCluster:
    """The services' asyncio cluster client: short timeouts and two quick retries (a request waiting out a whole
    failover is worse than a 503)."""
    client = AsyncCluster.from_url(url, protocol=2, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                   max_connections=max_connections,
                                   retry=AsyncRetry(ExponentialBackoff(cap=0.2, base=0.02), 2))
    client.breaker = breaker
    return client


def _moved_target(msg: str, fallback_host: str) -> tuple[int, Addr]:
    """(slot, node) of a 'MOVED <slot> <host>:<port>' or 'ASK ...' error message."""
    _, slot, where = msg.split(" ", 2)
    host, _, port = where.strip().rpartition(":")
    return int(slot), (host or fallback_host, int(port))


class ClusterReads(ExecuteReads):
    """The hot-path reader (`execute`, `mget`, `get`, `close`, as `RedisReads`) on a Redis Cluster given by the URL
    of any of its nodes; raises `redis.exceptions.ConnectionError` / `TimeoutError` / `ResponseError`."""

    def __init__(self, url: str, timeout_s: float = 1.0, breaker: CircuitBreaker | None = None,
                 refresh_s: float = 0.1, max_redirects: int = 3):
        u = urlparse(url)
        if u.scheme != "redis":
            raise ValueError(f"ClusterReads takes redis:// URLs, not {u.scheme}://")
        self.timeout_s, self.breaker, self.refresh_s, self.max_redirects = timeout_s, breaker, refresh_s, max_redirects
        self._auth = ""
        if u.password:
            user = quote(unquote(u.username), safe="") if u.username else ""
            self._auth = f"{user}:{quote(unquote(u.password), safe='')}@"
        self._known: list[Addr] = [(u.hostname or "127.0.0.1", u.port or 6379)]  # where to ask for the slot map
        self._slots: list[Addr | None] | None = None
        self._nodes: dict[Addr, RedisReads] = {}
        self._stale, self._refreshed_at = True, 0.0
        self._refreshing = SharedCall()

    def _node(self, addr: Addr) -> RedisReads:
        r = self._nodes.get(addr)
        if r is None:
            r = self._nodes[addr] = RedisReads(f"redis://{self._auth}{addr[0]}:{addr[1]}/0", 0, self.timeout_s)
        return r

    # -- the slot map --------------------------------------------------------------------------------
    async def _refresh(self) -> None:
        """Re-read the slot map (one refresh at a time; concurrent callers share it)."""
        try:
            await self._refreshing(self._read_slots)
        finally:
            self._refreshed_at = time.monotonic()

    async def _read_slots(self) -> None:
        errors = []
        for addr in list(self._known):
            try:
                (reply,) = await self._node(addr).execute([("CLUSTER", "SLOTS")])
            except (redis.exceptions.RedisError, OSError) as exc:
                errors.append(f"{addr[0]}:{addr[1]}: {exc}")
                continue
            slots: list[Addr | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            seen: list[Addr] = []
            for start, end, master, *replicas in reply:
                where = self._addr(master, addr)
                slots[int(start):int(end) + 1] = [where] * (int(end) - int(start) + 1)
                seen += [where, *(self._addr(r, addr) for r in replicas)]
            self._slots, self._stale = slots, False
            # masters first, then replicas, then what we knew (a node that left may come back)
            self._known = list(dict.fromkeys([*seen, *self._known]))
            live = set(seen)
            for gone in [a for a in self._nodes if a not in live]:
                self._nodes.pop(gone).close()
            return
        raise redis.exceptions.ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS ({'; '.join(errors)})")

    @staticmethod
    def _addr(node: list, asked: Addr) -> Addr:
        host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
        return (host if host and host != "?" else asked[0]), int(node[1])

    # -- reads ---------------------------------------------------------------------------------------
    async def execute(self, commands: list[Command], raise_errors: bool = True) -> list:
        """Replies of `commands` in order (each command's first argument after the name is its key)."""
        breaker = self.breaker
        if breaker is not None:
            breaker.check()
        try:
            replies = await self._execute(commands)
        except FAILURES as exc:
            if breaker is not None:
                breaker.failure(exc)
            raise
        if breaker is not None:
            breaker.success()
        if raise_errors:
            for r in replies:
                if isinstance(r, redis.exceptions.ResponseError):
                    raise r
        return replies

    def close(self) -> None:
        for r in self._nodes.values():
            r.close()
        self._nodes.clear()

    async def _execute(self, commands: list[Command]) -> list:
        if self._slots is None or (self._stale and time.monotonic() - self._refreshed_at >= self.refresh_s):
            await self._refresh()
        out: list[Any] = [None] * len(commands)
        parts: list[tuple[Command, int, int, list[int] | None]] = []  # (command, slot, reply index, MGET positions)
        for i, c in enumerate(commands):
            if len(c) > 2 and str(c[0]).upper() == "MGET":
                by_slot: dict[int, list[int]] = {}
                for j, k in enumerate(c[1:]):
                    by_slot.setdefault(key_slot(_encode(k)), []).append(j)
                if len(by_slot) > 1:
                    out[i] = [None] * (len(c) - 1)
                    parts += [(("MGET", *(c[1 + j] for j in pos)), slot, i, pos) for slot, pos in by_slot.items()]
                    continue
            parts.append((c, key_slot(_encode(c[1])) if len(c) > 1 else 0, i, None))
        for _ in range(self.max_redirects + 1):
            parts = await self._round(parts, out)
            if not parts:
                return out
        raise redis.exceptions.ConnectionError(f"Redis Cluster: slots still moving after {self.max_redirects} "
                                               "MOVED redirections")

    async def _round(self, parts: list, out: list) -> list:
        """Send `parts` to their masters; place the replies; return the parts to send again (MOVED)."""
        slots = self._slots
        by_node: dict[Addr, list] = {}
        for p in parts:
            addr = slots[p[1]]
            if addr is None:
                self._stale = True
                raise redis.exceptions.ConnectionError(f"Redis Cluster: no master serves slot {p[1]}")
            by_node.setdefault(addr, []).append(p)
        if len(by_node) == 1:
            ((addr, ps),) = by_node.items()
            results = [await self._send(addr, ps)]
        else:
            results = await asyncio.gather(*(self._send(a, ps) for a, ps in by_node.items()), return_exceptions=True)
        again, error = [], None
        for (addr, ps), res in zip(by_node.items(), results, strict=True):
            if isinstance(res, BaseException):
                error = error or res
                continue
            for p, r in zip(ps, res, strict=True):
                if isinstance(r, redis.exceptions.ResponseError):
                    msg = str(r)
                    if msg.startswith("MOVED "):
                        slot, where = _moved_target(msg, addr[0])
                        slots[slot] = where
                        self._stale = True  # a slot moved: the others may have too
                        again.append(p)
                        continue
                    if msg.startswith("ASK "):
                        _, where = _moved_target(msg, addr[0])
                        r = (await self._node(where).execute([("ASKING",), p[0]], raise_errors=False))[1]
                    elif msg.startswith(("CLUSTERDOWN", "TRYAGAIN")):
                        self._stale = True
                        error = error or redis.exceptions.ConnectionError(f"Redis Cluster: {msg}")
                        continue
                _place(out, p, r)
        if error is not None:
            if isinstance(error, FAILURES):
                self._stale = True
            raise error
        return again

    async def _send(self, addr: Addr, parts: list) -> list:
        try:
            return await self._node(addr).execute([p[0] for p in parts], raise_errors=False)
        except FAILURES:
            self._stale = True  # the node may be gone (failover): re-read the slot map before the next call
            raise


def _encode(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def _place(out: list, part: tuple, reply: Any) -> None:
    _, _, i, positions = part
    if positions is None:
        out[i] = reply
    elif isinstance(reply, redis.exceptions.ResponseError):
        out[i] = reply
    else:
        for j, v in zip(positions, reply, strict=True):
            out[i][j] = v
