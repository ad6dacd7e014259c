"""UserCF: hand-computed similarities, normalisations, region boost, history cap and serving."""

from __future__ import annotations

from math import log, sqrt

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from common.channel_config import ChannelSpec, ServeParams
from trainer.channels.usercf import UserCF, user_regions
from trainer.data.train_data import TrainData

PLAIN = dict(top_k=50, item_penalty=True, normalization="power", beta=0.5, max_history=None, region_weight=1.0)
TOY = {"u1": [1, 2, 3], "u2": [1, 2], "u3": [2, 3, 4], "u4": [1, 3], "u5": [5]}


def frame(histories: dict[str, list[int]], regions: dict[str, list[str]] | None = None) -> pd.DataFrame:
    rows = [(u, str(i), 1000 + 10 * p) for u, items in histories.items() for p, i in enumerate(items)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    if regions is not None:
        df["region"] = [r for u in histories for r in regions[u]]
    return df


def fit(df: pd.DataFrame, users: pd.DataFrame | None = None, **params) -> tuple[UserCF, TrainData]:
    data = TrainData.from_frame(df, users=users)
    ch = UserCF(ChannelSpec(name="usercf", kind="u2u", model="usercf", params={**PLAIN, **params}))
    ch.fit(data)
    return ch, data


def sims(ch: UserCF, data: TrainData) -> dict[tuple[str, str], float]:
    """{(user, neighbour): score} from the u2u artifact, by external id."""
    art, ids = ch.artifacts(data)["u2u"], data.user_map.ids
    return {(ids[u], ids[v]): float(s) for u in range(data.n_users)
            for v, s in zip(art.neighbors[u], art.scores[u], strict=True) if v >= 0}


def loop_usercf(histories: dict[str, list[int]], penalty=True, normalization="power", beta=0.5,
                region: dict[str, str] | None = None, region_weight=1.0) -> dict[tuple[str, str], float]:
    """The documented formula, pair by pair."""
    n_of_item: dict[int, int] = {}
    for items in histories.values():
        for i in items:
            n_of_item[i] = n_of_item.get(i, 0) + 1
    w = {i: (1 / log(1 + n) if penalty else 1.0) for i, n in n_of_item.items()}
    out = {}
    for u, hu in histories.items():
        for v, hv in histories.items():
            common = set(hu) & set(hv)
            if u == v or not common:
                continue
            num = sum(w[i] for i in common)
            if normalization == "power":
                s = num / (len(hu) ** beta * len(hv) ** (1 - beta))
            else:
                s = num / sqrt(sum(w[i] for i in hu) * sum(w[i] for i in hv))
            if region and region[u] == region[v]:
                s *= region_weight
            out[(u, v)] = s
    return out


def test_hand_computed_similarities():
    got = sims(*fit(frame(TOY)))
    p = 1 / log(4)  # items 1, 2, 3 each have 3 users
    assert got[("u1", "u2")] == pytest.approx(2 * p / sqrt(3 * 2), rel=1e-6)  # share items 1, 2
    assert got[("u1", "u3")] == pytest.approx(2 * p / 3, rel=1e-6)  # share items 2, 3
    assert got[("u3", "u4")] == pytest.approx(p / sqrt(3 * 2), rel=1e-6)  # share item 3
    assert got[("u2", "u1")] == pytest.approx(got[("u1", "u2")], rel=1e-6)  # β = 0.5: symmetric
    assert not any("u5" in pair for pair in got)  # u5's only item is nobody else's
    assert all(u != v for u, v in got)


def test_beta_and_cosine_normalisations():
    p = 1 / log(4)
    got = sims(*fit(frame(TOY), beta=0.8))
    assert got[("u1", "u2")] == pytest.approx(2 * p / (3 ** 0.8 * 2 ** 0.2), rel=1e-6)
    assert got[("u2", "u1")] == pytest.approx(2 * p / (2 ** 0.8 * 3 ** 0.2), rel=1e-6)
    cos = sims(*fit(frame(TOY), normalization="cosine"))
    mass_u1, mass_u3 = 3 * p, 2 * p + 1 / log(2)  # u3's item 4 has one user
    assert cos[("u1", "u3")] == pytest.approx(2 * p / sqrt(mass_u1 * mass_u3), rel=1e-6)


def test_hot_item_penalty_down_weights_popular_items():
    plain = sims(*fit(frame(TOY), item_penalty=False))
    assert plain[("u1", "u2")] == pytest.approx(2 / sqrt(6), rel=1e-6)  # plain common-item count
    # a shares popular item 1 with b and rare item 2 with e: equal without the penalty, e wins with it
    df = frame({"a": [1, 2], "b": [1, 3], "c": [1], "d": [1], "e": [2, 6]})
    flat = sims(*fit(df, item_penalty=False))
    assert flat[("a", "e")] == pytest.approx(flat[("a", "b")], rel=1e-6)
    got = sims(*fit(df))
    assert got[("a", "e")] == pytest.approx((1 / log(3)) / 2, rel=1e-6)
    assert got[("a", "b")] == pytest.approx((1 / log(5)) / 2, rel=1e-6)


@pytest.mark.parametrize("params", [dict(), dict(beta=0.3), dict(normalization="cosine"), dict(item_penalty=False)])
def test_matches_pairwise_definition_on_random_log(params):
    rng = np.random.default_rng(7)
    hist = {f"u{u}": (rng.choice(30, size=rng.integers(1, 12), replace=False) + 1).tolist() for u in range(40)}
    got = sims(*fit(frame(hist), **params))
    want = loop_usercf(hist, penalty=params.get("item_penalty", True), normalization=params.get("normalization", "power"),
                       beta=params.get("beta", 0.5))
    assert got.keys() == want.keys()
    for key, val in want.items():
        assert got[key] == pytest.approx(val, rel=1e-5)


def test_region_boost_from_users_table():
    users = pd.DataFrame({"region": ["north", "south", "north", "south", "north"]},
                         index=["u1", "u2", "u3", "u4", "u5"])
    base = sims(*fit(frame(TOY), users=users))
    boosted = sims(*fit(frame(TOY), users=users, region_weight=2.0))
    assert boosted[("u1", "u3")] == pytest.approx(2 * base[("u1", "u3")], rel=1e-6)  # both north
    assert boosted[("u1", "u2")] == pytest.approx(base[("u1", "u2")], rel=1e-6)  # north vs south
    assert boosted[("u2", "u4")] == pytest.approx(2 * base[("u2", "u4")], rel=1e-6)  # both south


def test_region_from_most_frequent_interaction_context():
    regions = {"u1": ["r1", "r1", "r2"], "u2": ["r2", "r2"], "u3": ["r1", "r2", "r1"], "u4": ["r2", "r1"],
               "u5": ["r9"]}
    data = TrainData.from_frame(frame(TOY, regions))
    reg = dict(zip(data.user_map.ids, user_regions(data).tolist(), strict=True))
    assert reg["u1"] == reg["u3"] != reg["u2"]
    assert reg["u4"] == reg["u1"]  # tie r1/r2 → the smaller name, r1
    boosted = sims(*fit(frame(TOY, regions), region_weight=3.0))
    want = loop_usercf(TOY, region={"u1": "r1", "u2": "r2", "u3": "r1", "u4": "r1", "u5": "r9"}, region_weight=3.0)
    for key, val in want.items():
        assert boosted[key] == pytest.approx(val, rel=1e-6)


def test_history_cap_uses_only_recent_items():
    df = frame({"a": [1, 2, 3, 4], "b": [1, 2], "c": [3, 4]})
    ch, data = fit(df, max_history=2)
    got = sims(ch, data)
    assert ch.stats["interactions_used"] == 6
    assert ("a", "b") not in got  # a's last two items are 3, 4
    assert got[("a", "c")] == pytest.approx(2 / log(3) / 2, rel=1e-6)  # items 3, 4 have 2 users each


def test_top_k_and_ties_by_ascending_user_index():
    # u0 shares one equally rare item with each of u1..u4
    df = frame({"u0": [1, 2, 3, 4], "u1": [1], "u2": [2], "u3": [3], "u4": [4]})
    ch, data = fit(df, top_k=2)
    art = ch.artifacts(data)["u2u"]
    u0 = data.user_map.get("u0")
    assert art.neighbors.shape == (data.n_users, 2)
    assert [data.user_map.ids[v] for v in art.neighbors[u0]] == ["u1", "u2"]


def test_recommend_scores_neighbours_recent_items_by_similarity():
    ch, data = fit(frame(TOY))
    got = sims(ch, data)
    u2 = data.user_map.get("u2")
    (ids, scores), = ch.recommend(data, np.array([u2]), k=10, serve=ServeParams(per_anchor=10, neighbor_items=10))
    items = [data.item_map.ids[i] for i in ids]
    assert set(items) == {"3", "4"}  # 1 and 2 are seen
    by_item = dict(zip(items, scores.tolist(), strict=True))
    assert by_item["3"] == pytest.approx(got[("u2", "u1")] + got[("u2", "u3")] + got[("u2", "u4")], rel=1e-6)
    assert by_item["4"] == pytest.approx(got[("u2", "u3")], rel=1e-6)
    (cold_ids, _), = ch.recommend(data, np.array([data.user_map.get("u5")]), k=10)
    assert len(cold_ids) == 0  # no neighbours


def test_unknown_param_is_rejected():
    with pytest.raises(ValidationError, match="normalization"):
        UserCF(ChannelSpec(name="usercf", kind="u2u", model="usercf", params={"normalization": "jaccard"}))


def test_small_chunks_give_identical_results(monkeypatch):
    import trainer.channels.usercf as mod

    rng = np.random.default_rng(5)
    hist = {f"u{u}": (rng.choice(30, size=rng.integers(1, 12), replace=False) + 1).tolist() for u in range(40)}
    want, data = fit(frame(hist), top_k=7)
    monkeypatch.setattr(mod, "CHUNK_BUDGET", 20)  # a few users per chunk
    got, _ = fit(frame(hist), top_k=7)
    a, b = want.artifacts(data)["u2u"], got.artifacts(data)["u2u"]
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_item_user_cap_keeps_each_items_most_recent_users():
    # item a: u1 at t=100, u2 and u4 at t=200 (tie: smaller user index first), u3 at t=300; cap 2 keeps u3, u2
    df = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4"], "item_id": ["a"] * 4,
                       "timestamp": [100, 200, 300, 200]})
    got = sims(*fit(df, max_item_users=2))
    p = 1 / log(5)  # the item penalty counts all 4 users of a, not the 2 kept
    want = {("u1", "u3"): p, ("u1", "u2"): p, ("u2", "u3"): p, ("u3", "u2"): p, ("u4", "u3"): p, ("u4", "u2"): p}
    assert got.keys() == want.keys()
    for key, val in want.items():
        assert got[key] == pytest.approx(val, rel=1e-6)
    # without the cap, every pair
    assert len(sims(*fit(df, max_item_users=None))) == 12


