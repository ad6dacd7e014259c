"""Multi-task two-tower: per-task heads learn their own targets, per-task logQ, the published head / blend, the
exported tower, one fit for several heads, real-time serving, bad params."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_vector_server import post, push_event, wait_versions, write_user_features

import trainer.nn.multitask as mt
from common.channel_config import ChannelSpec, ConfigError, load_config, parse_config
from common.ids import publish_id_map
from common.towers import encode_user_inputs, matches, numpy_twin
from services.vector_server.index import load_tower
from trainer.channels import registry
from trainer.channels.multitask_two_tower import MultiTaskTwoTowerChannel
from trainer.data.events import LIKE
from trainer.data.train_data import TrainData
from trainer.nn.user_inputs import tower_inputs
from trainer.publishing import publish_channel
from trainer.task_metrics import event_hit_rate, liked_hit_rate, target_events

N_CLUSTERS, PER, N_USERS = 4, 20, 80  # cluster c: items c*20 … c*20+9 "bait", c*20+10 … c*20+19 "good"
FAST = {"emb_dim": 16, "dim": 16, "hidden": [32], "epochs": 25, "batch_size": 64, "lr": 0.01, "recent_n": 5,
        "temperature": 0.1}


def planted() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Users of cluster c click 6 of its 10 bait items (never liked) and 3 of its 10 good items (always liked),
    in random order a minute apart: bait is twice as clickable, only good items are liked."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        c = u % N_CLUSTERS
        bait = rng.choice(10, 6, replace=False) + c * PER
        good = rng.choice(10, 3, replace=False) + c * PER + 10
        items = rng.permutation(np.concatenate([bait, good]))
        rows += [(f"u{u}", f"i{i}", 1_000_000 + 60 * t, 5 if i % PER >= 10 else 2) for t, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    users = pd.DataFrame({"gender": ["M" if u % 2 else "F" for u in range(N_USERS)]},
                         index=pd.Index([f"u{u}" for u in range(N_USERS)], name="user_id"))
    return inter, users


@pytest.fixture(scope="module")
def data() -> TrainData:
    inter, users = planted()
    return TrainData.from_frame(inter, users)


def ext(data: TrainData, idx) -> np.ndarray:
    return np.array([int(data.item_map.ids[i][1:]) for i in np.atleast_1d(idx)])


def make(name: str = "mt", **params) -> MultiTaskTwoTowerChannel:
    return MultiTaskTwoTowerChannel(ChannelSpec(name=name, kind="u2i", model="multitask_two_tower",
                                                params={**FAST, **params}))


def fit(data: TrainData, name: str = "mt", **params) -> MultiTaskTwoTowerChannel:
    ch = make(name, **params)
    ch.fit(data)
    return ch


@pytest.fixture(scope="module")
def model(data) -> MultiTaskTwoTowerChannel:
    return fit(data, "mt_fixture")  # its fit is reused by the other heads below (share_fit)


def served(art) -> torch.nn.Module:
    """The artifact's user tower rebuilt exactly as the vector server does (state dict + meta, by arch tag)."""
    return load_tower(art.user_tower, art.user_tower_meta, art.item_vectors.shape[1])


def run(tower, meta, user_idx, attrs, recent) -> np.ndarray:
    with torch.no_grad():
        return tower(*(torch.from_numpy(x) for x in encode_user_inputs(meta, user_idx, attrs, recent)))[0].numpy()


# -- the signature mechanism: one shared bottom, a head per task, each task its own positives and q -----------


def test_each_head_learns_its_own_task(data, model):
    """The click head prefers the (more clicked) bait items of the user's cluster, the liked head the good ones."""
    assert model.fitted.tasks == ["interacted", "liked"]  # no purchases in the data: that task is not trained
    assert model.fitted.positives == {"interacted": 720, "liked": 240, "purchased": 0}
    assert all(np.isfinite(v).all() and v[-1] < v[0] for v in model.fitted.task_losses.values())
    ids = ext(data, np.arange(data.n_items))
    items = model.task_item_vectors(data)[0]  # the shared item tower
    tower = model.fitted.user_tower
    users = np.arange(data.n_users)
    x = tower_inputs(data, users, data.user_ptr[users + 1], model.params.recent_n, model.fitted.user_attr_codes)
    with torch.no_grad():
        u = tower.task_vectors(*x).numpy()  # [U, 2, d]
    cluster = np.array([int(data.user_map.ids[v][1:]) % N_CLUSTERS for v in users])
    prefers_good = {}
    for t, task in enumerate(model.fitted.tasks):
        s = u[:, t] @ items.T
        own = ids[None, :] // PER == cluster[:, None]
        good = (ids % PER >= 10)[None, :]
        mean_good = (s * (own & good)).sum(1) / (own & good).sum(1)
        mean_bait = (s * (own & ~good)).sum(1) / (own & ~good).sum(1)
        prefers_good[task] = float(np.mean(mean_good > mean_bait))
        # both heads know the user's cluster
        assert np.mean((s * own).sum(1) / own.sum(1) > (s * ~own).sum(1) / (~own).sum(1)) > 0.95
    assert prefers_good["interacted"] < 0.2 and prefers_good["liked"] > 0.9, prefers_good


