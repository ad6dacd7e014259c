"""`python -m trainer schedule`: run the nightly job every day at HH:MM local time.

Runs once at start when nothing is published yet (no `current` features version). Each run is a child
process (`python -m trainer nightly`), so a crash or memory spike never takes the scheduler down; a
failed run is logged and the schedule goes on. SIGTERM/SIGINT stop it cleanly (a running child is
terminated; publishing is atomic, so the previous versions keep serving).

Self-healing (docs/reliability.md): every `check_s` it checks that Redis still holds every published version
(common.publish.missing_versions); when Redis lost some (flushed, restarted without persistence), it runs
`python -m trainer republish` (seconds, from the artifacts on disk), and the nightly job when the disk cannot
restore them (backing off while that nightly keeps failing).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.publish import missing_versions
from common.redis_conn import RedisStores
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

TICK_S = 0.5  # how often the sleeping scheduler checks for a stop signal
HEAL_BACKOFF_S = (300.0, 6 * 3600.0)  # a healing nightly that failed is retried after 5 min, doubling up to 6 h


def parse_at(at: str) -> tuple[int, int]:
    """'HH:MM' → (hour, minute); ValueError naming the value otherwise."""
    try:
        hh, mm = at.strip().split(":")
        h, m = int(hh), int(mm)
    except ValueError:
        raise ValueError(f"--at must be HH:MM (24-hour local time), got {at!r}") from None
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError(f"--at must be HH:MM with 00 ≤ HH ≤ 23 and 00 ≤ MM ≤ 59, got {at!r}")
    return h, m


def next_run(hm: tuple[int, int], now: datetime) -> datetime:
    """The next HH:MM strictly after `now` (today or tomorrow), in `now`'s (local) time."""
    cand = now.replace(hour=hm[0], minute=hm[1], second=0, microsecond=0)
    return cand if cand > now else cand + timedelta(days=1)


