"""K vectors per user, end to end: publishing ([n_users, K, d] user vectors with per-user interest counts), the
vector server (each live interest searched, merged by max score per item, over HTTP, live and precomputed) and
the offline path (recommend_from_artifact), all through common.retrieval's one merge; K = 1 is today's path.

Planted: 4 well-separated clusters of 30 items (around e_0 … e_3); user "two" has interests e_0 and e_2, user
"one" e_1 plus a second interest cut by its count of 1, user "zero" e_3 plus an all-zero row, user "none" no
live interest at all.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import yaml
from conftest import ServerProcess, free_port

from common import retrieval
from common.channel_config import IndexParams, ServeParams, load_config
from common.ids import IdMap, publish_id_map
from common.keyspace import Keyspace, pack_vector
from common.local_redis import LocalRedis
from common.publish import read_manifest
from common.redis_conn import RedisStores
from trainer.channels.base import VectorArtifact, recommend_from_artifact
from trainer.data.train_data import TrainData
from trainer.publishing import publish_channel

D, C, PER = 8, 4, 30
N_ITEMS = C * PER
ITEM_IDS = [f"i{j}" for j in range(N_ITEMS)]
USER_IDS = ["two", "one", "zero", "none", "solo"]
TWO, ONE, ZERO, NONE, SOLO = range(len(USER_IDS))

CONFIG = {"channels": {
    "multi": {"kind": "u2i", "model": "mf", "index": {"type": "flat"}},  # K = 2
    "multi_hnsw": {"kind": "u2i", "model": "mf"},  # K = 2, the default HNSW index
    "single": {"kind": "u2i", "model": "mf", "index": {"type": "flat"}},  # 2-D user vectors (today)
    "single3d": {"kind": "u2i", "model": "mf", "index": {"type": "flat"}},  # [n_users, 1, d]: K = 1
}}


def write_config(tmp: Path, config: dict) -> Path:
    p = tmp / "channels.yaml"
    p.write_text(yaml.safe_dump(config))
    return p


def wait_versions(url: str, want: dict[str, str], timeout: float = 40.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = httpx.get(url + "/healthz", timeout=5).json()
        if all(body.get("channels", {}).get(c, {}).get("version") == v for c, v in want.items()):
            return body
        time.sleep(0.1)
    raise AssertionError(f"channels never reached {want}: {body}")


def cluster_of(idx) -> np.ndarray:
    return np.asarray(idx) // PER


def items() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.eye(D, dtype=np.float32)[np.repeat(np.arange(C), PER)] + 0.1 * rng.standard_normal((N_ITEMS, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def interests() -> tuple[np.ndarray, np.ndarray]:
    """([n_users, 2, D] user vectors, interest counts)."""
    e = np.eye(D, dtype=np.float32)
    uv = np.zeros((len(USER_IDS), 2, D), np.float32)
    uv[TWO] = [e[0], 0.95 * e[2]]
    uv[ONE] = [e[1], e[3]]  # the second row is past the count: published as zero, never searched
    uv[ZERO] = [e[3], 0.0 * e[0]]
    uv[SOLO] = [e[2], e[2] * 0]
    counts = np.array([2, 1, 2, 0, 1], np.int32)
    return uv, counts


def multi_artifact() -> VectorArtifact:
    uv, counts = interests()
    return VectorArtifact(item_vectors=items(), user_vectors=uv, interest_counts=counts)


def single_vectors() -> np.ndarray:
    return np.eye(D, dtype=np.float32)[[0, 1, 3, 2, 2]]


def data_with_seen() -> TrainData:
    """Each user has clicked the first item of its first interest's cluster."""
    seen = np.array([0, PER, 3 * PER, 0, 2 * PER], np.int32)
    return TrainData(IdMap(USER_IDS), IdMap(ITEM_IDS), np.arange(len(USER_IDS), dtype=np.int32), seen,
                     np.full(len(USER_IDS), 1000, np.int64))


