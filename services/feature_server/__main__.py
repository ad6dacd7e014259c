"""`python -m services.feature_server build|serve`: batch feature build, and the HTTP feature server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Feature server: batch build and HTTP service.")


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def build(data: Path = typer.Option(..., help="dataset directory (interactions.csv|parquet [+ users, items])"),
          redis_url: str | None = typer.Option(None, help="Redis URL (default: $REDIS_URL, else `make up`'s Redis)"),
          progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Compute user/item features from DATA and publish them as a new `features` version."""
    from common.keyspace import Keyspace
    from common.redis_conn import RedisStores
    from common.settings import get_settings
    from services.feature_server.app import resolve_redis_url
    from services.feature_server.build import publish_features
    from trainer.data.errors import DataError
    from trainer.data.io import load_dataset

    settings = get_settings()
    _logging(settings.log_level)
    if redis_url:
        settings = settings.model_copy(update={"redis_url": redis_url})
    try:
        url = resolve_redis_url(settings)
        dataset = load_dataset(data)
    except (RuntimeError, DataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    stores = RedisStores(url, Keyspace.from_settings(settings))
    try:
        version = publish_features(stores, dataset, settings, progress=progress)
    finally:
        stores.close()
    typer.echo(version)


@app.command()
def serve(port: int | None = typer.Option(None, help="port (default: $FEATURE_PORT = 8001)"),
          host: str | None = typer.Option(None, help="bind address (default: $HOST = 127.0.0.1)"),
          workers: int = typer.Option(1, min=1, help="uvicorn worker processes")) -> None:
    """Serve /users, /items, /events, /healthz, /metrics and /docs with uvicorn."""
    import uvicorn

    from common.settings import get_settings
    from services.feature_server.app import resolve_redis_url

    settings = get_settings()
    try:
        resolve_redis_url(settings)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run("services.feature_server.app:app_from_env", factory=True, host=host or settings.host,
                port=port or settings.feature_port, workers=workers, access_log=settings.access_log,
                log_level=settings.log_level.lower())


if __name__ == "__main__":
    sys.exit(app())
