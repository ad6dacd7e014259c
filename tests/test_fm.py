"""FM channel: the O(k·n) pairwise identity, feature encoding, a planted structure, exported vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from common.channel_config import ChannelSpec
from trainer.channels.base import NeighborArtifact, RenamedParamError, VectorArtifact
from trainer.channels.fm import (
    FM,
    FMNet,
    build_feature_space,
    fm_field,
    history_codes,
    pairwise_fast,
    pairwise_naive,
)
from trainer.channels.registry import models
from trainer.data.train_data import TrainData
from trainer.nn.encoding import encode_column, fm_options

N_GROUPS, USERS_PER, ITEMS_PER = 6, 15, 10
SMALL = {"dim": 8, "epochs": 30, "batch_size": 256, "lr": 0.02, "num_negatives": 4, "top_k": 10}


def planted(seed: int = 0, per_user: int = 7) -> tuple[TrainData, np.ndarray, np.ndarray]:
    """6 user clusters each clicking items of their own group, with user/item attributes and a region
    context. Returns (data, user group, item group) by internal index."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(N_GROUPS):
        own = np.arange(g * ITEMS_PER, (g + 1) * ITEMS_PER)
        for u in range(g * USERS_PER, (g + 1) * USERS_PER):
            for t, i in enumerate(rng.choice(own, per_user, replace=False)):
                rows.append((f"u{u}", f"i{i}", 1000 * u + t, f"r{rng.integers(3)}"))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "region"])
    n_users, n_items = N_GROUPS * USERS_PER, N_GROUPS * ITEMS_PER
    users = pd.DataFrame({"age": rng.integers(18, 70, n_users), "gender": rng.choice(["M", "F"], n_users)},
                         index=pd.Index([f"u{u}" for u in range(n_users)], name="user_id"))
    genres = [f"g{i // ITEMS_PER}|x{i % 2}" for i in range(n_items)]
    items = pd.DataFrame({"genres": genres, "title": [f"title {i}" for i in range(n_items)]},
                         index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"))
    data = TrainData.from_frame(df, users, items)
    ugroup = np.array([int(x[1:]) // USERS_PER for x in data.user_map.ids])
    igroup = np.array([int(x[1:]) // ITEMS_PER for x in data.item_map.ids])
    return data, ugroup, igroup


def fitted(params: dict, data: TrainData, seed: int = 42) -> FM:
    ch = FM(ChannelSpec(name="fm", kind="u2i", model="fm", params=params), seed=seed)
    ch.fit(data)
    return ch


@pytest.fixture(scope="module")
def trained():
    data, ug, ig = planted()
    return fitted({**SMALL, "history_n": 3}, data), data, ug, ig


def test_pairwise_fast_equals_naive():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, 9, 5, generator=g, dtype=torch.float64)
    x = torch.rand(16, 9, generator=g, dtype=torch.float64)
    x[:, 7:] = 0.0  # padding
    naive = pairwise_naive(v, x)
    loop = torch.zeros(16, dtype=torch.float64)
    for i in range(9):
        for j in range(i + 1, 9):
            loop += (v[:, i] * v[:, j]).sum(1) * x[:, i] * x[:, j]
    assert torch.allclose(naive, loop)
    assert torch.allclose(pairwise_fast(v, x), naive, atol=1e-10)


def test_fmnet_sides_equal_the_full_fm():
    torch.manual_seed(0)
    net = FMNet(50, 6, init_std=0.3)
    with torch.no_grad():
        net.w.weight.normal_()
        net.w0.fill_(0.7)
    g = torch.Generator().manual_seed(1)
    ui, ci, ii = (torch.randint(1, 50, (8, f), generator=g) for f in (3, 2, 4))
    uw, cw, iw = (torch.rand(8, f, generator=g) for f in (3, 2, 4))
    u_inv, i_inv = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]).flip(0), torch.tensor([1, 1, 0, 2, 3, 4, 5, 6])
    c_inv = torch.arange(8)
    logit, l2v, l2w = net([(ui, uw, u_inv), (ci, cw, c_inv), (ii, iw, i_inv)])
    idx = torch.cat([ui[u_inv], ci, ii[i_inv]], 1)
    x = torch.cat([uw[u_inv], cw, iw[i_inv]], 1)
    full = net.w0 + (net.w(idx).squeeze(-1) * x).sum(1) + pairwise_fast(net.v(idx), x)
    assert torch.allclose(logit, full, atol=1e-5)
    # grouped form (query = user + context once, against several items) gives the same logits
    q_inv = torch.tensor([0, 1, 2, 3])
    items = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3]])
    g_logit, _, _ = net.grouped([(ui, uw, q_inv), (ci[:4], cw[:4], None)], (ii, iw, items.ravel()), 2)
    rows = [(q, j) for q in range(4) for j in items[q].tolist()]
    idx = torch.stack([torch.cat([ui[q], ci[q], ii[j]]) for q, j in rows])
    x = torch.stack([torch.cat([uw[q], cw[q], iw[j]]) for q, j in rows])
    full = net.w0 + (net.w(idx).squeeze(-1) * x).sum(1) + pairwise_fast(net.v(idx), x)
    assert torch.allclose(g_logit.ravel(), full, atol=1e-5)
    # penalties count each distinct side row once
    expect = sum((net.v(i) ** 2).sum() for i in (ui, ci, ii))
    assert torch.allclose(l2v, expect, rtol=1e-5)


