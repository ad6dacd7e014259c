"""The recall server end to end: real Redis, real feature and vector servers, real HTTP.

One module-wide stack: a private Redis on a fixed port (so it can be stopped and restarted mid-test), a tiny
synthetic dataset whose channels (popular, itemcf, usercf, mf + mf_i2i) are fitted and published through
the same publishing code as the nightly job, and the three services as real processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import get_args

import httpx
import numpy as np
import pytest
import redis
from conftest import ROOT, ServerProcess, free_port

from common.channel_config import ArtifactKind, load_config
from common.ids import load_id_map, publish_id_map
from common.keyspace import Keyspace, unpack_neighbors
from common.local_redis import LocalRedis
from common.publish import current_version
from common.redis_conn import RedisStores
from common.settings import Settings

CONFIG = """
merge: {normalize: rank, rank_offset: 20}
default_k: 50
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 30, timeout_ms: 2000, params: {top_k: 100}}
  itemcf: {kind: i2i, model: itemcf, weight: 1.0, quota: 60, timeout_ms: 2000, params: {top_k: 50},
           serve: {recent_n: 10, recency_decay: 0.9, per_anchor: 50}}
  usercf: {kind: u2u, model: usercf, weight: 0.5, quota: 40, timeout_ms: 2000, params: {top_k: 20},
           serve: {per_anchor: 20, neighbor_items: 10}}
  mf: {kind: u2i, model: mf, weight: 1.0, quota: 60, timeout_ms: 2000, params: {dim: 16, epochs: 5}}
  mf_i2i: {kind: i2i, from: mf, weight: 0.3, quota: 30, timeout_ms: 2000}
