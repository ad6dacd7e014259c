"""NeuralCF / NeuMF (He et al., WWW 2017): GMF and an MLP with separate embeddings, fused by one output layer,
trained pointwise (BCE, `num_negatives` sampled unobserved items per positive), optionally pre-trained (GMF alone,
MLP alone, then NeuMF initialised from both with h = [α h_GMF ; (1−α) h_MLP]).

Served two-stage (the MLP score cannot be indexed): faiss over the GMF part (query `[h_GMF ⊙ p_u ; p'_u]`, items
`[q_i ; 0]`), then NeuMF rescoring of the top `rescore_n` (or of the whole catalog when it has at most
`max_catalog_bruteforce` items) by the published module (common/towers/neural_cf.py): `common.towers.rescore.
two_stage`, run by the vector server (`Bundle.search_user`) and the evaluator (`trainer.channels.base._offline_u2i`).
The user embeddings add the mean of the user's `recent_n` latest items' history embeddings to the id embedding, so
the request-time query follows the user's current clicks. See docs/channels.md ("NeuralCF").
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from common.towers import export_tower, history_inputs, input_meta
from common.towers.neural_cf import NeuMFTower
from common.towers.rescore import rescore_meta
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop
from trainer.nn.losses import bce_loss
from trainer.nn.negatives import PowerSampler
from trainer.nn.warm_start import RowTable, WarmState

NO_BRUTEFORCE_LIMIT = 2**62  # the MLP-only variant has no indexable part: always scored whole


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


class NeuralCFChannel(WarmTowerChannel):
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
            m.trained_user[: data.n_users] = torch.as_tensor(np.bincount(data.user_idx, minlength=data.n_users) > 0)
            m.catalog[:] = torch.as_tensor(data.item_counts > 0)
        return m

    def _inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent, recent_ts) of common/towers/inputs.py: the items before `end` (training: the
        example's own position, so no leakage; export: one past the user's last interaction)."""
        x = history_inputs(users, np.zeros((len(users), 1), np.int64), data.item_idx, data.user_ptr[users], end,
                           self.params.recent_n, data.n_items, data.ts)
        return tuple(torch.as_tensor(v) for v in x)

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
        observed = np.unique(data.user_idx.astype(np.int64) * data.n_items + data.item_idx) if p.exclude_observed \
            else None
        k = p.num_negatives

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            users = data.user_idx[g].astype(np.int64)
            uid, attrs, rec, rts = self._inputs(data, users, g)
            if p.user_id_dropout > 0:
                drop = torch.as_tensor(rng.random(len(g)) < p.user_id_dropout)
                uid = torch.where(drop, torch.full_like(uid, data.n_users), uid)
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

    # -- export -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """Query vectors from each user's latest `recent_n` items (what the tower computes at request time)."""
        users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        out = [self.net(*self._inputs(data, users[s:s + 4096], data.user_ptr[users[s:s + 4096] + 1])).numpy()
               for s in range(0, len(users), 4096)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.net.out_dim), np.float32)

    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "neural_cf", its inputs, and how to rescore with it."""
        p: NeuralCFParams = self.params
        blob, meta = export_tower(self.net, input_meta(data.n_users, data.n_items, p.recent_n, [], {}))
        if p.variant == "mlp":
            meta.update(rescore_meta(max(p.rescore_n, 1), NO_BRUTEFORCE_LIMIT))
        elif p.variant == "neumf" and p.rescore_n > 0:
            meta.update(rescore_meta(p.rescore_n, p.max_catalog_bruteforce))
        return blob, meta

    # -- incremental updates between nightlies (docs/event_log.md; the mechanism: trainer/channels/warm_tower.py) --
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def warm_tables(self) -> list[RowTable]:
        """GMF and MLP rows of users and items, the history embeddings, the catalogue (items with a click)."""
        return [RowTable("net.gmf_user.weight", "user", new="unknown"),
                RowTable("net.mlp_user.weight", "user", new="unknown"),
                RowTable("net.trained_user", "user", train=False, derived=True, marks_trained=True),
                RowTable("net.gmf_item.weight", "item", item_vector=True),
                RowTable("net.mlp_item.weight", "item"),  # the rescorer's, published with the tower
                RowTable("net.gmf_hist.weight", "item", history=True),
                RowTable("net.mlp_hist.weight", "item", history=True),
                RowTable("net.catalog", "item", tail=0, train=False, derived=True, item_vector=True)]

    def warm_lr(self) -> float:
        """The step size of the last phase the nightly trained (NeuMF fine-tuning after pre-training)."""
        p: NeuralCFParams = self.params
        return float(p.finetune_lr or p.lr) if p.variant == "neumf" and p.pretrain else float(p.lr)

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.losses = {}

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        p: NeuralCFParams = self.params
        self.net = self.new_model(data, gmf=p.variant != "mlp", mlp=p.variant != "gmf")

    def warm_train(self, data: TrainData, rng: np.random.Generator, rows: np.ndarray, opt: torch.optim.Optimizer,
                   tensors: dict[str, torch.Tensor]) -> list[float]:
        self.losses["incremental"] = self._train(self.net, data, rng, 1, "adam", self.warm_lr(), self.progress,
                                                 WarmState(rows, opt, None))
        self.net.set_sparse(False)
        return self.losses["incremental"]

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.net.item_vectors().numpy()[items]

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        return self.encode_users(data, users)


def pointwise_examples(data: TrainData, rows: np.ndarray, k: int, sampler: PowerSampler, observed: np.ndarray | None,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(items int64 [B, 1+k]: each row's positive then k sampled items, valid bool [B, k]: the sampled item is not
    the positive nor, with `observed` (sorted user·n_items + item keys), an item the user clicked in training)."""
    pos = data.item_idx[rows].astype(np.int64)
    neg = sampler.sample(rng, len(rows) * k).reshape(len(rows), k)
    valid = neg != pos[:, None]
    if observed is not None and len(observed):
        key = data.user_idx[rows].astype(np.int64)[:, None] * data.n_items + neg
        valid &= observed[np.minimum(np.searchsorted(observed, key), len(observed) - 1)] != key
    return np.concatenate([pos[:, None], neg], axis=1), valid


