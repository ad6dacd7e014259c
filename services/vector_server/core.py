"""The vector server's search core: version watching, hot swaps, towers and faiss searches, without HTTP.

The FastAPI app (services/vector_server/app.py) and the embedded mode (services/vector_server/embedded.py)
both run this; see docs/vector_server.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import orjson
import redis.exceptions
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common import kernels
from common.breaker import redis_breaker
from common.channel_config import ChannelSpec, load_config
from common.features import UserState, fetch_user_states
from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.redis_conn import AsyncRedisStores, RedisStores
from common.retrieval import sorted_ids
from common.settings import Settings
from common.versions import VersionWatcher
from services.vector_server.index import Bundle, IdMaps, load_bundle, load_id_maps, unpack_user_vector

log = logging.getLogger("vector_server")

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
LATENCY_BUCKETS = (0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
                   0.25, 1.0)


class HTTPError(Exception):
    """Turned into a JSON {"detail": ...} response with `status`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class SearchRequest:
    channel: str
    k: int
    vector: list | None
    user_id: str | None
    exclude: list[str]
    recent: list[str] | None
    exclude_seen: bool


@dataclass
class UserSearchRequest:
    """POST /search/user: one user, several channels, one user-state read."""

    user_id: str
    channels: dict[str, int]  # channel → k
    exclude: list[str]
    recent: list[str] | None
    attrs: dict[str, Any] | None
    exclude_seen: bool
    item_ids: bool


