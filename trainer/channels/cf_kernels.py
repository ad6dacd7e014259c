"""Compiled (numba) inner loops of the co-occurrence channels: UserCF's similarity rows with their top-k.

One user row at a time, with a dense accumulator over users and the list of the columns it touched (Gustavson's
sparse product), then a partial selection of the k best: the cost is the row's products, never a sort of every
non-zero of a chunk. Sums run in the order scipy's `csr_matmat` adds them (the row's items in stored order, each
item's users in stored order), in float64, so the scores and lists equal those of the sparse-product path
(`usercf.similarity_rows_scipy`) bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_NOPYTHON = dict(cache=True, nogil=True, boundscheck=False)


@njit(**_NOPYTHON)
def usercf_rows(x_ptr, x_idx, x_val, t_ptr, t_idx, t_val, row_norm, col_norm, region, region_weight,
                start, stop, k):  # pragma: no cover - compiled
    """Top-k neighbours of users [start, stop) of S = X·Xᵀw / (row_norm[u]·col_norm[v]) (same-region pairs × the
    region weight when `region` is non-empty): (int32 ids, float32 scores) [stop-start, k] (-1/0 padded; scores
    compared as float32, ties by ascending user, only positive scores, the user itself left out), and the
    non-zeros of the rows before selection."""
    n_cols = len(col_norm)
    n_rows = stop - start
    ids = np.full((n_rows, k), -1, np.int32)
    scores = np.zeros((n_rows, k), np.float32)
    acc = np.zeros(n_cols, np.float64)
    seen = np.zeros(n_cols, np.bool_)
    touched = np.empty(n_cols, np.int64)
    keys = np.empty(n_cols, np.uint64)
    fbuf = np.zeros(1, np.float32)
    ubuf = fbuf.view(np.uint32)
    kept = np.zeros(n_cols, np.float32)  # the float32 score of each kept column of the current row
    use_region = len(region) > 0
    nnz = 0
    for r in range(n_rows):
        u = start + r
        m = 0
        for jj in range(x_ptr[u], x_ptr[u + 1]):
            item = x_idx[jj]
            xv = x_val[jj]
            for kk in range(t_ptr[item], t_ptr[item + 1]):
                v = t_idx[kk]
                if not seen[v]:
                    seen[v] = True
                    touched[m] = v
                    m += 1
                acc[v] += xv * t_val[kk]
        nnz += m
        n_keep = 0
        for q in range(m):
            v = touched[q]
            s = acc[v]
            acc[v] = 0.0
            seen[v] = False
            if s == 0.0 or v == u:
                continue
            s = s / (row_norm[u] * col_norm[v])
            if use_region and region[u] == region[v] and region[u] >= 0:
                s *= region_weight
            f = np.float32(s)
            if not f > 0:
                continue
            # one key: descending float32 score (positive float bits are monotonic), then ascending user
            fbuf[0] = f
            kept[v] = f
            keys[n_keep] = ((np.uint64(0xFFFFFFFF) - np.uint64(ubuf[0])) << np.uint64(32)) | np.uint64(v)
            n_keep += 1
        if n_keep == 0:
            continue
        kk_ = min(k, n_keep)
        sel = keys[:n_keep]
        if n_keep > kk_:
            sel = np.partition(sel, kk_ - 1)[:kk_]
        sel = np.sort(sel)
        for q in range(kk_):
            v = np.int64(sel[q] & np.uint64(0xFFFFFFFF))
            ids[r, q] = v
            scores[r, q] = kept[v]
    return ids, scores, nnz
