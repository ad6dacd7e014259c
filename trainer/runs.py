"""Jobs that write to Redis: their lease (alive or dead), the one-at-a-time job lock, and the cleanup of what dead
runs left behind (pending versions in Redis, unfinished directories on disk, summaries still saying "running").

A run holds `run:<id>` with a short TTL, refreshed by a heartbeat thread; the versions it writes are registered as
pending under its id (common/publish.py). A run killed by SIGKILL stops refreshing, so within LEASE_TTL_S its lease
is gone and the next job deletes its pending versions at start; on the same host a dead PID tells it at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import redis

from common.keyspace import FEATURES_CHANNEL
from common.liveness import holder_dead
from common.publish import collect_dead_archives, collect_garbage, drop_pending, run_alive
from common.redis_conn import RedisStores

log = logging.getLogger(__name__)

LEASE_TTL_S = 30  # a run that stopped refreshing for this long is dead
HEARTBEAT_S = 5.0

# Take the job lock when it is free, or ours already (the heartbeat re-takes it after a Redis flush).
_TAKE_LOCK = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
# Release the lock only when it is ours.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobRunning(RuntimeError):
    """Another nightly/republish run holds the job lock."""

    def __init__(self, holder: dict[str, Any]):
        self.holder = holder
        since = holder.get("started_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
        super().__init__(f"another {holder.get('kind', 'job')} is running (run {holder.get('run_id')}, pid "
                         f"{holder.get('pid')} on {holder.get('host')}, since {when}); only one nightly or republish "
                         f"runs at a time: this one exits without touching anything")


class RunLease:
    """The lease of one run; `exclusive` also takes the job lock. Use as a context manager around the run."""

    def __init__(self, stores: RedisStores, run_id: str, kind: str, exclusive: bool = True,
                 ttl_s: int = LEASE_TTL_S, heartbeat_s: float = HEARTBEAT_S):
        self.stores, self.ks, self.run_id, self.kind = stores, stores.keyspace, run_id, kind
        self.exclusive, self.ttl_s, self.heartbeat_s = exclusive, ttl_s, heartbeat_s
        self.value = json.dumps({"run_id": run_id, "kind": kind, "pid": os.getpid(), "host": socket.gethostname(),
                                 "started_at": time.time()})
        self.lost_lock = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the heartbeat's own client: never shares a connection with the job's long pipelines
        self._own = RedisStores(stores.url, self.ks, socket_timeout=5)
        self._client = self._own("meta")

    def _take(self) -> bool:
        return bool(self._client.eval(_TAKE_LOCK, 1, self.ks.job_lock(), self.value, self.ttl_s))

    def acquire(self) -> RunLease:
        """Start the lease (and take the lock); JobRunning when another live run holds the lock."""
        if self.exclusive and not self._take():
            raw = self._client.get(self.ks.job_lock())
            holder = json.loads(raw) if raw else {}
            if raw and holder_dead(holder):
                log.warning("job lock held by run %s (pid %s), which is dead: taking it over", holder.get("run_id"),
                            holder.get("pid"))
                self._client.eval(_RELEASE_LOCK, 1, self.ks.job_lock(), raw)
            if not self._take():
                raw = self._client.get(self.ks.job_lock())
                raise JobRunning(json.loads(raw) if raw else {})
        self._client.set(self.ks.run_lease(self.run_id), self.value, ex=self.ttl_s)
        # assigned once started: a signal landing between the two must not leave release() an unstarted thread
        thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        thread.start()
        self._thread = thread
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._client.set(self.ks.run_lease(self.run_id), self.value, ex=self.ttl_s)
                if self.exclusive and not self._take() and not self.lost_lock:
                    self.lost_lock = True
                    log.error("the job lock was taken by another run while this one was running")
            except redis.exceptions.RedisError as exc:  # Redis away for a moment: the next beat retries
                log.warning("lease heartbeat failed: %s: %s", type(exc).__name__, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._client.delete(self.ks.run_lease(self.run_id))
            if self.exclusive:
                self._client.eval(_RELEASE_LOCK, 1, self.ks.job_lock(), self.value)
        except redis.exceptions.RedisError as exc:
            log.warning("could not release the lease of run %s (%s); it expires within %ds", self.run_id, exc,
                        self.ttl_s)
        finally:
            self._own.close()

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def eviction_warning(stores: RedisStores) -> str | None:
    """A warning when Redis may evict published artifacts (an allkeys-* policy), else None (docs/reliability.md)."""
    try:
        policy = stores("meta").config_get("maxmemory-policy").get("maxmemory-policy", "")
    except redis.exceptions.RedisError:  # CONFIG disabled (managed Redis): nothing to say
        return None
    if str(policy).startswith("allkeys"):
        msg = (f"Redis maxmemory-policy is {policy}: at maxmemory it may evict published artifacts; use volatile-lru "
               f"(only real-time state carries a TTL)")
        log.warning("%s", msg)
        return msg
    return None


def known_channels(stores: RedisStores) -> list[str]:
    """Every channel ever published (the channels index) and the features."""
    names = {v.decode() for v in stores("meta").smembers(stores.keyspace.channels_index())}
    return sorted(names | {FEATURES_CHANNEL})


def clean_dead_runs(stores: RedisStores, artifacts_dir: str | Path, *, grace_s: float, pending_ttl_s: float,
                    keep: int, by: str) -> dict[str, Any]:
    """At a job's start: delete the pending versions of dead runs (and versions past their grace period) in every
    channel, their unfinished directories on disk, and mark their summaries killed. What was removed."""
    deleted: dict[str, list[str]] = {}
    for channel in known_channels(stores):
        gone = collect_garbage(stores, channel, grace_s=grace_s, pending_ttl_s=pending_ttl_s, keep=keep)
        if gone:
            deleted[channel] = gone
    dirs = collect_dead_archives(stores, artifacts_dir, pending_ttl_s)
    summaries = mark_killed_summaries(stores, artifacts_dir, by)
    if deleted or dirs or summaries:
        log.warning("cleaned up after dead runs: versions %s, %d unfinished dir(s), summaries marked killed: %s",
                    deleted, len(dirs), summaries)
    return {"versions": deleted, "dirs": [str(d) for d in dirs], "summaries_marked_killed": summaries}


def drop_own_pending(stores: RedisStores, run_id: str) -> list[str]:
    """Delete the versions this run left pending (it is stopping: killed by SIGTERM, or a stage failed)."""
    ks, meta, out = stores.keyspace, stores("meta"), []
    for channel in known_channels(stores):
        for v, owner in meta.hgetall(ks.pending_owner(channel)).items():
            if owner.decode() == run_id:
                drop_pending(stores, channel, v.decode())
                out.append(f"{channel}/{v.decode()}")
    return out


def mark_killed_summaries(stores: RedisStores, artifacts_dir: str | Path, by: str) -> list[str]:
    """Summaries still saying "running" whose run is dead (SIGKILL, OOM killer, power loss) are marked killed, with
    the stage they stopped in; returns their run ids."""
    out = []
    for path in sorted((Path(artifacts_dir) / "runs").glob("*/summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if summary.get("status") != "running" or summary.get("run_id") == by:
            continue
        # on this host its PID tells (even when a Redis flush took the lease); elsewhere its lease
        same_host = summary.get("host") == socket.gethostname()
        if not (holder_dead(summary) if same_host else not run_alive(stores, str(summary.get("run_id")))):
            continue
        summary["status"] = "killed"
        summary["stopped_at"] = stopped_at(summary)
        summary["error"] = (f"the run died without finishing (SIGKILL, out of memory or power loss) during stage "
                            f"{summary['stopped_at']!r}; found by run {by}")
        for rec in summary.get("stages", []):
            if rec.get("status") == "running":
                rec["status"] = "killed"
        write_json_atomic(path, summary)
        out.append(str(summary.get("run_id")))
    return out


def stopped_at(summary: dict[str, Any]) -> str | None:
    """The stage a run stopped in: the last one not finished ok (or the last one)."""
    stages = summary.get("stages") or []
    for rec in reversed(stages):
        if rec.get("status") != "ok":
            return rec.get("stage")
    return stages[-1]["stage"] if stages else None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a kill mid-write) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)
