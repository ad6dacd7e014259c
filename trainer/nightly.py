"""`python -m trainer nightly`: the batch job that refreshes everything the services read.

Stages: config (validate before any work) → redis → load (validate the data) → ids (extend and publish
the stable id maps) → features → fit:<channel> / publish:<channel> for every enabled trained channel.
Every publish is atomic (new version, verify, flip `current`), so a failed or killed run leaves each
channel serving its previous version. A summary goes to ARTIFACTS_DIR/runs/<timestamp>/summary.json.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from common.channel_config import ChannelConfig, ChannelSpec, ConfigError, load_config
from common.ids import load_id_map, publish_id_map
from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.redis_conn import RedisStores
from common.settings import Settings, get_settings
from trainer.data.errors import DataError

log = logging.getLogger(__name__)

NO_REDIS = "no Redis configured: set REDIS_URL or pass --redis-url (`make nightly` / `make up` start a local one)"
INPUT_ERRORS = (ConfigError, DataError)


class StageFailed(RuntimeError):
    """A nightly stage failed; the message names the stage."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage, self.cause = stage, cause
        super().__init__(f"stage {stage!r} failed: {cause}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_id_now() -> str:
    now = datetime.now()
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}"


class _Run:
    """Records stages (seconds, peak RSS, status) into the summary."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary

    @contextmanager
    def stage(self, name: str, fatal: bool = True) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {"stage": name, "status": "running"}
        self.summary["stages"].append(rec)
        log.info("stage %s: start", name)
        t = time.perf_counter()
        try:
            yield rec
        except Exception as exc:
            rec.update(status="failed", seconds=round(time.perf_counter() - t, 3), peak_rss_mb=round(peak_rss_mb(), 1),
                       error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, INPUT_ERRORS) else str(exc))
            err = StageFailed(name, exc)
            self.summary["failed"].append({"stage": name, "error": str(err)})
            log.error("%s", err)
            if fatal:
                raise err from exc
            return
        rec.update(status="ok", seconds=round(time.perf_counter() - t, 3), peak_rss_mb=round(peak_rss_mb(), 1))
        log.info("stage %s: ok in %.2fs (peak RSS %.0f MB)", name, rec["seconds"], rec["peak_rss_mb"])


def channels_to_train(cfg: ChannelConfig) -> list[ChannelSpec]:
    """Every enabled trained channel, plus the source of any enabled `from` channel (even if disabled)."""
    out: list[ChannelSpec] = []
    for spec in cfg.enabled():
        owner = spec if spec.trained else cfg.get(spec.publisher)
        if owner.name not in [o.name for o in out]:
            out.append(owner)
    return out


def _validate_config(path: Path) -> ChannelConfig:
    from trainer.channels import registry

    cfg = load_config(path)
    registry.validate_params(cfg, str(path))
    if not cfg.enabled():
        raise ConfigError(f"{path}: no channel is enabled")
    return cfg


def _metrics(ch: Any) -> Any:
    m = getattr(ch, "metrics", None)
    return m() if callable(m) else m


def run_nightly(settings: Settings, data_dir: str | Path | None = None, config_path: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run every stage; returns the summary (status 'ok' or 'failed', with the failed stages).

    Input problems (config, Redis, data, id maps, features) stop the run; a failing channel is recorded
    and the other channels still publish. Nothing already serving is ever replaced by a partial version.
    """
    t_run = time.perf_counter()
    run_id = run_id_now()
    config_path = Path(config_path or settings.channels_config)
    summary: dict[str, Any] = {
        "run_id": run_id, "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "status": "running", "config": str(config_path), "data": str(data_dir) if data_dir else None,
        "redis_url": _redact(settings.redis_url), "stages": [], "failed": [], "counts": {}, "versions": {},
        "channels": {},
    }
    run = _Run(summary)
    stores: RedisStores | None = None
    try:
        with run.stage("config"):
            cfg = _validate_config(config_path)
            todo = channels_to_train(cfg)
            summary["channels_planned"] = [s.name for s in todo]
        with run.stage("redis"):
            if not settings.redis_url:
                raise ConfigError(NO_REDIS)
            stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
            try:
                stores("meta").ping()
            except redis.exceptions.RedisError as exc:
                raise ConnectionError(f"Redis at {_redact(settings.redis_url)} is unreachable: {exc}") from None
        with run.stage("load"):
            dataset, registered = _registered(stores, _load(data_dir))
            summary["data"] = summary["data"] or dataset.name
            summary["counts"].update(n_rows=int(len(dataset.interactions)), dataset=dataset.name,
                                     registered_items=len(registered))
        with run.stage("ids"):
            data = _ids(stores, dataset, summary, registered)
        with run.stage("features"):
            from trainer.feature_build import publish_features

            summary["versions"][FEATURES_CHANNEL] = publish_features(stores, dataset, settings, progress=progress)
        for spec in todo:
            _channel(run, stores, spec, data, settings, summary, progress)
    except StageFailed:
        pass
    finally:
        if stores is not None:
            stores.close()
    summary["status"] = "failed" if summary["failed"] else "ok"
    summary["seconds"] = round(time.perf_counter() - t_run, 3)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    summary["versions_of_libraries"] = _versions()
    summary["summary_path"] = str(_write_summary(settings, run_id, summary))
    log.info("nightly %s: %s in %.1fs, peak RSS %.0f MB; summary %s", run_id, summary["status"], summary["seconds"],
             summary["peak_rss_mb"], summary["summary_path"])
    return summary


