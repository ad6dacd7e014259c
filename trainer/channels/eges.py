"""EGES (Wang et al., KDD 2018, "Billion-scale Commodity Embedding for E-commerce Recommendation in Alibaba"):
skip-gram over weighted random walks on the session item graph, with side information and item cold start.

1. Sessions → a directed, weighted item graph of the transitions inside sessions (trainer/graph/session_graph.py).
2. `walks_per_node` weighted random walks (next node ∝ edge weight; `trainer.graph.walks.random_walks`) of
   `walk_length` nodes from every node with an out-edge.
3. Skip-gram with negative sampling over the walks (`trainer.nn.skipgram`) where the centre is the aggregation of
   the item's id embedding W_0(v) and its side-information embeddings W_j(v) (every usable item column, encoded
   by trainer/nn/side_info.py: category, brand, market, tags, genres, release year, …):

       EGES  H_v = Σ_j softmax(a_v)_j · W_j(v)      a_v ∈ R^{n+1} learned per item
       GES   H_v = mean_j W_j(v)
       BGE   H_v = W_0(v)                           (id only: DeepWalk)

   and the context is a separate output embedding z_v. a_v = attn_scale · b_v starts at (id_prior, 0, …, 0):
   trained at the full lr, the side-information tables (which get gradient from every item sharing a value) win
   softmax(a_v) and neighbours collapse to "same genre"; the defaults let a_v learn slowly from an id-leaning start.
4. Item vectors: H_v for items on the walks; an item with no behaviour (not on any walk: no interaction, or
   never followed / followed by another item in a session) gets the **average of its known side-information
   embeddings** (never its id embedding or a_v: both are untrained for it). The base builds cosine i2i lists over
   both, so a cold item gets neighbours and is a neighbour of others (docs/channels.md, "EGES").
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.budget import scaled_epochs, walk_starts
from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData
from trainer.graph.session_graph import session_graph
from trainer.graph.walks import random_walks
from trainer.nn.encoding import AttrEncoding
from trainer.nn.side_info import encode_side_info
from trainer.nn.skipgram import Corpus, SkipGramConfig, SkipGramResult, train_skipgram

Aggregation = Literal["eges", "ges", "bge"]


class EGESParams(BaseModel):
    """Hyper-parameters of the EGES channel (docs/channels.md, "EGES"; figures in docs/benchmarks.md). Defaults:
    best of the ml-100k validation grid — long walks, a wide window, shared negatives, and a_v that starts in favour
    of the id and learns slowly (left at the full lr, softmax(a_v) moves ~95 % onto genres/year and HR drops)."""

    model_config = ConfigDict(extra="forbid")
    aggregation: Aggregation = Field("eges", description="eges: softmax(a_v)-weighted sum; ges: plain mean; bge: id only")
    dim: int = Field(32, ge=2, le=1024)
    side_info: list[str] | None = Field(None, description="item columns used as side information (null: every "
                                        "usable column)")
    session_gap_s: int | None = Field(1800, ge=0, description="gap that starts a new session; null = whole history")
    ties: Literal["ordered", "unordered"] = Field("ordered", description="interactions of one user in the same "
                                                  "second: ordered = as the log lists them (by item id), "
                                                  "unordered = a set (edges to/from every item of the "
                                                  "neighbouring groups and both ways inside; trainer/graph/session_graph.py)")
    edge_window: int = Field(1, ge=1, le=1000, description="i → j for j up to this many positions after i in the "
                             "session (1 = consecutive transitions, the paper)")
    walks_per_node: int = Field(5, ge=1, le=1000, description="walks started from every node with an out-edge")
    walk_length: int = Field(40, ge=2, le=1000, description="nodes per walk (the start included)")
    window: int = Field(20, ge=1, le=1000, description="skip-gram context positions on each side")
    shrink_window: bool = Field(True, description="word2vec's random per-centre window in [1, window]")
    negatives: Literal["per_pair", "shared"] = Field("shared", description="per_pair: word2vec's own draws for "
                                                     "every pair; shared: one draw per batch, scored by one matmul")
    num_negatives: int = Field(64, ge=1, le=10_000, description="negatives per pair (per batch when shared)")
    negatives_power: float = Field(0.75, ge=-2, le=2, description="negatives drawn ∝ count^negatives_power")
    sample: float = Field(1e-3, ge=0, le=1, description="frequent-item subsampling threshold (0 = off)")
    epochs: int = Field(10, ge=1, le=1000)
    max_examples: int | None = Field(4_000_000, ge=1, description="scale rule: at most this many walk tokens "
                                     "trained per fit, in whole epochs (epochs = clamp(max_examples // tokens, 1, "
                                     "epochs)); when one epoch of walks_per_node walks would be larger, "
                                     "max_examples // walk_length walks (every node once before any twice); null "
                                     "= no bound. ml-100k's 10 epochs are unchanged")
    lr: float = Field(0.03, gt=0, le=10)
    lr_decay: bool = Field(True, description="Adam's lr decayed linearly to lr·1e-4 over the run (word2vec's)")
    batch_size: int = Field(4096, ge=2, le=1_000_000)
    id_prior: float = Field(2.0, ge=-10, le=10, description="initial a_v logit of the id embedding (side-info "
                            "logits start at 0; 0 = uniform weights)")
    attn_scale: float = Field(0.01, gt=0, le=100, description="a_v = attn_scale · b_v with b_v trained (Adam: "
                              "scales a_v's learning rate; < 1 slows the field weights)")
    field_dropout: float = Field(0.0, ge=0, lt=1, description="while training, each side-information field of "
                                 "each centre is left out of softmax(a_v) with this probability")
    cold_start: bool = Field(True, description="items without behaviour get the mean of their side-info embeddings")
    top_k: int = Field(100, ge=1, le=2000, description="neighbours published per item")
    num_threads: int = Field(1, ge=1, le=64, description="torch threads while fitting")


class SideInfoEmbedding(nn.Module):
    """The EGES centre H_v: id embedding W_0 and one embedding table per side-information field W_1..W_n, combined
    by `aggregation`. Every table is a registered submodule (nn.ModuleList), so the optimiser trains them all."""

    def __init__(self, n_items: int, dim: int, codes: list[np.ndarray], sizes: list[int],
                 aggregation: Aggregation = "eges", init_scale: float = 0.5, id_prior: float = 0.0,
                 attn_scale: float = 1.0, field_dropout: float = 0.0):
        super().__init__()
        self.aggregation, self.attn_scale, self.field_dropout = aggregation, attn_scale, field_dropout
        self.id_emb = nn.Embedding(n_items, dim)
        self.fields = nn.ModuleList([nn.Embedding(max(s, 1), dim) for s in sizes])
        self.attn = nn.Embedding(n_items, len(sizes) + 1)  # a_v; zeros → uniform weights at the start (= GES)
        for t in [self.id_emb, *self.fields]:
            nn.init.uniform_(t.weight, -init_scale / dim, init_scale / dim)
        nn.init.zeros_(self.attn.weight)
        with torch.no_grad():
            self.attn.weight[:, 0] = id_prior / attn_scale  # a_v starts at (id_prior, 0, …, 0)
        for j, c in enumerate(codes):  # [n_items, width] codes, -1 = empty slot; mean-pooled over filled slots
            c = torch.as_tensor(np.asarray(c, np.int64))
            filled = (c >= 0).float()
            self.register_buffer(f"codes_{j}", c.clamp(min=0), persistent=False)
            self.register_buffer(f"w_{j}", filled / filled.sum(1, keepdim=True).clamp(min=1), persistent=False)
            self.register_buffer(f"known_{j}", ((c > 0).float()), persistent=False)
            self.register_buffer(f"trained_{j}", torch.ones(max(sizes[j], 1)), persistent=False)

    def mark_trained(self, items: torch.Tensor) -> None:
        """Only the field values some of `items` (the walked items) hold were trained: cold vectors use only those."""
        for j in range(self.n_fields):
            seen = torch.zeros_like(getattr(self, f"trained_{j}"))
            codes, known = getattr(self, f"codes_{j}")[items], getattr(self, f"known_{j}")[items]
            seen[codes[known > 0]] = 1.0
            getattr(self, f"trained_{j}").copy_(seen)

    @property
    def n_fields(self) -> int:
        return len(self.fields)

    def field_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, n_fields, d]: W_j(v) of each side-information field (bags mean-pooled)."""
        out = []
        for j, table in enumerate(self.fields):
            codes, w = getattr(self, f"codes_{j}")[ids], getattr(self, f"w_{j}")[ids]
            out.append((table(codes) * w.unsqueeze(-1)).sum(1))
        return torch.stack(out, 1) if out else torch.zeros(len(ids), 0, self.id_emb.embedding_dim)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, n+1]: a_v (id first)."""
        return self.attn(ids) * self.attn_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, d]: H_v (in training, side-information fields dropped with probability `field_dropout`)."""
        if self.aggregation == "bge" or self.n_fields == 0:
            return self.id_emb(ids)
        stack = torch.cat([self.id_emb(ids).unsqueeze(1), self.field_embeddings(ids)], 1)  # [B, n+1, d]
        drop = None
        if self.training and self.field_dropout > 0:
            drop = torch.rand(len(ids), stack.shape[1]) < self.field_dropout
            drop[:, 0] = False  # the id is never dropped, so a row keeps at least one term
        if self.aggregation == "ges":
            if drop is None:
                return stack.mean(1)
            keep = (~drop).float().unsqueeze(-1)
            return (stack * keep).sum(1) / keep.sum(1)
        a = self.logits(ids)
        if drop is not None:
            a = a.masked_fill(drop, float("-inf"))
        return (torch.softmax(a, -1).unsqueeze(-1) * stack).sum(1)

    def cold_vectors(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, d] the mean of the item's known side-information embeddings, bool [B] has any): reads only the
        side-information tables — never the id embedding or a_v, which an item without behaviour never trained.
        A field counts when one of its values is known (code > 0) and trained (`mark_trained`); a bag averages
        those values."""
        b, d = len(ids), self.id_emb.embedding_dim
        total, n = torch.zeros(b, d), torch.zeros(b)
        for j, table in enumerate(self.fields):
            codes = getattr(self, f"codes_{j}")[ids]
            known = getattr(self, f"known_{j}")[ids] * getattr(self, f"trained_{j}")[codes]
            cnt = known.sum(1)
            val = (table(codes) * known.unsqueeze(-1)).sum(1) / cnt.clamp(min=1).unsqueeze(-1)
            has = cnt > 0
            total += val * has.unsqueeze(-1)
            n += has.float()
        return total / n.clamp(min=1).unsqueeze(-1), n > 0


class EGESChannel(EmbeddingChannel):
    """EGES item embeddings (walks on the session graph + side information) → cosine i2i lists, cold items included."""

    model = "eges"
    kinds = ("i2i",)
    Params = EGESParams

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: EGESParams = self.params
        t0 = time.perf_counter()
        self._artifacts = None
        n = data.n_items
        # BGE trains no side-information table, so it has nothing to give a cold item either
        enc = encode_side_info(data, p.side_info) if p.aggregation != "bge" else AttrEncoding(n_rows=n)
        self.side_info_columns = enc.columns
        graph = session_graph(data, p.session_gap_s, p.ties, p.edge_window)
        starts = walk_starts(np.flatnonzero(graph.degree > 0), p.walks_per_node, p.walk_length, p.max_examples,
                             np.random.default_rng([self.seed, 2]))
        walks = random_walks(graph, starts, p.walk_length - 1, np.random.default_rng([self.seed, 1]))
        corpus = Corpus.from_padded(walks, -1)
        n_tokens = int((walks >= 0).sum())
        self.epochs_run = scaled_epochs(p.epochs, n_tokens, p.max_examples)
        codes = [f.codes for f in enc.fields]
        sizes = enc.sizes
        cfg = SkipGramConfig(dim=p.dim, window=p.window, shrink_window=p.shrink_window, num_negatives=p.num_negatives,
                             shared_negatives=p.negatives == "shared",
                             negatives_power=p.negatives_power, sample=p.sample, epochs=self.epochs_run,
                             batch_size=p.batch_size, lr=p.lr, lr_decay=p.lr_decay, seed=self.seed,
                             num_threads=p.num_threads,
                             progress=progress, desc=f"eges ({p.aggregation})")
        res: SkipGramResult = train_skipgram(
            corpus, n, cfg, build_centre=lambda: SideInfoEmbedding(n, p.dim, codes, sizes, p.aggregation,
                                                       id_prior=p.id_prior, attn_scale=p.attn_scale,
                                                       field_dropout=p.field_dropout))
        self.skipgram = res
        self.centre: SideInfoEmbedding = res.model.centre
        self.centre.eval()
        warm = corpus.counts(n) > 0
        vecs = np.zeros((n, p.dim), np.float32)
        with torch.no_grad():
            self.centre.mark_trained(torch.as_tensor(np.flatnonzero(warm)))
            vecs[warm] = self.centre(torch.as_tensor(np.flatnonzero(warm))).numpy()
            cold_ids = np.flatnonzero(~warm)
            cold_ok = np.zeros(len(cold_ids), bool)
            if p.cold_start and len(cold_ids) and self.centre.n_fields:
                cv, has = self.centre.cold_vectors(torch.as_tensor(cold_ids))
                cold_ok = has.numpy()
                vecs[cold_ids[cold_ok]] = cv.numpy()[cold_ok]
        self.warm_items = warm
        self.cold_items = np.zeros(n, bool)
        self.cold_items[cold_ids[cold_ok]] = True
        self.item_vectors = vecs
        self.valid_items = warm | self.cold_items
        self.fit_s = time.perf_counter() - t0
        self.metrics = {"fit_s": round(self.fit_s, 3), "n_edges": int(graph.nnz), "n_walks": int(len(starts)),
                        "n_tokens": n_tokens, "epochs": self.epochs_run,
                        "n_pairs_last_epoch": int(res.pairs_last_epoch), "n_warm": int(warm.sum()),
                        "n_cold": int(self.cold_items.sum()), "side_info": enc.columns,
                        "loss": round(float(res.history.losses[-1]), 4) if res.history.losses else None}
        if p.aggregation == "eges" and warm.any() and self.centre.n_fields:
            mean_w = self.field_weights(np.flatnonzero(warm)).mean(0)
            self.metrics["mean_field_weights"] = dict(zip(["id", *enc.columns], np.round(mean_w, 3).tolist(),
                                                          strict=True))

    def field_weights(self, items: np.ndarray | None = None) -> np.ndarray:
        """float32 [n, n_fields + 1]: softmax(a_v) of items (id first, then `side_info_columns`); EGES only."""
        ids = torch.arange(len(self.item_vectors)) if items is None else torch.as_tensor(np.asarray(items, np.int64))
        with torch.no_grad():
            return torch.softmax(self.centre.logits(ids), -1).numpy()
