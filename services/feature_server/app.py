"""Feature server: merged user features (batch + real-time), item features, real-time click events.

Endpoints: GET /users/{id}, GET /items/{id}, POST /items (register new items with attributes), POST /events,
GET /healthz, GET /metrics (Prometheus), /docs.
Redis being unreachable is answered with 503 naming Redis; the clients reconnect by themselves.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
import redis.exceptions
from fastapi import FastAPI, Path, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from common.breaker import redis_breaker
from common.event_types import EVENT_ALIASES, EVENT_TYPES, normalize_event
from common.features import fetch_item_records, fetch_user_states
from common.id_rule import MAX_ID_LEN, IdError, check_id
from common.keyspace import FEATURES_CHANNEL, Keyspace, pack_json
from common.redis_conn import AsyncRedisStores
from common.redis_url import resolve_redis_url, safe_url
from common.settings import Settings, get_settings
from common.versions import VersionWatcher
from services import http_guard, openapi
from services.feature_server.cluster_events import write_events_cluster
from services.feature_server.event_log import EventLogWatch
from services.feature_server.registration import (
    REGISTRATIONS,
    ItemRegistration,
    registered_items_key,
    registration_mapping,
)
from services.feature_server.schemas import EventsAnswer, FeatureHealth, ItemRecord, ItemsAnswer, UserFeatures
from services.openapi import METRICS, error, id_schema, invalid

log = logging.getLogger(__name__)

BYTES_PER_EVENT = 1024  # body size allowance per event: the body limit is max_event_batch × this (+ slack)
MAX_SECONDS = 10**11  # larger "seconds" are almost certainly milliseconds

# One atomic script for a whole batch: the real-time state and the event log (docs/event_log.md) change together or
# not at all. KEYS: per event (recent list, counters hash, item clicks), then the event-log stream.
# ARGV: n, recent_n, item DB ('' = same DB as the user store), log bound, then per event: packed, ts, env, region,
# user id, item id, event type; the last ARGV is the real-time state's TTL (seconds: per-user/per-item keys expire
# after their last event, so under volatile-lru they are the keys Redis may evict, never published artifacts).
# A batch that would take the log past its bound writes nothing: {-1, length}.
# Idempotent retries: after the per-event ARGV come, per event, its event-id marker key ('' = no event id), then
# the markers' TTL; an event whose marker already exists is skipped whole, and the script returns the count written.
# SELECT inside a script only affects the script itself (Redis >= 2.8.12).
EVENTS_LUA = """
local n = tonumber(ARGV[1])
local recent_n = tonumber(ARGV[2])
local ttl = tonumber(ARGV[#ARGV])
local log_key = KEYS[3 * n + 1]
local log_len = redis.call('XLEN', log_key)
if log_len + n > tonumber(ARGV[4]) then return {-1, log_len} end
local base = 4 + 7 * n
local marker_ttl = tonumber(ARGV[base + n + 1])
local fresh, accepted = {}, 0
for i = 1, n do
  local mk = ARGV[base + i]
  fresh[i] = mk == '' or redis.call('SET', mk, '1', 'NX', 'EX', marker_ttl) ~= false
  if fresh[i] then accepted = accepted + 1 end
end
for i = 1, n do if fresh[i] then
  local rk, ck = KEYS[3 * i - 2], KEYS[3 * i - 1]
  local a = 4 + 7 * (i - 1)
  local ts = tonumber(ARGV[a + 2])
  redis.call('LPUSH', rk, ARGV[a + 1])
  redis.call('LTRIM', rk, 0, recent_n - 1)
  redis.call('HINCRBY', ck, 'clicks', 1)
  local last = redis.call('HGET', ck, 'last_ts')
  if (not last) or ts > tonumber(last) then redis.call('HSET', ck, 'last_ts', ARGV[a + 2]) end
  local first = redis.call('HGET', ck, 'first_ts')
  if (not first) or ts < tonumber(first) then redis.call('HSET', ck, 'first_ts', ARGV[a + 2]) end
  if ARGV[a + 3] ~= '' then redis.call('HINCRBY', ck, 'env:' .. ARGV[a + 3], 1) end
  if ARGV[a + 4] ~= '' then redis.call('HINCRBY', ck, 'region:' .. ARGV[a + 4], 1) end
  redis.call('EXPIRE', rk, ttl)
  redis.call('EXPIRE', ck, ttl)
  local entry = {'user_id', ARGV[a + 5], 'item_id', ARGV[a + 6], 'timestamp', ARGV[a + 2], 'event', ARGV[a + 7]}
  if ARGV[a + 3] ~= '' then entry[#entry + 1] = 'environment'; entry[#entry + 1] = ARGV[a + 3] end
  if ARGV[a + 4] ~= '' then entry[#entry + 1] = 'region'; entry[#entry + 1] = ARGV[a + 4] end
  redis.call('XADD', log_key, '*', unpack(entry))
end end
if ARGV[3] ~= '' then redis.call('SELECT', ARGV[3]) end
for i = 1, n do if fresh[i] then redis.call('INCR', KEYS[3 * i]); redis.call('EXPIRE', KEYS[3 * i], ttl) end end
return {accepted, log_len + accepted}
"""


class Event(BaseModel):
    """One event: who did what to which item (`event`: click by default, like, cart, purchase), when (integer
    seconds; default now), and optional context."""

    model_config = ConfigDict(extra="forbid")

    # json_schema_extra: what the validators below check, for the OpenAPI document (no extra validation)
    user_id: str = Field(json_schema_extra=id_schema("external user id"))
    item_id: str = Field(json_schema_extra=id_schema("external item id"))
    timestamp: int | None = Field(default=None, json_schema_extra={
        "minimum": 0, "exclusiveMaximum": MAX_SECONDS, "description": "seconds since the epoch (default: now)"})
    environment: str | None = Field(default=None, json_schema_extra={"maxLength": MAX_ID_LEN})
    region: str | None = Field(default=None, json_schema_extra={"maxLength": MAX_ID_LEN})
    event: str = Field(default="click", json_schema_extra={
        "enum": [*EVENT_TYPES, *EVENT_ALIASES], "description": "case and surrounding spaces are ignored"})
    # idempotency key: a retry with the same id within EVENT_ID_TTL_S is not counted
    event_id: str | None = Field(default=None, json_schema_extra={
        k: v for k, v in id_schema("idempotency key").items() if k != "type"})  # (or null)

    @field_validator("event", mode="before")
    @classmethod
    def _event(cls, v: Any) -> str:
        if v is not None and not isinstance(v, str):
            raise ValueError("must be a string or null")
        return normalize_event(v)

    @field_validator("user_id", "item_id", mode="before")
    @classmethod
    def _ids(cls, v: Any) -> str:
        return check_id(v)  # the one id rule (common/id_rule.py); its IdError is a ValueError

    @field_validator("event_id", mode="before")
    @classmethod
    def _event_id(cls, v: Any) -> str | None:
        return None if v is None else check_id(v)

    @field_validator("environment", "region", mode="before")
    @classmethod
    def _context(cls, v: Any) -> str | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise ValueError("must be a string, an integer or null")
        s = str(v).strip()
        if len(s) > MAX_ID_LEN:
            raise ValueError(f"must be at most {MAX_ID_LEN} characters")
        return s or None

    @field_validator("timestamp", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():  # JSON's 1700000000.0 is the integer 1700000000
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer number of seconds since the epoch")
        if v < 0:
            raise ValueError("must not be negative")
        if v >= MAX_SECONDS:
            raise ValueError("looks like milliseconds; send seconds since the epoch")
        return v


EVENTS = TypeAdapter(list[Event])


class EventsBody(BaseModel):
    """POST /events body: a list of events, or {"events": [...]} (documentation only; parsed by hand)."""

    model_config = ConfigDict(extra="forbid")

    events: list[Event]


class RequestError(Exception):
    """A client error answered with `status` and a message."""

    def __init__(self, status: int, detail: str, **extra: Any):
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(pack_json(obj), status_code=status, media_type="application/json", headers=headers)


def format_errors(exc: ValidationError, limit: int = 5, name: str = "events") -> list[str]:
    """'events[3].timestamp: message' (`name` = events | items) for the first `limit` errors."""
    out = []
    for err in exc.errors(include_url=False)[:limit]:
        loc = err["loc"]
        path = f"{name}[{loc[0]}]" if loc else name
        path += "".join(f".{p}" for p in loc[1:])
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{path}: {msg}")
    return out


class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("feature_server_request_seconds", "Request latency by endpoint",
                                 ["endpoint", "method", "status"], registry=self.registry,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.events_accepted = Counter("feature_server_events_accepted_total", "Click events written",
                                       registry=self.registry)
        self.events_rejected = Counter("feature_server_events_rejected_total", "Click events rejected (whole batches)",
                                       ["reason"], registry=self.registry)
        self.items_registered = Counter("feature_server_items_registered_total", "Items registered (POST /items)",
                                        registry=self.registry)
        self.redis_errors = Counter("feature_server_redis_errors_total", "Requests failed because of Redis",
                                    ["endpoint"], registry=self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware timing each request under its route template (not the raw path)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(endpoint, scope["method"], str(status)).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The feature server app; Redis clients and the version watcher live in its lifespan."""
    settings = settings or get_settings()
    redis_url = resolve_redis_url(settings)
    ks = Keyspace.from_settings(settings)
    metrics = Metrics()
    log_watch = EventLogWatch(metrics.registry, settings)
    max_body = settings.max_event_batch * BYTES_PER_EVENT + 4096
    item_db = ks.db("item_features")
    item_db_arg = "" if item_db == ks.db("user_features") else str(item_db)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        astores = AsyncRedisStores(redis_url, ks, timeout_s=settings.redis_timeout_s, breaker=redis_breaker(settings))
        watcher = VersionWatcher(astores, [FEATURES_CHANNEL], interval_s=1.0)
        await watcher.start()
        app.state.astores, app.state.watcher = astores, watcher
        app.state.events_script = astores("user_features").register_script(EVENTS_LUA)
        gc.collect()
        gc.freeze()  # start-up objects never need collecting; keeps GC pauses short
        try:
            yield
        finally:
            await watcher.stop()
            await astores.close()

    app = FastAPI(title="Feature server", version="1", lifespan=lifespan,
                  description="User features (batch + real-time events), item features, click events.")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics, app.state.settings = metrics, settings
    http_guard.install(app)

    def valid_id(name: str, value: str) -> str:
        try:
            return check_id(value)
        except IdError as exc:
            raise RequestError(422, f"{name} {exc}") from None

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        return _json({"detail": exc.detail, **exc.extra}, exc.status)

    async def _redis_down(request: Request, exc: Exception) -> Response:
        route = request.scope.get("route")
        metrics.redis_errors.labels(getattr(route, "path", "unmatched")).inc()
        log.warning("Redis error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return _json({"detail": f"Redis unavailable at {safe_url(redis_url)}: {type(exc).__name__}: {exc}"}, 503)

    for exc_type in (redis.exceptions.RedisError, ConnectionError, TimeoutError):
        app.add_exception_handler(exc_type, _redis_down)

    async def features_version(request: Request) -> str | None:
        watcher: VersionWatcher = request.app.state.watcher
        if watcher.versions.get(FEATURES_CHANNEL) is None:  # nothing seen yet: a build may just have finished
            await watcher.refresh()
        return watcher.versions.get(FEATURES_CHANNEL)

    not_found, bad_id = error("unknown (no features and no events)"), invalid("an id that breaks the id rule")
    redis_down = error("Redis unavailable")

    @app.get("/users/{user_id}", summary="Merged user features (batch record + real-time events)",
             response_model=UserFeatures, responses={404: not_found, 422: bad_id, 503: redis_down})
    async def get_user(user_id: Annotated[str, Path(json_schema_extra=id_schema("external user id"))],
                       request: Request) -> Response:
        user_id = valid_id("user_id", user_id)
        version = await features_version(request)
        [state] = await fetch_user_states(request.app.state.astores, [user_id], version, settings.recent_n)
        if not state.known:
            raise RequestError(404, f"unknown user {user_id!r}")
        return _json(state.features, headers={"X-Features-Version": version or ""})

    @app.get("/items/{item_id}", summary="Item features plus the real-time click counter",
             response_model=ItemRecord, responses={404: not_found, 422: bad_id, 503: redis_down})
    async def get_item(item_id: Annotated[str, Path(json_schema_extra=id_schema("external item id"))],
                       request: Request) -> Response:
        item_id = valid_id("item_id", item_id)
        version = await features_version(request)
        [rec] = await fetch_item_records(request.app.state.astores, [item_id], version)
        if rec is None:
            raise RequestError(404, f"unknown item {item_id!r}")
        return _json(rec, headers={"X-Features-Version": version or ""})

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            metrics.events_rejected.labels("too_large").inc()
            raise RequestError(413, f"request body of {int(length)} bytes exceeds the limit of {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                metrics.events_rejected.labels("too_large").inc()
                raise RequestError(413, f"request body exceeds the limit of {max_body} bytes")
        return bytes(body)

    batch = {"maxItems": settings.max_event_batch}
    too_large = error(f"more than MAX_EVENT_BATCH={settings.max_event_batch} entries, or a body over "
                      f"{max_body} bytes")

    @app.post("/items", summary="Register new items with their attributes (served after the next nightly run)",
              response_model=ItemsAnswer, responses={413: too_large, 422: invalid(), 503: redis_down},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "oneOf": [{"type": "array", "items": {"$ref": "#/components/schemas/ItemRegistration"}, **batch},
                            {"$ref": "#/components/schemas/ItemRegistration"}]}}}}})
    async def post_items(request: Request) -> Response:
        body = await read_body(request)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(422, f"body is not valid JSON: {exc}") from None
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list):
            raise RequestError(422, 'body must be an item {"item_id": ..., "attrs": {...}} or a list of them')
        if len(payload) > settings.max_event_batch:
            raise RequestError(413, f"batch of {len(payload)} items exceeds max_event_batch={settings.max_event_batch}")
        try:
            items = REGISTRATIONS.validate_python(payload)
        except ValidationError as exc:
            errors = format_errors(exc, name="items")
            raise RequestError(422, "; ".join(errors), errors=errors) from None
        if items:
            await request.app.state.astores("item_features").hset(registered_items_key(ks),
                                                                  mapping=registration_mapping(items))
            metrics.items_registered.inc(len(items))
        return _json({"registered": len(items)})

    @app.post("/events", summary="Record click events (atomic per batch)",
              response_model=EventsAnswer, responses={
                  413: too_large, 422: invalid(),
                  503: error("Redis unavailable, or the event log is full (EVENT_LOG_MAX_LEN)")},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "oneOf": [{"type": "array", "items": {"$ref": "#/components/schemas/Event"}, **batch},
                            {"$ref": "#/components/schemas/EventsBody"}]}}}}})
    async def post_events(request: Request) -> Response:
        body = await read_body(request)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            metrics.events_rejected.labels("invalid").inc()
            raise RequestError(422, f"body is not valid JSON: {exc}") from None
        if isinstance(payload, dict) and set(payload) == {"events"}:
            payload = payload["events"]
        if not isinstance(payload, list):
            metrics.events_rejected.labels("invalid").inc()
            raise RequestError(422, 'body must be a JSON list of events or {"events": [...]}')
        if len(payload) > settings.max_event_batch:
            metrics.events_rejected.labels("too_large").inc()
            raise RequestError(413, f"batch of {len(payload)} events exceeds max_event_batch={settings.max_event_batch}")
        try:
            events = EVENTS.validate_python(payload)
        except ValidationError as exc:
            metrics.events_rejected.labels("invalid").inc()
            errors = format_errors(exc)
            raise RequestError(422, "; ".join(errors), errors=errors) from None
        if not events:
            return _json({"accepted": 0})
        now = int(time.time())
        rows = sorted(((e.timestamp if e.timestamp is not None else now), j) for j, e in enumerate(events))
        keys: list[str] = []
        args: list[Any] = [len(events), settings.recent_n, item_db_arg, settings.event_log_max_len]
        markers = [ks.realtime_event_id(events[j].event_id) if events[j].event_id else "" for _, j in rows]
        for ts, j in rows:  # oldest first, so the newest ends up at the head of each recent list
            e = events[j]
            keys += [ks.realtime_recent(e.user_id), ks.realtime_counters(e.user_id), ks.realtime_item_clicks(e.item_id)]
            args += [pack_json([e.item_id, ts, e.environment, e.region]), ts, e.environment or "", e.region or "",
                     e.user_id, e.item_id, e.event]
        keys.append(ks.event_log())
        args += [*markers, settings.event_id_ttl_s]  # event-id markers (idempotent retries) and their TTL
        args.append(settings.realtime_ttl_s)  # (read as ARGV[#ARGV] by the script)
        if ks.cluster:  # no script may span slots: per-slot steps (services/feature_server/cluster_events.py)
            written, log_len = await write_events_cluster(request.app.state.astores("user_features"), ks, settings,
                                                          [(ts, events[j]) for ts, j in rows])
        else:
            written, log_len = await request.app.state.events_script(keys=keys, args=args)
        log_watch.observe(int(log_len))
        if int(written) < 0:  # the log is at its bound: refused whole, never dropped silently
            metrics.events_rejected.labels("log_full").inc()
            log.error("POST /events refused: %s", log_watch.full_message(int(log_len), len(events)))
            raise RequestError(503, log_watch.full_message(int(log_len), len(events)))
        metrics.events_accepted.inc(int(written))
        duplicates = len(events) - int(written)  # events whose event_id was already counted (client retries)
        return _json({"accepted": int(written), **({"duplicates": duplicates} if duplicates else {})})

    @app.get("/healthz", summary="Redis reachability + current features version (503 'degraded' when Redis has none)",
             response_model=FeatureHealth,
             responses={503: {"model": FeatureHealth, "description": "Redis unavailable, or no features version"}})
    async def healthz(request: Request) -> Response:
        watcher: VersionWatcher = request.app.state.watcher
        try:
            await watcher.refresh()
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            metrics.redis_errors.labels("/healthz").inc()
            return _json({"status": "error",
                          "redis": f"Redis unavailable at {safe_url(redis_url)}: {type(exc).__name__}: {exc}"}, 503)
        version = watcher.versions.get(FEATURES_CHANNEL)
        if version is None:  # nothing published, or Redis lost it (docs/reliability.md): user records are missing
            return _json({"status": "degraded", "redis": "ok", "features_version": None, "missing": [FEATURES_CHANNEL],
                          "detail": "Redis has no published features version: users are served from their real-time "
                                    "events only until it is republished"}, 503)
        return _json({"status": "ok", "redis": "ok", "features_version": version})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics", responses=METRICS)
    async def prometheus_metrics(request: Request) -> Response:
        try:  # the event log's backlog also moves when nothing is posted (the nightly archives and trims it)
            log_watch.observe(int(await request.app.state.astores("user_features").xlen(ks.event_log())))
        except (redis.exceptions.RedisError, ConnectionError, TimeoutError) as exc:
            log.warning("event log length unavailable for /metrics: %s: %s", type(exc).__name__, exc)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _add_schemas(app, settings.max_event_batch)
    openapi.document(app, settings, WRITE_ROUTES)  # the request policy's answers too (services/openapi.py)
    return app


