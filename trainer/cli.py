"""The trainer's command line (typer). Each command lives in its own module; this file only wires them."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Offline side: synthetic data, nightly job, feature build, evaluation.")


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def synth(users: int = typer.Option(10_000, help="number of users"),
          items: int = typer.Option(5_000, help="number of items"),
          clicks: int = typer.Option(200_000, help="number of clicks"),
          out: Path = typer.Option(..., help="output dataset directory"),
          seed: int = typer.Option(42, help="random seed"),
          fmt: str = typer.Option("parquet", "--format", help="parquet or csv")) -> None:
    """Write a news-like synthetic dataset (interactions, users, items) to OUT."""
    from trainer.synth import write_synthetic

    _logging()
    write_synthetic(out, n_users=users, n_items=items, n_clicks=clicks, seed=seed, fmt=fmt)


@app.command()
def nightly(data: Path | None = typer.Option(None, help="dataset directory (default: built-in synthetic data)"),
            config: Path | None = typer.Option(None, help="channel config (default: $CHANNELS_CONFIG)"),
            redis_url: str | None = typer.Option(None, help="Redis URL (default: $REDIS_URL)"),
            artifacts: Path | None = typer.Option(None, help="artifacts dir (default: $ARTIFACTS_DIR)"),
            engine: str | None = typer.Option(None, help="where the channels fit: local or ray (default: "
                                                         "$NIGHTLY_ENGINE, local; docs/scaling.md)"),
            ray_address: str | None = typer.Option(None, help="Ray cluster address for --engine ray (default: "
                                                              "$RAY_ADDRESS; unset: a local Ray in this process)")
            ) -> None:
    """Load, validate, build features, fit and publish every enabled channel atomically."""
    from trainer.nightly import run_nightly_cli

    _logging()
    raise typer.Exit(run_nightly_cli(data=data, config=config, redis_url=redis_url, artifacts=artifacts,
                                     engine=engine, ray_address=ray_address))


@app.command()
def features(data: Path = typer.Option(..., help="dataset directory (interactions.csv|parquet [+ users, items])"),
             redis_url: str | None = typer.Option(None, help="Redis URL (default: $REDIS_URL, else `make up`'s Redis)"),
             progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Compute user/item features from DATA and publish them as a new `features` version (prints the version)."""
    from common.settings import get_settings
    from trainer.feature_build import run_features_cli

    settings = get_settings()
    _logging(settings.log_level.upper())
    if redis_url:
        settings = settings.model_copy(update={"redis_url": redis_url})
    raise typer.Exit(run_features_cli(data, settings, progress=progress))


@app.command()
def evaluate(data: Path = typer.Option(..., help="dataset directory"),
             out: Path = typer.Option(..., help="report directory"),
             config: Path | None = typer.Option(None, help="channel config (default: $CHANNELS_CONFIG)"),
             channels: str | None = typer.Option(None, help="comma-separated subset of channels"),
             repeats: int = typer.Option(1, help="timed fits per channel (median); the protocol uses 3"),
             tune: bool = typer.Option(False, help="grid-search merge weights on the validation split")) -> None:
    """Score every enabled channel and the merged list under shared PROTOCOL.md."""
    from trainer.evaluate import run_evaluate_cli

    _logging()
    raise typer.Exit(run_evaluate_cli(data=data, out=out, config=config, channels=channels, repeats=repeats, tune=tune))


@app.command()
def schedule(at: str = typer.Option("02:00", help="daily run time, HH:MM local time"),
             data: Path | None = typer.Option(None, help="dataset directory"),
             run_now_if_empty: bool = typer.Option(True, help="run once at start when nothing is published"),
             check_every: float = typer.Option(10.0, help="seconds between checks that Redis still holds every "
                                                          "published version (republish / nightly when not)")) -> None:
    """Run the nightly job every day at AT (and once at start if nothing is published)."""
    from trainer.schedule import run_schedule

    _logging()
    raise typer.Exit(run_schedule(at=at, data=data, run_now_if_empty=run_now_if_empty, check_s=check_every))


# -- event log and incremental updates (docs/event_log.md) ---------------------------------------------------------

@app.command("export-events")
def export_events(out: Path = typer.Option(..., help="output dataset directory (gets interactions.parquet)"),
                  redis_url: str | None = typer.Option(None, help="Redis URL (default: $REDIS_URL)"),
                  artifacts: Path | None = typer.Option(None, help="artifacts dir (default: $ARTIFACTS_DIR)")) -> None:
    """Write every logged event (the nightly's archive + the stream) to OUT/interactions.parquet (dataset format)."""
    from trainer.event_log import run_export_cli

    _logging()
    raise typer.Exit(run_export_cli(out, redis_url=redis_url, artifacts=artifacts))


@app.command()
def incremental(data: Path | None = typer.Option(None, help="dataset directory of the nightly job (default: $DATA_DIR, "
                                                              "else the built-in synthetic data)"),
                config: Path | None = typer.Option(None, help="channel config (default: $CHANNELS_CONFIG)"),
                channels: str | None = typer.Option(None, help="comma-separated subset of the incremental channels"),
                redis_url: str | None = typer.Option(None, help="Redis URL (default: $REDIS_URL)"),
                artifacts: Path | None = typer.Option(None, help="artifacts dir (default: $ARTIFACTS_DIR)")) -> None:
    """Warm-start the incremental channels from their published versions and train one pass over the new events."""
    from trainer.incremental import run_incremental_cli

    _logging()
    raise typer.Exit(run_incremental_cli(data=data, config=config, channels=channels, redis_url=redis_url,
                                         artifacts=artifacts))


# -- reliability (docs/reliability.md) -------------------------------------------------------------------------------

@app.command()
def republish(channels: str | None = typer.Option(None, help="comma-separated channels (default: every channel Redis "
                                                             "is missing)"),
              force: bool = typer.Option(False, help="replay even the channels Redis still has")) -> None:
    """Restore the last good versions from ARTIFACTS_DIR into Redis after a data loss, without retraining."""
    from trainer.republish import run_republish_cli

    _logging()
    raise typer.Exit(run_republish_cli(channels, force))
