"""One retriever per artifact kind (i2i, u2u, u2i, list), not one per model, all with one interface.

Each turns a channel's published artifact plus the request's user state into ranked internal item
indices through the same `common.retrieval` functions the evaluator uses. The recall server dispatches
through the table `RETRIEVERS` (kind → class) and the attributes of `Retriever`, never on kind names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import orjson

from common import kernels, retrieval
from common.channel_config import ChannelSpec
from common.features import UserState
from common.keyspace import unpack_neighbors
from common.merge import REQUEST_SIZE, normalise
from common.settings import Settings
from services.http_guard import client_headers
from services.recall_server.state import ChannelView, NeighborRecentCache, Snapshot, recent_indices
from services.vector_server.client import VectorClient, VectorServerUnavailable

log = logging.getLogger("recall_server")

EMPTY = (retrieval.EMPTY_IDS, retrieval.EMPTY_SCORES)


class ChannelEmpty(Exception):
    """A channel had nothing to say for this user (reported as status 'empty' with the reason)."""


@dataclass
class RequestContext:
    """Per-request data shared by every channel (computed once)."""

    user_id: str
    user: UserState
    snap: Snapshot
    recent_idx: np.ndarray  # the user's recent items (newest first) as internal indices, unknown ids dropped
    exclude_idx: np.ndarray  # seen + explicitly excluded items, internal indices, ascending
    exclude_ext: list[str]  # the request's `exclude` (external ids)
    cold: bool
    k: int
    categories: list[str]  # categories of a new user's clicked items (empty for users with batch history)
    vector_call: asyncio.Future | None = None  # the request's one vector-server call (u2i channels)
    vector_t0: float = 0.0  # when that call started (u2i channels' latency counts from there)


@dataclass
class Result:
    ids: np.ndarray
    scores: np.ndarray
    version: str | None = None  # the version that actually served (vector server's own for u2i)


Neighbors = tuple[np.ndarray, np.ndarray]


class ListCache:
    """Unpacked neighbour lists of hot anchors, bounded in bytes (LRU). A list never changes under its versioned
    key, so a cached copy is always exact; a new version uses new cache keys and the old ones age out.

    Keyed by (artifact, anchor) tuples, not by Redis key strings: a hit costs no key formatting and no unpacking.
    """

    def __init__(self, max_bytes: int):
        self.enabled = max_bytes > 0
        self.max_bytes = max_bytes
        self.size = 0
        self.counts: dict[str, int] = {}  # cached lists per artifact kind (i2i, u2u)
        self._d: OrderedDict[tuple, Neighbors] = OrderedDict()

    def get_many(self, artifact: tuple, anchors: list) -> list[Neighbors | None]:
        """Cached lists of `anchors` (None where not cached)."""
        d = self._d
        found = [d.get((artifact, a)) for a in anchors]
        for a, v in zip(anchors, found, strict=True):
            if v is not None:
                d.move_to_end((artifact, a))
        return found

    def put(self, artifact: tuple, anchor, value: bytes | None, limit: int | None = None) -> Neighbors:
        """Unpack a value read from Redis (None: a missing key, an empty list), keep its first `limit` entries
        (all: None) if there is room, and return them."""
        ids, scores = unpack_neighbors(value)
        if limit is not None and len(ids) > limit:  # copies, so the whole value is not kept alive
            ids, scores = ids[:limit].copy(), scores[:limit].copy()
        lists = (ids, scores)
        cost = 8 * len(ids) + 128
        if self.enabled and cost <= self.max_bytes:
            d, counts = self._d, self.counts
            if (artifact, anchor) not in d:
                counts[artifact[0]] = counts.get(artifact[0], 0) + 1
                self.size += cost
            d[(artifact, anchor)] = lists
            while self.size > self.max_bytes:
                (old, _), (ids, _sc) = d.popitem(last=False)
                self.size -= 8 * len(ids) + 128
                counts[old[0]] -= 1
        return lists


class Retriever:
    """The serving side of one artifact kind: how many candidates it asks for, whether it answers inline from
    memory, how it answers with I/O, how it starts, warms up and stops; the recall server reads nothing else."""

    kind: ClassVar[str]
    # the artifact is part of the serving snapshot (loaded once per version): it always answers inline, after
    # the channels that need I/O have been started
    in_snapshot: ClassVar[bool] = False
    # answers users outside the trained population (no history; or real-time clicks only, by their categories)
    cold_start: ClassVar[bool] = False
    # every channel of the kind shares one call per request (`start_shared`); latency counts from its start
    shared_call: ClassVar[bool] = False
    # reads other users' recent items (the serving state warms them after a features version change)
    neighbor_histories: ClassVar[bool] = False
    # keeps unpacked lists in the ListCache, filled in the background after a version change (`warm_anchors`,
    # `artifact`, `list_key`, `list_limit`)
    cached_lists: ClassVar[bool] = False
    # (quota, k, total quota) → candidates to ask for: the kind's rule in common.merge.REQUEST_SIZE, which the
    # evaluator uses too
    request_size: ClassVar[Callable[[int, int, int], int]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.request_size = staticmethod(REQUEST_SIZE[cls.kind])

    def retrieve_cached(self, view: ChannelView, ctx: RequestContext, n: int) -> Result | None:
        """The answer when everything it needs is in memory (no I/O, no task), else None."""
        return None

    async def retrieve(self, view: ChannelView, ctx: RequestContext, n: int) -> Result:
        """The answer, reading what it needs."""
        raise NotImplementedError

    async def startup(self) -> None:
        """Start background work (called once when the server starts)."""

    async def warm_up(self) -> None:
        """Open connections now rather than on the first request."""

    async def shutdown(self) -> None:
        """Stop background work and close connections."""

    def warm_anchors(self, snap: Snapshot, popular: np.ndarray) -> np.ndarray | None:
        """Anchors whose lists to load into the ListCache after a version change, likeliest first (popular: item
        indices, most popular first); None: none."""
        return None

    def artifact(self, view: ChannelView) -> tuple:
        """ListCache key prefix of a channel's lists."""
        raise NotImplementedError

    def list_key(self, view: ChannelView, anchor: Any) -> str:
        """Redis key of an anchor's list."""
        raise NotImplementedError

    def list_limit(self, view: ChannelView) -> int | None:
        """How much of a list the cache keeps (None: all)."""
        return None


