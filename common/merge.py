"""The one merge: per-channel normalisation, weights, quotas, dedup, exclusion, fill to k.

Used by the recall server for every request and by `python -m trainer evaluate` for its merged row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUOTA_BONUS = 1e6  # in-quota candidates always rank above fill candidates


@dataclass
class ChannelOutput:
    """One channel's ranked candidates (ids are internal item indices, best first)."""

    name: str
    ids: np.ndarray
    scores: np.ndarray
    weight: float = 1.0
    quota: int = 200


@dataclass
class Merged:
    ids: np.ndarray  # int64, best first
    scores: np.ndarray  # float32
    ranks: np.ndarray  # int32 [len(ids), n_channels]: 1-based rank in each channel, 0 if absent
    channel_names: list[str]


def request_size(kind: str, quota: int, k: int, total_quota: int) -> int:
    """Candidates to ask one channel for: max(quota, k); a u2i channel (a vector search, whose cost grows
    with its k) asks for its quota plus only what the quotas of all merged channels cannot fill."""
    return quota + max(0, k - total_quota) if kind == "u2i" else max(quota, k)


def normalise(scores: np.ndarray, method: str, rank_offset: float) -> np.ndarray:
    """Map one channel's scores (sorted desc) onto a comparable scale."""
    n = len(scores)
    if method == "rank":
        return (1.0 / (rank_offset + np.arange(1, n + 1, dtype=np.float64))).astype(np.float32)
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-12:
        return np.ones(n, np.float32)
    return ((scores - lo) / (hi - lo)).astype(np.float32)


def merge(outputs: list[ChannelOutput], k: int, exclude: np.ndarray | None = None, *, normalize: str = "rank",
          rank_offset: float = 20.0) -> Merged:
    """Weighted fusion of channel outputs into at most k distinct items.

    Each channel contributes weight · normalised score for every candidate; the first `quota`
    candidates of each channel rank ahead of the rest, which only fill up to k.
    """
    names = [o.name for o in outputs]
    live = [(c, o) for c, o in enumerate(outputs) if len(o.ids) and o.weight > 0]
    if not live:
        return Merged(np.empty(0, np.int64), np.empty(0, np.float32), np.zeros((0, len(outputs)), np.int32), names)
    ids = np.concatenate([np.asarray(o.ids, np.int64) for _, o in live])
    contrib = np.concatenate([normalise(np.asarray(o.scores, np.float32), normalize, rank_offset) * np.float32(o.weight)
                              for _, o in live]).astype(np.float64)
    chan = np.concatenate([np.full(len(o.ids), c, np.int32) for c, o in live])
    rank = np.concatenate([np.arange(1, len(o.ids) + 1, dtype=np.int32) for _, o in live])
    quota = np.concatenate([np.arange(len(o.ids)) < o.quota for _, o in live])
    if exclude is not None and len(exclude):
        keep = ~np.isin(ids, exclude)
        ids, contrib, chan, rank, quota = ids[keep], contrib[keep], chan[keep], rank[keep], quota[keep]
    uniq, inv = np.unique(ids, return_inverse=True)
    total = np.bincount(inv, weights=contrib, minlength=len(uniq))
    in_quota = np.bincount(inv, weights=quota.astype(np.float64), minlength=len(uniq)) > 0
    key = total + in_quota * QUOTA_BONUS
    order = np.lexsort((uniq, -key))[:k]
    ranks = np.zeros((len(uniq), len(outputs)), np.int32)
    ranks[inv, chan] = rank
    return Merged(uniq[order], total[order].astype(np.float32), ranks[order], names)
