"""Which Redis to use (REDIS_URL, else the one `make up` started) and how to name it in messages."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse, urlunparse

from common.settings import Settings


def safe_url(url: str) -> str:
    """The Redis URL without credentials, for messages."""
    u = urlparse(url)
    host = u.hostname or ""
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunparse(u._replace(netloc=netloc))


def resolve_redis_url(settings: Settings) -> str:
    """REDIS_URL, else the URL of the local Redis that `make up` started (run_dir/redis/redis.url)."""
    if settings.redis_url:
        return settings.redis_url
    url_file = Path(settings.run_dir) / "redis" / "redis.url"
    if url_file.exists() and url_file.read_text().strip():
        return url_file.read_text().strip()
    raise RuntimeError("no Redis configured: set REDIS_URL (e.g. redis://127.0.0.1:6379/0) or start the stack "
                       "with `make up`")
