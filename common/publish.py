"""Versioned, atomic publishing: write a new version, verify it, flip `current`, collect old garbage.

A writer killed half-way leaves its keys registered as *pending*; the previous version keeps serving,
and `collect_garbage` deletes pending versions whose writing run is dead (its lease key is gone, see
trainer/runs.py) or, for writers without a run, older than `pending_ttl_s`, and replaced versions older
than `grace_s` (always keeping the `keep` most recent).

With `archive_root`, every (key, value) written is also kept on disk (common/archive.py) so the version can be
republished without retraining; the manifest carries a digest of every named artifact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from common.archive import (
    KV_SUFFIX,
    PUBLISHED,
    KvWriter,
    hexdigest,
    new_digest,
    update_digest_many,
    version_dirs,
    write_published,
)
from common.keyspace import FEATURES_CHANNEL, pack_json, unpack_json
from common.liveness import lease_alive
from common.redis_conn import RedisStores

log = logging.getLogger(__name__)

WRITER = "writer.json"  # in an archive directory being written: the run id of its writer


def new_version() -> str:
    """Sortable, unique version id, e.g. 20261123T072751123-4f1a."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}-{os.urandom(2).hex()}"


class PublishError(RuntimeError):
    """Raised when a version fails verification; the previous version keeps serving."""


class Publisher:
    """Publishes one channel version. Use `begin()`, write keys with `write()`, then `commit()`.

    `owner`: the run id of the job writing (its lease tells a dead writer from a live one); `archive_root`: keep
    every written (key, value) under `archive_root/<channel>/<version>/` for `python -m trainer republish`."""

    def __init__(self, stores: RedisStores, channel: str, *, grace_s: float = 600.0, pending_ttl_s: float = 6 * 3600.0,
                 keep: int = 2, owner: str | None = None, archive_root: str | Path | None = None):
        self.stores, self.ks, self.channel = stores, stores.keyspace, channel
        self.grace_s, self.pending_ttl_s, self.keep = grace_s, pending_ttl_s, keep
        self.owner = owner
        self.archive_root = Path(archive_root) if archive_root is not None else None
        self.version: str | None = None
        self.used_stores: set[str] = set()
        self.digests: dict[str, str] = {}  # artifact name → value digest (common/archive.py)
        self.probes: dict[str, str] = {}  # store → first key written there (a cheap "is the version still there?")
        self._kv: dict[str, KvWriter] = {}
        self._hashes: dict[str, Any] = {}  # artifact → running sha256

    @property
    def meta(self) -> redis.Redis:
        return self.stores("meta")

    @property
    def archive_dir(self) -> Path | None:
        """Where this version is kept on disk (None without `archive_root`)."""
        if self.archive_root is None or self.version is None:
            return None
        return self.archive_root / self.channel / self.version

    def begin(self, version: str | None = None) -> str:
        self.version = version or new_version()
        pipe = self.meta.pipeline(transaction=True)
        pipe.zadd(self.ks.pending(self.channel), {self.version: time.time()})
        if self.owner:
            pipe.hset(self.ks.pending_owner(self.channel), self.version, self.owner)
        pipe.sadd(self.ks.channels_index(), self.channel)
        pipe.execute()
        if self.archive_dir is not None:
            self.archive_dir.mkdir(parents=True, exist_ok=True)
            (self.archive_dir / WRITER).write_text(json.dumps({"run_id": self.owner, "started_at": time.time()}))
        return self.version

    def write(self, store: str, items: Iterable[tuple[str, bytes]], chunk: int = 2000,
              progress: Callable[[int], None] | None = None, artifact: str | None = None) -> int:
        """SET every (key, value) into `store` with pipelines of `chunk`; returns the count written. `artifact`
        names the values for the manifest's `digests` (several calls with one name extend one digest)."""
        if self.version is None:
            raise RuntimeError("call begin() first")
        self.used_stores.add(store)
        client, n = self.stores(store), 0
        pipe = client.pipeline(transaction=False)
        # one MSET per chunk on a single server: a SET per key costs more in the client than in Redis (a cluster
        # spreads the keys over slots: SETs there)
        mset = isinstance(client, redis.Redis)
        kv = self._archive(store)
        digest = None
        if artifact is not None:
            digest = self._hashes.setdefault(artifact, new_digest())
        pending: list[tuple[str, bytes]] = []

        def flush() -> None:
            if mset:
                pipe.execute_command("MSET", *(x for kv_pair in pending for x in kv_pair))
            else:
                for key, value in pending:
                    pipe.set(key, value)
            pipe.execute()
            if kv is not None:
                kv.write_many(pending)
            if digest is not None:
                update_digest_many(digest, [v for _, v in pending])
            if progress:
                progress(len(pending))
            pending.clear()

        for key, value in items:
            if n == 0 and store not in self.probes:
                self.probes[store] = key
            pending.append((key, value))
            n += 1
            if len(pending) == chunk:
                flush()
        if pending:
            flush()
        if digest is not None:
            self.digests[artifact] = hexdigest(digest)
        return n

    def _archive(self, store: str) -> KvWriter | None:
        if self.archive_dir is None:
            return None
        if store not in self._kv:
            self._kv[store] = KvWriter(self.archive_dir / f"{store}{KV_SUFFIX}")
        return self._kv[store]

    def commit(self, manifest: dict, verify: Callable[[], None] | None = None) -> str:
        """Verify, store the manifest, and atomically flip `current` to the new version."""
        if self.version is None:
            raise RuntimeError("call begin() first")
        files = {f"{store}{KV_SUFFIX}": w.close() for store, w in self._kv.items()}
        self._kv.clear()
        if verify is not None:
            try:
                verify()
            except Exception as exc:  # the new version stays pending and is collected later
                raise PublishError(f"channel {self.channel!r} version {self.version} failed verification: {exc}") from exc
        manifest = {**manifest, "channel": self.channel, "version": self.version, "stores_used": sorted(self.used_stores),
                    "published_at": time.time()}
        if self.digests:
            manifest["digests"] = {**manifest.get("digests", {}), **self.digests}
        if self.probes:
            manifest["probes"] = {**manifest.get("probes", {}), **self.probes}
        now = time.time()
        old = self.meta.get(self.ks.current(self.channel))
        pipe = self.meta.pipeline(transaction=True)
        pipe.set(self.ks.manifest(self.channel, self.version), pack_json(manifest))
        pipe.zadd(self.ks.versions(self.channel), {self.version: now})
        pipe.set(self.ks.current(self.channel), self.version)
        pipe.zrem(self.ks.pending(self.channel), self.version)
        pipe.hdel(self.ks.pending_owner(self.channel), self.version)
        if old and old.decode() != self.version:  # (republishing the current version does not retire it)
            pipe.zadd(self.ks.retired(self.channel), {old.decode(): now})
        pipe.execute()
        log.info("published %s version %s", self.channel, self.version)
        if self.archive_dir is not None:
            write_published(self.archive_dir, {"manifest": manifest, "files": files, "key_mode": self.ks.mode,
                                               "prefix": self.ks.prefix, "key_layout": self.ks.layout})
        collect_garbage(self.stores, self.channel, grace_s=self.grace_s, pending_ttl_s=self.pending_ttl_s, keep=self.keep)
        if self.archive_root is not None:
            prune_archive(self.stores, self.archive_root, self.channel, self.keep)
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
    meta.hdel(ks.pending_owner(channel), version)
    return n


