"""MIC, cross-channel contrastive learning (Lu et al., CIKM 2021): one two-tower backbone trained for three channels
at once. u2i: in-batch softmax with logQ, as the two-tower channel. u2u and i2i: NT-Xent between two perturbed views
of the same user / item (trainer/nn/views.py: field masking, history-id masking, embedding dropout; the other
2(N−1) views of the batch are the negatives), and after `warmup_epochs` the previous epoch's embeddings add kNN
positives and k-means hard negatives from the nearest other clusters (trainer/nn/contrastive.py).

Publishes u2i (item vectors, user vectors and the request-time user tower, arch "two_tower_user"), u2u lists
(cosine of the user vectors) and i2i lists (cosine of the item vectors): config `mic` plus `from: mic` entries of
kind u2u and i2i (docs/channels.md, "MIC").
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.towers import export_tower, input_meta
from common.towers.two_tower_user import UserTower
from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData
from trainer.nn.contrastive import NeighborMiner, nt_xent
from trainer.nn.encoding import item_tower_encoding, user_tower_encoding
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import in_batch_softmax_loss
from trainer.nn.negatives import StreamingFrequencyEstimator, relative_log_q
from trainer.nn.towers import ItemTower
from trainer.nn.user_inputs import encode_in_batches, tower_inputs, trained_users
from trainer.nn.views import mask_ids, perturb


class MicParams(BaseModel):
    """Backbone settings are the two-tower channel's defaults. The contrastive ones give the best i2i lists on the
    ml-100k validation split; the u2i alone scores best there without the contrastive losses (the backbone) and
    `u2u_weight: 0` (i2i contrast only) scores best on the mean of the three channels (docs/channels.md, "MIC").
    `cl_head`, `cl_final_scale`, `view_u2i_weight` and `knn_min_sim` (off by default) bring the u2i back to the
    backbone's level on that split, not above it (three seeds)."""

    model_config = ConfigDict(extra="forbid")
    emb_dim: int = Field(64, ge=2, le=1024, description="embedding size of every input field")
    dim: int = Field(64, ge=2, le=1024, description="output (retrieval) vector size")
    hidden: list[int] = Field(default_factory=lambda: [128], description="hidden layer sizes of each tower's MLP")
    recent_n: int = Field(10, ge=1, le=500, description="recent items pooled in the user tower")
    recent_last: bool = Field(True, description="also feed the newest recent item's embedding as its own field")
    use_user_id: bool = True
    use_user_attrs: bool = True
    use_item_attrs: bool = True
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of u2i examples trained as an unknown user")
    temperature: float = Field(0.05, gt=0, le=10, description="τ of the u2i softmax")
    logq_weight: float = Field(1.25, ge=0, le=2, description="β in s(x,y) − β·log q(y) (0: no correction)")
    u2u_weight: float = Field(0.1, ge=0, le=10, description="weight of the u2u contrastive loss (0: off)")
    i2i_weight: float = Field(0.1, ge=0, le=10, description="weight of the i2i contrastive loss (0: off)")
    cl_temperature: float = Field(0.1, gt=0, le=10, description="τ of the contrastive losses")
    cl_head: bool = Field(False, description="contrastive losses on a projection head over the tower output (SimCLR): "
                          "the retrieval vectors feed the u2i loss directly, the views' through a 2-layer MLP")
    view_u2i_weight: float = Field(0.0, ge=0, le=10, description="weight of a second u2i softmax whose users are "
                                   "perturbed views (field / history masks, dropout; the id kept): 0 = off")
    cl_final_scale: float = Field(1.0, ge=0, le=1, description="the contrastive weights fall linearly over training "
                                  "from their value at the first step to this share of it at the last (1: constant)")
    cl_entities: int = Field(256, ge=0, le=65536, description="users / items per step of each contrastive loss, drawn "
                             "uniformly from the trained ones (0: the batch's own, ∝ activity / popularity)")
    view_user_id: bool = Field(False, description="user views keep the user-id field (false: views are built from "
                               "attributes and history, so users are alike by what they did, not by their ids)")
    perturb: bool = Field(True, description="perturbed views (false: both views identical, the ablation)")
    field_mask: float = Field(0.2, ge=0, lt=1, description="probability of masking each input field of a view")
    history_mask: float = Field(0.2, ge=0, lt=1, description="probability of masking each history id of a user view")
    emb_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on a view's field embeddings")
    knn_positives: int = Field(5, ge=0, le=100, description="previous-epoch nearest neighbours that count as "
                               "positives (0: off)")
    knn_weight: float = Field(0.5, gt=0, le=1, description="weight of a kNN positive (the twin view weighs 1)")
    knn_min_sim: float = Field(-1.0, ge=-1, lt=1, description="a kNN neighbour counts as a positive only when its "
                               "snapshot cosine is at least this (-1: every one of the k)")
    hard_negatives: int = Field(4, ge=0, le=256, description="k-means hard negatives per entity (0: off)")
    n_clusters: int = Field(20, ge=2, le=100_000, description="k-means clusters of the previous epoch's embeddings")
    near_clusters: int = Field(3, ge=1, description="hard negatives come from this many clusters nearest the own")
    warmup_epochs: int = Field(2, ge=1, description="epochs before kNN positives and hard negatives are used")
    epochs: int = Field(7, ge=1, le=1000)
    batch_size: int = Field(512, ge=2, le=65536)
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    top_k: int = Field(100, ge=1, le=5000, description="neighbours kept per published i2i row")
    u2u_top_k: int | None = Field(None, ge=1, le=5000, description="neighbours per u2u row (default: top_k)")
    num_threads: int = Field(1, ge=1, le=256, description="torch and faiss threads while fitting")

    @model_validator(mode="after")
    def _check(self) -> MicParams:
        mining = self.knn_positives > 0 or self.hard_negatives > 0
        if mining and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}) when "
                             "knn_positives or hard_negatives is on (they would never be used); set both to 0")
        if mining and self.u2u_weight == 0 and self.i2i_weight == 0:
            raise ValueError("knn_positives / hard_negatives need a contrastive loss: u2u_weight or i2i_weight > 0")
        if self.hard_negatives > 0 and self.near_clusters >= self.n_clusters:
            raise ValueError(f"near_clusters ({self.near_clusters}) must be < n_clusters ({self.n_clusters}): "
                             "hard negatives never come from the anchor's own cluster")
        return self


