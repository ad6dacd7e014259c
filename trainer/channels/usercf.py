"""UserCF: user–user similarity with a hot-item penalty, activity normalisation and an optional
same-region boost (see docs/channels.md for the formula)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from trainer.channels.base import Artifacts, Channel, NeighborArtifact
from trainer.channels.cf_kernels import usercf_rows
from trainer.channels.neighbors import capped_histories, sparse_top_k
from trainer.data.train_data import TrainData

# Upper bound on the products of one chunk of users (Σ over its users' items of the users kept per item): chunks
# pace the progress bar and are the Ray engine's tasks; the compiled rows need O(users) memory whatever the chunk.
CHUNK_BUDGET = 1 << 23


def user_regions(data: TrainData) -> np.ndarray:
    """Region code per user (-1 unknown): users table column 'region', else the user's most frequent
    interaction context region (ties: the lexicographically smallest)."""
    if data.user_attrs is not None and "region" in data.user_attrs.columns:
        col = data.user_attrs["region"].astype("string")
        codes, _ = pd.factorize(col, sort=True)
        return codes.astype(np.int64)
    out = np.full(data.n_users, -1, np.int64)
    if "region" in data.context and len(data.user_idx):
        df = pd.DataFrame({"u": data.user_idx, "r": data.context["region"]})
        df = df[df["r"].notna() & (df["r"] != "") & (df["r"] != "nan")]
        counts = df.groupby(["u", "r"]).size().rename("n").reset_index()
        counts = counts.sort_values(["u", "n", "r"], ascending=[True, False, True], kind="stable")
        top = counts.drop_duplicates("u")
        codes, _ = pd.factorize(top["r"], sort=True)
        out[top["u"].to_numpy()] = codes
    return out


class UserCFParams(BaseModel):
    """UserCF hyper-parameters; the defaults were tuned on the ml-100k validation split."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(100, ge=1, le=5000, description="neighbours kept per user")
    item_penalty: bool = Field(True, description="weight each shared item by 1/log(1+|N(i)|)")
    normalization: Literal["power", "cosine"] = Field(
        "power", description="power: |N(u)|^beta·|N(v)|^(1-beta); cosine: sqrt(P(u)·P(v)), P = Σ item weights")
    beta: float = Field(0.9, ge=0, le=1, description="activity exponent of the 'power' normalisation")
    max_history: int | None = Field(20, ge=1, description="only each user's last max_history items (None: all)")
    region_weight: float = Field(1.0, ge=0, description="multiplier for same-region user pairs; 1 = off")
    max_item_users: int | None = Field(200, ge=1, description="neighbour candidates through one item: only its "
                                       "max_item_users most recent users (bounds the cost of popular items, linear "
                                       "in users; None: all; docs/channels.md)")


class UserCF(Channel):
    """User–user collaborative filtering (u2u neighbour lists)."""

    model = "usercf"
    kinds = ("u2u",)
    Params = UserCFParams
    renamed = {"k": "top_k"}

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: UserCFParams = self.params
        prep = prepare(data, p)
        ids = np.full((data.n_users, p.top_k), -1, np.int32)
        scores = np.zeros((data.n_users, p.top_k), np.float32)
        nnz = 0
        for start, stop in tqdm(chunk_bounds(prep), desc="usercf similarity", disable=not progress, leave=False):
            ids[start:stop], scores[start:stop], n = similarity_rows(prep, start, stop)
            nnz += n
        self.stats = {"interactions_used": prep.interactions_used, "nnz": int(nnz)}
        self._artifacts = {"u2u": NeighborArtifact(ids, scores)}

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if self._artifacts is None:
            self.fit(data)
        return self._artifacts


# -- the computation in chunks of users: the local fit loops over them, the Ray engine runs them as tasks
# (trainer/engine/ray_cooccurrence.py); a user's row depends on nothing else, so the lists are identical.

@dataclass
class UserCFInputs:
    """What every chunk of users needs: the capped user × item matrix, its weighted transpose, the norms."""

    params: UserCFParams
    x: sp.csr_matrix  # users × items, capped histories
    xt_w: sp.csr_matrix  # items × users, weighted by the item penalty
    row_norm: np.ndarray
    col_norm: np.ndarray
    region: np.ndarray | None
    work: np.ndarray  # cumulative Σ_{i∈N(u)} |N(i)| over users (≥ a chunk result's non-zeros)
    interactions_used: int