@pytest.mark.parametrize("per_task", [True, False])
def test_each_task_is_corrected_by_its_own_frequency_estimate(data, monkeypatch, per_task):
    """Per-task logQ: the liked softmax is corrected by the frequency among liked positives (bait items never
    occur there); `logq_per_task: false` (the ablation) uses the interactions' estimate for every task."""
    calls = []
    real = mt.candidate_log_q

    def spy(scheme, ids, batch_size, n_random, sampler, estimator, exact):
        out = real(scheme, ids, batch_size, n_random, sampler, estimator, exact)
        calls.append((scheme, ids.numpy().copy(), batch_size, n_random, estimator, out.numpy().copy()))
        return out

    monkeypatch.setattr(mt, "candidate_log_q", spy)
    ch = fit(data, epochs=2, logq_per_task=per_task, share_fit=False)
    est = ch.fitted.estimators
    assert (est["interacted"] is est["liked"]) is (not per_task)
    click, liked = calls[-2:]  # the last batch: interacted, then liked
    assert click[0] == "in_batch" and click[4] is est["interacted"] and click[3] == 0
    np.testing.assert_allclose(click[5], est["interacted"].log_probability(click[1]), rtol=1e-6)
    # liked: its in-batch positives (good items) + shared random draws, which do reach the never-liked bait items
    assert liked[0] == "mixed" and liked[4] is est["liked"] and liked[3] == 64
    assert (ext(data, liked[1]) % PER < 10).any()
    b_t = liked[2]  # the batch's liked positives: B_t·p̂_liked(y) + K·q(y)
    want = np.logaddexp(est["liked"].log_probability(liked[1]) + np.log(b_t),
                        np.log(ch_sampler_q(data)[liked[1]]) + np.log(64))
    np.testing.assert_allclose(liked[5], want, rtol=1e-4, atol=1e-4)
    bait = np.flatnonzero(ext(data, np.arange(data.n_items)) % PER < 10)
    good = np.flatnonzero(ext(data, np.arange(data.n_items)) % PER >= 10)
    p_click, p_liked = est["interacted"].probability, est["liked"].probability
    if per_task:  # each estimate ≈ the item's share of its task's positives
        liked_share = np.bincount(data.item_idx[data.event == LIKE], minlength=data.n_items) / 240
        assert np.median(p_liked(good) / liked_share[good]) == pytest.approx(1.0, rel=0.35)
        assert p_liked(bait).max() < 0.2 * p_click(bait).min()  # never a liked positive
        assert np.mean(p_liked(good)) > 2 * np.mean(p_click(good))  # a third of the stream: 3× the share
    click_share = data.item_counts / len(data.item_idx)
    assert np.median(p_click(good) / click_share[good]) == pytest.approx(1.0, rel=0.35)


def ch_sampler_q(data: TrainData) -> np.ndarray:
    """The random negatives' distribution: count^0.75, normalised."""
    w = data.item_counts.astype(np.float64) ** 0.75
    return w / w.sum()


def test_published_head_and_blend(data, model):
    """head liked publishes u_liked against the shared item vectors; a blend publishes Σ_t w_t <u_t, v_t>, as
    Σ_t w_t·u_t (shared items) or as [√w_t·u_t]·[√w_t·v_t] (per-task item towers)."""
    liked = fit(data, "mt_liked", head="liked")
    a_click, a_liked = model.artifacts(data)["u2i"], liked.artifacts(data)["u2i"]
    np.testing.assert_array_equal(a_click.item_vectors, a_liked.item_vectors)  # same model, same items
    x = tower_inputs(data, np.arange(data.n_users), data.user_ptr[1:], model.params.recent_n,
                     model.fitted.user_attr_codes)
    with torch.no_grad():
        u = model.fitted.user_tower.task_vectors(*x).numpy()
    np.testing.assert_allclose(a_click.user_vectors, u[:, 0], atol=1e-6)
    np.testing.assert_allclose(a_liked.user_vectors, u[:, 1], atol=1e-6)
    blend = fit(data, "mt_blend", blend={"interacted": 1.0, "liked": 2.0})
    b = blend.artifacts(data)["u2i"]
    np.testing.assert_allclose(b.user_vectors, u[:, 0] + 2 * u[:, 1], atol=1e-5)
    per = fit(data, "mt_per", item_heads="per_task", blend={"interacted": 1.0, "liked": 2.0}, epochs=3)
    p = per.artifacts(data)["u2i"]
    assert p.item_vectors.shape == (data.n_items, 32) and p.user_vectors.shape == (data.n_users, 32)
    with torch.no_grad():
        pu = per.fitted.user_tower.task_vectors(*x).numpy()
    pv = per.task_item_vectors(data)  # [2, n_items, d]: one item tower per task
    want = pu[:, 0] @ pv[0].T + 2 * pu[:, 1] @ pv[1].T
    np.testing.assert_allclose(p.user_vectors @ p.item_vectors.T, want, atol=1e-5)


