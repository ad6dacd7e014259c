"""`python -m trainer schedule`: run the nightly job every day at HH:MM local time.

Runs once at start when nothing is published yet (no `current` features version). Each run is a child
process (`python -m trainer nightly`), so a crash or memory spike never takes the scheduler down; a
failed run is logged and the schedule goes on. SIGTERM/SIGINT stop it cleanly (a running child is
terminated; publishing is atomic, so the previous versions keep serving).
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
from common.publish import current_version
from common.redis_conn import RedisStores
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

TICK_S = 0.5  # how often the sleeping scheduler checks for a stop signal


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


def nothing_published(settings: Settings) -> bool:
    """True when no features version is current (a fresh Redis)."""
    stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
    try:
        return current_version(stores, FEATURES_CHANNEL) is None
    finally:
        stores.close()


class Scheduler:
    """The daily loop; `stop()` (called from the signal handler) ends it at the next tick."""

    def __init__(self, settings: Settings, at: str, data: Path | None):
        self.settings, self.hm, self.data = settings, parse_at(at), data
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.runs = 0
        self.failures = 0

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
        env = {**os.environ, "REDIS_URL": self.settings.redis_url or "",
               "ARTIFACTS_DIR": str(self.settings.artifacts_dir), "CHANNELS_CONFIG": str(self.settings.channels_config)}
        log.info("nightly run %d: starting %s", self.runs, " ".join(self.command()))
        t = time.monotonic()
        self.child = subprocess.Popen(self.command(), env=env)
        try:
            while True:
                try:
                    rc = self.child.wait(timeout=TICK_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.stopping:
                        log.warning("stopping: terminating the running nightly (previous versions keep serving)")
                        self.child.terminate()
                        try:
                            self.child.wait(30)
                        except subprocess.TimeoutExpired:
                            self.child.kill()
                            self.child.wait()
                        return None
        finally:
            self.child = None
        if rc == 0:
            log.info("nightly run %d: ok in %.1fs", self.runs, time.monotonic() - t)
        else:
            self.failures += 1
            log.error("nightly run %d: failed with exit code %d after %.1fs; the schedule goes on (see its "
                      "summary under %s/runs/)", self.runs, rc, time.monotonic() - t, self.settings.artifacts_dir)
        return rc

    def sleep_until(self, when: datetime) -> bool:
        """Sleep until `when` (local time); False if stopped first."""
        while not self.stopping:
            left = (when - datetime.now()).total_seconds()
            if left <= 0:
                return True
            time.sleep(min(TICK_S, left))
        return False

    def loop(self, run_now_if_empty: bool) -> int:
        if run_now_if_empty and not self.stopping:
            try:
                empty = nothing_published(self.settings)
            except Exception as exc:  # Redis down at start: say so, keep the schedule
                log.error("cannot check for published features (%s: %s); waiting for the scheduled run",
                          type(exc).__name__, exc)
                empty = False
            if empty:
                log.info("nothing published yet: running the nightly job now")
                self.run_once()
            else:
                log.info("features already published: waiting for the first scheduled run")
        while not self.stopping:
            when = next_run(self.hm, datetime.now())
            log.info("next nightly run at %s (local time)", when.strftime("%Y-%m-%d %H:%M"))
            if not self.sleep_until(when):
                break
            self.run_once()
        log.info("scheduler stopped after %d run(s), %d failed", self.runs, self.failures)
        return 0


def run_schedule(at: str, data: Path | None, run_now_if_empty: bool) -> int:
    """CLI entry: returns 0 when stopped by a signal, 2 on bad input (time format, no Redis URL)."""
    settings = get_settings()
    try:
        sched = Scheduler(settings, at, data if data is not None else settings.data_dir)
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
