"""MIC: perturbed views, the NT-Xent loss at its known minimum, kNN positives and cluster hard negatives on planted
vectors, planted clusters in the published i2i / u2u lists, settings checked at load, and the nightly → recall
server path for its three channels."""

from __future__ import annotations

import math
import time

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from common.channel_config import ChannelSpec, ConfigError, parse_config
from common.publish import current_version, read_manifest
from tests.channel_contract import ChannelContract
from trainer.channels import registry
from trainer.channels.mic import MicChannel, cl_scale
from trainer.data.train_data import TrainData
from trainer.nn.contrastive import NeighborMiner, nt_xent
from trainer.nn.views import field_keep_mask, mask_ids

N_CLUSTERS, PER_CLUSTER, N_USERS, CLICKS = 4, 10, 80, 6
FAST = {"emb_dim": 16, "dim": 16, "hidden": [32], "epochs": 8, "batch_size": 64, "lr": 0.01, "n_clusters": 4,
        "near_clusters": 1, "knn_positives": 3, "hard_negatives": 2, "warmup_epochs": 2, "top_k": 10,
        "u2u_weight": 0.3, "i2i_weight": 0.3}


def planted_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Users of cluster c click CLICKS random items of cluster c; attributes carry no cluster information."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(N_USERS):
        items = rng.choice(PER_CLUSTER, size=CLICKS, replace=False) + (u % N_CLUSTERS) * PER_CLUSTER
        rows += [(f"u{u}", f"i{i}", 1_700_000_000 + 3600 * u + 60 * t) for t, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    users = pd.DataFrame({"gender": rng.choice(["M", "F"], N_USERS)},
                         index=pd.Index([f"u{u}" for u in range(N_USERS)], name="user_id"))
    n_items = N_CLUSTERS * PER_CLUSTER
    items = pd.DataFrame({"genres": rng.choice(["a", "b", "a|b"], n_items)},
                         index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"))
    return inter, users, items


def cluster(ids) -> np.ndarray:
    return np.array([int(x[1:]) // PER_CLUSTER if x[0] == "i" else int(x[1:]) % N_CLUSTERS for x in ids])


@pytest.fixture(scope="module")
def data() -> TrainData:
    return TrainData.from_frame(*planted_frames())


@pytest.fixture(scope="module")
def fitted(data) -> MicChannel:
    ch = registry.build(ChannelSpec(name="mic", kind="u2i", model="mic", params=FAST))
    ch.fit(data)
    return ch


class TestMicContract(ChannelContract):
    """The contract with mining on (warm-up 1 of 3 epochs: kNN and k-means run, and must be deterministic too)."""

    model = "mic"
    params = {**FAST, "epochs": 3, "warmup_epochs": 1, "top_k": 20}


# -- views ---------------------------------------------------------------------------------------------------


def test_two_views_differ_and_are_seeded(data, fitted):
    users, items = np.arange(20), np.arange(data.n_items)
    with torch.no_grad():
        for side, ids in (("u", users), ("i", items)):
            clean = fitted._encode(data, side, ids, None)
            torch.testing.assert_close(clean, fitted._encode(data, side, ids, None))
            a, b = (fitted._encode(data, side, ids, np.random.default_rng(s)) for s in (1, 2))
            assert a.shape == clean.shape
            assert ((a - b).abs().amax(1) > 1e-4).float().mean() > 0.5, f"{side}: the two views hardly differ"
            assert not torch.allclose(a, clean)
            torch.manual_seed(0)
            again = fitted._encode(data, side, ids, np.random.default_rng(1))
            torch.manual_seed(0)
            torch.testing.assert_close(again, fitted._encode(data, side, ids, np.random.default_rng(1)))


def test_field_and_history_masks():
    rng = np.random.default_rng(0)
    keep = field_keep_mask(5000, 6, 0.9, rng)
    assert keep.any(1).all(), "every row keeps a field"
    assert abs(keep.mean() - (0.1 + 0.9 ** 6 / 6)) < 0.02
    ids = torch.arange(10_000).view(100, 100)
    masked = mask_ids(ids, 0.3, -7, rng)
    hit = masked == -7
    assert abs(hit.float().mean().item() - 0.3) < 0.02 and torch.equal(masked[~hit], ids[~hit])
    assert mask_ids(ids, 0.0, -7, rng) is ids


# -- the contrastive loss ------------------------------------------------------------------------------------


def simplex(n: int, d: int) -> torch.Tensor:
    """n unit vectors in R^d with pairwise cosine −1/(n−1) (n ≤ d + 1)."""
    e = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return F.normalize(torch.cat([e, torch.zeros(n, d - n, dtype=torch.float64)], dim=1), dim=1)


@pytest.mark.parametrize("n, tau", [(2, 0.5), (5, 0.1), (8, 0.2)])
def test_identical_views_on_a_simplex_reach_the_known_minimum(n, tau):
    z = simplex(n, 8)
    cos = (z @ z.T)[~torch.eye(n, dtype=torch.bool)]
    torch.testing.assert_close(cos, torch.full_like(cos, -1.0 / (n - 1)))
    minimum = math.log(1 + 2 * (n - 1) * math.exp(-n / ((n - 1) * tau)))
    assert nt_xent(z, z, tau).item() == pytest.approx(minimum, rel=1e-9)
    g = torch.Generator().manual_seed(n)
    for _ in range(20):  # any other layout, and any pair of distinct views, costs more
        r = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
        assert nt_xent(r, r, tau).item() > minimum
        noise = 0.3 * torch.randn(n, 8, generator=g, dtype=torch.float64)
        assert nt_xent(z, F.normalize(z + noise, dim=1), tau).item() > minimum


def test_extra_positives_and_hard_negatives_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    z2 = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    hard = torch.tensor([[[-1.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.6, -0.8]], [[0.0, 1.0], [0.0, 1.0]]])
    usable = torch.tensor([[True, True], [True, False], [True, True]])
    extra = torch.tensor([[False, False, True], [False, False, False], [False, False, False]])
    tau, w = 0.5, 0.25
    z = torch.cat([z1, z2]).numpy()
    total = 0.0
    for a in range(6):
        e = a % 3
        logits = {b: z[a] @ z[b] / tau for b in range(6) if b != a}
        hl = [z[a] @ hard[e, j].numpy() / tau for j in range(2) if usable[e, j]]
        lse = np.log(sum(np.exp(v) for v in logits.values()) + sum(np.exp(v) for v in hl))
        pos = {(a + 3) % 6: 1.0} | ({2: w, 5: w} if e == 0 else {})
        total += -sum(wt * (logits[b] - lse) for b, wt in pos.items()) / sum(pos.values())
    got = nt_xent(z1, z2, tau, extra, w, hard, usable)
    assert got.item() == pytest.approx(total / 6, rel=1e-5)
    assert nt_xent(z1, z2, tau).item() < got.item()  # the hard negatives and the extra positive cost here


# -- kNN positives and k-means hard negatives ----------------------------------------------------------------


def planted_vectors() -> tuple[np.ndarray, np.ndarray]:
    """40 vectors in 4 tight clusters; clusters 0 and 1 are close to each other, so are 2 and 3."""
    rng = np.random.default_rng(3)
    e = np.eye(8)
    centres = [e[0], e[0] + 0.8 * e[1], e[4], e[4] + 0.8 * e[5]]
    labels = np.repeat(np.arange(4), 10)
    x = np.stack([centres[c] / np.linalg.norm(centres[c]) for c in labels]) + 0.03 * rng.standard_normal((40, 8))
    return x.astype(np.float32), labels


def test_knn_positives_and_hard_negatives_come_from_the_right_places():
    x, labels = planted_vectors()
    valid = np.ones(40, bool)
    valid[[9, 19]] = False  # no lists and never drawn
    miner = NeighborMiner(k=4, n_clusters=4, near_clusters=1, seed=42, nredo=10)  # best of 10: no local optimum
    miner.refresh(x, valid)
    ok = np.flatnonzero(valid)
    knn = miner.knn[ok]
    assert (knn >= 0).all() and (labels[knn] == labels[ok, None]).all(), "kNN within the planted cluster"
    assert not np.isin(knn, [9, 19]).any() and (miner.knn[[9, 19]] == -1).all()
    found = {tuple(np.unique(miner.cluster[labels == c][valid[labels == c]])) for c in range(4)}
    assert all(len(f) == 1 for f in found) and len(found) == 4, "k-means recovers the planted clusters"
    ids = np.array([0, 1, 2, 3, 12, 25, 33, 38])
    pos = miner.positives(ids)
    want = np.array([[b in miner.knn[a] for b in ids] for a in ids])
    np.testing.assert_array_equal(pos, want)
    assert not pos[np.arange(len(ids)), np.arange(len(ids))].any()
    neg, usable = miner.hard_negatives(ids, 50, np.random.default_rng(0))
    assert neg.shape == usable.shape == (len(ids), 50) and usable.all()
    partner = {0: 1, 1: 0, 2: 3, 3: 2}  # the nearest other cluster
    assert (labels[neg] == np.array([partner[c] for c in labels[ids]])[:, None]).all()
    assert not np.isin(neg, [9, 19]).any()
    # with a neighbour list reaching into the hard clusters, those draws are flagged unusable
    wide = NeighborMiner(k=15, n_clusters=4, near_clusters=1, seed=42, nredo=10)
    wide.refresh(x, valid)
    neg, usable = wide.hard_negatives(ids, 50, np.random.default_rng(0))
    in_knn = np.array([[n in wide.knn[a] for n in row] for a, row in zip(ids, neg, strict=True)])
    np.testing.assert_array_equal(usable, ~in_knn)
    assert in_knn.any()


def test_knn_min_sim_keeps_only_close_neighbours_as_positives():
    """Neighbours under the cosine threshold are no positives, but stay excluded from the hard negatives."""
    x, _labels = planted_vectors()
    ids = np.arange(40)
    loose = NeighborMiner(k=15, n_clusters=4, near_clusters=1, seed=42, nredo=10)
    loose.refresh(x)
    scores = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    cut = float(np.median(scores[ids[:, None], loose.knn]))
    strict = NeighborMiner(k=15, n_clusters=4, near_clusters=1, seed=42, nredo=10, min_sim=cut)
    strict.refresh(x)
    np.testing.assert_array_equal(strict.knn, loose.knn)
    pos, all_pos = strict.positives(ids), loose.positives(ids)
    want = all_pos & (scores >= cut - 1e-5)
    assert 0 < pos.sum() < all_pos.sum()
    np.testing.assert_array_equal(pos, want)
    neg, usable = strict.hard_negatives(ids, 50, np.random.default_rng(0))
    in_knn = np.array([[n in strict.knn[a] for n in row] for a, row in zip(ids, neg, strict=True)])
    np.testing.assert_array_equal(usable, ~in_knn)


def test_contrastive_weights_fall_linearly_over_training(data, monkeypatch):
    import trainer.channels.mic as mic_module

    assert cl_scale(1.0, 0.7) == 1.0 and cl_scale(0.0, 0.0) == 1.0
    assert cl_scale(0.0, 0.25) == pytest.approx(0.75) and cl_scale(0.2, 1.0) == pytest.approx(0.2)
    seen: list[float] = []
    real = mic_module.cl_scale
    monkeypatch.setattr(mic_module, "cl_scale", lambda final, prog: seen.append(prog) or real(final, prog))
    ch = registry.build(ChannelSpec(name="m", kind="u2i", model="mic", params={
        **FAST, "epochs": 3, "warmup_epochs": 1, "cl_final_scale": 0.0}))
    ch.fit(data)
    assert seen[0] == 0.0 and all(b > a for a, b in zip(seen, seen[1:], strict=False)) and 0.9 < seen[-1] < 1.0


def test_projection_head_carries_the_contrast_and_not_the_retrieval_vectors(data, monkeypatch):
    """With `cl_head` the views go through a trained head; the published vectors are the towers' own outputs."""
    import trainer.channels.mic as mic_module

    class Spy(mic_module.ProjectionHead):
        def __init__(self, dim: int):
            super().__init__(dim)
            self.initial = [q.detach().clone() for q in self.parameters()]

    monkeypatch.setattr(mic_module, "ProjectionHead", Spy)
    ch = registry.build(ChannelSpec(name="m", kind="u2i", model="mic", params={**FAST, "cl_head": True}))
    ch.fit(data)
    for head in ch.cl_heads.values():
        assert all(not torch.equal(a, b) for a, b in zip(head.initial, head.parameters(), strict=True)), "untrained"
    np.testing.assert_allclose(ch.encode_users(data), ch.user_vectors, atol=1e-6)
    np.testing.assert_allclose(ch.encode_items(data), ch.item_vectors, atol=1e-6)
    item_c, user_c = cluster(data.item_map.ids), cluster(data.user_map.ids)
    recs = ch.recommend(data, np.arange(data.n_users), 4, kind="u2i")
    assert np.mean([np.mean(item_c[ids] == user_c[u]) for u, (ids, _) in enumerate(recs)]) >= 0.9


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_view_u2i_adds_a_softmax_on_perturbed_user_views(data, monkeypatch, weight):
    """`view_u2i_weight` > 0: every step has a second u2i softmax, same items, users as perturbed views."""
    import trainer.channels.mic as mic_module

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = mic_module.in_batch_softmax_loss

    def spy(users, items, *args, **kwargs):
        calls.append((users.detach().clone(), items.detach().clone()))
        return real(users, items, *args, **kwargs)

    monkeypatch.setattr(mic_module, "in_batch_softmax_loss", spy)
    ch = registry.build(ChannelSpec(name="m", kind="u2i", model="mic", params={
        **FAST, "epochs": 2, "warmup_epochs": 1, "view_u2i_weight": weight}))
    ch.fit(data)
    steps = 2 * -(-len(data.item_idx) // FAST["batch_size"])
    assert len(calls) == steps * (2 if weight else 1)
    if weight:
        for (u, i), (u_v, i_v) in zip(calls[::2], calls[1::2], strict=True):
            assert torch.equal(i, i_v) and u.shape == u_v.shape and not torch.equal(u, u_v)


def test_mining_starts_after_the_warm_up_from_the_previous_epoch(fitted):
    assert fitted.metrics["snapshot_epochs"] == list(range(FAST["warmup_epochs"] - 1, FAST["epochs"] - 1))
    assert np.isfinite(fitted.losses).all() and fitted.losses[-1] < fitted.losses[0]


@pytest.mark.parametrize("knn, hard", [(3, 2), (0, 2), (3, 0)])
def test_the_loss_gets_knn_positives_and_hard_negatives_only_after_the_warm_up(data, monkeypatch, knn, hard):
    """Every contrastive call of the warm-up is plain NT-Xent; every later one carries the miner's kNN positives
    (a [N, N] mask with some true entries) and hard negatives ([N, m, d]) unless that part is switched off."""
    import trainer.channels.mic as mic_module

    calls: list[tuple[bool, bool, bool]] = []
    real = mic_module.nt_xent

    def spy(z1, z2, tau, extra=None, weight=1.0, hard_vecs=None, usable=None):
        calls.append((extra is not None and bool(extra.any()), hard_vecs is not None and hard_vecs.shape[1] == hard,
                      z1.shape != z2.shape or not torch.equal(z1, z2)))
        return real(z1, z2, tau, extra, weight, hard_vecs, usable)

    monkeypatch.setattr(mic_module, "nt_xent", spy)
    epochs, warmup = 3, 1
    ch = registry.build(ChannelSpec(name="m", kind="u2i", model="mic", params={
        **FAST, "epochs": epochs, "warmup_epochs": warmup, "knn_positives": knn, "hard_negatives": hard}))
    ch.fit(data)
    per_epoch = len(calls) // epochs  # two calls (u2u, i2i) per step, the same steps every epoch
    assert per_epoch > 0 and len(calls) == per_epoch * epochs
    warm, mined = calls[:per_epoch * warmup], calls[per_epoch * warmup:]
    assert not any(e or h for e, h, _ in warm), "mining used during the warm-up"
    assert all(h == (hard > 0) for _, h, _ in mined), "hard negatives missing (or present when off)"
    assert any(e for e, _, _ in mined) == (knn > 0) and all(not e for e, _, _ in mined) == (knn == 0)
    assert all(differ for *_, differ in calls), "the two views of a contrastive call are identical"


# -- what it learns and publishes ---------------------------------------------------------------------------


def test_planted_clusters_are_recovered_by_the_lists_and_the_u2i(data, fitted):
    arts = fitted.artifacts(data)
    assert set(arts) == {"u2i", "u2u", "i2i"}
    item_c, user_c = cluster(data.item_map.ids), cluster(data.user_map.ids)
    for kind, own in (("i2i", item_c), ("u2u", user_c)):
        nb = arts[kind].neighbors[:, :5]
        assert (nb >= 0).all()
        assert np.mean(own[nb] == own[:, None]) >= 0.9, f"{kind} lists mix the planted clusters"
    users = np.arange(data.n_users)
    recs = fitted.recommend(data, users, 4, kind="u2i")  # 4 unseen items left in the own cluster
    assert np.mean([np.mean(item_c[ids] == user_c[u]) for u, (ids, _) in zip(users, recs, strict=True)]) >= 0.9


def test_contrastive_training_tells_each_users_views_apart_from_other_users(data, fitted):
    """The u2u objective: a user's perturbed view finds its own twin among all users' views far more often than
    in the same backbone trained without the contrastive losses."""
    plain = registry.build(ChannelSpec(name="plain", kind="u2i", model="mic", params={
        **FAST, "u2u_weight": 0, "i2i_weight": 0, "knn_positives": 0, "hard_negatives": 0}))
    plain.fit(data)
    ids = np.arange(data.n_users)

    def twin_hits(ch: MicChannel) -> float:
        rng = np.random.default_rng(5)
        with torch.no_grad():
            a, b = ch._encode(data, "u", ids, rng), ch._encode(data, "u", ids, rng)
        return float(np.mean((a @ b.T).numpy().argmax(1) == ids))

    assert twin_hits(fitted) > twin_hits(plain) + 0.1


# -- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, key", [
    ({"epochs": 2, "warmup_epochs": 2}, "warmup_epochs"),
    ({"n_clusters": 3, "near_clusters": 3}, "near_clusters"),
    ({"u2u_weight": 0, "i2i_weight": 0}, "need a contrastive loss"),
    ({"field_mask": 1.0}, "params.field_mask"),
    ({"knn_positives": -1}, "params.knn_positives"),
    ({"cl_temperature": 0}, "params.cl_temperature"),
    ({"warmup_epochs": 0}, "params.warmup_epochs"),
    ({"hard_negatvies": 2}, "params.hard_negatvies"),
    ({"cl_final_scale": 1.5}, "params.cl_final_scale"),
    ({"knn_min_sim": 1.0}, "params.knn_min_sim"),
    ({"view_u2i_weight": -0.1}, "params.view_u2i_weight"),
])
def test_bad_settings_fail_at_load_naming_channel_and_key(params, key):
    raw = {"channels": {"my_mic": {"kind": "u2i", "model": "mic", "params": params}}}
    with pytest.raises(ConfigError) as err:
        registry.validate_params(parse_config(raw, "test.yaml"), "test.yaml")
    assert "test.yaml" in str(err.value) and "channel 'my_mic'" in str(err.value) and key in str(err.value)


def test_three_channels_from_one_model_in_the_config():
    raw = {"channels": {"mic": {"kind": "u2i", "model": "mic", "enabled": False, "params": {"epochs": 3}},
                        "mic_u2u": {"kind": "u2u", "from": "mic"}, "mic_i2i": {"kind": "i2i", "from": "mic"}}}
    cfg = parse_config(raw, "test.yaml")
    registry.validate_params(cfg, "test.yaml")
    assert {cfg.get(n).publisher for n in ("mic_u2u", "mic_i2i")} == {"mic"}
    registry.validate_params(parse_config({"channels": {"m": {"kind": "u2u", "model": "mic",
                                                              "params": {"knn_positives": 0, "hard_negatives": 0,
                                                                         "u2u_weight": 0, "i2i_weight": 0}}}}),
                             "test.yaml")  # mining off: no contrastive loss needed (the plain backbone)
    with pytest.raises(ConfigError, match="channel 'bad', key 'kind'"):
        registry.validate_params(parse_config({"channels": {"bad": {"kind": "list", "model": "mic"}}}), "t.yaml")


# -- end to end: nightly → Redis → recall server ------------------------------------------------------------


def test_nightly_publishes_three_channels_served_by_the_recall_server(settings, stores, tmp_path, start_server):
    from trainer.nightly import run_nightly

    inter, users, items = planted_frames()
    d = tmp_path / "data"
    d.mkdir()
    inter.to_csv(d / "interactions.csv", index=False)
    users.reset_index().to_csv(d / "users.csv", index=False)
    items.reset_index().to_csv(d / "items.csv", index=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(yaml.safe_dump({"channels": {
        "mic": {"kind": "u2i", "model": "mic", "quota": 20, "index": {"type": "flat"}, "params": FAST},
        "mic_u2u": {"kind": "u2u", "from": "mic", "quota": 20, "serve": {"per_anchor": 10, "neighbor_items": 10}},
        "mic_i2i": {"kind": "i2i", "from": "mic", "quota": 20, "serve": {"recent_n": 5}}}}))
    summary = run_nightly(settings, d, cfg, progress=False)
    assert summary["status"] == "ok", summary["failed"]
    assert summary["channels_planned"] == ["mic"]
    ver = current_version(stores, "mic")
    manifest = read_manifest(stores, "mic", ver)
    assert manifest["kinds"] == ["i2i", "u2i", "u2u"] and manifest["counts"]["i2i"] == N_CLUSTERS * PER_CLUSTER
    assert manifest["counts"]["u2u"] == N_USERS and summary["channels"]["mic"]["metrics"]["snapshot_epochs"]

    recall = start_server(["services.recall_server", "serve"], {"CHANNELS_CONFIG": str(cfg), "VECTOR_MODE": "embedded"})
    with httpx.Client(base_url=recall.url, timeout=10.0) as client:
        user = "u2"  # cluster 2
        body = None
        for _ in range(150):  # until the recall server has loaded the published version
            body = client.get("/recall", params={"user_id": user, "k": 20}).json()
            if all(body["channels"].get(c, {}).get("status") == "ok" for c in ("mic", "mic_u2u", "mic_i2i")):
                break
            time.sleep(0.2)
        assert all(body["channels"][c]["status"] == "ok" for c in ("mic", "mic_u2u", "mic_i2i")), body
        assert {body["versions"][c] for c in ("mic", "mic_u2u", "mic_i2i")} == {ver}
        got = [it["item_id"] for it in body["items"]]
        seen = set(inter.loc[inter["user_id"] == user, "item_id"])
        assert got and not seen & set(got)
        assert np.mean(cluster(got[:4]) == 2) >= 0.75, got