class Scheduler:
    """The daily loop; `stop()` (called from the signal handler) ends it at the next tick."""

    def __init__(self, settings: Settings, at: str, data: Path | None, check_s: float = 10.0):
        self.settings, self.hm, self.data, self.check_s = settings, parse_at(at), data, check_s
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.runs = 0
        self.failures = 0
        self.republishes = 0
        self._heal_backoff = 0.0
        self._heal_nightly_at = 0.0  # monotonic time before which a failed healing nightly is not retried
        self._next_incremental: float | None = None  # monotonic time of the next incremental update

    def stop(self, signum: int | None = None, _frame=None) -> None:
        if not self.stopping:
            log.info("received %s: stopping the scheduler", signal.Signals(signum).name if signum else "stop")
        self.stopping = True

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "trainer", "nightly"]
        if self.data is not None:
            cmd += ["--data", str(self.data)]
        return cmd

    def run_once(self) -> int | None:
        """One nightly run in a child process; returns its exit code (None if stopped)."""
        self.runs += 1
        log.info("nightly run %d: starting %s", self.runs, " ".join(self.command()))
        t = time.monotonic()
        rc = self._child(self.command())
        if rc is None:
            return None
        if rc == 0:
            log.info("nightly run %d: ok in %.1fs", self.runs, time.monotonic() - t)
        else:
            self.failures += 1
            log.error("nightly run %d: failed with exit code %d after %.1fs; the schedule goes on (see its "
                      "summary under %s/runs/)", self.runs, rc, time.monotonic() - t, self.settings.artifacts_dir)
        return rc

    def _child(self, cmd: list[str]) -> int | None:
        """Run `cmd` as a child process until it exits (its exit code) or the scheduler stops (None)."""
        env = {**os.environ, "REDIS_URL": self.settings.redis_url or "",
               "ARTIFACTS_DIR": str(self.settings.artifacts_dir), "CHANNELS_CONFIG": str(self.settings.channels_config)}
        self.child = subprocess.Popen(cmd, env=env)
        try:
            while True:
                try:
                    rc = self.child.wait(timeout=TICK_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.stopping:
                        log.warning("stopping: terminating the running job (previous versions keep serving)")
                        self.child.terminate()
                        try:
                            self.child.wait(30)
                        except subprocess.TimeoutExpired:
                            self.child.kill()
                            self.child.wait()
                        return None
        finally:
            self.child = None
        return rc

    # -- self-healing ----------------------------------------------------------------------------
    def served(self) -> list[str]:
        """The features and every channel the config trains: what must be in Redis."""
        from common.channel_config import load_config
        from trainer.nightly import channels_to_train

        return [FEATURES_CHANNEL, *(s.name for s in channels_to_train(load_config(self.settings.channels_config)))]

    def missing(self) -> dict[str, str]:
        stores = RedisStores(self.settings.redis_url, Keyspace.from_settings(self.settings), socket_timeout=5)
        try:
            return missing_versions(stores, self.served())
        finally:
            stores.close()

    def heal(self, at_start: bool = False) -> bool:
        """When Redis lacks published versions: republish them from disk, else run the nightly. True when nothing is
        missing (any more)."""
        try:
            missing = self.missing()
        except Exception as exc:  # Redis down (or the config unreadable): say so, check again later
            log.error("cannot check the published versions (%s: %s); checking again in %.0fs", type(exc).__name__,
                      exc, self.check_s)
            return False
        if not missing:
            if at_start:
                log.info("features already published: waiting for the first scheduled run")
            return True
        from trainer.republish import archived_channels

        if archived_channels(Path(self.settings.artifacts_dir)):
            self.republishes += 1
            log.warning("Redis is missing published versions (%s): republishing from %s",
                        "; ".join(f"{c}: {why}" for c, why in missing.items()), self.settings.artifacts_dir)
            t = time.monotonic()
            rc = self._child([sys.executable, "-m", "trainer", "republish"])
            if rc is None:
                return False
            if rc == 3:
                log.warning("another nightly or republish is running: checking again in %.0fs", self.check_s)
                return False
            missing = self.missing()
            if not missing:
                log.info("republish restored every published version in %.1fs", time.monotonic() - t)
                return True
            log.warning("still missing after the republish (%s): the nightly job rebuilds them",
                        "; ".join(f"{c}: {why}" for c, why in missing.items()))
        elif FEATURES_CHANNEL in missing:
            log.info("nothing published yet: running the nightly job now")
        else:
            log.warning("Redis is missing published versions (%s) and nothing on disk restores them: running the "
                        "nightly job now", "; ".join(f"{c}: {why}" for c, why in missing.items()))
        if time.monotonic() < self._heal_nightly_at:
            return False
        rc = self.run_once()
        if rc == 0:
            self._heal_backoff = 0.0
            return True
        if rc is not None:
            lo, hi = HEAL_BACKOFF_S
            self._heal_backoff = min(hi, max(lo, 2 * self._heal_backoff))
            self._heal_nightly_at = time.monotonic() + self._heal_backoff
            log.error("the healing nightly failed: next try in %.0f min (or at the scheduled run)",
                      self._heal_backoff / 60)
        return False

    def sleep_until(self, when: datetime) -> bool:
        """Sleep until `when` (local time), healing every `check_s`; False if stopped first."""
        next_check = time.monotonic() + self.check_s
        while not self.stopping:
            left = (when - datetime.now()).total_seconds()
            if left <= 0:
                return True
            if time.monotonic() >= next_check:
                self.heal()
                next_check = time.monotonic() + self.check_s
                continue
            if self.incremental_due():
                self.run_incremental()
                continue
            time.sleep(min(TICK_S, left))
        return False

    # -- incremental updates between nightlies (INCREMENTAL_EVERY_MIN; docs/event_log.md) ---------------------
    def incremental_due(self) -> bool:
        """Whether an incremental update is due (the first one INCREMENTAL_EVERY_MIN after the scheduler starts)."""
        every = 60.0 * self.settings.incremental_every_min
        if every <= 0:
            return False
        if self._next_incremental is None:
            self._next_incremental = time.monotonic() + every
        return time.monotonic() >= self._next_incremental

    def run_incremental(self) -> int | None:
        """`python -m trainer incremental` in a child process (never while a nightly runs: the scheduler runs one
        job at a time, and the job lock keeps other writers out); its exit code, None if stopped."""
        self._next_incremental = time.monotonic() + 60.0 * self.settings.incremental_every_min
        cmd = [sys.executable, "-m", "trainer", "incremental"]
        if self.data is not None:
            cmd += ["--data", str(self.data)]
        t = time.monotonic()
        rc = self._child(cmd)
        if rc == 0:
            log.info("incremental update: ok in %.1fs", time.monotonic() - t)
        elif rc == 3:
            log.info("incremental update skipped: another job holds the job lock")
        elif rc is not None:
            log.error("incremental update failed with exit code %d after %.1fs; the schedule goes on", rc,
                      time.monotonic() - t)
        return rc

    def loop(self, run_now_if_empty: bool) -> int:
        if run_now_if_empty and not self.stopping:
            self.heal(at_start=True)
        while not self.stopping:
            when = next_run(self.hm, datetime.now())
            log.info("next nightly run at %s (local time)", when.strftime("%Y-%m-%d %H:%M"))
            if not self.sleep_until(when):
                break
            self.run_once()
        log.info("scheduler stopped after %d run(s), %d failed (%d republish(es))", self.runs, self.failures,
                 self.republishes)
        return 0


def run_schedule(at: str, data: Path | None, run_now_if_empty: bool, check_s: float = 10.0) -> int:
    """CLI entry: returns 0 when stopped by a signal, 2 on bad input (time format, no Redis URL)."""
    settings = get_settings()
    try:
        if not check_s > 0:
            raise ValueError(f"--check-every must be a positive number of seconds, got {check_s}")
        sched = Scheduler(settings, at, data if data is not None else settings.data_dir, check_s)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not settings.redis_url:
        print("error: no Redis configured: set REDIS_URL (`make up` starts a local one)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, sched.stop)
    signal.signal(signal.SIGINT, sched.stop)
    try:
        return sched.loop(run_now_if_empty)
    except Exception as exc:  # Redis unreachable at start, etc.
        log.error("scheduler failed: %s: %s", type(exc).__name__, exc)
        return 1
