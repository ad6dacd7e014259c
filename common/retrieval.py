"""Turning published artifacts into ranked candidates: one function per artifact kind.

Shared by the recall server and the offline evaluator, so offline numbers describe what is served.
All functions take and return numpy arrays of internal item indices.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from common import kernels

EMPTY_IDS = np.empty(0, dtype=np.int64)
EMPTY_SCORES = np.empty(0, dtype=np.float32)


def id_array(ids: np.ndarray | list[int] | None) -> np.ndarray:
    """`ids` as an int64 array (empty for None): an exclusion set for the kernels that need no order."""
    if ids is None or not len(ids):
        return EMPTY_IDS
    return np.asarray(ids, dtype=np.int64)


def sorted_ids(ids: np.ndarray | list[int] | None) -> np.ndarray:
    """Ascending int64 copy of `ids` (what the binary-searching kernels take as an exclusion set)."""
    ids = id_array(ids)
    return np.sort(ids) if len(ids) > 1 else ids


def top_k(ids: np.ndarray, scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best (id, score) pairs, score descending, ties by ascending id; `exclude` ids removed."""
    ids, scores, excl = np.asarray(ids, np.int64), np.asarray(scores, np.float32), sorted_ids(exclude)
    keep_n = k + len(excl)
    if len(ids) > max(4 * keep_n, 4096):  # big inputs (a whole catalogue): cut to the contenders first
        part = np.argpartition(-scores, keep_n - 1)[:keep_n]
        part = np.flatnonzero(scores >= scores[part].min())  # every id tied with the last one stays
        ids, scores = ids[part], scores[part]
    return kernels.top_k_kernel(ids, scores, excl, k)


@lru_cache(maxsize=256)
def anchor_weights(n: int, decay: float) -> np.ndarray:
    """Weight of the user's i-th most recent item: decay**i (cached; read-only)."""
    w = np.power(np.float32(decay), np.arange(n, dtype=np.float32))
    w.flags.writeable = False
    return w


