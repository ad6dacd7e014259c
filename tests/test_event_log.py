"""The event log (docs/event_log.md) over real HTTP and real Redis: exactly-once appends from concurrent clients, the
nightly folding them, a consumer killed mid-read, Redis restarted with persistence, the bound, the export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
import redis
from conftest import ROOT

from common.keyspace import Keyspace
from common.local_redis import find_redis_server, free_port, wait_for_redis
from common.redis_conn import RedisStores
from common.settings import Settings
from trainer.data.io import load_dataset
from trainer.data.train_data import TrainData
from trainer.event_log import (
    NIGHTLY,
    EventArchive,
    append_events,
    archive_dir,
    archive_new_events,
    history,
    log_length,
    read_entries,
    read_frame,
    read_offset,
)
from trainer.nightly import run_nightly

T0 = 1_709_251_200
CLIENTS, PER_CLIENT, BATCH = 20, 500, 50
POPULAR_ONLY = "channels:\n  popular: {kind: list, model: popular, quota: 50}\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny"), n_users=100, n_items=80, n_clicks=1500, progress=False)


def client_events(c: int) -> list[dict]:
    """Client c's events: distinct (user, item) pairs, new ids, every event type and some context."""
    kinds = ["click", "like", "cart", "purchase"]
    return [{"user_id": f"c{c}", "item_id": f"e{k}", "timestamp": T0 + 100_000 + k, "event": kinds[k % 4],
             "environment": "app" if k % 2 else None, "region": str(k % 7)} for k in range(PER_CLIENT)]


def post_all(url: str, c: int) -> int:
    events = client_events(c)
    with httpx.Client(base_url=url, timeout=30) as http:
        for b0 in range(0, len(events), BATCH):
            r = http.post("/events", json=events[b0:b0 + BATCH])
            assert r.status_code == 200, r.text
    return len(events)


def test_concurrent_clients_reach_the_log_and_the_nightly_exactly_once(settings, stores, start_server, tiny_data,
                                                                       tmp_path):
    server = start_server(["services.feature_server", "serve"])
    with ThreadPoolExecutor(CLIENTS) as pool:
        assert sum(pool.map(lambda c: post_all(server.url, c), range(CLIENTS))) == CLIENTS * PER_CLIENT

    logged = read_frame(stores)
    assert len(logged) == log_length(stores) == CLIENTS * PER_CLIENT
    assert not logged.duplicated(["user_id", "item_id"]).any()  # each event exactly once
    assert logged["log_id"].is_unique
    sent = pd.DataFrame([e for c in range(CLIENTS) for e in client_events(c)])
    got = logged.set_index(["user_id", "item_id"]).loc[list(zip(sent["user_id"], sent["item_id"], strict=True))]
    assert got["timestamp"].tolist() == sent["timestamp"].tolist()
    assert got["event"].tolist() == sent["event"].tolist()
    assert got["environment"].tolist() == sent["environment"].fillna("").tolist()
    # the real-time state moved in the same step as the log
    assert int(stores("user_features").hget(stores.keyspace.realtime_counters("c3"), "clicks")) == PER_CLIENT

    cfg = tmp_path / "channels.yaml"
    cfg.write_text(POPULAR_ONLY)
    base = TrainData.from_frame(load_dataset(tiny_data).interactions)
    summary = run_nightly(settings, data_dir=tiny_data, config_path=cfg, progress=False)
    assert summary["status"] == "ok", summary["failed"]
    assert summary["events"]["folded"] == CLIENTS * PER_CLIENT
    assert summary["counts"]["n_interactions"] == len(base.item_idx) + CLIENTS * PER_CLIENT
    assert summary["counts"]["new_users"] >= CLIENTS and summary["counts"]["new_items"] >= PER_CLIENT
    # archived on disk, offset committed, the stream emptied up to it (the entry at the offset may stay)
    assert read_offset(stores, NIGHTLY) == logged["log_id"].iloc[-1]
    assert log_length(stores) <= 1
    assert len(EventArchive(archive_dir(settings)).load()) == CLIENTS * PER_CLIENT

    # the next nightly folds nothing new but still trains on every archived event
    again = run_nightly(settings, data_dir=tiny_data, config_path=cfg, progress=False)
    assert again["events"]["folded"] == 0 and again["events"]["total"] == CLIENTS * PER_CLIENT
    assert again["counts"]["n_interactions"] == summary["counts"]["n_interactions"]


