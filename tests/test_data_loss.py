"""Redis losing its data (docs/reliability.md, "Redis data loss"), for real: a running stack (three servers and the
scheduler) on a private Redis, FLUSHALL while /recall is under load. Answers keep coming from memory (degraded,
never empty, never an error), every /healthz says so (503 "degraded"), and the scheduler republishes the last good
versions from the artifacts on disk: the stack is whole again without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ROOT, TINY_CONFIG, ServerProcess, free_port

from common.archive import PUBLISHED, read_published, version_dirs
from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.local_redis import LocalRedis
from common.publish import current_version, missing_versions, read_manifest
from common.redis_conn import RedisStores
from common.settings import Settings
from trainer.nightly import run_nightly
from trainer.republish import republish

CHANNELS = ["popular", "itemcf", "mf"]  # what TINY_CONFIG trains (mf_i2i is served from mf)
SERVED = [FEATURES_CHANNEL, *CHANNELS]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("loss"), n_users=300, n_items=200, n_clicks=6000, seed=11,
                           progress=False)


@pytest.fixture
def published(tmp_path, data):
    """A private Redis with one nightly published (config TINY_CONFIG), artifacts under tmp_path."""
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(TINY_CONFIG)
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    settings = Settings(redis_url=server.url, artifacts_dir=tmp_path / "artifacts", channels_config=cfg,
                        run_dir=tmp_path / "run")
    assert run_nightly(settings, data, cfg, progress=False)["status"] == "ok"
    stores = RedisStores(server.url, Keyspace.from_settings(settings))
    try:
        yield settings, stores, server
    finally:
        stores.close()
        server.stop()


def test_republish_restores_the_same_versions_from_disk(published):
    settings, stores, server = published
    before = {c: current_version(stores, c) for c in SERVED}
    manifests = {c: read_manifest(stores, c) for c in CHANNELS}
    keys = redis.Redis.from_url(server.url).dbsize()
    assert missing_versions(stores, SERVED) == {}
    for c in SERVED:  # every published version is on disk, complete, with the digest of each file
        rec = read_published(version_dirs(settings.artifacts_dir / c)[0])
        assert rec is not None and rec["manifest"]["version"] == before[c] and rec["files"]

    redis.Redis.from_url(server.url).flushall()
    assert set(missing_versions(stores, SERVED)) == set(SERVED)
    report = republish(settings)
    assert report["failed"] == {} and report["restored"] == before
    assert missing_versions(stores, SERVED) == {}
    assert {c: current_version(stores, c) for c in SERVED} == before
    assert redis.Redis.from_url(server.url).dbsize() == keys  # db0: meta (pointers, manifests, id maps)
    for c in CHANNELS:
        m = read_manifest(stores, c)
        assert m["digests"] == manifests[c]["digests"] and m["republished"]["from"].endswith(before[c])

    # a store flushed on its own (current pointers intact) is noticed through the manifest's probe keys
    stores("itemcf_i2i").flushdb()
    assert set(missing_versions(stores, SERVED)) == {"itemcf"}
    assert republish(settings)["restored"] == {"itemcf": before["itemcf"]}
    assert missing_versions(stores, SERVED) == {}


def test_a_damaged_archive_is_skipped_for_the_previous_good_one(published, data):
    settings, stores, server = published
    first = current_version(stores, "itemcf")
    assert run_nightly(settings, data, settings.channels_config, progress=False)["status"] == "ok"
    newest = version_dirs(settings.artifacts_dir / "itemcf")[0]
    assert newest.name != first and (newest / PUBLISHED).exists()
    kv = next(newest.glob("*.kv"))
    raw = bytearray(kv.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit on disk
    kv.write_bytes(bytes(raw))
    redis.Redis.from_url(server.url).flushall()
    report = republish(settings)
    assert report["restored"]["itemcf"] == first  # the damaged newest one is never replayed
    assert missing_versions(stores, SERVED) == {}


def _health(url: str) -> tuple[int, dict]:
    r = httpx.get(url + "/healthz", timeout=5)
    return r.status_code, r.json()


def test_flush_under_load_answers_keep_coming_and_the_stack_heals(published, tmp_path):
    settings, stores, server = published
    before = {c: current_version(stores, c) for c in SERVED}
    ports = {"feature": free_port(), "vector": free_port(), "recall": free_port()}
    env = {**os.environ, "REDIS_URL": server.url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
           "CHANNELS_CONFIG": str(settings.channels_config), "OMP_NUM_THREADS": "1",
           "VECTOR_URL": f"http://127.0.0.1:{ports['vector']}", "FEATURE_URL": f"http://127.0.0.1:{ports['feature']}"}
    procs: dict[str, ServerProcess] = {}
    sched_log = tmp_path / "scheduler.log"
    at = f"{(time.localtime().tm_hour + 12) % 24:02d}:00"  # the daily run stays far away
    sched = subprocess.Popen([sys.executable, "-m", "trainer", "schedule", "--at", at, "--check-every", "1"],
                             cwd=ROOT, env=env, stdout=sched_log.open("wb"), stderr=subprocess.STDOUT)
    answers: list[tuple[int, int]] = []  # (status, number of items) of every /recall during the drill
    stop = threading.Event()
    try:
        for name in ("feature", "vector", "recall"):
            procs[name] = ServerProcess([f"services.{name}_server", "serve", "--port", str(ports[name])], env,
                                        ports[name], tmp_path / f"{name}.log").start()
        urls = {n: p.url for n, p in procs.items()}
        deadline = time.monotonic() + 60
        while not all(_health(u)[0] == 200 for u in urls.values()):  # (the vector server loads mf)
            assert time.monotonic() < deadline, {n: _health(u) for n, u in urls.items()}
            time.sleep(0.2)
        warm = httpx.get(urls["recall"] + "/recall", params={"user_id": "1", "k": 20}, timeout=10).json()
        assert warm["channels"]["itemcf"]["status"] == "ok" and warm["channels"]["mf"]["status"] == "ok"

        def load() -> None:
            with httpx.Client(base_url=urls["recall"], timeout=10) as c:
                i = 0
                while not stop.is_set():
                    r = c.get("/recall", params={"user_id": str(1 + i % 50), "k": 20})
                    answers.append((r.status_code, len(r.json().get("items", []))))
                    i += 1

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        while len(answers) < 20:
            time.sleep(0.05)
        t_flush = time.monotonic()
        redis.Redis.from_url(server.url).flushall()  # every key of every DB gone

        # every service says it is degraded: Redis lacks what it serves (live checks, right after the flush)
        degraded = {}
        deadline = time.monotonic() + 30
        while len(degraded) < 3 and time.monotonic() < deadline:
            for name, u in urls.items():
                status, body = _health(u)
                if status == 503 and body.get("status") == "degraded":
                    degraded.setdefault(name, body)
        assert set(degraded) == {"feature", "vector", "recall"}, degraded
        assert degraded["recall"]["missing"] and degraded["feature"]["missing"] == [FEATURES_CHANNEL]
        assert degraded["recall"]["versions"]["itemcf"] == before["itemcf"]  # still held in memory
        assert degraded["vector"]["channels"]["mf"]["version"] == before["mf"]
        during = len(answers)

        # ... until the scheduler has republished: whole again, same versions, no restart
        deadline = time.monotonic() + 90
        while not all(_health(u)[0] == 200 for u in urls.values()):
            assert time.monotonic() < deadline, (sched_log.read_text()[-3000:], {n: _health(u) for n, u in urls.items()})
            time.sleep(0.1)
        healed_s = time.monotonic() - t_flush
        while len(answers) < during + 20:
            time.sleep(0.05)
        stop.set()
        loader.join(30)
        after = httpx.get(urls["recall"] + "/recall", params={"user_id": "1", "k": 20}, timeout=10).json()
        assert after["versions"] == warm["versions"] and after["channels"]["itemcf"]["status"] == "ok"
        assert {c: current_version(stores, c) for c in SERVED} == before
        assert all(p.proc.poll() is None for p in procs.values())  # nothing restarted
        deadline = time.monotonic() + 30
        while "republish restored every published version" not in (text := sched_log.read_text()):
            assert time.monotonic() < deadline and sched.poll() is None, text[-3000:]
            time.sleep(0.1)
        assert "Redis is missing published versions" in text and "republishing from" in text
        assert "nightly run 1" not in text  # restored from disk: no retraining
        # answers kept coming through the whole drill: all 200, none empty
        assert answers and {s for s, _ in answers} == {200}, sorted({s for s, _ in answers})
        assert min(n for _, n in answers) > 0
        (tmp_path / "drill.json").write_text(json.dumps({"healed_s": healed_s, "answers": len(answers)}))
        print(f"flush → whole again in {healed_s:.1f}s; {len(answers)} answers, none empty")
    finally:
        stop.set()
        sched.terminate()
        sched.wait(30)
        for p in procs.values():
            p.stop()
