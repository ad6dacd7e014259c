"""Matrix factorisation: implicit-feedback ALS (implicit's solver) or FunkSVD with biases (torch SGD).

Emits u2i vectors (score = <user, item>) and i2i cosine neighbour lists built from the item factors
(EmbeddingChannel builds both from what `fit` sets). See docs/channels.md ("MF") for the objectives and the
tuned parameters. Between nightlies, ALS folds the new events in (`incremental_fit`, docs/event_log.md).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData
from trainer.nn.warm_start import BaseVersion, pack_checkpoint, read_checkpoint

log = logging.getLogger(__name__)

# Tuned on the ml-100k validation split (ALS) / the classic FunkSVD setting.
DEFAULT_REG = {"als": 40.0, "funksvd": 0.05}


def recency_weights(data: TrainData, halflife: float) -> np.ndarray:
    """Per interaction: 0.5 ** (position counted back from the user's latest interaction / halflife)."""
    lengths = np.diff(data.user_ptr)
    from_end = np.repeat(data.user_ptr[1:], lengths) - 1 - np.arange(len(data.user_idx))
    return np.power(0.5, from_end / halflife)


class MFParams(BaseModel):
    """MF hyper-parameters; ALS defaults were tuned on the ml-100k validation split (PROTOCOL.md)."""

    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["als", "funksvd"] = Field("als", description="implicit ALS or explicit FunkSVD with biases")
    dim: int = Field(64, ge=1, le=1024, description="latent dimensions")
    reg: float | None = Field(None, ge=0, description="L2 weight (ALS: λ; FunkSVD: on p_u, q_i per rating); "
                                                     "None = 40 for ALS, 0.05 for FunkSVD")
    epochs: int = Field(30, ge=1, le=1000, description="ALS sweeps / FunkSVD epochs")
    # ALS
    alpha: float = Field(1.0, gt=0, description="ALS: confidence = alpha · weight of each interaction")
    recency_boost: float = Field(32.0, ge=0, description="ALS: weight = 1 + boost · 0.5^(steps back from latest / halflife)")
    recency_halflife: float = Field(5.0, gt=0, description="ALS: half-life of the recency boost, in interactions")
    num_threads: int = Field(0, ge=0, le=256, description="ALS: OpenMP threads (0 = all cores); BLAS stays at 1")
    # FunkSVD
    lr: float = Field(0.01, gt=0, description="FunkSVD: SGD step (gradients summed over a mini-batch)")
    bias_reg: float = Field(0.02, ge=0, description="FunkSVD: L2 weight on b_u, b_i")
    batch_size: int = Field(1024, ge=1, description="FunkSVD: ratings per SGD step")
    init_std: float = Field(0.1, gt=0, description="FunkSVD: std of the initial factors")
    num_negatives: int | None = Field(None, ge=0, le=100,
                                      description="FunkSVD: unobserved items per rating, target `negative_rating`; "
                                                  "None = 0 with ratings, 4 without")
    negative_rating: float = Field(0.0, description="FunkSVD: target of sampled negatives")
    # output
    top_k: int = Field(200, ge=1, le=2000, description="neighbours kept per item in the i2i lists")


class MF(EmbeddingChannel):
    """Implicit ALS (default) or FunkSVD; emits u2i vectors and i2i cosine lists from the item factors."""

    model = "mf"
    kinds = ("u2i", "i2i")
    Params = MFParams
    renamed = {"factors": "dim", "regularization": "reg", "iterations": "epochs", "negatives": "num_negatives",
               "bias_regularization": "bias_reg", "i2i_k": "top_k"}

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: MFParams = self.params
        t0 = time.perf_counter()
        self.metrics: dict[str, float] = {}
        if p.algorithm == "als":
            self._fit_als(data, progress)
        else:
            self._fit_funksvd(data, progress)
        # items without training interactions get a zero vector (score 0) and no i2i list; nobody's neighbour
        self.trained_items = data.item_counts > 0
        self.item_vectors[~self.trained_items] = 0.0
        # i2i: cosine over the factors alone (FunkSVD's bias dimensions left out), trained items only
        self.i2i_vectors, self.valid_items = self.factor_item, self.trained_items
        self.metrics["fit_s"] = time.perf_counter() - t0
        self._artifacts = None
        log.info("mf[%s] fitted in %.2fs: %d users × %d items, %d factors", p.algorithm, self.metrics["fit_s"],
                 data.n_users, data.n_items, p.dim)

    def _confidence(self, data: TrainData) -> sp.csr_matrix:
        """users × items ALS confidence: alpha · (1 + recency boost) per interaction."""
        p: MFParams = self.params
        w = np.ones(len(data.user_idx), np.float64)
        if p.recency_boost > 0:
            w += p.recency_boost * recency_weights(data, p.recency_halflife)
        conf = sp.csr_matrix(((p.alpha * w).astype(np.float32), (data.user_idx, data.item_idx)),
                             shape=(data.n_users, data.n_items))
        conf.sum_duplicates()
        return conf

    def _als(self, iterations: int):  # noqa: ANN202 (implicit's class, imported lazily)
        from implicit.cpu.als import AlternatingLeastSquares

        p: MFParams = self.params
        reg = DEFAULT_REG["als"] if p.reg is None else p.reg
        return AlternatingLeastSquares(factors=p.dim, regularization=reg, alpha=1.0, iterations=iterations,
                                       num_threads=p.num_threads, random_state=self.seed)

    def _fit_als(self, data: TrainData, progress: bool) -> None:
        conf = self._confidence(data)
        # PROTOCOL.md: the library's own OpenMP loops use the cores, BLAS is limited to one thread
        with threadpool_limits(1, "blas"):
            als = self._als(self.params.epochs)
            als.fit(conf, show_progress=progress)
        self.factor_item = np.ascontiguousarray(als.item_factors, np.float32)
        self.item_vectors = self.factor_item.copy()
        self.user_vectors = np.ascontiguousarray(als.user_factors, np.float32)

    def _fit_funksvd(self, data: TrainData, progress: bool) -> None:
        p: MFParams = self.params
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        has_rating = data.rating is not None
        n_neg = p.num_negatives if p.num_negatives is not None else (0 if has_rating else 4)
        if not has_rating and n_neg == 0:
            raise ValueError("mf funksvd: the data has no 'rating' column and params.num_negatives is 0; "
                             "set params.num_negatives > 0 to learn from clicks vs sampled negatives")
        u_pos = data.user_idx.astype(np.int64)
        i_pos = data.item_idx.astype(np.int64)
        r_pos = data.rating.astype(np.float32) if has_rating else np.ones(len(u_pos), np.float32)
        mu = float(r_pos.mean()) if n_neg == 0 else float(
            (r_pos.sum() + n_neg * len(r_pos) * p.negative_rating) / (len(r_pos) * (1 + n_neg)))
        k = p.dim
        P = torch.randn(data.n_users, k, generator=gen) * p.init_std
        Q = torch.randn(data.n_items, k, generator=gen) * p.init_std
        bu = torch.zeros(data.n_users)
        bi = torch.zeros(data.n_items)
        reg = DEFAULT_REG["funksvd"] if p.reg is None else p.reg
        lr, breg = p.lr, p.bias_reg
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # index_add_ accumulation order is deterministic on one thread
        try:
            bar = tqdm(range(p.epochs), desc="mf funksvd", disable=not progress, leave=False)
            for _ in bar:
                if n_neg:
                    u_neg = np.repeat(u_pos, n_neg)
                    i_neg = rng.integers(0, data.n_items, len(u_neg))
                    u_all = np.concatenate([u_pos, u_neg])
                    i_all = np.concatenate([i_pos, i_neg])
                    r_all = np.concatenate([r_pos, np.full(len(u_neg), p.negative_rating, np.float32)])
                else:
                    u_all, i_all, r_all = u_pos, i_pos, r_pos
                order = rng.permutation(len(u_all))
                Us, Is, Rs = (torch.from_numpy(a[order]) for a in (u_all, i_all, r_all))
                sse = 0.0
                for s in range(0, len(order), p.batch_size):
                    u, i, r = Us[s:s + p.batch_size], Is[s:s + p.batch_size], Rs[s:s + p.batch_size]
                    pu, qi = P[u], Q[i]
                    err = r - (mu + bu[u] + bi[i] + (pu * qi).sum(1))
                    sse += float((err * err).sum())
                    # summed per-rating SGD steps (classic FunkSVD, one mini-batch at a time)
                    bu.index_add_(0, u, lr * (err - breg * bu[u]))
                    bi.index_add_(0, i, lr * (err - breg * bi[i]))
                    P.index_add_(0, u, lr * (err[:, None] * qi - reg * pu))
                    Q.index_add_(0, i, lr * (err[:, None] * pu - reg * qi))
                rmse = (sse / len(order)) ** 0.5
                bar.set_postfix(rmse=f"{rmse:.4f}")
        finally:
            torch.set_num_threads(threads)
        self.metrics["train_rmse"] = rmse
        self.mu, self.user_bias, self.item_bias = mu, bu.numpy().copy(), bi.numpy().copy()
        self.factor_item = Q.numpy().astype(np.float32)
        # <[p_u, 1, μ + b_u], [q_i, b_i, 1]> = μ + b_u + b_i + p_u·q_i, the predicted rating
        ones_u, ones_i = np.ones((data.n_users, 1), np.float32), np.ones((data.n_items, 1), np.float32)
        self.user_vectors = np.hstack([P.numpy(), ones_u, (mu + self.user_bias)[:, None]]).astype(np.float32)
        self.item_vectors = np.hstack([self.factor_item, self.item_bias[:, None], ones_i]).astype(np.float32)

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Model score of (user, item) pairs: the inner product of their vectors (FunkSVD: the rating)."""
        return np.einsum("ij,ij->i", self.user_vectors[users], self.item_vectors[items])

    # -- incremental updates between nightlies: the ALS fold-in (docs/event_log.md) -----------------------------
    def training_checkpoint(self) -> bytes | None:
        """ALS: the factors and which items had interactions (what a fold-in starts from); FunkSVD: none."""
        if self.params.algorithm != "als" or getattr(self, "factor_item", None) is None:
            return None
        return pack_checkpoint({"user_factors": torch.as_tensor(self.user_vectors),
                                "item_factors": torch.as_tensor(self.factor_item),
                                "trained_items": torch.as_tensor(self.trained_items)},
                               {"model": self.model, "n_users": int(len(self.user_vectors)),
                                "n_items": int(len(self.factor_item)), "params": self.params.model_dump()})

    def incremental_fit(self, data: TrainData, base: BaseVersion, rows: np.ndarray, progress: bool = False) -> dict:
        """Fold the interactions at `rows` into the published ALS factors, every other factor fixed: the users with
        new interactions are solved against the item factors, then the items without a factor yet (new, or never
        clicked before) against the user factors, then those users once more with the new items in place (three
        least-squares half-sweeps, implicit's partial_fit_users / partial_fit_items, on the whole rows with the
        current recency weights). Untouched users' and old items' factors stay bit for bit; only the solved users'
        vectors are recomputed. The i2i lists are rebuilt from the item factors (new items join them)."""
        from trainer.incremental import NotIncremental

        if self.params.algorithm != "als":
            raise NotIncremental("FunkSVD has no fold-in: it stays on the nightly's version")
        tensors, meta = read_checkpoint(base.checkpoint())
        if meta.get("model") != self.model:
            raise ValueError(f"checkpoint of model {meta.get('model')!r}, not {self.model!r}")
        self.params = MFParams(**meta["params"])  # the published model, whatever the config says now
        n_u0, n_i0 = int(meta["n_users"]), int(meta["n_items"])
        if data.n_users < n_u0 or data.n_items < n_i0:
            raise ValueError(f"the id maps shrank ({n_u0} users, {n_i0} items published; {data.n_users}, "
                             f"{data.n_items} now): incremental updates need the append-only maps")
        t0 = time.perf_counter()
        user_f, item_f = tensors["user_factors"].numpy(), tensors["item_factors"].numpy()
        had = np.r_[tensors["trained_items"].numpy().astype(bool), np.zeros(data.n_items - n_i0, bool)]
        conf = self._confidence(data)
        users = np.unique(data.user_idx[np.asarray(rows, np.int64)]).astype(np.int64)
        items = np.flatnonzero(~had & (data.item_counts > 0))
        als = self._als(1)
        als.user_factors = np.vstack([user_f, np.zeros((data.n_users - n_u0, user_f.shape[1]), np.float32)])
        als.item_factors = np.vstack([np.where(had[:n_i0, None], item_f, 0.0).astype(np.float32),
                                      np.zeros((data.n_items - n_i0, item_f.shape[1]), np.float32)])
        with threadpool_limits(1, "blas"):
            if len(users):
                als.partial_fit_users(users, conf[users])
            if len(items):
                als.partial_fit_items(items, conf.T.tocsr()[items])
                again = np.unique(conf[:, items].tocoo().row)
                again = np.intersect1d(again, users)
                if len(again):
                    als.partial_fit_users(again, conf[again])
        self.factor_item = np.ascontiguousarray(als.item_factors, np.float32)
        self.item_vectors = self.factor_item.copy()
        self.user_vectors = np.ascontiguousarray(als.user_factors, np.float32)
        self.trained_items = data.item_counts > 0
        self.item_vectors[~self.trained_items] = 0.0
        self.i2i_vectors, self.valid_items = self.factor_item, self.trained_items
        self.metrics = {"fit_s": time.perf_counter() - t0}
        self._artifacts = None
        return {"examples": int(len(rows)), "new_users": data.n_users - n_u0, "new_items": data.n_items - n_i0,
                "users_reencoded": int(len(users)), "items_reencoded": int(len(items)), "i2i": "rebuilt"}
