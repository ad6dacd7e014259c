"""Two-tower channel: losses, logQ correction, negatives, feature construction, SENet, user tower export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from common.channel_config import ChannelSpec
from common.towers import encode_user_inputs, matches, numpy_twin, recent_matrix
from services.vector_server.index import load_tower
from trainer.channels import registry
from trainer.channels.two_tower import TwoTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.encoding import encode_attrs
from trainer.nn.losses import logits, ranking_loss, row_logits

N_CLUSTERS, PER_CLUSTER, N_USERS, CLICKS = 4, 25, 80, 8
FAST = {"emb_dim": 16, "dim": 16, "hidden": [32], "epochs": 25, "batch_size": 64, "lr": 0.01, "num_negatives": 16,
        "recent_n": 5, "hard_from": 2, "hard_to": 20, "hard_refresh": 5}


def planted() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Users of cluster c click CLICKS random items of cluster c (items c*25 … c*25+24), one per minute."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        c = u % N_CLUSTERS
        items = rng.choice(PER_CLUSTER, size=CLICKS, replace=False) + c * PER_CLUSTER
        rows += [(f"u{u}", f"i{i}", 1_000_000 + 60 * t) for t, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    users = pd.DataFrame({"age": [int(20 + u % 7) for u in range(N_USERS)],
                          "gender": ["M" if u % 2 else "F" for u in range(N_USERS)],
                          "zip": [f"z{u}" for u in range(N_USERS)]},  # id-like: must be dropped
                         index=pd.Index([f"u{u}" for u in range(N_USERS)], name="user_id"))
    n_items = N_CLUSTERS * PER_CLUSTER
    items = pd.DataFrame({"genres": ["a|b" if i % 3 == 0 else "b" for i in range(n_items)],
                          "title": [f"t{i}" for i in range(n_items)]},
                         index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"))
    return inter, users, items


@pytest.fixture(scope="module")
def data() -> TrainData:
    inter, users, items = planted()
    return TrainData.from_frame(inter, users, items)


def cluster_of(data: TrainData, idx: np.ndarray) -> np.ndarray:
    ext = np.asarray(data.item_map.ids, dtype=object)[idx]
    return np.array([int(s[1:]) // PER_CLUSTER for s in ext])


def user_cluster(data: TrainData, u: int) -> int:
    return int(data.user_map.ids[u][1:]) % N_CLUSTERS


def fit(data: TrainData, **params) -> TwoTowerChannel:
    ch = TwoTowerChannel(ChannelSpec(name="tt", kind="u2i", model="two_tower", params={**FAST, **params}))
    ch.fit(data)
    return ch


def cluster_precision(ch: TwoTowerChannel, data: TrainData, k: int = 10) -> float:
    users = np.arange(data.n_users)
    recs = ch.recommend(data, users, k)
    hits = [np.mean(cluster_of(data, ids) == user_cluster(data, u)) for u, (ids, _) in zip(users, recs, strict=True)]
    return float(np.mean(hits))


# -- scores and losses ------------------------------------------------------------------------------


def test_logq_correction_subtracts_exactly_log_p():
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    v = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    plain = logits(u, v, 0.05)
    corrected = logits(u, v, 0.05, torch.log(p))
    assert torch.equal(corrected, plain - torch.log(p).unsqueeze(0))
    torch.testing.assert_close(plain, u @ v.T / 0.05)
    # per-row candidates: same rule
    cand = v.unsqueeze(0).expand(6, -1, -1)
    lq = torch.log(p).expand(6, -1)
    assert torch.equal(row_logits(u, cand, 0.05, lq), row_logits(u, cand, 0.05) - lq)


def test_loss_modes_match_their_formulas():
    pos = torch.tensor([2.0, -1.0])
    neg = torch.tensor([[1.0, 3.0], [0.5, -2.0]])
    valid = torch.tensor([[True, True], [True, False]])
    tau, m = 0.5, 0.2
    # listwise: softmax CE over [pos, valid negs]
    ce = [-torch.log_softmax(torch.tensor([2.0, 1.0, 3.0]), 0)[0], -torch.log_softmax(torch.tensor([-1.0, 0.5]), 0)[0]]
    torch.testing.assert_close(ranking_loss(pos, neg, valid, "listwise", tau, m), torch.stack(ce).mean())
    # hinge in cosine units: max(0, m + cos_c − cos_b), cos = logit·τ
    h0 = (max(0, m + 0.5 - 1.0) + max(0, m + 1.5 - 1.0)) / 2
    h1 = max(0, m + 0.25 + 0.5)
    torch.testing.assert_close(ranking_loss(pos, neg, valid, "hinge", tau, m), torch.tensor((h0 + h1) / 2))
    # logistic: −log σ(s_b − s_c)
    sp = torch.nn.functional.softplus
    l0 = (sp(torch.tensor(-1.0)) + sp(torch.tensor(1.0))) / 2
    l1 = sp(torch.tensor(1.5))
    torch.testing.assert_close(ranking_loss(pos, neg, valid, "logistic", tau, m), (l0 + l1) / 2)
    # pointwise: BCE, positive label 1, valid negatives label 0 (their mean weighs as much as the positive)
    b0 = sp(torch.tensor(-2.0)) + (sp(torch.tensor(1.0)) + sp(torch.tensor(3.0))) / 2
    b1 = sp(torch.tensor(1.0)) + sp(torch.tensor(0.5))
    torch.testing.assert_close(ranking_loss(pos, neg, valid, "pointwise", tau, m), (b0 + b1) / 2)
    with pytest.raises(ValueError):
        ranking_loss(pos, neg, valid, "nope", tau, m)


# -- features --------------------------------------------------------------------------------------


def test_recent_matrix_uses_only_earlier_items_of_the_same_user():
    # two users: u0 items [10, 11, 12], u1 items [20, 21]; pad = 99
    item_idx = np.array([10, 11, 12, 20, 21])
    start = np.array([0, 0, 0, 3, 3])
    rec = recent_matrix(item_idx, start, np.arange(5), n=2, pad=99)
    np.testing.assert_array_equal(rec, [[99, 99], [10, 99], [11, 10], [99, 99], [20, 99]])
    # export: end = one past the last interaction → the latest items, newest first
    np.testing.assert_array_equal(recent_matrix(item_idx, np.array([0, 3]), np.array([3, 5]), 4, 99),
                                  [[12, 11, 10, 99], [21, 20, 99, 99]])


def test_attribute_encoding_vocab_buckets_and_bags():
    _, users, items = planted()
    enc = encode_attrs(users, len(users), multi_valued=False)
    assert enc.columns == ["age", "gender"]  # 'zip' is unique per user → dropped
    assert enc.vocab["age"]["24"] == enc.vocab["age"]["24.0"] == enc.codes[4, 0, 0] > 0
    assert set(enc.vocab["gender"]) == {"M", "F"}
    ienc = encode_attrs(items, len(items), multi_valued=True)
    assert ienc.columns == ["genres"]
    a, b = ienc.vocab["genres"]["a"], ienc.vocab["genres"]["b"]
    assert sorted(ienc.codes[0, 0].tolist()) == sorted([a, b]) and ienc.codes[1, 0].tolist() == [b, -1]
    many = pd.DataFrame({"x": np.arange(100.0)})
    nenc = encode_attrs(many, 100, multi_valued=False, numeric_buckets=4)
    assert sorted(set(nenc.codes[:, 0, 0].tolist())) == [1, 2, 3, 4]


# -- training --------------------------------------------------------------------------------------


def test_registered_and_params_validated():
    assert registry.models()["two_tower"] is TwoTowerChannel
    with pytest.raises(ValueError):
        TwoTowerChannel(ChannelSpec(name="tt", kind="u2i", model="two_tower", params={"loss": "nope"}))
    with pytest.raises(ValueError):
        TwoTowerChannel(ChannelSpec(name="tt", kind="u2i", model="two_tower", params={"hard_from": 50, "hard_to": 10}))


@pytest.mark.parametrize("params", [
    {"loss": "listwise", "negatives": "in_batch"},
    {"loss": "listwise", "negatives": "in_batch", "logq": False},
    {"loss": "listwise", "negatives": "random"},
    {"loss": "listwise", "negatives": "mixed"},
    {"loss": "listwise", "negatives": "hard"},
    {"loss": "listwise", "negatives": "full"},
    {"loss": "pointwise", "negatives": "random", "temperature": 0.2},
    {"loss": "pointwise", "negatives": "in_batch"},
    {"loss": "hinge", "negatives": "in_batch"},
    {"loss": "logistic", "negatives": "hard", "temperature": 0.2, "epochs": 40},  # pairwise + hard: slower start
    {"loss": "listwise", "senet": True},
    {"loss": "listwise", "pos_subsample": 0.01, "logq_source": "exact"},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_each_loss_and_negative_scheme_learns_planted_clusters(data, params):
    ch = fit(data, **params)
    assert np.isfinite(ch.losses).all()
    assert ch.losses[-1] < ch.losses[0]
    # random recommendations would put 1/4 of the top-10 in the user's cluster
    assert cluster_precision(ch, data) > 0.8


def test_senet_changes_the_model_and_is_deterministic(data):
    a, b, c = fit(data, senet=True), fit(data, senet=True), fit(data, senet=False)
    assert hasattr(a.user_tower.senet, "fc1") and not hasattr(c.user_tower.senet, "fc1")
    va, vb, vc = (x.artifacts(data)["u2i"] for x in (a, b, c))
    np.testing.assert_array_equal(va.user_vectors, vb.user_vectors)  # same seed → same model
    assert not np.allclose(va.user_vectors, vc.user_vectors)


# -- export ----------------------------------------------------------------------------------------


def zip_names(blob: bytes) -> list[str]:
    import io
    import zipfile

    return zipfile.ZipFile(io.BytesIO(blob)).namelist()


def served(art) -> torch.nn.Module:
    """The artifact's user tower rebuilt exactly as the vector server does (state dict + meta, by arch tag)."""
    return load_tower(art.user_tower, art.user_tower_meta, art.item_vectors.shape[1])


