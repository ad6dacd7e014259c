"""Metric-learning I2I (EasyRec's CoMetricLearningI2I): the pair masks on a toy batch, circle and
multi-similarity losses against hand-computed values, a planted case, and its params failing at load."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.channel_config import ChannelSpec, ConfigError, parse_config
from tests.channel_contract import ChannelContract
from trainer.channels import registry
from trainer.channels.metric_i2i import MetricI2IChannel
from trainer.data.train_data import TrainData
from trainer.nn.pair_losses import circle_loss, metric_loss, ms_mine, multi_similarity_loss, pair_masks

T, F = True, False

# A toy flat batch: session 0 = items 10, 11 (clicked), 12, 13 (not clicked); session 1 = items 11 (again),
# 14 (clicked), 15 (not clicked).
ITEMS = torch.tensor([10, 11, 12, 13, 11, 14, 15])
POSITIVE = torch.tensor([T, T, F, F, T, T, F])
SESSION = torch.tensor([0, 0, 0, 0, 1, 1, 1])


def test_pair_masks_exact():
    pos, neg = pair_masks(ITEMS, POSITIVE, SESSION)
    expected_pos = torch.tensor([
        [F, T, F, F, F, F, F],
        [T, F, F, F, F, F, F],
        [F, F, F, F, F, F, F],  # 12 and 13: two non-clicked items of one session are NOT positives
        [F, F, F, F, F, F, F],
        [F, F, F, F, F, T, F],
        [F, F, F, F, T, F, F],
        [F, F, F, F, F, F, F],
    ])
    expected_neg = torch.tensor([
        [F, F, T, T, T, T, T],
        [F, F, T, T, F, T, T],  # item 11 in session 1 is the same item: masked, not a negative
        [T, T, F, T, T, T, T],
        [T, T, T, F, T, T, T],
        [T, F, T, T, F, F, T],
        [T, T, T, T, F, F, T],
        [T, T, T, T, T, T, F],
    ])
    assert torch.equal(pos, expected_pos)
    assert torch.equal(neg, expected_neg)
    # EasyRec's get_anchor_positive_triplet_mask (same session ∧ equal label ∧ a ≠ p) differs exactly there
    ref = (SESSION[:, None] == SESSION[None, :]) & (POSITIVE[:, None] == POSITIVE[None, :]) & ~torch.eye(7, dtype=bool)
    assert ref[2, 3] and ref[3, 2] and not pos[2, 3]
    assert (~ref[1, 4]) and not neg[1, 4]  # the reference makes the repeated item 11 its own negative


# one anchor (row 0) with one positive (s = 0.5) and two negatives (s = 0.3, −0.4); rows 1, 2 unused
SIM = torch.tensor([[1.0, 0.5, 0.3, -0.4]])
POS = torch.tensor([[F, T, F, F]])
NEG = torch.tensor([[F, F, T, T]])


def test_circle_loss_hand_computed():
    m, g = 0.25, 32.0
    a_p = 1 + m - 0.5  # 0.75
    logit_p = -g * a_p * (0.5 - (1 - m))  # 6.0
    logit_n = [g * max(0.3 + m, 0) * (0.3 - m), g * max(-0.4 + m, 0) * (-0.4 - m)]  # 0.88, 0 (α_n = 0)
    expected = math.log1p(math.exp(math.log(sum(math.exp(x) for x in logit_n)) + logit_p))
    sim = SIM.clone().requires_grad_(True)
    got = circle_loss(sim, POS, NEG, m, g)
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-6)
    got.sum().backward()
    # α_p, α_n are stop-gradient: dL/ds_p = σ(z) · (−γ α_p) with z = lse_n + logit_p
    z = math.log(sum(math.exp(x) for x in logit_n)) + logit_p
    assert sim.grad[0, 1].item() == pytest.approx(-g * a_p / (1 + math.exp(-z)), rel=1e-5)
    assert sim.grad[0, 0].item() == 0.0  # masked pairs get no gradient
    # an anchor without a positive contributes exactly 0
    assert circle_loss(SIM, torch.zeros_like(POS), NEG).item() == 0.0


def test_multi_similarity_loss_hand_computed():
    a, b, lam = 2.0, 50.0, 0.5
    expected = math.log1p(math.exp(-a * (0.5 - lam))) / a + math.log1p(
        math.exp(b * (0.3 - lam)) + math.exp(b * (-0.4 - lam))) / b
    assert multi_similarity_loss(SIM, POS, NEG, a, b, lam).item() == pytest.approx(expected, rel=1e-6)
    lam1 = 1.0  # EasyRec's default λ
    expected1 = math.log1p(math.exp(-a * (0.5 - lam1))) / a + math.log1p(
        math.exp(b * (0.3 - lam1)) + math.exp(b * (-0.4 - lam1))) / b
    assert multi_similarity_loss(SIM, POS, NEG, a, b, lam1).item() == pytest.approx(expected1, rel=1e-6)


def test_multi_similarity_mining():
    sim = torch.tensor([[1.0, 0.35, 0.3, -0.4]])
    p, n = ms_mine(sim, POS, NEG, eps=0.1)
    # negative kept iff s_n > min_p s_p − ε = 0.25; positive kept iff s_p < max_n s_n + ε = 0.4
    assert torch.equal(p, POS) and torch.equal(n, torch.tensor([[F, F, T, F]]))
    a, b, lam = 2.0, 50.0, 0.5
    expected = math.log1p(math.exp(-a * (0.35 - lam))) / a + math.log1p(math.exp(b * (0.3 - lam))) / b
    got = multi_similarity_loss(sim, POS, NEG, a, b, lam, eps=0.1, mining=True)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    p2, n2 = ms_mine(SIM, POS, NEG, eps=0.1)  # s_p = 0.5 ≥ 0.3 + 0.1 and no negative above 0.4: nothing left
    assert not p2.any() and not n2.any()
    assert multi_similarity_loss(SIM, POS, NEG, mining=True).item() == 0.0


def test_metric_loss_means_over_anchors_with_a_positive_and_counts_the_rest():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    for name in ("circle", "multi_similarity"):
        loss, st = metric_loss(emb, ITEMS, POSITIVE, SESSION, name)
        pos, neg = pair_masks(ITEMS, POSITIVE, SESSION)
        sim = emb @ emb.T
        rows = [0, 1, 4, 5]  # the clicked anchors; 2, 3, 6 have no positive pair
        per = circle_loss(sim, pos, neg) if name == "circle" else multi_similarity_loss(sim, pos, neg)
        assert loss.item() == pytest.approx(per[rows].mean().item(), rel=1e-6)
        assert (st.anchors, st.no_positive, st.positive_pairs) == (7, 3, 4)
        assert st.negative_pairs == int(neg[rows].sum())
    loss, st = metric_loss(emb, ITEMS, torch.zeros(7, dtype=torch.bool), SESSION)
    assert loss.item() == 0.0 and st.no_positive == 7


# -- the channel --------------------------------------------------------------------------------------------

FAST = {"dim": 16, "emb_dim": 16, "hidden": [], "epochs": 8, "n_way": 8, "k_shot": 6, "lr": 0.01, "top_k": 10,
        "gamma": 8.0, "min_count_ratio": 0.0, "count_feature": False}


PLANTED_COLUMNS = ["user_id", "item_id", "timestamp", "rating"]


def planted_frame() -> pd.DataFrame:
    """4 clusters × 10 items; every session = 5 liked items of one cluster + 2 non-liked items from anywhere;
    users hold 3 sessions 2 h apart, clusters alternating."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(48):
        t = 1_000_000
        for s in range(3):
            c = (u + s) % 4
            for i in rng.choice(10, 5, replace=False) + 10 * c:
                rows.append((f"u{u}", f"i{i:02d}", t, 5.0))
                t += 60
            for i in rng.choice(40, 2, replace=False):
                rows.append((f"u{u}", f"i{i:02d}", t, 2.0))
                t += 60
            t += 7200
    return pd.DataFrame(rows, columns=PLANTED_COLUMNS).drop_duplicates(["user_id", "item_id"])


