"""`python -m services.feature_server serve|build`: the HTTP feature server; `build` is an alias of
`python -m trainer features` (the batch build lives in trainer/feature_build.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Feature server: the HTTP service; `build` is an alias of `python -m trainer features`.")


@app.command()
def build(data: Path = typer.Option(..., help="dataset directory (interactions.csv|parquet [+ users, items])"),
          redis_url: str | None = typer.Option(None, help="Redis URL (default: $REDIS_URL, else `make up`'s Redis)"),
          progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Alias of `python -m trainer features` (the batch build is a nightly stage, run in its own process)."""
    cmd = [sys.executable, "-m", "trainer", "features", "--data", str(data),
           "--progress" if progress else "--no-progress"]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def serve(port: int | None = typer.Option(None, help="port (default: $FEATURE_PORT = 8001)"),
          host: str | None = typer.Option(None, help="bind address (default: $HOST = 127.0.0.1)"),
          workers: int = typer.Option(1, min=1, help="uvicorn worker processes")) -> None:
    """Serve /users, /items, /events, /healthz, /metrics and /docs with uvicorn."""
    import uvicorn

    from common.redis_url import resolve_redis_url
    from common.settings import get_settings

    settings = get_settings()
    try:
        resolve_redis_url(settings)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from services.http_protocol import uvicorn_options

    uvicorn.run("services.feature_server.app:app_from_env", factory=True, host=host or settings.host,
                port=port or settings.feature_port, workers=workers, access_log=settings.access_log,
                log_level=settings.log_level.lower(), **uvicorn_options(settings))


if __name__ == "__main__":
    sys.exit(app())
