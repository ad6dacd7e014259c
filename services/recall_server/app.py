"""The recall server: GET /recall fans out to every channel concurrently, merges, filters, answers.

Fast by design (see shared PERFORMANCE_NOTES): one pipelined read of the user state per request, one
MGET per channel read, in-memory lists, numpy merge, orjson responses, `async def` endpoints, and all
per-version work (config, manifests, id maps, lists) done when a version changes, not per request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import orjson
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.datastructures import QueryParams

from common import kernels
from common.breaker import redis_breaker
from common.channel_config import ChannelConfig, load_config
from common.fast_path import FastPath
from common.features import fetch_user_states
from common.id_rule import MAX_EXCLUDE, IdError, check_id
from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.merge import ChannelOutput, merge
from common.redis_conn import AsyncRedisStores
from common.settings import Settings, get_settings
from services import http_guard, openapi
from services.openapi import ID_LIST_PATTERN, METRICS, error, id_schema, invalid, names_pattern
from services.recall_server.metrics import RecallMetrics, metrics_payload
from services.recall_server.response import items_json
from services.recall_server.retrievers import (
    RETRIEVERS,
    ChannelEmpty,
    I2IRetriever,
    ListCache,
    ListRetriever,
    RequestContext,
    Result,
    Retriever,
    U2URetriever,
    VectorRetriever,
    is_new_user,
    new_user_categories,
)
from services.recall_server.schemas import RecallAnswer, RecallHealth
from services.recall_server.state import ChannelView, ServingState, Snapshot
from services.vector_server.client import VectorNotFound, VectorServerTimeout

log = logging.getLogger("recall_server")

_INT_RE = re.compile(r"^[0-9]{1,9}$")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


class ParamError(Exception):
    """A bad query parameter (→ 422 naming it)."""

    def __init__(self, param: str, msg: str):
        super().__init__(msg)
        self.param, self.msg = param, msg


class RedisUnavailable(Exception):
    """Redis did not answer (→ 503 naming Redis)."""


@dataclass
class RecallParams:
    user_id: str
    k: int
    channels: list[str] | None
    exclude: list[str]
    explain: bool


def _ids_param(name: str, value: str | list, limit: int) -> list[str]:
    """Ids from a comma-separated string (GET) or a JSON list (POST), each by the one id rule (common/id_rule.py)."""
    if isinstance(value, list):
        parts = list(value)
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    else:
        raise ParamError(name, f"{name}: expected a list of ids or a comma-separated string")
    if len(parts) > limit:
        raise ParamError(name, f"{name}: at most {limit} values, got {len(parts)}")
    for pos, p in enumerate(parts):
        if isinstance(p, str) and not p.strip():
            raise ParamError(name, f"{name}: empty value at position {pos} (expected ids, e.g. a,b,c)")
        try:
            parts[pos] = check_id(p)
        except IdError as exc:
            raise ParamError(name, f"{name}: value at position {pos} is not a valid id: {exc}") from None
    return parts


def parse_params(user_id: str | None, k: str | None, channels: str | None, exclude: str | None, explain: str | None,
                 *, default_k: int, max_k: int, known: list[str]) -> RecallParams:
    """Validate the query parameters of GET /recall; raises ParamError naming the bad one."""
    if user_id is None or (isinstance(user_id, str) and not user_id.strip()):
        raise ParamError("user_id", "user_id is required and must not be empty")
    try:
        uid = check_id(user_id)
    except IdError as exc:
        raise ParamError("user_id", f"user_id {exc}") from None
    if k is None or k.strip() == "":
        kk = min(default_k, max_k)
    else:
        ks = k.strip()
        if not _INT_RE.match(ks) or not 1 <= int(ks) <= max_k:
            raise ParamError("k", f"k must be an integer between 1 and {max_k} (the documented maximum, MAX_K); got {k[:40]!r}")
        kk = int(ks)
    chans = None
    if channels is not None:
        chans = []
        for name in _ids_param("channels", channels, 100):
            if name not in known:
                raise ParamError("channels", f"channels: unknown channel {name[:60]!r}; known (enabled) channels: {known}")
            if name not in chans:
                chans.append(name)
    excl = _ids_param("exclude", exclude, MAX_EXCLUDE) if exclude not in (None, "") else []
    ex = (explain or "").strip().lower()
    if ex not in _TRUE and ex not in _FALSE:
        raise ParamError("explain", f"explain must be true or false; got {explain[:40]!r}")
    return RecallParams(uid, kk, chans, excl, ex in _TRUE)


BODY_FIELDS = ("user_id", "k", "channels", "exclude", "explain")


def parse_query(query_string: bytes, *, default_k: int, max_k: int, known: list[str]) -> RecallParams:
    """GET /recall's query string; a parameter given twice is refused (422), not silently last-wins."""
    q = QueryParams(query_string)
    if len(q) != len(q.multi_items()):
        dup = next(name for name in q if len(q.getlist(name)) > 1)
        raise ParamError(dup, f"{dup[:60]} is given {len(q.getlist(dup))} times; give each query parameter once")
    return parse_params(q.get("user_id"), q.get("k"), q.get("channels"), q.get("exclude"), q.get("explain"),
                        default_k=default_k, max_k=max_k, known=known)


