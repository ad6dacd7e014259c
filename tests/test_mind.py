"""MIND channel: B2I dynamic routing on a hand-built case, the dynamic interest count, label-aware attention, two
planted interests found by the K-vector search, the exported tower = the training model, a posted event changes
the served answer (real vector server over HTTP), bad params fail at config load."""

from __future__ import annotations

import os
import time

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
import torch
import yaml
from conftest import ServerProcess, free_port

from common.channel_config import ChannelSpec, ConfigError, load_config, parse_config
from common.ids import publish_id_map
from common.keyspace import FEATURES_CHANNEL, Keyspace, pack_json
from common.local_redis import LocalRedis
from common.redis_conn import RedisStores
from common.retrieval import retrieve_vectors
from common.towers import encode_user_inputs, matches, numpy_twin
from common.towers.mind import MindTower, b2i_routing, interest_count, squash
from services.vector_server.index import load_tower
from trainer.channels import registry
from trainer.channels.mind import MindChannel
from trainer.data.train_data import TrainData
from trainer.publishing import publish_channel

N_CLUSTERS, PER_CLUSTER, N_USERS, PER_INTEREST = 4, 20, 96, 6
FAST = {"dim": 16, "n_interests": 2, "hidden": [32], "epochs": 25, "batch_size": 64, "lr": 0.01, "recent_n": 12,
        "recent_last": False,
        "temperature": 0.1}


