"""item2vec channel: session splitting and skip-gram neighbours on planted sessions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.channel_config import ChannelSpec
from trainer.channels import registry
from trainer.channels.item2vec import Item2VecChannel, session_sentences
from trainer.data.sessions import split_sessions
from trainer.data.train_data import TrainData

N_CLUSTERS, PER_CLUSTER = 4, 15
FAST = {"dim": 16, "window": 3, "num_negatives": 5, "epochs": 20, "top_k": 10, "sample": 0.0}


def test_split_sessions_at_gaps_over_30_minutes():
    users = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    ts = np.array([0, 100, 1900, 3701, 3750, 3750, 5650, 10])
    # gaps: 100 | 1800 (not > 30 min: same session) | 1801 (new) | 49 ; user 1: 1900 (new) ; user 2
    np.testing.assert_array_equal(split_sessions(users, ts, 1800), [0, 0, 0, 1, 1, 2, 3, 4])
    np.testing.assert_array_equal(split_sessions(users, ts, None), [0, 0, 0, 0, 0, 1, 1, 2])
    items = np.array([5, 6, 7, 8, 9, 1, 2, 3])
    assert session_sentences(items, split_sessions(users, ts, 1800)) == [["5", "6", "7"], ["8", "9"]]
    assert session_sentences(items, split_sessions(users, ts, 1800), min_len=1)[-1] == ["3"]
    assert len(split_sessions(np.array([], np.int32), np.array([], np.int64), 1800)) == 0


def planted() -> pd.DataFrame:
    """Each user has 4 sessions 2 h apart, each of 6 items from one cluster, clusters alternating, so a
    user's whole history mixes clusters but every session is pure. Item 'lonely' only occurs alone."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        t = 1_000_000
        for s in range(4):
            c = (u + s) % N_CLUSTERS
            for i in rng.choice(PER_CLUSTER, size=6, replace=False) + c * PER_CLUSTER:
                rows.append((f"u{u}", f"i{i}", t))
                t += 60
            t += 7200
    rows.append(("u0", "lonely", 10_000_000))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def cluster(data: TrainData, idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx)
    ext = np.asarray(data.item_map.ids, dtype=object)[idx.ravel()]
    return np.array([int(s[1:]) // PER_CLUSTER if s != "lonely" else -1 for s in ext]).reshape(idx.shape)


@pytest.fixture(scope="module")
def data() -> TrainData:
    return TrainData.from_frame(planted())


def fit(data: TrainData, **params) -> Item2VecChannel:
    ch = Item2VecChannel(ChannelSpec(name="i2v", kind="i2i", model="item2vec", params={**FAST, **params}))
    ch.fit(data)
    return ch


def test_neighbours_come_from_the_item_cluster(data):
    ch = fit(data)
    art = ch.artifacts(data)["i2i"]
    assert ch.n_sessions == 60 * 4
    assert art.neighbors.shape == (data.n_items, 10) and art.scores.dtype == np.float32
    lonely = data.item_map.lookup(["lonely"])[0]
    assert (art.neighbors[lonely] == -1).all()  # never in a session of ≥ 2 items → no vector, no list
    rows = np.flatnonzero(cluster(data, np.arange(data.n_items)) >= 0)
    nb = art.neighbors[rows]
    assert (nb >= 0).all() and not (nb == rows[:, None]).any()  # full lists, never the item itself
    assert (np.diff(art.scores[rows], axis=1) <= 1e-6).all()  # cosine, descending
    same = cluster(data, nb[:, :5]) == cluster(data, rows)[:, None]
    assert same.mean() > 0.9  # chance: 14/59 ≈ 0.24


def test_serving_path_recommends_the_recent_cluster(data):
    ch = fit(data)
    users = np.arange(data.n_users)
    recs = ch.recommend(data, users, 10)
    hits = []
    for u, (ids, _) in zip(users, recs, strict=True):
        assert not np.isin(ids, data.history(int(u))[0]).any()  # seen items filtered
        last = cluster(data, data.recent(int(u), 1)[0])[0]
        if last >= 0:  # (u0's newest item is the lonely one: its other anchors still answer)
            hits.append(np.mean(cluster(data, ids[:5]) == last))
    assert np.mean(hits) > 0.5


def test_deterministic_with_seed_and_registered(data):
    a, b = fit(data), fit(data)
    np.testing.assert_array_equal(a.artifacts(data)["i2i"].neighbors, b.artifacts(data)["i2i"].neighbors)
    assert registry.models()["item2vec"] is Item2VecChannel
    with pytest.raises(ValueError):
        Item2VecChannel(ChannelSpec(name="x", kind="i2i", model="item2vec", params={"window": 0}))


def test_scale_rule_bounds_the_tokens_trained():
    from trainer.channels.item2vec import scaled_epochs

    assert scaled_epochs(10, 99_000, 3_000_000) == 10  # ml-100k: unchanged
    assert scaled_epochs(10, 800_000, 3_000_000) == 3  # ~1M clicks
    assert scaled_epochs(10, 9_000_000, 3_000_000) == 1  # never less than one epoch
    assert scaled_epochs(10, 9_000_000, None) == 10