def expected(user: int, k: int, exclude: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: each item's best score over the user's live interests, exclusions removed, top k."""
    uv, counts = interests()
    live = [v for v in uv[user][: counts[user]] if v.any()]
    if not live:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    best = np.max(np.stack([items() @ v for v in live]), axis=0)
    order = [i for i in np.lexsort((np.arange(N_ITEMS), -best)) if i not in set(exclude or [])][:k]
    return np.array(order), best[order]


# -- common.retrieval ---------------------------------------------------------------------------------------

def test_merge_interests_takes_the_best_score_per_item_once():
    a = (np.array([5, 3, 9]), np.array([0.9, 0.5, 0.1], np.float32))
    b = (np.array([3, 7, 5, -1]), np.array([0.8, 0.6, 0.2, 0.0], np.float32))  # -1: faiss padding
    ids, scores = retrieval.merge_interests([a, b], 10)
    assert ids.tolist() == [5, 3, 7, 9]
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.6, 0.1])
    ids, _ = retrieval.merge_interests([a, b], 2, exclude=np.array([5]))
    assert ids.tolist() == [3, 7]
    tie = retrieval.merge_interests([(np.array([4]), np.array([0.5], np.float32)),
                                     (np.array([2]), np.array([0.5], np.float32))], 2)
    assert tie[0].tolist() == [2, 4]  # ties by ascending id
    assert len(retrieval.merge_interests([], 5)[0]) == 0


def test_live_interests_drop_zero_and_non_finite_rows():
    x = np.array([[1, 0], [0, 0], [np.nan, 1], [0, 2]], np.float32)
    np.testing.assert_array_equal(retrieval.live_interests(x), [[1, 0], [0, 2]])
    assert retrieval.live_interests(x[None]).shape == (2, 2)  # [1, K, d] (a tower's output)
    assert retrieval.live_interests(x.ravel(), dim=2).shape == (2, 2)  # K·d flat floats


def test_retrieve_vectors_k1_is_retrieve_vector_and_k2_merges():
    it, uv = items(), single_vectors()
    for u in range(len(USER_IDS)):
        for excl in (None, np.array([1, 2, 40])):
            want = retrieval.retrieve_vector(uv[u], it, 15, excl)
            for q in (uv[u], uv[u][None, :]):  # [d] and [1, d]
                got = retrieval.retrieve_vectors(q, it, 15, excl)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
    zero = np.zeros(D, np.float32)  # one zero vector: answered as today (every score 0), not dropped
    np.testing.assert_array_equal(retrieval.retrieve_vectors(zero, it, 5)[0], retrieval.retrieve_vector(zero, it, 5)[0])
    uv2, counts = interests()
    for u in (TWO, ZERO):
        for excl in (None, [0, 1, 2 * PER]):
            got = retrieval.retrieve_vectors(uv2[u], it, 40, None if excl is None else np.array(excl))
            want = expected(u, 40, excl)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    assert len(retrieval.retrieve_vectors(np.zeros((2, D), np.float32), it, 5)[0]) == 0  # no live interest


def test_merge_interest_rows_is_merge_interests_per_row():
    rng = np.random.default_rng(1)
    owner = np.array([0, 0, 2, 2, 2, 3])
    ids = rng.integers(0, 30, (6, 8))
    ids[5, 6:] = -1
    scores = rng.random((6, 8)).astype(np.float32)
    got_ids, got_scores = retrieval.merge_interest_rows(owner, ids, scores, 5, 6)
    for r in range(5):
        want = retrieval.merge_interests([(ids[j], scores[j]) for j in np.flatnonzero(owner == r)], 6)
        n = len(want[0])
        np.testing.assert_array_equal(got_ids[r, :n], want[0])
        np.testing.assert_array_equal(got_scores[r, :n], want[1])
        assert (got_ids[r, n:] == -1).all()


# -- offline: recommend_from_artifact ---------------------------------------------------------------------------

def test_recommend_from_artifact_finds_each_interest():
    data, art = data_with_seen(), multi_artifact()
    recs = recommend_from_artifact(art, "u2i", data, np.arange(len(USER_IDS)), 40, ServeParams())
    ids = recs[TWO][0]
    assert set(cluster_of(ids)) == {0, 2} and 0 not in ids  # both interests, the seen item excluded
    assert (cluster_of(ids) == 2).sum() >= 5
    np.testing.assert_array_equal(ids, expected(TWO, 40, [0])[0])
    assert set(cluster_of(recs[ONE][0][:25])) == {1}  # its second interest is past its count
    assert set(cluster_of(recs[ZERO][0][:25])) == {3}  # a zero interest is dropped
    assert len(recs[NONE][0]) == 0
    # K = 1: a [n, 1, d] artifact answers exactly as the 2-D one
    flat = VectorArtifact(item_vectors=items(), user_vectors=single_vectors())
    one = VectorArtifact(item_vectors=items(), user_vectors=single_vectors()[:, None, :])
    users = np.arange(len(USER_IDS))
    for (a_ids, a_sc), (b_ids, b_sc) in zip(recommend_from_artifact(flat, "u2i", data, users, 30, ServeParams()),
                                            recommend_from_artifact(one, "u2i", data, users, 30, ServeParams()),
                                            strict=True):
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_sc, b_sc)


# -- publishing ---------------------------------------------------------------------------------------------

def test_publish_writes_k_times_d_floats_per_user(stores, settings, tmp_path):
    cfg = load_config(write_config(tmp_path, CONFIG))
    data = data_with_seen()
    ks = stores.keyspace
    ver = publish_channel(stores, cfg.get("multi"), {"u2i": multi_artifact()}, data, settings.artifacts_dir,
                          progress=False)
    manifest = read_manifest(stores, "multi", ver)
    assert manifest["n_interests"] == 2 and manifest["counts"]["user_vectors"] == len(USER_IDS)
    assert manifest["counts"]["interests"] == 2 + 1 + 1 + 0 + 1
    published = multi_artifact().published_user_vectors()
    assert not published[ONE, 1].any() and published[TWO, 1].any()
    for u, uid in enumerate(USER_IDS):
        value = stores("user_emb").get(ks.user_vector("multi", ver, uid))
        assert value == pack_vector(published[u]) and len(value) == 2 * D * 4
    out = settings.artifacts_dir / "multi" / ver
    np.testing.assert_array_equal(np.load(out / "interest_counts.npy"), [2, 1, 1, 0, 1])
    assert np.load(out / "user_vectors.npy").shape == (len(USER_IDS), 2, D)
    # K = 1: byte-identical to a 2-D artifact, n_interests 1
    v2 = publish_channel(stores, cfg.get("single"), {"u2i": VectorArtifact(items(), single_vectors())}, data,
                         settings.artifacts_dir, progress=False)
    v3 = publish_channel(stores, cfg.get("single3d"), {"u2i": VectorArtifact(items(), single_vectors()[:, None])},
                         data, settings.artifacts_dir, progress=False)
    assert read_manifest(stores, "single", v2)["n_interests"] == read_manifest(stores, "single3d", v3)["n_interests"] == 1
    for u, uid in enumerate(USER_IDS):
        a = stores("user_emb").get(ks.user_vector("single", v2, uid))
        assert a == stores("user_emb").get(ks.user_vector("single3d", v3, uid)) == pack_vector(single_vectors()[u])


# -- the vector server: Bundle ----------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw", "ef_search": 16},
                                   {"type": "ivf", "nlist": 4, "nprobe": 4}], ids=["flat", "hnsw", "ivf"])
def test_bundle_searches_each_interest_and_precomputes_them(index):
    from services.vector_server.index import Bundle, build_index

    it = items()
    uv = multi_artifact().published_user_vectors()
    params = IndexParams(**index, precompute_k=40)
    faiss_index, keep, desc = build_index(it, params)
    bundle = Bundle(channel="c", publisher="c", version="v1", dim=D, n_items=N_ITEMS, n_indexed=N_ITEMS,
                    index_type=params.type, index_desc=desc, index=faiss_index, row_to_item=None, normalize=False,
                    nprobe=params.nprobe, keep=keep, user_vectors=uv, user_present=np.ones(len(USER_IDS), bool),
                    user_map=IdMap(USER_IDS), n_interests=2)
    for u in (TWO, ONE, ZERO):
        want = expected(u, 30)
        for q in (uv[u], uv[u][None], uv[u].ravel()):  # [K, d], a tower's [1, K, d], K·d floats
            ids, scores = bundle.search(q, 30)
            np.testing.assert_array_equal(ids, want[0])
            np.testing.assert_allclose(scores, want[1], rtol=1e-5)
    ids, _ = bundle.search(uv[TWO], 10, np.array([0, 1, 2, 2 * PER]))
    np.testing.assert_array_equal(ids, expected(TWO, 10, [0, 1, 2, 2 * PER])[0])
    assert len(bundle.search(uv[NONE], 10)[0]) == 0
    # one live interest: today's single-vector search
    np.testing.assert_array_equal(bundle.search(uv[ONE], 12)[0], bundle.search(uv[ONE][0], 12)[0])
    # precomputed per-user results: the merged lists, answering exactly like a live search
    assert bundle.precompute(params, max_bytes=2**20, stop=threading.Event()) is True
    assert bundle.user_top[0].shape == (len(USER_IDS), 40)
    for u, uid in enumerate(USER_IDS):
        for k, excl in [(10, None), (20, np.array([0, 5, 2 * PER + 1]))]:
            got = bundle.precomputed_search(uid, k, excl)
            live = bundle.search(uv[u], k, excl)
            if u == NONE:  # nothing stored, nothing found live
                assert got is None and len(live[0]) == 0
                continue
            assert got is not None
            np.testing.assert_array_equal(got[0], live[0])
            np.testing.assert_allclose(got[1], live[1], rtol=1e-5)


# -- the vector server over HTTP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interests")
    cfg_path = write_config(tmp, CONFIG)
    cfg = load_config(cfg_path)
    data = data_with_seen()
    with LocalRedis() as rds:
        stores = RedisStores(rds.url, Keyspace())
        art = multi_artifact()
        versions = {
            "multi": publish_channel(stores, cfg.get("multi"), {"u2i": art}, data, tmp / "artifacts", progress=False),
            "multi_hnsw": publish_channel(stores, cfg.get("multi_hnsw"), {"u2i": art}, data, tmp / "artifacts",
                                          progress=False),
            "single": publish_channel(stores, cfg.get("single"), {"u2i": VectorArtifact(items(), single_vectors())},
                                      data, tmp / "artifacts", progress=False),
            "single3d": publish_channel(stores, cfg.get("single3d"),
                                        {"u2i": VectorArtifact(items(), single_vectors()[:, None])}, data,
                                        tmp / "artifacts", progress=False)}
        publish_id_map(stores, "item", IdMap(ITEM_IDS))
        publish_id_map(stores, "user", IdMap(USER_IDS))
        env = {**os.environ, "REDIS_URL": rds.url, "ARTIFACTS_DIR": str(tmp / "artifacts"),
               "CHANNELS_CONFIG": str(cfg_path), "VECTOR_POLL_S": "0.2", "OMP_NUM_THREADS": "1"}
        servers = {}
        try:
            for mode, cache_mb in (("redis", "0"), ("memory", "64")):  # user vectors per request / held + precomputed
                port = free_port()
                servers[mode] = ServerProcess(["services.vector_server", "serve", "--port", str(port)],
                                              {**env, "VECTOR_USER_CACHE_MB": cache_mb}, port,
                                              tmp / f"server-{mode}.log").start()
                wait_versions(servers[mode].url, versions)
            yield {mode: s.url for mode, s in servers.items()}
        finally:
            for s in servers.values():
                s.stop()
            stores.close()


JSON = {"content-type": "application/json"}  # the services take JSON bodies only (415 otherwise)


def search(url: str, body: dict) -> dict:
    r = httpx.post(url + "/search", content=orjson.dumps(body), headers=JSON, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("mode", ["redis", "memory"])
def test_http_search_by_user_finds_each_interest(server, mode):
    url = server[mode]
    if mode == "memory":  # wait for the precomputed results of the K = 2 channels
        for _ in range(300):
            body = httpx.get(url + "/healthz").json()
            if not body["precomputing"] and body["channels"]["multi"]["precomputed_results"]:
                break
            time.sleep(0.1)
        assert body["channels"]["multi"]["precomputed_results"] == {"users": len(USER_IDS), "k": 100}
        assert body["channels"]["multi"]["n_interests"] == 2
    for channel in ("multi", "multi_hnsw"):
        got = search(url, {"channel": channel, "k": 40, "user_id": "two"})
        assert got["source"] == "precomputed"
        want_ids, want_scores = expected(TWO, 40)
        assert got["ids"] == want_ids.tolist()
        np.testing.assert_allclose(got["scores"], want_scores, rtol=1e-5)
        assert {0, 2} == set(cluster_of(got["ids"]))
        excl = [0, 1, 2 * PER, 2 * PER + 3]
        got = search(url, {"channel": channel, "k": 20, "user_id": "two", "exclude": [ITEM_IDS[i] for i in excl]})
        assert got["ids"] == expected(TWO, 20, excl)[0].tolist()
        # a second interest past the count, and a zero interest: dropped
        assert set(cluster_of(search(url, {"channel": channel, "k": 25, "user_id": "one"})["ids"])) == {1}
        assert search(url, {"channel": channel, "k": 30, "user_id": "zero"})["ids"] == expected(ZERO, 30)[0].tolist()
        assert search(url, {"channel": channel, "k": 30, "user_id": "none"})["ids"] == []
    # several channels in one call, K = 2 and K = 1 side by side
    r = httpx.post(url + "/search/user", content=orjson.dumps({"user_id": "two", "channels": {"multi": 10,
                                                                                              "single": 10}}),
                   headers=JSON, timeout=10)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res["multi"]["ids"] == expected(TWO, 10)[0].tolist()
    assert set(cluster_of(res["single"]["ids"])) == {0}


@pytest.mark.parametrize("mode", ["redis", "memory"])
def test_http_k1_is_identical_to_the_2d_path(server, mode):
    url = server[mode]
    for user in USER_IDS:
        for body in ({"k": 25}, {"k": 10, "exclude": ["i0", "i31", "i62"]}):
            a = search(url, {"channel": "single", "user_id": user, **body})
            b = search(url, {"channel": "single3d", "user_id": user, **body})
            assert a["ids"] == b["ids"] and a["scores"] == b["scores"]
            want = retrieval.retrieve_vector(single_vectors()[USER_IDS.index(user)], items(), body["k"],
                                             np.sort([int(x[1:]) for x in body.get("exclude", [])]))
            assert a["ids"] == want[0].tolist()