"""
CHANNELS = ["popular", "itemcf", "usercf", "mf", "mf_i2i"]
PUBLISHERS = ["popular", "itemcf", "usercf", "mf", "features"]


def publish_tiny(settings: Settings, data_dir: Path, config_path: Path) -> dict:
    """Fit every trained channel of the config on `data_dir` and publish it (+ features, id maps)."""
    from trainer.channels import registry
    from trainer.data.io import load_dataset
    from trainer.data.train_data import TrainData
    from trainer.feature_build import publish_features
    from trainer.publishing import publish_channel

    stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
    try:
        ds = load_dataset(data_dir)
        data = TrainData.from_frame(ds.interactions, ds.users, ds.items, user_map=load_id_map(stores, "user"),
                                    item_map=load_id_map(stores, "item"))
        publish_id_map(stores, "item", data.item_map)
        publish_id_map(stores, "user", data.user_map)
        publish_features(stores, ds, settings, progress=False)
        fitted = {}
        for spec in load_config(config_path).channels:
            if spec.trained and spec.enabled:
                ch = registry.build(spec)
                ch.fit(data)
                publish_channel(stores, spec, ch.artifacts(data), data, settings.artifacts_dir, progress=False)
                fitted[spec.name] = ch
        versions = {c: current_version(stores, c) for c in PUBLISHERS}
        return {"data": data, "channels": fitted, "versions": versions}
    finally:
        stores.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from trainer.synth import write_synthetic

    root = tmp_path_factory.mktemp("recall")
    data_dir = write_synthetic(root / "data", n_users=300, n_items=200, n_clicks=6000, seed=7, progress=False)
    config_path = root / "channels.yaml"
    config_path.write_text(CONFIG)
    server = LocalRedis(data_dir=root / "redis", port=free_port()).start()
    settings = Settings(redis_url=server.url, artifacts_dir=root / "artifacts", channels_config=config_path,
                        run_dir=root / "run")
    published = publish_tiny(settings, data_dir, config_path)
    ports = {"feature": free_port(), "vector": free_port(), "recall": free_port()}
    env = {**os.environ, "REDIS_URL": server.url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
           "CHANNELS_CONFIG": str(config_path), "RUN_DIR": str(settings.run_dir), "OMP_NUM_THREADS": "1",
           "VECTOR_URL": f"http://127.0.0.1:{ports['vector']}", "FEATURE_URL": f"http://127.0.0.1:{ports['feature']}"}
    procs = {}
    try:
        for name in ("feature", "vector", "recall"):
            procs[name] = ServerProcess([f"services.{name}_server", "serve", "--port", str(ports[name])], env,
                                        ports[name], root / f"{name}.log").start()
        ctx = {"redis": server, "settings": settings, "data_dir": data_dir, "config": config_path, "env": env,
               "procs": procs, "root": root, **published,
               "recall": httpx.Client(base_url=procs["recall"].url, timeout=10.0),
               "feature": httpx.Client(base_url=procs["feature"].url, timeout=10.0)}
        wait_until_served(ctx["recall"], published["versions"])
        yield ctx
        ctx["recall"].close()
        ctx["feature"].close()
    finally:
        for p in procs.values():
            p.stop()
        server.stop()


def wait_until_served(client: httpx.Client, versions: dict, user: str = "1", timeout: float = 60.0) -> dict:
    """Poll /recall until every channel answers from `versions` (vector server loaded, snapshot swapped)."""
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        r = client.get("/recall", params={"user_id": user})
        if r.status_code == 200:
            body = r.json()
            v = body["versions"]
            if all(body["channels"][c]["status"] == "ok" for c in CHANNELS) and \
                    all(v[c] == versions[c if c != "mf_i2i" else "mf"] for c in CHANNELS):
                return body
        time.sleep(0.2)
    raise AssertionError(f"stack never served versions {versions}: last answer {body}")


def warm_users(stack, n: int = 10) -> list[str]:
    data = stack["data"]
    counts = np.diff(data.user_ptr)
    order = np.argsort(-counts, kind="stable")
    return [data.user_map.ids[u] for u in order[:n]]


def history(stack, user_id: str) -> set[str]:
    data = stack["data"]
    u = data.user_map.get(user_id)
    items, _ = data.history(u)
    return {data.item_map.ids[i] for i in items}


def recall(stack, **params) -> dict:
    r = stack["recall"].get("/recall", params=params)
    assert r.status_code == 200, r.text
    return r.json()


# -- answers -------------------------------------------------------------------------------------

def test_one_retriever_per_kind_dispatched_by_attributes():
    """The table the request path dispatches through: every kind, the evaluator's request sizes, and the
    attributes that replaced the comparisons of kind names."""
    from common.merge import request_size
    from services.recall_server.retrievers import RETRIEVERS, Retriever

    assert set(RETRIEVERS) == set(get_args(ArtifactKind))
    for kind, cls in RETRIEVERS.items():
        assert issubclass(cls, Retriever) and cls.kind == kind
        for quota, k, total in [(25, 200, 1000), (25, 200, 125), (300, 200, 1000), (50, 10, 60)]:
            assert cls.request_size(quota, k, total) == request_size(kind, quota, k, total)

    def having(attr: str) -> list[str]:
        return sorted(kind for kind, cls in RETRIEVERS.items() if getattr(cls, attr))

    assert having("in_snapshot") == having("cold_start") == ["list"]
    assert having("shared_call") == ["u2i"] and having("neighbor_histories") == ["u2u"]
    assert having("cached_lists") == ["i2i", "u2u"]


def test_warm_user_answer_shape_versions_and_fill(stack):
    user = warm_users(stack)[0]
    body = recall(stack, user_id=user, k=50)
    assert body["user_id"] == user and body["k"] == 50 and body["cold_start"] is False
    assert len(body["items"]) == 50  # filled to k
    ids = [it["item_id"] for it in body["items"]]
    assert len(set(ids)) == 50
    scores = [it["score"] for it in body["items"]]
    assert all(isinstance(s, float) for s in scores)
    assert "channels" not in body["items"][0]  # explain off: no per-item channel map
    assert list(body["channels"]) == CHANNELS
    for name, st in body["channels"].items():
        assert st["status"] == "ok", (name, st)
        assert st["count"] > 0 and st["latency_ms"] >= 0
    expected = {c: stack["versions"]["mf" if c == "mf_i2i" else c] for c in CHANNELS}
    assert {c: body["versions"][c] for c in CHANNELS} == expected
    assert body["versions"]["features"] == stack["versions"]["features"]


def test_seen_and_excluded_items_are_never_returned(stack):
    for user in warm_users(stack, 8):
        seen = history(stack, user)
        body = recall(stack, user_id=user, k=100)
        got = [it["item_id"] for it in body["items"]]
        assert got and not (set(got) & seen), user
        excl = got[:3]
        body2 = recall(stack, user_id=user, k=100, exclude=",".join([*excl, "no-such-item"]))
        got2 = [it["item_id"] for it in body2["items"]]
        assert not (set(got2) & set(excl)) and not (set(got2) & seen)
        assert len(got2) >= min(100, len(got)) - len(excl)  # still filled from what is left


def test_explain_ranks_match_each_channels_own_list(stack):
    user = warm_users(stack)[1]
    full = recall(stack, user_id=user, k=50, explain="true")
    own = {}
    for c in CHANNELS:
        single = recall(stack, user_id=user, k=200, channels=c)
        assert list(single["channels"]) == [c]
        own[c] = {it["item_id"]: r for r, it in enumerate(single["items"], start=1)}
    named = 0
    for it in full["items"]:
        assert it["channels"], it  # every item was produced by at least one channel
        for c, rank in it["channels"].items():
            assert own[c].get(it["item_id"]) == rank, (c, it)
            named += 1
        for c in CHANNELS:  # and no channel that had the item in its list is left out
            if c not in it["channels"] and it["item_id"] in own[c]:
                assert own[c][it["item_id"]] > full["channels"][c]["count"]
    assert named > len(full["items"])  # items come from several channels


def test_i2i_and_u2u_match_the_offline_recommend_path(stack):
    """The server's single-channel lists equal Channel.recommend (the evaluator's path) on the same data."""
    data, cfg = stack["data"], load_config(stack["config"])
    for user in warm_users(stack, 3):
        u = data.user_map.get(user)
        for name in ("itemcf", "usercf", "popular"):
            spec = cfg.get(name)
            ch = stack["channels"][name]
            ids, _ = ch.recommend(data, np.array([u]), max(spec.quota, 50))[0]
            body = recall(stack, user_id=user, k=50, channels=name)
            assert [it["item_id"] for it in body["items"]] == [data.item_map.ids[i] for i in ids[:50]], (name, user)


def test_events_posted_a_moment_ago_are_filtered_and_change_candidates(stack):
    user = warm_users(stack)[2]
    before = recall(stack, user_id=user, k=50, explain="true")
    clicked = [it["item_id"] for it in before["items"][:3]]
    r = stack["feature"].post("/events", json=[{"user_id": user, "item_id": i} for i in clicked])
    assert r.status_code == 200, r.text
    after = recall(stack, user_id=user, k=50, explain="true")
    got = [it["item_id"] for it in after["items"]]
    assert not set(got) & set(clicked)

    def itemcf(body):
        return {it["item_id"] for it in body["items"] if "itemcf" in it["channels"]}

    # the new clicks are now the newest i2i anchors: new neighbours appear, not just the clicked ones removed
    assert itemcf(after) - itemcf(before)


def test_cold_start_new_user_gets_popular(stack):
    body = recall(stack, user_id="never-seen-user-42", k=20, explain="true")
    assert body["cold_start"] is True
    for c in ("itemcf", "usercf", "mf", "mf_i2i"):
        assert body["channels"][c]["status"] == "skipped" and "cold start" in body["channels"][c]["detail"]
    assert body["channels"]["popular"]["status"] == "ok"
    stores = RedisStores(stack["redis"].url, Keyspace.from_settings(stack["settings"]))
    value = stores("lists").get(stores.keyspace.item_list("popular", stack["versions"]["popular"], "global"))
    stores.close()
    ids, _ = unpack_neighbors(value)
    assert len(ids) >= 20
    data = stack["data"]
    assert [it["item_id"] for it in body["items"]] == [data.item_map.ids[i] for i in ids[:20]]
    assert all(it["channels"] == {"popular": r} for r, it in enumerate(body["items"], start=1))


def test_new_user_with_events_is_personalised_by_category(stack):
    user = "brand-new-clicker"
    data = stack["data"]
    item = data.item_map.ids[int(np.argmax(data.item_counts))]
    r = stack["feature"].post("/events", json=[{"user_id": user, "item_id": item}])
    assert r.status_code == 200
    body = recall(stack, user_id=user, k=30, explain="true")
    assert body["cold_start"] is False
    assert body["channels"]["itemcf"]["status"] == "ok"
    assert item not in [it["item_id"] for it in body["items"]]
    # popular now blends the global list with the clicked item's category list
    glob = recall(stack, user_id="nobody-at-all", k=30, channels="popular")
    mine = recall(stack, user_id=user, k=30, channels="popular")
    assert [it["item_id"] for it in mine["items"]] != [it["item_id"] for it in glob["items"]]


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, param, words", [
    ({}, "user_id", "required"),
    ({"user_id": ""}, "user_id", "required"),
    ({"user_id": "   "}, "user_id", "required"),
    ({"user_id": "1", "k": "0"}, "k", "between 1 and 1000"),
    ({"user_id": "1", "k": "-3"}, "k", "between 1 and 1000"),
    ({"user_id": "1", "k": "1001"}, "k", "between 1 and 1000"),
    ({"user_id": "1", "k": "ten"}, "k", "integer"),
    ({"user_id": "1", "k": "1e3"}, "k", "integer"),
    ({"user_id": "1", "channels": "itemcf,nope"}, "channels", "'nope'"),
    ({"user_id": "1", "channels": ""}, "channels", "empty"),
    ({"user_id": "1", "exclude": "a,,b"}, "exclude", "empty value"),
    ({"user_id": "1", "exclude": ","}, "exclude", "empty value"),
    ({"user_id": "1", "explain": "maybe"}, "explain", "true or false"),
    ({"user_id": "x" * 300}, "user_id", "at most"),
])
def test_bad_parameters_get_422_naming_them(stack, params, param, words):
    r = stack["recall"].get("/recall", params=params)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["query", param]
    assert words in detail["msg"]
    if param == "channels" and "nope" in words:
        for c in CHANNELS:
            assert c in detail["msg"]  # the known channels are listed


def test_fuzzed_inputs_never_produce_a_500(stack):
    rng = random.Random(1234)
    alphabet = ["a", "1", ",", " ", "%", "é", "\u2603", "\x00", "\n", ";", "'", '"', "\\", "/", "?", "&", "=", "#",
                "-1", "0", "999999999999", "null", "true", "\ud7ff", "𝕏", "*", ":", "[", "{"]

    def junk():
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    client = stack["recall"]
    statuses = set()
    for _ in range(250):
        params = {}
        for name in ("user_id", "k", "channels", "exclude", "explain"):
            if rng.random() < 0.6:
                params[name] = junk() if rng.random() < 0.8 else rng.choice(["1", "50", "itemcf", "true", "3,4"])
        r = client.get("/recall", params=params)
        statuses.add(r.status_code)
        assert r.status_code in (200, 422), (params, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
    for raw in ["/recall?user_id=%ff%fe&k=%00", "/recall?user_id=1&k=5&k=6", "/recall?user_id=1&user_id=",
                "/recall?user_id=" + "%41" * 5000, "/recall?&&&=&user_id=1", "/recall?user_id=1&explain=TRUE",
                "/recall?user_id=%E2%80%8B", "/recall?user_id=1&exclude=" + ",".join(["x"] * 10_001)]:
        r = client.get(raw)
        assert r.status_code in (200, 422), (raw, r.status_code, r.text)
    assert statuses == {200, 422}
    m = client.get("/metrics").text
    assert 'recall_requests_total{outcome="error"}' not in m or 'recall_requests_total{outcome="error"} 0.0' in m


def test_health_metrics_and_docs(stack):
    client = stack["recall"]
    h = client.get("/healthz")
    assert h.status_code == 200
    assert h.json()["versions"]["itemcf"] == stack["versions"]["itemcf"]
    # after a version change every i2i list of the (tiny) catalogue is loaded into the worker's memory in the
    # background, not only the anchors requests have asked for
    stores = RedisStores(stack["settings"].redis_url, Keyspace.from_settings(stack["settings"]))
    n_items = len(load_id_map(stores, "item"))
    stores.close()
    n_i2i = sum(1 for c in load_config(stack["config"]).enabled() if c.kind == "i2i")
    deadline = time.monotonic() + 30
    while (body := client.get("/healthz").json())["warming"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert body["warming"] == []
    assert body["list_cache"]["lists"]["i2i"] == n_i2i * n_items
    recall(stack, user_id=warm_users(stack)[0])
    m = client.get("/metrics")
    assert m.status_code == 200
    text = m.text
    for needle in ("recall_request_seconds_count", 'recall_channel_seconds_bucket{channel="itemcf"',
                   'recall_channel_candidates_count{channel="usercf"}', "recall_channel_empty_total",
                   f'recall_channel_version_info{{channel="itemcf",version="{stack["versions"]["itemcf"]}"}} 1.0'):
        assert needle in text, needle
    assert client.get("/docs").status_code == 200
    assert "/recall" in client.get("/openapi.json").json()["paths"]


# -- failures and version changes ------------------------------------------------------------------

def test_embedded_vector_mode_answers_like_the_vector_server(stack):
    """VECTOR_MODE=embedded: the recall worker runs the vector server's search itself (no HTTP hop)."""
    port = free_port()
    proc = ServerProcess(["services.recall_server", "serve", "--port", str(port)],
                         {**stack["env"], "VECTOR_MODE": "embedded", "VECTOR_URL": f"http://127.0.0.1:{free_port()}"},
                         port, stack["root"] / "recall-embedded.log").start()
    vec = stack["procs"]["vector"]
    try:
        with httpx.Client(base_url=proc.url, timeout=10.0) as client:
            wait_until_served(client, stack["versions"])
            health = client.get("/healthz").json()
            assert health["vector_mode"] == "embedded" and health["vector"]["loaded"] == {"mf": stack["versions"]["mf"]}
            users = warm_users(stack, 5)
            remote = {u: recall(stack, user_id=u, k=50, channels="mf") for u in users}
            os.killpg(vec.proc.pid, signal.SIGSTOP)  # the embedded answers do not need the vector server
            try:
                for u in users:
                    r = client.get("/recall", params={"user_id": u, "k": 50, "channels": "mf"})
                    assert r.status_code == 200
                    body = r.json()
                    assert body["channels"]["mf"]["status"] == "ok"
                    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in remote[u]["items"]]
                    np.testing.assert_allclose([i["score"] for i in body["items"]],
                                               [i["score"] for i in remote[u]["items"]], rtol=1e-5)
            finally:
                os.killpg(vec.proc.pid, signal.SIGCONT)
    finally:
        proc.stop()