def _load(data_dir: str | Path | None):
    from trainer.data.io import load_dataset

    if data_dir is None:
        from trainer.synth import ensure_default_dataset

        data_dir = ensure_default_dataset()
    return load_dataset(data_dir)


def _registered(stores: RedisStores, dataset):
    """(dataset with the items registered through the feature server's POST /items, their ids)."""
    from common.registered_items import read_registered_items
    from trainer.data.registered import merge_registered

    return merge_registered(dataset, read_registered_items(stores("item_features"), stores.keyspace))


def _ids(stores: RedisStores, dataset, summary: dict[str, Any], registered: list[str] | None = None):
    """Extend the published id maps with this dataset's ids and the registered items (append-only) and index the
    data on them."""
    from trainer.data.train_data import TrainData

    user_map, item_map = load_id_map(stores, "user"), load_id_map(stores, "item")
    n_u0, n_i0 = len(user_map), len(item_map)
    item_map.extend(registered or [])
    data = TrainData.from_frame(dataset.interactions, dataset.users, dataset.items, user_map, item_map)
    publish_id_map(stores, "user", data.user_map)
    publish_id_map(stores, "item", data.item_map)
    summary["counts"].update(n_interactions=int(len(data.item_idx)), n_users=data.n_users, n_items=data.n_items,
                             new_users=data.n_users - n_u0, new_items=data.n_items - n_i0)
    return data


def _channel(run: _Run, stores: RedisStores, spec: ChannelSpec, data, settings: Settings, summary: dict[str, Any],
             progress: bool) -> None:
    """Fit and publish one trained channel; a failure is recorded and the run goes on."""
    from trainer.channels import registry
    from trainer.publishing import publish_channel

    info: dict[str, Any] = {"model": spec.model}
    summary["channels"][spec.name] = info
    ch = None
    with run.stage(f"fit:{spec.name}", fatal=False) as rec:
        t = time.perf_counter()
        ch = registry.build(spec)
        ch.fit(data, progress=progress)
        artifacts = ch.artifacts(data)
        info["fit_s"] = round(time.perf_counter() - t, 3)
        info["kinds"] = sorted(artifacts)
    if rec["status"] != "ok":
        info["status"] = "failed"
        return
    with run.stage(f"publish:{spec.name}", fatal=False) as rec:
        extra = {"fit_s": info["fit_s"], "run_id": summary["run_id"], "dataset": summary["counts"].get("dataset")}
        m = _metrics(ch)
        if m:
            extra["metrics"] = m
            info["metrics"] = m
        ver = publish_channel(stores, spec, artifacts, data, settings.artifacts_dir, extra=extra, progress=progress,
                              grace_s=settings.version_grace_s, pending_ttl_s=settings.pending_ttl_s,
                              keep=settings.keep_versions)
        summary["versions"][spec.name] = ver
        info["version"] = ver
    info["status"] = rec["status"]


def _redact(url: str | None) -> str | None:
    """The URL without a password."""
    if not url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def _versions() -> dict[str, str]:
    from trainer.evaluate import library_versions

    return library_versions()


def _write_summary(settings: Settings, run_id: str, summary: dict[str, Any]) -> Path:
    out = Path(settings.artifacts_dir) / "runs" / run_id
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path


def run_nightly_cli(data: Path | None, config: Path | None, redis_url: str | None, artifacts: Path | None) -> int:
    """CLI entry: 0 ok, 1 a stage failed, 2 bad input (config, data, missing Redis URL)."""
    update: dict[str, Any] = {}
    if redis_url:
        update["redis_url"] = redis_url
    if artifacts:
        update["artifacts_dir"] = Path(artifacts)
    settings = get_settings().model_copy(update=update)
    if not settings.redis_url:
        print(f"error: {NO_REDIS}", file=sys.stderr)
        return 2
    if data is None and settings.data_dir is not None:
        data = settings.data_dir
    summary = run_nightly(settings, data_dir=data, config_path=config, progress=sys.stderr.isatty())
    table = "\n".join(f"  {s['stage']:<28} {s['status']:<7} {s.get('seconds', 0):8.2f}s  peak {s.get('peak_rss_mb', 0):7.0f} MB"
                      for s in summary["stages"])
    print(f"nightly {summary['run_id']}: {summary['status']} in {summary['seconds']:.1f}s, "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB\n{table}\nsummary: {summary['summary_path']}", file=sys.stderr)
    if summary["status"] == "ok":
        return 0
    for f in summary["failed"]:
        print(f"error: {f['error']}", file=sys.stderr)
    first = summary["failed"][0]["stage"]
    return 2 if first in ("config", "load") and _input_error(summary) else 1


def _input_error(summary: dict[str, Any]) -> bool:
    return any(s["status"] == "failed" and s["stage"] in ("config", "load") for s in summary["stages"])