def run(tower, meta, user_idx, attrs, recent) -> np.ndarray:
    with torch.no_grad():
        return tower(*(torch.from_numpy(x) for x in encode_user_inputs(meta, user_idx, attrs, recent)))[0].numpy()


def test_artifact_and_served_user_tower_match_the_training_model(data):
    ch = fit(data, recent_last=True)
    art = ch.artifacts(data)["u2i"]
    assert art.item_vectors.shape == (data.n_items, 16) and art.user_vectors.shape == (data.n_users, 16)
    np.testing.assert_allclose(np.linalg.norm(art.item_vectors, axis=1), 1.0, rtol=1e-5)
    meta = art.user_tower_meta
    assert json.loads(json.dumps(meta)) == meta  # goes into the manifest
    assert meta["n_users"] == data.n_users and meta["n_items"] == data.n_items and meta["recent_n"] == 5
    assert meta["attr_columns"] == ["age", "gender"]
    assert meta["arch"] == "two_tower_user" and meta["hparams"]["recent_last"] is True
    assert meta["hparams"]["n_users"] == data.n_users and meta["hparams"]["out_dim"] == 16
    assert art.user_tower[:2] == b"PK"  # torch.save's zip of a state dict (a TorchScript archive holds code/)
    assert not any(name.endswith((".py", "code/")) or "/code/" in name for name in zip_names(art.user_tower))
    tower = served(art)
    assert type(tower) is type(ch.user_tower) and tower is not ch.user_tower
    _, users, _ = planted()

    for u in (0, 7, data.n_users - 1):
        attrs = users.loc[data.user_map.ids[u]].to_dict()
        recent = data.recent(u, 5)[0]
        np.testing.assert_allclose(run(tower, meta, u, attrs, recent), art.user_vectors[u], atol=1e-5)
    # an unknown user with a few events of cluster 2 (and raw attribute values in other spellings)
    recent = [i for i in range(data.n_items) if cluster_of(data, np.array([i]))[0] == 2][:3]
    vec = run(tower, meta, -1, {"age": "24.0", "gender": "F", "unknown_col": 1}, recent)
    inputs = encode_user_inputs(meta, data.n_users + 5, {"age": 24, "gender": "F"}, recent)
    assert inputs[0][0] == data.n_users and inputs[1][0, 0] == meta["attr_vocab"]["age"]["24"]
    with torch.no_grad():
        ref = ch.user_tower(*(torch.from_numpy(x) for x in inputs))[0].numpy()
    np.testing.assert_allclose(vec, ref, atol=1e-6)
    top = np.argsort(-(art.item_vectors @ vec))[:10]
    assert np.mean(cluster_of(data, top) == 2) >= 0.8
    # batch of several users at once
    with torch.no_grad():
        batch = tower(torch.tensor([0, 1]), torch.zeros((2, 2), dtype=torch.int64),
                      torch.full((2, 5), data.n_items, dtype=torch.int64))
    assert batch.shape == (2, 16) and batch.dtype == torch.float32
    # what the vector server runs on requests: the numpy twin of this exported tower, same vectors
    twin = numpy_twin(tower, meta)
    assert twin is not None and matches(twin, tower, meta, n=100)
    for u in (0, 7, data.n_users - 1):
        attrs = users.loc[data.user_map.ids[u]].to_dict()
        inputs = encode_user_inputs(meta, u, attrs, data.recent(u, 5)[0])
        np.testing.assert_allclose(twin(*inputs), art.user_vectors[u], atol=1e-5)


