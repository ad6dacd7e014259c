"""The kit's negatives: the count^power sampler, per-batch schemes, hard negatives, logQ per scheme, and the
streaming frequency estimator (Yi et al. 2019) that gives in-batch negatives their q."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.nn.negatives import (
    HardNegativeMiner,
    PowerSampler,
    StreamingFrequencyEstimator,
    batch_negatives,
    candidate_log_q,
    hard_negatives,
    keep_probability,
    log_frequencies,
    relative_log_q,
)


def test_sampler_frequencies_follow_count_power():
    counts = np.array([1000, 300, 100, 30, 10, 0, 1])
    s = PowerSampler(counts, 0.75)
    expect = np.where(counts > 0, counts.astype(float) ** 0.75, 0)
    np.testing.assert_allclose(s.q, expect / expect.sum())
    draws = s.sample(np.random.default_rng(0), 400_000)
    freq = np.bincount(draws, minlength=len(counts)) / len(draws)
    np.testing.assert_allclose(freq, s.q, atol=0.003)  # binomial sd ≤ 0.0008
    assert freq[5] == 0  # never-clicked items are never drawn
    torch.testing.assert_close(s.log_q, torch.as_tensor(np.log(np.maximum(s.q, 1e-12)), dtype=torch.float32))
    # power 0: uniform over the clicked items; no counts at all: uniform over everything
    np.testing.assert_allclose(PowerSampler(counts, 0.0).q, (counts > 0) / 6)
    np.testing.assert_allclose(PowerSampler(np.zeros(4), 0.75).q, 0.25)


def test_sampler_draws_are_the_two_tower_draws():
    """Same generator, same draws as two-tower's `sample`: one rng.random(k), searchsorted on cum q."""
    counts = np.random.default_rng(1).integers(0, 50, 300).astype(np.float64)
    q = counts ** 0.75
    q /= q.sum()
    cum_q = np.cumsum(q)
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for k in (1, 64, 1000):
        expect = np.minimum(np.searchsorted(cum_q, a.random(k) * cum_q[-1], side="right"), len(counts) - 1)
        np.testing.assert_array_equal(PowerSampler(counts).sample(b, k), expect)


def test_batch_negative_schemes():
    counts = np.arange(1, 21, dtype=float)
    s = PowerSampler(counts)
    pos = np.array([3, 3, 7, 1])
    shared, n_hard = batch_negatives("in_batch", pos, np.random.default_rng(0), s, 8)
    assert shared.tolist() == pos.tolist() and n_hard == 0
    shared, _ = batch_negatives("in_batch", pos, np.random.default_rng(0), s, 2, pointwise=True)
    assert shared.tolist() == pos[np.random.default_rng(0).permutation(4)[:2]].tolist()
    shared, _ = batch_negatives("random", pos, np.random.default_rng(0), s, 8)
    assert shared.tolist() == s.sample(np.random.default_rng(0), 8).tolist()
    shared, _ = batch_negatives("mixed", pos, np.random.default_rng(0), s, 8)
    assert shared.tolist() == pos.tolist() + s.sample(np.random.default_rng(0), 8).tolist()
    shared, n_hard = batch_negatives("hard", pos, np.random.default_rng(0), s, 8, hard_fraction=0.75)
    assert n_hard == 6 and shared.tolist() == s.sample(np.random.default_rng(0), 2).tolist()
    shared, n_hard = batch_negatives("hard", pos, np.random.default_rng(0), s, 4, hard_fraction=1.0)
    assert n_hard == 4 and len(shared) == 0
    shared, _ = batch_negatives("full", pos, np.random.default_rng(0), s, 8)
    assert shared.tolist() == list(range(20)) and shared.dtype == torch.int64
    with pytest.raises(ValueError):
        batch_negatives("nope", pos, np.random.default_rng(0), s, 8)


def test_hard_negatives_come_from_the_model_ranks():
    items = torch.eye(6)[:, :6] * torch.arange(6, 0, -1).float()[:, None]  # item j scores (6 − j) on dim j
    users = torch.ones(3, 6)  # every user ranks items 0, 1, 2, … in order
    got = hard_negatives(users, items, 50, np.random.default_rng(0), hard_from=2, hard_to=4)
    assert got.shape == (3, 50) and set(got.ravel().tolist()) == {2, 3}
    # ranks past the catalogue are clipped: [5, 100) of 6 items → rank 5 only
    assert set(hard_negatives(users, items, 5, np.random.default_rng(0), 5, 100).ravel().tolist()) == {5}
    miner = HardNegativeMiner(2, 4, refresh=3)
    calls = []

    def encode():
        calls.append(1)
        return items

    for step in range(7):
        miner.mine(users, 2, np.random.default_rng(step), step, encode)
    assert len(calls) == 3  # steps 0, 3, 6
    with pytest.raises(ValueError):
        HardNegativeMiner(5, 5)


