"""Versioned, atomic publishing: write a new version, verify it, flip `current`, collect old garbage.

A writer killed half-way leaves its keys registered as *pending*; the previous version keeps serving,
and `collect_garbage` deletes pending versions older than `pending_ttl_s` and replaced versions older
than `grace_s` (always keeping the `keep` most recent).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import redis

from common.keyspace import pack_json, unpack_json
from common.redis_conn import RedisStores

log = logging.getLogger(__name__)


def new_version() -> str:
    """Sortable, unique version id, e.g. 20261123T072751123-4f1a."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}-{os.urandom(2).hex()}"


class PublishError(RuntimeError):
    """Raised when a version fails verification; the previous version keeps serving."""


class Publisher:
    """Publishes one channel version. Use `begin()`, write keys with `pipeline()`, then `commit()`."""

    def __init__(self, stores: RedisStores, channel: str, *, grace_s: float = 600.0, pending_ttl_s: float = 6 * 3600.0,
                 keep: int = 2):
        self.stores, self.ks, self.channel = stores, stores.keyspace, channel
        self.grace_s, self.pending_ttl_s, self.keep = grace_s, pending_ttl_s, keep
        self.version: str | None = None
        self.used_stores: set[str] = set()

    @property
    def meta(self) -> redis.Redis:
        return self.stores("meta")

    def begin(self, version: str | None = None) -> str:
        self.version = version or new_version()
        self.meta.zadd(self.ks.pending(self.channel), {self.version: time.time()})
        self.meta.sadd(self.ks.channels_index(), self.channel)
        return self.version

    def write(self, store: str, items: Iterable[tuple[str, bytes]], chunk: int = 2000,
              progress: Callable[[int], None] | None = None) -> int:
        """SET every (key, value) into `store` with pipelines of `chunk`; returns the count written."""
        if self.version is None:
            raise RuntimeError("call begin() first")
        self.used_stores.add(store)
        client, n = self.stores(store), 0
        pipe = client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
            n += 1
            if n % chunk == 0:
                pipe.execute()
                if progress:
                    progress(chunk)
        rest = len(pipe.command_stack)
        pipe.execute()
        if progress and rest:
            progress(rest)
        return n

    def commit(self, manifest: dict, verify: Callable[[], None] | None = None) -> str:
        """Verify, store the manifest, and atomically flip `current` to the new version."""
        if self.version is None:
            raise RuntimeError("call begin() first")
        if verify is not None:
            try:
                verify()
            except Exception as exc:  # the new version stays pending and is collected later
                raise PublishError(f"channel {self.channel!r} version {self.version} failed verification: {exc}") from exc
        manifest = {**manifest, "channel": self.channel, "version": self.version, "stores_used": sorted(self.used_stores),
                    "published_at": time.time()}
        now = time.time()
        old = self.meta.get(self.ks.current(self.channel))
        pipe = self.meta.pipeline(transaction=True)
        pipe.set(self.ks.manifest(self.channel, self.version), pack_json(manifest))
        pipe.zadd(self.ks.versions(self.channel), {self.version: now})
        pipe.set(self.ks.current(self.channel), self.version)
        pipe.zrem(self.ks.pending(self.channel), self.version)
        if old:
            pipe.zadd(self.ks.retired(self.channel), {old.decode(): now})
        pipe.execute()
        log.info("published %s version %s", self.channel, self.version)
        collect_garbage(self.stores, self.channel, grace_s=self.grace_s, pending_ttl_s=self.pending_ttl_s, keep=self.keep)
        return self.version


def current_version(stores: RedisStores, channel: str) -> str | None:
    v = stores("meta").get(stores.keyspace.current(channel))
    return v.decode() if v else None


def read_manifest(stores: RedisStores, channel: str, version: str | None = None) -> dict | None:
    version = version or current_version(stores, channel)
    if not version:
        return None
    return unpack_json(stores("meta").get(stores.keyspace.manifest(channel, version)))


def delete_version(stores: RedisStores, channel: str, version: str) -> int:
    """Delete every key of one version in every store (SCAN + UNLINK in batches)."""
    ks, n = stores.keyspace, 0
    for store in ks.stores:
        if store == "meta":
            continue
        client = stores(store)
        batch: list[bytes] = []
        for key in client.scan_iter(match=ks.version_pattern(store, channel, version), count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                n += client.unlink(*batch)
                batch.clear()
        if batch:
            n += client.unlink(*batch)
    meta = stores("meta")
    meta.delete(ks.manifest(channel, version))
    meta.zrem(ks.versions(channel), version)
    meta.zrem(ks.retired(channel), version)
    meta.zrem(ks.pending(channel), version)
    return n


def collect_garbage(stores: RedisStores, channel: str, *, grace_s: float = 600.0, pending_ttl_s: float = 6 * 3600.0,
                    keep: int = 2, now: float | None = None) -> list[str]:
    """Delete stale pending versions and replaced versions past the grace period; returns deleted ids."""
    ks, meta = stores.keyspace, stores("meta")
    now = time.time() if now is None else now
    current = current_version(stores, channel)
    deleted: list[str] = []
    for v, started in meta.zrange(ks.pending(channel), 0, -1, withscores=True):
        if now - started > pending_ttl_s:
            delete_version(stores, channel, v.decode())
            deleted.append(v.decode())
    published = [v.decode() for v in meta.zrevrange(ks.versions(channel), 0, -1)]
    keep_set = set(published[:keep]) | ({current} if current else set())
    retired = {v.decode(): t for v, t in meta.zrange(ks.retired(channel), 0, -1, withscores=True)}
    for v in published:
        if v in keep_set:
            continue
        if now - retired.get(v, 0.0) > grace_s:
            delete_version(stores, channel, v)
            deleted.append(v)
    return deleted