def test_fm_fields_from_the_kit_encoder():
    """FM's features of an encoded column (trainer/nn/encoding.py, FM's options): one per value that occurs, in
    sorted order, '<rare>' last; a missing value is no feature; a bag's values weigh 1/n."""
    ages = pd.Series(np.arange(100, dtype=float))
    fc = fm_field(encode_column("age", ages, options=fm_options(n_bins=4)))
    assert len(fc.vocab) == 4 and fc.codes.shape == (100, 1)
    assert (np.bincount(fc.codes[:, 0]) == 25).all()  # quantile bins
    occ = pd.Series(["a", "a", "b", "b", "c", None])
    fc = fm_field(encode_column("occ", occ, options=fm_options(min_count=2)))
    assert fc.vocab == ["a", "b", "<rare>"]
    assert list(fc.codes[:, 0]) == [0, 0, 1, 1, 2, -1]
    assert encode_column("title", pd.Series([f"t{i}" for i in range(50)]), options=fm_options()) is None  # id-like
    g = fm_field(encode_column("genres", pd.Series(["x|y", "y", "x|y|z", "z"]), True, fm_options(min_count=1)))
    assert g.vocab == ["x", "y", "z"]
    assert np.allclose(g.weights.sum(1), 1.0)
    assert sorted(g.codes[2]) == [0, 1, 2] and np.allclose(g.weights[2], 1 / 3)
    # numeric bins that no row falls in take no feature (all values equal to the lowest edge)
    skew = fm_field(encode_column("s", pd.Series([0.0] * 50 + list(range(1, 51))), options=fm_options(n_bins=10)))
    assert sorted(set(skew.codes[:, 0].tolist())) == list(range(len(skew.vocab)))


def test_history_codes():
    df = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": ["1", "2", "3", "1"], "timestamp": [1, 2, 3, 5]})
    data = TrainData.from_frame(df)
    codes, w, ucodes, uw = history_codes(data, 2, 0.5)
    i = {x: data.item_map.get(x) for x in "123"}
    assert codes.tolist() == [[-1, -1], [i["1"], -1], [i["2"], i["1"]], [-1, -1]]
    assert np.allclose(w[2], [2 / 3, 1 / 3]) and np.allclose(w[1], [1, 0])
    assert ucodes.tolist() == [[i["3"], i["2"]], [i["1"], -1]]  # what the user's next click would see


