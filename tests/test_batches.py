"""The N-way K-shot session batcher (trainer/data/batches.py): its invariants on a toy session set."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.batches import SessionBatcher
from trainer.data.events import CLICK, LIKE
from trainer.data.sessions import Sessions


def toy(n_sessions: int = 40, seed: int = 0) -> tuple[Sessions, np.ndarray, np.ndarray]:
    """Sessions of 1…20 items (one user each, items 100·s + j so every item names its session), ~half positive;
    sessions 0 and 1 have fewer than 2 positives and must never be drawn."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 21, n_sessions)
    lengths[:2] = [5, 6]
    user = np.repeat(np.arange(n_sessions), lengths)
    offset = np.arange(len(user)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    item = 100 * user + offset
    ts = 1_000_000 + 60 * offset
    positive = rng.random(len(user)) < 0.5
    positive[user == 0] = False
    positive[np.flatnonzero(user == 1)] = [True, False, False, False, False, False]
    event = np.where(positive, LIKE, CLICK).astype(np.int8)
    return Sessions.build(user, item, ts, event), item, positive


def test_batches_are_n_way_k_shot_with_two_positives_per_session():
    sessions, item, positive = toy()
    b = SessionBatcher(sessions, item, positive, n_way=6, k_shot=4)
    n_pos = np.bincount(sessions.ids, weights=positive, minlength=len(sessions))
    np.testing.assert_array_equal(b.eligible, np.flatnonzero(n_pos >= 2))
    assert 0 not in b.eligible and 1 not in b.eligible
    batches = b.epoch(np.random.default_rng(1))
    drawn = np.concatenate([kb.session for kb in batches])
    np.testing.assert_array_equal(np.sort(drawn), b.eligible)  # every eligible session exactly once
    for kb in batches:
        assert kb.items.shape == (len(kb.session), 4) and len(kb.session) <= 6
        assert len(np.unique(kb.session)) == len(kb.session)  # N distinct sessions
        for row, s in zip(range(len(kb.session)), kb.session, strict=True):
            its, lab = kb.items[row], kb.positive[row]
            real = its >= 0
            own = item[sessions.ids == s]
            assert set(its[real]) <= set(own)  # items of its own session
            assert len(np.unique(its[real])) == real.sum()  # without replacement
            assert real.sum() == min(4, len(own))  # K items, or the whole short session
            assert not lab[~real].any()
            np.testing.assert_array_equal(lab[real], positive[np.searchsorted(item, its[real])])
            assert lab.sum() >= 2  # ≥ 2 positives per session
    assert sum(len(kb.session) == 6 for kb in batches) == len(batches) - 1  # only the last one is short


def test_forced_positives_and_uniform_rest():
    """A 50-item session with exactly 2 positives: every K=4 draw holds both, the other slots cover the rest."""
    n = 50
    user = np.zeros(n, np.int64)
    item = np.arange(n)
    positive = np.zeros(n, bool)
    positive[[7, 41]] = True
    sessions = Sessions.build(user, item, np.arange(n) * 10, np.where(positive, LIKE, CLICK).astype(np.int8))
    b = SessionBatcher(sessions, item, positive, n_way=1, k_shot=4)
    rng = np.random.default_rng(3)
    seen = np.zeros(n, int)
    for _ in range(600):
        (kb,) = b.epoch(rng)
        assert {7, 41} <= set(kb.items[0]) and kb.positive[0].sum() == 2
        seen[kb.items[0]] += 1
    rest = np.delete(seen, [7, 41])
    assert seen[7] == seen[41] == 600
    assert rest.min() > 0 and abs(rest.mean() - 600 * 2 / 48) < 1 and rest.std() < 0.35 * rest.mean()


def test_draws_rounds_never_put_a_session_twice_in_a_batch():
    sessions, item, positive = toy(60, seed=5)
    b = SessionBatcher(sessions, item, positive, n_way=5, k_shot=3)
    draws = b.default_draws(max_draws=3)
    np.testing.assert_array_equal(draws, np.minimum(-(-sessions.lengths[b.eligible] // 3), 3))
    batches = b.epoch(np.random.default_rng(0), draws)
    drawn = np.concatenate([kb.session for kb in batches])
    np.testing.assert_array_equal(np.bincount(drawn, minlength=len(sessions))[b.eligible], draws)
    for kb in batches:
        assert len(np.unique(kb.session)) == len(kb.session)


def test_seeded_and_flat():
    sessions, item, positive = toy()
    b = SessionBatcher(sessions, item, positive, n_way=4, k_shot=5)
    e1, e2 = b.epoch(np.random.default_rng(7)), b.epoch(np.random.default_rng(7))
    assert len(e1) == len(e2)
    for x, y in zip(e1, e2, strict=True):
        np.testing.assert_array_equal(x.items, y.items)
        np.testing.assert_array_equal(x.session, y.session)
    e3 = b.epoch(np.random.default_rng(8))
    assert any(not np.array_equal(x.items, y.items) for x, y in zip(e1, e3, strict=False))
    items, pos, sess = e1[0].flat()
    assert len(items) == len(pos) == len(sess) == int(e1[0].valid.sum()) and (items >= 0).all()
    np.testing.assert_array_equal(sess, np.repeat(e1[0].session, e1[0].valid.sum(1)))


def test_bad_arguments():
    sessions, item, positive = toy()
    with pytest.raises(ValueError):
        SessionBatcher(sessions, item, positive, n_way=4, k_shot=1)
    with pytest.raises(ValueError):
        SessionBatcher(sessions, item[:-1], positive[:-1], n_way=4, k_shot=4)
    b = SessionBatcher(sessions, item, positive, n_way=4, k_shot=4)
    with pytest.raises(ValueError):
        b.epoch(np.random.default_rng(0), np.ones(3, np.int64))
    empty = SessionBatcher(sessions, item, np.zeros(len(item), bool), n_way=4, k_shot=4)
    assert len(empty.eligible) == 0 and empty.epoch(np.random.default_rng(0)) == []