KILLED_CONSUMER = """
import os, signal, sys
from common.keyspace import Keyspace
from common.redis_conn import RedisStores
from common.settings import Settings
import trainer.event_log as el

settings = Settings(redis_url=sys.argv[1], artifacts_dir=sys.argv[2])
stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
if sys.argv[3] == "mid-read":  # dies between two chunks of a read, before writing anything
    for n, chunk in enumerate(el.read_entries(stores, el.read_offset(stores, el.NIGHTLY), chunk=300)):
        if n == 2:
            os.kill(os.getpid(), signal.SIGKILL)
else:  # dies after the archive segment is on disk, before the offset is committed
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    el.commit_offset = die
    el.archive_new_events(stores, settings)
"""


def events_frame(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [f"u{k % 37}" for k in range(start, start + n)],
                         "item_id": [f"i{k}" for k in range(start, start + n)],
                         "timestamp": [T0 + k for k in range(start, start + n)], "event": "click"})


@pytest.mark.parametrize("where", ["mid-read", "before-commit"])
def test_consumer_killed_mid_read_resumes_without_loss_or_duplicates(settings, stores, where):
    append_events(stores, events_frame(1000))
    script = textwrap.dedent(KILLED_CONSUMER)
    proc = subprocess.run([sys.executable, "-c", script, settings.redis_url, str(settings.artifacts_dir), where],
                          cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert read_offset(stores, NIGHTLY) == "0-0"  # nothing committed
    assert log_length(stores) == 1000  # nothing trimmed
    segments = EventArchive(archive_dir(settings)).segments()
    assert len(segments) == (1 if where == "before-commit" else 0)

    append_events(stores, events_frame(500, start=1000))  # more events arrive before the rerun
    folded = archive_new_events(stores, settings)
    assert len(folded.new) == 1500
    assert folded.history["item_id"].tolist() == [f"i{k}" for k in range(1500)]  # each once, in order
    archive = EventArchive(archive_dir(settings))
    assert archive.segments() == [archive.segment("0-0", folded.to)]  # the earlier try's subset is gone
    append_events(stores, events_frame(10, start=1500))
    assert len(archive_new_events(stores, settings).new) == 10  # the next run reads after the committed offset
    assert len(history(stores, settings)) == 1510


def aof_redis(data_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--databases", "16",
                             "--logfile", str(data_dir / "redis.log")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_redis(f"redis://127.0.0.1:{port}/0", 10.0, proc)
    return proc


def test_redis_restarted_with_persistence_keeps_the_log(tmp_path, start_server):
    data_dir, port = tmp_path / "redis", free_port()
    data_dir.mkdir()
    url = f"redis://127.0.0.1:{port}/0"
    proc = aof_redis(data_dir, port)
    try:
        server = start_server(["services.feature_server", "serve"], {"REDIS_URL": url})
        events = client_events(0)[:200]
        for b0 in range(0, 200, 50):
            assert httpx.post(server.url + "/events", json=events[b0:b0 + 50], timeout=30).status_code == 200
        settings = Settings(redis_url=url, artifacts_dir=tmp_path / "artifacts")
        stores = RedisStores(url, Keyspace.from_settings(settings))
        before = read_frame(stores)
        stores.close()
        assert len(before) == 200
        os.killpg(proc.pid, signal.SIGKILL)  # no shutdown save: only the append-only file can bring it back
        proc.wait(10)
        proc = aof_redis(data_dir, port)
        stores = RedisStores(url, Keyspace.from_settings(settings))
        after = read_frame(stores)
        stores.close()
        pd.testing.assert_frame_equal(after, before)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


def test_log_at_its_bound_refuses_whole_batches_and_says_so(settings, stores, start_server):
    env = {"EVENT_LOG_MAX_LEN": "30", "MAX_EVENT_BATCH": "10", "EVENT_LOG_WARN_RATIO": "0.5"}
    server = start_server(["services.feature_server", "serve"], env)
    batch = lambda k: [{"user_id": "u1", "item_id": f"i{k}-{j}", "timestamp": T0 + j} for j in range(10)]  # noqa: E731
    for k in range(3):
        assert httpx.post(server.url + "/events", json=batch(k), timeout=10).status_code == 200
    r = httpx.post(server.url + "/events", json=batch(3), timeout=10)
    assert r.status_code == 503 and "event log full" in r.json()["detail"]
    assert log_length(stores) == 30  # nothing dropped, nothing half-written
    recent = stores("user_features").lrange(stores.keyspace.realtime_recent("u1"), 0, -1)
    assert not any(b"i3-" in x for x in recent)  # the refused batch did not touch the real-time state either
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert "feature_server_event_log_fill_ratio 1.0" in metrics
    assert 'feature_server_events_rejected_total{reason="log_full"} 1.0' in metrics
    assert "event log at 20 of 30 entries" in server.log.read_text()  # the warning line, from half full on
    archive_new_events(stores, settings)  # the nightly archives the backlog: room again
    assert httpx.post(server.url + "/events", json=batch(3), timeout=10).status_code == 200


def test_event_types_and_export_to_the_dataset_format(settings, stores, start_server, tmp_path):
    server = start_server(["services.feature_server", "serve"])
    r = httpx.post(server.url + "/events", json=[{"user_id": "u", "item_id": "i", "event": "bogus"}], timeout=10)
    assert r.status_code == 422 and "events[0].event" in r.json()["detail"]
    body = [{"user_id": "u1", "item_id": "a", "timestamp": T0, "event": "Purchase"},
            {"user_id": "u1", "item_id": "b", "timestamp": T0 + 5, "event": "fav", "region": "7"},
            {"user_id": "u2", "item_id": "a", "timestamp": T0 + 9}]
    assert httpx.post(server.url + "/events", json=body, timeout=10).json() == {"accepted": 3}
    archive_new_events(stores, settings)  # one event archived, the others still in the stream: export has all
    append_events(stores, pd.DataFrame([{"user_id": "u3", "item_id": "c", "timestamp": T0 + 20, "event": "cart"}]))
    out = tmp_path / "export"
    env = {**os.environ, "REDIS_URL": settings.redis_url, "ARTIFACTS_DIR": str(settings.artifacts_dir)}
    proc = subprocess.run([sys.executable, "-m", "trainer", "export-events", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "4 events written" in proc.stderr
    ds = load_dataset(out)  # the dataset loader reads it back
    rows = ds.interactions
    assert rows[["user_id", "item_id", "timestamp"]].values.tolist() == [
        ["u1", "a", T0], ["u1", "b", T0 + 5], ["u2", "a", T0 + 9], ["u3", "c", T0 + 20]]
    assert rows["event"].astype(str).tolist() == ["purchase", "like", "click", "cart"]
    assert rows["region"].tolist() == ["", "7", "", ""]


def test_prefix_mode_keeps_the_log_in_db0_under_the_prefix(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, redis_key_mode="prefix", artifacts_dir=tmp_path / "a")
    stores = RedisStores(redis_url, Keyspace.from_settings(settings))
    try:
        append_events(stores, events_frame(5))
        key = stores.keyspace.event_log()
        assert key.startswith("mr:user_features:log:")
        assert redis.Redis.from_url(redis_url).xlen(key) == 5  # db0, under the prefix
        assert len(archive_new_events(stores, settings).new) == 5
        assert [len(c) for c in read_entries(stores, chunk=2)] in ([], [1])
    finally:
        stores.close()


@pytest.mark.parametrize("env, message", [
    ({"EVENT_LOG_MAX_LEN": "0"}, "event_log_max_len"),
    ({"EVENT_LOG_WARN_RATIO": "1.5"}, "event_log_warn_ratio"),
    ({"EVENT_LOG_MAX_LEN": "500", "MAX_EVENT_BATCH": "1000"}, "must be at least max_event_batch"),
    ({"INCREMENTAL_EVERY_MIN": "-1"}, "incremental_every_min"),
])
def test_bad_settings_fail_at_load(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        Settings()
