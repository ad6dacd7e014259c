"""The vector server: faiss top-k per u2i channel, user vectors computed at request time by the channel's tower.

Endpoints: POST /search, GET /healthz, GET /metrics. This module is the HTTP layer (request parsing, FastAPI);
the search itself is services/vector_server/core.py. See docs/vector_server.md.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.fast_path import FastPath
from common.id_rule import MAX_EXCLUDE, MAX_RECENT, IdError, check_id, check_ids
from common.settings import Settings, get_settings
from services import http_guard, openapi
from services.openapi import METRICS, error, id_schema, invalid
from services.vector_server.core import (
    HTTPError,
    SearchRequest,
    UserSearchRequest,
    VectorService,
    configure_threads,
)
from services.vector_server.schemas import SearchAnswer, UserSearchAnswer, VectorHealth

log = logging.getLogger("vector_server")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


ID_LIST_LIMITS = {"exclude": MAX_EXCLUDE, "recent": MAX_RECENT}
MAX_CHANNELS, MAX_ATTRS = 100, 256  # entries of /search/user's `channels` and `attrs` objects
VECTOR_BOUND = 1e15  # the documented bound on a query vector's components (much larger ones overflow float32 scores)


def _id_list(body: dict, name: str) -> list[str] | None:
    v = body.get(name)
    if v is None:
        return None
    try:
        return check_ids(v, ID_LIST_LIMITS[name])  # the one id rule (common/id_rule.py), and the list's bound
    except IdError as exc:
        raise HTTPError(422, f"field '{name}': {exc} (a list of item ids)") from None


def _user_id(body: dict, required: bool) -> str | None:
    v = body.get("user_id")
    if v is None and not required:
        return None
    try:
        return check_id(v)
    except IdError as exc:
        raise HTTPError(422, f"field 'user_id' {exc}") from None


def _json_object(raw: bytes, required: str, allowed: list[str]) -> dict:
    """The body as a JSON object with only `allowed` fields (422 naming the problem otherwise)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(422, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(422, f"body must be a JSON object with {required}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HTTPError(422, f"unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
    return body


def parse_search(raw: bytes, max_k: int) -> SearchRequest:
    """Validate a /search body; every failure names the field."""
    body = _json_object(raw, "'channel', 'k' and one of 'vector' / 'user_id'",
                        ["channel", "k", "vector", "user_id", "exclude", "recent", "exclude_seen"])
    channel = body.get("channel")
    if not isinstance(channel, str) or not channel:
        raise HTTPError(422, "field 'channel' is required and must be a non-empty string")
    k = body.get("k")
    if isinstance(k, float) and k.is_integer() and abs(k) < 1e15:  # JSON's 50.0 is the integer 50 (OpenAPI too)
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise HTTPError(422, f"field 'k' must be an integer between 1 and {max_k}, got {k!r}")
    vector = body.get("vector")
    if (vector is None) == (body.get("user_id") is None):
        raise HTTPError(422, "exactly one of 'vector' or 'user_id' must be given")
    user_id = _user_id(body, required=False)
    if vector is not None and not isinstance(vector, list):
        raise HTTPError(422, "field 'vector' must be a list of numbers")
    exclude_seen = body.get("exclude_seen", False)
    if not isinstance(exclude_seen, bool):
        raise HTTPError(422, "field 'exclude_seen' must be a boolean")
    recent = _id_list(body, "recent")
    if recent is not None and vector is not None:
        raise HTTPError(422, "field 'recent' only applies to a 'user_id' search")
    return SearchRequest(channel, k, vector, user_id, _id_list(body, "exclude") or [], recent, exclude_seen)


def parse_user_search(raw: bytes, max_k: int) -> UserSearchRequest:
    """Validate a /search/user body; every failure names the field."""
    body = _json_object(raw, "'user_id' and 'channels'",
                        ["user_id", "channels", "exclude", "recent", "attrs", "exclude_seen", "item_ids"])
    user_id = _user_id(body, required=True)
    channels = body.get("channels")
    if not isinstance(channels, dict) or not channels or len(channels) > MAX_CHANNELS:
        raise HTTPError(422, f"field 'channels' must be a non-empty object {{channel: k}} of at most {MAX_CHANNELS}")
    for name, k in channels.items():
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
            if isinstance(k, float) and k.is_integer() and 1 <= k <= max_k:  # JSON's 50.0 is the integer 50
                channels[name] = int(k)
                continue
            raise HTTPError(422, f"field 'channels': k of {name!r} must be an integer between 1 and {max_k}, got {k!r}")
    attrs = body.get("attrs")
    if attrs is not None and (not isinstance(attrs, dict) or len(attrs) > MAX_ATTRS):
        raise HTTPError(422, f"field 'attrs' must be an object {{attribute: value}} of at most {MAX_ATTRS}")
    flags = {}
    for flag in ("exclude_seen", "item_ids"):
        flags[flag] = body.get(flag, flag == "item_ids")
        if not isinstance(flags[flag], bool):
            raise HTTPError(422, f"field '{flag}' must be a boolean")
    return UserSearchRequest(user_id, channels, _id_list(body, "exclude") or [], _id_list(body, "recent"), attrs,
                             flags["exclude_seen"], flags["item_ids"])


def create_app(settings: Settings | None = None, poll_s: float | None = None) -> FastAPI:
    """The FastAPI app; channels come from `settings.channels_config` (enabled u2i entries)."""
    settings = settings or get_settings()
    configure_threads(settings.omp_threads)
    svc = VectorService(settings, poll_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again; keeps GC pauses out of p99
        yield
        await svc.stop()

    app = FastAPI(title="vector_server", version="1", lifespan=lifespan,
                  description="faiss top-k over u2i channels; user vectors from the channel's user tower.")
    app.state.service = svc
    metrics = svc.metrics
    http_guard.install(app)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> Response:
        return json_response({"detail": exc.detail}, exc.status)

    channel_names = sorted({*svc.known, *svc.alias})  # u2i channels (and the publishers they are named by)
    id_list = {name: {"type": ["array", "null"], "items": id_schema("item id"), "maxItems": n}
               for name, n in ID_LIST_LIMITS.items()}
    search_schema = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["channel", "k"], "additionalProperties": False,
            "description": "exactly one of `vector` (then no `recent`) or `user_id`",
            "oneOf": [{"required": ["vector"], "not": {"anyOf": [{"required": ["user_id"]}, {"required": ["recent"]}]}},
                      {"required": ["user_id"], "not": {"required": ["vector"]}}],
            "properties": {
                "channel": {"type": "string", "enum": channel_names},
                "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k},
                "vector": {"type": "array", "items": {"type": "number", "minimum": -VECTOR_BOUND,
                                                       "maximum": VECTOR_BOUND}, "minItems": 1,
                           "description": "a query vector of the channel's dimension (`dim` in GET /healthz)"},
                "user_id": id_schema("external user id"),
                "exclude": id_list["exclude"], "recent": id_list["recent"], "exclude_seen": {"type": "boolean"}}}}}}}
    search_errors = {404: error("no vector for this user in this channel"),
                     422: invalid("a bad field (named), an unknown channel, or a vector of the wrong dimension"),
                     503: error("the channel is not loaded (yet), or Redis is unavailable")}

    @app.post("/search", response_model=SearchAnswer, openapi_extra=search_schema, responses=search_errors)
    async def search(request: Request) -> Response:
        """Top-k items of a channel for a vector or a user (exactly one)."""
        status, body = await answer_search(await request.body())
        return Response(body, status_code=status, media_type="application/json")

    async def answer_search(raw: bytes) -> tuple[int, bytes]:
        """POST /search as (status, JSON body), every outcome included: it never raises."""
        t0 = time.perf_counter()
        channel = "?"
        try:
            req = parse_search(raw, settings.max_k)
            channel = req.channel if req.channel in svc.specs else svc.alias.get(req.channel, "_unknown")
            out, source = await svc.search(req)
        except HTTPError as exc:
            metrics.errors.labels(channel, str(exc.status)).inc()
            return exc.status, orjson.dumps({"detail": exc.detail})
        except Exception as exc:  # a bug, not the client's fault: say so without a bare 500 page
            log.exception("search failed")
            metrics.errors.labels(channel, "500").inc()
            return 500, orjson.dumps({"detail": f"internal error: {type(exc).__name__}: {exc}"})
        body = orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
        metrics.search_seconds.labels(channel, source).observe(time.perf_counter() - t0)
        return 200, body

    app.state.answer_search = answer_search

    user_search_schema = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["user_id", "channels"], "additionalProperties": False,
            "properties": {
                "user_id": id_schema("external user id"),
                "channels": {"type": "object", "minProperties": 1, "maxProperties": MAX_CHANNELS,
                             "propertyNames": {"enum": channel_names}, "description": "channel → k",
                             "additionalProperties": {"type": "integer", "minimum": 1, "maximum": settings.max_k}},
                "exclude": id_list["exclude"], "recent": id_list["recent"],
                "attrs": {"type": ["object", "null"], "maxProperties": MAX_ATTRS}, "exclude_seen": {"type": "boolean"},
                "item_ids": {"type": "boolean", "default": True}}}}}}}

    @app.post("/search/user", response_model=UserSearchAnswer, openapi_extra=user_search_schema,
              responses={422: invalid("a bad field (named) or an unknown channel"),
                         503: error("Redis unavailable while reading the user")})
    async def search_user(request: Request) -> Response:
        """Top-k of several channels for one user in one call (what the recall server uses); per-channel
        failures are reported inside `results` with their status, the request itself answers 200."""
        status, body = await answer_user(await request.body())
        return Response(body, status_code=status, media_type="application/json")

    async def answer_user(raw: bytes) -> tuple[int, bytes]:
        """POST /search/user as (status, JSON body), every outcome included: it never raises."""
        t0 = time.perf_counter()
        try:
            req = parse_user_search(raw, settings.max_k)
            results = await svc.user_searches(req)
        except HTTPError as exc:
            metrics.errors.labels("_multi", str(exc.status)).inc()
            return exc.status, orjson.dumps({"detail": exc.detail})
        except Exception as exc:
            log.exception("search/user failed")
            metrics.errors.labels("_multi", "500").inc()
            return 500, orjson.dumps({"detail": f"internal error: {type(exc).__name__}: {exc}"})
        body = orjson.dumps({"user_id": req.user_id, "results": results}, option=orjson.OPT_SERIALIZE_NUMPY)
        dt = time.perf_counter() - t0
        for name, res in results.items():
            if res["status"] == 200:
                metrics.search_seconds.labels(svc.alias.get(name, name), res["source"]).observe(dt)
            else:
                metrics.errors.labels(svc.alias.get(name, name), str(res["status"])).inc()
        return 200, body

    app.state.answer_user = answer_user

    @app.get("/healthz", response_model=VectorHealth,
             responses={503: {"model": VectorHealth, "description": "Redis unavailable, or it lost published versions"}})
    async def healthz() -> Response:
        """200 while Redis answers (channels may still be loading: see `not_loaded`); 503 naming Redis otherwise."""
        status, body = await svc.health()
        return json_response(body, status)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics", responses=METRICS)
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def dimensions(schema: dict) -> None:
        """POST /search's `vector` has the dimension of the channel's loaded index: one branch per dimension."""
        body = schema["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        by_dim: dict[int, list[str]] = {}
        for name in channel_names:
            b = svc.bundles.get(svc.alias.get(name, name))
            if b is not None:
                by_dim.setdefault(int(b.dim), []).append(name)
        if by_dim:
            by_vector, by_user = body["oneOf"]
            body["oneOf"] = [{**by_vector, "properties": {"channel": {"enum": names},
                                                          "vector": {"minItems": d, "maxItems": d}}}
                             for d, names in sorted(by_dim.items())] + [by_user]

    openapi.document(app, settings, extra=dimensions)  # the request policy's answers too (services/openapi.py)
    base_openapi, described = app.openapi, {"dims": None}

    def openapi_now() -> dict:
        """The document, made again when the loaded channels' dimensions change (a new version)."""
        dims = sorted((n, int(b.dim)) for n, b in svc.bundles.items())
        if dims != described["dims"]:
            app.openapi_schema, described["dims"] = None, dims
        return base_openapi()

    app.openapi = openapi_now  # type: ignore[method-assign]
    return app


def app_from_env() -> http_guard.HttpGuard:
    """uvicorn factory (`--workers N` imports the app by name in each worker)."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)  # POST /search/user and /search past FastAPI's routing (common/fast_path.py), all
    fast = FastPath(app, "POST", "/search/user", app.state.answer_user)  # behind the guard
    return http_guard.HttpGuard(FastPath(fast, "POST", "/search", app.state.answer_search), settings)
