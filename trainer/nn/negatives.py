"""Negatives (and the probabilities that correct for them): the count^power sampler, per-batch negative schemes,
pointwise negatives per positive (the user's own clicks masked), hard-negative mining (from the current model, or
from personalised-PageRank rank pools with PinSAGE's curriculum) from the current model, the logQ of each scheme, positive down-sampling, and the streaming
item-frequency estimator that gives in-batch negatives their q.

Every draw comes from a seeded `numpy.random.Generator` passed in by the caller, so a training run is reproduced
draw for draw by the same seed (trainer/nn/loop.py).

The streaming frequency estimator (`StreamingFrequencyEstimator`):
Streaming item-frequency estimation for sampling-bias (logQ) correction.

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

from collections.abc import Callable
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from trainer.data.train_data import TrainData

# schemes of `batch_negatives`: the other positives of the batch, a shared sample ∝ count^power, both, hard
# (part per-row model ranks, part sample), or the whole catalogue
Scheme = Literal["in_batch", "random", "mixed", "hard", "full"]


class PowerSampler:
    """Items drawn with probability q ∝ count^power over the items with a count (power 0: uniform over them;
    no counts at all: uniform over every item). `log_q` is the logQ correction of its draws."""

    def __init__(self, counts: np.ndarray, power: float = 0.75):
        c = np.asarray(counts, dtype=np.float64)
        w = np.where(c > 0, c ** power, 0.0)
        if w.sum() <= 0:
            w = np.ones(len(c))
        self.power = float(power)
        self.q = w / w.sum()
        self.cum_q = np.cumsum(self.q)

    @property
    def n_items(self) -> int:
        return len(self.q)

    def sample(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """k item indices (int64), independent draws ∝ q (one `rng.random(k)`)."""
        return np.minimum(np.searchsorted(self.cum_q, rng.random(k) * self.cum_q[-1], side="right"), self.n_items - 1)

    @cached_property
    def log_q(self) -> torch.Tensor:
        """float32 [n_items]: log q (floored at 1e-12)."""
        return torch.as_tensor(np.log(np.maximum(self.q, 1e-12)), dtype=torch.float32)


def log_frequencies(counts: np.ndarray) -> torch.Tensor:
    """float32 [n_items]: log of each item's share of the counts (floored at 1e-12): exact in-batch log q."""
    c = np.asarray(counts, dtype=np.float64)
    return torch.as_tensor(np.log(np.maximum(c / c.sum(), 1e-12)), dtype=torch.float32)


def keep_probability(counts: np.ndarray, threshold: float) -> np.ndarray:
    """word2vec-style down-sampling of popular positives: keep an example of item y with probability
    min(1, √(t/f) + t/f), f = y's share of the counts (1 everywhere when t = 0)."""
    c = np.asarray(counts, dtype=np.float64)
    if threshold <= 0:
        return np.ones(len(c))
    f = c / c.sum()
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, np.sqrt(threshold / f) + threshold / f)


def batch_negatives(scheme: Scheme, pos: np.ndarray, rng: np.random.Generator, sampler: PowerSampler, n_neg: int,
                    hard_fraction: float = 0.5, pointwise: bool = False) -> tuple[torch.Tensor, int]:
    """(negatives shared by the batch [C] (int64), per-row hard negatives to mine per row) for positives `pos` [B].

    in_batch: the batch's positives (pointwise: `n_neg` of them, a random permutation's head); random: `n_neg`
    draws; mixed: positives + `n_neg` draws; hard: round(n_neg·hard_fraction) per row mined by the caller
    (`hard_negatives`), the rest drawn; full: every item. Accidental hits (a negative equal to the row's
    positive) are the caller's to mask.
    """
    b = len(pos)
    n_hard = 0
    if scheme == "full":
        shared = np.arange(sampler.n_items)
    elif scheme == "in_batch":
        shared = pos if not pointwise else pos[rng.permutation(b)[:n_neg]]
    elif scheme == "random":
        shared = sampler.sample(rng, n_neg)
    elif scheme == "mixed":
        shared = np.concatenate([pos, sampler.sample(rng, n_neg)])
    elif scheme == "hard":
        n_hard = int(round(n_neg * hard_fraction))
        shared = sampler.sample(rng, n_neg - n_hard) if n_neg - n_hard > 0 else np.empty(0, np.int64)
    else:
        raise ValueError(f"unknown negative scheme {scheme!r}")
    return torch.as_tensor(np.asarray(shared, np.int64)), n_hard


def observed_pairs(data: TrainData) -> np.ndarray:
    """Sorted user·n_items + item keys of the training interactions (what `pointwise_examples` masks)."""
    return np.unique(data.user_idx.astype(np.int64) * data.n_items + data.item_idx)


