"""ItemCF: item–item co-occurrence similarity with user-activity, popularity, position, time, order and
category weights (see docs/channels.md for the formula).

With every extra weight switched off it is exactly the reference ItemCF of PROTOCOL.md:
w_ij = Σ_{u∈N(i)∩N(j)} 1/log(1+|N(u)|) / (|N(i)|^(1−α)·|N(j)|^α).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from trainer.channels.base import Artifacts, Channel, NeighborArtifact
from trainer.channels.neighbors import capped_histories, sparse_top_k
from trainer.data.train_data import TrainData

# Entries buffered before they are summed into the co-occurrence matrix (bounds memory of the pair loop).
PAIR_BUFFER = 1 << 23
# Catalogs up to this size accumulate pair weights in a dense n×n float64 array (≤ 128 MB).
DENSE_MAX_ITEMS = 4096


class ItemCFParams(BaseModel):
    """ItemCF hyper-parameters; the defaults were tuned on the ml-100k validation split."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(200, ge=1, le=5000, description="neighbours kept per item")
    alpha: float = Field(0.5, ge=0, le=1, description="hot-item exponent: norm |N(i)|^(1-alpha)·|N(j)|^alpha")
    user_penalty: bool = Field(True, description="weight each user's pairs by 1/log(1+|N(u)|)")
    max_history: int | None = Field(200, ge=2, description="only each user's last max_history items (None: all)")
    window: int | None = Field(30, ge=1, description="only pairs at most this many positions apart (None: all)")
    position_decay: float = Field(0.9, gt=0, le=1, description="pair weight decay**(|pos_i-pos_j|-1); 1 = off")
    time_decay_s: float | None = Field(None, gt=0, description="pair weight exp(-|t_i-t_j|/time_decay_s); None = off")
    forward_weight: float = Field(1.0, ge=0, description="weight of (i, j) when j was clicked after i")
    backward_weight: float = Field(0.7, ge=0, description="weight of (i, j) when j was clicked before i")
    category_weight: float = Field(1.2, ge=0, description="multiplier for same-category pairs; 1 = off")


class ItemCF(Channel):
    """Item–item collaborative filtering (i2i neighbour lists)."""

    model = "itemcf"
    kinds = ("i2i",)
    Params = ItemCFParams
    renamed = {"k": "top_k"}

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: ItemCFParams = self.params
        prep = prepare(data, p)
        n = data.n_items
        if prep.plain:
            co, co_t = product_rows(prep, 0, n), None
        else:
            # forward pairs (i earlier, j later); the backward ones are its transpose, added row block by row block
            co = pair_rows(prep, 0, n, progress=progress)
            co_t = co.T.tocsr()
        nb = np.full((n, p.top_k), -1, np.int32)
        sc = np.zeros((n, p.top_k), np.float32)
        nnz = 0
        # the symmetric sum, the scores and the top-k one block of rows at a time: one copy of the co-occurrence
        # at a time besides `co` and its transpose, not the four of the whole-matrix expression (peak memory)
        for lo, hi in tqdm(row_blocks(co.indptr), desc="itemcf top-k", disable=not progress, leave=False):
            if co_t is None:
                blk = co[lo:hi]
            else:
                blk = (p.forward_weight * co[lo:hi] + p.backward_weight * co_t[lo:hi]).tocsr()
                blk.eliminate_zeros()
            blk = score_rows(blk, lo, prep)
            nnz += blk.nnz
            nb[lo:hi], sc[lo:hi] = sparse_top_k(blk, p.top_k, self_offset=lo)
        self.n_pairs = prep.n_pairs
        self.stats = {"interactions_used": int(len(prep.items)), "pairs": int(self.n_pairs), "nnz": int(nnz)}
        self._artifacts = {"i2i": NeighborArtifact(nb, sc)}

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if self._artifacts is None:
            self.fit(data)
        return self._artifacts


# -- the computation in row blocks: the local fit runs one block of every item, the Ray engine one task per block
# (trainer/engine/ray_cooccurrence.py); a row's arithmetic is the same either way, so the lists are identical.

@dataclass
class ItemCFInputs:
    """What every row block needs: the capped histories as positions, their weights and offsets, the flush plan."""

    params: ItemCFParams
    n_items: int
    n_users: int
    items: np.ndarray  # int64 per position (user-major, time order)
    ts: np.ndarray
    uid: np.ndarray
    pos_w: np.ndarray  # float64: the position's user weight
    remaining: np.ndarray  # int64: later positions in the same capped history
    max_d: int  # largest offset paired
    plain: bool  # all pairs with symmetric weights: one sparse product instead of the offset loop
    flush_after: frozenset[int]  # offsets after which the pair buffer is summed (bounds memory, fixes the sum order)
    counts: np.ndarray  # float64 interactions per item (capped)
    category: np.ndarray | None  # primary category per item when the category weight is on
    n_pairs: int