def planted() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """User u has two interests, clusters a ≠ b (all 6 pairs equally often), and clicks PER_INTEREST items of each
    in a random order, one a minute."""
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(N_CLUSTERS) for b in range(a + 1, N_CLUSTERS)]
    rows = []
    for u in range(N_USERS):
        a, b = pairs[u % len(pairs)]
        ia = rng.choice(PER_CLUSTER, PER_INTEREST, replace=False) + a * PER_CLUSTER
        ib = rng.choice(PER_CLUSTER, PER_INTEREST, replace=False) + b * PER_CLUSTER
        seq = rng.permutation(np.concatenate([ia, ib]))
        rows += [(f"u{u}", f"i{i}", 1_000_000 + 60 * t) for t, i in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    users = pd.DataFrame({"gender": ["M" if u % 2 else "F" for u in range(N_USERS)]},
                         index=pd.Index([f"u{u}" for u in range(N_USERS)], name="user_id"))
    n_items = N_CLUSTERS * PER_CLUSTER
    items = pd.DataFrame({"genres": ["x|y" if i % 3 == 0 else "y" for i in range(n_items)]},
                         index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"))
    return inter, users, items


@pytest.fixture(scope="module")
def data() -> TrainData:
    return TrainData.from_frame(*planted())


@pytest.fixture(scope="module")
def fitted(data) -> MindChannel:
    return fit(data)


def fit(data: TrainData, **params) -> MindChannel:
    ch = MindChannel(ChannelSpec(name="mind", kind="u2i", model="mind", params={**FAST, **params}))
    ch.fit(data)
    return ch


def clusters(data: TrainData, idx) -> np.ndarray:
    ext = np.asarray(data.item_map.ids, dtype=object)[np.asarray(idx)]
    return np.array([int(s[1:]) // PER_CLUSTER for s in ext])


def user_clusters(data: TrainData, u: int) -> set[int]:
    return set(clusters(data, data.history(u)[0]).tolist())


# -- the mechanism ----------------------------------------------------------------------------------------------


def routing_reference(e_hat: np.ndarray, init: np.ndarray, live: int, iterations: int) -> tuple[np.ndarray, ...]:
    """Algorithm 1 of the paper for one user, written out with loops (softmax over the live interests of each
    behaviour, squash, b_ij += u_j · ê_i)."""
    n_beh, k = init.shape
    b = init.copy()
    for it in range(iterations):
        w = np.zeros((n_beh, k))
        for i in range(n_beh):
            ex = np.exp(b[i, :live] - b[i, :live].max())
            w[i, :live] = ex / ex.sum()
        u = np.zeros((k, e_hat.shape[1]))
        for j in range(live):
            z = sum(w[i, j] * e_hat[i] for i in range(n_beh))
            n2 = float(z @ z)
            u[j] = n2 / (1 + n2) * z / np.sqrt(n2)
        if it < iterations - 1:
            for i in range(n_beh):
                for j in range(live):
                    b[i, j] += u[j] @ e_hat[i]
    return u, w


def test_routing_on_a_hand_built_case():
    # two behaviours, K = 2, a known bilinear map S = 2·I: ê_1 = (2, 0), ê_2 = (0, 2); behaviour 1 leans to
    # interest 0 and behaviour 2 to interest 1 at the start; a third, padding position must count for nothing
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    s = 2.0 * torch.eye(2)
    e_hat = e @ s.T
    mask = torch.tensor([[True, True, False]])
    init = torch.tensor([[0.3, -0.3], [-0.2, 0.2], [9.0, -9.0]])
    caps, w = b2i_routing(e_hat, mask, torch.tensor([[True, True]]), init, iterations=3)
    ref_u, ref_w = routing_reference(e_hat[0, :2].numpy(), init[:2].numpy(), 2, 3)
    np.testing.assert_allclose(caps[0].numpy(), ref_u, atol=1e-6)
    np.testing.assert_allclose(w[0, :2].numpy(), ref_w, atol=1e-6)
    # coupling coefficients: softmax over the INTEREST axis, each real behaviour's row sums to 1; padding is 0
    np.testing.assert_allclose(w[0, :2].sum(1).numpy(), [1.0, 1.0], atol=1e-6)
    assert float(w[0, 2].abs().sum()) == 0.0
    # squash: norms < 1, each capsule points at "its" behaviour (routing by agreement sharpened the split)
    norms = caps[0].norm(dim=1)
    assert bool((norms < 1).all()) and bool((norms > 0.5).all())
    assert float(w[0, 0, 0]) > 0.6 and float(w[0, 1, 1]) > 0.6
    assert float(caps[0, 0, 0]) > float(caps[0, 0, 1]) and float(caps[0, 1, 1]) > float(caps[0, 1, 0])
    # a dead interest gets no coupling and a zero capsule; the live one takes every behaviour whole
    caps1, w1 = b2i_routing(e_hat, mask, torch.tensor([[True, False]]), init, iterations=3)
    np.testing.assert_allclose(w1[0, :2].numpy(), [[1.0, 0.0], [1.0, 0.0]])
    assert float(caps1[0, 1].abs().sum()) == 0.0
    np.testing.assert_allclose(caps1[0, 0].numpy(), squash(e_hat[0, :2].sum(0)).numpy(), atol=1e-6)


def test_squash_keeps_direction_and_bounds_the_norm():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.03, 0.04]])
    out = squash(z)
    np.testing.assert_allclose(out[0].numpy(), [25 / 26 * 0.6, 25 / 26 * 0.8], rtol=1e-6)
    assert float(out[1].abs().sum()) == 0.0 and abs(float(out[2].norm()) - 0.0025 / 1.0025) < 1e-7


@pytest.mark.parametrize("k_max, want", [(4, [1, 1, 1, 1, 2, 3, 4]), (8, [1, 1, 1, 1, 2, 3, 6]),
                                         (1, [1, 1, 1, 1, 1, 1, 1])])
def test_dynamic_interest_count_follows_the_rule(k_max, want):
    n = [0, 1, 2, 3, 4, 8, 100]
    got = interest_count(torch.tensor(n), k_max)
    assert got.tolist() == want == [max(1, min(k_max, int(np.floor(np.log2(max(x, 1)))))) for x in n]
    assert interest_count(torch.tensor(n), k_max, dynamic=False).tolist() == [k_max] * len(n)
    # the tower's output: exactly K_u live (non-zero, unit) rows, the rest zero
    n_items = 120
    tower = MindTower(n_users=3, n_items=n_items, dim=8, n_interests=k_max, recent_n=100, hidden=[8]).eval()
    recent = torch.full((len(n), 100), n_items, dtype=torch.int64)
    for r, x in enumerate(n):
        recent[r, :x] = torch.arange(x)
    with torch.no_grad():
        out = tower(torch.zeros(len(n), dtype=torch.int64), torch.zeros((len(n), 1), dtype=torch.int64), recent)
    assert out.shape == (len(n), k_max, 8)
    live = out.abs().sum(2) > 0
    assert live.sum(1).tolist() == want and bool((live[:, :-1] | ~live[:, 1:]).all()), "live rows come first"
    np.testing.assert_allclose(out.norm(dim=2)[live].numpy(), 1.0, rtol=1e-5)


def test_label_aware_attention_is_a_softmax_of_p_times_cosine(data):
    ch = MindChannel(ChannelSpec(name="m", kind="u2i", model="mind", params={"attention_power": 3.0}))
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    t = torch.tensor([[-1.0, 0.0]])  # opposite of interest 0: a signed power would weigh it up; p·cos does not
    live = torch.tensor([[True, True, False]])
    a = torch.softmax(torch.tensor([3.0 * -1.0, 0.0]), 0)
    np.testing.assert_allclose(ch.label_aware(v, live, t)[0].numpy(), (a[0] * v[0, 0] + a[1] * v[0, 1]).numpy(),
                               atol=1e-6)
    ch.params.attention_power = 0.0  # uniform over the live interests
    np.testing.assert_allclose(ch.label_aware(v, live, t)[0].numpy(), [0.5, 0.5], atol=1e-6)
    ch.params.attention_power = 1000.0  # hard: the closest live interest, finite
    out = ch.label_aware(v, live, t)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out[0].numpy(), [0.0, 1.0], atol=1e-6)