def pointwise_examples(data: TrainData, rows: np.ndarray, k: int, sampler: PowerSampler, observed: np.ndarray | None,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(items int64 [B, 1+k]: each row's positive then k sampled items, valid bool [B, k]: the sampled item is not
    the positive nor, with `observed` (sorted user·n_items + item keys), an item the user clicked in training)."""
    pos = data.item_idx[rows].astype(np.int64)
    neg = sampler.sample(rng, len(rows) * k).reshape(len(rows), k)
    valid = neg != pos[:, None]
    if observed is not None and len(observed):
        key = data.user_idx[rows].astype(np.int64)[:, None] * data.n_items + neg
        valid &= observed[np.minimum(np.searchsorted(observed, key), len(observed) - 1)] != key
    return np.concatenate([pos[:, None], neg], axis=1), valid


def hard_negatives(user_vecs: torch.Tensor, item_vecs: torch.Tensor, k: int, rng: np.random.Generator,
                   hard_from: int, hard_to: int) -> torch.Tensor:
    """int64 [B, k]: per row, uniform draws among the items the model ranks [hard_from, hard_to) for that user
    (score = user · item); ranks past the catalogue are clipped."""
    hi = min(hard_to, item_vecs.shape[0])
    lo = min(hard_from, hi - 1)
    top = torch.topk(user_vecs @ item_vecs.T, hi, dim=1).indices[:, lo:]
    pick = torch.as_tensor(rng.integers(0, top.shape[1], size=(user_vecs.shape[0], k)))
    return torch.gather(top, 1, pick)


class HardNegativeMiner:
    """Hard negatives against a cache of every item's vector, re-encoded every `refresh` steps (and at the first
    call): `mine(user_vecs, k, rng, step, encode_items)`."""

    def __init__(self, hard_from: int, hard_to: int, refresh: int = 20):
        if hard_to <= hard_from:
            raise ValueError("hard_to must be > hard_from")
        self.hard_from, self.hard_to, self.refresh = hard_from, hard_to, max(1, int(refresh))
        self.item_cache: torch.Tensor | None = None

    def mine(self, user_vecs: torch.Tensor, k: int, rng: np.random.Generator, step: int,
             encode_items: Callable[[], torch.Tensor]) -> torch.Tensor:
        """int64 [B, k]; `user_vecs` should be detached. `encode_items()` gives every item's vector (no grad)."""
        if self.item_cache is None or step % self.refresh == 0:
            with torch.no_grad():
                self.item_cache = encode_items()
        return hard_negatives(user_vecs, self.item_cache, k, rng, self.hard_from, self.hard_to)


# -- hard negatives from personalised-PageRank ranks (PinSAGE) -----------------------------------------------------


def rank_window(hard_from: float, hard_to: float, n_catalog: int) -> tuple[int, int]:
    """The 0-based PPR rank window [lo, hi) of hard negatives: values < 1 are fractions of the catalogue."""
    lo = int(round(hard_from * n_catalog)) if hard_from < 1 else int(hard_from)
    hi = int(round(hard_to * n_catalog)) if hard_to < 1 else int(hard_to)
    return lo, min(hi, max(n_catalog - 1, 0))


def curriculum_count(epoch: int, curriculum: bool, hard_max: int | None, epochs: int) -> int:
    """Hard negatives per query in 0-based `epoch`: epoch n = epoch + 1 adds n − 1 (capped at hard_max) with the
    curriculum, else hard_max (null: epochs − 1) from the start."""
    cap = hard_max if hard_max is not None else max(epochs - 1, 0)
    return min(epoch, cap) if curriculum else cap


def draw_hard(pools: np.ndarray, queries: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [len(queries), k]: k hard negatives per query drawn uniformly (with replacement) from its pool's
    filled slots; -1 where the pool is empty."""
    if k == 0:
        return np.zeros((len(queries), 0), np.int64)
    pool = pools[queries]
    filled = (pool >= 0).sum(1)
    slot = np.floor(rng.random((len(queries), k)) * np.maximum(filled, 1)[:, None]).astype(np.int64)
    out = np.take_along_axis(pool, slot, axis=1)  # pools are filled left to right
    return np.where(filled[:, None] > 0, out, -1)


def candidate_log_q(scheme: Scheme, ids: torch.Tensor, batch_size: int, n_random: int, sampler: PowerSampler,
                    estimator: StreamingFrequencyEstimator | None = None,
                    exact_log_p: torch.Tensor | None = None) -> torch.Tensor | None:
    """log q of each candidate id under the batch's scheme (None for `full`: nothing sampled, nothing to correct).

    in_batch: log p̂(y), from `exact_log_p` when given, else the streaming `estimator`; mixed: log of the
    expected copies of y among the candidates, B·p̂(y) + K·q(y); random / hard: the sampler's log q(y).
    """
    if scheme == "full":
        return None
    if scheme in ("in_batch", "mixed"):
        if exact_log_p is not None:
            lp = exact_log_p[ids]
        elif estimator is not None:
            lp = torch.as_tensor(estimator.log_probability(ids.numpy()), dtype=torch.float32)
        else:
            raise ValueError("in-batch log q needs exact_log_p or a StreamingFrequencyEstimator")
        if scheme == "in_batch":
            return lp
        return torch.logaddexp(lp + float(np.log(batch_size)), sampler.log_q[ids] + float(np.log(max(n_random, 1))))
    return sampler.log_q[ids]


def relative_log_q(log_q: torch.Tensor, n_items: int, weight: float = 1.0) -> torch.Tensor:
    """β·(log q + log n_items): log q relative to a uniform catalogue. The shift is a constant that cancels in
    softmax and pairwise losses and spares a pointwise bias from learning −log(1/n_items)."""
    return weight * (log_q + float(np.log(n_items)))


# ---------------------------------------------------------------------------------------------------------
# streaming item-frequency estimation (logQ of in-batch negatives)

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
