"""The vector server over real HTTP: a real server process, real Redis, real faiss and a real user tower.

Item vectors have planted clusters (cluster c = items c*50 .. c*50+49 around the unit vector e_c), so the
right answer of every query is known.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
import yaml
from conftest import ServerProcess, free_port

from common.channel_config import load_config
from common.ids import IdMap, publish_id_map
from common.keyspace import FEATURES_CHANNEL, Keyspace, pack_json
from common.local_redis import LocalRedis
from common.redis_conn import RedisStores
from common.towers import tower_bytes as state_dict_bytes
from common.towers.recent_decay import RecentDecayTower
from trainer.channels.base import VectorArtifact
from trainer.data.train_data import TrainData
from trainer.publishing import publish_channel

D, C, PER, N_USERS, R = 16, 8, 50, 20, 5
N_ITEMS = C * PER
ITEM_IDS = [f"i{j}" for j in range(N_ITEMS)]
USER_IDS = [f"u{j}" for j in range(N_USERS)]

CONFIG = {
    "channels": {
        "tw": {"kind": "u2i", "model": "two_tower"},  # hnsw (default) + user tower
        "flat": {"kind": "u2i", "model": "mf", "index": {"type": "flat"}},
        "ivf": {"kind": "u2i", "model": "mf", "index": {"type": "ivf", "nlist": 8, "nprobe": 8}},
        "off": {"kind": "u2i", "model": "mf", "enabled": False},
        "hidden": {"kind": "u2i", "model": "mf", "enabled": False},  # trained and published, served only via:
        "via": {"kind": "u2i", "from": "hidden", "index": {"type": "flat"}},
        "pop": {"kind": "list", "model": "popular"},
    }
}


def cluster_of(idx) -> np.ndarray:
    return np.asarray(idx) // PER


def clustered_items(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.eye(D, dtype=np.float32)[np.repeat(np.arange(C), PER)]
    x = centers + 0.08 * rng.standard_normal((N_ITEMS, D)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def user_vectors() -> np.ndarray:
    """User j's precomputed vector points at cluster j % C."""
    return np.eye(D, dtype=np.float32)[np.arange(N_USERS) % C]


def newest_first_tower(items: np.ndarray) -> RecentDecayTower:
    """The test channel's user tower, arch "recent_decay" of common/towers (it has no numpy twin: torch serves it):
    (user_idx, attrs, recent) → normalised Σ 0.5^j · item_vec[recent_j] + small attr bias."""
    tower = RecentDecayTower(N_ITEMS, D, R, decay=0.5, attr_sizes=[3])
    with torch.no_grad():
        tower.item_emb.weight.zero_()
        tower.item_emb.weight[:N_ITEMS] = torch.from_numpy(items)
        tower.attr_emb.weight.zero_()
        tower.attr_emb.weight[1, 5] = tower.attr_emb.weight[2, 6] = 0.01  # segment 'a' → cluster 5, 'b' → 6
    return tower


def expected_tower(items: np.ndarray, recent: list[int], segment_code: int) -> np.ndarray:
    """What newest_first_tower computes, in numpy."""
    v = sum(0.5 ** j * items[i] for j, i in enumerate(recent[:R])) + np.zeros(D, np.float32)
    v[{1: 5, 2: 6}.get(segment_code, 0)] += 0.01 if segment_code else 0.0
    return v / max(np.linalg.norm(v), 1e-12)


def tower_bytes(items: np.ndarray) -> bytes:
    return state_dict_bytes(newest_first_tower(items))


TOWER_META = {"arch": "recent_decay", "hparams": {"n_items": N_ITEMS, "dim": D, "recent_n": R, "decay": 0.5,
                                                  "attr_sizes": [3]},
              "n_users": N_USERS, "n_items": N_ITEMS, "recent_n": R, "attr_columns": ["segment"],
              "attr_vocab": {"segment": {"a": 1, "b": 2}}}


def train_data() -> TrainData:
    empty = np.empty(0, dtype=np.int32)
    return TrainData(IdMap(USER_IDS), IdMap(ITEM_IDS), empty, empty, np.empty(0, dtype=np.int64))


