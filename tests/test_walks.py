"""The numpy graph samplers (trainer/graph/walks.py) on small hand-made graphs."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.graph import (
    bipartite,
    csr_from_edges,
    drop_items,
    importance_neighbors,
    ppr_power,
    ppr_rank_window,
    random_walks,
    step,
    top_visited,
    uniform_neighbors,
    visit_counts,
    walks_with_restart,
)

# node 0 → 1 (w 1), 2 (w 3: two parallel edges 1 + 2 merged), 3 (w 6); 1 → 0; 2 → 0 (w 1), 3 (w 1); 3: no out-edge
SRC = [0, 0, 0, 0, 1, 2, 2]
DST = [1, 2, 2, 3, 0, 0, 3]
W = [1.0, 1.0, 2.0, 6.0, 1.0, 1.0, 1.0]

# users × items: u0 {0, 1}, u1 {0, 1, 2}, u2 {0, 3}, u3 {3, 4}
USERS = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3])
ITEMS = np.array([0, 1, 0, 1, 2, 0, 3, 3, 4])


def test_csr_merges_duplicates_and_sums_weights():
    g = csr_from_edges(SRC, DST, W, n_src=4, n_dst=4)
    assert g.indptr.tolist() == [0, 3, 4, 6, 6]
    assert g.indices.tolist() == [1, 2, 3, 0, 0, 3]
    assert g.weights.tolist() == [1.0, 3.0, 6.0, 1.0, 1.0, 1.0]
    assert g.degree.tolist() == [3, 1, 2, 0]


def test_step_follows_edge_weights():
    g = csr_from_edges(SRC, DST, W, n_src=4, n_dst=4)
    rng = np.random.default_rng(0)
    nxt = step(g, np.zeros(200_000, np.int64), rng)
    freq = np.bincount(nxt, minlength=4) / len(nxt)
    np.testing.assert_allclose(freq, [0.0, 0.1, 0.3, 0.6], atol=0.005)
    uni = step(g, np.zeros(200_000, np.int64), rng, weighted=False)
    np.testing.assert_allclose(np.bincount(uni, minlength=4) / len(uni), [0, 1 / 3, 1 / 3, 1 / 3], atol=0.005)
    assert step(g, np.array([3, -1]), rng).tolist() == [-1, -1]  # dead end, no node


def test_random_walks_transition_frequencies():
    g = csr_from_edges(SRC, DST, W, n_src=4, n_dst=4)
    walks = random_walks(g, np.zeros(50_000, np.int64), 6, np.random.default_rng(1))
    a, b = walks[:, :-1].ravel(), walks[:, 1:].ravel()
    ok = (a >= 0) & (b >= 0)
    trans = np.zeros((4, 4))
    np.add.at(trans, (a[ok], b[ok]), 1)
    emp = trans / trans.sum(1, keepdims=True).clip(min=1)
    np.testing.assert_allclose(emp[0], [0, 0.1, 0.3, 0.6], atol=0.01)
    np.testing.assert_allclose(emp[2], [0.5, 0, 0, 0.5], atol=0.02)
    np.testing.assert_allclose(emp[1], [1, 0, 0, 0])
    # node 3 has no out-edge: every walk that reaches it is -1 afterwards
    hit = walks[:, :-1] == 3
    assert (walks[:, 1:][hit] == -1).all()


def test_walks_are_deterministic_with_seed():
    g = csr_from_edges(SRC, DST, W, n_src=4, n_dst=4)
    w1 = random_walks(g, np.arange(4), 5, np.random.default_rng(7))
    w2 = random_walks(g, np.arange(4), 5, np.random.default_rng(7))
    np.testing.assert_array_equal(w1, w2)
    iu, ui = bipartite(USERS, ITEMS, 4, 5)
    a = importance_neighbors(iu, ui, np.arange(5), 3, np.random.default_rng(3), num_walks=20)
    b = importance_neighbors(iu, ui, np.arange(5), 3, np.random.default_rng(3), num_walks=20)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_visit_count_neighbourhood_on_hand_made_graph():
    # one hop from item 0: user u0/u1/u2 (1/3 each), then an item of that user uniformly:
    # P(1) = (1/2 + 1/3)/3 = 5/18, P(3) = (1/2)/3 = 3/18, P(2) = (1/3)/3 = 2/18; item 4 is two hops away
    iu, ui = bipartite(USERS, ITEMS, 4, 5)
    nbr, w = importance_neighbors(iu, ui, np.array([0]), 4, np.random.default_rng(0), num_walks=60_000,
                                  walk_length=1, restart_prob=0.5)
    assert nbr[0].tolist() == [1, 3, 2, -1]
    np.testing.assert_allclose(w[0], [0.5, 0.3, 0.2, 0.0], atol=0.01)
    assert w[0].sum() == pytest.approx(1.0)
    # top-2: weights L1-normalised over the kept two
    nbr2, w2 = importance_neighbors(iu, ui, np.array([0]), 2, np.random.default_rng(0), num_walks=60_000,
                                    walk_length=1)
    assert nbr2[0].tolist() == [1, 3]
    np.testing.assert_allclose(w2[0], [5 / 8, 3 / 8], atol=0.01)
    # longer walks without restart reach item 4 (through u2 → item 3 → u3)
    nbr3, _ = importance_neighbors(iu, ui, np.array([0]), 4, np.random.default_rng(0), num_walks=2000,
                                   walk_length=4, restart_prob=0.0)
    assert 4 in nbr3[0]


def test_top_visited_exact_counts_ties_self_and_exclusions():
    rows = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    items = np.array([2, 2, 1, 3, 0, 0, 2, 4])  # row 0: item 0 ×2 (itself), 1 ×1, 2 ×2, 3 ×1
    counts = visit_counts(rows, items, 2, 5)
    nbr, w = top_visited(counts, 3, self_items=np.array([0, 1]))
    assert nbr.tolist() == [[2, 1, 3], [2, 4, -1]]  # count desc, ties ascending item; self left out
    np.testing.assert_allclose(w, [[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]])
    nbr, w = top_visited(counts, 3, self_items=np.array([0, 1]), exclude=(np.array([0]), np.array([2])))
    assert nbr[0].tolist() == [1, 3, -1] and 2 not in nbr[0]
    np.testing.assert_allclose(w[0], [0.5, 0.5, 0.0])


def test_removed_training_edges_are_absent():
    iu, ui = bipartite(USERS, ITEMS, 4, 5)
    q = np.arange(5)
    full, _ = importance_neighbors(iu, ui, q, 4, np.random.default_rng(0), num_walks=500)
    ex = (np.array([0, 0, 1]), np.array([1, 3, 0]))  # (query row, item) pairs, e.g. training edges
    nbr, w = importance_neighbors(iu, ui, q, 4, np.random.default_rng(0), num_walks=500, exclude=ex)
    assert 1 in full[0] and 3 in full[0] and 0 in full[1]
    assert 1 not in nbr[0] and 3 not in nbr[0] and 0 not in nbr[1]
    np.testing.assert_allclose(w[[0, 1]].sum(1), 1.0, rtol=1e-6)
    # drop_items: per-row removal at training time, weights renormalised
    nb, ww = drop_items(np.array([[1, 3, 2], [5, 6, -1]]), np.array([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]),
                        np.array([3, 9]))
    assert nb.tolist() == [[1, -1, 2], [5, 6, -1]]
    np.testing.assert_allclose(ww, [[0.5 / 0.7, 0, 0.2 / 0.7], [0.6, 0.4, 0]], rtol=1e-6)


def test_restart_keeps_walks_local():
    iu, ui = bipartite(USERS, ITEMS, 4, 5)
    rows, items = walks_with_restart(iu, ui, np.array([0]), 2000, 3, 1.0, np.random.default_rng(0))
    assert len(rows) == 6000 and 4 not in items  # always restarting: one hop from item 0 only
    rows, items = walks_with_restart(iu, ui, np.array([0]), 2000, 3, 0.0, np.random.default_rng(0))
    assert 4 in items


def test_uniform_neighbors_shape_and_support():
    iu, ui = bipartite(USERS, ITEMS, 4, 5)
    s = uniform_neighbors(iu, ui, np.array([4, 2]), 1000, np.random.default_rng(0))
    assert s.shape == (2, 1000)
    assert set(np.unique(s[0])) == {3, 4}  # item 4 → u3 → {3, 4}
    assert set(np.unique(s[1])) == {0, 1, 2}
    iu6, ui6 = bipartite(USERS, ITEMS, 4, 6)  # item 5 has no interaction
    assert (uniform_neighbors(iu6, ui6, np.array([5]), 3, np.random.default_rng(0)) == -1).all()


def _ring_log(n_items: int = 60, users_per: int = 3):
    """Users who each click 3 consecutive items of a ring: PPR from item q decays with ring distance."""
    u, i = [], []
    uid = 0
    for s in range(n_items):
        for _ in range(users_per):
            for d in range(3):
                u.append(uid)
                i.append((s + d) % n_items)
            uid += 1
    return np.array(u), np.array(i), uid


def test_ppr_power_and_walk_ranks_agree():
    u, i, n_users = _ring_log()
    iu, ui = bipartite(u, i, n_users, 60)
    x = ppr_power(iu, ui, np.array([0, 30]), restart_prob=0.3, iters=50)
    np.testing.assert_allclose(x.sum(1), 1.0, atol=1e-6)
    ring = np.minimum(np.arange(60), 60 - np.arange(60))
    assert np.all(np.diff(x[0][np.argsort(ring, kind="stable")][::2]) <= 1e-12)  # decays with distance
    rows, items = walks_with_restart(iu, ui, np.array([0]), 4000, 60, 0.3, np.random.default_rng(0))
    emp = np.bincount(items, minlength=60) / len(items)
    # long walks: landing frequencies → π·P = (π − α·e_q)/(1 − α), π the PPR vector
    ppr = x[0].copy()
    ppr[0] -= 0.3
    ppr /= ppr.sum()
    np.testing.assert_allclose(emp, ppr, atol=0.01)


@pytest.mark.parametrize("method", ["power", "walks"])
def test_ppr_rank_window_draws_from_the_window(method):
    u, i, n_users = _ring_log()
    iu, ui = bipartite(u, i, n_users, 60)
    q = np.array([0, 17])
    pools = ppr_rank_window(iu, ui, q, lo=6, hi=14, pool=5, rng=np.random.default_rng(0), method=method,
                            num_walks=3000, walk_length=10, restart_prob=0.3, iters=50)
    assert pools.shape == (2, 5) and (pools >= 0).all()
    for r, qq in enumerate(q):
        assert len(set(pools[r])) == 5 and qq not in pools[r]
        dist = np.minimum((pools[r] - qq) % 60, (qq - pools[r]) % 60)
        # ranks 6..13 on the ring = ring distance 4..7 (two items per distance; rank 0-1 = distance 1)
        assert dist.min() >= 3 and dist.max() <= 8
    if method == "power":
        x = ppr_power(iu, ui, q, 0.3, 50)
        x[np.arange(2), q] = -np.inf
        order = np.argsort(-x, axis=1, kind="stable")
        for r in range(2):
            assert set(pools[r]) <= set(order[r, 6:14])
    # a window beyond the reachable items pads with -1
    far = ppr_rank_window(iu, ui, q, lo=58, hi=70, pool=5, rng=np.random.default_rng(0), method=method,
                          num_walks=3000)
    assert (far[:, 1:] == -1).all()


def test_sparse_ranking_path_matches_dense(monkeypatch):
    import trainer.graph.walks as walks

    u, i, n_users = _ring_log()
    iu, ui = bipartite(u, i, n_users, 60)
    q = np.arange(60)
    ex = (np.array([0, 5]), np.array([1, 6]))
    dense = importance_neighbors(iu, ui, q, 8, np.random.default_rng(4), num_walks=40, exclude=ex)
    dense_ppr = ppr_rank_window(iu, ui, q, 5, 20, 6, np.random.default_rng(4), num_walks=100)
    monkeypatch.setattr(walks, "DENSE_CELLS", 0)
    sparse = importance_neighbors(iu, ui, q, 8, np.random.default_rng(4), num_walks=40, exclude=ex)
    sparse_ppr = ppr_rank_window(iu, ui, q, 5, 20, 6, np.random.default_rng(4), num_walks=100)
    np.testing.assert_array_equal(dense[0], sparse[0])
    np.testing.assert_allclose(dense[1], sparse[1])
    np.testing.assert_array_equal(dense_ppr, sparse_ppr)
    assert 1 not in dense[0][0] and 6 not in dense[0][5]
