"""Neighbour lists shared by every model: cosine kNN over vectors (faiss) or over one-hot side information,
row-wise top-k of sparse and dense score matrices, and capped user histories for the co-occurrence models. No
model imports another model."""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from trainer.channels.base import NeighborArtifact
from trainer.data.train_data import TrainData

# Query rows per faiss search call (bounds the [rows, k] result buffers and paces the progress bar).
SEARCH_BATCH = 4096
# Above this many rows the all-pairs exact search (O(n²·d)) gives way to an HNSW index.
EXACT_MAX_ROWS = 200_000
# Rows handled per step of the sparse top-k, by non-zeros.
TOPK_NNZ_BUDGET = 1 << 23


def cosine_neighbors(vectors: np.ndarray, k: int, valid: np.ndarray | None = None, progress: bool = False,
                     desc: str = "neighbours", exact_max_rows: int = EXACT_MAX_ROWS) -> NeighborArtifact:
    """Top-k cosine neighbours of every row among all valid rows, self excluded: exact faiss IndexFlatIP
    over normalised vectors (HNSW, efSearch ≥ 2(k+1), beyond `exact_max_rows` rows).

    Rows that are invalid or all-zero get no list (all -1); short rows are -1/0 padded.
    """
    x, rows = normalised_rows(vectors, valid)
    n = len(x)
    nb = np.full((n, k), -1, np.int32)
    sc = np.zeros((n, k), np.float32)
    if len(rows) < 2 or k < 1:
        return NeighborArtifact(nb, sc)
    index = cosine_index(x, rows, k, exact_max_rows)
    for s in tqdm(range(0, len(rows), SEARCH_BATCH), desc=desc, disable=not progress, leave=False):
        q = rows[s:s + SEARCH_BATCH]
        ids, dist = search_batch(index, x, rows, q, k)
        m = ids.shape[1]
        nb[q, :m], sc[q, :m] = ids, dist
    return NeighborArtifact(nb, sc)


def normalised_rows(vectors: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 copy with the valid non-zero rows L2-normalised, indices of those rows)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1)
    ok = norms > 0
    if valid is not None:
        ok &= np.asarray(valid, bool)
    x[ok] /= norms[ok, None]
    return x, np.flatnonzero(ok)


def cosine_index(x: np.ndarray, rows: np.ndarray, k: int, exact_max_rows: int = EXACT_MAX_ROWS) -> faiss.Index:
    """The faiss index over `x[rows]` that `cosine_neighbors` searches: exact, or HNSW beyond `exact_max_rows`."""
    kk = min(k + 1, len(rows))
    d = x.shape[1]
    if len(rows) > exact_max_rows:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        index.hnsw.efSearch = max(256, 2 * kk)  # faiss does not raise efSearch to k (PERFORMANCE_NOTES.md)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(x[rows])
    return index


