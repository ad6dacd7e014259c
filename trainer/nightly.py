"""`python -m trainer nightly`: the batch job that refreshes everything the services read.

Stages: config (validate before any work) → redis → load (validate the data) → events (archive the event log
since the previous run, fold every logged event into the training data; docs/event_log.md) → ids (extend and publish
the stable id maps) → features → fit:<channel> / publish:<channel> for every enabled trained channel: one after
another, or with NIGHTLY_WORKERS > 1 (default: the usable CPUs) several channels at once on the local engine's pool of
threads, longest first, with the same artifacts (trainer/engine/local.py, docs/scaling.md).
Every publish is atomic (new version, verify, flip `current`), so a failed or killed run leaves each
channel serving its previous version. A summary goes to ARTIFACTS_DIR/runs/<timestamp>/summary.json,
rewritten as each stage starts and ends, so even a SIGKILLed run leaves the stage it stopped in on disk.
After the `redis` stage the run takes the job lock (one nightly or republish at a time) and cleans up what dead
runs left (trainer/runs.py, docs/reliability.md).
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import signal
import socket
import sys
import threading
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
from trainer.engine.local import CpuMeter, JobPool, ProcessCpu, channel_job, usable_cpus
from trainer.runs import (
    JobRunning,
    RunLease,
    clean_dead_runs,
    drop_own_pending,
    eviction_warning,
    stopped_at,
    write_json_atomic,
)

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


class Terminated(BaseException):
    """SIGTERM/SIGINT arrived: unwinds the run (not caught as a stage failure) so its summary says where it stopped.
    With several workers the same exception is raised in every running channel job (trainer/engine/local.JobPool)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"killed by {signal.Signals(signum).name}")


def _terminate(signum: int, _frame) -> None:
    raise Terminated(signum)