def test_item_user_cap_bounds_the_work_per_user():
    from trainer.channels.usercf import UserCFParams, prepare

    rng = np.random.default_rng(3)
    hist = {f"u{u}": (rng.choice(8, size=rng.integers(1, 6), replace=False) + 1).tolist() for u in range(300)}
    data = TrainData.from_frame(frame(hist))
    prep = prepare(data, UserCFParams(**{**PLAIN, "max_item_users": 10}))
    assert np.diff(prep.xt_w.indptr).max() == 10
    lengths = np.diff(prep.x.indptr)
    assert (np.diff(np.r_[0, prep.work]) <= 10 * lengths).all()


@pytest.mark.parametrize("params", [dict(max_item_users=None), dict(max_item_users=3),
                                    dict(normalization="cosine", max_item_users=5, region_weight=2.0)])
def test_compiled_rows_equal_the_sparse_product(params):
    from trainer.channels.usercf import (
        UserCFParams,
        chunk_bounds,
        prepare,
        similarity_rows,
        similarity_rows_scipy,
    )

    rng = np.random.default_rng(11)
    hist = {f"u{u}": (rng.choice(30, size=rng.integers(1, 12), replace=False) + 1).tolist() for u in range(80)}
    regions = {u: [str(rng.integers(3))] * len(h) for u, h in hist.items()}
    data = TrainData.from_frame(frame(hist, regions))
    prep = prepare(data, UserCFParams(**{**PLAIN, "top_k": 6, **params}))
    for a, b in chunk_bounds(prep):
        got, want = similarity_rows(prep, a, b), similarity_rows_scipy(prep, a, b)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2] == want[2]