def search_batch(index: faiss.Index, x: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of the query rows `q` (self and padding dropped, faiss order kept): (ids, scores) [len(q), ≤ k]."""
    kk = min(k + 1, len(rows))
    dist, loc = index.search(x[q], kk)
    ids = np.where(loc >= 0, rows[np.clip(loc, 0, None)], -1)
    drop = (ids == q[:, None]) | (ids < 0)
    # stable: kept neighbours first in faiss order, then the dropped slots
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    dropped = np.take_along_axis(drop, order, axis=1)
    ids[dropped], dist[dropped] = -1, 0.0
    return ids, dist


def sparse_top_k(mat: sp.csr_matrix, k: int, self_offset: int | None = 0, progress: bool = False,
                 desc: str = "top-k") -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a sparse score matrix: (int32 ids, float32 scores) [n_rows, k], -1/0 padded.

    Scores are compared as float32, ties broken by ascending column. Row r's own column
    `r + self_offset` is dropped (None keeps it); only positive scores are kept.
    """
    mat = sp.csr_matrix(mat)
    mat.sort_indices()
    n_rows = mat.shape[0]
    ids = np.full((n_rows, k), -1, np.int32)
    scores = np.zeros((n_rows, k), np.float32)
    indptr = mat.indptr
    # row chunks with a bounded number of non-zeros each
    bounds = [0]
    while bounds[-1] < n_rows:
        start = bounds[-1]
        stop = int(np.searchsorted(indptr, indptr[start] + TOPK_NNZ_BUDGET, side="right")) - 1
        bounds.append(min(n_rows, max(stop, start + 1)))
    for start, stop in tqdm(list(zip(bounds[:-1], bounds[1:], strict=True)), desc=desc, disable=not progress,
                            leave=False):
        a, b = indptr[start], indptr[stop]
        rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(indptr[start:stop + 1]))
        cols = mat.indices[a:b].astype(np.int64)
        vals = mat.data[a:b].astype(np.float32)
        keep = vals > 0
        if self_offset is not None:
            keep &= cols != rows + self_offset
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        # one uint64 key (row, then descending score: positive float32 bits are monotonic); the stable sort
        # keeps csr's ascending column order among ties, ~7x faster than a 3-key lexsort
        key = ((rows - start).astype(np.uint64) << np.uint64(32)) | (
            np.uint64(0xFFFFFFFF) - vals.view(np.uint32).astype(np.uint64))
        order = np.argsort(key, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
        first = np.searchsorted(rows, rows, side="left")  # index of each row's first entry
        rank = np.arange(len(rows)) - first
        top = rank < k
        ids[rows[top], rank[top]] = cols[top]
        scores[rows[top], rank[top]] = vals[top]
    return ids, scores


def top_k_rows(scores: np.ndarray, k: int, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a dense score matrix (ties by ascending column); -1/-inf pad if k > n."""
    n_rows, n_cols = scores.shape
    scores = scores.astype(np.float32, copy=True)
    if exclude_self and n_rows == n_cols:
        np.fill_diagonal(scores, -np.inf)
    kk = min(k, n_cols)
    idx = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    part = np.take_along_axis(scores, idx, axis=1)
    order = np.lexsort((idx, -part), axis=1)
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int32)
    sc = np.take_along_axis(part, order, axis=1)
    bad = ~np.isfinite(sc)
    idx[bad], sc[bad] = -1, 0.0
    if kk < k:
        idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
        sc = np.pad(sc, ((0, 0), (0, k - kk)))
    return idx, sc


def capped_histories(data: TrainData, max_history: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray, np.ndarray]:
    """Each user's last `max_history` interactions, in time order: (items, ts, user, position, length per user)."""
    ptr = data.user_ptr
    lengths = np.diff(ptr)
    pos = np.arange(len(data.item_idx), dtype=np.int64) - np.repeat(ptr[:-1], lengths)
    keep_from = np.maximum(lengths - max_history, 0) if max_history is not None else np.zeros_like(lengths)
    keep = pos >= np.repeat(keep_from, lengths)
    uid = data.user_idx[keep].astype(np.int64)
    capped = lengths - keep_from
    return (data.item_idx[keep].astype(np.int64), data.ts[keep], uid, pos[keep] - keep_from[uid], capped)


def side_info_neighbors(codes: np.ndarray, sizes: list[int], query: np.ndarray, candidates: np.ndarray,
                        counts: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [Q, k] nearest candidates, -1 pads; float32 scores) of each query item by side information: cosine of
    the items' one-hot attribute codes (a bag column's values weigh 1/n each), only candidates sharing ≥ 1 value;
    ties broken by more `counts`, then the lower index."""
    n, n_cols, width = codes.shape
    if n_cols == 0 or len(query) == 0 or len(candidates) == 0:
        return np.full((len(query), k), -1, np.int64), np.zeros((len(query), k), np.float32)
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    filled = codes >= 0
    nfill = np.maximum(filled.sum(2, keepdims=True), 1)
    w = np.where(filled, 1.0 / nfill, 0.0)
    rows = np.broadcast_to(np.arange(n)[:, None, None], codes.shape)[filled]
    cols = (codes + offs[None, :, None])[filled]
    x = sp.csr_matrix((w[filled], (rows, cols)), shape=(n, int(np.sum(sizes))))
    norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = sp.diags(1.0 / np.maximum(norm, 1e-12)) @ x
    xc = x[candidates].T.tocsc()
    tie = np.argsort(np.lexsort((candidates, -np.asarray(counts)[candidates])))  # rank of each candidate
    out = np.full((len(query), k), -1, np.int64)
    score = np.zeros((len(query), k), np.float32)
    kk = min(k, len(candidates))
    for a in range(0, len(query), chunk):
        s = (x[query[a:a + chunk]] @ xc).toarray()
        key = s - 1e-9 * tie[None, :] / len(candidates)  # equal similarity: the better tie rank first
        top = np.argpartition(-key, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(key, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)
        sc = np.take_along_axis(s, top, 1)
        ok = sc > 1e-9
        out[a:a + chunk, :kk] = np.where(ok, candidates[top], -1)
        score[a:a + chunk, :kk] = np.where(ok, sc, 0.0)
    return out, score