class _Run:
    """Records stages (start offset, seconds, CPU seconds, peak RSS, status) into the summary, and rewrites the
    summary file (`path`) as each stage starts and ends. Thread-safe: channel jobs on the local engine's pool record
    their stages concurrently; whoever changes the summary holds `lock`."""

    def __init__(self, summary: dict[str, Any], path: Path | None = None):
        self.summary, self.path = summary, path
        self.lock = threading.RLock()
        self.t0 = time.perf_counter()
        # cpu_s of a stage: CPU seconds of the whole process while stages run one at a time; on the pool, the stage's
        # own thread plus its share of helper threads (trainer/engine/local.CpuMeter)
        self.cpu: Any = ProcessCpu()

    def save(self) -> None:
        if self.path is not None:
            with self.lock:
                try:
                    write_json_atomic(self.path, self.summary)
                except OSError as exc:  # a full disk must not fail the run itself
                    log.warning("could not write the run summary %s: %s", self.path, exc)

    @contextmanager
    def stage(self, name: str, fatal: bool = True) -> Iterator[dict[str, Any]]:
        with self.lock:
            rec: dict[str, Any] = {"stage": name, "status": "running", "start_s": round(time.perf_counter() - self.t0, 3)}
            self.summary["stages"].append(rec)
            self.save()
        log.info("stage %s: start", name)
        cpu = self.cpu
        t, c0 = time.perf_counter(), cpu.start()
        try:
            yield rec
        except Exception as exc:
            with self.lock:
                rec.update(status="failed", seconds=round(time.perf_counter() - t, 3),
                           peak_rss_mb=round(peak_rss_mb(), 1), cpu_s=round(cpu.stop(c0), 3),
                           error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, INPUT_ERRORS) else str(exc))
                err = StageFailed(name, exc)
                self.summary["failed"].append({"stage": name, "error": str(err)})
                log.error("%s", err)
                self.save()
            if fatal:
                raise err from exc
            return
        except BaseException as exc:  # Terminated (SIGTERM), KeyboardInterrupt: record it, then unwind
            with self.lock:
                rec.update(status="killed", seconds=round(time.perf_counter() - t, 3), cpu_s=round(cpu.stop(c0), 3),
                           error=str(exc) or type(exc).__name__)
                self.save()
            raise
        # cpu_s: on a shared machine a steadier measure of the stage's own work than its wall seconds
        with self.lock:
            rec.update(status="ok", seconds=round(time.perf_counter() - t, 3), peak_rss_mb=round(peak_rss_mb(), 1),
                       cpu_s=round(cpu.stop(c0), 3))
            self.save()
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
                progress: bool = True, engine: str | None = None) -> dict[str, Any]:
    """Run every stage; returns the summary (status 'ok' or 'failed', with the failed stages). `engine`: where the
    channels fit, local or ray (default: settings.nightly_engine; docs/scaling.md).

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
        "channels": {}, "pid": os.getpid(), "host": socket.gethostname(),
    }
    run = _Run(summary, _summary_path(settings, run_id))
    run.save()
    stores: RedisStores | None = None
    lease: RunLease | None = None
    eng = None
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
        with run.stage("lock"):  # one nightly/republish at a time; then clean up after dead runs
            lease = RunLease(stores, run_id, "nightly")  # (assigned first: released even if killed while taking it)
            try:
                lease.acquire()
            except JobRunning as exc:
                summary["lock_holder"] = exc.holder
                raise
            summary["cleanup"] = clean_dead_runs(stores, settings.artifacts_dir, grace_s=settings.version_grace_s,
                                                 pending_ttl_s=settings.pending_ttl_s, keep=settings.keep_versions,
                                                 by=run_id)
            if warning := eviction_warning(stores):
                summary["warnings"] = [*summary.get("warnings", []), warning]
        eng = _engine(run, settings, engine or settings.nightly_engine, summary)
        with run.stage("load"):
            dataset, registered = _registered(stores, _load(data_dir))
            summary["data"] = summary["data"] or dataset.name
            summary["counts"].update(n_rows=int(len(dataset.interactions)), dataset=dataset.name,
                                     registered_items=len(registered))
        with run.stage("events"):  # the event log since the previous run (docs/event_log.md)
            from trainer.event_log import archive_new_events, fold_into

            folded = archive_new_events(stores, settings)
            # the models train on the dataset + every logged event; the feature records stay on the dataset, since
            # the real-time state (never rebuilt) already counts the logged events
            training = fold_into(dataset, folded.history)
            summary["events"] = folded.summary()
        with run.stage("ids"):
            data = _ids(stores, training, summary, registered)
        with run.stage("features"):
            from trainer.feature_build import publish_features

            summary["versions"][FEATURES_CHANNEL] = publish_features(stores, dataset, settings, progress=progress,
                                                                     owner=run_id)
        _channels(run, stores, todo, data, settings, summary, progress, eng)
    except StageFailed:
        pass
    except Terminated as exc:
        summary.update(status="killed", error=str(exc), stopped_at=stopped_at(summary))
    finally:
        _close_engine(eng)
        _end_run(stores, lease, run_id, summary)
    if summary["status"] != "killed":
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


def _engine(run: _Run, settings: Settings, name: str, summary: dict[str, Any]):
    """The engine the channels fit on: local (no stage; NIGHTLY_WORKERS channel jobs at once), or a Ray cluster
    connected in stage `engine`."""
    from trainer.engine import make_engine

    if name == "local":
        eng = make_engine("local", workers=settings.nightly_workers or usable_cpus())
        summary["engine"] = eng.describe()
        return eng
    with run.stage("engine"):
        eng = make_engine(name, address=settings.ray_address, train_workers=settings.ray_train_workers)
        summary["engine"] = eng.describe()
    return eng


def _close_engine(eng) -> None:
    if eng is None:
        return
    try:
        eng.close()
    except Exception as exc:  # a cluster gone at the end must not hide the run's own outcome
        log.warning("could not close the %s engine: %s", eng.name, exc)


def _channels(run: _Run, stores: RedisStores, todo: list[ChannelSpec], data, settings: Settings,
              summary: dict[str, Any], progress: bool, engine=None) -> None:
    """Fit and publish every planned channel: in order, or on the local engine's pool when it has several workers.
    Either way the stage records end in the planned order (each has `start_s`, when it began)."""
    workers = getattr(engine, "workers", 1) if engine is None or engine.name == "local" else 1
    if workers <= 1 or len(todo) <= 1:
        for spec in todo:
            _channel(run, stores, spec, data, settings, summary, progress, engine)
        return
    from threadpoolctl import threadpool_limits

    with run.lock:
        for spec in todo:  # the channel entries in the planned order, whatever order the jobs start in
            summary["channels"][spec.name] = {"model": spec.model, "status": "queued"}
    first = len(summary["stages"])
    meter = run.cpu = CpuMeter()
    jobs = [channel_job(spec.name, spec.model, functools.partial(_channel, run, stores, spec, data, settings, summary,
                                                                   progress, engine)) for spec in todo]
    torch = sys.modules.get("torch")  # (imported by the config stage's registry)
    torch_threads = torch.get_num_threads() if torch else None
    try:
        if torch:  # a thread's first torch op takes this count; the models' own `num_threads` still apply
            torch.set_num_threads(1)
        with threadpool_limits(1, user_api="blas"):  # OpenBLAS's count is process-wide: one thread per worker
            JobPool(workers, tick=meter.tick).run(jobs)
    finally:
        if torch:
            torch.set_num_threads(torch_threads)
        run.cpu = ProcessCpu()
        order = {f"{a}:{s.name}": 2 * i + (a == "publish") for i, s in enumerate(todo) for a in ("fit", "publish")}
        with run.lock:
            summary["stages"][first:] = sorted(summary["stages"][first:], key=lambda r: order.get(r["stage"], 1 << 30))
            run.save()


def _channel(run: _Run, stores: RedisStores, spec: ChannelSpec, data, settings: Settings, summary: dict[str, Any],
             progress: bool, engine=None) -> None:
    """Fit (on `engine`, default local) and publish one trained channel; a failure is recorded and the run goes on."""
    from trainer.channels import registry
    from trainer.publishing import publish_channel

    info: dict[str, Any] = {"model": spec.model}
    with run.lock:
        summary["channels"][spec.name] = info
    ch = None
    with run.stage(f"fit:{spec.name}", fatal=False) as rec:
        t = time.perf_counter()
        ch = registry.build(spec)
        if engine is None or engine.name == "local":
            ch.fit(data, progress=progress)
            artifacts = ch.artifacts(data)
        else:
            artifacts = engine.fit(ch, data, progress=progress)
            with run.lock:
                info["engine"] = engine.stats
        with run.lock:
            info.update(fit_s=round(time.perf_counter() - t, 3), kinds=sorted(artifacts))
    if rec["status"] != "ok":
        with run.lock:
            info["status"] = "failed"
        return
    with run.stage(f"publish:{spec.name}", fatal=False) as rec:
        extra = {"fit_s": info["fit_s"], "run_id": summary["run_id"], "dataset": summary["counts"].get("dataset")}
        if "events" in summary:  # where an incremental update of this version starts reading the log
            extra["event_log_to"] = summary["events"]["to"]
        m = _metrics(ch)
        if m:
            extra["metrics"] = m
            with run.lock:
                info["metrics"] = m
        ver = publish_channel(stores, spec, artifacts, data, settings.artifacts_dir, extra=extra, progress=progress,
                              grace_s=settings.version_grace_s, pending_ttl_s=settings.pending_ttl_s,
                              keep=settings.keep_versions, owner=summary["run_id"])
        with run.lock:
            summary["versions"][spec.name] = ver
            info["version"] = ver
    with run.lock:
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


def _summary_path(settings: Settings, run_id: str) -> Path:
    return Path(settings.artifacts_dir) / "runs" / run_id / "summary.json"


def _write_summary(settings: Settings, run_id: str, summary: dict[str, Any]) -> Path:
    path = _summary_path(settings, run_id)
    write_json_atomic(path, summary)
    return path


def _end_run(stores: RedisStores | None, lease: RunLease | None, run_id: str, summary: dict[str, Any]) -> None:
    """Drop what this run left pending (a failed or killed publish), release its lease and lock, close Redis."""
    try:
        if lease is not None and stores is not None:
            dropped = drop_own_pending(stores, run_id)
            if dropped:
                summary["dropped_pending"] = dropped
            lease.release()
    except redis.exceptions.RedisError as exc:  # Redis gone: the next job cleans up (our lease expires)
        log.warning("could not clean up this run's pending versions: %s", exc)
    finally:
        if stores is not None:
            stores.close()


def run_nightly_cli(data: Path | None, config: Path | None, redis_url: str | None, artifacts: Path | None,
                    engine: str | None = None, ray_address: str | None = None) -> int:
    """CLI entry: 0 ok, 1 a stage failed, 2 bad input (config, data, missing Redis URL), 3 another nightly or
    republish holds the job lock, 128+N killed by signal N (SIGTERM, SIGINT: the summary says where)."""
    update: dict[str, Any] = {}
    if redis_url:
        update["redis_url"] = redis_url
    if artifacts:
        update["artifacts_dir"] = Path(artifacts)
    if engine:
        update["nightly_engine"] = engine
    if ray_address:
        update["ray_address"] = ray_address
    settings = get_settings().model_copy(update=update)
    if not settings.redis_url:
        print(f"error: {NO_REDIS}", file=sys.stderr)
        return 2
    if data is None and settings.data_dir is not None:
        data = settings.data_dir
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # unwind through the stages: the summary records the kill
            previous[sig] = signal.signal(sig, _terminate)
    try:
        summary = run_nightly(settings, data_dir=data, config_path=config, progress=sys.stderr.isatty())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    table = "\n".join(f"  {s['stage']:<28} {s['status']:<7} {s.get('seconds', 0):8.2f}s  peak {s.get('peak_rss_mb', 0):7.0f} MB"
                      for s in summary["stages"])
    print(f"nightly {summary['run_id']}: {summary['status']} in {summary['seconds']:.1f}s, "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB\n{table}\nsummary: {summary['summary_path']}", file=sys.stderr)
    if summary["status"] == "ok":
        return 0
    if summary["status"] == "killed":
        print(f"error: {summary['error']} during stage {summary.get('stopped_at')!r}; the previous versions keep "
              f"serving", file=sys.stderr)
        return 128 + (signal.SIGINT if "SIGINT" in summary["error"] else signal.SIGTERM)
    for f in summary["failed"]:
        print(f"error: {f['error']}", file=sys.stderr)
    first = summary["failed"][0]["stage"]
    if first == "lock" and "lock_holder" in summary:
        return 3
    return 2 if first in ("config", "load") and _input_error(summary) else 1


def _input_error(summary: dict[str, Any]) -> bool:
    return any(s["status"] == "failed" and s["stage"] in ("config", "load") for s in summary["stages"])
