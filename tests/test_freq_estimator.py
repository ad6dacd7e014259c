"""The streaming frequency estimator (Yi et al. 2019) used for logQ correction."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.freq_estimator import StreamingFrequencyEstimator


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
