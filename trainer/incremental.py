"""`python -m trainer incremental`: between nightlies, bring the incremental channels up to the newest logged events.

For every enabled channel whose model can (a `incremental_fit` method: the tower models two_tower, youtube_dnn,
multitask_two_tower, neural_cf, sdm and mind; mf's ALS fold-in; popular), starting from its published version: the
events after the log offset that version recorded (`event_log_to` in its manifest) are its new examples; a tower
model warm-starts from the version's training checkpoint and trains one pass over them (ID tables grown, other
layers frozen; trainer/channels/warm_tower.py, trainer/nn/warm_start.py), ALS solves the touched users and the new
items against the fixed factors, and the result is published as a new version, atomically (tower, item vectors and
user vectors in one version), recording the new offset. A version published meanwhile by
another job (a nightly) is never replaced by an update computed from an older one. The nightly job stays the source
of truth: it retrains everything from the dataset, the archive and the log. See docs/event_log.md.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import redis

from common.keyspace import Keyspace
from common.publish import current_version, read_manifest
from common.redis_conn import RedisStores
from common.settings import Settings, get_settings
from trainer.data.split import dedupe_pairs
from trainer.data.train_data import TrainData
from trainer.event_log import INCREMENTAL, LOG_ID, START, commit_offset, fold_into, history, id_key
from trainer.nn.warm_start import BaseVersion

log = logging.getLogger(__name__)


class NotIncremental(Exception):  # noqa: N818 (a status, not a failure)
    """Raised by `incremental_fit` when this channel's configuration has no incremental update (e.g. mf with
    FunkSVD): the channel is skipped, it stays on the nightly's version."""


class IncrementalChannel(Protocol):
    """What a channel implements to be updated between nightlies."""

    def incremental_fit(self, data: TrainData, base: BaseVersion, rows: np.ndarray, progress: bool = False) -> dict:
        """Update from the published `base` with the interactions at positions `rows` of `data`; a report."""


def incremental_specs(cfg, only: list[str] | None = None) -> list:  # noqa: ANN001
    """The channels to update: trained, enabled (or the source of an enabled `from:`) and of a model that can."""
    from trainer.channels import registry
    from trainer.nightly import channels_to_train

    specs = [s for s in channels_to_train(cfg) if hasattr(registry.models()[s.model], "incremental_fit")]
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"--channels: {unknown} are not enabled channels with incremental updates; those are "
                             f"{[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    return specs


def new_rows(data: TrainData, dataset_rows: pd.DataFrame, events: pd.DataFrame, after: str) -> np.ndarray:
    """Positions in `data` of the interactions that are new since offset `after`: logged events after it whose
    (user, item) pair occurs there for the first time (the protocol's dedupe keeps the earliest occurrence)."""
    cols = ["user_id", "item_id", "timestamp"]
    frame = pd.concat([dataset_rows[cols].assign(_k=-1), events[cols].assign(_k=id_key(events[LOG_ID]))],
                      ignore_index=True)
    kept = dedupe_pairs(frame)
    fresh = kept[kept["_k"].to_numpy() > id_key([after])[0]]
    if fresh.empty:
        return np.empty(0, np.int64)
    u, i = data.user_map.lookup(fresh["user_id"]), data.item_map.lookup(fresh["item_id"])
    want = u * data.n_items + i
    have = data.user_idx.astype(np.int64) * data.n_items + data.item_idx
    return np.flatnonzero(np.isin(have, want)).astype(np.int64)