def run_alive(stores: RedisStores, run_id: str | bytes | None) -> bool:
    """Whether the job `run_id` still holds its lease (trainer/runs.py refreshes it while the job runs; a lease
    whose process on this host is gone is dead at once)."""
    if not run_id:
        return False
    rid = run_id.decode() if isinstance(run_id, bytes) else run_id
    return lease_alive(stores("meta").get(stores.keyspace.run_lease(rid)))


def dead_pending(stores: RedisStores, channel: str, pending_ttl_s: float, now: float | None = None) -> list[str]:
    """Pending versions of `channel` whose writer is dead: its run's lease is gone, or (a writer without a run)
    it started more than `pending_ttl_s` ago."""
    ks, meta = stores.keyspace, stores("meta")
    now = time.time() if now is None else now
    owners = {k.decode(): v for k, v in meta.hgetall(ks.pending_owner(channel)).items()}
    out = []
    for v, started in meta.zrange(ks.pending(channel), 0, -1, withscores=True):
        version = v.decode()
        owner = owners.get(version)
        if (not run_alive(stores, owner)) if owner else now - started > pending_ttl_s:
            out.append(version)
    return out


def drop_pending(stores: RedisStores, channel: str, version: str) -> bool:
    """Abandon a pending version: delete its keys, unless it is also published (a republish of it died: then only
    the pending entry goes). True when keys were deleted."""
    ks, meta = stores.keyspace, stores("meta")
    if version == current_version(stores, channel) or meta.zscore(ks.versions(channel), version) is not None:
        meta.zrem(ks.pending(channel), version)
        meta.hdel(ks.pending_owner(channel), version)
        return False
    delete_version(stores, channel, version)
    return True