# -- the trained channel ----------------------------------------------------------------------------------------


def test_a_user_with_two_planted_interests_gets_both(data, fitted):
    ch = fitted
    assert np.isfinite(ch.losses).all() and ch.losses[-1] < ch.losses[0]
    art = ch.artifacts(data)["u2i"]
    assert art.user_vectors.shape == (data.n_users, 2, 16) and (art.interest_counts == 2).all()
    users = np.arange(data.n_users)
    both, precision = [], []
    for u, (ids, _) in zip(users, ch.recommend(data, users, 20), strict=True):  # K-vector search, merged by max
        want = user_clusters(data, u)  # 14 unseen items in each of the two clusters
        got = clusters(data, ids)
        both.append(all((got == c).sum() >= 3 for c in want))
        precision.append(np.isin(got, list(want)).mean())
    assert np.mean(both) >= 0.9 and np.mean(precision) >= 0.85, (np.mean(both), np.mean(precision))
    cos = (art.user_vectors[:, 0] * art.user_vectors[:, 1]).sum(1)
    assert np.median(cos) < 0.99  # two interests, not one vector twice


def test_routing_by_agreement_splits_two_planted_clusters():
    """Hand-set tower: items of two orthogonal clusters, S = 3·I, the post-capsule layer the identity. A history
    of 6 + 6 items in random order gives two interests, each pointing at one cluster, and the K-vector search
    answers from both."""
    d, per = 8, 20
    rng = np.random.default_rng(0)
    items = np.eye(d)[np.repeat(np.arange(2), per)] + 0.05 * rng.standard_normal((2 * per, d))
    items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)
    tower = MindTower(n_users=1, n_items=2 * per, dim=d, n_interests=2, recent_n=12, hidden=[]).eval()
    with torch.no_grad():
        tower.items.id_emb.weight[: 2 * per] = torch.from_numpy(items)
        tower.bilinear.weight.copy_(3.0 * torch.eye(d))
        tower.mlp[0].weight.zero_()
        tower.mlp[0].weight[:, :d] = torch.eye(d)
        tower.mlp[0].bias.zero_()
    split = []
    for _ in range(20):
        hist = rng.permutation(np.concatenate([rng.choice(per, 6, replace=False),
                                               rng.choice(per, 6, replace=False) + per]))
        with torch.no_grad():
            v = tower(torch.tensor([0]), torch.zeros((1, 1), dtype=torch.int64), torch.from_numpy(hist[None]))[0]
        tops = [np.argsort(-(items @ v[j].numpy()))[:6] // per for j in range(2)]
        split.append(all((t == t[0]).all() for t in tops) and {int(tops[0][0]), int(tops[1][0])} == {0, 1})
        ids, _ = retrieve_vectors(v.numpy(), items, 20, hist)
        assert set((ids // per).tolist()) == {0, 1}
    assert np.mean(split) >= 0.9, np.mean(split)


def served(art):
    return load_tower(art.user_tower, art.user_tower_meta, art.item_vectors.shape[1])


def run(tower, meta, user_idx, attrs, recent) -> np.ndarray:
    with torch.no_grad():
        return tower(*(torch.from_numpy(x) for x in encode_user_inputs(meta, user_idx, attrs, recent)))[0].numpy()


def test_exported_tower_gives_the_training_models_vectors(data, fitted):
    ch = fitted
    art = ch.artifacts(data)["u2i"]
    meta = art.user_tower_meta
    assert meta["arch"] == "mind" and meta["recent_n"] == 12 and meta["attr_columns"] == ["gender"]
    assert meta["hparams"]["n_interests"] == 2 and meta["hparams"]["dynamic_k"] is True
    tower = served(art)
    assert isinstance(tower, MindTower) and tower is not ch.tower
    torch.testing.assert_close(tower.routing_init, ch.tower.routing_init, rtol=0, atol=0)  # the fixed init
    _, users, _ = planted()
    for u in (0, 5, data.n_users - 1):
        attrs = users.loc[data.user_map.ids[u]].to_dict()
        got = run(tower, meta, u, attrs, data.recent(u, 12)[0])
        np.testing.assert_allclose(got, art.user_vectors[u], atol=1e-5)
        np.testing.assert_array_equal(got, run(tower, meta, u, attrs, data.recent(u, 12)[0]))  # deterministic
    # an unknown user with 3 events (one live interest) and one with 5 (two), as the training model computes them
    for recent in ([0, 1, 2], [0, 1, 2, 40, 41]):
        inputs = encode_user_inputs(meta, -1, {"gender": "F"}, recent)
        with torch.no_grad():
            want = ch.tower(*(torch.from_numpy(x) for x in inputs))[0].numpy()
        got = run(tower, meta, -1, {"gender": "F"}, recent)
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert (np.abs(got).sum(1) > 0).sum() == (1 if len(recent) < 4 else 2)
    # no history at all: one interest from the profile alone
    assert (np.abs(run(tower, meta, -1, {}, [])).sum(1) > 0).sum() == 1
    # what the vector server runs on requests: the numpy twin of the exported tower, same vectors
    twin = numpy_twin(tower, meta)
    assert twin is not None and matches(twin, tower, meta, n=40)
    for u in (0, 5, data.n_users - 1):
        inputs = encode_user_inputs(meta, u, users.loc[data.user_map.ids[u]].to_dict(), data.recent(u, 12)[0])
        np.testing.assert_allclose(twin(*inputs), art.user_vectors[u], atol=1e-5)


def test_fixed_k_and_newest_item_field_export_too(data):
    ch = fit(data, dynamic_k=False, recent_last=True, epochs=1)
    art = ch.artifacts(data)["u2i"]
    meta = art.user_tower_meta
    assert (art.interest_counts == 2).all() and meta["hparams"]["dynamic_k"] is False
    assert meta["hparams"]["recent_last"] is True
    tower = served(art)
    out = run(tower, meta, -1, {}, [3])
    assert (np.abs(out).sum(1) > 0).sum() == 2  # one behaviour, still K interests
    twin = numpy_twin(tower, meta)
    assert twin is not None and matches(twin, tower, meta, n=50)
    n = data.n_items  # by hand: padding and out-of-range ids in the middle keep their positions (routing init rows)
    for u, rec in [(-1, [n] * 12), (3, [-1, 5, n + 7, 6] + [n] * 8), (10**6, [7, 8, 9, n, 11, 12] + [n] * 6)]:
        x = (np.array([u]), np.zeros((1, 1), np.int64), np.array([rec], np.int64))
        with torch.no_grad():
            want = tower(*(torch.from_numpy(a) for a in x))[0].numpy()
        np.testing.assert_allclose(twin(*x), want, atol=1e-5)
    _, users, _ = planted()
    for u in (1, 9):
        attrs = users.loc[data.user_map.ids[u]].to_dict()
        np.testing.assert_allclose(run(tower, meta, u, attrs, data.recent(u, 12)[0]), art.user_vectors[u], atol=1e-5)


# -- serving: a posted event changes the answer (real vector server, real Redis, HTTP) -----------------------------


def push_event(stores: RedisStores, user_id: str, item_id: str, ts: int) -> None:
    """A real-time click as the feature server records it (common/features.py)."""
    ks, db = stores.keyspace, stores("user_features")
    db.lpush(ks.realtime_recent(user_id), orjson.dumps([item_id, ts, "web", "eu"]))
    db.hincrby(ks.realtime_counters(user_id), "clicks", 1)
    db.hset(ks.realtime_counters(user_id), "last_ts", ts)


def test_a_posted_event_changes_the_served_answer(data, fitted, tmp_path):
    ch = fitted
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(yaml.safe_dump({"channels": {"mind": {"kind": "u2i", "model": "mind", "params": FAST}}}))
    user_id = "fresh-user"  # not in the id maps: the tower sees only its attributes and recent items
    c0 = [i for i in range(data.n_items) if clusters(data, [i])[0] == 0][:4]
    c3 = [i for i in range(data.n_items) if clusters(data, [i])[0] == 3][:4]
    ext = data.item_map.ids
    with LocalRedis() as rds:
        stores = RedisStores(rds.url, Keyspace())
        version = publish_channel(stores, load_config(cfg).get("mind"), ch.artifacts(data), data,
                                  tmp_path / "artifacts", progress=False)
        publish_id_map(stores, "item", data.item_map)
        publish_id_map(stores, "user", data.user_map)
        ks = stores.keyspace
        stores("user_features").set(ks.user_features("f1", user_id), pack_json(
            {"user_id": user_id, "recent": [[ext[i], 2000 - j] for j, i in enumerate(c0[::-1])],
             "attrs": {"gender": "F"}}))
        stores("meta").set(ks.current(FEATURES_CHANNEL), "f1")
        env = {**os.environ, "REDIS_URL": rds.url, "ARTIFACTS_DIR": str(tmp_path / "artifacts"),
               "CHANNELS_CONFIG": str(cfg), "VECTOR_POLL_S": "0.2", "OMP_NUM_THREADS": "1",
               "VECTOR_USER_CACHE_MB": "0"}
        port = free_port()
        server = ServerProcess(["services.vector_server", "serve", "--port", str(port)], env, port,
                               tmp_path / "server.log").start(timeout=120)
        try:
            for _ in range(600):
                health = httpx.get(server.url + "/healthz", timeout=5).json()
                if health.get("channels", {}).get("mind", {}).get("version") == version:
                    break
                time.sleep(0.1)
            served_by = health["channels"]["mind"]
            assert served_by["tower"] is True and served_by["n_interests"] == 2 and served_by["tower_runtime"] == "numpy"

            def ask() -> dict:
                r = httpx.post(server.url + "/search", json={"channel": "mind", "k": 10, "user_id": user_id},
                               timeout=10)
                assert r.status_code == 200, r.text
                return r.json()

            before = ask()
            assert before["source"] == "tower" and (clusters(data, before["ids"]) == 0).sum() >= 7
            for j, i in enumerate(c3):  # four clicks in cluster 3, posted a moment ago
                push_event(stores, user_id, ext[i], 3000 + j)
            after = ask()
            assert after["source"] == "tower" and after["ids"] != before["ids"]
            assert (clusters(data, after["ids"]) == 3).sum() >= 3  # the new interest answers
            # exactly the tower on the new state (newest first: the events, then the batch record)
            tower, meta = served(ch.artifacts(data)["u2i"]), ch.artifacts(data)["u2i"].user_tower_meta
            vec = run(tower, meta, -1, {"gender": "F"}, c3[::-1] + c0[::-1])
            live = vec[np.abs(vec).sum(1) > 0]
            best = (live @ ch.item_vectors.T).max(0)
            assert after["ids"] == np.argsort(-best, kind="stable")[:10].tolist()
        finally:
            server.stop()
            stores.close()


# -- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, key", [({"attention_power": -1}, "params.attention_power"),
                                         ({"n_interests": 0}, "params.n_interests"),
                                         ({"routing_init": "zeros"}, "params.routing_init"),
                                         ({"n_interest": 4}, "params.n_interest")])
def test_bad_params_fail_at_config_load_naming_channel_and_key(params, key):
    raw = {"channels": {"mind": {"kind": "u2i", "model": "mind", "params": params}}}
    cfg = parse_config(raw, "test.yaml")
    with pytest.raises(ConfigError) as err:
        registry.validate_params(cfg, "test.yaml")
    assert "channel 'mind'" in str(err.value) and key in str(err.value) and "test.yaml" in str(err.value)
    assert registry.models()["mind"] is MindChannel