def run_incremental(settings: Settings, data_dir: str | Path | None = None, config_path: str | Path | None = None,
                    channels: list[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """One incremental update of every incremental channel; returns the summary (also written to
    ARTIFACTS_DIR/runs/<run id>/summary.json). Status ok, failed (a stage failed) or busy (another job held the
    job lock: nothing was touched)."""
    from trainer.nightly import (
        StageFailed,
        _end_run,
        _ids,
        _load,
        _redact,
        _registered,
        _Run,
        _summary_path,
        _validate_config,
        _write_summary,
        peak_rss_mb,
        run_id_now,
    )
    from trainer.runs import JobRunning, RunLease

    t_run = time.perf_counter()
    run_id = run_id_now() + "-incremental"
    config_path = Path(config_path or settings.channels_config)
    summary: dict[str, Any] = {"run_id": run_id, "kind": "incremental", "status": "running",
                               "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                               "config": str(config_path), "redis_url": _redact(settings.redis_url), "stages": [],
                               "failed": [], "counts": {}, "versions": {}, "channels": {}}
    run = _Run(summary, _summary_path(settings, run_id))
    stores: RedisStores | None = None
    lease = None
    try:
        with run.stage("config"):
            specs = incremental_specs(_validate_config(config_path), channels)
            summary["channels_planned"] = [s.name for s in specs]
        with run.stage("redis"):
            stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
            stores("meta").ping()
        with run.stage("lock"):
            try:
                lease = RunLease(stores, run_id, "incremental").acquire()
            except JobRunning as exc:
                summary["lock_holder"] = exc.holder
                summary["busy"] = str(exc)
                raise
        with run.stage("load"):
            dataset, registered = _registered(stores, _load(data_dir))
            events = history(stores, settings)
            summary["events"] = {"total": int(len(events)), "to": str(events[LOG_ID].iloc[-1]) if len(events) else START}
        with run.stage("ids"):
            data = _ids(stores, fold_into(dataset, events), summary, registered)
        for spec in specs:
            _update(run, stores, spec, data, dataset, events, settings, summary, progress)
        published = [summary["channels"][s]["event_log_to"] for s in summary["versions"]]
        if published:  # observability: how far the incremental consumer got (its real offsets are the manifests')
            commit_offset(stores, INCREMENTAL, min(published, key=lambda x: id_key([x])[0]))
    except StageFailed:
        pass
    finally:
        _end_run(stores, lease, run_id, summary)
    summary["status"] = ("busy" if "busy" in summary else "failed") if summary["failed"] else "ok"
    summary["seconds"] = round(time.perf_counter() - t_run, 3)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    summary["summary_path"] = str(_write_summary(settings, run_id, summary))
    log.info("incremental %s: %s in %.1fs; %s", run_id, summary["status"], summary["seconds"],
             {n: c.get("status") for n, c in summary["channels"].items()})
    return summary


def _update(run, stores: RedisStores, spec, data: TrainData, dataset, events: pd.DataFrame,  # noqa: ANN001
            settings: Settings, summary: dict[str, Any], progress: bool) -> None:
    """Warm-start, train and publish one channel; a failure is recorded and the run goes on."""
    from trainer.channels import registry
    from trainer.publishing import publish_channel

    info: dict[str, Any] = {"model": spec.model}
    summary["channels"][spec.name] = info
    with run.stage(f"incremental:{spec.name}", fatal=False) as rec:
        base_version = current_version(stores, spec.name)
        manifest = read_manifest(stores, spec.name, base_version) if base_version else None
        if manifest is None:
            info["status"] = "skipped: not published yet (run the nightly job first)"
            return
        after = str(manifest.get("event_log_to") or START)
        info.update(base_version=base_version, event_log_from=after)
        rows = new_rows(data, dataset.interactions, events, after)
        to = summary["events"]["to"]
        if len(rows) == 0:
            info["status"] = "up to date: no new events since its version"
            return
        t = time.perf_counter()
        ch = registry.build(spec)
        try:
            info["report"] = ch.incremental_fit(data, BaseVersion(spec.name, base_version, manifest), rows,
                                                progress=progress)
        except NotIncremental as exc:
            info["status"] = f"skipped: {exc}"
            return
        artifacts = ch.artifacts(data)
        info["fit_s"] = round(time.perf_counter() - t, 3)
        if current_version(stores, spec.name) != base_version:  # a nightly published meanwhile: it wins
            info["status"] = "skipped: a newer version was published while this update ran"
            return
        extra = {"fit_s": info["fit_s"], "run_id": summary["run_id"], "event_log_to": to, "incremental": {
            "base_version": base_version, "event_log_from": after, **info["report"]}}
        ver = publish_channel(stores, spec, artifacts, data, settings.artifacts_dir, extra=extra, progress=progress,
                              grace_s=settings.version_grace_s, pending_ttl_s=settings.pending_ttl_s,
                              keep=settings.keep_versions, owner=summary["run_id"])
        info.update(version=ver, event_log_to=to, seconds=round(time.perf_counter() - t, 3), status="ok")
        summary["versions"][spec.name] = ver
    if rec["status"] != "ok":
        info["status"] = "failed"


def run_incremental_cli(data: Path | None, config: Path | None, channels: str | None, redis_url: str | None,
                        artifacts: Path | None) -> int:
    """CLI entry: 0 ok (or nothing to do), 1 a stage failed, 2 bad input, 3 another job holds the job lock."""
    update: dict[str, Any] = {k: v for k, v in (("redis_url", redis_url), ("artifacts_dir", artifacts)) if v}
    settings = get_settings().model_copy(update=update)
    if not settings.redis_url:
        print("error: no Redis configured: set REDIS_URL or pass --redis-url", file=sys.stderr)
        return 2
    if data is None and settings.data_dir is not None:
        data = settings.data_dir
    only = [c.strip() for c in channels.split(",") if c.strip()] if channels else None
    try:
        summary = run_incremental(settings, data_dir=data, config_path=config, channels=only,
                                  progress=sys.stderr.isatty())
    except redis.exceptions.RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return 1
    lines = "\n".join(f"  {n:<20} {c.get('status')}" + (f"  ({c['report']})" if "report" in c else "")
                      for n, c in summary["channels"].items())
    print(f"incremental {summary['run_id']}: {summary['status']} in {summary['seconds']:.1f}s\n{lines}\n"
          f"summary: {summary['summary_path']}", file=sys.stderr)
    if summary["status"] == "ok":
        return 0
    if summary["status"] == "busy":
        print(f"error: {summary['busy']}", file=sys.stderr)
        return 3
    for f in summary["failed"]:
        print(f"error: {f['error']}", file=sys.stderr)
    return 2 if summary["failed"][0]["stage"] in ("config", "load") else 1
