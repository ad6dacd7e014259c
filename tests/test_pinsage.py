"""PinSAGE / GraphSAGE (trainer/channels/pinsage.py): the paper's mechanisms on small planted cases."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from common.channel_config import ChannelSpec, ConfigError, parse_config
from tests.channel_contract import planted_data
from trainer.channels import registry
from trainer.channels.pinsage import PinSageChannel
from trainer.data.examples import sequence_pairs
from trainer.data.train_data import TrainData
from trainer.graph import bipartite, ppr_power, visit_counts, walks_with_restart
from trainer.graph.sage import GraphEncoder, SAGEConv, masked_weights, pair_edges
from trainer.nn.negatives import curriculum_count, draw_hard, rank_window

SMALL = {"dim": 8, "emb_dim": 8, "epochs": 2, "num_negatives": 8, "batch_size": 64, "top_k": 10}


def channel(**params) -> PinSageChannel:
    return registry.build(ChannelSpec(name="pinsage", kind="i2i", model="pinsage", params={**SMALL, **params}))


def ring_data(n_items: int = 40, users_per: int = 3) -> TrainData:
    """Users who each click 3 consecutive items of a ring, in order: PPR from an item decays with ring distance."""
    rows = []
    uid = 0
    for s in range(n_items):
        for _ in range(users_per):
            for d in range(3):
                rows.append((f"u{uid:03d}", f"i{(s + d) % n_items:02d}", 1_700_000_000 + 10_000 * uid + 60 * d))
            uid += 1
    return TrainData.from_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))


# -- importance pooling --------------------------------------------------------------------------------------


def test_importance_weights_are_normalised_visit_counts():
    data = planted_data()
    ch = channel(epochs=1, num_walks=40, walk_length=3, restart_prob=0.5, num_neighbors=5)
    ch.fit(data)
    # the same walks, redrawn with the channel's seed (the neighbourhoods are its first draws)
    iu, ui = bipartite(data.user_idx, data.item_idx, data.n_users, data.n_items)
    rows, items = walks_with_restart(iu, ui, np.arange(data.n_items), 40, 3, 0.5, np.random.default_rng(42))
    counts = visit_counts(rows, items, data.n_items, data.n_items).toarray()
    for q in range(data.n_items):
        nb, w = ch.neighbors[q], ch.neighbor_weights[q]
        assert q not in nb and (nb >= 0).all()
        c = counts[q, nb]
        np.testing.assert_allclose(w, c / c.sum(), rtol=1e-6)  # α_v = visit count / Σ over the top T
        others = np.delete(counts[q], np.concatenate([nb, [q]]))
        assert c.min() >= others.max()  # the top T by visit count


def test_importance_pooling_is_the_weighted_sum_of_transformed_neighbours():
    torch.manual_seed(0)
    conv = SAGEConv(4, 6, 5, transform=True)
    h_self, h_src = torch.randn(2, 4), torch.randn(3, 4)
    idx = torch.tensor([[0, 1, 2], [2, 2, 0]])
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    got = conv(h_self, h_src, idx, w)
    msg = torch.relu(conv.q(h_src))  # ReLU(Q h_v + q)
    agg = torch.stack([(w[r, :, None] * msg[idx[r]]).sum(0) for r in range(2)])  # n_u = Σ α_v ReLU(Q h_v + q)
    want = F.normalize(torch.relu(conv.w(torch.cat([h_self, agg], 1))), dim=1)  # normalize(ReLU(W [h ; n]))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
    mean = SAGEConv(4, 4, 5, transform=False)  # GraphSAGE: the plain (weighted) mean, no Q
    agg = torch.stack([(w[r, :, None] * h_src[idx[r]]).sum(0) for r in range(2)])
    torch.testing.assert_close(mean(h_self, h_src, idx, w),
                               F.normalize(torch.relu(mean.w(torch.cat([h_self, agg], 1))), dim=1))


# -- edge leakage --------------------------------------------------------------------------------------------


def test_training_edge_is_removed_from_its_own_neighbourhood():
    n = 6
    nbr = torch.tensor([[1, 2, 3], [0, 2, -1], [0, 1, 4], [0, 4, 5], [2, 3, 5], [3, 4, -1]])
    w = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.3, 0.0], [0.4, 0.4, 0.2], [0.6, 0.2, 0.2], [0.5, 0.25, 0.25],
                      [0.5, 0.5, 0.0]])
    forbid = torch.as_tensor(pair_edges(np.array([0]), np.array([1]), n))  # training pair (0, 1)
    assert sorted(forbid.tolist()) == [0 * n + 1, 1 * n + 0]
    mw = masked_weights(nbr, w, torch.arange(n), n, forbid)
    torch.testing.assert_close(mw[0], torch.tensor([0.0, 0.6, 0.4]))  # 1 dropped from 0's row, renormalised
    torch.testing.assert_close(mw[1], torch.tensor([0.0, 1.0, 0.0]))  # 0 dropped from 1's row
    torch.testing.assert_close(mw[2:], w[2:])  # other nodes keep the edge to 0 / 1
    # the encoder with `forbid` = the encoder on a table without those edges, at every layer
    torch.manual_seed(0)
    enc = GraphEncoder(torch.nn.Embedding(n, 16), 16, [16, 16], 16, n, transform=True)
    cut = nbr.clone()
    cut[0, 0] = -1
    cut[1, 0] = -1
    items = torch.arange(n)
    with torch.no_grad():
        a = enc(items, [(nbr, w)], forbid)
        b = enc(items, [(cut, w)])
        c = enc(items, [(nbr, w)])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])


def test_channel_removes_the_batch_pairs_edges(monkeypatch):
    seen = []
    real = GraphEncoder.forward

    def spy(self, items, tables, forbid=None):
        seen.append(forbid)
        return real(self, items, tables, forbid)

    monkeypatch.setattr(GraphEncoder, "forward", spy)
    data = planted_data()
    channel(epochs=1).fit(data)
    train_calls = [f for f in seen if f is not None]
    assert train_calls and all(len(f) > 0 for f in train_calls)
    seen.clear()
    channel(epochs=1, remove_edges=False).fit(data)
    assert all(f is None for f in seen)


# -- hard negatives ------------------------------------------------------------------------------------------


def test_curriculum_adds_n_minus_1_hard_negatives_at_epoch_n():
    assert [curriculum_count(e, True, None, 5) for e in range(5)] == [0, 1, 2, 3, 4]
    assert [curriculum_count(e, True, 2, 5) for e in range(5)] == [0, 1, 2, 2, 2]
    assert [curriculum_count(e, False, None, 5) for e in range(5)] == [4] * 5
    ch = channel(epochs=4, hard_negatives=True)
    ch.fit(planted_data())
    assert ch.hard_counts == [0, 1, 2, 3]
    assert ch.hard_used == {0: 0, 1: 1, 2: 2, 3: 3}  # what the batches of each epoch actually drew
    flat = channel(epochs=3, hard_negatives=True, curriculum=False)
    flat.fit(planted_data())
    assert flat.hard_counts == [2, 2, 2] and flat.hard_used == {0: 2, 1: 2, 2: 2}
    off = channel(epochs=3, hard_negatives=False)
    off.fit(planted_data())
    assert off.hard_counts == [0, 0, 0] and off.hard_pools is None


def test_hard_negatives_come_from_the_ppr_rank_window():
    data = ring_data()
    ch = channel(epochs=1, hard_negatives=True, hard_from=4, hard_to=12, hard_pool=6, ppr_method="power",
                 ppr_restart=0.3)
    ch.fit(data)
    assert ch.hard_window == (4, 12)
    iu, ui = bipartite(data.user_idx, data.item_idx, data.n_users, data.n_items)
    x = ppr_power(iu, ui, np.arange(data.n_items), 0.3, 20)
    x[np.arange(data.n_items), np.arange(data.n_items)] = -np.inf
    order = np.argsort(-x, axis=1, kind="stable")
    for q in range(data.n_items):
        pool = ch.hard_pools[q]
        assert (pool >= 0).all() and len(set(pool)) == 6
        assert set(pool) <= set(order[q, 4:12])  # ranks [hard_from, hard_to), never the top 4
        assert not set(pool) & set(order[q, :4])
    drawn = draw_hard(ch.hard_pools, np.arange(data.n_items), 50, np.random.default_rng(0))
    for q in range(data.n_items):
        assert set(drawn[q]) <= set(ch.hard_pools[q])
    # fractions scale with the catalogue
    assert rank_window(0.03, 0.15, 1679) == (50, 252)
    assert rank_window(100, 0.05, 10_000) == (100, 500)


# -- GraphSAGE variant, pairs, side information ---------------------------------------------------------------


def test_graphsage_samples_uniform_neighbourhoods_per_layer():
    data = planted_data()
    ch = channel(variant="graphsage", num_neighbors=6, epochs=1)
    ch.fit(data)
    tables = ch._tables(np.random.default_rng(0))
    assert len(tables) == 2 and not torch.equal(tables[0][0], tables[1][0])  # one sample per layer
    csr = data.csr
    co = (csr.T @ csr).toarray() > 0  # items sharing a user
    for nb, w in tables:
        assert nb.shape == (data.n_items, 6)
        np.testing.assert_allclose(w.numpy(), 1 / 6)  # mean aggregation
        assert co[np.arange(data.n_items)[:, None], nb.numpy()].all()
    assert ch.encoder.convs[0].q is None  # no importance transform


def test_sequence_pairs_follow_each_users_order():
    u = np.array([0, 0, 0, 1, 1])
    i = np.array([5, 6, 7, 8, 9])
    q, p = sequence_pairs(u, i, 1)
    assert list(zip(q.tolist(), p.tolist(), strict=True)) == [(5, 6), (6, 7), (8, 9)]
    q, p = sequence_pairs(u, i, 2)
    assert sorted(zip(q.tolist(), p.tolist(), strict=True)) == [(5, 6), (5, 7), (6, 7), (8, 9)]


def test_side_information_reaches_sparse_items():
    """Items clicked once get neighbours of their own category from the attribute fields of the input layer."""
    data = planted_data()
    ch = channel(epochs=6, use_item_attrs=True)
    ch.fit(data)
    cat = data.item_field("category")
    nb = ch.artifacts(data)["i2i"].neighbors[:, :5]
    assert (cat[nb] == cat[:, None]).mean() > 0.8


def test_deterministic_with_seed():
    data = planted_data()
    a, b = channel(epochs=2), channel(epochs=2)
    a.fit(data)
    b.fit(data)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)


# -- config ---------------------------------------------------------------------------------------------------


BASE = {"channels": {"pinsage": {"kind": "i2i", "model": "pinsage", "weight": 1.0, "quota": 100}}}


@pytest.mark.parametrize("params,key", [
    ({"variant": "gcn"}, "params.variant"),
    ({"num_neighbors": 0}, "params.num_neighbors"),
    ({"hard_from": 0.2, "hard_to": 0.1}, "params.hard_to"),
    ({"restart_prob": 1.5}, "params.restart_prob"),
    ({"T": 10}, "params.T"),
])
def test_bad_params_fail_at_load_naming_channel_and_key(params, key):
    raw = copy.deepcopy(BASE)
    raw["channels"]["pinsage"]["params"] = params
    with pytest.raises(ConfigError) as err:
        registry.validate_params(parse_config(raw, "test.yaml"), "test.yaml")
    msg = str(err.value)
    assert "test.yaml" in msg and "channel 'pinsage'" in msg and f"key '{key}'" in msg


def test_defaults_are_valid():
    registry.validate_params(parse_config(BASE, "test.yaml"), "test.yaml")