def collect_garbage(stores: RedisStores, channel: str, *, grace_s: float = 600.0, pending_ttl_s: float = 6 * 3600.0,
                    keep: int = 2, now: float | None = None) -> list[str]:
    """Delete stale pending versions and replaced versions past the grace period; returns deleted ids."""
    ks, meta = stores.keyspace, stores("meta")
    now = time.time() if now is None else now
    current = current_version(stores, channel)
    published = [v.decode() for v in meta.zrevrange(ks.versions(channel), 0, -1)]
    deleted: list[str] = []
    for v in dead_pending(stores, channel, pending_ttl_s, now):
        if drop_pending(stores, channel, v):
            deleted.append(v)
    keep_set = set(published[:keep]) | ({current} if current else set())
    retired = {v.decode(): t for v, t in meta.zrange(ks.retired(channel), 0, -1, withscores=True)}
    for v in published:
        if v in keep_set:
            continue
        if now - retired.get(v, 0.0) > grace_s:
            delete_version(stores, channel, v)
            deleted.append(v)
    return deleted


def prune_archive(stores: RedisStores, root: str | Path, channel: str, keep: int) -> list[str]:
    """Disk follows Redis's retention: of the committed version directories of `channel`, keep the `keep` newest and
    any version Redis still holds (current, within its grace period, pending); delete the rest. Returns them."""
    meta, ks = stores("meta"), stores.keyspace
    held = {v.decode() for v in meta.zrange(ks.versions(channel), 0, -1)}
    held |= {v.decode() for v in meta.zrange(ks.pending(channel), 0, -1)}
    current = current_version(stores, channel)
    held |= {current} if current else set()
    committed = [d for d in version_dirs(Path(root) / channel) if (d / PUBLISHED).exists()]
    removed = []
    for d in committed[keep:]:
        if d.name not in held:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    if removed:
        log.info("artifacts of %s: removed %d old version dir(s) from disk (%s)", channel, len(removed),
                 ", ".join(removed))
    return removed


def collect_dead_archives(stores: RedisStores, root: str | Path, pending_ttl_s: float,
                          now: float | None = None) -> list[Path]:
    """Delete uncommitted version directories (no published.json) whose writer is dead: its run's lease is gone,
    or (no run recorded) the directory is older than `pending_ttl_s`. Returns them."""
    now = time.time() if now is None else now
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for channel_dir in root.iterdir():
        for d in version_dirs(channel_dir):
            if (d / PUBLISHED).exists():
                continue
            try:
                writer = json.loads((d / WRITER).read_text()).get("run_id")
            except (OSError, ValueError):
                writer = None
            dead = not run_alive(stores, writer) if writer else now - d.stat().st_mtime > pending_ttl_s
            if dead:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def missing_versions(stores: RedisStores, channels: Iterable[str]) -> dict[str, str]:
    """channel → what is missing in Redis (no `current`, no manifest, a store's keys gone, the id maps gone) for
    each of `channels` that is not whole; {} when all are. One pipelined round trip per step."""
    ks, meta = stores.keyspace, stores("meta")
    channels = list(channels)
    currents = meta.mget([ks.current(c) for c in channels]) if channels else []
    out: dict[str, str] = {}
    manifests: dict[str, dict] = {}
    for c, v in zip(channels, currents, strict=True):
        if v is None:
            out[c] = "no current version"
            continue
        m = unpack_json(meta.get(ks.manifest(c, v.decode())))
        if m is None:
            out[c] = f"manifest of version {v.decode()} missing"
        else:
            manifests[c] = m
    for c, m in manifests.items():
        for store, key in (m.get("probes") or {}).items():
            if store in ks.stores and not stores(store).exists(key):
                out[c] = f"version {m.get('version')}: keys in store {store!r} missing"
                break
    # a channel's n_items is the item id map's length when it was published (the features' count their records)
    n_items = max((int(m.get("n_items") or 0) for c, m in manifests.items() if c != FEATURES_CHANNEL), default=0)
    if n_items and int(meta.get(ks.id_map_len("item")) or 0) < n_items:
        out["ids"] = f"item id map shorter than the {n_items} items of the published versions"
    return out