def test_feature_space_fields():
    data, _, _ = planted()
    fs = build_feature_space(data, history_n=3)
    assert set(fs.fields) == {"user:id", "user:age", "user:gender", "item:id", "item:genres",
                              "context:region", "context:history"}  # title is id-like
    assert fs.user_idx.shape[0] == data.n_users and fs.item_idx.shape[0] == data.n_items
    assert fs.ctx_idx.shape == (len(data.user_idx), 1 + 3)
    assert fs.user_ctx_idx.shape == (data.n_users, 1 + 3)
    assert fs.n_features == 1 + sum(size for _, _, size in fs.fields.values())


def test_registry_and_params():
    assert models()["fm"] is FM
    assert set(FM.kinds) == {"u2i", "i2i", "u2u"}
    with pytest.raises(ValidationError, match="nope"):
        FM.Params(nope=1)
    with pytest.raises(ValidationError, match="negatives"):
        FM.Params(negatives="hard")
    # one vocabulary across models: the old names fail, naming the new one
    for old, new in (("factors", "dim"), ("neg_ratio", "num_negatives"), ("negative_sampling", "negatives"),
                     ("neg_power", "negatives_power"), ("i2i_k", "top_k"), ("u2u_k", "u2u_top_k")):
        with pytest.raises(RenamedParamError, match=f"params.{old}: renamed to '{new}'"):
            FM(ChannelSpec(name="fm", kind="u2i", model="fm", params={old: 1}))


def test_planted_auc_and_recommendations(trained):
    ch, data, ugroup, igroup = trained
    assert ch.metrics["auc"] > 0.8, ch.metrics
    users = np.arange(data.n_users)
    recs = ch.recommend(data, users, 3, kind="u2i")
    own = np.mean([np.mean(igroup[ids] == ugroup[u]) for u, (ids, _) in zip(users, recs, strict=True)])
    assert own >= 0.9, own
    assert all(not np.isin(ids, data.history(u)[0]).any() for u, (ids, _) in zip(users, recs, strict=True))


def test_artifacts(trained):
    ch, data, ugroup, igroup = trained
    arts = ch.artifacts(data)
    assert set(arts) == {"u2i", "i2i", "u2u"}
    u2i = arts["u2i"]
    assert isinstance(u2i, VectorArtifact)
    assert u2i.item_vectors.shape == (data.n_items, 8 + 2) and u2i.item_vectors.dtype == np.float32
    assert u2i.user_vectors.shape == (data.n_users, 8 + 2) and u2i.user_vectors.dtype == np.float32
    for kind, n, group in (("i2i", data.n_items, igroup), ("u2u", data.n_users, ugroup)):
        art = arts[kind]
        assert isinstance(art, NeighborArtifact)
        assert art.neighbors.shape == (n, 10) and art.neighbors.dtype == np.int32
        assert (art.neighbors != np.arange(n)[:, None]).all()  # self excluded
        assert np.mean(group[art.neighbors[:, :5]] == group[:, None]) >= 0.9, kind
        assert (art.scores[:, :5] <= 1.0 + 1e-5).all()  # cosine


def test_u2u_top_k_defaults_to_top_k():
    data, _, _ = planted()
    ch = fitted({**SMALL, "epochs": 1, "top_k": 7, "u2u_top_k": 4}, data)
    arts = ch.artifacts(data)
    assert arts["i2i"].neighbors.shape == (data.n_items, 7) and arts["u2u"].neighbors.shape == (data.n_users, 4)
    ch = fitted({**SMALL, "epochs": 1, "top_k": 7}, data)
    assert ch.artifacts(data)["u2u"].neighbors.shape == (data.n_users, 7)