class Metrics:
    """Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.search_seconds = Histogram("vector_search_seconds", "POST /search latency (successful requests)",
                                        ["channel", "source"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("vector_search_errors_total", "POST /search answered with an error status",
                              ["channel", "status"], registry=r)
        self.index_items = Gauge("vector_index_items", "vectors in the serving index", ["channel"], registry=r)
        self.index_dim = Gauge("vector_index_dim", "dimension of the serving index", ["channel"], registry=r)
        self.version = Gauge("vector_channel_version_info", "serving version (value 1)", ["channel", "version"],
                             registry=r)
        self.swaps = Counter("vector_swaps_total", "index swaps (new version now serving)", ["channel"], registry=r)
        self.load_seconds = Gauge("vector_load_seconds", "duration of the last successful load", ["channel"],
                                  registry=r)
        self.load_errors = Counter("vector_load_errors_total", "failed version loads", ["channel"], registry=r)


class VectorService:
    """State of the server: channel specs, the serving bundles, id maps and the version watcher."""

    def __init__(self, settings: Settings, poll_s: float | None = None):
        self.settings = settings
        self.poll_s = poll_s or settings.vector_poll_s
        if not settings.redis_url:
            raise SystemExit("REDIS_URL is not set: the vector server reads published channels from Redis")
        cfg = load_config(settings.channels_config)
        self.specs: dict[str, ChannelSpec] = {c.name: c for c in cfg.channels if c.kind == "u2i" and c.enabled}
        self.known = sorted(self.specs)
        # a `from:` channel may also be asked for by its publisher's name (what the recall server sends)
        self.alias = {s.publisher: n for n, s in self.specs.items() if s.publisher not in self.specs}
        self.ks = Keyspace.from_settings(settings)
        self.astores = AsyncRedisStores(settings.redis_url, self.ks, timeout_s=settings.redis_timeout_s,
                                        breaker=redis_breaker(settings))
        self.stores = RedisStores(settings.redis_url, self.ks, socket_timeout=settings.vector_load_timeout_s,
                                  socket_connect_timeout=settings.redis_timeout_s)
        self.bundles: dict[str, Bundle] = {}
        self.maps: IdMaps = IdMaps.empty()
        self.metrics = Metrics()
        self.target: dict[str, str | None] = {}
        self.load_error: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._bg: list[asyncio.Task] = []
        self._precomputing: dict[str, asyncio.Task] = {}  # channel → its per-user results being computed
        self._stopping = threading.Event()  # tells precompute threads to give up (shutdown)
        self.ids_lost = False  # Redis lost the id maps: the ones held serve on (docs/reliability.md)
        publishers = sorted({s.publisher for s in self.specs.values()})
        self.watcher = VersionWatcher(self.astores, [*publishers, FEATURES_CHANNEL], self.poll_s, self._on_change)

    # -- loading and swapping -------------------------------------------------------------------
    def _on_change(self, publisher: str, old: str | None, new: str | None) -> None:
        for name, spec in self.specs.items():
            if spec.publisher == publisher:
                self.target[name] = new
                task = self._tasks.get(name)
                if task is None or task.done():
                    self._tasks[name] = asyncio.create_task(self._load_loop(name))

    async def _load_loop(self, name: str) -> None:
        """Bring channel `name` to its target version; retries (backing off) while the old bundle serves."""
        failures = 0
        while True:
            target, current = self.target.get(name), self.bundles.get(name)
            if target is None:  # Redis lost the version (flushed, restarted empty): the bundle in memory serves on
                if current is not None:
                    log.warning("channel %s: `current` pointer gone from Redis; still serving version %s from memory "
                                "until a version is published again (/healthz: degraded)", name, current.version)
                return
            if current is not None and current.version == target:
                return
            try:
                bundle = await asyncio.to_thread(load_bundle, self.stores, self.specs[name], target, self.maps,
                                                 self.settings.vector_user_cache_mb * 2**20)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                self.load_error[name] = f"version {target}: {msg}"
                self.metrics.load_errors.labels(name).inc()
                delay = min(60.0, max(self.poll_s, 1.0) * 2 ** min(failures, 6))
                failures += 1
                log.error("channel %s: loading version %s failed (%s); retrying in %.0fs", name, target, msg, delay)
                await asyncio.sleep(delay)
                continue
            self._swap(name, bundle)
            self._precomputing[name] = asyncio.create_task(self._precompute(name, bundle))

    async def _precompute(self, name: str, bundle: Bundle) -> None:
        """Per-user search results of a bundle that now serves (live searches answer until they are ready)."""
        try:
            await asyncio.to_thread(bundle.precompute, self.specs[name].index, self.settings.vector_precompute_mb * 2**20,
                                    self._stopping)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # searches stay live
            log.error("channel %s version %s: precomputing user results failed: %s: %s", name, bundle.version,
                      type(exc).__name__, exc)

    def _swap(self, name: str, bundle: Bundle) -> None:
        old = self.bundles.get(name)
        self.bundles[name] = bundle  # the swap: one reference assignment; requests hold the bundle they took
        self.load_error.pop(name, None)
        m = self.metrics
        if old is not None:
            m.version.remove(name, old.version)
        m.version.labels(name, bundle.version).set(1)
        m.index_items.labels(name).set(bundle.n_indexed)
        m.index_dim.labels(name).set(bundle.dim)
        m.load_seconds.labels(name).set(bundle.load_s)
        m.swaps.labels(name).inc()
        log.info("channel %s: serving version %s (%d vectors, d=%d, %s, tower=%s) loaded in %.2fs", name,
                 bundle.version, bundle.n_indexed, bundle.dim, bundle.index_desc, bundle.tower is not None,
                 bundle.load_s)
        # the old bundle is freed by reference counting once the requests holding it finish

    async def _refresh_maps(self) -> IdMaps:
        self.maps = await asyncio.to_thread(load_id_maps, self.stores)
        return self.maps

    async def _maps_loop(self) -> None:
        """Reload the id maps when their published length changes (append-only maps)."""
        ks = self.ks
        while True:
            try:
                n_item, n_user = await self.astores("meta").mget([ks.id_map_len("item"), ks.id_map_len("user")])
                self.ids_lost = not n_item and self.maps.n_item > 0  # Redis lost the maps: ours serve on
                if not self.ids_lost and (int(n_item or 0) != self.maps.n_item or int(n_user or 0) != self.maps.n_user):
                    await self._refresh_maps()
                    log.info("id maps reloaded: %d items, %d users", len(self.maps.item), len(self.maps.user))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep the maps we have
                log.warning("id map refresh failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.poll_s)

    async def start(self) -> None:
        kernels.warm_up()  # compiled filters: loaded now, not on the first search
        try:
            await self._refresh_maps()
        except Exception as exc:
            log.warning("id maps not loaded at start-up (%s: %s); retrying in the background", type(exc).__name__, exc)
        await self.watcher.start()
        self._bg.append(asyncio.create_task(self._maps_loop()))

    async def stop(self) -> None:
        """Cancel the background tasks and close Redis; bounded, so shutdown never hangs on a stuck command."""
        self._stopping.set()
        tasks = [*self._bg, *self._tasks.values(), *self._precomputing.values()]
        for t in tasks:
            t.cancel()
        # a redis-py command cancelled mid-flight can take long to unwind: wait a little, never forever
        stopping = [asyncio.ensure_future(self.watcher.stop()), *tasks]
        await asyncio.wait(stopping, timeout=2.0)
        await asyncio.wait([asyncio.ensure_future(self.astores.close())], timeout=2.0)
        self.stores.close()

    # -- requests -----------------------------------------------------------------------------
    def bundle_for(self, channel: str) -> Bundle:
        b = self.bundles.get(channel)
        if b is not None:
            return b
        if channel in self.alias:
            return self.bundle_for(self.alias[channel])
        if channel not in self.specs:
            raise HTTPError(422, f"field 'channel': unknown channel {channel!r}; known u2i channels: {self.known}")
        why = self.load_error.get(channel)
        target = self.target.get(channel)
        if why:
            detail = f"channel {channel!r} is not loaded: {why}"
        elif target:
            detail = f"channel {channel!r} is loading version {target}; retry shortly"
        else:
            detail = f"channel {channel!r} has no published version yet"
        raise HTTPError(503, detail)

    async def user_searches(self, req: UserSearchRequest) -> dict[str, dict[str, Any]]:
        """Top-k of several channels for one user: at most one user-state read (none when the caller sends
        `recent` and `attrs`) and one MGET of precomputed vectors. Per-channel failures are reported in the
        channel's entry ({"status": 404|503, "detail"}); an unknown channel fails the whole request (422)."""
        bundles, out = self._bundles(req)
        state: UserState | None = None
        if self._needs_state(req, bundles):
            state = await self._read_state(req, bundles)
        vectors, fallback = self._user_vectors(req, bundles, out, state)
        if fallback:
            try:
                values = await self.astores.reads("user_emb").mget(
                    [self.ks.user_vector(bundles[n].publisher, bundles[n].version, req.user_id) for n in fallback])
            except REDIS_ERRORS as exc:
                values = None
                for n in fallback:
                    out[n] = {"status": 503, "detail": f"Redis unavailable while reading the vector of user "
                                                       f"{req.user_id!r}: {type(exc).__name__}: {exc}"}
            for n, value in zip(fallback, values or [], strict=False):
                vec = unpack_user_vector(value, bundles[n].dim, bundles[n].n_interests)
                if vec is None:
                    out[n] = {"status": 404, "detail": f"no vector for user {req.user_id!r} in channel {n!r}"}
                else:
                    vectors[n] = (vec, "precomputed")
        return self._search_all(req, bundles, vectors, out, state)

    def user_searches_now(self, req: UserSearchRequest) -> dict[str, dict[str, Any]] | None:
        """`user_searches` without I/O: the answer when everything it needs is in memory (the caller sent the
        user's recent items and attributes, precomputed vectors are held in memory), else None."""
        bundles, out = self._bundles(req)
        if self._needs_state(req, bundles) or any(b.tower is None and b.user_vectors is None for b in bundles.values()):
            return None  # known before computing any tower, so the async path does not compute them twice
        vectors, fallback = self._user_vectors(req, bundles, out, None)
        if fallback:  # rare: a tower gave nothing and its channel's precomputed vectors are not in memory
            return None
        return self._search_all(req, bundles, vectors, out, None)

    def _bundles(self, req: UserSearchRequest) -> tuple[dict[str, Bundle], dict[str, dict[str, Any]]]:
        bundles: dict[str, Bundle] = {}
        out: dict[str, dict[str, Any]] = {}
        for name in req.channels:
            try:
                bundles[name] = self.bundle_for(name)
            except HTTPError as exc:
                if exc.status == 422:
                    raise
                out[name] = {"status": exc.status, "detail": exc.detail}
        return bundles, out

    @staticmethod
    def _needs_state(req: UserSearchRequest, bundles: dict[str, Bundle]) -> bool:
        towers = any(b.tower is not None for b in bundles.values())
        return req.exclude_seen or (towers and (req.recent is None or req.attrs is None))

    async def _read_state(self, req: UserSearchRequest, bundles: dict[str, Bundle]) -> UserState:
        user_id = req.user_id
        recent_n = max([b.recent_n for b in bundles.values() if b.tower is not None]
                       + [self.settings.recent_n if req.exclude_seen else 1])
        try:
            [state] = await fetch_user_states(self.astores, [user_id], self.watcher.versions.get(FEATURES_CHANNEL),
                                              recent_n)
        except REDIS_ERRORS as exc:
            raise HTTPError(503, f"Redis unavailable while reading user {user_id!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
        except (orjson.JSONDecodeError, ValueError, TypeError, IndexError) as exc:
            raise HTTPError(503, f"user state of {user_id!r} in Redis is unreadable: {type(exc).__name__}: "
                                 f"{exc}") from None
        return state

    def _user_vectors(self, req: UserSearchRequest, bundles: dict[str, Bundle], out: dict[str, dict[str, Any]],
                      state: UserState | None) -> tuple[dict[str, tuple[np.ndarray, str]], list[str]]:
        """Query vectors from the towers and the in-memory precomputed vectors; the channels whose precomputed
        vector must be read from Redis."""
        user_id = req.user_id
        # the user's recent items, newest first, with their times when they come from the user state (a `recent`
        # given in the request has none: towers that use times then see 0)
        if req.recent is not None:
            recent, recent_ts = req.recent, None
        else:
            pairs = state.recent if state else []
            recent, recent_ts = [i for i, _ in pairs], [t for _, t in pairs]
        attrs = req.attrs if req.attrs is not None else ((state.features.get("attrs") or {}) if state else {})
        vectors: dict[str, tuple[np.ndarray, str]] = {}
        for name, b in bundles.items():
            if b.tower is None:
                continue
            maps = b.maps or self.maps
            get = maps.item.get
            try:
                vec = b.tower_vector(maps.user.get(user_id), attrs, [get(x) for x in recent], recent_ts)
            except Exception as exc:
                out[name] = {"status": 503, "detail": f"user tower of channel {name!r} failed: "
                                                      f"{type(exc).__name__}: {exc}"}
                continue
            if np.isfinite(vec).all() and np.any(vec):
                vectors[name] = (vec, "tower")
        fallback = []
        for n in bundles:  # precomputed vectors: from memory, else one MGET for every channel that needs one
            if n in vectors or n in out:
                continue
            cached, vec = bundles[n].cached_user_vector(user_id)
            if not cached:
                fallback.append(n)
            elif vec is None:
                out[n] = {"status": 404, "detail": f"no vector for user {user_id!r} in channel {n!r}"}
            else:
                vectors[n] = (vec, "precomputed")
        return vectors, fallback

    def _search_all(self, req: UserSearchRequest, bundles: dict[str, Bundle],
                    vectors: dict[str, tuple[np.ndarray, str]], out: dict[str, dict[str, Any]],
                    state: UserState | None) -> dict[str, dict[str, Any]]:
        excl = req.exclude
        if req.exclude_seen and state is not None and state.seen:
            excl = [*excl, *state.seen]
        excluded: dict[int, np.ndarray | None] = {}  # per id-map object: channels almost always share one
        for name, (vec, source) in vectors.items():
            b = bundles[name]
            maps = b.maps or self.maps
            if id(maps) not in excluded:
                excluded[id(maps)] = sorted_ids(maps.item_indices(excl)) if excl else None
            exclude = excluded[id(maps)]
            found = b.precomputed_search(req.user_id, req.channels[name], exclude) if source == "precomputed" else None
            ids, scores = found if found is not None else b.search_user(vec, req.channels[name], exclude)
            res: dict[str, Any] = {"status": 200, "version": b.version, "source": source, "ids": ids, "scores": scores}
            if req.item_ids:
                res["item_ids"] = maps.external_items(ids)
            out[name] = res
        return {name: out[name] for name in req.channels}

    async def search(self, req: SearchRequest) -> tuple[dict[str, Any], str]:
        """POST /search: one channel, by explicit vector or by user (the one-channel case of `user_searches`)."""
        if req.user_id is not None:
            multi = UserSearchRequest(req.user_id, {req.channel: req.k}, req.exclude, req.recent, None,
                                      req.exclude_seen, True)
            res = (await self.user_searches(multi))[req.channel]
            status = res.pop("status")
            if status != 200:
                raise HTTPError(status, res["detail"])
            return {"channel": req.channel, **res}, res["source"]
        b = self.bundle_for(req.channel)
        maps = b.maps or self.maps
        try:
            q = np.asarray(req.vector, dtype=np.float32)
        except (ValueError, TypeError):
            raise HTTPError(422, "field 'vector' must be a list of numbers") from None
        if q.ndim != 1 or len(q) != b.dim:
            raise HTTPError(422, f"field 'vector' has dimension {len(req.vector)}; channel {req.channel!r} "
                                 f"expects d={b.dim}")
        if not np.isfinite(q).all():
            raise HTTPError(422, "field 'vector' contains NaN or infinite values")
        exclude = np.asarray(maps.item_indices(req.exclude), dtype=np.int64) if req.exclude else None
        ids, scores = b.search(q, req.k, exclude)
        if not np.isfinite(scores).all():  # float32 overflow of huge finite components: JSON would say null
            raise HTTPError(422, "field 'vector': its components are too large (the scores overflow float32); "
                                 "scale the vector down")
        return {"channel": req.channel, "version": b.version, "source": "vector", "ids": ids,
                "item_ids": maps.external_items(ids), "scores": scores}, "vector"

    def precomputing(self) -> list[str]:
        """Channels whose per-user search results are still being computed (their searches run live meanwhile)."""
        return sorted(n for n, t in self._precomputing.items() if not t.done())

    async def health(self) -> tuple[int, dict[str, Any]]:
        channels = {n: b.describe() for n, b in self.bundles.items()}
        not_loaded = {n: self.load_error.get(n) or ("loading " + str(self.target[n]) if self.target.get(n)
                                                     else "no published version") for n in self.specs
                      if n not in self.bundles}
        body: dict[str, Any] = {"status": "ok", "channels": channels, "not_loaded": not_loaded,
                                "precomputing": self.precomputing(),
                                "features_version": self.watcher.versions.get(FEATURES_CHANNEL)}
        try:
            watched = self.watcher.channels
            values = await self.astores("meta").mget([self.ks.current(c) for c in watched])
        except REDIS_ERRORS as exc:
            body.update(status="unavailable", detail=f"Redis unreachable: {type(exc).__name__}: {exc}")
            return 503, body
        missing = [c for c, v in zip(watched, values, strict=True) if v is None] + (["ids"] if self.ids_lost else [])
        if missing:  # Redis lost (or never had) them: the bundles held keep answering (docs/reliability.md)
            body.update(status="degraded", missing=missing,
                        detail=f"Redis has no published version of {', '.join(missing)}: serving the versions held in "
                               f"memory (if any) until they are published again")
            return 503, body
        return 200, body


def configure_threads(n: int) -> None:
    """One OpenMP/torch thread per worker: the server is CPU-bound per request; threads only contend."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
