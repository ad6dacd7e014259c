"""Feature build (hand-computed answers on a tiny log) and the feature server over real HTTP and real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pandas as pd
import pytest

from common.keyspace import FEATURES_CHANNEL
from common.local_redis import LocalRedis, free_port
from common.publish import current_version, read_manifest
from trainer.data.io import load_dataset
from trainer.feature_build import publish_features

ROOT = Path(__file__).resolve().parents[1]

INTERACTIONS = """user_id,item_id,timestamp,environment,region
1,10,100,web,eu
1,11,200,app,eu
1,10,300,app,eu
1,12,400,app,us
1,13,400,web,us
2,11,150,web,asia
2,11,160,web,asia
3,14,500,app,
"""
ITEMS = """item_id,category,created_at_ts,words
10,sports|news,50,120
11,news,60,80
12,sports,70,
13,tech,80,300
14,tech,90,40
15,news,95,10
"""
USERS = """user_id,age,city
1,30,paris
2,25,tokyo
3,40,berlin
4,22,rome
"""

# Hand-computed with recent_n=3, top_categories_n=2. User 1 clicked item 10 twice (clicks count both; recent keeps
# the earliest occurrence); items 12 and 13 tie at t=400, so the higher id is the newer one.
USER_1 = {"user_id": "1", "clicks": 5, "recent": [["13", 400], ["12", 400], ["11", 200]],
          "top_categories": [["sports", 3], ["news", 1]], "environment": "app", "region": "eu",
          "first_ts": 100, "last_ts": 400, "attrs": {"age": 30, "city": "paris"}, "seen": ["13", "12", "11", "10"]}
USER_2 = {"user_id": "2", "clicks": 2, "recent": [["11", 150]], "top_categories": [["news", 2]],
          "environment": "web", "region": "asia", "first_ts": 150, "last_ts": 160,
          "attrs": {"age": 25, "city": "tokyo"}, "seen": ["11"]}
USER_3 = {"user_id": "3", "clicks": 1, "recent": [["14", 500]], "top_categories": [["tech", 1]],
          "environment": "app", "region": None, "first_ts": 500, "last_ts": 500,
          "attrs": {"age": 40, "city": "berlin"}, "seen": ["14"]}
USER_4 = {"user_id": "4", "clicks": 0, "recent": [], "top_categories": [], "environment": None, "region": None,
          "first_ts": None, "last_ts": None, "attrs": {"age": 22, "city": "rome"}, "seen": []}
ITEM_10 = {"item_id": "10", "clicks": 2, "created_ts": 50, "category": "sports",
           "attrs": {"category": "sports|news", "created_at_ts": 50, "words": 120}}
ITEM_11 = {"item_id": "11", "clicks": 3, "created_ts": 60, "category": "news",
           "attrs": {"category": "news", "created_at_ts": 60, "words": 80}}
ITEM_12 = {"item_id": "12", "clicks": 1, "created_ts": 70, "category": "sports",
           "attrs": {"category": "sports", "created_at_ts": 70, "words": None}}
ITEM_15 = {"item_id": "15", "clicks": 0, "created_ts": 95, "category": "news",
           "attrs": {"category": "news", "created_at_ts": 95, "words": 10}}

SERVER_ENV = {"RECENT_N": "3", "TOP_CATEGORIES_N": "2", "MAX_EVENT_BATCH": "5"}


def write_dataset(d: Path, interactions: str = INTERACTIONS, items: str | None = ITEMS,
                  users: str | None = USERS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "interactions.csv").write_text(interactions)
    if items:
        (d / "items.csv").write_text(items)
    if users:
        (d / "users.csv").write_text(users)
    return d


@pytest.fixture
def small_settings(settings):
    return settings.model_copy(update={"recent_n": 3, "top_categories_n": 2})


def served(rec: dict) -> dict:
    """A batch record as GET /users shows it (the merged view drops `seen`)."""
    return {k: v for k, v in rec.items() if k != "seen"}


def rt_keys(stores) -> list[bytes]:
    return stores("user_features").keys("rt:*") + stores("item_features").keys("rt:*")


def test_build_records_match_hand_computed(tmp_path, stores, small_settings):
    ds = load_dataset(write_dataset(tmp_path / "data"))
    version = publish_features(stores, ds, small_settings, progress=False)
    ks = stores.keyspace
    assert current_version(stores, FEATURES_CHANNEL) == version
    users = stores("user_features")
    for rec in (USER_1, USER_2, USER_3, USER_4):
        assert orjson.loads(users.get(ks.user_features(version, rec["user_id"]))) == rec
    items = stores("item_features")
    for rec in (ITEM_10, ITEM_11, ITEM_12, ITEM_15):
        assert orjson.loads(items.get(ks.item_features(version, rec["item_id"]))) == rec
    assert len(users.keys(ks.version_pattern("user_features", FEATURES_CHANNEL, version))) == 4
    assert len(items.keys(ks.version_pattern("item_features", FEATURES_CHANNEL, version))) == 6
    manifest = read_manifest(stores, FEATURES_CHANNEL)
    assert (manifest["n_users"], manifest["n_items"], manifest["n_interactions"]) == (4, 6, 8)

    # a rebuild is a new version; the previous one stays readable (grace period)
    v2 = publish_features(stores, ds, small_settings, progress=False)
    assert v2 != version and current_version(stores, FEATURES_CHANNEL) == v2
    assert users.get(ks.user_features(version, "1")) is not None


def test_env_region_fall_back_to_user_attributes(tmp_path, stores, small_settings):
    inter = "user_id,item_id,timestamp\n1,10,100\n1,11,50\n2,10,70\n"
    users = "user_id,environment,region\n1,app,eu\n"
    ds = load_dataset(write_dataset(tmp_path / "data", inter, items=None, users=users))
    version = publish_features(stores, ds, small_settings, progress=False)
    ks = stores.keyspace
    u1 = orjson.loads(stores("user_features").get(ks.user_features(version, "1")))
    u2 = orjson.loads(stores("user_features").get(ks.user_features(version, "2")))
    assert (u1["environment"], u1["region"]) == ("app", "eu")
    assert (u2["environment"], u2["region"], u2["attrs"]) == (None, None, {})
    assert u1["recent"] == [["10", 100], ["11", 50]] and u1["top_categories"] == []
    item = orjson.loads(stores("item_features").get(ks.item_features(version, "10")))
    assert item == {"item_id": "10", "clicks": 2, "created_ts": None, "category": None, "attrs": {}}


def test_build_alias_runs_the_trainer_command(tmp_path):
    """`python -m services.feature_server build` is a thin alias of `python -m trainer features`."""
    out = subprocess.run([sys.executable, "-m", "services.feature_server", "build", "--data", str(tmp_path / "none"),
                          "--redis-url", "redis://127.0.0.1:1/0", "--no-progress"],
                         cwd=ROOT, env={**os.environ, **SERVER_ENV}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "none" in out.stderr  # the trainer's data error, naming the dir


def test_cli_build_then_http_reads(tmp_path, settings, start_server):
    data = write_dataset(tmp_path / "data")
    env = {**os.environ, **SERVER_ENV, "REDIS_URL": "redis://127.0.0.1:1/0"}  # --redis-url must win
    out = subprocess.run([sys.executable, "-m", "trainer", "features", "--data", str(data),
                          "--redis-url", settings.redis_url, "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    version = out.stdout.strip().splitlines()[-1]

    server = start_server(["services.feature_server", "serve"], SERVER_ENV)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        health = c.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "redis": "ok", "features_version": version}
        assert c.get("/users/1").json() == served(USER_1)
        assert c.get("/users/4").json() == served(USER_4)  # attributes only, no clicks: still known
        assert c.get("/items/10").json() == {**ITEM_10, "realtime_clicks": 0}
        r = c.get("/users/nobody")
        assert r.status_code == 404 and r.json() == {"detail": "unknown user 'nobody'"}
        r = c.get("/items/999")
        assert r.status_code == 404 and r.json() == {"detail": "unknown item '999'"}
        assert c.get("/docs").status_code == 200
        assert "/events" in c.get("/openapi.json").json()["paths"]
        assert 'endpoint="/users/{user_id}"' in c.get("/metrics").text


def test_events_visible_at_once_and_bad_batches_change_nothing(tmp_path, stores, small_settings, start_server):
    publish_features(stores, load_dataset(write_dataset(tmp_path / "data")), small_settings, progress=False)
    server = start_server(["services.feature_server", "serve"], SERVER_ENV)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        before = c.get("/users/1").json()

        # a bad event anywhere → 422 naming index and field, and nothing written
        bad = [{"user_id": 1, "item_id": 15, "timestamp": 1000},
               {"user_id": 1, "item_id": 12, "timestamp": "yesterday"},
               {"user_id": 2, "timestamp": 1001}]
        r = c.post("/events", json=bad)
        assert r.status_code == 422
        assert "events[1].timestamp" in r.json()["detail"] and "events[2].item_id" in r.json()["detail"]
        r = c.post("/events", json={"events": [{"user_id": 1, "item_id": 15, "timestamp": 1700000000000}]})
        assert r.status_code == 422 and "events[0].timestamp" in r.json()["detail"]
        r = c.post("/events", json=[{"user_id": 1, "item_id": 2}] * 6)  # MAX_EVENT_BATCH=5
        assert r.status_code == 413 and "max_event_batch" in r.json()["detail"]
        r = c.post("/events", content=b"[" + b" " * 100_000 + b"]", headers={"content-type": "application/json"})
        assert r.status_code == 413 and "bytes" in r.json()["detail"]
        assert c.post("/events", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/events", content=b"{not json", headers={"content-type": "text/plain"}).status_code == 415
        assert rt_keys(stores) == []
        assert c.get("/users/1").json() == before

        # a good event: seen at once by the next GET
        r = c.post("/events", json=[{"user_id": 1, "item_id": 15, "timestamp": 1000, "environment": "web",
                                     "region": "us"}])
        assert r.status_code == 200 and r.json() == {"accepted": 1}
        u1 = c.get("/users/1").json()
        assert u1["recent"] == [["15", 1000], ["13", 400], ["12", 400]]
        assert (u1["clicks"], u1["last_ts"], u1["first_ts"], u1["realtime_clicks"]) == (6, 1000, 100, 1)
        assert c.get("/items/15").json()["clicks"] == 1

        # {"events": [...]} form, a new user, default timestamp, an out-of-order batch
        t0 = int(time.time())
        r = c.post("/events", json={"events": [{"user_id": "u9", "item_id": 11},
                                               {"user_id": 2, "item_id": 13, "timestamp": 900},
                                               {"user_id": 2, "item_id": 12, "timestamp": 800}]})
        assert r.json() == {"accepted": 3}
        u9 = c.get("/users/u9").json()
        assert u9["clicks"] == 1 and u9["recent"][0][0] == "11" and t0 <= u9["recent"][0][1] <= time.time() + 1
        u2 = c.get("/users/2").json()
        assert u2["recent"] == [["13", 900], ["12", 800], ["11", 150]] and u2["clicks"] == 4
        assert c.get("/items/11").json()["clicks"] == 3 + 1

        # an older event does not move last_ts back
        c.post("/events", json=[{"user_id": 1, "item_id": 14, "timestamp": 50}])
        u1 = c.get("/users/1").json()
        assert u1["last_ts"] == 1000 and u1["clicks"] == 7
        cnt = stores("user_features").hgetall(stores.keyspace.realtime_counters("1"))
        assert cnt == {b"clicks": b"2", b"first_ts": b"50", b"last_ts": b"1000", b"env:web": b"1", b"region:us": b"1"}

        # the real-time list is trimmed to RECENT_N=3, the counters are not
        c.post("/events", json=[{"user_id": "u7", "item_id": f"i{k}", "timestamp": 100 + k} for k in range(5)])
        assert stores("user_features").llen(stores.keyspace.realtime_recent("u7")) == 3
        u7 = c.get("/users/u7").json()
        assert u7["recent"] == [["i4", 104], ["i3", 103], ["i2", 102]] and u7["clicks"] == 5

        metrics = c.get("/metrics").text
        assert "feature_server_events_accepted_total 10.0" in metrics
        assert 'feature_server_events_rejected_total{reason="invalid"} 3.0' in metrics
        assert 'feature_server_events_rejected_total{reason="too_large"} 2.0' in metrics


def test_redis_outage_gives_503_then_recovers(tmp_path, start_server):
    port = free_port()
    redis_srv = LocalRedis(port=port).start()
    try:
        server = start_server(["services.feature_server", "serve"], {"REDIS_URL": redis_srv.url, "REDIS_TIMEOUT_S": "0.5"})
        with httpx.Client(base_url=server.url, timeout=20) as c:
            assert c.post("/events", json=[{"user_id": "a", "item_id": "x", "timestamp": 10}]).status_code == 200
            assert c.get("/users/a").json()["clicks"] == 1

            redis_srv.stop()
            r = c.get("/healthz")
            assert r.status_code == 503
            assert r.json()["status"] == "error" and "Redis unavailable" in r.json()["redis"]
            for resp in (c.get("/users/a"), c.get("/items/x"),
                         c.post("/events", json=[{"user_id": "a", "item_id": "y", "timestamp": 11}])):
                assert resp.status_code == 503, resp.text
                assert resp.json()["detail"].startswith(f"Redis unavailable at redis://127.0.0.1:{port}/0")

            redis_srv = LocalRedis(port=port).start()  # same port, empty data
            deadline = time.monotonic() + 30
            while (h := c.get("/healthz")).json().get("redis") != "ok":
                assert time.monotonic() < deadline, "feature server did not recover after Redis came back"
                time.sleep(0.2)
            # Redis is back but empty: nothing published, so 503 "degraded" until a features version is
            assert h.status_code == 503 and h.json()["status"] == "degraded" and h.json()["missing"] == ["features"]
            assert c.post("/events", json=[{"user_id": "a", "item_id": "y", "timestamp": 12}]).json() == {"accepted": 1}
            assert c.get("/users/a").json()["recent"] == [["y", 12]]
            assert "feature_server_redis_errors_total" in c.get("/metrics").text
    finally:
        redis_srv.stop()


def test_registered_items_are_stored_and_join_the_items_table(tmp_path, stores, settings, start_server):
    """POST /items writes the registration hash; the nightly's reader merges it into the items table: new ids
    appended, the items file winning for ids it lists, numeric columns kept numeric, unknown attributes dropped."""
    from common.registered_items import read_registered_items
    from trainer.data.registered import merge_registered

    srv = start_server(["services.feature_server", "serve"], SERVER_ENV)
    body = [{"item_id": 20, "attrs": {"category": ["tech", "news"], "words": 7, "colour": "red"}},
            {"item_id": "10", "attrs": {"category": "tech"}}]
    assert httpx.post(srv.url + "/items", json=body).json() == {"registered": 2}
    assert httpx.post(srv.url + "/items", json={"item_id": "21", "attrs": {"": 1}}).status_code == 422
    assert httpx.post(srv.url + "/items", json=[{"item_id": str(i), "attrs": {"a": 1}} for i in range(6)]
                      ).status_code == 413  # MAX_EVENT_BATCH = 5
    reg = read_registered_items(stores("item_features"), stores.keyspace)
    assert reg == {"20": {"category": "tech|news", "words": 7, "colour": "red"}, "10": {"category": "tech"}}
    got = httpx.get(srv.url + "/items/20").json()
    assert got["registered"] and got["attrs"]["category"] == "tech|news" and got["clicks"] == 0
    ds = load_dataset(write_dataset(tmp_path / "data"))
    merged, ids = merge_registered(ds, reg)
    assert ids == ["10", "20"] and list(merged.items.columns) == list(ds.items.columns)
    assert merged.items.loc["10"].tolist() == ds.items.loc["10"].tolist()  # the file's row wins
    assert merged.items.loc["20", "category"] == "tech|news" and merged.items.loc["20", "words"] == 7
    assert pd.api.types.is_numeric_dtype(merged.items["words"]) and len(merged.items) == len(ds.items) + 1
    assert merge_registered(ds, {}) == (ds, [])
