"""Turning published artifacts into ranked candidates: one function per artifact kind.

Shared by the recall server and the offline evaluator, so offline numbers describe what is served.
All functions take and return numpy arrays of internal item indices.
"""

from __future__ import annotations

import numpy as np

EMPTY_IDS = np.empty(0, dtype=np.int64)
EMPTY_SCORES = np.empty(0, dtype=np.float32)


def top_k(ids: np.ndarray, scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best (id, score) pairs, score descending, ties by ascending id; `exclude` ids removed."""
    if exclude is not None and len(exclude) and len(ids):
        keep = ~np.isin(ids, exclude)
        ids, scores = ids[keep], scores[keep]
    if len(ids) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        # keep every id tied with the k-th score so the tie-break is exact
        kth = scores[part].min()
        part = np.flatnonzero(scores >= kth)
        ids, scores = ids[part], scores[part]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].astype(np.int64, copy=False), scores[order].astype(np.float32, copy=False)


def anchor_weights(n: int, decay: float) -> np.ndarray:
    """Weight of the user's i-th most recent item: decay**i."""
    return np.power(np.float32(decay), np.arange(n, dtype=np.float32))


def group_sum(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group equal ids: (sorted unique ids, per-group sum of `values` in float64, the stable sort order, group
    starts in that order). Sums add in input order within a group, exactly like np.bincount."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    first = np.empty(len(s), dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return s[starts], np.add.reduceat(values[order].astype(np.float64, copy=False), starts), order, starts


def drop_sorted(uniq: np.ndarray, exclude: np.ndarray | None) -> np.ndarray | None:
    """Boolean mask over sorted unique `uniq` that drops the `exclude` ids (None when nothing is dropped)."""
    if exclude is None or not len(exclude) or not len(uniq):
        return None
    exclude = np.asarray(exclude)
    pos = np.searchsorted(uniq, exclude)
    inside = pos < len(uniq)
    pos = pos[inside]
    pos = pos[uniq[pos] == exclude[inside]]
    if not len(pos):
        return None
    keep = np.ones(len(uniq), dtype=bool)
    keep[pos] = False
    return keep


def aggregate(lists: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray, k: int,
              exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Σ_a weight_a · score_a(item) over neighbour lists, then top-k (i2i and u2u serving)."""
    if not lists:
        return EMPTY_IDS, EMPTY_SCORES
    ids = np.concatenate([x[0] for x in lists]).astype(np.int64, copy=False)
    if not len(ids):
        return EMPTY_IDS, EMPTY_SCORES
    sc = np.concatenate([x[1] for x in lists]).astype(np.float32, copy=False) * np.repeat(
        np.asarray(weights, np.float32), [len(x[0]) for x in lists])
    if ids.min() < 0:
        valid = ids >= 0
        ids, sc = ids[valid], sc[valid]
        if not len(ids):
            return EMPTY_IDS, EMPTY_SCORES
    uniq, total, _, _ = group_sum(ids, sc)
    total = total.astype(np.float32)
    keep = drop_sorted(uniq, exclude)
    if keep is not None:
        uniq, total = uniq[keep], total[keep]
    if len(uniq) > 4 * k:
        return top_k(uniq, total, k)
    order = np.argsort(-total, kind="stable")[:k]  # uniq is ascending: ties keep ascending id
    return uniq[order], total[order]


def retrieve_i2i(neighbor_lists: list[tuple[np.ndarray, np.ndarray]], k: int, decay: float, per_anchor: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """i2i: neighbour lists of the user's recent items (newest first) weighted by recency."""
    lists = [(ids[:per_anchor], sc[:per_anchor]) for ids, sc in neighbor_lists]
    return aggregate(lists, anchor_weights(len(lists), decay), k, exclude)


def retrieve_u2u(neighbor_sims: np.ndarray, neighbor_recent: list[np.ndarray], k: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u2u: items of similar users' recent histories, each scored by the neighbour's similarity."""
    lists = [(items, np.ones(len(items), np.float32)) for items in neighbor_recent]
    return aggregate(lists, np.asarray(neighbor_sims, np.float32), k, exclude)


def retrieve_vector(user_vec: np.ndarray, item_vecs: np.ndarray, k: int,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u2i by exact inner product (the evaluator's reference; the vector server uses faiss)."""
    scores = (item_vecs @ user_vec.astype(np.float32)).astype(np.float32)
    return top_k(np.arange(len(scores)), scores, k, exclude)


def retrieve_list(ids: np.ndarray, scores: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """Non-personalised list minus excluded items."""
    return top_k(np.asarray(ids, np.int64), np.asarray(scores, np.float32), k, exclude)
