"""The shared skip-gram trainer (trainer/nn/skipgram.py) on known answers: window pairs, subsampling, negatives
and their masks, negative pools, global-context pairs, and co-occurring items ending up close."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trainer.nn.negatives import PowerSampler
from trainer.nn.skipgram import (
    Corpus,
    ExtraPairs,
    NegativePool,
    SkipGramConfig,
    draw_negatives,
    epoch_pairs,
    keep_probability,
    sequence_membership,
    subsample,
    train_skipgram,
    window_pairs,
)

PAD = -1
SEQS = np.array([[10, 11, 12, 13, 14], [20, 21, 22, PAD, PAD], [30, PAD, PAD, PAD, PAD]])


def brute_pairs(seqs: np.ndarray, window: int) -> set[tuple[int, int, int]]:
    out = set()
    for s, row in enumerate(seqs):
        toks = [t for t in row if t != PAD]
        for p, q in itertools.product(range(len(toks)), repeat=2):
            if p != q and abs(p - q) <= window:
                out.add((toks[p], toks[q], s))
    return out


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_window_pairs_are_exactly_the_expected_set(window):
    c, o, s = window_pairs(Corpus.from_padded(SEQS, PAD), window)
    got = list(zip(c.tolist(), o.tolist(), s.tolist(), strict=True))
    assert len(got) == len(set(got))  # no duplicates
    assert set(got) == brute_pairs(SEQS, window)
    if window == 1:
        assert sorted(got) == [(10, 11, 0), (11, 10, 0), (11, 12, 0), (12, 11, 0), (12, 13, 0), (13, 12, 0),
                               (13, 14, 0), (14, 13, 0), (20, 21, 1), (21, 20, 1), (21, 22, 1), (22, 21, 1)]


def test_shrunk_windows_stay_within_a_per_centre_draw():
    corpus = Corpus.from_padded(np.arange(40).reshape(2, 20), PAD)
    c, o, _ = window_pairs(corpus, 5, np.random.default_rng(0))
    full = brute_pairs(np.arange(40).reshape(2, 20), 5)
    assert {(a, b, a // 20) for a, b in zip(c, o, strict=True)} <= full
    # each centre's contexts form a symmetric range (clipped at the sequence ends) of one radius b ≤ window
    for centre in range(40):
        d = o[c == centre] - centre
        b = np.abs(d).max()
        lo, hi = max(-b, -(centre % 20)), min(b, 19 - centre % 20)
        assert sorted(d.tolist()) == [x for x in range(lo, hi + 1) if x != 0] and 1 <= b <= 5
    radii = [np.abs(o[c == k] - k).max() for k in range(5, 15)]
    assert len(set(radii)) > 1  # the radius is drawn, not fixed


def test_corpus_from_flat_and_padding():
    corpus = Corpus.from_padded(SEQS, PAD)
    np.testing.assert_array_equal(corpus.tokens, [10, 11, 12, 13, 14, 20, 21, 22, 30])
    np.testing.assert_array_equal(corpus.seq, [0, 0, 0, 0, 0, 1, 1, 1, 2])
    with pytest.raises(ValueError):
        Corpus.from_flat([1, 2], [1, 0])


def test_keep_probability_is_the_word2vec_rule_and_subsampling_follows_it():
    counts = np.array([1000, 100, 10, 1, 0])
    t = 1e-2
    f = counts / counts.sum()
    with np.errstate(divide="ignore"):
        expect = np.minimum(1.0, np.sqrt(t / f) + t / f)
    np.testing.assert_allclose(keep_probability(counts, t), expect)
    assert keep_probability(counts, t)[0] == pytest.approx(np.sqrt(t / f[0]) + t / f[0])
    assert keep_probability(counts, t)[0] < 0.2 and keep_probability(counts, t)[3] == 1.0
    # empirical keep rate of the frequent item on a big corpus
    tokens = np.repeat(np.arange(4), counts[:4] * 100)
    corpus = Corpus.from_flat(tokens, np.arange(len(tokens)) // 50)
    kept = subsample(corpus, keep_probability(counts, t), np.random.default_rng(0))
    rate = np.bincount(kept.tokens, minlength=4) / np.bincount(tokens, minlength=4)
    np.testing.assert_allclose(rate, expect[:4], atol=0.01)
    assert np.all(np.diff(kept.seq) >= 0)


def test_negatives_follow_count_power_and_are_masked_when_equal_to_the_positive():
    counts = np.array([1, 16, 81, 256])
    sampler = PowerSampler(counts, 0.75)
    np.testing.assert_allclose(sampler.q, counts ** 0.75 / (counts ** 0.75).sum())
    cfg = SkipGramConfig(num_negatives=50)
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 4, size=2000)
    got = draw_negatives(sampler, np.zeros(2000, np.int64), ctx, np.zeros(2000, np.int64), cfg, rng)
    neg, valid = got.columns(), got.valid
    assert neg.shape == (2000, 50) and got.shared.shape == (0,)
    assert not (neg[valid] == np.broadcast_to(ctx[:, None], neg.shape)[valid]).any()
    assert (neg[~valid] == np.broadcast_to(ctx[:, None], neg.shape)[~valid]).all()
    emp = np.bincount(neg.ravel(), minlength=4) / neg.size
    np.testing.assert_allclose(emp, sampler.q, atol=0.01)
    # shared by the batch: one set of K, masked per row where it equals the row's positive
    shared = draw_negatives(sampler, np.zeros(2000, np.int64), ctx, np.zeros(2000, np.int64),
                            SkipGramConfig(num_negatives=50, shared_negatives=True), rng)
    assert shared.shared.shape == (50,) and shared.per_row.shape == (2000, 0)
    np.testing.assert_array_equal(shared.valid, shared.shared[None, :] != ctx[:, None])


def test_pool_negatives_come_from_the_centre_pool_and_exclude_the_sequence_items():
    # items 0-5 in market 0, 6-9 in market 1; sequence 0 = [0, 1, 2], sequence 1 = [6, 7]
    corpus = Corpus.from_padded(np.array([[0, 1, 2], [6, 7, PAD]]), PAD)
    market = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    pool = NegativePool(centre_group=market, item_group=market)
    cfg = SkipGramConfig(num_negatives=2, pool_negatives=20)
    sampler = PowerSampler(np.ones(10), 0.75)
    members = sequence_membership(corpus, 10)
    rng = np.random.default_rng(0)
    c, o, s = window_pairs(corpus, 2)
    got = draw_negatives(sampler, c, o, s, cfg, rng, pool, members)
    pneg, pvalid = got.per_row[:, 2:], got.valid[:, 2:]
    assert (market[pneg] == market[c][:, None]).all()  # every pool draw is from the centre's market
    seq_items = {0: {0, 1, 2}, 1: {6, 7}}
    for row in range(len(c)):
        for item, ok in zip(pneg[row], pvalid[row], strict=True):
            assert ok == (item not in seq_items[int(s[row])])  # masked exactly when in the pair's own session
    assert set(pneg[c < 6][pvalid[c < 6]].tolist()) == {3, 4, 5}
    assert set(pneg[c >= 6][pvalid[c >= 6]].tolist()) == {8, 9}
    # a centre without a pool gets only invalid pool slots
    pool2 = NegativePool(centre_group=np.where(market == 1, -1, 0), item_group=market)
    _, v2 = pool2.sample(np.array([0, 7]), 5, rng)
    assert v2[0].all() and not v2[1].any()


def test_pool_draws_follow_counts_within_the_pool():
    g = np.zeros(3, np.int64)
    pool = NegativePool(g, g, counts=np.array([1, 16, 0]), power=0.75)
    draws, valid = pool.sample(np.zeros(20000, np.int64), 1, np.random.default_rng(1))
    assert valid.all() and not (draws == 2).any()
    assert (draws == 1).mean() == pytest.approx(8 / 9, abs=0.01)


def test_global_context_pairs_are_added_to_every_epoch_as_specified():
    corpus = Corpus.from_padded(SEQS, PAD)
    extra = ExtraPairs(centre=np.array([10, 11, 12, 13, 14]), context=np.array([99, 99, 99, 99, 99]),
                       seq=np.zeros(5, np.int64))
    cfg = SkipGramConfig(window=1, shrink_window=False, sample=0.0)
    c, o, s = epoch_pairs(corpus, cfg, np.random.default_rng(0), None, extra)
    got = list(zip(c.tolist(), o.tolist(), s.tolist(), strict=True))
    window = brute_pairs(SEQS, 1)
    assert set(got[:len(window)]) == window
    assert got[len(window):] == [(i, 99, 0) for i in (10, 11, 12, 13, 14)]  # beyond the window, once each
    with pytest.raises(ValueError):
        ExtraPairs(np.array([1, 2]), np.array([3]))


def planted_corpus(rng: np.random.Generator) -> tuple[Corpus, int]:
    """Items 0 and 1 always occur together (with 2 of the items 2-6); items 7-29 occur in other sequences."""
    n_items = 30
    rows = []
    for _ in range(400):
        if rng.random() < 0.3:
            rows.append([0, 1, *rng.choice(np.arange(2, 7), 2, replace=False)])
        else:
            rows.append(list(rng.choice(np.arange(7, n_items), 4, replace=False)))
    rows = [list(rng.permutation(r)) for r in rows]
    return Corpus.from_padded(np.array(rows)), n_items


def ctx_n(res) -> np.ndarray:
    z = res.context_vectors()
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def test_co_occurring_items_end_up_closer_than_unrelated_ones_and_runs_are_reproducible():
    corpus, n_items = planted_corpus(np.random.default_rng(0))
    cfg = SkipGramConfig(dim=16, window=3, num_negatives=5, epochs=15, batch_size=256, lr=0.02, sample=0.0)
    res = train_skipgram(corpus, n_items, cfg)
    v = res.centre_vectors()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    unrelated = sim[0, 7:]
    assert sim[0, 1] > unrelated.max()  # the always-together pair beats every unrelated item
    assert sim[0, 1] > 0.5 > unrelated.mean()
    assert (v[0] @ ctx_n(res)[1]) > (v[0] @ ctx_n(res)[7:].T).max()  # and scores high as each other's context
    assert res.history.losses[-1] < res.history.losses[0]
    ctx = res.context_vectors()
    assert np.abs(ctx).sum() > 0  # the separate context table was trained too
    again = train_skipgram(corpus, n_items, cfg).centre_vectors()
    np.testing.assert_array_equal(again, res.centre_vectors())
    # the same with negatives shared by the batch
    sh = train_skipgram(corpus, n_items, SkipGramConfig(dim=16, window=3, num_negatives=20, shared_negatives=True,
                                                        epochs=15, batch_size=256, lr=0.02, sample=0.0))
    w = sh.centre_vectors()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    assert (w @ w.T)[0, 1] > (w @ w.T)[0, 7:].max()


def test_custom_centre_module_is_trained():
    corpus, n_items = planted_corpus(np.random.default_rng(1))

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.ModuleList([torch.nn.Embedding(n_items, 8), torch.nn.Embedding(n_items, 8)])

        def forward(self, ids):
            return self.tables[0](ids) + self.tables[1](ids)

    before: list[torch.Tensor] = []

    def build():
        m = Twice()
        before.extend(t.weight.detach().clone() for t in m.tables)
        return m

    res = train_skipgram(corpus, n_items, SkipGramConfig(dim=8, epochs=2, batch_size=256, sample=0.0),
                         build_centre=build)
    for t, b in zip(res.model.centre.tables, before, strict=True):
        assert not torch.equal(t.weight.detach(), b)