def test_vectors_inner_product_is_the_fm_logit(trained):
    """<user, item> = w0 + Σ w x + pairwise over (user fields, user's latest context, item fields)."""
    ch, data, _, _ = trained
    fs = ch.features
    rng = np.random.default_rng(0)
    u = rng.integers(0, data.n_users, 40)
    i = rng.integers(0, data.n_items, 40)
    idx = np.hstack([fs.user_idx[u], fs.user_ctx_idx[u], fs.item_idx[i]])
    x = np.hstack([fs.user_w[u], fs.user_ctx_w[u], fs.item_w[i]])
    v = torch.from_numpy(ch.V[idx]).double()
    logit = ch.w0 + (ch.W[idx] * x).sum(1) + pairwise_fast(v, torch.from_numpy(x).double()).numpy()
    ip = np.einsum("ij,ij->i", ch.user_vectors[u], ch.item_vectors[i])
    assert np.allclose(ip, logit, atol=1e-4)
    # and the training-time model agrees on real (user, interaction context, item) rows
    rows = rng.integers(0, len(data.user_idx), 40)
    ur = data.user_idx[rows].astype(np.int64)
    net = FMNet(fs.n_features, 8, 0.1)
    with torch.no_grad():
        net.v.weight.copy_(torch.from_numpy(ch.V))
        net.w.weight.copy_(torch.from_numpy(ch.W[:, None]))
        net.w0.fill_(ch.w0)
        torch_logit = net(ch._sides(fs, ur, rows, i))[0].numpy()
    assert np.allclose(torch_logit, ch.predict_rows(ur, rows, i), atol=1e-4)


@pytest.mark.parametrize("refit", [True, False])
def test_deterministic_with_seed(refit):
    data, _, _ = planted()
    params = {**SMALL, "epochs": 3, "refit_full": refit}
    a, b, c = fitted(params, data), fitted(params, data), fitted(params, data, seed=7)
    assert np.array_equal(a.user_vectors, b.user_vectors)
    assert np.array_equal(a.item_vectors, b.item_vectors)
    assert a.metrics["auc"] == b.metrics["auc"]
    assert not np.array_equal(a.item_vectors, c.item_vectors)


def test_cold_item_gets_attribute_vector_but_no_list():
    data, _, igroup = planted()
    data.item_map.extend(["cold"])
    data.item_attrs = pd.concat([data.item_attrs, pd.DataFrame({"genres": ["g2|x0"], "title": ["t"]})],
                                ignore_index=True)
    ch = fitted({**SMALL, "epochs": 10}, data)
    cold = data.item_map.get("cold")
    arts = ch.artifacts(data)
    assert arts["u2i"].item_vectors[cold].any()  # from its genres
    assert (arts["i2i"].neighbors[cold] == -1).all() and not (arts["i2i"].neighbors == cold).any()
    # the id feature was never trained: its vector is exactly its attributes' sum
    g2 = [j for j in range(data.n_items - 1) if igroup[j] == 2]
    sims = ch.item_sum[g2] @ ch.item_sum[cold] / (np.linalg.norm(ch.item_sum[g2], axis=1) *
                                                  np.linalg.norm(ch.item_sum[cold]))
    others = [j for j in range(data.n_items - 1) if igroup[j] != 2]
    sims_o = ch.item_sum[others] @ ch.item_sum[cold] / (np.linalg.norm(ch.item_sum[others], axis=1) *
                                                        np.linalg.norm(ch.item_sum[cold]))
    assert sims.mean() > sims_o.mean()


def test_export_in_chunks_equals_one_pass(monkeypatch):
    import trainer.channels.fm as fm_mod

    data, _, _ = planted()
    params = {**SMALL, "epochs": 1}
    whole = fitted(params, data)
    monkeypatch.setattr(fm_mod, "EXPORT_CHUNK", 7)
    chunked = fitted(params, data)
    np.testing.assert_allclose(chunked.user_vectors, whole.user_vectors, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(chunked.item_vectors, whole.item_vectors, rtol=1e-6, atol=1e-7)