def parse_body(raw: bytes, *, default_k: int, max_k: int, known: list[str]) -> RecallParams:
    """POST /recall's JSON body: the GET parameters as fields, `channels` and `exclude` as lists of ids (or
    comma-separated strings), `k` an integer, `explain` a boolean."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ParamError("body", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ParamError("body", 'body must be a JSON object, e.g. {"user_id": "42", "k": 50, "exclude": ["7"]}')
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        raise ParamError("body", f"unknown field(s) {[u[:60] for u in unknown[:5]]}; allowed: {', '.join(BODY_FIELDS)}")
    k, explain = body.get("k"), body.get("explain", False)
    if isinstance(k, float) and k.is_integer() and abs(k) < 1e15:  # JSON's 50.0 is the integer 50 (OpenAPI too)
        k = int(k)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise ParamError("k", f"k must be an integer between 1 and {max_k}")
    if not isinstance(explain, bool):
        raise ParamError("explain", "explain must be true or false")
    return parse_params(body.get("user_id"), None if k is None else str(k), body.get("channels"), body.get("exclude"),
                        "true" if explain else "false", default_k=default_k, max_k=max_k, known=known)


class RecallService:
    """Holds everything a request needs; `recall()` is the whole request path."""

    def __init__(self, settings: Settings, config: ChannelConfig, metrics: RecallMetrics):
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the recall server needs a Redis (`make up` sets one up)")
        self.settings, self.config, self.metrics = settings, config, metrics
        self.ks = Keyspace.from_settings(settings)
        self.astores = AsyncRedisStores(settings.redis_url, self.ks, timeout_s=settings.redis_timeout_s,
                                        breaker=redis_breaker(settings))
        self.state = ServingState(config, self.astores, RETRIEVERS)
        self.state.on_snapshot = self._on_snapshot
        self._warm_task: asyncio.Task | None = None
        self._flush_task: asyncio.Task | None = None
        self.enabled = [c.name for c in self.state.enabled]
        self.normalize, self.rank_offset = config.merge.normalize, config.merge.rank_offset
        self.list_cache = ListCache(settings.recall_list_cache_mb * 2**20)
        self.vector = VectorRetriever(settings, self.state.enabled)  # the one retriever with a shared call
        self.vector_client = self.vector.client  # VectorClient, EmbeddedVectorSearch, or None (no u2i channel)
        retrievers: list[Retriever] = [I2IRetriever(self.astores, self.list_cache),
                                       U2URetriever(self.astores, self.state.neighbor_cache, self.list_cache),
                                       self.vector, ListRetriever(self.rank_offset)]
        self.retrievers: dict[str, Retriever] = {r.kind: r for r in retrievers}  # every request dispatches here

    async def start(self) -> None:
        await self.state.start()
        for retriever in self.retrievers.values():
            await retriever.startup()
        await self.warm_up()
        self._flush_task = asyncio.get_running_loop().create_task(self._flush_metrics())

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.metrics.FLUSH_S)
            self.metrics.flush()

    async def warm_up(self) -> None:
        """Compile the merge kernels and open a connection to every store and (through the retrievers) the
        vector server now, not on the first request."""
        kernels.warm_up()
        stores = {"meta", "user_features", *(v.store for v in self.state.snapshot.views.values() if v.store)}
        for store in stores:
            try:
                await self.astores(store).ping()
            except Exception as exc:  # Redis down at start-up: requests answer 503 until it is back
                log.warning("Redis store %s not reachable at start-up: %s", store, exc)
        for retriever in self.retrievers.values():
            await retriever.warm_up()

    def _on_snapshot(self, snap: Snapshot) -> None:
        self.metrics.set_versions({c.name: snap.versions.get(c.publisher) for c in self.state.enabled} | {
            FEATURES_CHANNEL: snap.features_version})
        if self.list_cache.enabled and any(self.retrievers[v.spec.kind].cached_lists and not v.unavailable
                                           for v in snap.views.values()):
            if self._warm_task is not None:
                self._warm_task.cancel()
            self._warm_task = asyncio.get_running_loop().create_task(self._warm_lists(snap))

    async def _warm_lists(self, snap: Snapshot, chunk: int = 500) -> None:
        """Fill the list cache in the background after a version change, up to 3/4 of its budget, kind by kind
        in table order: the i2i lists of the most popular items first (the likeliest anchors), then the u2u lists
        of every user; requests then rarely wait for Redis."""
        cache, t0 = self.list_cache, time.perf_counter()
        order = popularity_order(snap)
        plan = []  # (retriever, its channels' views, anchors)
        for r in self.retrievers.values():
            if not r.cached_lists:
                continue
            views = [v for v in snap.views.values() if self.retrievers[v.spec.kind] is r and not v.unavailable]
            anchors = r.warm_anchors(snap, order) if views else None
            if anchors is not None and len(anchors):
                plan.append((r, views, anchors))
        try:
            for r, views, anchors in plan:
                for a in range(0, len(anchors), chunk):
                    part = anchors[a:a + chunk].tolist()
                    for v in views:
                        if cache.size > 0.75 * cache.max_bytes or self.state.snapshot is not snap:
                            return
                        artifact = r.artifact(v)
                        todo = [x for x, hit in zip(part, cache.get_many(artifact, part), strict=True) if hit is None]
                        if todo:
                            values = await self.astores.reads(v.store).mget([r.list_key(v, x) for x in todo])
                            limit = r.list_limit(v)
                            for x, value in zip(todo, values, strict=True):
                                cache.put(artifact, x, value, limit)
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: the cache fills from requests instead
            log.warning("list cache warm-up stopped: %s: %s", type(exc).__name__, exc)
            return
        finally:
            gc.freeze()  # the cache's objects are long-lived: keep them out of later collections (as at start-up)
            log.info("list cache: %.0f MB after warm-up (%.1fs): %s", cache.size / 2**20, time.perf_counter() - t0,
                     dict(cache.counts))

    async def stop(self) -> None:
        for task in (self._warm_task, self._flush_task):
            if task is not None:
                task.cancel()
        self.metrics.flush()
        await self.state.stop()
        for retriever in self.retrievers.values():
            await retriever.shutdown()
        await self.astores.close()

    # -- the request path -----------------------------------------------------------------------
    async def recall(self, p: RecallParams, trace: dict | None = None) -> dict:
        """The answer to one /recall; `trace` (the inspector's, services/recall_server/inspector) receives the
        snapshot, the user's state and every channel's own `Result`."""
        snap = self.state.snapshot  # one consistent set of versions for the whole request
        try:
            (user,) = await fetch_user_states(self.astores, [p.user_id], snap.features_version, self.settings.recent_n)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise RedisUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from None
        index = snap.item_index
        recent = [index.get(i, -1) for i in user.recent_items]
        recent_idx = np.array([i for i in recent if i >= 0], dtype=np.int64)
        seen = [index.get(i, -1) for i in user.seen]
        if p.exclude:
            seen += [index.get(i, -1) for i in p.exclude]
        exclude_idx = np.unique(np.array([i for i in seen if i >= 0], dtype=np.int64))
        cold = not user.recent
        names = p.channels or self.enabled
        views = [snap.views[n] for n in names]
        retrievers = self.retrievers
        categories: list[str] = []
        if not cold and is_new_user(user) and any(retrievers[v.spec.kind].cold_start and not v.unavailable
                                                  for v in views):
            try:  # a user known only from real-time events: per-category popular lists of what they clicked
                categories = await new_user_categories(self.astores, snap.features_version, user)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("categories of new user %r not read: %s", p.user_id, exc)
        ctx = RequestContext(p.user_id, user, snap, recent_idx, exclude_idx, p.exclude, cold, p.k, categories)

        total_quota = sum(v.spec.quota for v in views)
        statuses: dict[str, dict] = {}
        results: dict[str, Result] = {}
        tasks: list = []
        vector_sizes: dict[str, int] = {}
        for view in views:
            spec = view.spec
            r = retrievers[spec.kind]
            if view.unavailable:
                statuses[spec.name] = {"status": "skipped", "count": 0, "latency_ms": 0.0, "detail": view.unavailable}
            elif cold and not r.cold_start:
                statuses[spec.name] = {"status": "skipped", "count": 0, "latency_ms": 0.0,
                                       "detail": "cold start: no history for this user"}
            elif not r.in_snapshot:
                # the evaluator's rule (common.merge.REQUEST_SIZE), at most MAX_K
                n = min(r.request_size(spec.quota, p.k, total_quota), self.settings.max_k)
                if r.shared_call:
                    vector_sizes[spec.publisher] = n
                tasks.append((view, r, n))
        if vector_sizes:
            self.vector.start_shared(ctx, vector_sizes)
            if not ctx.vector_call.done():
                await asyncio.sleep(0)  # send the vector server its work before this worker computes the rest
        # channels with everything in memory answer inline; the others (I/O) run as concurrent tasks
        pending = []
        for view, r, n in tasks:
            if self._run_inline(view.spec.name, partial(r.retrieve_cached, view, ctx, n), statuses, results,
                                ctx.vector_t0 if r.shared_call else None):
                continue
            pending.append(asyncio.ensure_future(self._run(view, r, ctx, n, statuses, results)))
        tasks = pending
        for view in views:  # artifacts held in the snapshot (lists): inline, while the I/O channels run
            r = retrievers[view.spec.kind]
            if r.in_snapshot and view.spec.name not in statuses:
                n = r.request_size(view.spec.quota, p.k, total_quota)
                self._run_inline(view.spec.name, partial(r.retrieve_cached, view, ctx, n), statuses, results)
        if tasks:
            await asyncio.gather(*tasks)

        outputs = [ChannelOutput(n, results[n].ids, results[n].scores, snap.views[n].spec.weight, snap.views[n].spec.quota)
                   for n in names if n in results]
        merged = merge(outputs, p.k, exclude_idx, normalize=self.normalize, rank_offset=self.rank_offset)
        ids = merged.ids
        n_known = len(snap.item_ids)
        if len(ids) and ids.max() >= n_known:  # an artifact newer than our id map: drop what we cannot name
            keep = ids < n_known
            merged.ids, merged.scores, merged.ranks = ids[keep], merged.scores[keep], merged.ranks[keep]
        if p.explain:
            ext = snap.item_ids[merged.ids].tolist()
            scores = np.round(merged.scores.astype(np.float64), 6).tolist()
            per: list[dict] = [{} for _ in ext]
            rows, cols = np.nonzero(merged.ranks)
            ch_names = merged.channel_names
            for r, c, v in zip(rows.tolist(), cols.tolist(), merged.ranks[rows, cols].tolist(), strict=True):
                per[r][ch_names[c]] = v
            items = [{"item_id": i, "score": s, "channels": d} for i, s, d in zip(ext, scores, per, strict=True)]
        else:
            items = items_json(snap.item_json, snap.item_ids, merged.ids, merged.scores)
        statuses = {n: statuses[n] for n in names}  # config order, whatever order the channels finished in
        versions = {n: (results[n].version if n in results else snap.views[n].version) for n in names}
        versions[FEATURES_CHANNEL] = snap.features_version
        if trace is not None:
            trace.update(snapshot=snap, user=user, results=results)
        self.metrics.returned_items.observe(len(merged.ids))
        return {"user_id": p.user_id, "k": p.k, "items": items, "channels": statuses, "versions": versions,
                "cold_start": cold}

    async def _run(self, view: ChannelView, retriever: Retriever, ctx: RequestContext, n: int, statuses: dict,
                   results: dict) -> None:
        spec = view.spec
        t0 = time.perf_counter()
        detail = None
        try:
            async with asyncio.timeout(spec.timeout_ms / 1000.0):
                res = await retriever.retrieve(view, ctx, n)
            status = "ok" if len(res.ids) else "empty"
            results[spec.name] = res
        except ChannelEmpty as exc:
            status, detail = "empty", str(exc)
        except (TimeoutError, VectorServerTimeout, redis.exceptions.TimeoutError):
            status, detail = "timeout", f"no answer within timeout_ms={spec.timeout_ms:g}"
        except VectorNotFound as exc:
            status, detail = "empty", f"vector server: {exc}"
        except Exception as exc:  # one failing channel never fails the request
            status, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        self._record(spec.name, status, detail, t0, results, statuses)

    def _run_inline(self, name: str, compute, statuses: dict, results: dict, t0: float | None = None) -> bool:
        """Run an in-memory channel now, without a task; False (nothing recorded) when `compute()` returns None,
        i.e. the channel needs I/O after all. Its latency counts from `t0` (default: now)."""
        t0 = t0 or time.perf_counter()
        detail = None
        try:
            res = compute()
            if res is None:
                return False
            status = "ok" if len(res.ids) else "empty"
            results[name] = res
        except ChannelEmpty as exc:
            status, detail = "empty", str(exc)
        except Exception as exc:  # one failing channel never fails the request
            status, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        self._record(name, status, detail, t0, results, statuses)
        return True

    def _record(self, name: str, status: str, detail: str | None, t0: float, results: dict, statuses: dict) -> None:
        dt = time.perf_counter() - t0
        count = len(results[name].ids) if name in results else 0
        entry = {"status": status, "count": count, "latency_ms": round(dt * 1000.0, 3)}
        if detail:
            entry["detail"] = detail
        statuses[name] = entry
        lat, errors, timeouts, empty, cands = self.metrics.channel(name)
        lat.observe(dt)
        cands.observe(count)
        if status == "error":
            errors.inc()
        elif status == "timeout":
            timeouts.inc()
        elif status == "empty":
            empty.inc()

    async def health(self) -> tuple[int, dict]:
        snap = self.state.snapshot
        try:
            await self.astores("meta").ping()
            missing = await self.state.missing_in_redis()  # published versions Redis lost (docs/reliability.md)
        except Exception as exc:
            return 503, {"status": "unavailable", "detail": f"Redis unavailable: {type(exc).__name__}: {exc}"}
        channels = {name: ("ok" if not v.unavailable else v.unavailable) for name, v in snap.views.items()}
        warming = [name for name, task in (("lists", self._warm_task), ("neighbours", self.state.warm_task))
                   if task is not None and not task.done()]
        if self.settings.vector_mode == "embedded" and self.vector_client is not None:
            warming += [f"vector_results:{n}" for n in self.vector_client.service.precomputing()]
        body = {"status": "ok", "redis": "ok", "pid": os.getpid(), "vector_mode": self.settings.vector_mode,
                "versions": snap.versions,
                "channels": channels, "warming": warming,  # background cache fills of this worker still running
                "list_cache": {"mb": round(self.list_cache.size / 2**20, 1), "lists": dict(self.list_cache.counts)}}
        if self.settings.vector_mode == "embedded" and self.vector_client is not None:
            svc = self.vector_client.service  # indexes loaded in this worker (what `make up` waits for)
            body["vector"] = {"loaded": {n: b.version for n, b in svc.bundles.items()},
                              "not_loaded": {n: svc.load_error.get(n) or "loading" for n in svc.specs
                                             if n not in svc.bundles}}
        if missing:  # answers keep coming from the versions held in memory, until they are republished
            body.update(status="degraded", missing=missing,
                        detail=f"Redis has no published version of {', '.join(missing)}: serving the versions held "
                               f"in memory until they are republished")
            return 503, body
        return 200, body


def popularity_order(snap: Snapshot) -> np.ndarray:
    """Item indices, most popular first: the first published list channel's global list, then the rest by id."""
    for view in snap.views.values():
        if view.lists:  # a list channel's lists (held in the snapshot)
            ids = next(iter(view.lists.values()))[0] if "global" not in view.lists else view.lists["global"][0]
            ids = ids[(ids >= 0) & (ids < len(snap.item_ids))]
            rest = np.setdiff1d(np.arange(len(snap.item_ids)), ids, assume_unique=True)
            return np.concatenate([ids, rest]).astype(np.int64)
    return np.arange(len(snap.item_ids), dtype=np.int64)


def _json(status: int, body: dict) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def create_app(settings: Settings | None = None, config: ChannelConfig | None = None) -> FastAPI:
    """The FastAPI app (also the uvicorn factory: `services.recall_server.app:create_app`)."""
    settings = settings or get_settings()
    config = config or load_config(settings.channels_config)
    metrics = RecallMetrics()
    outcome = metrics.outcome
    service = RecallService(settings, config, metrics)
    known = list(service.enabled)
    default_k, max_k = config.default_k, settings.max_k

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again: shorter GC pauses on the request path
        yield
        await service.stop()

    app = FastAPI(title="multirecall recall server", version="0.1.0", lifespan=lifespan,
                  description="Multi-channel candidate generation: GET /recall fans out to every enabled channel "
                              "of config/channels.yaml concurrently and merges their candidates.")
    app.state.service = service
    http_guard.install(app)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:  # must be unreachable by any input
        log.exception("internal error on %s", request.url.path)
        outcome["error"].inc()
        return _json(500, {"detail": f"internal error: {type(exc).__name__}"})

    recall_params = [  # documented for /docs; read straight from the query string (FastAPI's per-parameter
        # validation costs ≈45 µs a request here, and parse_params checks everything itself)
        {"name": "user_id", "in": "query", "required": True, "schema": id_schema("external user id")},
        {"name": "k", "in": "query", "description": f"number of candidates, 1..{max_k} (default {default_k})",
         "schema": {"type": "integer", "minimum": 1, "maximum": max_k, "default": default_k}},
        {"name": "channels", "in": "query", "description": f"comma-separated subset of channels; enabled: "
                                                            f"{', '.join(known)}",
         "schema": {"type": "string", "minLength": 1, **({"pattern": p} if (p := names_pattern(known)) else {})}},
        {"name": "exclude", "in": "query", "schema": {"type": "string", "pattern": ID_LIST_PATTERN},
         "description": f"comma-separated item ids never to return (at most {MAX_EXCLUDE}; more with POST /recall)"},
        {"name": "explain", "in": "query", "schema": {"type": "boolean", "default": False},
         "description": "true: each item lists the channels that produced it with its rank there"},
    ]
    recall_errors = {422: invalid("a bad (or repeated) parameter, named in detail[0].loc"),
                     503: error("Redis unavailable")}

    @app.get("/recall", response_model=RecallAnswer, summary="Ranked candidates for one user",
             openapi_extra={"parameters": recall_params}, responses=recall_errors)
    async def recall(request: Request) -> Response:
        status, body = await answer(request.scope["query_string"])
        return Response(body, status_code=status, media_type="application/json")

    async def answer(query_string: bytes) -> tuple[int, bytes]:
        """GET /recall as (status, JSON body), every outcome included: it never raises."""
        return await respond(partial(parse_query, query_string, default_k=default_k, max_k=max_k, known=known),
                             "query")

    async def respond(parse, where: str) -> tuple[int, bytes]:
        """/recall (GET or POST) as (status, JSON body); `parse()` gives the RecallParams; never raises."""
        t0 = time.perf_counter()
        try:
            p = parse()
            body = await service.recall(p)
        except ParamError as exc:
            outcome["client_error"].inc()
            loc = [where] if exc.param == "body" else [where, exc.param]
            return 422, orjson.dumps({"detail": [{"loc": loc, "msg": exc.msg, "type": "value_error"}]})
        except RedisUnavailable as exc:
            outcome["unavailable"].inc()
            return 503, orjson.dumps({"detail": str(exc)})
        except Exception as exc:  # must be unreachable by any input
            log.exception("internal error on /recall")
            outcome["error"].inc()
            return 500, orjson.dumps({"detail": f"internal error: {type(exc).__name__}"})
        outcome["cold_start" if body["cold_start"] else "ok"].inc()
        metrics.request_latency.observe(time.perf_counter() - t0)
        return 200, orjson.dumps(body)

    app.state.recall_answer = answer

    @app.post("/recall", response_model=RecallAnswer, summary="Ranked candidates for one user (JSON body)",
              description="The same answer as GET /recall, for requests too long for a URL (e.g. 10,000 excluded "
                          "ids): a JSON object with the GET parameters as fields.",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["user_id"], "additionalProperties": False, "properties": {
                      "user_id": id_schema("external user id"),
                      "k": {"type": "integer", "minimum": 1, "maximum": max_k, "default": default_k},
                      "channels": {"type": "array", "items": {"type": "string", "enum": known}, "maxItems": 100,
                                   "description": "a subset of the enabled channels (empty or absent: all)"},
                      "exclude": {"type": "array", "items": id_schema("item id"), "maxItems": MAX_EXCLUDE},
                      "explain": {"type": "boolean", "default": False}}}}}}},
              responses={422: invalid("a bad field, named in detail[0].loc"), 503: error("Redis unavailable")})
    async def recall_post(request: Request) -> Response:
        raw = await request.body()
        status, body = await respond(partial(parse_body, raw, default_k=default_k, max_k=max_k, known=known), "body")
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/healthz", response_model=RecallHealth,
             summary="200 when Redis answers (with the served versions), 503 naming Redis otherwise",
             responses={503: {"model": RecallHealth, "description": "Redis unavailable, or it lost published versions "
                                                                      "(`degraded`: answers come from memory)"}})
    async def healthz() -> Response:
        status, body = await service.health()
        return _json(status, body)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics", responses=METRICS)
    async def prometheus_metrics() -> Response:
        metrics.flush()
        payload, content_type = metrics_payload(metrics.registry)
        return Response(payload, media_type=content_type)

    from services.recall_server.inspector import mount_inspector  # (imports this module)

    mount_inspector(app, service, default_k, max_k)  # the inspector's pages under /ui/ (docs/inspector.md)
    openapi.document(app, settings)  # the request policy's answers too (services/openapi.py)
    return app


def uvicorn_factory() -> http_guard.HttpGuard:
    """Entry point for multi-worker uvicorn (settings from the environment)."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)  # GET /recall past FastAPI's routing (common/fast_path.py), all behind the guard
    return http_guard.HttpGuard(FastPath(app, "GET", "/recall", app.state.recall_answer), settings)