class MicChannel(EmbeddingChannel):
    """MIC: u2i vectors + u2u and i2i lists from one contrastively regularised two-tower model."""

    model = "mic"
    kinds = ("u2i", "u2u", "i2i")
    Params = MicParams

    def _build(self, data: TrainData) -> None:
        p: MicParams = self.params
        self.user_enc, self.user_attr_codes = user_tower_encoding(data.user_attrs if p.use_user_attrs else None,
                                                                  data.n_users)
        item_enc = item_tower_encoding(data.item_attrs if p.use_item_attrs else None, data.n_items,
                                       data.category_column)
        item_emb = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
        torch.nn.init.normal_(item_emb.weight, std=0.05)
        with torch.no_grad():
            item_emb.weight[data.n_items].zero_()
        self.user_tower = UserTower(data.n_users, data.n_items, self.user_enc.sizes, p.emb_dim, p.dim, p.hidden, 0.0,
                                    False, p.use_user_id, item_emb, p.recent_last)
        with torch.no_grad():
            self.user_tower.trained_user[: data.n_users] = trained_users(data.user_idx, data.n_users)
        self.item_tower = ItemTower(data.n_items, item_enc.codes, item_enc.sizes, p.emb_dim, p.dim, p.hidden, 0.0,
                                    False, item_emb)
        self.cl_heads = torch.nn.ModuleDict({s: ProjectionHead(p.dim) for s in ("u", "i")}) if p.cl_head else None
        self.n_fields = {"u": int(p.use_user_id) + len(self.user_enc.sizes) + 1 + int(p.recent_last),
                         "i": 1 + len(item_enc.sizes)}

    def _user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray | None = None) -> list[torch.Tensor]:
        """(user, attrs, recent) tensors of common/towers/inputs.py; end None = each user's latest items."""
        end = data.user_ptr[users + 1] if end is None else end
        return list(tower_inputs(data, users, end, self.params.recent_n, self.user_attr_codes))

    def _encode(self, data: TrainData, side: str, ids: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """Vectors of users / items `ids` (users from their latest items). With `rng`, a contrastive view: a user's
        without its id field (unless `view_user_id`), perturbed (unless `perturb` is off)."""
        p: MicParams = self.params
        tower = self.user_tower if side == "u" else self.item_tower
        inputs = self._user_inputs(data, ids) if side == "u" else [torch.as_tensor(ids)]
        if rng is not None and side == "u" and not p.view_user_id:
            inputs[0] = torch.full_like(inputs[0], data.n_users)
        if rng is None or not p.perturb:
            return tower(*inputs)
        if side == "u":
            inputs[2] = mask_ids(inputs[2], p.history_mask, data.n_items, rng)
        with perturb(tower, self.n_fields[side], p.field_mask, p.emb_dropout, rng):
            return tower(*inputs)

    def _contrast(self, data: TrainData, side: str, ids: np.ndarray, miner: NeighborMiner | None,
                  rng: np.random.Generator) -> torch.Tensor:
        p: MicParams = self.params
        head = self.cl_heads[side] if self.cl_heads is not None else (lambda z: z)
        z1 = head(self._encode(data, side, ids, rng))
        z2 = head(self._encode(data, side, ids, rng)) if p.perturb else z1
        if miner is None:
            return nt_xent(z1, z2, p.cl_temperature)
        extra = torch.as_tensor(miner.positives(ids)) if p.knn_positives else None
        neg, usable = miner.hard_negatives(ids, p.hard_negatives, rng)
        uniq, inv = np.unique(neg, return_inverse=True)
        hard = head(self._encode(data, side, uniq, rng))[torch.as_tensor(inv.reshape(neg.shape))] if neg.size else None
        return nt_xent(z1, z2, p.cl_temperature, extra, p.knn_weight, hard, torch.as_tensor(usable))

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: MicParams = self.params
        cfg = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=self.seed,
                         num_threads=p.num_threads, progress=progress, desc="mic")
        prev_faiss = faiss_threads(p.num_threads)
        try:
            with seeded(self.seed, p.num_threads) as rng:
                self._artifacts = None
                self._build(data)
                self._train(data, rng, cfg)
                self.item_vectors, self.user_vectors = self.encode_items(data), self.encode_users(data)
        finally:
            faiss_threads(prev_faiss)
        self.valid_users, self.valid_items = np.diff(data.user_ptr) > 0, data.item_counts > 0

    def _train(self, data: TrainData, rng: np.random.Generator, cfg: LoopConfig) -> None:
        p: MicParams = self.params
        self.losses: list[float] = []
        self.metrics: dict[str, Any] = {"snapshot_epochs": []}
        if len(data.item_idx) == 0:
            return
        estimator = StreamingFrequencyEstimator(seed=self.seed)
        weights = {"u": p.u2u_weight, "i": p.i2i_weight}
        valid = {"u": np.diff(data.user_ptr) > 0, "i": data.item_counts > 0}
        pools = {s: np.flatnonzero(v) for s, v in valid.items()}
        miners = {s: NeighborMiner(p.knn_positives, p.n_clusters, p.near_clusters, self.seed, min_sim=p.knn_min_sim)
                  for s in weights}
        mining_from = p.warmup_epochs if p.knn_positives or p.hard_negatives else p.epochs + 1
        n_rows = len(data.item_idx)

        def batch_loss(b: Batch) -> torch.Tensor:
            users, pos = data.user_idx[b.rows].astype(np.int64), data.item_idx[b.rows].astype(np.int64)
            uid, attrs, rec = self._user_inputs(data, users, b.rows)
            # not drop_user_ids: this draws even at rate 0, and the draw moves every later random number
            uid = torch.where(torch.as_tensor(rng.random(len(users)) < p.user_id_dropout), data.n_users, uid)
            estimator.update(pos)
            uniq, inv = np.unique(pos, return_inverse=True)
            log_q = torch.as_tensor(estimator.log_probability(uniq), dtype=torch.float32)
            lq = relative_log_q(log_q, data.n_items, p.logq_weight)[inv] if p.logq_weight > 0 else None
            vecs = self.item_tower(torch.as_tensor(uniq))[torch.as_tensor(inv)]
            loss = in_batch_softmax_loss(self.user_tower(uid, attrs, rec), vecs, p.temperature, lq, torch.as_tensor(pos))
            if p.view_u2i_weight > 0:  # the u2u channel's view of the user must still retrieve its item
                rec_v = mask_ids(rec, p.history_mask, data.n_items, rng)
                with perturb(self.user_tower, self.n_fields["u"], p.field_mask, p.emb_dropout, rng):
                    z_v = self.user_tower(uid, attrs, rec_v)
                loss = loss + p.view_u2i_weight * in_batch_softmax_loss(z_v, vecs, p.temperature, lq,
                                                                        torch.as_tensor(pos))
            scale = cl_scale(p.cl_final_scale, (b.epoch + b.start / n_rows) / p.epochs)
            for side, ids in (("u", np.unique(users)), ("i", uniq)):
                if weights[side] == 0:
                    continue
                if p.cl_entities:  # uniform over the trained entities, not ∝ activity / popularity as the batch
                    pool = pools[side]
                    ids = np.sort(pool[rng.choice(len(pool), min(p.cl_entities, len(pool)), replace=False)])
                miner = miners[side] if b.epoch >= mining_from else None
                loss = loss + scale * weights[side] * self._contrast(data, side, ids, miner, rng)
            return loss

        def snapshot(epoch: int, _loss: float) -> None:
            if mining_from - 1 <= epoch < p.epochs - 1:  # the embeddings the next epoch mines from
                with torch.no_grad():
                    miners["u"].refresh(self.encode_users(data), valid["u"])
                    miners["i"].refresh(self.encode_items(data), valid["i"])
                self.metrics["snapshot_epochs"].append(epoch)

        modules = [self.user_tower, self.item_tower] + ([self.cl_heads] if self.cl_heads is not None else [])
        self.losses = train_loop(batch_loss, np.arange(len(data.item_idx)), adam(unique_parameters(*modules), cfg), cfg,
                                 rng, on_epoch_end=snapshot, modules=modules).losses

    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "two_tower_user", served like the two-tower channel's."""
        return export_tower(self.user_tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                        self.user_enc.columns, self.user_enc.vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData) -> np.ndarray:
        """Every user's vector from their latest `recent_n` items (what serving computes)."""
        return encode_in_batches(data, None, lambda u: self._encode(data, "u", u, None).numpy(), self.params.dim)

    @torch.no_grad()
    def encode_items(self, data: TrainData) -> np.ndarray:
        return self.item_tower(torch.arange(data.n_items, dtype=torch.int64)).numpy()


class ProjectionHead(torch.nn.Module):
    """z → normalize(W2 relu(W1 z)): the contrastive losses' own space over the retrieval vectors (SimCLR's head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.mlp(z), dim=-1)


def cl_scale(final: float, progress: float) -> float:
    """Multiplier of the contrastive weights at `progress` ∈ [0, 1) of training: 1 → `final`, linearly."""
    return 1.0 + (final - 1.0) * min(max(progress, 0.0), 1.0)


def faiss_threads(n: int) -> int:
    """Set faiss's OpenMP threads (k-means, kNN) and return the previous count."""
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    return prev