def _add_schemas(app: FastAPI, max_batch: int) -> None:
    """Put Event/EventsBody/ItemRegistration into the OpenAPI components (those bodies are parsed by hand)."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        body = EventsBody.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(body.pop("$defs", {}))
        comps["EventsBody"] = body
        comps["EventsBody"]["properties"]["events"]["maxItems"] = max_batch
        reg = ItemRegistration.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(reg.pop("$defs", {}))
        comps["ItemRegistration"] = reg
        # what ItemRegistration's validators check (registration.py imports only common/, not this module)
        reg["properties"]["item_id"].update(id_schema("external item id"))
        for value in reg["properties"]["attrs"]["additionalProperties"]["anyOf"]:
            for entry in value.get("items", {}).get("anyOf", []):  # a bag's integers: JSON parses larger ones as floats
                if entry.get("type") == "integer":
                    entry.update(minimum=-(2**63), maximum=2**64 - 1)
        reg["properties"]["attrs"]["propertyNames"] = {"minLength": 1, "maxLength": MAX_ID_LEN, "pattern": r"[^\s\x1c-\x1f\x85]",
                                                       "not": {"const": "item_id"}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


WRITE_ROUTES = {("POST", "/events"), ("POST", "/items")}  # need API_WRITE_KEY when it is set


def app_from_env() -> http_guard.HttpGuard:
    """uvicorn factory: settings from the environment; the app behind the request policy (services/http_guard.py)."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return http_guard.HttpGuard(create_app(settings), settings, write_routes=WRITE_ROUTES)