def test_one_fit_serves_several_heads_and_equals_a_fresh_fit(data):
    a = fit(data, "share_a", epochs=3, head="interacted")
    b = fit(data, "share_b", epochs=3, head="liked")
    assert not a.metrics["reused_fit"] and b.metrics["reused_fit"] and b.fitted is a.fitted
    fresh = fit(data, "share_c", epochs=3, head="liked", share_fit=False)
    np.testing.assert_array_equal(b.artifacts(data)["u2i"].user_vectors, fresh.artifacts(data)["u2i"].user_vectors)
    again = fit(data, "share_a", epochs=3, head="interacted")  # the same channel again (timing repeats): trains
    assert not again.metrics["reused_fit"] and again.fitted is not a.fitted
    other = TrainData.from_frame(*planted())  # other data: trains
    assert not fit(other, "share_b", epochs=3, head="liked").metrics["reused_fit"]


def test_cannot_publish_a_task_without_positives(data):
    with pytest.raises(ValueError, match="purchased"):
        fit(data, epochs=1, head="purchased", share_fit=False)


# -- export: the served tower is the training model ------------------------------------------------------------


@pytest.mark.parametrize("params", [{"head": "liked"}, {"blend": {"interacted": 1.0, "liked": 0.5}},
                                    {"item_heads": "per_task", "blend": {"interacted": 1.0, "liked": 0.5}}],
                         ids=["head", "blend-sum", "blend-concat"])
def test_served_tower_gives_the_training_vectors(data, params):
    ch = fit(data, "mt_export", epochs=2, share_fit=False, **params)
    art = ch.artifacts(data)["u2i"]
    meta = art.user_tower_meta
    assert meta["arch"] == "multitask_user" and meta["hparams"]["tasks"] == ["interacted", "liked"]
    tower = served(art)
    assert tower is not ch.fitted.user_tower
    _, users = planted()
    for u in (0, 7, data.n_users - 1):
        attrs = users.loc[data.user_map.ids[u]].to_dict()
        np.testing.assert_allclose(run(tower, meta, u, attrs, data.recent(u, 5)[0]), art.user_vectors[u], atol=1e-5)
    # an unknown user with a few events: the rebuilt tower = the training tower on the same inputs
    inputs = encode_user_inputs(meta, -1, {"gender": "F"}, [3, 4, 5])
    with torch.no_grad():
        want = ch.served_tower()(*(torch.from_numpy(x) for x in inputs))[0].numpy()
    np.testing.assert_allclose(run(tower, meta, -1, {"gender": "F"}, [3, 4, 5]), want, atol=1e-6)
    twin = numpy_twin(tower, meta)  # what the vector server runs on requests
    assert twin is not None and matches(twin, tower, meta, n=50)
    for u in (0, 7):
        x = encode_user_inputs(meta, u, users.loc[data.user_map.ids[u]].to_dict(), data.recent(u, 5)[0])
        np.testing.assert_allclose(twin(*x), art.user_vectors[u], atol=1e-5)


# -- a posted event changes the answer of the real vector server -----------------------------------------------


