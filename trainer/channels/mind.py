"""MIND (Li et al., CIKM 2019): a multi-interest u2i channel. The user tower (common/towers/mind.py, arch "mind")
turns the user's recent items into K_u = max(1, min(K, ⌊log2 |I_u|⌋)) interest vectors by behaviour-to-interest
dynamic routing; training scores the next item against the label-aware attention of the interests
(softmax(p · cos(interest, target)) over the live ones) with the kit's sampled softmax (logQ; the full softmax on
small catalogues); serving searches each live interest and merges by max score.

Training example = one interaction (u, i_t); the tower sees only the `recent_n` items *before* t (no leakage).
Item vectors = the L2-normalised pooled item embeddings (id + side-information bags), the same embeddings the
behaviours are made of. Publishing and incremental updates: trainer/channels/hooks/mind.py. See docs/channels.md
("MIND") for the choices and figures.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from common.towers.mind import MindTower
from trainer.channels.hooks.mind import MindHooks
from trainer.data.train_data import TrainData
from trainer.nn.encoding import item_tower_encoding, user_tower_encoding
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop
from trainer.nn.losses import FULL_SOFTMAX_UP_TO, SampledSoftmax
from trainer.nn.negatives import PowerSampler
from trainer.nn.user_inputs import drop_user_ids, trained_users
from trainer.nn.warm_start import WarmState


class MindParams(BaseModel):
    """Hyper-parameters of the MIND channel (defaults: chosen on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(64, ge=2, le=1024, description="embedding, capsule and output vector size")
    n_interests: int = Field(4, ge=1, le=16, description="K: the most interest capsules per user")
    dynamic_k: bool = Field(True, description="K_u = max(1, min(K, ⌊log2 |I_u|⌋)) live interests; false: always K")
    iterations: int = Field(3, ge=1, le=10, description="dynamic routing iterations")
    routing_std: float = Field(1.0, gt=0, le=10, description="σ of the routing-logit init N(0, σ²)")
    routing_init: Literal["fixed", "random"] = Field(
        "fixed", description="training: the fixed seeded init (as served) or fresh N(0, σ²) draws per batch")
    attention_power: float = Field(2.0, ge=0, le=1000, description="label-aware attention softmax(p · cos); "
                                   "0 = uniform over the live interests, large = the closest one")
    hidden: list[int] = Field(default_factory=lambda: [128], description="hidden ReLU layers after the capsules")
    recent_n: int = Field(20, ge=1, le=500, description="history length fed to the routing (the tower's R)")
    recent_last: bool = Field(True, description="also feed the newest behaviour's embedding to the post-capsule "
                              "layers, next to the profile (not in the paper)")
    use_user_id: bool = Field(True, description="user id embedding in the profile concatenated to each capsule")
    use_user_attrs: bool = Field(True, description="user attribute embeddings in the profile")
    use_item_attrs: bool = Field(True, description="item side information pooled into the item embeddings")
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of examples trained as an unknown user")
    temperature: float = Field(0.05, gt=0, le=10, description="τ: logits = cos / τ")
    num_negatives: int = Field(1000, ge=1, le=100_000, description="sampled negatives per batch (large catalogues)")
    negatives_power: float = Field(0.75, ge=0, le=2, description="sampled negatives ∝ count^negatives_power")
    logq: bool = Field(True, description="logQ correction of the sampled negatives")
    full_softmax_up_to: int = Field(FULL_SOFTMAX_UP_TO, ge=0, description="catalogues up to this size train "
                                    "with the full softmax")
    epochs: int = Field(7, ge=1, le=1000)
    batch_size: int = Field(512, ge=2, le=65536)
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")


class MindChannel(MindHooks):
    """MIND: K interest vectors per user from capsule routing, served by the request-time tower."""

    model = "mind"
    kinds = ("u2i",)
    Params = MindParams

    def _prepare(self, data: TrainData) -> None:
        p: MindParams = self.params
        self.user_enc, self.user_attr_codes = user_tower_encoding(data.user_attrs if p.use_user_attrs else None,
                                                                  data.n_users)
        self.item_enc = item_tower_encoding(data.item_attrs if p.use_item_attrs else None, data.n_items,
                                            data.category_column)

    def build_tower(self, data: TrainData) -> MindTower:
        """A fresh tower for `data` (under the caller's seed), item side information filled in."""
        p: MindParams = self.params
        codes = self.item_enc.codes
        tower = MindTower(data.n_users, data.n_items, p.dim, p.n_interests, p.recent_n, p.iterations, p.dynamic_k,
                          p.routing_std, self.seed, p.hidden, self.user_enc.sizes, self.item_enc.sizes,
                          int(codes.shape[2]) if self.item_enc.columns else 1, p.use_user_id,
                          p.recent_last)
        if self.item_enc.columns:
            tower.items.set_codes(codes, self.item_enc.sizes)
        with torch.no_grad():
            tower.trained_user[: data.n_users] = trained_users(data.user_idx, data.n_users)
        return tower

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: MindParams = self.params
        self.loop_config = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                                      seed=self.seed, num_threads=p.num_threads, min_batch=2, progress=progress,
                                      desc="mind")
        with seeded(self.seed, p.num_threads) as rng:
            self._artifacts = None
            self._prepare(data)
            self.tower = self.build_tower(data)
            self._train(data, rng)
            self.item_vectors = self.encode_items(data)
            self.user_vectors, self.interest_counts = self.encode_users(data)

    def label_aware(self, interests: torch.Tensor, live: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B, d]: Σ_k a_k v_k, a = softmax over the live interests of p · cos(v_k, target) (v_k, target unit)."""
        cos = torch.einsum("bkd,bd->bk", interests, target)
        a = torch.softmax((self.params.attention_power * cos).masked_fill(~live, float("-inf")), dim=1)
        return torch.einsum("bk,bkd->bd", a, interests)

    def _train(self, data: TrainData, rng: np.random.Generator, warm: WarmState | None = None) -> None:
        """Train on every interaction; or, with `warm` (an incremental update), once on `warm.examples` with the
        carried optimiser and the tower as `warm` left it (frozen)."""
        p: MindParams = self.params
        n_ex = len(data.item_idx)
        self.losses: list[float] = []
        tower = self.tower
        self.optimizer = warm.optimizer if warm else adam(tower.parameters(), self.loop_config)
        if n_ex == 0:
            return
        loss_fn = SampledSoftmax(PowerSampler(data.item_counts, p.negatives_power), p.num_negatives, p.temperature,
                                 p.logq, p.full_softmax_up_to)

        all_items = torch.arange(data.n_items + 1)

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            uid, attrs, rec = self.user_inputs(data, data.user_idx[g].astype(np.int64), g)
            uid = drop_user_ids(uid, p.user_id_dropout if p.use_user_id else 0.0, data.n_users, rng)
            init = torch.randn(len(g), rec.shape[1], p.n_interests) * p.routing_std if p.routing_init == "random" \
                else None
            # small catalogue (full softmax): pool every item once per step and gather behaviours from it
            table = tower.items(all_items) if loss_fn.full else None
            normed = F.normalize(table, dim=-1) if table is not None else None

            def item_vectors(ids: torch.Tensor) -> torch.Tensor:
                return normed[ids] if normed is not None else F.normalize(tower.items(ids), dim=-1)

            interests, live = tower.interests(uid, attrs, rec, init, table)
            pos = torch.as_tensor(data.item_idx[g].astype(np.int64))
            user = self.label_aware(interests, live, item_vectors(pos))
            return loss_fn(user, pos, item_vectors, rng)

        examples = warm.examples if warm else np.arange(n_ex, dtype=np.int64)
        history = train_loop(batch_loss, examples, self.optimizer, self.loop_config, rng,
                             modules=[] if warm else [tower])  # eval mode when it returns
        self.losses = history.losses
