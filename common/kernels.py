"""Compiled (numba) inner loops of candidate aggregation and the merge.

On the request path these run once per channel and once per request over a few thousand candidates; as
chains of numpy calls they cost ≈40 small-array operations each (most of it call overhead). Each kernel
here does the same arithmetic in one pass: float64 sums in input order, float32 results, ties broken by
ascending item id. `common.retrieval` and `common.merge` are the public entry points.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

_NOPYTHON = dict(cache=True, nogil=True, boundscheck=False)


@njit(**_NOPYTHON)
def _sorted_member(sorted_arr, x):
    """True when x is in the ascending array `sorted_arr`."""
    pos = np.searchsorted(sorted_arr, x)
    return pos < len(sorted_arr) and sorted_arr[pos] == x


@njit(**_NOPYTHON)
def _top_desc(neg, ids, k):
    """Positions of the k best entries by (-neg asc, i.e. key desc; then id asc). `neg` holds −key."""
    m = len(neg)
    k = min(k, m)
    if k <= 0:
        return np.empty(0, np.int64)
    cand = np.arange(m)
    if m > 2 * k:  # only entries at least as good as the k-th can be in the answer (ties included)
        kth = np.partition(neg.copy(), k - 1)[k - 1]
        c = 0
        for i in range(m):
            if neg[i] <= kth:
                cand[c] = i
                c += 1
        cand = cand[:c]
    sub = np.empty(len(cand), np.float64)
    for i in range(len(cand)):
        sub[i] = neg[cand[i]]
    order = cand[np.argsort(sub)]
    i = 0
    while i < k:  # order runs of equal keys by id (argsort is not stable)
        j = i + 1
        while j < len(order) and neg[order[j]] == neg[order[i]]:
            j += 1
        if j - i > 1:
            run = order[i:j].copy()
            run_ids = np.empty(len(run), np.int64)
            for r in range(len(run)):
                run_ids[r] = ids[run[r]]
            order[i:j] = run[np.argsort(run_ids)]
        i = j
    return order[:k]


@njit(**_NOPYTHON)
def _group(ids, values, exclude, slots):
    """Distinct ids ≥ 0 not in `exclude`, in first-seen order, with their float64 sums in input order;
    `group[j]` is the row of ids[j] (−1 when dropped). `slots` (all zero, longer than every id) is scratch
    and is left all zero."""
    n = len(ids)
    size = len(slots)
    for x in exclude:
        if 0 <= x < size:
            slots[x] = -1
    uniq = np.empty(n, np.int64)
    total = np.zeros(n, np.float64)
    group = np.empty(n, np.int64)
    m = 0
    for j in range(n):
        x = ids[j]
        if x < 0:
            group[j] = -1
            continue
        g = slots[x]
        if g < 0:  # excluded
            group[j] = -1
            continue
        if g == 0:
            m += 1
            g = slots[x] = m
            uniq[m - 1] = x
        group[j] = g - 1
        total[g - 1] += np.float64(values[j])
    for g in range(m):
        slots[uniq[g]] = 0
    for x in exclude:
        if 0 <= x < size:
            slots[x] = 0
    return uniq[:m], total[:m], group


@njit(**_NOPYTHON)
def aggregate_kernel(ids, scores, lens, weights, exclude, k, slots):
    """Σ_a weight_a · score over consecutive lists (list a: the next lens[a] entries), ids < 0 ignored,
    `exclude` (any order) removed, top-k by (sum desc, id asc). Returns (ids int64, sums float32)."""
    n = len(ids)
    values = np.empty(n, np.float32)
    j = 0
    for a in range(len(lens)):
        w = np.float32(weights[a])
        for _ in range(lens[a]):
            values[j] = np.float32(scores[j]) * w
            j += 1
    uniq, total, _ = _group(ids, values, exclude, slots)
    m = len(uniq)
    total32 = np.empty(m, np.float32)
    neg = np.empty(m, np.float64)
    for g in range(m):
        total32[g] = np.float32(total[g])
        neg[g] = -np.float64(total32[g])
    top = _top_desc(neg, uniq, k)
    return uniq[top], total32[top]


@njit(**_NOPYTHON)
def top_k_kernel(ids, scores, exclude, k):
    """The k best (id, score) pairs by (score desc, id asc), `exclude` (ascending) ids removed."""
    n = len(ids)
    keep = np.empty(n, np.int64)
    m = 0
    for j in range(n):
        if len(exclude) and _sorted_member(exclude, ids[j]):
            continue
        keep[m] = j
        m += 1
    sub_ids = ids[keep[:m]]
    sub_scores = scores[keep[:m]]
    neg = np.empty(m, np.float64)
    for j in range(m):
        neg[j] = -np.float64(sub_scores[j])
    top = _top_desc(neg, sub_ids, k)
    return sub_ids[top].astype(np.int64), sub_scores[top].astype(np.float32)


@njit(**_NOPYTHON)
def filter_kernel(ids, scores, exclude, n_known, k):
    """Keep order; drop ids outside [0, n_known) and those in `exclude` (ascending); at most k."""
    size = min(len(ids), k)
    out_i = np.empty(size, np.int64)
    out_s = np.empty(size, np.float32)
    m = 0
    for j in range(len(ids)):
        if m >= k:
            break
        x = ids[j]
        if x < 0 or x >= n_known or (len(exclude) and _sorted_member(exclude, x)):
            continue
        out_i[m] = x
        out_s[m] = scores[j]
        m += 1
    return out_i[:m], out_s[:m]


@njit(**_NOPYTHON)
def merge_kernel(ids, scores, bounds, weights, quotas, rank_norm, rank_offset, exclude, k, quota_bonus, slots):
    """The merge of `common.merge.merge` over concatenated channel outputs.

    Channel c owns ids[bounds[c]:bounds[c+1]] (best first). Each candidate contributes
    weight_c · normalised score (rank: 1/(rank_offset + rank); else min-max within the channel); an item's key
    is its float64 sum plus `quota_bonus` when it is within some channel's quota. Returns (ids, sums float32,
    ranks int32 [n, channels]) of the top k non-excluded items by (key desc, id asc)."""
    n_ch = len(bounds) - 1
    n = len(ids)
    contrib = np.empty(n, np.float32)
    chan = np.empty(n, np.int64)
    rank = np.empty(n, np.int64)
    for c in range(n_ch):
        a, b = bounds[c], bounds[c + 1]
        if b <= a:
            continue
        w = np.float32(weights[c])
        if rank_norm:
            for j in range(a, b):
                contrib[j] = np.float32(1.0 / (rank_offset + np.float64(j - a + 1))) * w
        else:
            lo = scores[a]
            hi = scores[a]
            for j in range(a, b):
                lo = min(lo, scores[j])
                hi = max(hi, scores[j])
            span = np.float64(hi) - np.float64(lo)
            if span < 1e-12:
                for j in range(a, b):
                    contrib[j] = np.float32(1.0) * w
            else:
                span32 = np.float32(span)
                for j in range(a, b):
                    contrib[j] = np.float32(np.float32(scores[j] - lo) / span32) * w
        for j in range(a, b):
            chan[j] = c
            rank[j] = j - a + 1
    uniq, total, group = _group(ids, contrib, exclude, slots)
    m = len(uniq)
    in_quota = np.zeros(m, np.bool_)
    for j in range(n):
        if group[j] >= 0 and rank[j] <= quotas[chan[j]]:
            in_quota[group[j]] = True
    neg = np.empty(m, np.float64)
    for g in range(m):
        neg[g] = -(total[g] + (quota_bonus if in_quota[g] else 0.0))
    top = _top_desc(neg, uniq, k)
    t = len(top)
    out_row = np.full(m, -1, np.int64)  # group → row of the answer
    out_ids = np.empty(t, np.int64)
    out_scores = np.empty(t, np.float32)
    for r in range(t):
        g = top[r]
        out_row[g] = r
        out_ids[r] = uniq[g]
        out_scores[r] = np.float32(total[g])
    ranks = np.zeros((t, n_ch), np.int32)
    for j in range(n):
        if group[j] >= 0 and out_row[group[j]] >= 0:
            ranks[out_row[group[j]], chan[j]] = rank[j]
    return out_ids, out_scores, ranks


_local = threading.local()


@njit(**_NOPYTHON)
def _put_uint(out, p, v):
    """Write the decimal digits of v ≥ 0 at out[p:]; returns the new position."""
    n = 1
    t = v
    while t >= 10:
        t //= 10
        n += 1
    for d in range(n - 1, -1, -1):
        out[p + d] = 48 + v % 10
        v //= 10
    return p + n


@njit(**_NOPYTHON)
def items_json_kernel(ids, scores, frags, offsets):
    """The JSON array `[{"item_id": ..., "score": s}, ...]`: item i's bytes up to the score are
    frags[offsets[i]:offsets[i+1]]; each score is written rounded to 6 decimals, trailing zeros dropped.
    Returns an empty array when a score cannot be written so (non-finite or ≥ 1e12): the caller falls back."""
    total = 2
    for j in range(len(ids)):
        total += offsets[ids[j] + 1] - offsets[ids[j]] + 24
    out = np.empty(total, np.uint8)
    out[0] = 91  # [
    p = 1
    for j in range(len(ids)):
        if j:
            out[p] = 44  # ,
            p += 1
        i = ids[j]
        for b in range(offsets[i], offsets[i + 1]):
            out[p] = frags[b]
            p += 1
        s = np.float64(scores[j])
        if not np.isfinite(s) or abs(s) >= 1e12:
            return np.empty(0, np.uint8)
        if s < 0:
            v = np.int64(np.round(-s * 1e6))
            if v:
                out[p] = 45  # -
                p += 1
        else:
            v = np.int64(np.round(s * 1e6))
        p = _put_uint(out, p, v // 1000000)
        frac = v % 1000000
        if frac:
            out[p] = 46  # .
            p += 1
            width = 6
            while frac % 10 == 0:
                frac //= 10
                width -= 1
            for d in range(width - 1, -1, -1):
                out[p + d] = 48 + frac % 10
                frac //= 10
            p += width
        out[p] = 125  # }
        p += 1
    out[p] = 93  # ]
    return out[:p + 1]


def scratch(max_id: int) -> np.ndarray:
    """This thread's all-zero int64 scratch array with room for ids up to `max_id` (the kernels restore it)."""
    s = getattr(_local, "slots", None)
    if s is None or len(s) <= max_id:
        s = _local.slots = np.zeros(max(int(max_id) + 1, 2 * (0 if s is None else len(s)), 1024), np.int64)
    return s


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, not on a request."""
    i64, f32, i32 = np.array([2, 1, 1], np.int64), np.array([0.5, 0.25, 0.25], np.float32), np.empty(0, np.int64)
    aggregate_kernel(i64, f32, np.array([1, 2], np.int64), np.ones(2, np.float32), i32, 2, scratch(2))
    top_k_kernel(i64, f32, i32, 2)
    filter_kernel(i64, f32, i32, 3, 2)
    items_json_kernel(i64[:1] - 1, f32[:1], np.frombuffer(b"{}", np.uint8), np.array([0, 1, 2], np.int64))
    for rank_norm in (True, False):
        merge_kernel(i64, f32, np.array([0, 1, 3], np.int64), np.ones(2, np.float64), np.ones(2, np.int64),
                     rank_norm, 20.0, i32, 2, 1e6, scratch(2))
