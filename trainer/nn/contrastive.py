"""Contrastive learning between two views of the same entities (NT-Xent / InfoNCE, Chen et al. 2020), with extra
positives and per-row hard negatives, and the miner that supplies them from a snapshot of every entity's embedding
(MIC, trainer/channels/mic.py).

    nt_xent(z1, z2, τ)          z1, z2 [N, d] L2-normalised views of N entities: a view's positive is its twin,
                                the other 2(N−1) views of the batch are its negatives
    miner = NeighborMiner(k=5, n_clusters=20, near_clusters=3, seed=42, min_sim=-1.0)
    miner.refresh(vectors)      faiss kNN lists and spherical k-means clusters of a snapshot [n, d]
    miner.positives(ids)        bool [N, N]: entity b is among entity a's k nearest (at cosine ≥ min_sim) → an
                                extra positive of a
    miner.hard_negatives(ids, m, rng)   [N, m] members of the clusters nearest to a's own cluster (never a's own,
                                where its true neighbours are), and whether each is usable (not among a's kNN)

With identical views on a regular simplex (N ≤ d + 1 points, pairwise cosine −1/(N−1)) the loss reaches its
minimum log(1 + 2(N−1)·exp(−N / ((N−1)·τ))) (tests/test_mic.py).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from trainer.channels.neighbors import cosine_neighbors


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, extra_pos: torch.Tensor | None = None,
            extra_weight: float = 1.0, hard: torch.Tensor | None = None,
            hard_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the 2N views of −Σ_p w_p log softmax_p / Σ_p w_p, the softmax over every other view (and the row's
    hard negatives): the twin weighs 1, an entity marked in `extra_pos` [N, N] weighs `extra_weight` (both its
    views). `hard` [N, m, d]: per-entity negatives (shared by its two views), `hard_valid` [N, m] masks some."""
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    eye = torch.eye(2 * n, dtype=torch.bool)
    sim = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    idx = torch.arange(2 * n)
    w = torch.zeros(2 * n, 2 * n, dtype=z.dtype)
    if extra_pos is not None:
        w = (extra_pos.to(z.dtype) * extra_weight).repeat(2, 2).masked_fill(eye, 0.0)
    w[idx, (idx + n) % (2 * n)] = 1.0
    cols = sim
    if hard is not None and hard.shape[1] > 0:
        h = torch.einsum("ad,amd->am", z, hard.repeat(2, 1, 1)) / temperature
        if hard_valid is not None:
            h = h.masked_fill(~hard_valid.repeat(2, 1), float("-inf"))
        cols = torch.cat([sim, h], dim=1)
    log_p = (sim - torch.logsumexp(cols, dim=1, keepdim=True)).masked_fill(eye, 0.0)
    return (-(w * log_p).sum(1) / w.sum(1)).mean()


class NeighborMiner:
    """kNN positives and cluster hard negatives from the last `refresh` snapshot (entity rows; invalid rows get
    neither and are never drawn)."""

    def __init__(self, k: int, n_clusters: int, near_clusters: int, seed: int = 42, niter: int = 20, nredo: int = 5,
                 min_sim: float = -1.0):
        self.k, self.n_clusters, self.near_clusters, self.seed = k, n_clusters, near_clusters, seed
        self.min_sim = min_sim  # a neighbour below this snapshot cosine is not a positive (still not a hard negative)
        self.niter, self.nredo = niter, nredo  # k-means: the best of `nredo` seeded runs (one can split a cluster)
        self.knn: np.ndarray | None = None  # int [n, k], -1 pads
        self.knn_pos: np.ndarray | None = None  # knn with the neighbours under min_sim replaced by -1
        self.cluster: np.ndarray | None = None  # int [n], -1 = invalid row
        self.near = np.zeros((0, 0), np.int64)  # [n_clusters, near]: the nearest other clusters of each cluster

    def refresh(self, vectors: np.ndarray, valid: np.ndarray | None = None) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        ok = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        if self.k > 0:
            nb = cosine_neighbors(x, self.k, valid=ok)
            self.knn, self.knn_pos = nb.neighbors, np.where(nb.scores >= self.min_sim, nb.neighbors, -1)
        else:
            self.knn = self.knn_pos = np.full((n, 0), -1, np.int32)
        rows = np.flatnonzero(ok)
        self.cluster = np.full(n, -1, np.int64)
        c = min(self.n_clusters, len(rows))
        if c < 2:
            self.near = np.zeros((0, 0), np.int64)
            return
        xr = x[rows] / np.maximum(np.linalg.norm(x[rows], axis=1, keepdims=True), 1e-12)
        km = faiss.Kmeans(d, c, niter=self.niter, nredo=self.nredo, seed=self.seed, spherical=True,
                          min_points_per_centroid=1, verbose=False)
        km.train(xr)
        self.cluster[rows] = km.index.search(xr, 1)[1].ravel()
        size = np.bincount(self.cluster[rows], minlength=c)
        sim = km.centroids @ km.centroids.T
        sim[:, size == 0] = -np.inf  # an empty cluster has nobody to draw
        np.fill_diagonal(sim, -np.inf)
        n_near = min(self.near_clusters, int((size > 0).sum()) - 1)
        self.near = np.argsort(-sim, axis=1, kind="stable")[:, :max(n_near, 0)]
        order = np.argsort(self.cluster[rows], kind="stable")
        self.members, self.size = rows[order], size
        self.start = np.concatenate([[0], np.cumsum(size)[:-1]])

    def positives(self, ids: np.ndarray) -> np.ndarray:
        """bool [N, N]: [a, b] when entity ids[b] is among the k nearest of ids[a] (self excluded) with a snapshot
        cosine ≥ min_sim."""
        nb = self.knn_pos[ids]
        return (nb[:, :, None] == np.asarray(ids)[None, None, :]).any(1)

    def hard_negatives(self, ids: np.ndarray, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(entity ids [N, m], usable [N, m]): per row, a uniform member of one of the `near_clusters` clusters
        nearest to its own (by centroid cosine); unusable when it is one of the row's kNN positives."""
        ids = np.asarray(ids)
        if self.near.shape[1] == 0 or m == 0:
            return np.zeros((len(ids), 0), np.int64), np.zeros((len(ids), 0), bool)
        src = self.near[self.cluster[ids][:, None], rng.integers(0, self.near.shape[1], size=(len(ids), m))]
        neg = self.members[self.start[src] + (rng.random(src.shape) * self.size[src]).astype(np.int64)]
        usable = ~(neg[:, :, None] == self.knn[ids][:, None, :]).any(2) & (self.cluster[ids][:, None] >= 0)
        return neg, usable
