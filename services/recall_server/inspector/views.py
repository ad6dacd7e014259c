"""The JSON behind the inspector's three pages (overview, user, item) and its click button, read from the running
recall server: its serving snapshot, its metrics, a traced /recall, Redis, the feature and vector servers' health,
and the nightly's and the evaluator's files (reports.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import redis.exceptions

from common.features import fetch_item_records
from common.id_rule import IdError, check_id
from common.keyspace import FEATURES_CHANNEL, unpack_json, unpack_neighbors
from services.recall_server.app import ParamError, RecallService, RedisUnavailable, parse_params
from services.recall_server.inspector.reports import (
    dir_size,
    latest_evaluation,
    latest_evaluation_dir,
    latest_nightly,
)
from services.recall_server.metrics import channel_stats
from services.recall_server.state import ChannelView

REDIS_ERRORS = (redis.exceptions.RedisError, OSError)
HEALTH_TIMEOUT_S = 1.0
# How a channel that learns item vectors from side information gives one to an item without behaviour
# (trainer/channels/eges.py, trainer/channels/airbnb.py; docs/channels.md)
COLD_START_SOURCES = {
    "eges": "the mean of its side-information embeddings ({fields}), learned from other items' walks",
    "airbnb": "the mean of the vectors of its {cold_k} nearest trained items by side information ({fields})",
}


class InspectorError(Exception):
    """An answer other than 200 (→ JSON {"detail": ...} with `status`)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _param_error(exc: ParamError) -> InspectorError:
    return InspectorError(422, exc.msg)


def _one_id(name: str, value: object) -> str:
    """An id by the services' one id rule (common/id_rule.py), else a 422 naming it."""
    try:
        return check_id(value)
    except IdError as exc:
        raise InspectorError(422, f"{name} {exc}") from None