def publish(stores: RedisStores, config_path: Path, name: str, items: np.ndarray, users: np.ndarray | None,
            tower: bool, artifacts_dir: Path) -> str:
    spec = load_config(config_path).get(name)
    art = VectorArtifact(item_vectors=items, user_vectors=users if users is not None else np.empty((0, D), np.float32),
                         user_tower=tower_bytes(items) if tower else None,
                         user_tower_meta=TOWER_META if tower else {})
    data = train_data()
    if users is None:  # no precomputed user vectors for this channel
        data = TrainData(IdMap(), IdMap(ITEM_IDS), data.user_idx, data.item_idx, data.ts)
    return publish_channel(stores, spec, {"u2i": art}, data, artifacts_dir, progress=False)


def publish_maps(stores: RedisStores) -> None:
    publish_id_map(stores, "item", IdMap(ITEM_IDS))
    publish_id_map(stores, "user", IdMap(USER_IDS))


def write_config(tmp: Path, config: dict = CONFIG) -> Path:
    p = tmp / "channels.yaml"
    p.write_text(yaml.safe_dump(config))
    return p


def push_event(stores: RedisStores, user_id: str, item_id: str, ts: int) -> None:
    """A real-time click exactly as the feature server records it (see common/features.py)."""
    ks, db = stores.keyspace, stores("user_features")
    db.lpush(ks.realtime_recent(user_id), orjson.dumps([item_id, ts, "web", "eu"]))
    db.hincrby(ks.realtime_counters(user_id), "clicks", 1)
    db.hset(ks.realtime_counters(user_id), "last_ts", ts)


def write_user_features(stores: RedisStores, version: str, records: dict[str, dict]) -> None:
    ks = stores.keyspace
    for u, rec in records.items():
        stores("user_features").set(ks.user_features(version, u), pack_json({"user_id": u, **rec}))
    stores("meta").set(ks.current(FEATURES_CHANNEL), version)