class I2IRetriever(Retriever):
    """Recent items → their neighbour lists (hot ones from memory, the rest in one MGET) → recency-weighted
    aggregation."""

    kind = "i2i"
    cached_lists = True

    def __init__(self, astores, cache: ListCache):
        self.astores, self.ks, self.cache = astores, astores.keyspace, cache

    def warm_anchors(self, snap: Snapshot, popular: np.ndarray) -> np.ndarray:
        return popular

    def artifact(self, view: ChannelView) -> tuple:
        """ListCache key prefix of a channel's i2i lists (serve.per_anchor included: only that much is kept)."""
        return (self.kind, view.store, view.spec.publisher, view.version, view.spec.serve.per_anchor)

    def list_key(self, view: ChannelView, anchor: int) -> str:
        return self.ks.i2i(view.store, view.spec.publisher, view.version, anchor)

    def list_limit(self, view: ChannelView) -> int:
        return view.spec.serve.per_anchor

    def _lookup(self, view: ChannelView, ctx: RequestContext) -> tuple[tuple, list[int], list[Neighbors | None]]:
        anchors = ctx.recent_idx[: view.spec.serve.recent_n].tolist()
        if not anchors:
            raise ChannelEmpty("no recent item known to the item id map")
        artifact = self.artifact(view)
        return artifact, anchors, self.cache.get_many(artifact, anchors)

    def _aggregate(self, view: ChannelView, ctx: RequestContext, lists: list[Neighbors], n: int) -> Result:
        serve = view.spec.serve
        ids, scores = retrieval.retrieve_i2i(lists, n, serve.recency_decay, serve.per_anchor, ctx.exclude_idx)
        return Result(ids, scores, view.version)

    def retrieve_cached(self, view: ChannelView, ctx: RequestContext, n: int) -> Result | None:
        """The answer when every list it needs is in memory (no I/O, no task), else None."""
        _, _, found = self._lookup(view, ctx)
        if any(v is None for v in found):
            return None
        return self._aggregate(view, ctx, found, n)

    async def retrieve(self, view: ChannelView, ctx: RequestContext, n: int) -> Result:
        artifact, anchors, found = self._lookup(view, ctx)
        missing = [j for j, v in enumerate(found) if v is None]
        if missing:
            ks, store, pub, ver = self.ks, view.store, view.spec.publisher, view.version
            values = await self.astores.reads(store).mget([ks.i2i(store, pub, ver, anchors[j]) for j in missing])
            for j, v in zip(missing, values, strict=True):
                found[j] = self.cache.put(artifact, anchors[j], v, view.spec.serve.per_anchor)
        return self._aggregate(view, ctx, found, n)


