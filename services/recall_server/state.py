"""What the recall server knows between requests: versions, manifests, id maps, cached lists.

Everything a request needs that does not depend on the user is prepared here when a version changes,
and exposed as one immutable `Snapshot`. A request reads `state.snapshot` once, so it never mixes two
versions of a channel even if a publish lands while it runs.

When Redis loses what was published (flushed, restarted empty), the snapshot keeps the versions, manifests,
lists and id maps it holds, so answers keep coming from memory until the versions are back (`missing_in_redis`
says what Redis lacks; /healthz turns 503 "degraded"). See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from common.archive import DigestMismatch, check_digest, value_digest
from common.channel_config import ChannelConfig, ChannelSpec
from common.keyspace import FEATURES_CHANNEL, Keyspace, unpack_json, unpack_neighbors
from common.retrieval import rank_list
from common.versions import VersionWatcher
from services.recall_server.response import ItemFragments, item_fragments

log = logging.getLogger(__name__)

EMPTY_OBJ = np.empty(0, dtype=object)


@dataclass(frozen=True)
class ChannelView:
    """One enabled channel as served right now: its publisher's version, manifest and (lists) data."""

    spec: ChannelSpec
    version: str | None = None
    manifest: dict[str, Any] | None = None
    store: str | None = None  # Redis store holding this kind's artifact (from the manifest)
    lists: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # kinds held in the snapshot: every list, ranked
    unavailable: str | None = None  # why the channel cannot answer (not published, kind missing, ...)


@dataclass(frozen=True)
class Snapshot:
    """An immutable, consistent view of every channel; swapped as a whole on version changes."""

    versions: dict[str, str | None]  # publisher (and 'features') → current version
    views: dict[str, ChannelView]  # enabled channel name → view
    item_ids: np.ndarray = field(default_factory=lambda: EMPTY_OBJ)  # internal index → external id
    item_index: dict[str, int] = field(default_factory=dict)
    user_ids: np.ndarray = field(default_factory=lambda: EMPTY_OBJ)
    item_json: ItemFragments = field(default_factory=lambda: item_fragments([]))  # JSON prefix of each item

    @property
    def features_version(self) -> str | None:
        return self.versions.get(FEATURES_CHANNEL)


def recent_indices(raw: bytes | None, item_index: dict[str, int]) -> np.ndarray:
    """Internal indices of the `recent` items of a batch user feature record (newest first, unknown dropped)."""
    recent = orjson.loads(raw).get("recent", []) if raw else []
    idx = [item_index.get(str(item), -1) for item, *_ in recent]
    return np.array([x for x in idx if x >= 0], dtype=np.int32)


class NeighborRecentCache:
    """Recent item indices of other users (u2u neighbours) per features version; bounded."""

    def __init__(self, max_entries: int = 250_000):
        self.max_entries = max_entries
        self.version: str | None = None
        self._d: dict[str, np.ndarray] = {}

    def use_version(self, version: str) -> None:
        if version != self.version:
            self.version, self._d = version, {}

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get_many(self, version: str, user_ids: list[str]) -> tuple[list[np.ndarray | None], list[int]]:
        """Cached arrays (None where missing) and the positions that need a read."""
        self.use_version(version)
        d = self._d
        found = [d.get(u) for u in user_ids]
        return found, [i for i, a in enumerate(found) if a is None]

    def put(self, user_id: str, arr: np.ndarray) -> None:
        if len(self._d) >= self.max_entries:
            self._d.clear()  # crude but O(1) amortised; a full cache refills within seconds
        self._d[user_id] = arr


class KindTraits(Protocol):
    """What the serving state needs to know of an artifact kind (its retriever class, retrievers.RETRIEVERS)."""

    in_snapshot: bool  # every list of a version is loaded into the snapshot when the version changes
    neighbor_histories: bool  # reads other users' recent items: warm the neighbour cache per features version


