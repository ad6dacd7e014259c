"""Killed jobs (docs/reliability.md, "Killed jobs"), for real: a nightly subprocess killed with SIGKILL mid-stage
leaves its summary on disk saying where it stopped, and the next job cleans up everything it left at its start;
only one nightly runs at a time; SIGTERM leaves a "killed" summary and no pending version; the artifact directories
on disk follow Redis's retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_CONFIG

from common.archive import PUBLISHED, version_dirs
from common.keyspace import FEATURES_CHANNEL
from common.publish import current_version
from trainer.nightly import run_nightly, run_nightly_cli

CHANNELS = ["popular", "itemcf", "mf"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("small"), n_users=300, n_items=200, n_clicks=6000, seed=2,
                           progress=False)


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> Path:
    """Large enough that a nightly spends a moment in each stage (the tests stop it inside one)."""
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("larger"), n_users=8000, n_items=1500, n_clicks=60_000, seed=3,
                           progress=False)


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "channels.yaml"
    p.write_text(TINY_CONFIG)
    return p


def start_nightly(settings, data: Path, config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "nightly", "--data", str(data), "--config", str(config),
                             "--redis-url", settings.redis_url, "--artifacts", str(settings.artifacts_dir)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def summaries(settings) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (settings.artifacts_dir / "runs").glob("*/summary.json")}


def version_keys(stores, channel: str, version: str) -> int:
    ks = stores.keyspace
    return sum(len(list(stores(s).scan_iter(match=ks.version_pattern(s, channel, version), count=5000)))
               for s in ks.stores if s != "meta")


def test_sigkill_mid_stage_leaves_a_summary_and_the_next_job_cleans_up(settings, stores, small, larger, config,
                                                                       tmp_path):
    assert run_nightly(settings, small, config, progress=False)["status"] == "ok"
    before = {c: current_version(stores, c) for c in [FEATURES_CHANNEL, *CHANNELS]}
    meta, ks = stores("meta"), stores.keyspace
    data_stores = sorted({s for s in ks.stores if s != "meta"}, key=ks.db)
    baseline = sum(stores(s).dbsize() for s in data_stores)
    proc = start_nightly(settings, larger, config, tmp_path / "killed.log")
    killed_in = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # kill -9 while a version is being written
            pipe = meta.pipeline(transaction=False)
            for c in before:
                pipe.zcard(ks.pending(c))
            sizes = pipe.execute()
            if any(sizes) and sum(stores(s).dbsize() for s in data_stores) > baseline + 100:
                proc.send_signal(signal.SIGKILL)
                killed_in = [c for c, n in zip(before, sizes, strict=True) if n][0]
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and killed_in is None:
            proc.kill()
        proc.wait(30)
    assert killed_in is not None and proc.returncode == -signal.SIGKILL
    (orphan,) = [v.decode() for v in meta.zrange(ks.pending(killed_in), 0, -1)]
    assert version_keys(stores, killed_in, orphan) > 0
    killed_run = [s for s in summaries(settings).values() if s["status"] == "running"]
    assert len(killed_run) == 1  # written as each stage started: the stage it died in is on disk
    stages = killed_run[0]["stages"]
    assert stages[-1]["status"] == "running" and stages[-1]["stage"] in (killed_in, f"publish:{killed_in}")
    died_in = stages[-1]["stage"]
    assert (settings.artifacts_dir / killed_in / orphan).is_dir()  # its unfinished directory on disk
    assert not (settings.artifacts_dir / killed_in / orphan / PUBLISHED).exists()
    assert {c: current_version(stores, c) for c in before} == before  # the previous versions serve on

    # the next job, at its start: the dead run's pending version, its keys and its directory are gone, and its
    # summary says it was killed and where
    summary = run_nightly(settings, small, config, progress=False)
    assert summary["status"] == "ok"
    assert summary["cleanup"]["versions"] == {killed_in: [orphan]}
    assert version_keys(stores, killed_in, orphan) == 0 and meta.zcard(ks.pending(killed_in)) == 0
    assert not (settings.artifacts_dir / killed_in / orphan).exists()
    dead = summaries(settings)[killed_run[0]["run_id"]]
    assert dead["status"] == "killed" and dead["stopped_at"] == died_in and summary["run_id"] in dead["error"]
    assert summary["cleanup"]["summaries_marked_killed"] == [killed_run[0]["run_id"]]


def test_one_nightly_at_a_time_and_sigterm_leaves_a_killed_summary(settings, stores, small, larger, config, tmp_path,
                                                                   capsys):
    assert run_nightly(settings, small, config, progress=False)["status"] == "ok"
    before = {c: current_version(stores, c) for c in [FEATURES_CHANNEL, *CHANNELS]}
    meta, ks = stores("meta"), stores.keyspace
    proc = start_nightly(settings, larger, config, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while meta.get(ks.job_lock()) is None:  # the first run holds the lock: freeze it there
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        holder = json.loads(meta.get(ks.job_lock()))
        assert holder["pid"] == proc.pid and holder["kind"] == "nightly"

        # a second nightly refuses to run: exit code 3, a message naming the running one, nothing touched
        assert run_nightly_cli(small, config, settings.redis_url, settings.artifacts_dir) == 3
        err = capsys.readouterr().err
        assert f"another nightly is running (run {holder['run_id']}, pid {proc.pid}" in err
        assert {c: current_version(stores, c) for c in before} == before

        proc.send_signal(signal.SIGTERM)  # delivered when it resumes, inside whatever stage it was in
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
    first = summaries(settings)[holder["run_id"]]
    assert first["status"] == "killed" and first["error"] == "killed by SIGTERM"
    assert first["stopped_at"] == [s for s in first["stages"] if s["status"] == "killed"][0]["stage"]
    assert all(meta.zcard(ks.pending(c)) == 0 for c in before)  # it dropped what it had pending on the way out
    assert meta.get(ks.job_lock()) is None and not meta.exists(ks.run_lease(holder["run_id"]))
    assert {c: current_version(stores, c) for c in before} == before
    assert run_nightly(settings, small, config, progress=False)["status"] == "ok"  # the lock is free again


def test_disk_artifacts_follow_redis_retention(settings, stores, small, config):
    settings = settings.model_copy(update={"version_grace_s": 0.0, "keep_versions": 2})
    for _ in range(4):
        assert run_nightly(settings, small, config, progress=False)["status"] == "ok"
    meta, ks = stores("meta"), stores.keyspace
    for c in [FEATURES_CHANNEL, *CHANNELS]:
        in_redis = sorted(v.decode() for v in meta.zrange(ks.versions(c), 0, -1))
        on_disk = sorted(d.name for d in version_dirs(settings.artifacts_dir / c))
        assert len(in_redis) == 2 and on_disk == in_redis, (c, on_disk, in_redis)


def test_a_signal_while_the_lease_starts_still_releases_the_lock(stores, monkeypatch):
    """SIGTERM can land right after the lock is taken, before the heartbeat thread runs (the test above froze a
    run exactly there once): releasing must not fail on the unstarted thread, and the lock must go."""
    import threading

    from trainer.runs import RunLease

    def interrupted(self):
        raise KeyboardInterrupt  # what the signal handler raises in the main thread at that point

    lease = RunLease(stores, "sigtest", "nightly")
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lease.acquire()
    assert stores("meta").get(stores.keyspace.job_lock()) is not None  # taken before the signal
    lease.release()
    assert stores("meta").get(stores.keyspace.job_lock()) is None
    assert stores("meta").get(stores.keyspace.run_lease("sigtest")) is None