def _ext_ids(snap, ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """External ids of internal indices (those the snapshot's id map can name) and the mask of those kept."""
    keep = (ids >= 0) & (ids < len(snap.item_ids))
    return snap.item_ids[ids[keep]].tolist(), keep


def _short(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a list of items shows of each: category, popularity, attributes."""
    if rec is None:
        return None
    return {"category": rec.get("category"), "clicks": rec.get("clicks"), "attrs": rec.get("attrs") or {},
            "registered": bool(rec.get("registered"))}


class Inspector:
    """Builds the pages' JSON from a running `RecallService`."""

    def __init__(self, service: RecallService, default_k: int, max_k: int):
        self.service, self.default_k, self.max_k = service, default_k, max_k
        self.settings = service.settings

    # -- shared reads ---------------------------------------------------------------------------
    async def _items(self, item_ids: list[str], fver: str | None) -> dict[str, dict[str, Any] | None]:
        ids = list(dict.fromkeys(item_ids))
        try:
            records = await fetch_item_records(self.service.astores, ids, fver)
        except REDIS_ERRORS as exc:
            raise InspectorError(503, f"Redis unavailable: {type(exc).__name__}: {exc}") from None
        return {i: _short(r) for i, r in zip(ids, records, strict=True)}

    async def feature_health(self) -> dict[str, Any]:
        url = self.settings.feature_url.rstrip("/")
        try:
            async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
                r = await client.get(f"{url}/healthz")
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            ok = r.status_code == 200
            return {"url": url, "status": "ok" if ok else f"unhealthy: HTTP {r.status_code}: {body.get('redis')}",
                    "features_version": body.get("features_version")}
        except (httpx.HTTPError, ValueError) as exc:
            return {"url": url, "status": f"unreachable: {type(exc).__name__}: {exc}"}

    async def vector_health(self) -> dict[str, Any]:
        """The vector server's /healthz (remote mode) or the embedded search's own health, with a status line."""
        client, mode = self.service.vector_client, self.settings.vector_mode
        if client is None:
            return {"mode": mode, "status": "not used (no u2i channel enabled)", "channels": {}, "not_loaded": {}}
        base = {"mode": mode, "url": self.settings.vector_url if mode == "remote" else None}
        try:
            if mode == "embedded":
                code, body = await client.service.health()
            else:
                code, body = 200, await client.healthz(timeout_s=HEALTH_TIMEOUT_S)
        except Exception as exc:  # unreachable, timed out, 503: the page says which
            return {**base, "status": f"unreachable: {exc}", "channels": {}, "not_loaded": {}}
        status = "ok" if code == 200 else f"unhealthy: {body.get('detail')}"
        return {**base, "status": status, "channels": body.get("channels", {}), "not_loaded": body.get("not_loaded", {})}

    # -- overview -------------------------------------------------------------------------------
    async def overview(self) -> dict[str, Any]:
        svc = self.service
        snap = svc.state.snapshot
        try:
            await svc.astores("meta").ping()
            redis_status = "ok"
        except Exception as exc:
            redis_status = f"unavailable: {type(exc).__name__}: {exc}"
        feature, vector = await asyncio.gather(self.feature_health(), self.vector_health())
        svc.metrics.flush()
        stats = channel_stats(svc.metrics.registry)
        nightly = await asyncio.to_thread(latest_nightly, self.settings.artifacts_dir)
        evaluation = await asyncio.to_thread(latest_evaluation, self.settings.eval_dir)
        stages = {s.get("stage"): s for s in (nightly or {}).get("stages") or []}
        channels = []
        for spec in svc.state.enabled:
            view = snap.views[spec.name]
            m = view.manifest or {}
            pub = spec.publisher
            channels.append({
                "name": spec.name, "kind": spec.kind, "model": m.get("model") or spec.model, "publisher": pub,
                "weight": spec.weight, "quota": spec.quota, "timeout_ms": spec.timeout_ms,
                "version": view.version, "published_at": m.get("published_at"), "counts": m.get("counts") or {},
                "stores": m.get("stores") or {}, "fit_s": m.get("fit_s"), "run_id": m.get("run_id"),
                "artifacts": await asyncio.to_thread(dir_size, m.get("artifacts_dir")),
                "status": self._serving_status(view, vector),
                "nightly": {"fit": stages.get(f"fit:{pub}"), "publish": stages.get(f"publish:{pub}"),
                            "channel": ((nightly or {}).get("channels") or {}).get(pub)},
                "serving": stats.get(spec.name)})
        return {"versions": snap.versions, "redis": redis_status, "feature_server": feature, "vector_server": vector,
                "vector_mode": self.settings.vector_mode, "channels": channels, "nightly": nightly,
                "evaluation": evaluation,
                "evaluation_plot": "/ui/api/evaluation/recall_at_k.png" if evaluation and evaluation["has_plot"] else None,
                "features": {"version": snap.features_version,
                             "published_at": await self._published_at(FEATURES_CHANNEL, snap.features_version)},
                "items_in_id_map": len(snap.item_ids), "users_in_id_map": len(snap.user_ids)}

    async def _published_at(self, channel: str, version: str | None) -> float | None:
        if not version:
            return None
        try:
            m = unpack_json(await self.service.astores.reads("meta").get(self.service.ks.manifest(channel, version)))
        except REDIS_ERRORS:
            return None
        return (m or {}).get("published_at")

    def _serving_status(self, view: ChannelView, vector: dict[str, Any]) -> str:
        if view.unavailable:
            return f"unavailable: {view.unavailable}"
        if self.service.retrievers[view.spec.kind].shared_call:  # answered by the vector server (or its embedded twin)
            if vector["status"] != "ok":
                return f"degraded: vector server {vector['status']}"
            if view.spec.publisher in vector["not_loaded"]:
                return f"degraded: not loaded by the vector server: {vector['not_loaded'][view.spec.publisher]}"
        return "ok"

    def evaluation_plot(self) -> Path | None:
        out = latest_evaluation_dir(self.settings.eval_dir)
        plot = out / "recall_at_k.png" if out else None
        return plot if plot is not None and plot.is_file() else None

    # -- user -----------------------------------------------------------------------------------
    async def user(self, user_id: str | None, k: str | None) -> dict[str, Any]:
        svc = self.service
        try:
            p = parse_params(user_id, k, None, None, "true", default_k=self.default_k, max_k=self.max_k,
                             known=svc.enabled)
        except ParamError as exc:
            raise _param_error(exc) from None
        trace: dict[str, Any] = {}
        try:
            answer = await svc.recall(p, trace)
            (rt_raw,) = await svc.astores.reads("user_features").execute(
                [("LRANGE", svc.ks.realtime_recent(p.user_id), 0, self.settings.recent_n - 1)])
        except RedisUnavailable as exc:
            raise InspectorError(503, str(exc)) from None
        except REDIS_ERRORS as exc:
            raise InspectorError(503, f"Redis unavailable: {type(exc).__name__}: {exc}") from None
        snap, user, results = trace["snapshot"], trace["user"], trace["results"]
        realtime = {(str(e[0]), int(e[1])) for e in map(orjson.loads, rt_raw)}
        columns = []
        for name, st in answer["channels"].items():
            spec = snap.views[name].spec
            res = results.get(name)
            items: list[dict[str, Any]] = []
            if res is not None:
                ids, keep = _ext_ids(snap, np.asarray(res.ids, dtype=np.int64))
                scores = np.round(np.asarray(res.scores, dtype=np.float64)[keep], 6).tolist()
                items = [{"item_id": i, "score": s} for i, s in zip(ids, scores, strict=True)]
            columns.append({"channel": name, "kind": spec.kind, "weight": spec.weight, "quota": spec.quota,
                            "version": answer["versions"].get(name), **st, "items": items})
        sets = [{it["item_id"] for it in c["items"]} for c in columns]
        overlap = {"channels": [c["channel"] for c in columns],
                   "matrix": [[len(a & b) for b in sets] for a in sets]}
        recent = [{"item_id": i, "ts": ts, "realtime": (i, ts) in realtime} for i, ts in user.recent]
        shown = [r["item_id"] for r in recent] + [it["item_id"] for it in answer["items"]]
        shown += [it["item_id"] for c in columns for it in c["items"]]
        features = {key: v for key, v in user.features.items() if key != "recent"}
        message = None
        if not user.known:
            message = (f"unknown user {p.user_id!r}: no features in version {snap.features_version} and no "
                       "real-time events; below is the cold-start answer every unknown user gets")
        return {"user_id": p.user_id, "k": p.k, "known": user.known, "message": message, "features": features,
                "recent": recent, "recall": answer, "columns": columns, "overlap": overlap,
                "degraded": {c["channel"]: c.get("detail") or c["status"] for c in columns
                             if c["status"] not in ("ok", "empty")},
                "items": await self._items(shown, snap.features_version)}

    async def post_click(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """Forward one click {"user_id", "item_id"} to the feature server's POST /events with the caller's own
        credentials (`headers`: its API key, if any, so the feature server's key rules apply unchanged); the feature
        server's answer, or 502."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InspectorError(422, f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise InspectorError(422, 'body must be {"user_id": ..., "item_id": ...}')
        event = {}
        for name in ("user_id", "item_id"):
            if payload.get(name) is None:
                raise InspectorError(422, f"{name} is required")
            event[name] = _one_id(name, payload[name])
        url = f"{self.settings.feature_url.rstrip('/')}/events"
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                r = await client.post(url, json=[event], headers=headers or {})
        except httpx.HTTPError as exc:
            raise InspectorError(502, f"feature server at {url} unreachable: {type(exc).__name__}: {exc}") from None
        try:
            answer = r.json()
        except ValueError:
            answer = {"detail": r.text[:300]}
        return r.status_code, {"feature_server": url, "event": event, **answer}

    # -- item -----------------------------------------------------------------------------------
    async def item(self, item_id: str) -> dict[str, Any]:
        svc = self.service
        item_id = _one_id("item_id", item_id)
        snap = svc.state.snapshot
        idx = snap.item_index.get(item_id)
        rec = (await self._full_records([item_id], snap.features_version))[0]
        if idx is None and rec is None:
            raise InspectorError(404, f"unknown item {item_id!r}: not in the item id map, no features in version "
                                      f"{snap.features_version}, no click events and not registered")
        rec = rec or {"item_id": item_id, "clicks": 0, "realtime_clicks": 0, "attrs": {}}
        batch_clicks = int(rec.get("clicks") or 0) - int(rec.get("realtime_clicks") or 0)
        cold = batch_clicks <= 0
        columns = []
        for view in snap.views.values():
            if view.spec.kind == "i2i":
                columns.append(await self._neighbours(snap, view, idx, rec, cold, batch_clicks))
        shown = [n["item_id"] for c in columns for n in c["items"]]
        notes = []
        if idx is None:
            notes.append("not in the item id map yet: items registered through POST /items get an index, features "
                         "and cold-start vectors at the next nightly run")
        if rec.get("registered"):
            notes.append("registered through the feature server's POST /items")
        if cold:
            notes.append("cold start: no behaviour in the published features (no clicks before the last build)")
        return {"item_id": item_id, "index": idx, "features": rec, "cold_start": cold, "notes": notes,
                "popularity": {"clicks": rec.get("clicks"), "realtime_clicks": rec.get("realtime_clicks"),
                               "batch_clicks": batch_clicks, **self._popular_rank(snap, idx)},
                "neighbours": columns, "items": await self._items(shown, snap.features_version)}

    async def _full_records(self, ids: list[str], fver: str | None) -> list[dict[str, Any] | None]:
        try:
            return await fetch_item_records(self.service.astores, ids, fver)
        except REDIS_ERRORS as exc:
            raise InspectorError(503, f"Redis unavailable: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _popular_rank(snap, idx: int | None) -> dict[str, Any]:
        """The item's rank in the first list channel's global list (1-based; None when absent)."""
        for name, view in snap.views.items():
            if view.lists and "global" in view.lists:
                ids = view.lists["global"][0]
                pos = np.flatnonzero(ids == idx) if idx is not None else []
                return {"popular_channel": name, "popular_rank": int(pos[0]) + 1 if len(pos) else None,
                        "popular_list_length": int(len(ids))}
        return {}

    async def _neighbours(self, snap, view: ChannelView, idx: int | None, rec: dict[str, Any], cold: bool,
                          batch_clicks: int) -> dict[str, Any]:
        spec, m = view.spec, view.manifest or {}
        model = m.get("model") or spec.model
        col: dict[str, Any] = {"channel": spec.name, "model": model, "version": view.version, "items": []}
        if view.unavailable:
            return {**col, "status": "unavailable", "detail": view.unavailable}
        if idx is None:
            return {**col, "status": "empty", "detail": "the item has no index in the served id map yet"}
        retriever = self.service.retrievers[spec.kind]
        try:
            raw = await self.service.astores.reads(view.store).get(retriever.list_key(view, idx))
        except REDIS_ERRORS as exc:
            return {**col, "status": "error", "detail": f"Redis unavailable: {type(exc).__name__}: {exc}"}
        ids, scores = unpack_neighbors(raw)
        ext, keep = _ext_ids(snap, np.asarray(ids, dtype=np.int64))
        col["items"] = [{"item_id": i, "score": round(float(s), 6)}
                        for i, s in zip(ext, np.asarray(scores, dtype=np.float64)[keep], strict=True)]
        col["status"] = "ok" if col["items"] else "empty"
        col["vector_source"] = self._vector_source(model, m, rec, cold, batch_clicks, bool(col["items"]))
        if not col["items"]:
            col["detail"] = "no neighbour list for this item in this version"
        return col

    @staticmethod
    def _vector_source(model: str | None, manifest: dict[str, Any], rec: dict[str, Any], cold: bool,
                       batch_clicks: int, has_list: bool) -> str:
        """Where the item's representation in this channel came from, in words."""
        if not cold:
            return f"learned from behaviour: {batch_clicks} clicks in the published features"
        if not has_list:
            return f"none: {model} learns from behaviour only, and this item had none when the version was built"
        template = COLD_START_SOURCES.get(model or "")
        if template is None:
            return "no behaviour in the published features; the list comes from the version's training data"
        params = manifest.get("params") or {}
        attrs = rec.get("attrs") or {}
        side = (manifest.get("metrics") or {}).get("side_info") or params.get("side_info") or list(attrs)
        fields = ", ".join(f"{f}={attrs[f]}" for f in side if attrs.get(f) not in (None, "")) or "its attributes"
        return "cold start: " + template.format(fields=fields, cold_k=params.get("cold_k", 3))
