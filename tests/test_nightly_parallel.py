"""The nightly's local engine with several workers (NIGHTLY_WORKERS): channel jobs on a pool of threads publish
exactly what the sequential run publishes, a failing channel leaves the others publishing, every stage keeps its
record (cpu_s included), and SIGTERM stops every running job with the previous versions still serving. Real Redis,
real models, small synthetic logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_nightly import TINY_CONFIG  # the classic channels; this file adds the heavy ones

from common.publish import current_version, read_manifest
from common.settings import Settings
from trainer.nightly import run_nightly

ROOT = Path(__file__).resolve().parents[1]

# every kind of job: cheap and heavy, numpy/numba/gensim/implicit/faiss, and two models that draw from torch's
# process-wide generator (fm, two_tower: never at the same time)
CONFIG = TINY_CONFIG.replace("  fm: {kind: u2i, model: fm, weight: 0.5, quota: 50, enabled: false}\n", "") + """\
  item2vec: {kind: i2i, model: item2vec, weight: 0.3, quota: 50, params: {epochs: 2, dim: 8, top_k: 20}}
  fm: {kind: u2i, model: fm, weight: 0.5, quota: 50, params: {epochs: 1}}
  two_tower: {kind: u2i, model: two_tower, weight: 1.0, quota: 50, params: {epochs: 1, max_examples: 1000000}}
