"""NeuralCF / NeuMF (He et al., WWW 2017): GMF and an MLP with separate embeddings, fused by one output layer,
trained pointwise (BCE, `num_negatives` sampled unobserved items per positive), optionally pre-trained (GMF alone,
MLP alone, then NeuMF initialised from both with h = [α h_GMF ; (1−α) h_MLP]: trainer/nn/neumf.py).

Served two-stage (the MLP score cannot be indexed): faiss over the GMF part (query `[h_GMF ⊙ p_u ; p'_u]`, items
`[q_i ; 0]`), then NeuMF rescoring of the top `rescore_n` by the published module (common/towers/neural_cf.py);
the export and incremental updates: trainer/channels/hooks/neural_cf.py. The user embeddings add the mean of the
user's `recent_n` latest items' history embeddings to the id embedding, so the request-time query follows the
user's current clicks. See docs/channels.md ("NeuralCF").
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from common.towers.neural_cf import NeuMFTower
from trainer.channels.hooks.neural_cf import NeuralCFHooks
from trainer.data.train_data import TrainData
from trainer.nn.loop import Batch, LoopConfig, seeded, train_loop
from trainer.nn.losses import bce_loss
from trainer.nn.negatives import PowerSampler, observed_pairs, pointwise_examples
from trainer.nn.neumf import embedding_l2, init_from_pretrained, optimizers
from trainer.nn.user_inputs import drop_user_ids, trained_users
from trainer.nn.warm_start import WarmState


class NeuralCFParams(BaseModel):
    """Hyper-parameters of the NeuralCF channel (defaults: chosen on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    variant: Literal["neumf", "gmf", "mlp"] = Field("neumf", description="the fused model, or one part alone")
    dim: int = Field(32, ge=1, le=1024, description="predictive factors: GMF embedding size = last MLP layer")
    mlp_layers: int = Field(3, ge=1, le=6, description="halving MLP: embeddings dim·2^(L−1) per side, layers "
                            "dim·2^(L−1) → … → dim")
    recent_n: int = Field(5, ge=0, le=500, description="recent items pooled into the user embeddings (0: id only)")
    user_id_dropout: float = Field(0.1, ge=0, le=1, description="share of examples trained as the unknown user")
    num_negatives: int = Field(4, ge=1, le=1000, description="sampled negatives per positive")
    negatives: Literal["uniform", "popularity"] = Field("uniform", description="negatives uniform over the items "
                                                        "with a click, or ∝ count^negatives_power")
    negatives_power: float = Field(0.75, ge=0, le=2)
    exclude_observed: bool = Field(True, description="negatives the user clicked in training are masked out")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(1024, ge=2, le=65536, description="positives per step (each with its negatives)")
    lr: float = Field(0.003, gt=0, le=1)
    reg: float = Field(0.0, ge=0, description="L2 on the embedding rows of each batch")
    pretrain: bool = Field(True, description="train GMF and MLP alone first, then NeuMF from both")
    pretrain_epochs: int | None = Field(None, ge=1, le=1000, description="epochs of each pre-training (null: epochs)")
    alpha: float = Field(0.5, ge=0, le=1, description="pre-training: h = [α h_GMF ; (1−α) h_MLP]")
    finetune: Literal["adam", "sgd"] = Field("adam", description="optimiser of NeuMF after pre-training (the "
                                             "paper: sgd)")
    finetune_lr: float | None = Field(None, gt=0, le=10, description="its learning rate (null: lr)")
    rescore_n: int = Field(500, ge=0, le=100_000, description="first-stage candidates rescored by NeuMF "
                           "(0: serve the GMF part alone)")
    max_catalog_bruteforce: int = Field(0, ge=0, description="catalogues up to this size are scored whole")
    sparse_above: int = Field(4_000_000, ge=0, description="embedding tables holding more floats than this train "
                              "with sparse gradients (SparseAdam; SGD stays SGD); 0 = always")
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")


class NeuralCFChannel(NeuralCFHooks):
    """NeuMF u2i channel: GMF first stage by faiss, NeuMF rescoring (see the module docstring)."""

    model = "neural_cf"
    kinds = ("u2i",)
    Params = NeuralCFParams
    renamed = {"factors": "dim", "num_factors": "dim", "num_neg": "num_negatives", "neg_ratio": "num_negatives"}

    # -- model ------------------------------------------------------------------------------------
    @property
    def mlp_dim(self) -> int:
        p: NeuralCFParams = self.params
        return p.dim * 2 ** (p.mlp_layers - 1)

    def hidden(self) -> list[int]:
        return [self.mlp_dim // 2**j for j in range(self.params.mlp_layers)]

    def new_model(self, data: TrainData, gmf: bool, mlp: bool) -> NeuMFTower:
        m = NeuMFTower(data.n_users, data.n_items, self.params.dim, self.mlp_dim, self.hidden(), self.params.recent_n,
                       gmf=gmf, mlp=mlp)
        with torch.no_grad():
            m.trained_user[: data.n_users] = trained_users(data.user_idx, data.n_users)
            m.catalog[:] = torch.as_tensor(data.item_counts > 0)
        return m

    # -- training ---------------------------------------------------------------------------------
    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: NeuralCFParams = self.params
        self._artifacts = None
        self.losses: dict[str, list[float]] = {}
        with seeded(self.seed, p.num_threads) as rng:
            if p.variant != "neumf":
                self.net = self.new_model(data, gmf=p.variant == "gmf", mlp=p.variant == "mlp")
                self.losses[p.variant] = self._train(self.net, data, rng, p.epochs, "adam", p.lr, progress)
            elif not p.pretrain:
                self.net = self.new_model(data, gmf=True, mlp=True)
                self.losses["neumf"] = self._train(self.net, data, rng, p.epochs, "adam", p.lr, progress)
            else:
                pre = p.pretrain_epochs or p.epochs
                gmf = self.new_model(data, gmf=True, mlp=False)
                self.losses["gmf"] = self._train(gmf, data, rng, pre, "adam", p.lr, progress)
                mlp = self.new_model(data, gmf=False, mlp=True)
                self.losses["mlp"] = self._train(mlp, data, rng, pre, "adam", p.lr, progress)
                self.net = self.new_model(data, gmf=True, mlp=True)
                init_from_pretrained(self.net, gmf, mlp, p.alpha)
                del gmf, mlp
                self.losses["neumf"] = self._train(self.net, data, rng, p.epochs, p.finetune, p.finetune_lr or p.lr,
                                                   progress)
            self.net.set_sparse(False)
            with torch.no_grad():
                self.item_vectors = self.net.item_vectors().numpy().astype(np.float32)
                self.user_vectors = self.encode_users(data)

    def _train(self, net: NeuMFTower, data: TrainData, rng: np.random.Generator, epochs: int, optimizer: str,
               lr: float, progress: bool, warm: WarmState | None = None) -> list[float]:
        """Pointwise BCE: each positive (u, i_t), its user side seeing only the items before t, against
        `num_negatives` sampled items (label 0), every pair one term (1:K, balance=False as in the paper). With
        `warm` (an incremental update): the positives `warm.examples`, the carried optimiser, `net` as `warm` left
        it (frozen)."""
        p: NeuralCFParams = self.params
        n_ex = len(data.item_idx)
        sparse = sum(e.weight.numel() for e in net.embeddings()) > p.sparse_above
        cfg = LoopConfig(epochs=epochs, batch_size=p.batch_size, lr=lr, seed=self.seed, num_threads=p.num_threads,
                         min_batch=1, progress=progress, desc=f"neural_cf {'+'.join(self._parts(net))}")
        if warm is not None:
            net.set_sparse(sparse)  # the row-sparse LazyAdam takes sparse gradients as they come
            opt = [warm.optimizer]
        else:
            opt = optimizers(net, optimizer, cfg, sparse)
        self.optimizer = warm.optimizer if warm is not None else opt
        if n_ex == 0:
            return []
        sampler = PowerSampler(data.item_counts, p.negatives_power if p.negatives == "popularity" else 0.0)
        observed = observed_pairs(data) if p.exclude_observed else None
        k = p.num_negatives

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            users = data.user_idx[g].astype(np.int64)
            uid, attrs, rec, rts = self.user_inputs(data, users, g)
            uid = drop_user_ids(uid, p.user_id_dropout, data.n_users, rng)
            items, valid = pointwise_examples(data, g, k, sampler, observed, rng)
            s = net.rescore(net(uid, attrs, rec, rts), torch.as_tensor(items))
            loss = bce_loss(s[:, 0], s[:, 1:], torch.as_tensor(valid), balance=False)
            if p.reg > 0:
                loss = loss + p.reg * embedding_l2(net, uid, rec, torch.as_tensor(items))
            return loss

        examples = warm.examples if warm else np.arange(n_ex, dtype=np.int64)
        return train_loop(batch_loss, examples, opt, cfg, rng, modules=[] if warm else [net]).losses

    @staticmethod
    def _parts(net: NeuMFTower) -> list[str]:
        return [n for n, on in (("gmf", net.use_gmf), ("mlp", net.use_mlp)) if on]