def test_vector_server_slow_gives_timeouts(stack):
    vec = stack["procs"]["vector"]
    user = warm_users(stack)[0]
    assert recall(stack, user_id=user)["channels"]["mf"]["status"] == "ok"
    os.killpg(vec.proc.pid, signal.SIGSTOP)  # alive but not answering: a slow vector server
    try:
        body = recall(stack, user_id=user, k=50)
        assert body["channels"]["mf"]["status"] == "timeout", body["channels"]["mf"]
        assert "timeout_ms" in body["channels"]["mf"]["detail"]
        assert all(body["channels"][c]["status"] == "ok" for c in ("popular", "itemcf", "usercf", "mf_i2i"))
        assert len(body["items"]) == 50
    finally:
        os.killpg(vec.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while recall(stack, user_id=user)["channels"]["mf"]["status"] != "ok":
        assert time.monotonic() < deadline, "mf never recovered after the vector server resumed"
        time.sleep(0.2)


def test_vector_server_down_gives_degraded_answers(stack):
    vec = stack["procs"]["vector"]
    user = warm_users(stack)[0]
    vec.stop()
    try:
        for _ in range(3):
            body = recall(stack, user_id=user, k=50)
            assert body["channels"]["mf"]["status"] == "error"
            assert "vector server" in body["channels"]["mf"]["detail"]
            for c in ("popular", "itemcf", "usercf", "mf_i2i"):
                assert body["channels"][c]["status"] == "ok"
            assert len(body["items"]) == 50
    finally:
        vec.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the same recall process recovers once the vector server is back
        if recall(stack, user_id=user)["channels"]["mf"]["status"] == "ok":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("mf never recovered after the vector server restarted")


def test_publish_during_a_stream_of_requests(stack):
    """A nightly-style publish of every channel while requests flow: no errors, only old or new versions,
    per channel never going back, and the new set once the publish is over."""
    old = dict(stack["versions"])
    users = warm_users(stack, 20)
    seen = {u: history(stack, u) for u in users}
    answers: list[dict] = []
    problems: list[str] = []
    done = threading.Event()

    def stream():
        with httpx.Client(base_url=stack["procs"]["recall"].url, timeout=10.0) as client:
            i = 0
            while not done.is_set() and i < 3000:
                u = users[i % len(users)]
                r = client.get("/recall", params={"user_id": u, "k": 50})
                i += 1
                if r.status_code != 200:
                    problems.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                if set(it["item_id"] for it in body["items"]) & seen[u]:
                    problems.append(f"seen item returned to {u}")
                answers.append(body)

    t = threading.Thread(target=stream)
    t.start()
    try:
        new = publish_tiny(stack["settings"], stack["data_dir"], stack["config"])["versions"]
        wait_until_served(stack["recall"], new)
    finally:
        done.set()
        t.join(60)
    assert not problems, problems[:5]
    assert len(answers) > 10
    last: dict[str, str] = {}
    for body in answers:
        v = body["versions"]
        for c in CHANNELS:
            pub = "mf" if c == "mf_i2i" else c
            assert v[c] in (old[pub], new[pub]), (c, v[c])
            if last.get(c) == new[pub]:
                assert v[c] == new[pub], f"{c} went back to its old version"
            last[c] = v[c]
            assert body["channels"][c]["status"] in ("ok", "empty"), (c, body["channels"][c])
        assert v["features"] in (old["features"], new["features"])
    assert any(b["versions"]["itemcf"] == old["itemcf"] for b in answers)  # the stream did span the publish
    stack["versions"] = new


def test_redis_stopped_and_restarted(stack):
    server: LocalRedis = stack["redis"]
    client = stack["recall"]
    user = warm_users(stack)[0]
    pid = stack["procs"]["recall"].proc.pid
    recall(stack, user_id=user)
    redis.Redis.from_url(server.url).save()  # keep the data across the restart (dump.rdb in its dir)
    port = server.port
    server.stop()
    try:
        r = client.get("/recall", params={"user_id": user})
        assert r.status_code == 503
        assert r.json()["detail"].startswith("Redis unavailable")
        h = client.get("/healthz")
        assert h.status_code == 503 and "Redis" in h.json()["detail"]
        assert client.get("/recall", params={"user_id": ""}).status_code == 422  # validation still first
    finally:
        server.port = port
        server.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = client.get("/recall", params={"user_id": user})
        if r.status_code == 200 and r.json()["channels"]["itemcf"]["status"] == "ok":
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert stack["procs"]["recall"].proc.pid == pid and stack["procs"]["recall"].proc.poll() is None
    assert client.get("/healthz").status_code == 200
    assert r.json()["versions"]["itemcf"] == stack["versions"]["itemcf"]


# -- the lean clients of the request path ----------------------------------------------------------



def test_workers_share_connections_and_stop_together(stack):
    """--workers 2: each worker has its own SO_REUSEPORT socket, so a burst of keep-alive connections is spread
    over both; SIGTERM to the supervisor stops every worker; a port already in use is refused, not shared."""
    port = free_port()
    log = stack["root"] / f"recall-workers-{port}.log"
    server = ServerProcess(["services.recall_server", "serve", "--port", str(port), "--workers", "2"], stack["env"],
                           port, log).start()
    try:
        deadline = time.monotonic() + 60
        while len({httpx.get(server.url + "/healthz", timeout=5).json()["pid"] for _ in range(20)}) < 2:
            assert time.monotonic() < deadline, "the second worker never answered"
            time.sleep(0.2)

        async def burst() -> tuple[list[int], list[int]]:  # 40 connections opened at once, as a client pool does
            clients = [httpx.AsyncClient(base_url=server.url, timeout=10) for _ in range(40)]
            try:
                first = await asyncio.gather(*(c.get("/healthz") for c in clients))
                second = await asyncio.gather(*(c.get("/healthz") for c in clients))
                return [r.json()["pid"] for r in first], [r.json()["pid"] for r in second]
            finally:
                for c in clients:
                    await c.aclose()

        pids, again = asyncio.run(burst())
        assert pids == again  # keep-alive: each connection stays with its worker
        counts = sorted(pids.count(p) for p in set(pids))
        assert len(counts) == 2 and counts[0] >= 8, counts  # binomial(40, ½): below 8 has odds ≈ 1e-4
        worker_pids = set(pids)
        busy = ServerProcess(["services.recall_server", "serve", "--port", str(port), "--workers", "2"],
                             stack["env"], port, stack["root"] / "recall-busy.log")
        busy.proc = subprocess.Popen([sys.executable, "-m", *busy.args], env=stack["env"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = busy.proc.communicate(timeout=60)
        assert busy.proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.decode()
    finally:
        server.stop()
    for pid in worker_pids:
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid):
            assert time.monotonic() < deadline, f"worker {pid} still running after the supervisor stopped"
            time.sleep(0.1)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/healthz", timeout=2)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
