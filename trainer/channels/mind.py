"""MIND (Li et al., CIKM 2019): a multi-interest u2i channel. The user tower (common/towers/mind.py, arch "mind")
turns the user's recent items into K_u = max(1, min(K, ⌊log2 |I_u|⌋)) interest vectors by behaviour-to-interest
dynamic routing; training scores the next item against the label-aware attention of the interests
(softmax(p · cos(interest, target)) over the live ones) with the kit's sampled softmax (logQ; the full softmax on
small catalogues); serving searches each live interest and merges by max score.

Training example = one interaction (u, i_t); the tower sees only the `recent_n` items *before* t (no leakage).
Item vectors = the L2-normalised pooled item embeddings (id + side-information bags), the same embeddings the
behaviours are made of. See docs/channels.md ("MIND") for the choices and figures.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from common.towers import export_tower, history_inputs, input_meta
from common.towers.mind import MindTower
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.encoding import encode_attrs
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop
from trainer.nn.losses import FULL_SOFTMAX_UP_TO, SampledSoftmax
from trainer.nn.negatives import PowerSampler
from trainer.nn.warm_start import RowTable, WarmState


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


class MindChannel(WarmTowerChannel):
    """MIND: K interest vectors per user from capsule routing, served by the request-time tower."""

    model = "mind"
    kinds = ("u2i",)
    Params = MindParams

    def _prepare(self, data: TrainData) -> None:
        p: MindParams = self.params
        self.user_enc = encode_attrs(data.user_attrs if p.use_user_attrs else None, data.n_users, multi_valued=False,
                                     max_numeric_values=2000)
        self.item_enc = encode_attrs(data.item_attrs if p.use_item_attrs else None, data.n_items, multi_valued=True,
                                     categorical=(data.category_column or "",))
        ua = self.user_enc.codes[:, :, 0] if self.user_enc.columns else np.zeros((data.n_users, 1), np.int64)
        self.user_attr_codes = np.vstack([ua, np.zeros((1, ua.shape[1]), np.int64)])  # row n_users: unknown

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
            tower.trained_user[: data.n_users] = torch.as_tensor(
                np.bincount(data.user_idx, minlength=data.n_users)[: data.n_users] > 0)
        return tower

    def _user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent) tensors in the encoding of common/towers/inputs.py (the one serving uses)."""
        x = history_inputs(users, self.user_attr_codes[users], data.item_idx, data.user_ptr[users], end,
                           self.params.recent_n, data.n_items)
        return torch.as_tensor(x.user), torch.as_tensor(x.attrs), torch.as_tensor(x.recent)

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
            uid, attrs, rec = self._user_inputs(data, data.user_idx[g].astype(np.int64), g)
            if p.user_id_dropout > 0 and p.use_user_id:
                drop = torch.as_tensor(rng.random(len(g)) < p.user_id_dropout)
                uid = torch.where(drop, torch.full_like(uid, data.n_users), uid)
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

    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "mind", its hparams and the input meta."""
        return export_tower(self.tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                   self.user_enc.columns, self.user_enc.vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([n, K, d] interest vectors from each user's latest `recent_n` items (what serving computes; rows past
        K_u zero), int32 [n] K_u)."""
        users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        vecs, counts = [], []
        for b0 in range(0, len(users), 4096):
            u = users[b0:b0 + 4096]
            v, live = self.tower.interests(*self._user_inputs(data, u, data.user_ptr[u + 1]))
            vecs.append(v.numpy())
            counts.append(live.sum(1).numpy())
        if not vecs:
            return np.zeros((0, self.params.n_interests, self.params.dim), np.float32), np.zeros(0, np.int32)
        return np.concatenate(vecs).astype(np.float32), np.concatenate(counts).astype(np.int32)

    @torch.no_grad()
    def encode_items(self, data: TrainData) -> np.ndarray:
        """float32 [n_items, d]: the L2-normalised pooled item embeddings (score = cos(interest, item))."""
        return F.normalize(self.tower.items(torch.arange(data.n_items)), dim=1).numpy().astype(np.float32)

    # -- incremental updates between nightlies (docs/event_log.md; the mechanism: trainer/channels/warm_tower.py) --
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        return {"tower": self.tower}

    def warm_tables(self) -> list[RowTable]:
        """The items' id rows (behaviours and item vectors alike) and side-information bags, the user rows."""
        return [RowTable("tower.items.id_emb.weight", "item", history=True, item_vector=True),
                RowTable("tower.items.attr_idx", "item", train=False),
                RowTable("tower.user_emb.weight", "user", new="unknown"),
                RowTable("tower.trained_user", "user", train=False, derived=True, marks_trained=True)]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The attribute codes and vocabularies of users and items."""
        return self.attrs_checkpoint()

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.restore_attrs(data, tensors, meta)

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        self.tower = self.build_tower(data)

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return F.normalize(self.tower.items(torch.as_tensor(items, dtype=torch.int64)), dim=1).numpy()

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        return self.encode_users(data, users)[0]

    def set_vectors(self, item_vectors: np.ndarray, user_vectors: np.ndarray) -> None:
        super().set_vectors(item_vectors, user_vectors)
        self.interest_counts = (self.user_vectors != 0).any(axis=2).sum(axis=1).astype(np.int32)