"""
CHANNELS = ["popular", "itemcf", "usercf", "mf", "item2vec", "fm", "two_tower"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("small"), n_users=400, n_items=250, n_clicks=8000, progress=False)


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "channels.yaml"
    p.write_text(CONFIG)
    return p


def _with(settings: Settings, workers: int) -> Settings:
    return settings.model_copy(update={"nightly_workers": workers})


def published(stores, summary: dict) -> dict[str, dict]:
    """Per channel: the digest and count of every artifact in Redis, and the arrays archived on disk."""
    out = {}
    for name in CHANNELS:
        man = read_manifest(stores, name, summary["versions"][name])
        arrays = {p.name: np.load(p) for p in sorted(Path(man["artifacts_dir"]).glob("*.npy"))}
        # a user tower's bytes hold torch's random serialization id: its state is compared through its vectors
        digests = {k: v for k, v in man["digests"].items() if k != "user_tower"}
        out[name] = {"digests": digests, "counts": man["counts"], "arrays": arrays}
    return out


def test_two_workers_publish_what_one_worker_publishes(settings, stores, small_data, config):
    one = run_nightly(_with(settings, 1), small_data, config, progress=False)
    cpu = time.process_time()
    two = run_nightly(_with(settings, 2), small_data, config, progress=False)
    cpu = time.process_time() - cpu
    assert one["status"] == two["status"] == "ok", (one["failed"], two["failed"])
    assert one["engine"] == {"name": "local", "workers": 1} and two["engine"] == {"name": "local", "workers": 2}
    a, b = published(stores, one), published(stores, two)
    for name in CHANNELS:
        assert a[name]["digests"] == b[name]["digests"] and a[name]["counts"] == b[name]["counts"], name
        assert a[name]["arrays"].keys() == b[name]["arrays"].keys()
        for f, arr in a[name]["arrays"].items():
            assert np.array_equal(arr, b[name]["arrays"][f]), (name, f)
    assert "user_vectors.npy" in a["two_tower"]["arrays"] and "digests" in read_manifest(stores, "itemcf")
    # every stage recorded, in the planned order, with its CPU seconds; the jobs overlapped
    for s in (one, two):
        stages = [r["stage"] for r in s["stages"]]
        assert [x for x in stages if ":" in x] == [f"{a}:{c}" for c in CHANNELS for a in ("fit", "publish")]
        assert all(r["status"] == "ok" and r["cpu_s"] >= 0 and r["seconds"] >= 0 and "start_s" in r
                   for r in s["stages"])
        assert list(s["channels"]) == CHANNELS and all(c["status"] == "ok" for c in s["channels"].values())
    on_disk = json.loads(Path(two["summary_path"]).read_text())
    assert on_disk["stages"] == two["stages"]
    span = {c: _span(two, c) for c in CHANNELS}
    assert any(_overlap(span[x], span[y]) for x in CHANNELS for y in CHANNELS if x < y)
    assert not _overlap(span["fm"], span["two_tower"])  # both draw from torch's global generator
    # per-thread CPU accounting: overlapping stages are not each charged the whole process's CPU
    assert 0.5 * cpu <= sum(r["cpu_s"] for r in two["stages"]) <= cpu + 0.05


def _span(summary: dict, channel: str) -> tuple[float, float]:
    recs = [r for r in summary["stages"] if r["stage"] in (f"fit:{channel}", f"publish:{channel}")]
    return recs[0]["start_s"], max(r["start_s"] + r["seconds"] for r in recs)


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_a_failing_channel_leaves_its_version_and_the_others_publish(settings, stores, small_data, config):
    first = run_nightly(_with(settings, 2), small_data, config, progress=False)
    assert first["status"] == "ok", first["failed"]
    # valid config, fails in fit: FunkSVD on clicks needs sampled negatives
    config.write_text(CONFIG.replace("params: {dim: 8, epochs: 3, top_k: 20}",
                                     "params: {dim: 8, epochs: 3, top_k: 20, algorithm: funksvd, num_negatives: 0}"))
    out = run_nightly(_with(settings, 2), small_data, config, progress=False)
    assert out["status"] == "failed" and [f["stage"] for f in out["failed"]] == ["fit:mf"]
    assert "num_negatives" in out["failed"][0]["error"]
    rec = {r["stage"]: r for r in out["stages"]}
    assert rec["fit:mf"]["status"] == "failed" and "cpu_s" in rec["fit:mf"] and "publish:mf" not in rec
    assert out["channels"]["mf"]["status"] == "failed"
    assert current_version(stores, "mf") == first["versions"]["mf"]  # still serving the previous version
    for c in CHANNELS:
        if c != "mf":
            assert current_version(stores, c) == out["versions"][c] != first["versions"][c], c
            assert rec[f"fit:{c}"]["status"] == rec[f"publish:{c}"]["status"] == "ok"


def test_sigterm_stops_every_running_job(settings, stores, small_data, config, tmp_path):
    first = run_nightly(_with(settings, 2), small_data, config, progress=False)
    assert first["status"] == "ok", first["failed"]
    slow = tmp_path / "slow.yaml"  # long fits: two_tower on one worker, mf then item2vec on the other
    slow.write_text(CONFIG.replace("epochs: 1, max_examples: 1000000", "epochs: 1000, max_examples: null")
                    .replace("epochs: 3, top_k: 20", "epochs: 1000, top_k: 20")
                    .replace("epochs: 2, dim: 8", "epochs: 1000, max_examples: null, dim: 8"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NIGHTLY_WORKERS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "nightly", "--data", str(small_data), "--config",
                             str(slow), "--redis-url", settings.redis_url, "--artifacts", str(settings.artifacts_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = settings.artifacts_dir / "runs"
    before = {p.parent for p in runs.glob("*/summary.json")}
    running: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None and len(running) < 2:
            new = [p for p in runs.glob("*/summary.json") if p.parent not in before]
            if new:
                try:
                    stages = json.loads(new[0].read_text())["stages"]
                except (OSError, ValueError):
                    stages = []
                running = [s["stage"] for s in stages if s["status"] == "running" and s["stage"].startswith("fit:")]
            time.sleep(0.05)
        assert len(running) == 2, "two fits were never seen running at once"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    summary = json.loads(new[0].read_text())
    assert summary["status"] == "killed" and "SIGTERM" in summary["error"]
    killed = [s for s in summary["stages"] if s["status"] == "killed"]
    assert "fit:two_tower" in {s["stage"] for s in killed} and all("SIGTERM" in s["error"] for s in killed)
    assert not any(s["status"] == "running" for s in summary["stages"])
    for s in killed:  # killed mid-stage: the previous version keeps serving
        c = s["stage"].split(":", 1)[1]
        assert current_version(stores, c) == first["versions"][c]
    assert not any(stores("meta").zcard(stores.keyspace.pending(c)) for c in CHANNELS)
    assert not stores("meta").exists(stores.keyspace.job_lock())  # released