def aggregate(lists: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray, k: int,
              exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Σ_a weight_a · score_a(item) over neighbour lists, then top-k (i2i and u2u serving)."""
    if not lists:
        return EMPTY_IDS, EMPTY_SCORES
    lens = np.array([len(x[0]) for x in lists], dtype=np.int64)
    ids = np.concatenate([x[0] for x in lists]).astype(np.int64, copy=False)
    scores = np.concatenate([x[1] for x in lists]).astype(np.float32, copy=False)
    return _aggregate_flat(ids, scores, lens, weights, k, exclude)


def _aggregate_flat(ids: np.ndarray, scores: np.ndarray, lens: np.ndarray, weights: np.ndarray, k: int,
                    exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if not len(ids):
        return EMPTY_IDS, EMPTY_SCORES
    return kernels.aggregate_kernel(ids, scores, lens, np.asarray(weights, np.float32), id_array(exclude), k,
                                    kernels.scratch(int(ids.max())))


def retrieve_i2i(neighbor_lists: list[tuple[np.ndarray, np.ndarray]], k: int, decay: float, per_anchor: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """i2i: neighbour lists of the user's recent items (newest first) weighted by recency."""
    lists = [(ids[:per_anchor], sc[:per_anchor]) for ids, sc in neighbor_lists]
    return aggregate(lists, anchor_weights(len(lists), decay), k, exclude)


def retrieve_u2u(neighbor_sims: np.ndarray, neighbor_recent: list[np.ndarray], k: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u2u: items of similar users' recent histories, each scored by the neighbour's similarity."""
    if not len(neighbor_recent):
        return EMPTY_IDS, EMPTY_SCORES
    lens = np.array([len(x) for x in neighbor_recent], dtype=np.int64)
    ids = np.concatenate(neighbor_recent).astype(np.int64, copy=False)
    return _aggregate_flat(ids, np.ones(len(ids), np.float32), lens, neighbor_sims, k, exclude)


def retrieve_vector(user_vec: np.ndarray, item_vecs: np.ndarray, k: int,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u2i by exact inner product (the evaluator's reference; the vector server uses faiss)."""
    scores = (item_vecs @ user_vec.astype(np.float32)).astype(np.float32)
    return top_k(np.arange(len(scores)), scores, k, exclude)


def live_interests(user_vecs: np.ndarray, dim: int | None = None) -> np.ndarray:
    """A user's interest vectors as [m, d] float32 rows, without the dead ones (all-zero, or not finite).

    `user_vecs` is one vector [d], K interests [K, d] (or [1, K, d], or K·d flat floats with `dim`). Rows past
    a user's interest count are zero, so this is also how a published count is applied."""
    x = np.asarray(user_vecs, dtype=np.float32)
    x = x.reshape(-1, dim if dim is not None else x.shape[-1])
    keep = np.isfinite(x).all(axis=1) & (x != 0).any(axis=1)
    return x if keep.all() else x[keep]


def merge_interests(per_interest: list[tuple[np.ndarray, np.ndarray]], k: int,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """K interests' search results → one list: each item's best score over the interests (so each item once),
    `exclude` ids removed, top k by score descending, ties by ascending id.

    Exact when each interest's list holds its top k + len(exclude) items: an item of the merged top k is
    outranked in its best interest only by items that are excluded or also in the merged top k."""
    if not per_interest:
        return EMPTY_IDS, EMPTY_SCORES
    ids = np.concatenate([np.asarray(r[0], np.int64) for r in per_interest])
    scores = np.concatenate([np.asarray(r[1], np.float32) for r in per_interest])
    uniq, where = np.unique(ids, return_inverse=True)
    best = np.full(len(uniq), -np.inf, np.float32)
    np.maximum.at(best, where, scores)  # each item's best score over the interests
    if len(uniq) and uniq[0] < 0:  # faiss pads short answers with -1
        uniq, best = uniq[1:], best[1:]
    return top_k(uniq, best, k, exclude)


def retrieve_vectors(user_vecs: np.ndarray, item_vecs: np.ndarray, k: int,
                     exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u2i for a user of one vector [d] or K interest vectors [K, d] by exact inner product: each live interest's
    top k + len(exclude) items, merged by `merge_interests` (what the vector server does with faiss results).

    One vector (a 1-D `user_vecs`, or a single row) is exactly `retrieve_vector`, a zero vector included."""
    user_vecs = np.asarray(user_vecs, dtype=np.float32)
    if user_vecs.ndim == 1 or user_vecs.reshape(-1, item_vecs.shape[1]).shape[0] == 1:
        return retrieve_vector(user_vecs.reshape(-1), item_vecs, k, exclude)
    live = live_interests(user_vecs, item_vecs.shape[1])
    if not len(live):
        return EMPTY_IDS, EMPTY_SCORES
    deep = k + len(id_array(exclude))
    scores = (item_vecs @ live.T).astype(np.float32)  # [n_items, m]
    ids = np.arange(len(scores))
    return merge_interests([top_k(ids, scores[:, j], deep) for j in range(len(live))], k, exclude)


def rank_list(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A list in serving order (score descending, ties by ascending id), as int64 ids and float32 scores."""
    ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def retrieve_list(ids: np.ndarray, scores: np.ndarray, k: int, exclude: np.ndarray | None = None,
                  ranked: bool = False):
    """Non-personalised list minus excluded items. `ranked`: the list is already in `rank_list` order (the
    answer is then its first k non-excluded entries, found without sorting)."""
    if ranked:
        return kernels.filter_kernel(ids, scores, sorted_ids(exclude), np.iinfo(np.int64).max, k)
    return top_k(np.asarray(ids, np.int64), np.asarray(scores, np.float32), k, exclude)


def merge_interest_rows(owner: np.ndarray, ids: np.ndarray, scores: np.ndarray, n_rows: int,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched `merge_interests` without exclusions: search results of many interests ([m, kk] ids, -1 padded,
    and scores; `owner[j]` = the row, i.e. user, interest j belongs to) → each row's top k by best score per
    item, ties by ascending id, as ([n_rows, k] int64 ids -1 padded, float32 scores)."""
    kk = ids.shape[1] if ids.ndim == 2 else 0
    row = np.repeat(np.asarray(owner, np.int64), kk)
    ids, scores = np.asarray(ids, np.int64).ravel(), np.asarray(scores, np.float32).ravel()
    ok = ids >= 0
    row, ids, scores = row[ok], ids[ok], scores[ok]
    order = np.lexsort((-scores, ids, row))  # per (row, item): best score first
    row, ids, scores = row[order], ids[order], scores[order]
    first = np.ones(len(ids), bool)
    first[1:] = (ids[1:] != ids[:-1]) | (row[1:] != row[:-1])
    row, ids, scores = row[first], ids[first], scores[first]
    order = np.lexsort((ids, -scores.astype(np.float64), row))  # per row: score descending, ties by id
    row, ids, scores = row[order], ids[order], scores[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    top = rank < k
    out_ids = np.full((n_rows, k), -1, np.int64)
    out_scores = np.zeros((n_rows, k), np.float32)
    out_ids[row[top], rank[top]] = ids[top]
    out_scores[row[top], rank[top]] = scores[top]
    return out_ids, out_scores