def planted() -> TrainData:
    items = pd.DataFrame({"category": [f"c{i // 10}" for i in range(40)]}, index=[f"i{i:02d}" for i in range(40)])
    return TrainData.from_frame(planted_frame(), items=items)


def fit(data: TrainData, **params) -> MetricI2IChannel:
    ch = MetricI2IChannel(ChannelSpec(name="mi", kind="i2i", model="metric_i2i", params={**FAST, **params}))
    ch.fit(data)
    return ch


def purity(ch: MetricI2IChannel, data: TrainData) -> float:
    nb = ch.artifacts(data)["i2i"].neighbors[:, :5]
    cl = np.array([int(x[1:]) // 10 for x in data.item_map.ids])
    return float((cl[nb] == cl[:, None]).mean())


@pytest.mark.parametrize("loss", ["circle", "multi_similarity"])
def test_planted_sessions_give_cluster_neighbours(loss, caplog):
    data = planted()
    with caplog.at_level(logging.INFO, logger="trainer.channels.metric_i2i"):
        ch = fit(data, loss=loss, positives="like", use_item_attrs=False)
    assert purity(ch, data) > 0.9
    m = ch.metrics
    # positives = liked items: the 2 non-liked items of each drawn session are anchors without a positive
    assert 0 < m["anchors_without_positive"] == ch.anchors_without_positive < m["anchors"]
    assert "without a positive" in caplog.text
    assert fit(data, loss=loss, positives="all", use_item_attrs=False, epochs=1).anchors_without_positive == 0


def test_rare_items_get_no_list_and_are_nobodys_neighbour():
    df = pd.concat([planted_frame(), pd.DataFrame([("u0", "rare", 1_000_030, 5.0)], columns=PLANTED_COLUMNS)], ignore_index=True)
    data = TrainData.from_frame(df)
    rare = data.item_map.get("rare")
    ch = fit(data, epochs=1, min_count_ratio=0.33, count_feature=True)
    assert not ch.valid_items[rare] and ch.valid_items.sum() == data.n_items - 1
    art = ch.artifacts(data)["i2i"]
    assert (art.neighbors[rare] < 0).all() and not (art.neighbors == rare).any()
    assert fit(data, epochs=1).valid_items[rare]  # min_count_ratio 0: every trained item


def test_deterministic_and_cold_items_get_attribute_vectors():
    # x0, x1 (category c0) and x2 (c3): one click each, alone in their sessions, so never in a batch
    lone = pd.DataFrame([("u0", "x0", 2_000_000, 5.0), ("u1", "x1", 2_000_000, 5.0), ("u2", "x2", 2_000_000, 5.0)],
                        columns=PLANTED_COLUMNS)
    ids = [f"i{i:02d}" for i in range(40)] + ["x0", "x1", "x2"]
    items = pd.DataFrame({"category": [f"c{i // 10}" for i in range(40)] + ["c0", "c0", "c3"]}, index=ids)
    data = TrainData.from_frame(pd.concat([planted_frame(), lone], ignore_index=True), items=items)
    a, b = fit(data, epochs=2), fit(data, epochs=2)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    assert np.allclose(np.linalg.norm(a.item_vectors, axis=1), 1.0, atol=1e-5)
    x0, x1, x2 = (data.item_map.get(x) for x in ("x0", "x1", "x2"))
    # untrained id embeddings are zeroed: equal attributes → equal vectors; another category → another vector
    np.testing.assert_allclose(a.item_vectors[x0], a.item_vectors[x1], atol=1e-6)
    assert not np.allclose(a.item_vectors[x0], a.item_vectors[x2], atol=1e-3)
    assert not a.valid_items[x0] and a.valid_items.sum() == 40


@pytest.mark.parametrize("key,value", [("loss", "triplet"), ("gamma", 0), ("k_shot", 1), ("positives", "clicks"),
                                       ("n_way", 1), ("batchsize", 64)])
def test_bad_params_fail_at_load_naming_channel_and_key(key, value):
    raw = {"channels": {"metric": {"kind": "i2i", "model": "metric_i2i", "weight": 1.0, "quota": 100,
                                   "params": {key: value}}}}
    cfg = parse_config(raw, "test.yaml")
    with pytest.raises(ConfigError) as err:
        registry.validate_params(cfg, "test.yaml")
    assert "channel 'metric'" in str(err.value) and f"params.{key}" in str(err.value)


class TestMetricI2IContractSmall(ChannelContract):
    """The contract again with this model's own small settings (the generic run is in test_channel_contract)."""

    model = "metric_i2i"
    params = {"dim": 8, "emb_dim": 8, "hidden": [16], "epochs": 2, "n_way": 8, "k_shot": 4, "top_k": 20}