def test_log_q_of_each_scheme():
    counts = np.array([8.0, 4.0, 2.0, 2.0, 0.0])
    s = PowerSampler(counts)
    ids = torch.tensor([0, 2, 4])
    exact = log_frequencies(counts)
    torch.testing.assert_close(exact, torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125, 1e-12])))
    assert candidate_log_q("full", ids, 4, 0, s) is None
    assert torch.equal(candidate_log_q("in_batch", ids, 4, 0, s, exact_log_p=exact), exact[ids])
    est = StreamingFrequencyEstimator(hash_size=64)
    est.update(np.array([0, 1, 0, 2, 0, 3]))
    torch.testing.assert_close(candidate_log_q("in_batch", ids, 4, 0, s, est),
                               torch.as_tensor(est.log_probability(ids.numpy()), dtype=torch.float32))
    assert torch.equal(candidate_log_q("random", ids, 4, 16, s), s.log_q[ids])
    assert torch.equal(candidate_log_q("hard", ids, 4, 16, s), s.log_q[ids])
    # mixed: expected copies among B in-batch + K sampled candidates = B·p(y) + K·q(y)
    mixed = candidate_log_q("mixed", ids, 4, 16, s, exact_log_p=exact)
    expect = np.log(4 * np.exp(exact[ids].numpy().astype(float)) + 16 * np.maximum(s.q[ids.numpy()], 1e-12))
    np.testing.assert_allclose(mixed.numpy(), expect, rtol=1e-5)
    with pytest.raises(ValueError):
        candidate_log_q("in_batch", ids, 4, 0, s)
    # relative to a uniform catalogue: a uniform q gives 0
    torch.testing.assert_close(relative_log_q(torch.full((3,), float(np.log(1 / 5))), 5, 1.25), torch.zeros(3))


def test_keep_probability_of_positives():
    counts = np.array([900.0, 90.0, 10.0])
    np.testing.assert_array_equal(keep_probability(counts, 0.0), 1.0)
    t, f = 0.01, counts / counts.sum()
    np.testing.assert_allclose(keep_probability(counts, t), np.minimum(1, np.sqrt(t / f) + t / f))
    assert keep_probability(counts, t)[0] < 1 and keep_probability(counts, t)[2] == 1


# -- streaming frequency estimator ---------------------------------------------------------------------------


def _sequential_reference(stream: np.ndarray, est: StreamingFrequencyEstimator) -> tuple[np.ndarray, np.ndarray]:
    """The paper's update written as a plain loop, one item at a time (A, B per hash)."""
    a_arr = np.full_like(est.A, -1)
    b_arr = np.zeros_like(est.B)
    for t, y in enumerate(stream, start=1):
        for j, h in enumerate(est._hash(np.array([y]))[:, 0]):
            if a_arr[j, h] >= 0:
                b_arr[j, h] = (1 - est.alpha) * b_arr[j, h] + est.alpha * (t - a_arr[j, h])
            a_arr[j, h] = t
    return a_arr, b_arr


def test_vectorised_batch_update_equals_item_by_item_updates():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 40, size=1500)  # small hash → many collisions and repeats inside a batch
    est = StreamingFrequencyEstimator(hash_size=23, n_hashes=3, alpha=0.05, seed=1)
    for b in range(0, len(stream), 128):
        est.update(stream[b:b + 128])
    a_ref, b_ref = _sequential_reference(stream, StreamingFrequencyEstimator(23, 3, 0.05, seed=1))
    assert est.t == len(stream)
    np.testing.assert_array_equal(est.A, a_ref)
    np.testing.assert_allclose(est.B, b_ref, rtol=1e-10, atol=1e-10)


def test_converges_to_zipf_frequencies():
    rng = np.random.default_rng(42)
    n, s = 1000, 1.1
    p = 1.0 / np.arange(1, n + 1) ** s
    p /= p.sum()
    stream = rng.choice(n, size=300_000, p=p)
    # α = 0.003 averages the last ~300 gaps of an item: the head is estimated to a few per cent
    est = StreamingFrequencyEstimator(hash_size=1 << 14, n_hashes=2, alpha=0.003, seed=42)
    for b in range(0, len(stream), 512):
        est.update(stream[b:b + 512])
    p_hat = est.probability(np.arange(n))
    rel = np.abs(p_hat - p) / p
    assert rel[:10].max() < 0.2, rel[:10]  # stated tolerance: top-10 items within 20 %
    assert np.median(rel[:50]) < 0.05
    # the ranking of the head is recovered, and log p is what logQ uses
    assert np.corrcoef(np.log(p_hat[:100]), np.log(p[:100]))[0, 1] > 0.95
    np.testing.assert_allclose(est.log_probability(np.arange(5)), np.log(p_hat[:5]))


def test_tracks_a_change_in_popularity():
    est = StreamingFrequencyEstimator(hash_size=1024, n_hashes=2, alpha=0.05)
    rng = np.random.default_rng(3)
    est.update(rng.choice([0, 1], size=20_000, p=[0.9, 0.1]))
    assert est.probability(np.array([0]))[0] > est.probability(np.array([1]))[0]
    est.update(rng.choice([0, 1], size=20_000, p=[0.1, 0.9]))
    p0, p1 = est.probability(np.array([0, 1]))
    assert p1 == pytest.approx(0.9, rel=0.2) and p0 == pytest.approx(0.1, rel=0.3)


def test_unseen_items_get_a_small_probability_and_bad_args_fail():
    est = StreamingFrequencyEstimator(hash_size=1 << 12)
    est.update(np.zeros(1000, np.int64))
    assert est.probability(np.array([0]))[0] == pytest.approx(1.0)
    assert est.probability(np.array([999]))[0] <= 1.0 / 1000 + 1e-12
    with pytest.raises(ValueError):
        StreamingFrequencyEstimator(alpha=0.0)
