"""PinSAGE (Ying et al., KDD 2018) and GraphSAGE (Hamilton et al. 2017) item embeddings → cosine i2i lists.

Graph: the item–user–item bipartite graph of the training log (trainer/graph/walks.py, numpy samplers).

- **pinsage**: each item's neighbourhood is its top-T items by L1-normalised visit count of short random walks
  with restart; a layer pools the neighbours with those weights, n = Σ α_v ReLU(Q h_v + q), then
  h' = normalize(ReLU(W [h ; n])) (trainer/graph/sage.py); 2 layers, then G2·ReLU(G1 h + g) + h0 (the residual
  of DGL's example: without it the layers start collapsed and learn little, docs/channels.md).
- **graphsage**: T neighbours sampled uniformly (item → user → item, resampled every epoch, one sample per
  layer), mean aggregation (no Q), the same concat + normalisation.

The input layer h0 is the kit's ItemTower (a learnable id embedding + the item's attribute fields from
`encode_attrs`, one linear map), so sparse items still get their side information. Training: max-margin loss
max(0, z_q·z_n − z_q·z_i + Δ) over (item, an item the same user clicked ≤ pos_window clicks later) pairs,
`num_negatives` shared negatives per batch (∝ count^negatives_power) plus (`hard_negatives`) hard negatives drawn from each query's personalised-PageRank ranks
[hard_from, hard_to) with the curriculum of the paper (epoch n adds n − 1 hard negatives per query); the edges
between a batch's queries and their positives are removed from the batch's neighbourhoods (edge leakage).
Inference: every item is embedded with its full neighbourhood; the base builds the cosine kNN lists.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from trainer.channels.embedding import EmbeddingChannel
from trainer.data.examples import sequence_pairs
from trainer.data.train_data import TrainData
from trainer.graph.sage import GraphEncoder, Table, pair_edges, uniform_tables
from trainer.graph.walks import bipartite, importance_neighbors, ppr_rank_window
from trainer.nn.encoding import item_tower_encoding
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop
from trainer.nn.losses import triplet_hinge
from trainer.nn.negatives import PowerSampler, curriculum_count, draw_hard, rank_window
from trainer.nn.towers import ItemTower


class PinSageParams(BaseModel):
    """Hyper-parameters of the PinSAGE / GraphSAGE channel (docs/channels.md, "PinSAGE"); defaults: the best found
    on the ml-100k validation split."""

    model_config = ConfigDict(extra="forbid")
    variant: Literal["pinsage", "graphsage"] = "pinsage"
    dim: int = Field(64, ge=2, le=1024, description="size of the conv layers and of the published vectors")
    emb_dim: int = Field(64, ge=2, le=1024, description="size of the input layer (id + attribute embeddings)")
    num_layers: int = Field(2, ge=1, le=3, description="convolution layers")
    num_neighbors: int = Field(10, ge=1, le=200, description="T: neighbours per item (top-T visited / sample size)")
    num_walks: int = Field(50, ge=1, le=10_000, description="pinsage: walks with restart per item")
    walk_length: int = Field(3, ge=1, le=100, description="pinsage: item → user → item hops per walk")
    restart_prob: float = Field(0.5, ge=0, le=1, description="pinsage: restart probability before each hop")
    use_item_attrs: bool = Field(True, description="item attribute fields in the input layer")
    residual: bool = Field(True, description="add the input layer's vector to the output (DGL's example; the "
                           "paper has none)")
    pos_window: int = Field(3, ge=1, le=50, description="positives: (q, i) with i at most this many clicks "
                            "after q in one user's history")
    max_pairs: int | None = Field(300_000, ge=1, description="each epoch trains on at most this many pairs, "
                                  "drawn afresh (null: all)")
    margin: float = Field(0.2, gt=0, le=2, description="Δ of the max-margin loss (cosine units)")
    num_negatives: int = Field(500, ge=1, le=100_000, description="negatives shared by a batch")
    negatives_power: float = Field(0.0, ge=0, le=2, description="shared negatives drawn ∝ count^negatives_power")
    hard_negatives: bool = Field(False, description="add hard negatives from personalised-PageRank ranks")
    curriculum: bool = Field(True, description="epoch n uses n − 1 hard negatives per query (else hard_max)")
    hard_max: int | None = Field(None, ge=1, le=1000, description="at most this many hard negatives per query "
                                 "(null: epochs − 1)")
    hard_from: float = Field(0.03, ge=0, description="first PPR rank of hard negatives (0-based; < 1: a fraction "
                             "of the catalogue)")
    hard_to: float = Field(0.15, gt=0, description="end of the PPR rank window (exclusive; < 1: a fraction)")
    hard_pool: int = Field(64, ge=1, le=10_000, description="hard-negative candidates kept per item")
    ppr_method: Literal["walks", "power"] = Field("walks", description="PPR ranks by walk visit counts or power "
                                                  "iteration (small catalogues)")
    ppr_walks: int = Field(100, ge=1, le=100_000, description="PPR: walks per item")
    ppr_walk_length: int = Field(10, ge=1, le=1000, description="PPR: hops per walk")
    ppr_restart: float = Field(0.3, gt=0, le=1, description="PPR: restart probability per hop")
    remove_edges: bool = Field(True, description="drop each training pair's own edge from the batch neighbourhoods")
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(2048, ge=2, le=65536)
    lr: float = Field(0.01, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    top_k: int = Field(200, ge=1, le=2000, description="neighbours published per item")
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")

    @field_validator("hard_to")
    @classmethod
    def _window(cls, v: float, info: ValidationInfo) -> float:
        lo = info.data.get("hard_from")
        if lo is not None and (lo < 1) == (v < 1) and v <= lo:
            raise ValueError(f"must be > hard_from ({lo})")
        return v


class PinSageChannel(EmbeddingChannel):
    """PinSAGE / GraphSAGE item embeddings → i2i cosine lists."""

    model = "pinsage"
    kinds = ("i2i",)
    Params = PinSageParams

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: PinSageParams = self.params
        t0 = time.perf_counter()
        self.metrics: dict[str, float] = {}
        self._artifacts = None
        n = data.n_items
        self.loop_config = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                                      seed=self.seed, num_threads=p.num_threads, min_batch=2, progress=progress,
                                      desc=p.variant)
        with seeded(self.seed, p.num_threads) as rng:
            self.item_users, self.user_items = bipartite(data.user_idx, data.item_idx, data.n_users, n)
            items = np.arange(n, dtype=np.int64)
            t = time.perf_counter()
            if p.variant == "pinsage":
                self.neighbors, self.neighbor_weights = importance_neighbors(
                    self.item_users, self.user_items, items, p.num_neighbors, rng, p.num_walks, p.walk_length,
                    p.restart_prob)
            self.metrics["neighbors_s"] = time.perf_counter() - t
            self.pairs = sequence_pairs(data.user_idx, data.item_idx, p.pos_window)
            n_catalog = int((data.item_counts > 0).sum())
            self.hard_window = rank_window(p.hard_from, p.hard_to, n_catalog)
            self.hard_pools = None
            t = time.perf_counter()
            if p.hard_negatives and self.hard_window[1] > self.hard_window[0]:
                self.hard_pools = ppr_rank_window(self.item_users, self.user_items, items, *self.hard_window,
                                                  p.hard_pool, rng, p.ppr_method, p.ppr_walks, p.ppr_walk_length,
                                                  p.ppr_restart)
            self.metrics["ppr_s"] = time.perf_counter() - t
            self._build(data)
            t = time.perf_counter()
            self._train(data, rng)
            self.metrics["train_s"] = time.perf_counter() - t
            self.item_vectors = self.encode_items(self._tables(rng, inference=True))
        self.valid_items = data.item_counts > 0  # untrained items get no list and are nobody's neighbour
        self.metrics["fit_s"] = time.perf_counter() - t0

    def _build(self, data: TrainData) -> None:
        p: PinSageParams = self.params
        n = data.n_items
        self.item_enc = item_tower_encoding(data.item_attrs if p.use_item_attrs else None, n, data.category_column)
        item_emb = torch.nn.Embedding(n + 1, p.emb_dim, padding_idx=n)
        torch.nn.init.normal_(item_emb.weight, std=0.05)
        with torch.no_grad():
            item_emb.weight[n].zero_()
        h0 = ItemTower(n, self.item_enc.codes, self.item_enc.sizes, p.emb_dim, p.emb_dim, [], 0.0, False, item_emb)
        self.encoder = GraphEncoder(h0, p.emb_dim, [p.dim] * p.num_layers, p.dim, n,
                                    transform=p.variant == "pinsage", residual=p.residual)

    def _tables(self, rng: np.random.Generator, inference: bool = False) -> list[Table]:
        """Neighbour tables: pinsage's fixed importance table, or one uniform sample per layer (graphsage)."""
        p: PinSageParams = self.params
        if p.variant == "pinsage":
            return [(torch.as_tensor(self.neighbors), torch.as_tensor(self.neighbor_weights))]
        return uniform_tables(self.item_users, self.user_items, p.num_neighbors, p.num_layers, rng)

    def _train(self, data: TrainData, rng: np.random.Generator) -> None:
        p: PinSageParams = self.params
        q_all, i_all = self.pairs
        self.losses: list[float] = []
        self.hard_counts: list[int] = []  # hard negatives per query planned for each epoch
        self.hard_used: dict[int, int] = {}  # … and drawn in that epoch's batches
        if len(q_all) == 0:
            return
        n = data.n_items
        sampler = PowerSampler(data.item_counts, p.negatives_power)
        opt = adam(self.encoder.parameters(), self.loop_config)
        state: dict = {}

        def on_epoch_start(epoch: int, order: np.ndarray) -> None:
            state["tables"] = self._tables(rng)
            state["n_hard"] = curriculum_count(epoch, p.curriculum, p.hard_max, p.epochs) \
                if self.hard_pools is not None else 0
            self.hard_counts.append(state["n_hard"])

        def batch_loss(b: Batch) -> torch.Tensor:
            q, i = q_all[b.rows], i_all[b.rows]
            shared = sampler.sample(rng, p.num_negatives)
            hard = draw_hard(self.hard_pools, q, state["n_hard"], rng) if state["n_hard"] else None
            parts = [q, i, shared] + ([hard.clip(min=0).ravel()] if hard is not None else [])
            uniq, inv = np.unique(np.concatenate(parts), return_inverse=True)
            forbid = torch.as_tensor(pair_edges(q, i, n)) if p.remove_edges else None
            z = self.encoder(torch.as_tensor(uniq), state["tables"], forbid)
            zz = z[torch.as_tensor(inv)]
            bsz, ns = len(q), len(shared)
            zq, zi, zs = zz[:bsz], zz[bsz:2 * bsz], zz[2 * bsz:2 * bsz + ns]
            pos = (zq * zi).sum(1)
            neg = zq @ zs.T
            valid = torch.as_tensor(shared[None, :] != i[:, None])
            self.hard_used[b.epoch] = max(self.hard_used.get(b.epoch, 0), 0 if hard is None else hard.shape[1])
            if hard is not None:
                zh = zz[2 * bsz + ns:].view(bsz, hard.shape[1], -1)
                neg = torch.cat([neg, torch.einsum("bd,bkd->bk", zq, zh)], dim=1)
                valid = torch.cat([valid, torch.as_tensor((hard >= 0) & (hard != i[:, None]))], dim=1)
            return triplet_hinge(pos, neg, valid, p.margin)

        n_pairs = len(q_all)
        examples = np.arange(n_pairs) if p.max_pairs is None or n_pairs <= p.max_pairs else \
            (lambda r: r.choice(n_pairs, p.max_pairs, replace=False))
        hist = train_loop(batch_loss, examples, opt, self.loop_config, rng,
                          on_epoch_start=on_epoch_start, modules=[self.encoder])
        self.losses = hist.losses

    @torch.no_grad()
    def encode_items(self, tables: list[Table], chunk: int = 4096) -> np.ndarray:
        """float32 [n_items, dim]: every item embedded with its full neighbourhood (no edge removed)."""
        self.encoder.eval()
        n = self.item_users.n_src
        out = [self.encoder(torch.arange(a, min(a + chunk, n)), tables).numpy() for a in range(0, n, chunk)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.params.dim), np.float32)