def test_training_and_serving_encode_the_same_inputs(data):
    """The arrays the trainer feeds the tower (training examples, export) are the ones a request builds from raw
    attribute values and the user's latest items (common/towers/inputs.py for both)."""
    ch = fit(data, epochs=1)
    meta = ch.artifacts(data)["u2i"].user_tower_meta
    _, users, _ = planted()
    for u in range(data.n_users):
        trained = ch._user_inputs(data, np.array([u]), data.user_ptr[[u + 1]])  # what encode_users (export) uses
        items, ts = data.recent(u, 5)
        request = encode_user_inputs(meta, u, users.loc[data.user_map.ids[u]].to_dict(), items, ts)
        for got, want in zip(request[:3], trained, strict=True):
            np.testing.assert_array_equal(got, want.numpy())
        assert request.recent_ts.shape == request.recent.shape and request.recent_ts[0, 0] == ts[0]
    # a training example sees only the items before it, in the same layout
    g = int(data.user_ptr[3]) + 4
    x = ch._user_inputs(data, np.array([3]), np.array([g]))
    request = encode_user_inputs(meta, 3, users.loc[data.user_map.ids[3]].to_dict(),
                                 data.item_idx[data.user_ptr[3]:g][::-1])
    np.testing.assert_array_equal(request.recent, x[2].numpy())


