"""The one merge: per-channel normalisation, weights, quotas, dedup, exclusion, fill to k.

Used by the recall server for every request and by `python -m trainer evaluate` for its merged row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.retrieval import drop_sorted, group_sum

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


@lru_cache(maxsize=64)
def _rank_scores(n: int, rank_offset: float) -> np.ndarray:
    scores = (1.0 / (rank_offset + np.arange(1, n + 1, dtype=np.float64))).astype(np.float32)
    scores.flags.writeable = False  # shared between calls
    return scores


def normalise(scores: np.ndarray, method: str, rank_offset: float) -> np.ndarray:
    """Map one channel's scores (sorted desc) onto a comparable scale."""
    n = len(scores)
    if method == "rank":
        return _rank_scores(n, float(rank_offset))
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-12:
        return np.ones(n, np.float32)
    return ((scores - lo) / (hi - lo)).astype(np.float32)


def merge(outputs: list[ChannelOutput], k: int, exclude: np.ndarray | None = None, *, normalize: str = "rank",
          rank_offset: float = 20.0) -> Merged:
    """Weighted fusion of channel outputs into at most k distinct items.

    Each channel contributes weight · normalised score for every candidate; the first `quota`
    candidates of each channel rank ahead of the rest, which only fill up to k. Ties: ascending item id.
    """
    names = [o.name for o in outputs]
    live = [(c, o) for c, o in enumerate(outputs) if len(o.ids) and o.weight > 0]
    if not live:
        return Merged(np.empty(0, np.int64), np.empty(0, np.float32), np.zeros((0, len(outputs)), np.int32), names)
    lens = [len(o.ids) for _, o in live]
    ids = np.concatenate([np.asarray(o.ids, np.int64) for _, o in live])
    contrib = np.concatenate([normalise(np.asarray(o.scores, np.float32), normalize, rank_offset) * np.float32(o.weight)
                              for _, o in live])
    chan = np.repeat(np.array([c for c, _ in live], np.int32), lens)
    rank = np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in lens])
    in_quota_each = rank <= np.repeat(np.array([o.quota for _, o in live], np.int32), lens)
    uniq, total, order, starts = group_sum(ids, contrib)
    in_quota = np.logical_or.reduceat(in_quota_each[order], starts)
    group = np.empty(len(ids), np.int64)  # candidate → its row in uniq
    group[order] = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(ids))))
    keep = drop_sorted(uniq, exclude)
    key = total + in_quota * QUOTA_BONUS
    if keep is not None:
        key[~keep] = -np.inf
    top = np.argsort(-key, kind="stable")[:k]  # uniq is ascending: ties keep ascending id
    if keep is not None:
        top = top[keep[top]]
    ranks = np.zeros((len(uniq), len(outputs)), np.int32)
    ranks[group, chan] = rank
    return Merged(uniq[top], total[top].astype(np.float32), ranks[top], names)