class U2URetriever(Retriever):
    """The user's neighbour list → the neighbours' recent items (cached per features version) → aggregation."""

    kind = "u2u"
    neighbor_histories = True
    cached_lists = True

    def __init__(self, astores, cache: NeighborRecentCache, lists: ListCache):
        self.astores, self.ks, self.cache, self.lists = astores, astores.keyspace, cache, lists

    def warm_anchors(self, snap: Snapshot, popular: np.ndarray) -> np.ndarray | None:
        return snap.user_ids if snap.features_version else None  # the lists are useless without histories

    def artifact(self, view: ChannelView) -> tuple:
        """ListCache key prefix of a channel's u2u lists (anchors: external user ids)."""
        return (self.kind, view.store, view.spec.publisher, view.version)

    def list_key(self, view: ChannelView, anchor: str) -> str:
        return self.ks.u2u(view.store, view.spec.publisher, view.version, anchor)

    def _artifact(self, view: ChannelView, ctx: RequestContext) -> tuple:
        if not ctx.snap.features_version:
            raise ChannelEmpty("no user features published (neighbours' histories unknown)")
        return self.artifact(view)

    def _neighbours(self, view: ChannelView, ctx: RequestContext, value: Neighbors) -> tuple[np.ndarray, list[str]]:
        serve, snap = view.spec.serve, ctx.snap
        nb, sims = value[0][: serve.per_anchor], value[1][: serve.per_anchor]
        keep = (nb >= 0) & (nb < len(snap.user_ids))
        nb, sims = nb[keep], sims[keep]
        if not len(nb):
            raise ChannelEmpty("user has no neighbour list in this version")
        return sims, snap.user_ids[nb].tolist()

    def _aggregate(self, view: ChannelView, ctx: RequestContext, sims: np.ndarray, recents: list[np.ndarray],
                   n: int) -> Result:
        k = view.spec.serve.neighbor_items
        ids, scores = retrieval.retrieve_u2u(sims, [r[:k] for r in recents], n, ctx.exclude_idx)
        return Result(ids, scores, view.version)

    def retrieve_cached(self, view: ChannelView, ctx: RequestContext, n: int) -> Result | None:
        """The answer when the user's neighbour list and every neighbour's history are in memory, else None."""
        (value,) = self.lists.get_many(self._artifact(view, ctx), [ctx.user_id])
        if value is None:
            return None
        sims, uids = self._neighbours(view, ctx, value)
        recents, missing = self.cache.get_many(ctx.snap.features_version, uids)
        if missing:
            return None
        return self._aggregate(view, ctx, sims, recents, n)

    async def retrieve(self, view: ChannelView, ctx: RequestContext, n: int) -> Result:
        artifact = self._artifact(view, ctx)
        (value,) = self.lists.get_many(artifact, [ctx.user_id])
        if value is None:
            (raw,) = await self.astores.reads(view.store).mget([self.list_key(view, ctx.user_id)])
            value = self.lists.put(artifact, ctx.user_id, raw)
        sims, uids = self._neighbours(view, ctx, value)
        recents = await self.neighbor_recent(ctx.snap.features_version, uids, ctx.snap)
        return self._aggregate(view, ctx, sims, recents, n)

    async def neighbor_recent(self, fver: str, uids: list[str], snap: Snapshot) -> list[np.ndarray]:
        """Recent item indices of each user in `uids` (batch records; one MGET for the ones not cached)."""
        found, missing = self.cache.get_many(fver, uids)
        if missing:
            ks, index = self.ks, snap.item_index
            values = await self.astores.reads("user_features").mget([ks.user_features(fver, uids[i]) for i in missing])
            for i, raw in zip(missing, values, strict=True):
                arr = recent_indices(raw, index)
                found[i] = arr
                self.cache.put(uids[i], arr)
        return found


