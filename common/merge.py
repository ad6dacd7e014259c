"""The one merge: per-channel normalisation, weights, quotas, dedup, exclusion, fill to k.

Used by the recall server for every request and by `python -m trainer evaluate` for its merged row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common import kernels
from common.retrieval import id_array

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


def ask_quota_or_k(quota: int, k: int, total_quota: int) -> int:
    """max(quota, k): the rule of channels whose cost hardly depends on how many candidates they return."""
    return max(quota, k)


def ask_quota_only(quota: int, k: int, total_quota: int) -> int:
    """The channel's quota plus only what the quotas of all merged channels cannot fill: the rule of a vector
    search, whose cost grows with its k."""
    return quota + max(0, k - total_quota)


# How many candidates a channel of each artifact kind asks for (the recall server's retrievers and the
# evaluator both use this table).
REQUEST_SIZE = {"i2i": ask_quota_or_k, "u2u": ask_quota_or_k, "u2i": ask_quota_only, "list": ask_quota_or_k}


def request_size(kind: str, quota: int, k: int, total_quota: int) -> int:
    """Candidates to ask one channel of artifact kind `kind` for (see REQUEST_SIZE)."""
    return REQUEST_SIZE[kind](quota, k, total_quota)


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
    lens = [len(o.ids) if o.weight > 0 else 0 for o in outputs]
    if not any(lens):
        return Merged(np.empty(0, np.int64), np.empty(0, np.float32), np.zeros((0, len(outputs)), np.int32), names)
    if normalize not in ("rank", "minmax"):
        raise ValueError(f"unknown normalisation {normalize!r} (rank or minmax)")
    live = [o for o, n in zip(outputs, lens, strict=True) if n]
    ids = np.concatenate([o.ids for o in live]).astype(np.int64, copy=False)
    scores = np.concatenate([o.scores for o in live]).astype(np.float32, copy=False)
    bounds = np.zeros(len(outputs) + 1, np.int64)
    np.cumsum(lens, out=bounds[1:])
    weights = np.array([o.weight for o in outputs], np.float64)
    quotas = np.array([o.quota for o in outputs], np.int64)
    out_ids, out_scores, ranks = kernels.merge_kernel(ids, scores, bounds, weights, quotas, normalize == "rank",
                                                      float(rank_offset), id_array(exclude), int(k), QUOTA_BONUS,
                                                      kernels.scratch(int(ids.max())))
    return Merged(out_ids, out_scores, ranks, names)
