"""All runtime settings, read from environment variables (or a `.env` file) via pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached; tests build their own `Settings`)."""
    return Settings()