def test_vector_server_answer_follows_a_posted_event(data, model, stores, settings, start_server, tmp_path):
    cfg = {"channels": {"mt_click": {"kind": "u2i", "model": "multitask_two_tower", "index": {"type": "flat"}}}}
    path = tmp_path / "channels.yaml"
    path.write_text(yaml.safe_dump(cfg))
    spec = load_config(path).get("mt_click")
    version = publish_channel(stores, spec, model.artifacts(data), data, settings.artifacts_dir, progress=False)
    publish_id_map(stores, "item", data.item_map)
    publish_id_map(stores, "user", data.user_map)
    u = 0  # a user of cluster 0 with a batch record of their latest clicks
    items, ts = data.recent(u, 5)
    write_user_features(stores, "f1", {data.user_map.ids[u]: {
        "recent": [[data.item_map.ids[i], int(t)] for i, t in zip(items, ts, strict=True)], "attrs": {"gender": "F"}}})
    server = start_server(["services.vector_server", "serve"], {"CHANNELS_CONFIG": str(path), "VECTOR_POLL_S": "0.2",
                                                                "VECTOR_USER_CACHE_MB": "0"})
    wait_versions(server.url, {"mt_click": version})
    uid = data.user_map.ids[u]
    before = post(server.url, {"channel": "mt_click", "k": 10, "user_id": uid}).json()
    assert before["source"] == "tower" and np.mean(ext(data, before["ids"]) // PER == 0) >= 0.8
    t = int(ts[0])
    new = [2 * PER + j for j in range(5)]  # five clicks a moment ago, in cluster 2 (the whole recent window)
    for j, item in enumerate(new):
        push_event(stores, uid, f"i{item}", t + 60 * (j + 1))
    after = post(server.url, {"channel": "mt_click", "k": 10, "user_id": uid}).json()
    assert after["source"] == "tower" and after["ids"] != before["ids"]
    assert np.mean(ext(data, after["ids"]) // PER == 2) > np.mean(ext(data, before["ids"]) // PER == 2)
    # the answer is the exported tower's vector on the new recent items, searched exactly
    art = model.artifacts(data)["u2i"]
    recent = [data.item_map.get(f"i{i}") for i in new[::-1]]
    q = run(served(art), art.user_tower_meta, u, {"gender": "F"}, recent)
    assert after["ids"] == np.argsort(-(art.item_vectors @ q), kind="stable")[:10].tolist()


# -- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, key", [
    ({"head": "bought"}, "params.head"),
    ({"tasks": ["interacted"], "head": "liked"}, "params.head"),
    ({"blend": {"liked": -1.0}}, "params.blend"),
    ({"head": "liked", "blend": {"liked": 1.0}}, "params.blend"),
    ({"loss_weights": {"purchased": 1.0}, "tasks": ["interacted", "liked"]}, "params.loss_weights"),
    ({"item_heads": "both"}, "params.item_heads"),
    ({"n_neg": 5}, "params.n_neg"),
])
def test_bad_params_fail_at_load_naming_channel_and_key(params, key):
    raw = {"channels": {"mt_liked": {"kind": "u2i", "model": "multitask_two_tower", "params": params}}}
    with pytest.raises(ConfigError) as err:
        registry.validate_params(parse_config(raw, "test.yaml"), "test.yaml")
    assert "channel 'mt_liked'" in str(err.value) and key in str(err.value), str(err.value)


def test_shipped_config_entries_are_valid():
    path = os.path.join(os.path.dirname(__file__), "..", "config", "channels.yaml")
    cfg = load_config(path)
    registry.validate_params(cfg, path)
    ours = [c for c in cfg.channels if c.model == "multitask_two_tower"]
    assert {c.params.get("head") for c in ours} >= {"interacted", "liked"}
    assert all(not c.enabled for c in ours)


# -- the liked-target metric -----------------------------------------------------------------------------------


def test_liked_hit_rate_counts_only_liked_targets():
    test = pd.DataFrame({"user_id": [1, 2, 3, 4], "item_id": [10, 20, 30, 40], "rating": [5, 4, 2, 1]})
    events = target_events(test)
    mat = np.array([[10, 11], [21, 22], [30, 31], [41, 42]])
    targets = np.array([10, 20, 30, 40])
    assert liked_hit_rate(mat, targets, events, k=2) == 0.5  # users 1 (hit) and 2 (miss)
    assert event_hit_rate(mat, targets, events, k=2, event=0) == 0.5  # users 3 (hit) and 4 (miss)
    assert liked_hit_rate(mat[:, :0], targets, events, k=2) == 0.0
    assert np.isnan(liked_hit_rate(mat, targets, np.zeros(4, np.int8)))


def test_one_task_tower_is_the_two_tower_user_tower():
    """With one task the shared bottom + head is exactly two_tower's user tower MLP (same fields, same layers)."""
    from common.towers.multitask import MultiTaskUserTower
    from common.towers.two_tower_user import UserTower

    torch.manual_seed(0)
    tt = UserTower(10, 30, [3, 4], 8, 6, [16], 0.0, False, True, recent_last=True)
    one = MultiTaskUserTower(10, 30, [3, 4], 8, 6, [16], [], 0.0, False, True, ["interacted"], recent_last=True)
    state = {k.replace("mlp.0.", "bottom.0.").replace("mlp.2.", "heads.0.0."): v for k, v in tt.state_dict().items()}
    one.load_state_dict(state, strict=True)
    x = (torch.tensor([0, 3, 10]), torch.tensor([[1, 2], [0, 3], [2, 0]]),
         torch.tensor([[5, 6, 30], [30, 30, 30], [29, 1, 2]]))
    torch.testing.assert_close(one(*x), tt(*x))
