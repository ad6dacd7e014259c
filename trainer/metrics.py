"""Recall metrics of shared PROTOCOL.md §5 (one target per user) and the timing calibration workload."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np


def lists_to_matrix(lists: Sequence[tuple[np.ndarray, np.ndarray] | np.ndarray], k: int) -> np.ndarray:
    """Ranked id lists → int64 matrix [n_users, k], padded with -1 (missing slots are misses)."""
    mat = np.full((len(lists), k), -1, np.int64)
    for r, entry in enumerate(lists):
        ids = entry[0] if isinstance(entry, tuple) else entry
        n = min(len(ids), k)
        mat[r, :n] = ids[:n]
    return mat


def target_ranks(mat: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each user's target in its row of `mat`; inf when absent (or target = -1)."""
    hits = (mat == np.asarray(targets, np.int64)[:, None]) & (mat >= 0)
    found = hits.any(axis=1)
    ranks = np.full(len(mat), np.inf)
    ranks[found] = hits[found].argmax(axis=1) + 1
    return ranks


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """HR@K (= Recall@K with one target): share of users whose target ranks ≤ K."""
    return float(np.mean(ranks <= k)) if len(ranks) else 0.0


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@K with one target: mean of 1/log2(rank + 1) for rank ≤ K, else 0 (ideal DCG = 1)."""
    if not len(ranks):
        return 0.0
    gain = np.zeros(len(ranks))
    hit = ranks <= k
    gain[hit] = 1.0 / np.log2(ranks[hit] + 1.0)
    return float(gain.mean())


def coverage(mat: np.ndarray, k: int, catalog_size: int) -> float:
    """|⋃ top-K items over users| / |catalog|."""
    top = mat[:, :k]
    return float(len(np.unique(top[top >= 0]))) / catalog_size if catalog_size else 0.0


def summarize(mat: np.ndarray, targets: np.ndarray, catalog_size: int) -> dict[str, float]:
    """The protocol's quality metrics for one ranked-list matrix."""
    ranks = target_ranks(mat, targets)
    return {"hr@50": hit_rate(ranks, 50), "hr@200": hit_rate(ranks, 200), "ndcg@50": ndcg(ranks, 50),
            "coverage@50": coverage(mat, 50, catalog_size)}


def hr_curve(mat: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> list[float]:
    """HR@K for every K in `ks` (for the recall-at-K plot)."""
    ranks = target_ranks(mat, targets)
    return [hit_rate(ranks, k) for k in ks]


def calibrate(repeats: int = 3) -> float:
    """PROTOCOL §5 calib_s: 5 dense 1000×1000 float64 matmuls + argsort of 2·10⁶ floats, one thread, median of 3."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with implicit
        threadpool_limits = None
    rng = np.random.default_rng(42)
    a, b = rng.random((1000, 1000)), rng.random((1000, 1000))
    v = rng.random(2_000_000)

    def once() -> float:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        np.argsort(v)
        return time.perf_counter() - t

    if threadpool_limits is None:
        return statistics.median(once() for _ in range(repeats))
    with threadpool_limits(limits=1):
        return statistics.median(once() for _ in range(repeats))