def test_works_without_attribute_tables():
    inter, _, _ = planted()
    d = TrainData.from_frame(inter)
    ch = fit(d, epochs=5)
    art = ch.artifacts(d)["u2i"]
    assert art.user_tower_meta["attr_columns"] == [] and art.user_tower_meta["hparams"]["attr_sizes"] == []
    out = run(served(art), art.user_tower_meta, 3, None, d.recent(3, 5)[0])
    np.testing.assert_allclose(out, art.user_vectors[3], atol=1e-5)


def test_registered_user_without_interactions_is_served_as_unknown():
    from common.ids import IdMap

    inter, _, _ = planted()
    d = TrainData.from_frame(inter, user_map=IdMap(["cold"]))
    ch = fit(d, epochs=3)
    art = ch.artifacts(d)["u2i"]
    tower, meta = served(art), art.user_tower_meta
    cold = int(d.user_map.lookup(["cold"])[0])
    recent = [1, 2]
    np.testing.assert_array_equal(run(tower, meta, cold, None, recent), run(tower, meta, -1, None, recent))
    assert cold == 0 and not np.allclose(run(tower, meta, 1, None, recent), run(tower, meta, -1, None, recent))
    no_history = run(tower, meta, -1, None, [])
    np.testing.assert_allclose(art.user_vectors[cold], no_history, atol=1e-6)


def test_scale_rule_bounds_the_examples_seen():
    from trainer.channels.two_tower import scaled_epochs

    assert scaled_epochs(7, 99_000, 1_000_000) == 7  # ml-100k: unchanged
    assert scaled_epochs(7, 300_000, 1_000_000) == 3
    assert scaled_epochs(7, 866_356, 1_000_000) == 1  # 1M clicks: one epoch
    assert scaled_epochs(7, 9_751_755, 1_000_000) == 1  # never less than one
    assert scaled_epochs(7, 9_751_755, None) == 7
    assert scaled_epochs(7, 0, 1_000_000) == 7


def test_lazy_tables_learn_planted_clusters(data):
    from trainer.nn.warm_start import LazyAdam

    ch = fit(data, lazy_tables_above=0, max_examples=len(data.item_idx) * 20)
    assert ch.epochs_run == 20
    opts = ch.optimizer
    assert isinstance(opts, list) and isinstance(opts[0], LazyAdam) and not isinstance(opts[1], LazyAdam)
    tables = {id(p) for g in opts[0].param_groups for p in g["params"]}
    assert id(ch.user_tower.user_emb.weight) in tables and id(ch.item_tower.item_emb.weight) in tables
    assert cluster_precision(ch, data) > 0.8
    assert fit(data, lazy_tables_above=None, max_examples=1).epochs_run == 1