def optimizers(net: NeuMFTower, kind: str, cfg: LoopConfig, sparse: bool) -> list[torch.optim.Optimizer]:
    """Adam (or SGD) over the whole model; with `sparse`, the embedding tables get sparse gradients and SparseAdam
    (dense Adam would update every row of big tables at every step), the MLP and output layer Adam."""
    net.set_sparse(sparse and kind == "adam")
    if kind == "sgd":
        return [torch.optim.SGD(net.parameters(), lr=cfg.lr)]
    if not sparse:
        return [adam(net.parameters(), cfg)]
    tables = {id(e.weight) for e in net.embeddings()}
    return [torch.optim.SparseAdam([e.weight for e in net.embeddings()], lr=cfg.lr),
            adam([w for w in net.parameters() if id(w) not in tables], cfg)]


def init_from_pretrained(net: NeuMFTower, gmf: NeuMFTower, mlp: NeuMFTower, alpha: float) -> None:
    """NeuMF from pre-trained GMF and MLP (paper §3.4.1): embeddings and MLP layers copied, output weights
    h = [α h_GMF ; (1−α) h_MLP] and bias α b_GMF + (1−α) b_MLP."""
    with torch.no_grad():
        for name in ("gmf_user", "gmf_item", "gmf_hist"):
            if getattr(net, name) is not None:
                getattr(net, name).weight.copy_(getattr(gmf, name).weight)
        for name in ("mlp_user", "mlp_item", "mlp_hist", "tower"):
            if getattr(net, name) is not None:
                getattr(net, name).load_state_dict(getattr(mlp, name).state_dict())
        d = net.dim
        net.predict.weight[0, :d] = alpha * gmf.predict.weight[0]
        net.predict.weight[0, d:] = (1 - alpha) * mlp.predict.weight[0]
        net.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)


def embedding_l2(net: NeuMFTower, uid: torch.Tensor, rec: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of the embedding rows a batch uses (per example)."""
    u = torch.clamp(uid, max=net.n_users)
    total = torch.zeros(())
    for user_t, item_t, hist_t in ((net.gmf_user, net.gmf_item, net.gmf_hist), (net.mlp_user, net.mlp_item,
                                                                               net.mlp_hist)):
        if user_t is None:
            continue
        total = total + user_t(u).pow(2).sum(1).mean() + item_t(items).pow(2).sum(-1).sum(1).mean()
        if hist_t is not None and rec.shape[1]:
            total = total + hist_t(torch.clamp(rec, max=net.n_items)).pow(2).sum(-1).sum(1).mean()
    return total
