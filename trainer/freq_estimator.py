"""Streaming item-frequency estimation for sampling-bias (logQ) correction.

Follows Yi et al. 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations"
(Algorithm 2 with multiple hashings): arrays A (last step an item's bucket was seen) and B (moving
average of the gap between sightings), per hash function h_j of size H,

    B[h(y)] ← (1 − α)·B[h(y)] + α·(t − A[h(y)]),   A[h(y)] ← t,   p̂(y) = 1 / max_j B_j[h_j(y)].

Differences from the paper, all small:
- `t` counts *examples* of the stream (not batches), so p̂ is the per-example probability and does not
  saturate at 1 for items that occur several times in one batch; inside a batch the updates are
  exactly those of feeding its items one by one in order (computed vectorised, see `update`).
- The first sighting of a bucket only sets A (its "gap" since t = 0 is meaningless), and B is the
  zero-initialised moving average with the Adam-style bias correction B / (1 − (1 − α)^n), n = number
  of gaps seen, so early estimates are not biased towards tiny gaps (huge p̂).
"""

from __future__ import annotations

import numpy as np

_PRIME = (1 << 31) - 1  # Mersenne prime for the universal hash family ((a·x + b) mod P) mod H


class StreamingFrequencyEstimator:
    """Estimate p(item) from a stream of item ids, in bounded memory (n_hashes × hash_size)."""

    def __init__(self, hash_size: int = 1 << 16, n_hashes: int = 2, alpha: float = 0.01, seed: int = 42):
        if hash_size < 1 or n_hashes < 1 or not 0 < alpha <= 1:
            raise ValueError("need hash_size ≥ 1, n_hashes ≥ 1 and 0 < alpha ≤ 1")
        rng = np.random.default_rng(seed)
        self.hash_size, self.n_hashes, self.alpha = int(hash_size), int(n_hashes), float(alpha)
        self._a = rng.integers(1, _PRIME, size=n_hashes, dtype=np.int64)
        self._b = rng.integers(0, _PRIME, size=n_hashes, dtype=np.int64)
        self.A = np.full((n_hashes, hash_size), -1, dtype=np.int64)  # -1: bucket never seen
        self.B = np.zeros((n_hashes, hash_size), dtype=np.float64)
        self.n = np.zeros((n_hashes, hash_size), dtype=np.int64)  # gaps averaged into B
        self.t = 0  # examples seen so far

    def _hash(self, items: np.ndarray) -> np.ndarray:
        x = np.asarray(items, dtype=np.int64) % _PRIME
        return ((self._a[:, None] * x[None, :] + self._b[:, None]) % _PRIME) % self.hash_size  # [m, n]

    def update(self, items: np.ndarray) -> None:
        """Feed a batch of item ids (in stream order); equal to feeding them one at a time."""
        items = np.asarray(items, dtype=np.int64).ravel()
        n = len(items)
        if n == 0:
            return
        steps = self.t + 1 + np.arange(n, dtype=np.int64)
        decay = 1.0 - self.alpha
        for j, h in enumerate(self._hash(items)):  # loop over the few hash functions only
            order = np.argsort(h, kind="stable")  # groups by bucket, stream order inside a group
            hs, ts = h[order], steps[order]
            start = np.ones(n, dtype=bool)
            start[1:] = hs[1:] != hs[:-1]
            group = np.cumsum(start) - 1
            first = np.flatnonzero(start)
            size = np.diff(np.append(first, n))
            rank = np.arange(n) - first[group]  # position inside the bucket's group
            prev = np.empty(n, dtype=np.int64)
            prev[1:] = ts[:-1]
            prev[start] = self.A[j, hs[start]]
            valid = prev >= 0  # a never-seen bucket's first sighting has no gap
            gap = (ts - prev).astype(np.float64)
            # the k-th of g gaps in a group ends up multiplied by α(1−α)^(g−1−k) after sequential updates
            w = np.where(valid, self.alpha * decay ** (size[group] - 1 - rank), 0.0)
            contrib = np.bincount(group, weights=w * gap, minlength=len(first))
            n_valid = np.bincount(group, weights=valid, minlength=len(first)).astype(np.int64)
            buckets = hs[first]
            self.B[j, buckets] = decay ** n_valid * self.B[j, buckets] + contrib
            self.n[j, buckets] += n_valid
            self.A[j, buckets] = ts[first + size - 1]
        self.t += n

    def gaps(self, items: np.ndarray) -> np.ndarray:
        """Estimated mean gap (in examples) between occurrences: the bias-corrected max over hashes."""
        h = self._hash(items)
        rows = np.arange(self.n_hashes)[:, None]
        n = self.n[rows, h]
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(n > 0, self.B[rows, h] / (1.0 - (1.0 - self.alpha) ** n), np.nan)
        g = np.full(b.shape[1], np.nan)
        seen = ~np.isnan(b).all(axis=0)
        g[seen] = np.nanmax(b[:, seen], axis=0)
        # never (or only once) seen: at most one occurrence in t examples
        return np.where(np.isnan(g), max(self.t, 1), np.maximum(g, 1.0))

    def probability(self, items: np.ndarray) -> np.ndarray:
        """p̂(item) per example of the stream (1 / estimated gap)."""
        return 1.0 / self.gaps(items)

    def log_probability(self, items: np.ndarray) -> np.ndarray:
        return -np.log(self.gaps(items))