class VectorRetriever(Retriever):
    """u2i through the vector server: every u2i channel of a request shares one POST /search/user call, which
    carries the user's recent items and attributes so the vector server reads nothing from Redis for a tower."""

    kind = "u2i"
    shared_call = True

    def __init__(self, settings: Settings, specs: Iterable[ChannelSpec]):
        """`specs`: the enabled channels; with u2i channels among them, a client for their searches (HTTP, or
        the search itself in this process with VECTOR_MODE=embedded), else none."""
        timeouts = [s.timeout_ms for s in specs if s.kind == self.kind]
        self.settings = settings
        self.client = None  # VectorClient (HTTP to the vector server) or EmbeddedVectorSearch (in-process)
        if timeouts and settings.vector_mode == "embedded":
            from services.vector_server.embedded import EmbeddedVectorSearch

            self.client = EmbeddedVectorSearch(settings)
        elif timeouts:
            self.client = VectorClient(settings.vector_url, timeout_s=max(timeouts) / 1000.0,
                                       headers=client_headers(settings))

    async def startup(self) -> None:
        if self.settings.vector_mode == "embedded" and self.client is not None:
            await self.client.start()

    async def warm_up(self) -> None:
        if self.client is not None and self.settings.vector_mode == "remote":
            try:
                await self.client.healthz(timeout_s=2.0)
            except Exception as exc:
                log.warning("vector server %s not reachable at start-up: %s", self.settings.vector_url, exc)

    async def shutdown(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def start_shared(self, ctx: RequestContext, sizes: dict[str, int]) -> None:
        """Start the request's one vector-server call ({publisher: k}) as `ctx.vector_call`: already done when the
        search runs in this process and needs nothing from Redis (VECTOR_MODE=embedded), else a task."""
        # The vector server searches k + len(exclude) and drops the excluded items inside faiss: send the
        # request's exclude plus the user's recent clicks (the likeliest seen items to come back), not the
        # whole history; older seen items are filtered here and in the merge.
        recent = ctx.user.recent_items
        exclude = [*ctx.exclude_ext, *recent] if ctx.exclude_ext else recent
        kw = dict(exclude=exclude or None, recent=recent, attrs=ctx.user.features.get("attrs") or {}, item_ids=False)
        ctx.vector_t0 = time.perf_counter()
        now = getattr(self.client, "search_user_channels_now", None)
        if now is not None:
            call = asyncio.get_running_loop().create_future()
            try:
                results = now(ctx.user_id, sizes, **kw)
            except Exception as exc:
                call.set_exception(exc)
                call.add_done_callback(_retrieve_exception)
                ctx.vector_call = call
                return
            if results is not None:
                call.set_result(results)
                ctx.vector_call = call
                return
        call = asyncio.ensure_future(self.client.search_user_channels(ctx.user_id, sizes, **kw))
        call.add_done_callback(_retrieve_exception)
        ctx.vector_call = call

    def retrieve_cached(self, view: ChannelView, ctx: RequestContext, n: int) -> Result | None:
        """The answer when the shared call is already done (no waiting), else None."""
        call = ctx.vector_call
        if call is None or not call.done():
            return None
        return self._result(view, ctx, n, call.result())

    async def retrieve(self, view: ChannelView, ctx: RequestContext, n: int) -> Result:
        # shield: one channel running out of time must not cancel the call the other channels wait for
        return self._result(view, ctx, n, await asyncio.shield(ctx.vector_call))

    @staticmethod
    def _result(view: ChannelView, ctx: RequestContext, n: int, results: dict) -> Result:
        res = results.get(view.spec.publisher) or {"status": 502, "detail": "no result for this channel"}
        status = res.get("status")
        if status == 404:
            raise ChannelEmpty(f"vector server: {res.get('detail')}")
        if status != 200:
            raise VectorServerUnavailable(f"vector server: {status}: {res.get('detail')}", status)
        ids, scores = kernels.filter_kernel(np.asarray(res["ids"], dtype=np.int64),
                                            np.asarray(res["scores"], dtype=np.float32), ctx.exclude_idx,
                                            len(ctx.snap.item_ids), n)
        return Result(ids, scores, res.get("version", view.version))


def _retrieve_exception(fut: asyncio.Future) -> None:
    """Mark a failed shared call's exception as seen (its channels may all have timed out before it ended)."""
    if not fut.cancelled():
        fut.exception()


async def new_user_categories(astores, fver: str | None, user: UserState, limit: int = 5) -> list[str]:
    """Primary categories of a new user's most recent clicks (one MGET of item feature records)."""
    items = user.recent_items[:limit]
    if not fver or not items:
        return []
    ks = astores.keyspace
    values = await astores.reads("item_features").mget([ks.item_features(fver, i) for i in items])
    cats: list[str] = []
    for raw in values:
        cat = orjson.loads(raw).get("category") if raw else None
        if cat not in (None, "") and str(cat) not in cats:
            cats.append(str(cat))
    return cats


class ListRetriever(Retriever):
    """Non-personalised lists, served from memory (loaded once per version)."""

    kind = "list"
    in_snapshot = True
    cold_start = True

    def __init__(self, rank_offset: float):
        self.rank_offset = rank_offset

    async def retrieve(self, view: ChannelView, ctx: RequestContext, n: int) -> Result:
        return self.retrieve_cached(view, ctx, n)

    def retrieve_cached(self, view: ChannelView, ctx: RequestContext, n: int) -> Result:
        """The answer, always from memory."""
        lists = view.lists or {}
        names = [x for x in view.spec.serve.lists if x in lists]
        if ctx.cold or is_new_user(ctx.user):  # outside the trained population: use what is known about them
            names += [x for x in personal_list_names(ctx.user, ctx.categories) if x in lists and x not in names]
        if not names:
            raise ChannelEmpty(f"none of the lists {view.spec.serve.lists} is published")
        if len(names) == 1:
            ids, scores = retrieval.retrieve_list(*lists[names[0]], n, ctx.exclude_idx, ranked=True)
        else:  # several lists (cold start): rank-normalise each so a small category list counts as much as global
            parts = [(lists[x][0], normalise(lists[x][1], "rank", self.rank_offset)) for x in names]
            ids, scores = retrieval.aggregate(parts, np.ones(len(parts), np.float32), n, ctx.exclude_idx)
        return Result(ids, scores, view.version)


def personal_list_names(user: UserState, categories: list[str] = ()) -> list[str]:
    """Names of per-category / per-region / per-attribute popular lists that fit what is known about a user:
    'cat:<c>' for the user's top categories (or the categories of a new user's clicks), '<key>:<value>' and
    'attr:<key>:<value>' for region, environment and user attributes (used when the list channel publishes them)."""
    f = user.features
    names: list[str] = []
    for entry in f.get("top_categories") or []:
        cat = entry[0] if isinstance(entry, list | tuple) else entry
        names.append(f"cat:{cat}")
    names += [f"cat:{c}" for c in categories]
    for key in ("region", "environment"):
        if f.get(key) not in (None, ""):
            names.append(f"{key}:{f[key]}")
    for col, val in (f.get("attrs") or {}).items():
        if val not in (None, ""):
            names.append(f"{col}:{val}")
            names.append(f"attr:{col}:{val}")
    return names


def is_new_user(user: UserState) -> bool:
    """True when the user has no batch history (only real-time events, or nothing at all)."""
    f = user.features
    return int(f.get("clicks", 0)) - int(f.get("realtime_clicks", 0)) <= 0


RETRIEVERS: dict[str, type[Retriever]] = {cls.kind: cls for cls in (I2IRetriever, U2URetriever, VectorRetriever,
                                                                    ListRetriever)}
