"""The compiled aggregation and merge kernels give exactly what the plain numpy formulation gives.

The reference functions below are the numpy implementation the kernels replaced (kept here, not in the
product, as the specification): float64 sums in input order, float32 results, ties by ascending id.
"""

from __future__ import annotations

import numpy as np
import pytest

from common import retrieval
from common.merge import QUOTA_BONUS, ChannelOutput, merge, normalise


def ref_top_k(ids, scores, k, exclude=None):
    ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
    if exclude is not None and len(exclude) and len(ids):
        keep = ~np.isin(ids, exclude)
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def ref_group_sum(ids, values):
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    first = np.ones(len(s), bool)
    first[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(first)
    return s[starts], np.add.reduceat(values[order].astype(np.float64), starts), order, starts


def ref_aggregate(lists, weights, k, exclude=None):
    ids = np.concatenate([x[0] for x in lists]).astype(np.int64)
    sc = np.concatenate([x[1] for x in lists]).astype(np.float32) * np.repeat(
        np.asarray(weights, np.float32), [len(x[0]) for x in lists])
    valid = ids >= 0
    ids, sc = ids[valid], sc[valid]
    if not len(ids):
        return ids, sc
    uniq, total, _, _ = ref_group_sum(ids, sc)
    return ref_top_k(uniq, total.astype(np.float32), k, exclude)


def ref_merge(outputs, k, exclude, normalize, rank_offset):
    live = [(c, o) for c, o in enumerate(outputs) if len(o.ids) and o.weight > 0]
    lens = [len(o.ids) for _, o in live]
    ids = np.concatenate([np.asarray(o.ids, np.int64) for _, o in live])
    contrib = np.concatenate([normalise(np.asarray(o.scores, np.float32), normalize, rank_offset) * np.float32(o.weight)
                              for _, o in live])
    chan = np.repeat(np.array([c for c, _ in live], np.int32), lens)
    rank = np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in lens])
    in_quota_each = rank <= np.repeat(np.array([o.quota for _, o in live], np.int32), lens)
    uniq, total, order, starts = ref_group_sum(ids, contrib)
    in_quota = np.logical_or.reduceat(in_quota_each[order], starts)
    group = np.empty(len(ids), np.int64)
    group[order] = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(ids))))
    key = total + in_quota * QUOTA_BONUS
    if exclude is not None and len(exclude):
        key[np.isin(uniq, exclude)] = -np.inf
    top = np.argsort(-key, kind="stable")[:k]
    top = top[np.isfinite(key[top])]
    ranks = np.zeros((len(uniq), len(outputs)), np.int32)
    ranks[group, chan] = rank
    return uniq[top], total[top].astype(np.float32), ranks[top]


def random_lists(rng, n_lists, n_items, per_list, quantised):
    out = []
    for _ in range(n_lists):
        n = int(rng.integers(0, per_list + 1))
        ids = rng.choice(n_items, size=min(n, n_items), replace=False).astype(np.int32)
        sc = rng.integers(1, 5, len(ids)).astype(np.float32) if quantised else rng.random(len(ids), np.float32)
        out.append((ids, np.sort(sc)[::-1].copy()))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_aggregate_matches_the_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    n_items = int(rng.choice([5, 50, 5000]))
    lists = random_lists(rng, int(rng.integers(1, 12)), n_items, 200, quantised=seed % 2 == 0)  # ties on even seeds
    if seed % 5 == 0:
        lists.append((np.array([-1, -1, 3], np.int32), np.array([1, 1, 1], np.float32)))  # padding ids
    weights = rng.random(len(lists)).astype(np.float32)
    exclude = rng.integers(0, n_items, int(rng.integers(0, 30)))
    k = int(rng.integers(1, 400))
    got = retrieval.aggregate(lists, weights, k, exclude)
    want = ref_aggregate(lists, weights, k, exclude)
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(20))
def test_top_k_matches_the_numpy_reference_small_and_whole_catalogue(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.choice([0, 3, 300, 20_000]))
    ids = rng.permutation(n).astype(np.int64)
    scores = (rng.integers(0, 50, n) if seed % 2 else rng.random(n)).astype(np.float32)
    exclude = rng.integers(0, max(n, 1), int(rng.integers(0, 40)))
    k = int(rng.integers(1, 500))
    got, want = retrieval.top_k(ids, scores, k, exclude), ref_top_k(ids, scores, k, exclude)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("normalize", ["rank", "minmax"])
def test_merge_matches_the_numpy_reference(seed, normalize):
    rng = np.random.default_rng(1000 + seed)
    n_items = int(rng.choice([10, 400, 100_000]))
    outputs = []
    for c in range(int(rng.integers(1, 8))):
        (ids, sc), = random_lists(rng, 1, n_items, 300, quantised=seed % 3 == 0)
        weight = float(rng.choice([0.0, 0.01, 0.5, 1.0, 3.0])) if c else 1.0
        outputs.append(ChannelOutput(f"c{c}", ids.astype(np.int64), sc, weight, int(rng.integers(1, 300))))
    outputs[0] = ChannelOutput("c0", outputs[0].ids[:1], outputs[0].scores[:1], 1.0, 5) if seed == 7 else outputs[0]
    exclude = rng.integers(0, n_items, int(rng.integers(0, 50)))
    k = int(rng.integers(1, 400))
    offset = float(rng.choice([1.0, 20.0, 200.0]))
    got = merge(outputs, k, exclude, normalize=normalize, rank_offset=offset)
    if not any(len(o.ids) and o.weight > 0 for o in outputs):
        assert len(got.ids) == 0 and got.ranks.shape == (0, len(outputs))
        return
    want = ref_merge(outputs, k, exclude, normalize, offset)
    np.testing.assert_array_equal(got.ids, want[0])
    np.testing.assert_array_equal(got.scores, want[1])
    np.testing.assert_array_equal(got.ranks, want[2])


@pytest.mark.parametrize("seed", range(10))
def test_ranked_list_prefix_equals_top_k(seed):
    rng = np.random.default_rng(500 + seed)
    n = int(rng.choice([0, 5, 2000]))
    ids, scores = rng.permutation(n), rng.integers(0, 20, n).astype(np.float32)  # many ties
    exclude = rng.integers(0, max(n, 1), int(rng.integers(0, 60)))
    k = int(rng.integers(1, 300))
    got = retrieval.retrieve_list(*retrieval.rank_list(ids, scores), k, exclude, ranked=True)
    want = ref_top_k(ids, scores, k, exclude)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
