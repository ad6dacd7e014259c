"""ItemCF: hand-computed similarities, reduction to the PROTOCOL reference, and what each extra weight does."""

from __future__ import annotations

from math import exp, log
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from common.channel_config import ChannelSpec, ServeParams
from trainer.channels.itemcf import ItemCF
from trainer.channels.neighbors import sparse_top_k
from trainer.data.split import leave_last_out
from trainer.data.train_data import TrainData

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"

# Every extra weight off: the PROTOCOL.md reference ItemCF (α = 0.5), all neighbours kept.
REFERENCE = dict(alpha=0.5, user_penalty=True, max_history=None, window=None, position_decay=1.0, time_decay_s=None,
                 forward_weight=1.0, backward_weight=1.0, category_weight=1.0, top_k=50)

# 5 users; item ids 1..5 are indices 0..4. Histories in time order.
TOY = {"u1": [1, 2, 3], "u2": [1, 2], "u3": [2, 3, 4], "u4": [1, 3], "u5": [5]}


def frame(histories: dict[str, list[int]], gap: int = 10) -> pd.DataFrame:
    rows = [(u, str(i), 1000 + gap * p) for u, items in histories.items() for p, i in enumerate(items)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def fit(df: pd.DataFrame, items: pd.DataFrame | None = None, **params) -> tuple[ItemCF, TrainData]:
    data = TrainData.from_frame(df, items=items)
    ch = ItemCF(ChannelSpec(name="itemcf", kind="i2i", model="itemcf", params={**REFERENCE, **params}))
    ch.fit(data)
    return ch, data


def dense(ch: ItemCF, data: TrainData) -> np.ndarray:
    """The i2i artifact as a dense item × item matrix (0 where absent)."""
    art = ch.artifacts(data)["i2i"]
    out = np.zeros((data.n_items, data.n_items))
    for r in range(data.n_items):
        keep = art.neighbors[r] >= 0
        out[r, art.neighbors[r][keep]] = art.scores[r][keep]
    return out


def loop_itemcf(df: pd.DataFrame, n_items: int, cat: np.ndarray | None = None, **params) -> np.ndarray:
    """The documented formula, pair by pair (obviously correct, slow). Item ids must be '1'..'n'."""
    p = {**REFERENCE, **params}
    co, counts = np.zeros((n_items, n_items)), np.zeros(n_items)
    df = df.assign(item_num=df["item_id"].astype(int))  # ties in time: ascending (numeric) item id
    for _, g in df.sort_values(["timestamp", "item_num"], kind="stable").groupby("user_id", sort=False):
        seq = [(int(i) - 1, int(t)) for i, t in zip(g["item_id"], g["timestamp"], strict=True)]
        if p["max_history"] is not None:
            seq = seq[-p["max_history"]:]
        wu = 1 / log(1 + len(seq)) if p["user_penalty"] else 1.0
        for a, (i, ti) in enumerate(seq):
            counts[i] += 1
            for b, (j, tj) in enumerate(seq):
                d = abs(a - b)
                if d == 0 or (p["window"] is not None and d > p["window"]):
                    continue
                w = wu * p["position_decay"] ** (d - 1) * (p["forward_weight"] if b > a else p["backward_weight"])
                if p["time_decay_s"] is not None:
                    w *= exp(-abs(ti - tj) / p["time_decay_s"])
                if cat is not None and cat[i] == cat[j] and cat[i] >= 0:
                    w *= p["category_weight"]
                co[i, j] += w
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = co / (counts[:, None] ** (1 - p["alpha"]) * counts[None, :] ** p["alpha"])
    return np.nan_to_num(sim)


def test_hand_computed_reference_similarities():
    ch, data = fit(frame(TOY))
    s = dense(ch, data)
    # |N(1)| = |N(2)| = |N(3)| = 3, |N(4)| = |N(5)| = 1; |N(u1)| = |N(u3)| = 3, |N(u2)| = |N(u4)| = 2
    assert s[0, 1] == pytest.approx((1 / log(4) + 1 / log(3)) / 3, rel=1e-6)  # items 1,2: users u1, u2
    assert s[0, 2] == pytest.approx((1 / log(4) + 1 / log(3)) / 3, rel=1e-6)  # items 1,3: users u1, u4
    assert s[1, 2] == pytest.approx((1 / log(4) + 1 / log(4)) / 3, rel=1e-6)  # items 2,3: users u1, u3
    assert s[1, 3] == pytest.approx((1 / log(4)) / 3 ** 0.5, rel=1e-6)  # items 2,4: user u3
    assert s[0, 3] == 0 and s[3, 0] == 0  # never together
    np.testing.assert_allclose(s, s.T, rtol=1e-6)  # α = 0.5 and no order weight: symmetric
    assert (ch.artifacts(data)["i2i"].neighbors[4] == -1).all()  # item 5 co-occurs with nothing
    assert np.diag(s).sum() == 0


def test_alpha_penalises_popular_neighbours():
    # α = 0.8: w_ij ∝ 1/(|N(i)|^0.2·|N(j)|^0.8); from item 3, the rare item 4 beats the popular item 2 more
    ch, data = fit(frame(TOY), alpha=0.8)
    s = dense(ch, data)
    assert s[1, 3] == pytest.approx((1 / log(4)) / (3 ** 0.2 * 1 ** 0.8), rel=1e-6)
    assert s[3, 1] == pytest.approx((1 / log(4)) / (1 ** 0.2 * 3 ** 0.8), rel=1e-6)
    np.testing.assert_allclose(s, loop_itemcf(frame(TOY), 5, alpha=0.8), rtol=1e-5)


def random_log(seed: int = 0, n_users: int = 30, n_items: int = 25) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=rng.integers(1, 15), replace=False) + 1
        ts = np.sort(rng.integers(0, 20_000, len(items)))
        rows += [(f"u{u}", str(i), int(t)) for i, t in zip(items, ts, strict=True)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    # make every item id 1..n_items appear so index = id - 1
    extra = pd.DataFrame({"user_id": "filler", "item_id": [str(i) for i in range(1, n_items + 1)],
                          "timestamp": 0})
    return pd.concat([df, extra], ignore_index=True)


def test_reduces_exactly_to_reference_formula_both_code_paths():
    df = random_log()
    want = loop_itemcf(df, 25)
    ch, data = fit(df)  # all weights off: the sparse-product path
    np.testing.assert_allclose(dense(ch, data), want, rtol=1e-5, atol=1e-7)
    # a time decay so slow it is 1 to float precision forces the pair-by-offset path: same numbers
    ch2, _ = fit(df, time_decay_s=1e18)
    np.testing.assert_allclose(dense(ch2, data), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("params", [
    dict(position_decay=0.8),
    dict(window=2),
    dict(time_decay_s=3000.0),
    dict(forward_weight=1.0, backward_weight=0.7),
    dict(category_weight=2.0),
    dict(max_history=5),
    dict(user_penalty=False, alpha=0.3),
    dict(position_decay=0.9, window=4, time_decay_s=5000.0, backward_weight=0.5, category_weight=1.5,
         max_history=8, alpha=0.6),
])
def test_every_weight_matches_the_pairwise_definition(params):
    df = random_log(seed=1)
    items = pd.DataFrame({"category": [f"c{i % 3}" for i in range(25)]}, index=[str(i) for i in range(1, 26)])
    ch, data = fit(df, items=items, **params)
    cat = data.item_category[0]
    np.testing.assert_allclose(dense(ch, data), loop_itemcf(df, 25, cat=cat, **params), rtol=1e-5, atol=1e-7)


def test_order_weight_makes_forward_beat_backward():
    # item 1 is always clicked before item 2
    df = frame({"a": [1, 2], "b": [1, 2, 3], "c": [3, 1, 2]})
    ch, data = fit(df, backward_weight=0.5)
    s = dense(ch, data)
    assert s[0, 1] > s[1, 0]
    assert s[0, 1] == pytest.approx(2 * s[1, 0], rel=1e-6)
    sym, _ = fit(df)
    assert dense(sym, data)[0, 1] == pytest.approx(dense(sym, data)[1, 0], rel=1e-6)


def test_category_weight_boosts_only_same_category_pairs():
    df = frame({"a": [1, 2, 3], "b": [1, 2, 3]})
    items = pd.DataFrame({"category": ["x", "x", "y"]}, index=["1", "2", "3"])
    base, data = fit(df, items=items)
    boosted, _ = fit(df, items=items, category_weight=3.0)
    s0, s1 = dense(base, data), dense(boosted, data)
    assert s0[0, 1] == pytest.approx(s0[0, 2], rel=1e-6)  # same co-occurrence...
    assert s1[0, 1] == pytest.approx(3 * s0[0, 1], rel=1e-6)  # ...but 1,2 share category x
    assert s1[0, 2] == pytest.approx(s0[0, 2], rel=1e-6)


def test_position_and_time_proximity_favour_close_pairs():
    # in each history item 1 is next to item 2 and three positions (and 30 s) away from item 4
    df = frame({"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]})
    plain, data = fit(df)
    assert dense(plain, data)[0, 1] == pytest.approx(dense(plain, data)[0, 3], rel=1e-6)
    pos, _ = fit(df, position_decay=0.5)
    assert dense(pos, data)[0, 3] == pytest.approx(dense(pos, data)[0, 1] * 0.25, rel=1e-6)
    tim, _ = fit(df, time_decay_s=10.0)
    assert dense(tim, data)[0, 3] == pytest.approx(dense(tim, data)[0, 1] * exp(-2), rel=1e-5)
    win, _ = fit(df, window=2)
    assert dense(win, data)[0, 3] == 0 and dense(win, data)[0, 2] > 0


def test_history_cap_bounds_the_work_and_equals_truncated_data():
    long = {"a": list(range(1, 21)), "b": list(range(5, 15)), "c": [1, 2]}
    df = frame(long)
    capped, data = fit(df, max_history=4, position_decay=0.9)
    uncapped, _ = fit(df, max_history=None, position_decay=0.9)
    assert capped.stats["pairs"] == 4 * 3 + 4 * 3 + 2 * 1  # ordered pairs within the last 4 items
    assert uncapped.stats["pairs"] == 20 * 19 + 10 * 9 + 2 * 1
    truncated = frame({"a": long["a"][-4:], "b": long["b"][-4:], "c": [1, 2]})
    # compared on the same item index space
    tr_data = TrainData.from_frame(truncated, item_map=data.item_map)
    tr = ItemCF(ChannelSpec(name="itemcf", kind="i2i", model="itemcf",
                            params={**REFERENCE, "max_history": None, "position_decay": 0.9}))
    tr.fit(tr_data)
    np.testing.assert_allclose(dense(capped, data), dense(tr, tr_data), rtol=1e-6)


def test_top_k_keeps_best_neighbours_with_ties_by_ascending_index():
    # from item 1, items 2, 3, 4 tie (one shared user each, same popularity); item 5 is more popular, so weaker
    df = frame({"a": [1, 2], "b": [1, 3], "c": [1, 4], "d": [1, 5], "e": [5, 6], "f": [2, 6], "g": [3, 7], "h": [4, 8],
                "i": [5, 9]})
    ch, data = fit(df, top_k=2)
    art = ch.artifacts(data)["i2i"]
    assert art.neighbors.shape == (data.n_items, 2)
    assert art.neighbors[0].tolist() == [1, 2]
    assert art.scores[0, 0] == art.scores[0, 1]


def test_sparse_top_k_matches_dense_reference():
    rng = np.random.default_rng(3)
    m = rng.random((40, 40)) * (rng.random((40, 40)) < 0.3)
    m[m > 0] = np.round(m[m > 0], 1)  # many ties
    ids, sc = sparse_top_k(sp.csr_matrix(m), 5)
    for r in range(40):
        row = m[r].copy()
        row[r] = 0
        cand = [(-row[c], c) for c in range(40) if row[c] > 0]
        want = [c for _, c in sorted(cand)[:5]]
        assert ids[r][: len(want)].tolist() == want
        assert (ids[r][len(want):] == -1).all()


def test_recommend_sums_recency_weighted_neighbour_scores_and_skips_seen():
    ch, data = fit(frame(TOY))
    s = dense(ch, data)
    u2 = data.user_map.get("u2")  # history [1, 2]: anchors newest first → item 2 (weight 1), item 1 (weight 0.5)
    (ids, scores), = ch.recommend(data, np.array([u2]), k=10,
                                  serve=ServeParams(recent_n=5, recency_decay=0.5, per_anchor=10))
    assert set(ids.tolist()) == {2, 3}  # items 3 and 4; 1 and 2 are seen
    got = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    assert got[2] == pytest.approx(s[1, 2] + 0.5 * s[0, 2], rel=1e-6)
    assert got[3] == pytest.approx(s[1, 3], rel=1e-6)
    assert ids[0] == 2


def test_unknown_param_is_rejected():
    with pytest.raises(ValidationError, match="no_such"):
        ItemCF(ChannelSpec(name="itemcf", kind="i2i", model="itemcf", params={"no_such": 1}))


@pytest.mark.skipif(not (SHARED_DATA / "interactions.csv").exists(), reason="ml-100k not available")
def test_reference_settings_reproduce_protocol_itemcf_on_ml100k():
    """PROTOCOL.md: reference ItemCF (α 0.5, scores summed over the last 20 items) HR@50 0.259, HR@200 0.591."""
    from trainer.data.io import load_dataset

    ds = load_dataset(SHARED_DATA)
    train, test = leave_last_out(ds.interactions)
    data = TrainData.from_frame(train)
    ch = ItemCF(ChannelSpec(name="itemcf", kind="i2i", model="itemcf", params={**REFERENCE, "top_k": 2000},
                            serve=ServeParams(recent_n=20, recency_decay=1.0, per_anchor=2000)))
    ch.fit(data)
    users, targets = data.user_map.lookup(test["user_id"]), data.item_map.lookup(test["item_id"])
    recs = ch.recommend(data, users, k=200)
    ranks = np.array([(np.flatnonzero(ids == t)[0] + 1) if t in ids else 10**9
                      for (ids, _), t in zip(recs, targets, strict=True)])
    assert len(users) == 943
    assert np.mean(ranks <= 50) == pytest.approx(0.259, abs=0.0006)
    assert np.mean(ranks <= 200) == pytest.approx(0.591, abs=0.0006)


def test_sparse_accumulator_and_small_chunks_give_identical_results(monkeypatch):
    import trainer.channels.itemcf as mod
    import trainer.channels.neighbors as nbmod

    df = random_log(seed=2)
    params = dict(position_decay=0.9, backward_weight=0.6, time_decay_s=4000.0, top_k=10)
    want, data = fit(df, **params)
    monkeypatch.setattr(mod, "DENSE_MAX_ITEMS", 0)  # the large-catalog sparse accumulator
    monkeypatch.setattr(mod, "PAIR_BUFFER", 7)  # many flushes
    monkeypatch.setattr(nbmod, "TOPK_NNZ_BUDGET", 5)  # many top-k chunks
    got, _ = fit(df, **params)
    a, b = want.artifacts(data)["i2i"], got.artifacts(data)["i2i"]
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