class ServingState:
    """Keeps `snapshot` current: polls `current` pointers and id-map sizes, loads what changed."""

    def __init__(self, config: ChannelConfig, astores, kinds: Mapping[str, KindTraits], poll_s: float = 1.0):
        self.config = config
        self.astores = astores
        self.ks: Keyspace = astores.keyspace
        self.kinds = kinds
        self.enabled = config.enabled()
        self._warm_neighbors_on_refill = any(kinds[c.kind].neighbor_histories for c in self.enabled)
        publishers = sorted({c.publisher for c in self.enabled})
        self.watched = [*publishers, FEATURES_CHANNEL]
        self.snapshot = Snapshot(versions={c: None for c in self.watched},
                                 views={c.name: ChannelView(c, unavailable="not published yet") for c in self.enabled})
        self.neighbor_cache = NeighborRecentCache()
        self._id_lens: dict[str, int] = {"item": -1, "user": -1}
        self._short_prefix: dict[str, int] = {}  # entity → a shorter published length found to be a prefix of ours
        self._item_ids, self._item_index, self._user_ids = EMPTY_OBJ, {}, EMPTY_OBJ
        self._item_json = item_fragments([])
        self._manifests: dict[tuple[str, str], dict | None] = {}
        self._lists: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.on_snapshot = None  # optional callback(snapshot) (metrics)
        self.watcher = _Watcher(self, poll_s)
        self.warm_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        if self.warm_task is not None:
            self.warm_task.cancel()

    @property
    def redis_healthy(self) -> bool:
        return self.watcher.healthy

    async def missing_in_redis(self) -> list[str]:
        """Right now, what Redis lacks of what this server serves: watched channels without `current`, and "ids"
        when the id maps are gone (one MGET)."""
        ks = self.ks
        values = await self.astores("meta").mget([*(ks.current(c) for c in self.watched), ks.id_map_len("item")])
        out = [c for c, v in zip(self.watched, values, strict=False) if v is None]
        if self._id_lens["item"] > 0 and not int(values[-1] or 0):
            out.append("ids")
        return out

    async def sync(self, versions: dict[str, str | None]) -> None:
        """Rebuild the snapshot if a version or an id map changed (idempotent; retried next poll on error)."""
        meta = self.astores("meta")
        lens = await meta.mget([self.ks.id_map_len("item"), self.ks.id_map_len("user")])
        lens = {"item": int(lens[0] or 0), "user": int(lens[1] or 0)}
        # Redis lost data (flushed, restarted empty): keep serving the versions and id maps held. Id maps are
        # append-only, so a map that is gone, or a prefix of ours, is a loss; another shorter map is a new start.
        held = self.snapshot.versions
        versions = {c: (v if v is not None else held.get(c)) for c, v in versions.items()}
        lens = {e: (self._id_lens[e] if 0 < self._id_lens[e] and n in (0, self._short_prefix.get(e)) else n)
                for e, n in lens.items()}
        if versions == self.snapshot.versions and lens == self._id_lens:
            return
        refill = (versions.get(FEATURES_CHANNEL) != self.snapshot.features_version or
                  lens["user"] != self._id_lens["user"] or lens["item"] != self._id_lens["item"])
        for entity in ("item", "user"):
            if lens[entity] != self._id_lens[entity]:
                raw = await meta.get(self.ks.id_map(entity))
                ids = orjson.loads(raw) if raw else []
                mine = self._item_ids if entity == "item" else self._user_ids
                if len(ids) < len(mine) and ids == mine[:len(ids)].tolist():
                    self._short_prefix[entity] = lens[entity]  # a loss: keep ours (and stop re-reading it)
                    continue
                self._short_prefix.pop(entity, None)
                arr = np.empty(len(ids), dtype=object)
                arr[:] = ids
                if entity == "item":
                    self._item_ids, self._item_index = arr, {x: i for i, x in enumerate(ids)}
                    self._item_json = item_fragments(ids)
                else:
                    self._user_ids = arr
                self._id_lens[entity] = lens[entity]
        views = {}
        for spec in self.enabled:
            views[spec.name] = await self._view(spec, versions.get(spec.publisher))
        # forget manifests/lists of versions no longer served
        live = {(c, v) for c, v in versions.items() if v}
        self._manifests = {key: m for key, m in self._manifests.items() if key in live}
        self._lists = {key: m for key, m in self._lists.items() if key in live}
        self.snapshot = Snapshot(versions=dict(versions), views=views, item_ids=self._item_ids,
                                 item_index=self._item_index, user_ids=self._user_ids, item_json=self._item_json)
        log.info("serving versions %s", {c: v for c, v in versions.items()})
        if self.on_snapshot is not None:
            self.on_snapshot(self.snapshot)
        if refill and self._warm_neighbors_on_refill and self.snapshot.features_version:
            if self.warm_task is not None:
                self.warm_task.cancel()
            self.warm_task = asyncio.create_task(self._warm_neighbors(self.snapshot))

    async def _warm_neighbors(self, snap: Snapshot, chunk: int = 1000) -> None:
        """Fill the u2u neighbour cache in the background (chunks of MGET, requests served in between), so
        u2u answers read no neighbour record once warm."""
        fver, cache, ks = snap.features_version, self.neighbor_cache, self.ks
        cache.use_version(fver)
        users = snap.user_ids[: max(0, cache.max_entries - 10_000)].tolist()
        t0, store = time.perf_counter(), self.astores("user_features")
        try:
            for a in range(0, len(users), chunk):
                if self.snapshot.features_version != fver:
                    return
                part = [u for u in users[a:a + chunk] if u not in cache]
                if part:
                    values = await store.mget([ks.user_features(fver, u) for u in part])
                    for u, raw in zip(part, values, strict=True):
                        if raw is not None:
                            cache.put(u, recent_indices(raw, snap.item_index))
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: the cache fills from requests instead
            log.warning("neighbour cache warm-up stopped: %s: %s", type(exc).__name__, exc)
            return
        gc.freeze()  # long-lived from now on: keep them out of later collections (as at start-up)
        log.info("neighbour cache: %d users warmed in %.1fs", len(cache), time.perf_counter() - t0)

    async def _view(self, spec: ChannelSpec, version: str | None) -> ChannelView:
        if not version:
            return ChannelView(spec, unavailable=f"channel {spec.publisher!r} has no published version yet")
        key = (spec.publisher, version)
        if key not in self._manifests:
            self._manifests[key] = unpack_json(await self.astores("meta").get(self.ks.manifest(spec.publisher, version)))
        manifest = self._manifests[key]
        if manifest is None:
            return ChannelView(spec, version, unavailable=f"manifest of {spec.publisher!r} {version} is missing")
        stores = manifest.get("stores", {})
        if spec.kind not in stores and spec.kind not in manifest.get("kinds", []):
            return ChannelView(spec, version, manifest,
                               unavailable=f"{spec.publisher!r} {version} has no {spec.kind!r} artifact")
        store = stores.get(spec.kind)
        lists = None
        if self.kinds[spec.kind].in_snapshot:
            if key not in self._lists:
                try:
                    self._lists[key] = await self._load_lists(spec.publisher, version, manifest)
                except DigestMismatch as exc:  # tampered or damaged: never served; the version held (if any) is
                    log.error("%s", exc)
                    prev = self.snapshot.views.get(spec.name)
                    if prev is not None and prev.lists is not None and not prev.unavailable:
                        return prev
                    return ChannelView(spec, version, manifest, unavailable=str(exc))
            lists = self._lists[key]
        return ChannelView(spec, version, manifest, store, lists)

    async def _load_lists(self, channel: str, version: str, manifest: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every list of a list channel's version, in memory (one MGET per version, none per request), checked
        against the manifest's digest (DigestMismatch: refused)."""
        names = manifest.get("lists", [])
        if not names:
            return {}
        values = await self.astores("lists").mget([self.ks.item_list(channel, version, n) for n in names])
        check_digest(manifest, "lists", value_digest(values), f"channel {channel!r} version {version}")
        out = {}
        for name, value in zip(names, values, strict=True):
            ids, scores = unpack_neighbors(value)
            keep = ids >= 0
            out[name] = rank_list(ids[keep], scores[keep])  # sorted once here, not per request
        return out


class _Watcher(VersionWatcher):
    """VersionWatcher that rebuilds the serving snapshot after every successful poll that changed something."""

    def __init__(self, state: ServingState, interval_s: float):
        super().__init__(state.astores, state.watched, interval_s)
        self.state = state

    async def refresh(self) -> dict[str, str | None]:
        versions = await super().refresh()
        await self.state.sync(dict(versions))
        return versions
