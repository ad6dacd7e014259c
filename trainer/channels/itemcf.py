"""ItemCF: item–item co-occurrence similarity with user-activity, popularity, position, time, order and
category weights (see docs/channels.md for the formula).

With every extra weight switched off it is exactly the reference ItemCF of PROTOCOL.md:
w_ij = Σ_{u∈N(i)∩N(j)} 1/log(1+|N(u)|) / (|N(i)|^(1−α)·|N(j)|^α).
"""

from __future__ import annotations

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
        items, ts, uid, pos, lengths = capped_histories(data, p.max_history)
        n = data.n_items
        user_w = 1.0 / np.log1p(np.maximum(lengths, 1)) if p.user_penalty else np.ones(len(lengths))
        cat = data.item_category[0] if p.category_weight != 1.0 else None
        longest = int(lengths.max()) if len(lengths) else 0
        plain = (p.position_decay == 1.0 and p.time_decay_s is None and p.forward_weight == p.backward_weight
                 and (p.window is None or p.window >= longest - 1))
        if plain:
            co = self._cooccurrence_product(items, uid, user_w, n, data.n_users)
        else:
            co = self._cooccurrence_pairs(items, ts, uid, pos, lengths, user_w, n, progress)
        co = co.tocsr()
        co.sum_duplicates()
        rows = np.repeat(np.arange(n), np.diff(co.indptr))
        if cat is not None:
            same = (cat[rows] == cat[co.indices]) & (cat[rows] >= 0)
            co.data[same] *= p.category_weight
        counts = np.bincount(items, minlength=n).astype(np.float64)
        with np.errstate(divide="ignore"):
            co.data /= counts[rows] ** (1.0 - p.alpha) * counts[co.indices] ** p.alpha
        self.stats = {"interactions_used": int(len(items)), "pairs": int(self.n_pairs), "nnz": int(co.nnz)}
        nb, sc = sparse_top_k(co, p.top_k, progress=progress, desc="itemcf top-k")
        self._artifacts = {"i2i": NeighborArtifact(nb, sc)}

    def _cooccurrence_product(self, items, uid, user_w, n_items, n_users) -> sp.csr_matrix:
        """All pairs, symmetric weights: Xᵀ·diag(w_u)·X (minus the diagonal), times the order weight."""
        x = sp.csr_matrix((np.ones(len(items)), (uid, items)), shape=(n_users, n_items))
        co = (x.T @ sp.diags(user_w) @ x).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        co.data *= self.params.forward_weight
        lengths = np.bincount(uid, minlength=n_users)
        self.n_pairs = int((lengths * (lengths - 1)).sum())
        return co

    def _cooccurrence_pairs(self, items, ts, uid, pos, lengths, user_w, n_items, progress) -> sp.csr_matrix:
        """Pairs (seq[p], seq[p+d]) for each offset d, vectorised over all users, summed into a sparse matrix."""
        p: ItemCFParams = self.params
        remaining = lengths[uid] - pos - 1  # later items in the same (capped) history
        max_d = int(remaining.max()) if len(remaining) else 0
        if p.window is not None:
            max_d = min(max_d, p.window)
        # small catalogs: a dense accumulator summed with bincount (scipy's coo→csr sorting dominates otherwise)
        use_dense = n_items <= DENSE_MAX_ITEMS
        dense: np.ndarray | None = None
        co = sp.csr_matrix((n_items, n_items), dtype=np.float64)
        buf_r: list[np.ndarray] = []
        buf_c: list[np.ndarray] = []
        buf_v: list[np.ndarray] = []
        buffered = 0
        self.n_pairs = 0

        def flush() -> sp.csr_matrix:
            nonlocal buffered, dense
            if not buf_r:
                return co
            r, c, v = np.concatenate(buf_r), np.concatenate(buf_c), np.concatenate(buf_v)
            buf_r.clear(), buf_c.clear(), buf_v.clear()
            buffered = 0
            if use_dense:
                summed = np.bincount(r * n_items + c, weights=v, minlength=n_items * n_items)
                if dense is None:
                    dense = summed
                else:
                    dense += summed
                return co
            return co + sp.coo_matrix((v, (r, c)), shape=(n_items, n_items)).tocsr()

        pos_w = user_w[uid]  # each position's user weight
        active = np.flatnonzero(remaining >= 1)
        for d in tqdm(range(1, max_d + 1), desc="itemcf pairs", disable=not progress, leave=False):
            active = active[remaining[active] >= d]
            a, b = active, active + d
            i, j = items[a], items[b]
            w = pos_w[a] * p.position_decay ** (d - 1)
            if p.time_decay_s is not None:
                w = w * np.exp(-np.abs(ts[b] - ts[a]).astype(np.float64) / p.time_decay_s)
            buf_r.append(i), buf_c.append(j), buf_v.append(w)
            self.n_pairs += 2 * len(a)
            buffered += len(a)
            if buffered >= PAIR_BUFFER:
                co = flush()
        co = flush()
        if dense is not None:
            co = sp.csr_matrix(dense.reshape(n_items, n_items))
        # co holds forward pairs (i earlier, j later); the backward ones are its transpose
        co = (p.forward_weight * co + p.backward_weight * co.T).tocsr()
        co.eliminate_zeros()
        return co

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if self._artifacts is None:
            self.fit(data)
        return self._artifacts