def prepare(data: TrainData, p: UserCFParams) -> UserCFInputs:
    """The capped histories as matrices, and what the similarity of any chunk of users needs. The item side (`xt_w`)
    keeps each item's `max_item_users` most recent users (latest click on it first, then the smaller user index)."""
    items, ts, uid, _, lengths = capped_histories(data, p.max_history)
    n_users, n_items = data.n_users, data.n_items
    item_counts = np.bincount(items, minlength=n_items)
    item_w = 1.0 / np.log1p(np.maximum(item_counts, 1)) if p.item_penalty else np.ones(n_items)
    x = sp.csr_matrix((np.ones(len(items)), (uid, items)), shape=(n_users, n_items))
    x.sum_duplicates()
    cap = p.max_item_users
    if cap is not None and len(items) and int(item_counts.max()) > cap:
        order = np.lexsort((uid, -ts, items))  # by item, most recent first, then user
        first = np.searchsorted(items[order], items[order], side="left")
        keep = order[np.arange(len(order)) - first < cap]
        sample = sp.csr_matrix((np.ones(len(keep)), (uid[keep], items[keep])), shape=(n_users, n_items))
        sample.sum_duplicates()
        col_counts = np.minimum(item_counts, cap)
    else:
        sample, col_counts = x, item_counts
    xt_w = (sample @ sp.diags(item_w)).T.tocsr()  # items × users, weighted
    xt_w.sort_indices()
    if p.normalization == "power":
        row_norm = lengths.astype(np.float64) ** p.beta
        col_norm = lengths.astype(np.float64) ** (1.0 - p.beta)
    else:
        mass = np.asarray(x @ item_w).ravel()
        row_norm = col_norm = np.sqrt(mass)
    region = user_regions(data) if p.region_weight != 1.0 else None
    work = np.cumsum(np.asarray(x @ col_counts.astype(np.float64)).ravel())
    return UserCFInputs(p, x, xt_w, row_norm, col_norm, region, work, int(len(items)))


def chunk_bounds(prep: UserCFInputs) -> list[tuple[int, int]]:
    """Chunks of users whose products Σ_{i∈N(u)} |N(i)| (≥ the chunk result's non-zeros) fit CHUNK_BUDGET."""
    work, n_users = prep.work, prep.x.shape[0]
    bounds = [0]
    while bounds[-1] < n_users:
        start = bounds[-1]
        done = work[start - 1] if start else 0.0
        stop = int(np.searchsorted(work, done + CHUNK_BUDGET, side="right"))
        bounds.append(min(n_users, max(stop, start + 1)))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def similarity_rows(prep: UserCFInputs, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k neighbours of users [start, stop): (ids, scores, non-zeros of their similarity rows). Compiled
    (trainer/channels/cf_kernels.py): the same lists as `similarity_rows_scipy`, without sorting every non-zero."""
    p = prep.params
    x, t = prep.x, prep.xt_w
    region = prep.region if prep.region is not None else np.zeros(0, np.int64)
    ids, scores, nnz = usercf_rows(x.indptr, x.indices, x.data, t.indptr, t.indices, t.data,
                                   np.ascontiguousarray(prep.row_norm, np.float64),
                                   np.ascontiguousarray(prep.col_norm, np.float64), region.astype(np.int64),
                                   float(p.region_weight), int(start), int(stop), int(p.top_k))
    return ids, scores, int(nnz)


def similarity_rows_scipy(prep: UserCFInputs, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`similarity_rows` as a scipy sparse product and a sort of its non-zeros (the reference the kernel matches)."""
    p = prep.params
    s = (prep.x[start:stop] @ prep.xt_w).tocsr()
    s.sum_duplicates()
    rows = np.repeat(np.arange(start, stop), np.diff(s.indptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        s.data /= prep.row_norm[rows] * prep.col_norm[s.indices]
    if prep.region is not None:
        same = (prep.region[rows] == prep.region[s.indices]) & (prep.region[rows] >= 0)
        s.data[same] *= p.region_weight
    ids, scores = sparse_top_k(s, p.top_k, self_offset=start)
    return ids, scores, int(s.nnz)
