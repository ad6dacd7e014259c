"""The nightly job and the scheduler, end to end against a real Redis on small synthetic logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from common.channel_config import load_config
from common.ids import load_id_map
from common.keyspace import FEATURES_CHANNEL, unpack_json, unpack_neighbors, unpack_vector
from common.publish import collect_garbage, current_version, read_manifest
from common.settings import get_settings
from trainer.nightly import run_nightly, run_nightly_cli
from trainer.publishing import nn_store
from trainer.schedule import next_run, parse_at

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = """
merge: {normalize: rank, rank_offset: 20}
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 50}
  itemcf: {kind: i2i, model: itemcf, weight: 1.0, quota: 100}
  usercf: {kind: u2u, model: usercf, weight: 0.5, quota: 50, params: {top_k: 20}}
  mf: {kind: u2i, model: mf, weight: 1.0, quota: 100, params: {dim: 8, epochs: 3, top_k: 20}}
  mf_i2i: {kind: i2i, from: mf, weight: 0.3, quota: 50}
  fm: {kind: u2i, model: fm, weight: 0.5, quota: 50, enabled: false}
"""
PUBLISHED = ["popular", "itemcf", "usercf", "mf"]  # mf_i2i is served from mf's version; fm is disabled


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny"), n_users=300, n_items=200, n_clicks=6000, progress=False)


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory) -> Path:
    """Large enough that publishing takes a noticeable moment (the kill test aims inside it)."""
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("bigger"), n_users=20_000, n_items=2_000, n_clicks=120_000,
                           progress=False)


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "channels.yaml"
    p.write_text(TINY_CONFIG)
    return p


def sample_keys(stores, cfg_path: Path) -> dict[str, tuple[str, str]]:
    """One (store, key) per published channel/kind of the current versions, read through the keyspace."""
    ks, cfg = stores.keyspace, load_config(cfg_path)
    out = {}
    fv = current_version(stores, FEATURES_CHANNEL)
    users = load_id_map(stores, "user")
    out["features"] = ("user_features", ks.user_features(fv, users.ids[0]))
    for name in PUBLISHED:
        ver = current_version(stores, name)
        man = read_manifest(stores, name)
        spec = cfg.get(name)
        if "list" in man["kinds"]:
            out[name] = ("lists", ks.item_list(name, ver, "global"))
        if "i2i" in man["kinds"]:
            store = nn_store(spec, "i2i")
            row = next(int(k.decode().rsplit(":", 1)[1]) for k in stores(store).scan_iter(
                match=ks.version_pattern(store, name, ver), count=1000))
            out[name + ":i2i"] = (store, ks.i2i(store, name, ver, row))
        if "u2u" in man["kinds"]:
            store = nn_store(spec, "u2u")
            key = next(iter(stores(store).scan_iter(match=ks.version_pattern(store, name, ver), count=1000))).decode()
            out[name + ":u2u"] = (store, key)
        if "u2i" in man["kinds"]:
            out[name + ":u2i"] = ("item_emb", ks.item_vector(name, ver, 0))
    return out


def assert_readable(stores, keys: dict[str, tuple[str, str]]) -> None:
    for what, (store, key) in keys.items():
        value = stores(store).get(key)
        assert value is not None, f"{what}: {key} missing in {store}"
        if store == "item_emb":
            assert len(unpack_vector(value)) == 8
        elif store in ("user_features",):
            assert isinstance(unpack_json(value), dict)
        else:
            assert len(unpack_neighbors(value)[0]) > 0, f"{what}: empty list"


def currents(stores) -> dict[str, str | None]:
    return {c: current_version(stores, c) for c in [FEATURES_CHANNEL, *PUBLISHED]}


def test_nightly_publishes_every_enabled_channel_and_features(settings, stores, tiny_data, config):
    summary = run_nightly(settings, tiny_data, config, progress=False)
    assert summary["status"] == "ok", summary["failed"]
    assert set(summary["versions"]) == {FEATURES_CHANNEL, *PUBLISHED}
    assert summary["channels_planned"] == PUBLISHED
    cur = currents(stores)
    assert cur == summary["versions"]
    assert current_version(stores, "fm") is None  # disabled: not trained
    man = read_manifest(stores, "mf")
    assert sorted(man["kinds"]) == ["i2i", "u2i"] and man["fit_s"] > 0 and man["run_id"] == summary["run_id"]
    # id maps published and consistent with the data
    assert len(load_id_map(stores, "user")) == summary["counts"]["n_users"] > 250
    assert len(load_id_map(stores, "item")) == summary["counts"]["n_items"]
    assert_readable(stores, sample_keys(stores, config))
    # the summary on disk: every stage, timings and peak memory
    path = Path(summary["summary_path"])
    assert path.parent.parent == settings.artifacts_dir / "runs"
    on_disk = json.loads(path.read_text())
    stages = [s["stage"] for s in on_disk["stages"]]
    assert [s for s in stages if s != "events"][:6] == ["config", "redis", "lock", "load", "ids", "features"]
    assert [s for s in stages if ":" in s] == [f"{a}:{c}" for c in PUBLISHED for a in ("fit", "publish")]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in on_disk["stages"])
    assert on_disk["peak_rss_mb"] > 0 and "numpy" in on_disk["versions_of_libraries"]


def test_second_run_publishes_new_versions_old_ones_readable_until_gc(settings, stores, tiny_data, config):
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    first, old_keys = currents(stores), sample_keys(stores, config)
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    second = currents(stores)
    assert all(second[c] != first[c] for c in first)
    assert_readable(stores, old_keys)  # grace period: old versions still answer
    assert_readable(stores, sample_keys(stores, config))
    for c in first:
        collect_garbage(stores, c, grace_s=0, keep=1)
    for what, (store, key) in old_keys.items():
        assert stores(store).get(key) is None, f"{what}: old version not collected"
    assert currents(stores) == second
    assert_readable(stores, sample_keys(stores, config))


def test_killed_nightly_leaves_previous_versions_serving(settings, stores, tiny_data, bigger_data, config):
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    before, keys = currents(stores), sample_keys(stores, config)
    # one channel after another: the order asserted below (a kill with 2 workers: tests/test_nightly_parallel.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NIGHTLY_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "nightly", "--data", str(bigger_data), "--config",
                             str(config), "--redis-url", settings.redis_url, "--artifacts", str(settings.artifacts_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = stores("meta")
    pending_keys = [stores.keyspace.pending(c) for c in before]
    killed_in = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            pipe = meta.pipeline(transaction=False)
            for k in pending_keys:
                pipe.zcard(k)
            sizes = pipe.execute()
            if any(sizes):
                proc.send_signal(signal.SIGKILL)
                killed_in = [c for c, n in zip(before, sizes, strict=True) if n][0]
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and killed_in is None:
            proc.kill()
        proc.wait(30)
    assert killed_in is not None, "the nightly finished before a pending version was seen"
    assert proc.returncode == -signal.SIGKILL
    after = currents(stores)
    # the channel being written keeps its previous version; every current version is complete and readable
    assert after[killed_in] == before[killed_in]
    pending = [v.decode() for v in meta.zrange(stores.keyspace.pending(killed_in), 0, -1)]
    assert pending and pending[0] not in (before[killed_in], None)
    for c, v in after.items():
        assert v is not None and read_manifest(stores, c, v) is not None
        if v == before[c]:
            assert c == killed_in or list(after).index(c) > list(after).index(killed_in)
    assert_readable(stores, keys)
    # the abandoned version is garbage at once: its writer's process is gone (its lease names a dead PID), no
    # need to wait for the pending TTL; serving is untouched
    collect_garbage(stores, killed_in)
    assert meta.zcard(stores.keyspace.pending(killed_in)) == 0
    assert current_version(stores, killed_in) == before[killed_in]
    assert_readable(stores, keys)


def _cli(settings, data: Path, config: Path) -> int:
    return run_nightly_cli(data=data, config=config, redis_url=settings.redis_url, artifacts=settings.artifacts_dir)


def test_bad_config_fails_clearly_without_touching_published(settings, stores, tiny_data, config, tmp_path, capsys):
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    before = currents(stores)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.replace("model: usercf", "model: usercf_v9"))
    assert _cli(settings, tiny_data, bad) == 2
    err = capsys.readouterr().err
    assert "stage 'config' failed" in err and "channel 'usercf'" in err and "key 'model'" in err
    bad.write_text(TINY_CONFIG.replace("params: {top_k: 20}", "params: {top_k: -1}"))
    assert _cli(settings, tiny_data, bad) == 2
    err = capsys.readouterr().err
    assert "channel 'usercf'" in err and "params.top_k" in err
    assert currents(stores) == before
    assert not any(stores("meta").zcard(stores.keyspace.pending(c)) for c in before)


def test_bad_data_fails_clearly_without_touching_published(settings, stores, tiny_data, config, tmp_path, capsys):
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    before = currents(stores)
    bad = tmp_path / "bad_data"
    bad.mkdir()
    (bad / "interactions.csv").write_text("user_id,item_id,timestamp\n1,2,1700000000\n1,3,yesterday-ish\n")
    assert _cli(settings, bad, config) == 2
    err = capsys.readouterr().err
    assert "stage 'load' failed" in err and "interactions.csv" in err and "'timestamp'" in err and "line 3" in err
    (bad / "interactions.csv").write_text("user,item_id,timestamp\n1,2,1700000000\n")
    assert _cli(settings, bad, config) == 2
    err = capsys.readouterr().err
    assert "interactions.csv" in err and "user_id" in err
    assert currents(stores) == before
    summaries = sorted((settings.artifacts_dir / "runs").glob("*/summary.json"))
    assert json.loads(summaries[-1].read_text())["status"] == "failed"


def test_failing_channel_is_named_and_the_others_still_publish(settings, stores, tiny_data, config, capsys):
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    before = currents(stores)
    config.write_text(TINY_CONFIG.replace("model: itemcf,", "model: itemcf, store: no_such_store,"))
    assert _cli(settings, tiny_data, config) == 1
    err = capsys.readouterr().err
    assert "stage 'publish:itemcf' failed" in err and "no_such_store" in err
    after = currents(stores)
    assert after["itemcf"] == before["itemcf"]  # still serving the previous version
    assert all(after[c] != before[c] for c in after if c != "itemcf")


def test_missing_redis_url_is_a_clear_error(monkeypatch, tmp_path, tiny_data, config, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env there
    get_settings.cache_clear()
    try:
        assert run_nightly_cli(data=tiny_data, config=config, redis_url=None, artifacts=None) == 2
    finally:
        get_settings.cache_clear()
    assert "set REDIS_URL or pass --redis-url" in capsys.readouterr().err


# ---- the scheduler ----------------------------------------------------------------------------------

def test_next_run_and_time_parsing():
    assert parse_at("02:00") == (2, 0) and parse_at(" 23:59 ") == (23, 59)
    for bad in ("2am", "24:00", "12:60", "12"):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_at(bad)
    now = datetime(2026, 3, 10, 1, 30, 15)
    assert next_run((2, 0), now) == datetime(2026, 3, 10, 2, 0)
    assert next_run((1, 30), now) == datetime(2026, 3, 11, 1, 30)  # the same minute, already started → tomorrow
    assert next_run((0, 0), datetime(2026, 12, 31, 23, 0)) == datetime(2027, 1, 1, 0, 0)


def _start_scheduler(tmp_path, settings, config, *args) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / "schedule.log"
    env = {**os.environ, "REDIS_URL": settings.redis_url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
           "CHANNELS_CONFIG": str(config), "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "schedule", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    return proc, log_path


def _wait_for(proc: subprocess.Popen, log_path: Path, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log_path.read_text()
        if text in out:
            return out
        assert proc.poll() is None, out[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged within {timeout}s:\n{log_path.read_text()[-3000:]}")


def test_scheduler_runs_when_empty_then_waits_and_stops_on_sigterm(settings, stores, tiny_data, config, tmp_path):
    at = f"{(datetime.now().hour + 12) % 24:02d}:00"
    proc, log_path = _start_scheduler(tmp_path, settings, config, "--at", at, "--data", str(tiny_data))
    try:
        text = _wait_for(proc, log_path, "next nightly run at")
        assert "nothing published yet" in text and "nightly run 1: ok" in text, text[-3000:]
        assert f"{at} (local time)" in text
        assert current_version(stores, FEATURES_CHANNEL) is not None
        assert all(current_version(stores, c) for c in PUBLISHED)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "scheduler stopped after 1 run(s), 0 failed" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_scheduler_does_not_run_when_already_published(settings, stores, tiny_data, config, tmp_path):
    assert run_nightly(settings, tiny_data, config, progress=False)["status"] == "ok"
    before = currents(stores)
    proc, log_path = _start_scheduler(tmp_path, settings, config, "--at", "03:00")
    try:
        text = _wait_for(proc, log_path, "next nightly run at", timeout=60)
        assert "already published" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert currents(stores) == before


def test_redis_down_fails_at_the_redis_stage(tmp_path, tiny_data, config):
    from common.settings import Settings

    s = Settings(redis_url="redis://127.0.0.1:1/0", artifacts_dir=tmp_path / "a")
    summary = run_nightly(s, tiny_data, config, progress=False)
    assert summary["status"] == "failed" and summary["versions"] == {}
    assert summary["failed"][0]["stage"] == "redis" and "unreachable" in summary["failed"][0]["error"]
    assert [st["stage"] for st in summary["stages"]] == ["config", "redis"]