def wait_versions(url: str, want: dict[str, str], timeout: float = 40.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(url + "/healthz", timeout=5)
        body = r.json()
        if all(body.get("channels", {}).get(c, {}).get("version") == v for c, v in want.items()):
            return body
        time.sleep(0.1)
    raise AssertionError(f"channels never reached {want}: {body}")


def exact_top(items: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(items @ q), kind="stable")[:k]


JSON = {"content-type": "application/json"}  # the services take JSON bodies only (415 otherwise)


def post(url: str, body: dict, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(url + "/search", content=orjson.dumps(body), headers=JSON, timeout=10)


# -- one server shared by the read-mostly tests (its own private Redis, so other tests' flushes don't touch it) --

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vector_stack")
    cfg = write_config(tmp)
    with LocalRedis() as rds:
        stores = RedisStores(rds.url, Keyspace())
        items = clustered_items()
        versions = {"tw": publish(stores, cfg, "tw", items, user_vectors(), True, tmp / "artifacts"),
                    "flat": publish(stores, cfg, "flat", items, user_vectors(), False, tmp / "artifacts"),
                    "ivf": publish(stores, cfg, "ivf", items, None, False, tmp / "artifacts"),
                    "via": publish(stores, cfg, "hidden", items, user_vectors(), False, tmp / "artifacts")}
        publish_maps(stores)
        write_user_features(stores, "f1", {
            "u1": {"recent": [["i0", 1000], ["i1", 999]], "attrs": {"segment": "a"}, "seen": ["i0", "i1", "i2"]},
            "newbie": {"recent": [], "attrs": {"segment": "b"}},
        })
        port = free_port()
        env = {**os.environ, "REDIS_URL": rds.url, "ARTIFACTS_DIR": str(tmp / "artifacts"), "CHANNELS_CONFIG": str(cfg),
               "VECTOR_POLL_S": "0.2", "OMP_NUM_THREADS": "1",
               "VECTOR_USER_CACHE_MB": "0"}  # precomputed user vectors read from Redis per request here
        server = ServerProcess(["services.vector_server", "serve", "--port", str(port)], env, port,
                               tmp / "server.log").start()
        try:
            wait_versions(server.url, versions)
            yield {"url": server.url, "stores": stores, "items": items, "versions": versions, "env": env,
                   "tmp": tmp}
        finally:
            server.stop()
            stores.close()


def test_healthz_lists_loaded_channels(stack):
    r = httpx.get(stack["url"] + "/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert set(body["channels"]) == {"tw", "flat", "ivf", "via"}  # enabled u2i channels only
    assert body["channels"]["via"]["publisher"] == "hidden"
    for name, kind in [("tw", "hnsw"), ("flat", "flat"), ("ivf", "ivf")]:
        ch = body["channels"][name]
        assert (ch["version"], ch["n_items"], ch["dim"], ch["index"]) == (stack["versions"][name], N_ITEMS, D, kind)
    assert body["channels"]["tw"]["tower"] is True and body["channels"]["flat"]["tower"] is False
    assert body["channels"]["tw"]["tower_runtime"] == "torch"  # an architecture without a numpy twin


@pytest.mark.parametrize("channel", ["tw", "flat", "ivf"])
def test_search_by_vector_returns_exact_neighbours(stack, channel):
    items, rng = stack["items"], np.random.default_rng(7)
    queries = [items[3], items[222], np.eye(D, dtype=np.float32)[4], rng.standard_normal(D).astype(np.float32)]
    with httpx.Client() as c:
        for q in queries:
            r = post(stack["url"], {"channel": channel, "k": 30, "vector": q.tolist()}, c)
            assert r.status_code == 200, r.text
            body = r.json()
            want = exact_top(items, q, 30)
            assert body["ids"] == want.tolist()
            assert body["item_ids"] == [ITEM_IDS[i] for i in want]
            np.testing.assert_allclose(body["scores"], (items @ q)[want], rtol=1e-5, atol=1e-5)
            assert (body["channel"], body["version"], body["source"]) == (channel, stack["versions"][channel], "vector")


def test_from_channel_serves_its_source_and_answers_to_both_names(stack):
    q = np.eye(D, dtype=np.float32)[3]
    want = exact_top(stack["items"], q, 10).tolist()
    for name in ("via", "hidden"):  # the recall server may send the publisher's name
        body = post(stack["url"], {"channel": name, "k": 10, "vector": q.tolist()}).json()
        assert (body["channel"], body["version"], body["ids"]) == (name, stack["versions"]["via"], want)
    body = post(stack["url"], {"channel": "via", "k": 10, "user_id": "u3"}).json()
    assert body["source"] == "precomputed" and set(cluster_of(body["ids"])) == {3}


def test_exclude_removes_items_and_still_returns_k(stack):
    items, q = stack["items"], stack["items"][10]
    want = exact_top(items, q, 60)
    exclude = [ITEM_IDS[i] for i in want[:5]] + ["not-an-item"]
    body = post(stack["url"], {"channel": "tw", "k": 20, "vector": q.tolist(), "exclude": exclude}).json()
    assert body["ids"] == want[5:25].tolist()
    # excluding more than a cluster's worth still yields k items (search widened to k + len(exclude))
    exclude = [ITEM_IDS[i] for i in range(0, 50)]
    body = post(stack["url"], {"channel": "tw", "k": 10, "vector": np.eye(D)[0].tolist(), "exclude": exclude}).json()
    assert len(body["ids"]) == 10 and not set(body["ids"]) & set(range(50))


@pytest.mark.parametrize("body, fragment", [
    ({"channel": "tw", "k": 5, "vector": [1.0] * (D + 1)}, f"expects d={D}"),
    ({"channel": "tw", "k": 5, "vector": [1.0] * 3}, "dimension 3"),
    ({"channel": "nope", "k": 5, "vector": [1.0] * D}, "unknown channel 'nope'"),
    ({"channel": "off", "k": 5, "vector": [1.0] * D}, "known u2i channels: ['flat', 'ivf', 'tw', 'via']"),
    ({"channel": "pop", "k": 5, "user_id": "u1"}, "unknown channel 'pop'"),
    ({"channel": "tw", "k": 0, "vector": [1.0] * D}, "'k'"),
    ({"channel": "tw", "k": 1001, "vector": [1.0] * D}, "between 1 and 1000"),
    ({"channel": "tw", "k": "5", "vector": [1.0] * D}, "'k'"),
    ({"channel": "tw", "k": 5}, "exactly one of 'vector' or 'user_id'"),
    ({"channel": "tw", "k": 5, "vector": [1.0] * D, "user_id": "u1"}, "exactly one of 'vector' or 'user_id'"),
    ({"channel": "tw", "k": 5, "vector": ["x"] * D}, "'vector' must be a list of numbers"),
    ({"channel": "tw", "k": 5, "vector": [1.0] * D, "exclude": "i1"}, "'exclude'"),
    ({"k": 5, "vector": [1.0] * D}, "'channel'"),
    ({"channel": "tw", "k": 5, "user_id": "u1", "color": 1}, "unknown field(s) ['color']"),
])
def test_bad_requests_are_422_naming_the_problem(stack, body, fragment):
    r = post(stack["url"], body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_non_json_body_is_422(stack):
    r = httpx.post(stack["url"] + "/search", content=b"{not json", headers=JSON)
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


def test_user_search_uses_precomputed_vector_without_tower(stack):
    body = post(stack["url"], {"channel": "flat", "k": 20, "user_id": "u3"}).json()
    assert body["source"] == "precomputed"
    assert body["ids"] == exact_top(stack["items"], user_vectors()[3], 20).tolist()
    assert set(cluster_of(body["ids"])) == {3}
    # exclude_seen without a tower: the user's clicks (real-time included) are read and removed
    push_event(stack["stores"], "u3", ITEM_IDS[body["ids"][0]], 3000)
    again = post(stack["url"], {"channel": "flat", "k": 20, "user_id": "u3", "exclude_seen": True}).json()
    assert again["ids"] == body["ids"][1:] + exact_top(stack["items"], user_vectors()[3], 21)[20:].tolist()


def test_precomputed_user_results_answer_like_a_search(stack):
    """User vectors held in memory: a channel without a tower searches every user once after loading and answers
    searches by user from those results (exclude and exclude_seen applied), exactly as a live search would."""
    port = free_port()
    env = {**stack["env"], "VECTOR_USER_CACHE_MB": "64"}
    server = ServerProcess(["services.vector_server", "serve", "--port", str(port)], env, port,
                           stack["tmp"] / "server-precompute.log").start()
    try:
        body = wait_versions(server.url, {n: stack["versions"][n] for n in ("tw", "flat", "via")})
        deadline = time.monotonic() + 30
        while body["precomputing"] or "flat" not in body["channels"] or "via" not in body["channels"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
            body = httpx.get(server.url + "/healthz").json()
        assert body["channels"]["flat"]["precomputed_results"] == {"users": N_USERS, "k": 100}
        assert body["channels"]["tw"]["precomputed_results"] is None  # a tower: the query changes with clicks
        items = stack["items"]
        for u in (3, 4, 11):
            want = exact_top(items, user_vectors()[u], 100)
            got = post(server.url, {"channel": "flat", "k": 20, "user_id": f"u{u}"}).json()
            assert got["source"] == "precomputed" and got["ids"] == want[:20].tolist()
            excl = [ITEM_IDS[i] for i in want[:7:2]]
            got = post(server.url, {"channel": "via", "k": 20, "user_id": f"u{u}", "exclude": excl}).json()
            assert got["ids"] == [i for i in want if ITEM_IDS[i] not in excl][:20]
        # more than the stored 100 survive no exclusion: answered by a live search, same result
        got = post(server.url, {"channel": "flat", "k": 150, "user_id": "u3"}).json()
        assert got["ids"] == exact_top(items, user_vectors()[3], 150).tolist()
        excl = [ITEM_IDS[i] for i in exact_top(items, user_vectors()[5], 95)]
        got = post(server.url, {"channel": "flat", "k": 10, "user_id": "u5", "exclude": excl}).json()
        assert got["ids"] == exact_top(items, user_vectors()[5], 105)[95:].tolist()
        # real-time clicks with exclude_seen
        push_event(stack["stores"], "u6", ITEM_IDS[int(exact_top(items, user_vectors()[6], 1)[0])], 3100)
        got = post(server.url, {"channel": "flat", "k": 5, "user_id": "u6", "exclude_seen": True}).json()
        assert got["ids"] == exact_top(items, user_vectors()[6], 6)[1:].tolist()
        r = post(server.url, {"channel": "flat", "k": 5, "user_id": "ghost"})
        assert r.status_code == 404
    finally:
        server.stop()


def test_unknown_user_in_channel_without_tower_is_404(stack):
    r = post(stack["url"], {"channel": "flat", "k": 5, "user_id": "ghost"})
    assert r.status_code == 404
    assert r.json()["detail"] == "no vector for user 'ghost' in channel 'flat'"
    # the tower channel: no clicks, no attributes → zero vector → no precomputed either → 404
    r = post(stack["url"], {"channel": "tw", "k": 5, "user_id": "ghost"})
    assert r.status_code == 404


def test_tower_vector_follows_realtime_events(stack):
    url, stores = stack["url"], stack["stores"]
    body = post(url, {"channel": "tw", "k": 20, "user_id": "u1"}).json()
    assert body["source"] == "tower"
    assert set(cluster_of(body["ids"])) == {0}  # batch record: recent clicks in cluster 0
    push_event(stores, "u1", "i130", 2000)  # a click a moment ago, in cluster 2
    body = post(url, {"channel": "tw", "k": 20, "user_id": "u1"}).json()
    assert body["source"] == "tower"
    assert set(cluster_of(body["ids"])) == {2}
    assert body["ids"] == exact_top(stack["items"], expected_tower(stack["items"], [130, 0, 1], 1), 20).tolist()
    body = post(url, {"channel": "tw", "k": 20, "user_id": "u1", "exclude_seen": True}).json()
    assert not {"i0", "i1", "i2", "i130"} & set(body["item_ids"]) and len(body["ids"]) == 20


def test_tower_recent_override_and_attributes(stack):
    url = stack["url"]
    body = post(url, {"channel": "tw", "k": 10, "user_id": "u1", "recent": ["i260"]}).json()
    assert set(cluster_of(body["ids"])) == {5}
    assert body["ids"] == exact_top(stack["items"], expected_tower(stack["items"], [260], 1), 10).tolist()
    # a user with no clicks at all: only the attribute (segment 'b' → cluster 6) drives the tower
    body = post(url, {"channel": "tw", "k": 10, "user_id": "newbie"}).json()
    assert body["source"] == "tower" and set(cluster_of(body["ids"])) == {6}
    # an id unknown to the id maps still works through real-time clicks (OOV user index)
    push_event(stack["stores"], "brand-new", "i370", 5000)
    body = post(url, {"channel": "tw", "k": 10, "user_id": "brand-new"}).json()
    assert body["source"] == "tower" and set(cluster_of(body["ids"])) == {7}


def post_user(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/search/user", content=orjson.dumps(body), headers=JSON, timeout=10)


def test_search_user_answers_several_channels_in_one_call(stack):
    url, items = stack["url"], stack["items"]
    r = post_user(url, {"user_id": "u3", "channels": {"flat": 7, "tw": 5, "ivf": 4, "hidden": 3},
                        "recent": ["i260"], "attrs": {"segment": "a"}, "exclude": ["i250"]})
    assert r.status_code == 200
    res = r.json()["results"]
    assert list(res) == ["flat", "tw", "ivf", "hidden"]  # the order asked for
    flat = res["flat"]
    assert flat["status"] == 200 and flat["source"] == "precomputed" and flat["version"] == stack["versions"]["flat"]
    assert flat["ids"] == exact_top(items, user_vectors()[3], 7).tolist()
    assert flat["item_ids"] == [ITEM_IDS[i] for i in flat["ids"]]
    tw = res["tw"]  # the tower used the recent items and attributes sent, not the stored state
    assert tw["source"] == "tower"
    want = [i for i in exact_top(items, expected_tower(items, [260], 1), 6).tolist() if i != 250][:5]
    assert tw["ids"] == want
    assert res["ivf"] == {"status": 404, "detail": "no vector for user 'u3' in channel 'ivf'"}
    assert res["hidden"]["status"] == 200 and res["hidden"]["source"] == "precomputed"  # a `from:` source's name
    # item_ids: false leaves the external ids out (the recall server maps internal ids itself)
    lean = post_user(url, {"user_id": "u3", "channels": {"flat": 3}, "item_ids": False}).json()["results"]["flat"]
    assert "item_ids" not in lean and lean["ids"] == flat["ids"][:3]


@pytest.mark.parametrize("body, fragment", [
    ({"channels": {"flat": 3}}, "'user_id'"),
    ({"user_id": "u1"}, "'channels'"),
    ({"user_id": "u1", "channels": {}}, "'channels'"),
    ({"user_id": "u1", "channels": {"flat": 0}}, "k of 'flat'"),
    ({"user_id": "u1", "channels": {"nope": 3}}, "unknown channel 'nope'"),
    ({"user_id": "u1", "channels": {"flat": 3}, "attrs": [1]}, "'attrs'"),
    ({"user_id": "u1", "channels": {"flat": 3}, "recent": "i1"}, "'recent'"),
    ({"user_id": "u1", "channels": {"flat": 3}, "colour": 1}, "unknown field(s) ['colour']"),
])
def test_search_user_bad_requests_are_422(stack, body, fragment):
    r = post_user(stack["url"], body)
    assert r.status_code == 422 and fragment in r.json()["detail"], r.text


def test_metrics_expose_latency_versions_and_swaps(stack):
    post(stack["url"], {"channel": "flat", "k": 5, "user_id": "u2"})
    post(stack["url"], {"channel": "nope", "k": 5, "user_id": "u2"})
    text = httpx.get(stack["url"] + "/metrics").text
    assert 'vector_search_seconds_count{channel="flat",source="precomputed"}' in text
    assert f'vector_channel_version_info{{channel="tw",version="{stack["versions"]["tw"]}"}} 1.0' in text
    assert 'vector_swaps_total{channel="ivf"} 1.0' in text
    assert f'vector_index_items{{channel="flat"}} {float(N_ITEMS)}' in text
    assert 'vector_search_errors_total{channel="_unknown",status="422"}' in text


def test_async_client_typed_errors(stack):
    from services.vector_server.client import (
        VectorBadRequest,
        VectorClient,
        VectorNotFound,
        VectorServerTimeout,
        VectorServerUnavailable,
    )

    silent = socket.socket()  # accepts connections (backlog) but never answers → a read timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)

    async def main():
        async with VectorClient(stack["url"], timeout_s=5) as vc:
            body = await vc.search_user("flat", "u4", 7, exclude=["i200"])
            assert body["source"] == "precomputed" and len(body["ids"]) == 7 and 200 not in body["ids"]
            body = await vc.search_vector("tw", np.eye(D)[1], 3)
            assert set(cluster_of(body["ids"])) == {1}
            with pytest.raises(VectorNotFound):
                await vc.search_user("flat", "ghost", 5)
            with pytest.raises(VectorBadRequest, match="unknown channel"):
                await vc.search_user("nope", "u1", 5)
        async with VectorClient(f"http://127.0.0.1:{free_port()}", timeout_s=1) as vc:
            with pytest.raises(VectorServerUnavailable):
                await vc.search_user("flat", "u1", 5)
        async with VectorClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.2) as vc:
            with pytest.raises(VectorServerTimeout):
                await vc.search_user("flat", "u1", 5)

    try:
        asyncio.run(main())
    finally:
        silent.close()


# -- hot swap under concurrent requests ---------------------------------------------------------------

def swap_items(version: int) -> np.ndarray:
    """v1: items 0..199 point along e0; v2: items 200..399 do. A query along e0 tells the versions apart."""
    rng = np.random.default_rng(version)
    x = np.zeros((N_ITEMS, D), np.float32)
    near, far = (slice(0, 200), slice(200, 400)) if version == 1 else (slice(200, 400), slice(0, 200))
    x[near, 0] = 1.0
    x[far, 1] = 1.0
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hot_swap_under_concurrent_requests(stores, settings, start_server, tmp_path):
    cfg = write_config(tmp_path, {"channels": {"emb": {"kind": "u2i", "model": "mf"}}})
    server = start_server(["services.vector_server", "serve", "--poll-s", "0.1"], {"CHANNELS_CONFIG": str(cfg)})
    # nothing published yet: Redis answers, no channels, 503 "degraded" naming what is missing, and a search 503
    # that says why
    r = httpx.get(server.url + "/healthz")
    h = r.json()
    assert r.status_code == 503 and h["status"] == "degraded" and h["channels"] == {} and "emb" in h["missing"]
    r = post(server.url, {"channel": "emb", "k": 5, "vector": [1.0] * D})
    assert r.status_code == 503 and "no published version" in r.json()["detail"]

    users = np.zeros((N_USERS, D), np.float32)
    users[:, 0] = 1.0  # every user looks along e0 in both versions
    v1 = publish(stores, cfg, "emb", swap_items(1), users, False, settings.artifacts_dir)
    publish_maps(stores)
    wait_versions(server.url, {"emb": v1})

    results: list[tuple[str, bool, bool, int]] = []  # (version, all ids in v1's answer, all in v2's, count)
    errors: list[str] = []
    stop = threading.Event()
    q = np.eye(D, dtype=np.float32)[0].tolist()

    def hammer(worker: int) -> None:
        with httpx.Client() as c:
            for n in range(5000):  # bounded; normally stopped much earlier
                if stop.is_set():
                    return
                body = {"channel": "emb", "k": 50, "vector": q} if (n + worker) % 2 else \
                    {"channel": "emb", "k": 50, "user_id": f"u{n % N_USERS}"}
                r = post(server.url, body, c)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text}")
                    continue
                b = r.json()
                ids = np.asarray(b["ids"])
                results.append((b["version"], bool((ids < 200).all()), bool((ids >= 200).all()), len(ids)))

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        v2 = publish(stores, cfg, "emb", swap_items(2), users, False, settings.artifacts_dir)
        wait_versions(server.url, {"emb": v2})
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert {v for v, *_ in results} == {v1, v2}  # both versions answered, nothing else
    bad = [r for r in results if r[3] != 50 or not (r[1] if r[0] == v1 else r[2])]
    assert not bad, bad[:5]  # every answer is wholly one version's: no mixing
    assert 'vector_swaps_total{channel="emb"} 2.0' in httpx.get(server.url + "/metrics").text


# -- Redis outage ------------------------------------------------------------------------------------------------

def test_redis_down_user_search_503_vector_search_still_answers(start_server, tmp_path):
    cfg = write_config(tmp_path, {"channels": {"tw": {"kind": "u2i", "model": "two_tower"},
                                                "flat": {"kind": "u2i", "model": "mf", "index": {"type": "flat"}}}})
    rds = LocalRedis().start()
    try:
        stores = RedisStores(rds.url, Keyspace())
        items = clustered_items()
        v = publish(stores, cfg, "tw", items, user_vectors(), True, tmp_path / "artifacts")
        vflat = publish(stores, cfg, "flat", items, user_vectors(), False, tmp_path / "artifacts")
        publish_maps(stores)
        push_event(stores, "u1", "i60", 100)
        stores.close()
        server = start_server(["services.vector_server", "serve", "--poll-s", "0.2"],
                              {"CHANNELS_CONFIG": str(cfg), "REDIS_URL": rds.url})
        wait_versions(server.url, {"tw": v, "flat": vflat})
        body = post(server.url, {"channel": "tw", "k": 5, "user_id": "u1"}).json()
        assert body["source"] == "tower" and set(cluster_of(body["ids"])) == {1}
    finally:
        rds.stop()
    r = post(server.url, {"channel": "tw", "k": 5, "user_id": "u1"})
    assert r.status_code == 503 and "Redis" in r.json()["detail"]
    # precomputed user vectors are held in memory (VECTOR_USER_CACHE_MB): no Redis needed
    r = post(server.url, {"channel": "flat", "k": 5, "user_id": "u3"})
    assert r.status_code == 200 and r.json()["source"] == "precomputed"
    assert r.json()["ids"] == exact_top(items, user_vectors()[3], 5).tolist()
    assert post(server.url, {"channel": "flat", "k": 5, "user_id": "ghost"}).status_code == 404
    r = post(server.url, {"channel": "tw", "k": 5, "vector": np.eye(D)[2].tolist()})
    assert r.status_code == 200 and set(cluster_of(r.json()["ids"])) == {2} and r.json()["version"] == v
    # the recall server's call carries the user's recent items and attributes: the tower needs no Redis
    r = post_user(server.url, {"user_id": "u1", "channels": {"tw": 5}, "recent": ["i130"], "attrs": {}})
    assert r.status_code == 200 and set(cluster_of(r.json()["results"]["tw"]["ids"])) == {2}
    r = post_user(server.url, {"user_id": "u1", "channels": {"tw": 5}})  # state needed → 503 naming Redis
    assert r.status_code == 503 and "Redis" in r.json()["detail"]
    h = httpx.get(server.url + "/healthz")
    assert h.status_code == 503 and "Redis" in h.json()["detail"]
    assert h.json()["channels"]["tw"]["version"] == v  # still serving from memory


@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw"}, {"type": "ivf", "nlist": 8, "nprobe": 8}])
def test_bundle_precomputed_search_matches_live_search(index):
    """In process: `Bundle.precompute` then `precomputed_search` gives what `search` gives on the user's vector,
    and declines (None) when exclusions leave fewer than k of the stored results, or when nothing was stored."""
    from common.channel_config import IndexParams
    from services.vector_server.index import Bundle, build_index

    items, users = clustered_items(), user_vectors()
    params = IndexParams(**index, precompute_k=40)
    faiss_index, keep, desc = build_index(items, params)
    bundle = Bundle(channel="c", publisher="c", version="v1", dim=D, n_items=N_ITEMS, n_indexed=N_ITEMS,
                    index_type=params.type, index_desc=desc, index=faiss_index, row_to_item=None, normalize=False,
                    nprobe=params.nprobe, keep=keep, user_vectors=users, user_present=np.ones(N_USERS, bool),
                    user_map=IdMap(USER_IDS))
    assert bundle.precomputed_search("u1", 5) is None  # not computed yet: callers search live
    assert bundle.precompute(params, max_bytes=N_USERS * 40 * 8 - 1) is False  # does not fit
    stop = threading.Event()
    stop.set()  # the server is shutting down: give up before the first batch
    assert bundle.precompute(params, max_bytes=2**20, stop=stop) is False and bundle.user_top is None
    assert bundle.precompute(params, max_bytes=2**20) is True
    assert bundle.user_top[0].shape == (N_USERS, 40)
    for u in range(N_USERS):
        want_ids, want_scores = bundle.search(users[u], 40)
        for k, excl in [(10, None), (25, want_ids[:10:3]), (30, want_ids[5:15])]:
            got = bundle.precomputed_search(f"u{u}", k, None if excl is None else np.sort(excl))
            live = bundle.search(users[u], k, None if excl is None else np.sort(excl))
            assert got is not None
            np.testing.assert_array_equal(got[0], live[0])
            np.testing.assert_allclose(got[1], live[1], rtol=1e-5)
        assert bundle.precomputed_search(f"u{u}", 35, np.sort(want_ids[:10])) is None  # 30 left < 35
    assert bundle.precomputed_search("ghost", 5) is None
    off = IndexParams(**index, precompute_k=0)
    assert Bundle(**{**bundle.__dict__, "user_top": None}).precompute(off, 2**20) is False


def test_search_user_body_in_several_chunks(stack):
    """POST /search/user is served by an ASGI fast path (common/fast_path.py) that reads the body itself: a chunked body arrives in
    several messages and must be joined."""
    body = orjson.dumps({"user_id": "u3", "channels": {"flat": 5}, "item_ids": False})

    def chunks():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    r = httpx.post(stack["url"] + "/search/user", content=chunks(), headers=JSON, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["results"]["flat"]["ids"] == exact_top(stack["items"], user_vectors()[3], 5).tolist()
    r = httpx.post(stack["url"] + "/search/user", content=(p for p in (b'{"user_id": ', b'"u3"}')), headers=JSON,
                   timeout=10)
    assert r.status_code == 422 and "'channels'" in r.json()["detail"]