def prepare(data: TrainData, p: ItemCFParams) -> ItemCFInputs:
    """The capped histories and everything the row blocks share."""
    items, ts, uid, pos, lengths = capped_histories(data, p.max_history)
    n = data.n_items
    user_w = 1.0 / np.log1p(np.maximum(lengths, 1)) if p.user_penalty else np.ones(len(lengths))
    cat = data.item_category[0] if p.category_weight != 1.0 else None
    longest = int(lengths.max()) if len(lengths) else 0
    plain = (p.position_decay == 1.0 and p.time_decay_s is None and p.forward_weight == p.backward_weight
             and (p.window is None or p.window >= longest - 1))
    remaining = lengths[uid] - pos - 1
    max_d = int(remaining.max()) if len(remaining) else 0
    if p.window is not None:
        max_d = min(max_d, p.window)
    # pairs per offset d (positions with at least d later ones), and where the buffer of the pair loop flushes
    per_d = np.cumsum(np.bincount(remaining[remaining >= 1], minlength=max_d + 1)[::-1])[::-1][1:max_d + 1] \
        if max_d >= 1 else np.zeros(0, np.int64)
    flush_after: set[int] = set()
    buffered = 0
    for d, m in enumerate(per_d.tolist(), start=1):
        buffered += m
        if buffered >= PAIR_BUFFER:
            flush_after.add(d)
            buffered = 0
    if plain:
        ln = np.bincount(uid, minlength=data.n_users)
        n_pairs = int((ln * (ln - 1)).sum())
    else:
        n_pairs = int(2 * per_d.sum())
    return ItemCFInputs(p, n, data.n_users, items, ts, uid, user_w[uid], remaining, max_d, plain,
                        frozenset(flush_after), np.bincount(items, minlength=n).astype(np.float64), cat, n_pairs)


def row_blocks(indptr: np.ndarray, budget: int = PAIR_BUFFER) -> list[tuple[int, int]]:
    """Consecutive row ranges of a CSR matrix holding about `budget` non-zeros each (at least one row)."""
    n = len(indptr) - 1
    bounds = [0]
    while bounds[-1] < n:
        start = bounds[-1]
        stop = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        bounds.append(min(n, max(stop, start + 1)))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def product_rows(prep: ItemCFInputs, lo: int, hi: int) -> sp.csr_matrix:
    """Rows [lo, hi) of the symmetric co-occurrence Xᵀ·diag(w_u)·X (diagonal dropped), times the order weight; each
    cell sums its users in ascending order, as the full product does."""
    x = sp.csr_matrix((np.ones(len(prep.items)), (prep.uid, prep.items)), shape=(prep.n_users, prep.n_items))
    user_w = np.zeros(prep.n_users)
    user_w[prep.uid] = prep.pos_w
    if lo == 0 and hi == prep.n_items:
        co = (x.T @ sp.diags(user_w) @ x).tocsr()
    else:
        left = (x.T.tocsr()[lo:hi] @ sp.diags(user_w)).tocsr()
        left.sort_indices()
        co = (left @ x).tocsr()
    co.setdiag(0, k=lo)  # row r is item lo + r
    co.eliminate_zeros()
    co.data *= prep.params.forward_weight
    return co


def pair_rows(prep: ItemCFInputs, lo: int, hi: int, progress: bool = False) -> sp.csr_matrix:
    """Rows [lo, hi) of the forward co-occurrence: Σ of pair weights (seq[p], seq[p+d]) whose first item is in the
    block, for each offset d, vectorised over all users; buffered pairs are summed at the offsets of the flush plan,
    so every cell adds the same terms in the same order whatever the block."""
    p = prep.params
    n_items, n_rows = prep.n_items, hi - lo
    items, ts, pos_w, remaining = prep.items, prep.ts, prep.pos_w, prep.remaining
    # small catalogs: a dense accumulator summed with bincount (scipy's coo→csr sorting dominates otherwise)
    use_dense = n_items <= DENSE_MAX_ITEMS
    dense: np.ndarray | None = None
    co = sp.csr_matrix((n_rows, n_items), dtype=np.float64)
    buf_r: list[np.ndarray] = []
    buf_c: list[np.ndarray] = []
    buf_v: list[np.ndarray] = []

    def flush() -> sp.csr_matrix:
        nonlocal dense
        if not buf_r:
            return co
        r, c, v = np.concatenate(buf_r), np.concatenate(buf_c), np.concatenate(buf_v)
        buf_r.clear(), buf_c.clear(), buf_v.clear()
        if use_dense:
            summed = np.bincount(r * n_items + c, weights=v, minlength=n_rows * n_items)
            if dense is None:
                dense = summed
            else:
                dense += summed
            return co
        return co + sp.coo_matrix((v, (r, c)), shape=(n_rows, n_items)).tocsr()

    active = np.flatnonzero(remaining >= 1)
    if lo > 0 or hi < n_items:
        active = active[(items[active] >= lo) & (items[active] < hi)]
    for d in tqdm(range(1, prep.max_d + 1), desc="itemcf pairs", disable=not progress, leave=False):
        active = active[remaining[active] >= d]
        a, b = active, active + d
        i, j = items[a] - lo, items[b]
        w = pos_w[a] * p.position_decay ** (d - 1)
        if p.time_decay_s is not None:
            w = w * np.exp(-np.abs(ts[b] - ts[a]).astype(np.float64) / p.time_decay_s)
        buf_r.append(i), buf_c.append(j), buf_v.append(w)
        if d in prep.flush_after:
            co = flush()
    co = flush()
    if dense is not None:
        co = sp.csr_matrix(dense.reshape(n_rows, n_items))
    return co


def score_rows(co: sp.csr_matrix, lo: int, prep: ItemCFInputs) -> sp.csr_matrix:
    """Rows [lo, lo + co.shape[0]) of the co-occurrence → similarities: same-category boost, then the hot-item
    normalisation |N(i)|^(1−α)·|N(j)|^α."""
    p = prep.params
    co = co.tocsr()
    co.sum_duplicates()
    rows = np.repeat(np.arange(lo, lo + co.shape[0]), np.diff(co.indptr))
    cat = prep.category
    if cat is not None:
        same = (cat[rows] == cat[co.indices]) & (cat[rows] >= 0)
        co.data[same] *= p.category_weight
    counts = prep.counts
    with np.errstate(divide="ignore"):
        co.data /= counts[rows] ** (1.0 - p.alpha) * counts[co.indices] ** p.alpha
    return co
