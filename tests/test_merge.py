"""common/merge.merge on hand-made channel outputs: order, weights, quotas, dedup, exclusion, fill to k;
request sizes per artifact kind."""

from __future__ import annotations

from typing import get_args

import numpy as np

from common.channel_config import ArtifactKind
from common.merge import REQUEST_SIZE, ChannelOutput, merge, request_size


def out(name: str, ids: list[int], weight: float = 1.0, quota: int = 200, scores: list[float] | None = None) -> ChannelOutput:
    sc = scores if scores is not None else [float(len(ids) - i) for i in range(len(ids))]
    return ChannelOutput(name, np.array(ids, np.int64), np.array(sc, np.float32), weight, quota)


def test_rank_fusion_order_and_ranks():
    a = out("a", [1, 2, 3])
    b = out("b", [3, 4])
    m = merge([a, b], k=10, rank_offset=1.0)
    # scores: 1 → 1/2, 2 → 1/3, 3 → 1/4 + 1/2 = 0.75, 4 → 1/3
    assert m.ids.tolist() == [3, 1, 2, 4]  # 2 and 4 tie at 1/3: ascending id
    np.testing.assert_allclose(m.scores, [0.75, 0.5, 1 / 3, 1 / 3], rtol=1e-6)
    assert m.channel_names == ["a", "b"]
    assert m.ranks.tolist() == [[3, 1], [1, 0], [2, 0], [0, 2]]


def test_weights_change_the_winner():
    a, b = out("a", [1], weight=1.0), out("b", [2], weight=3.0)
    assert merge([a, b], k=2).ids.tolist() == [2, 1]
    a.weight, b.weight = 3.0, 1.0
    assert merge([a, b], k=2).ids.tolist() == [1, 2]


def test_zero_weight_channel_contributes_nothing():
    m = merge([out("a", [1, 2]), out("b", [3, 4], weight=0.0)], k=10)
    assert m.ids.tolist() == [1, 2]


def test_dedup_sums_contributions():
    m = merge([out("a", [5, 6]), out("b", [6, 5]), out("c", [6])], k=10, rank_offset=1.0)
    assert m.ids.tolist() == [6, 5]
    assert len(set(m.ids.tolist())) == len(m.ids)
    np.testing.assert_allclose(m.scores, [1 / 3 + 1 / 2 + 1 / 2, 1 / 2 + 1 / 3], rtol=1e-6)


def test_quota_candidates_rank_before_fill():
    # channel a is strong but has quota 1: its 2nd and 3rd items only fill after b's in-quota items
    a = out("a", [1, 2, 3], weight=10.0, quota=1)
    b = out("b", [7, 8], weight=0.1, quota=2)
    m = merge([a, b], k=5)
    assert m.ids.tolist() == [1, 7, 8, 2, 3]


def test_exclusion_removes_items_everywhere():
    m = merge([out("a", [1, 2, 3]), out("b", [3, 4])], k=10, exclude=np.array([3, 1]))
    assert m.ids.tolist() == [2, 4]
    assert 3 not in m.ids and 1 not in m.ids


def test_fill_to_k_and_truncate():
    a = out("a", list(range(10)), quota=3)
    b = out("b", list(range(100, 110)), quota=3)
    m = merge([a, b], k=8)
    assert len(m.ids) == 8
    assert set(m.ids[:6].tolist()) == {0, 1, 2, 100, 101, 102}  # in-quota first
    assert set(m.ids[6:].tolist()) == {3, 103}  # then the best fill
    assert len(merge([a, b], k=50).ids) == 20  # fewer candidates than k: everything, no duplicates


def test_empty_inputs():
    m = merge([out("a", []), out("b", [])], k=5)
    assert len(m.ids) == 0 and m.ranks.shape == (0, 2)
    assert merge([], k=5).ids.tolist() == []


def test_minmax_normalisation_uses_scores():
    a = out("a", [1, 2, 3], scores=[10.0, 9.9, 0.0])
    b = out("b", [4, 5], scores=[1.0, 0.0])
    m = merge([a, b], k=5, normalize="minmax")
    # minmax: a → 1, 0.99, 0; b → 1, 0: item 2 (0.99) beats item 5 (0), ties (1 and 4) by id
    assert m.ids.tolist()[:3] == [1, 4, 2]


def test_request_size_table_covers_every_kind():
    assert set(REQUEST_SIZE) == set(get_args(ArtifactKind))
    assert request_size("i2i", 50, 200, 1000) == 200 and request_size("u2u", 250, 200, 1000) == 250
    assert request_size("list", 30, 50, 60) == 50
    assert request_size("u2i", 25, 200, 1000) == 25  # the quotas fill k: a vector search asks for its quota
    assert request_size("u2i", 25, 200, 125) == 100  # ... plus what they cannot fill
