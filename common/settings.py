"""All runtime settings, read from environment variables (or a `.env` file) via pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the services and the trainer; env var name = field name upper-cased."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis to use, e.g. redis://127.0.0.1:6379/0. Unset: commands that need one start a private server.",
    )
    redis_key_mode: Literal["db", "prefix"] = Field(
        default="db", description="'db': one Redis DB per store (db1 users, db2 items, ...); 'prefix': everything in db0 under key prefixes (Redis Cluster)."
    )
    redis_prefix: str = Field(default="mr", description="Key prefix used in 'prefix' mode.")
    # -- Redis Cluster (docs/redis_cluster.md) --
    redis_cluster: bool = Field(default=False, description="REDIS_URL names one node of a Redis Cluster (the others are discovered): cluster clients that follow MOVED/ASK and failovers, hash-tagged keys. Needs REDIS_KEY_MODE=prefix.")
    redis_stores: dict[str, int] = Field(
        default_factory=dict, description='Override store→DB numbers, JSON, e.g. {"item_emb": 11}.'
    )
    redis_timeout_s: float = Field(default=1.0, description="Socket timeout for Redis calls made by the services.")
    version_grace_s: float = Field(default=600.0, description="Old versions are deleted this long after being replaced.")
    pending_ttl_s: float = Field(default=6 * 3600.0, description="An unfinished (crashed) publish is garbage-collected after this long.")
    keep_versions: int = Field(default=2, description="Versions kept per channel (current included) even after the grace period.")

    artifacts_dir: Path = Field(default=Path("var/artifacts"), description="Where published artifacts (id maps, towers, reports) are written.")
    channels_config: Path = Field(default=Path("config/channels.yaml"), description="The channel config file.")
    run_dir: Path = Field(default=Path("var/run"), description="PID files, logs and the local Redis of `make up`.")
    data_dir: Path | None = Field(default=None, description="Dataset directory used by `make up` / the scheduler; unset = built-in synthetic data.")
    eval_dir: Path = Field(default=Path("var/eval"), description="Where the inspector (recall server /ui/) looks for the latest offline evaluation report: the newest report.json under it (`python -m trainer evaluate --out var/eval/...`).")

    host: str = "127.0.0.1"
    feature_port: int = 8001
    vector_port: int = 8002
    recall_port: int = 8000
    feature_url: str = Field(default="http://127.0.0.1:8001", description="Feature server base URL.")
    vector_url: str = Field(default="http://127.0.0.1:8002", description="Vector server base URL (used by the recall server).")
    vector_mode: Literal["remote", "embedded"] = Field(default="remote", description="Recall server's u2i channels: 'remote' asks the vector server over HTTP; 'embedded' runs the same search code inside each recall worker (no HTTP hop, each worker holds every index).")

    recent_n: int = Field(default=50, description="How many recent clicks a user record keeps.")
    top_categories_n: int = Field(default=5, description="How many top categories a user record keeps.")
    max_event_batch: int = Field(default=1000, description="Largest accepted POST /events batch (413 above).")
    max_k: int = Field(default=1000, description="Largest k accepted by /recall and /search.")
    omp_threads: int = Field(default=1, description="OpenMP threads for faiss/torch in the services.")
    vector_poll_s: float = Field(default=1.0, gt=0, description="Vector server: how often `current` pointers and id maps are polled.")
    vector_load_timeout_s: float = Field(default=30.0, gt=0, description="Vector server: Redis socket timeout while loading a version.")
    vector_user_cache_mb: int = Field(default=1024, ge=0, description="Vector server: precomputed user vectors of a channel are held in memory when they fit in this many MB (0: always read from Redis).")
    vector_precompute_mb: int = Field(default=512, ge=0, description="Vector server: per-user search results of a channel without a user tower (its user vectors are fixed per version) are computed when the version loads and held in memory when users × index.precompute_k × 8 bytes fit in this many MB (0: search on every request).")
    recall_list_cache_mb: int = Field(default=512, ge=0, description="Recall server: i2i/u2u neighbour lists are kept in each worker's memory up to this many MB (lists are immutable per version; after each version change the most popular items' i2i lists, then every user's u2u list, are loaded in the background up to 3/4 of it; 0 disables).")
    log_level: str = "info"
    access_log: bool = Field(default=False, description="uvicorn access log (costs ~20% at high rates).")

    # -- HTTP hardening of the three services (docs/reliability.md) --
    http_max_head_bytes: int = Field(default=65536, ge=1024, description="Largest request line + headers of one request, in bytes; above it the connection gets 431 (JSON) and is closed before the rest is parsed.")
    http_receive_timeout_s: float = Field(default=10.0, gt=0, description="A request must arrive whole (request line, headers and body) within this many seconds of its first byte, and a new connection must start one within it: a head still incomplete gets 408 (JSON), a body still incomplete a closed connection (slowloris).")
    http_max_body_bytes: int = Field(default=4 * 2**20, ge=1024, description="Largest request body on every endpoint, in bytes (413 before any parsing); the default holds the largest legal body (10,000 excluded ids of 256 characters).")
    request_budget_s: float = Field(default=5.0, gt=0, description="Whole-request time budget from the end of its headers: a request still unanswered after it gets 503 (JSON) and its work is cancelled.")
    api_write_key: str | None = Field(default=None, description="When set, POST /events and POST /items need it (header `X-API-Key: <key>` or `Authorization: Bearer <key>`): missing → 401, wrong → 403. Unset: writes need API_READ_KEY if that is set, else nothing.")
    api_read_key: str | None = Field(default=None, description="When set, every other endpoint (GET/POST /recall, /users, /items, /search, ...) needs it or the write key; /healthz never does.")
    api_key_metrics: bool = Field(default=True, description="/metrics needs the read key too when API_READ_KEY is set (false: open, e.g. for a scraper on a private network).")
    api_key_docs: bool = Field(default=False, description="/docs, /redoc and /openapi.json need the read key too when API_READ_KEY is set.")
    allowed_hosts: str = Field(default="", description="Comma-separated Host names the services answer (port ignored; `*.example.com` matches subdomains); any other Host gets 400 (DNS rebinding). Empty: any Host.")
    redis_breaker_failures: int = Field(default=3, ge=0, description="Services: this many Redis calls failing in a row (connection error or timeout) open a circuit breaker, and Redis calls then fail at once (503 naming Redis) instead of each waiting REDIS_TIMEOUT_S (0: no breaker).")
    redis_breaker_reset_s: float = Field(default=0.5, gt=0, description="How long an open breaker fails fast before letting one probe call through (its success closes it).")
    event_id_ttl_s: int = Field(default=86400, ge=1, description="POST /events: how long an event's optional `event_id` is remembered; a retry with the same id within it is not counted again.")

    # -- event log and incremental updates (docs/event_log.md) --
    event_log_max_len: int = Field(default=2_000_000, ge=1, description="Bound of the event log (Redis stream of accepted events): entries the nightly has not archived yet. At the bound POST /events answers 503 (nothing is dropped); ~50 bytes of Redis memory per entry.")
    event_log_warn_ratio: float = Field(default=0.8, gt=0, lt=1, description="The feature server warns (metric feature_server_event_log_fill_ratio, a log line) once the un-archived backlog passes this share of EVENT_LOG_MAX_LEN.")
    event_archive_dir: Path | None = Field(default=None, description="Where the nightly archives the events it folded from the log (parquet segments, read back by every later nightly and by the incremental job); unset = ARTIFACTS_DIR/events.")
    incremental_every_min: float = Field(default=0.0, ge=0, description="The scheduler also runs `python -m trainer incremental` every this many minutes between nightly runs (0: never).")

    # -- Redis data loss, memory bound, killed jobs (docs/reliability.md) --
    realtime_ttl_s: int = Field(default=30 * 86400, ge=60, description="Per-user real-time state (recent clicks, counters) and per-item real-time click counters expire this long after their last event; with Redis's volatile-lru policy they are also the only keys evicted at REDIS_MAXMEMORY, never published artifacts.")
    redis_maxmemory: str = Field(default="2gb", description="maxmemory of the local Redis that `make up` / `make demo` start (e.g. 512mb, 4gb; 0: no bound). Its policy is volatile-lru: at the bound only keys with a TTL (real-time state) are evicted; a nightly whose artifacts do not fit fails naming maxmemory, and the previous versions keep serving.")

    nightly_workers: int = Field(default=0, ge=0, le=256, description="Local engine: channel jobs (fit + publish of one channel) the nightly runs at once on a pool of threads, longest first, each pinned to one OpenMP/BLAS thread; the artifacts equal the sequential run's. 0 = the CPUs this process may use; 1 = one channel after another (docs/scaling.md).")

    # -- the nightly beyond one machine: Ray (docs/scaling.md) --
    nightly_engine: Literal["local", "ray"] = Field(default="local", description="Where the nightly's channels fit: 'local' (this process) or 'ray' (ItemCF/UserCF co-occurrence, item2vec sessions, neighbour lists and user-vector precompute as sharded Ray tasks, two-tower on Ray Train workers); `python -m trainer nightly --engine`.")
    ray_address: str | None = Field(default=None, description="Ray cluster for NIGHTLY_ENGINE=ray (host:port of the head's GCS, e.g. ray-head:6379; Ray itself reads the same variable); unset: the nightly starts a local Ray in its own process.")
    ray_train_workers: int = Field(default=2, ge=1, le=1024, description="NIGHTLY_ENGINE=ray: Ray Train workers (one CPU each) that train a tower model together (gradients all-reduced over gloo).")

    @model_validator(mode="after")
    def _cluster_needs_prefix_mode(self) -> Settings:
        if self.redis_cluster and self.redis_key_mode != "prefix":
            raise ValueError("REDIS_CLUSTER=true needs REDIS_KEY_MODE=prefix: a Redis Cluster has only db0")
        return self

    @model_validator(mode="after")
    def _event_log_fits_a_batch(self) -> Settings:
        if self.event_log_max_len < self.max_event_batch:
            raise ValueError(f"event_log_max_len ({self.event_log_max_len}) must be at least max_event_batch "
                             f"({self.max_event_batch}): a full batch must fit in the event log")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached; tests build their own `Settings`)."""
    return Settings()
