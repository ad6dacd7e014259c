"""Two-tower (DSSM) retrieval: a user tower and an item tower trained so that cos(user, item)/τ ranks the
next clicked item first; exports item vectors, precomputed user vectors and the user tower (a state dict of
`common.towers` arch "two_tower_user", which the vector server rebuilds).

Training example = one interaction (u, i_t); the user side sees only the `recent_n` items *before* t
(no leakage). Losses: listwise softmax, pointwise BCE (1:k), pairwise hinge / logistic. Negatives:
in-batch (with logQ correction from a streaming frequency estimator), random ∝ count^0.75, mixed
(in-batch + random), hard (part random, part items ranked just below the top by the current model),
or the full catalog (small catalogs). See docs/channels.md ("Two-tower") for the choices and figures.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.towers.two_tower_user import UserTower
from trainer.budget import scaled_epochs
from trainer.channels.hooks.two_tower import TwoTowerHooks
from trainer.data.train_data import TrainData
from trainer.nn.encoding import item_tower_encoding, user_tower_encoding
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import logits, pair_logits, ranking_loss, row_logits
from trainer.nn.negatives import (
    HardNegativeMiner,
    PowerSampler,
    StreamingFrequencyEstimator,
    batch_negatives,
    candidate_log_q,
    keep_probability,
    log_frequencies,
    relative_log_q,
)
from trainer.nn.towers import ItemTower
from trainer.nn.user_inputs import drop_user_ids, trained_users
from trainer.nn.warm_start import LazyAdam, WarmState


class TwoTowerParams(BaseModel):
    """Hyper-parameters of the two-tower channel (defaults: best found on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    emb_dim: int = Field(64, ge=2, le=1024, description="embedding size of every input field")
    dim: int = Field(64, ge=2, le=1024, description="output (retrieval) vector size")
    hidden: list[int] = Field(default_factory=lambda: [128], description="hidden layer sizes of each tower's MLP")
    dropout: float = Field(0.0, ge=0, lt=1)
    recent_n: int = Field(10, ge=1, le=500, description="recent items pooled in the user tower")
    use_user_id: bool = True
    use_user_attrs: bool = True
    use_item_attrs: bool = True
    recent_last: bool = Field(True, description="also feed the newest recent item's embedding as its own field")
    share_item_emb: bool = Field(True, description="recent-item embeddings = item tower's id embeddings")
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of examples trained as an unknown user")
    senet: bool = Field(False, description="SENet re-weighting of each tower's field embeddings")
    loss: Literal["listwise", "pointwise", "hinge", "logistic"] = "listwise"
    negatives: Literal["in_batch", "random", "mixed", "hard", "full"] = "in_batch"
    num_negatives: int = Field(64, ge=1, le=100_000, description="negatives per positive (pointwise ratio 1:k; random/"
                       "hard/mixed sample size)")
    logq: bool = Field(True, description="sampling-bias correction s(x,y) − log q(y)")
    logq_weight: float = Field(1.25, ge=0, le=2, description="β in s(x,y) − β·log q(y)")
    logq_source: Literal["stream", "exact"] = Field("stream", description="in-batch q: streaming estimator or counts")
    temperature: float = Field(0.05, gt=0, le=10)
    margin: float = Field(0.2, ge=0, le=2, description="hinge margin (cosine units)")
    hard_fraction: float = Field(0.5, ge=0, le=1, description="hard share of the negatives (negatives='hard')")
    hard_from: int = Field(10, ge=0, description="hard negatives: model ranks [hard_from, hard_to)")
    hard_to: int = Field(100, ge=1)
    hard_refresh: int = Field(20, ge=1, description="steps between refreshes of the item vectors used for mining")
    pos_subsample: float = Field(0.0, ge=0, le=1, description="word2vec-style down-sampling of popular positives "
                                 "(threshold on item frequency; 0 = off)")
    epochs: int = Field(7, ge=1, le=1000)
    max_examples: int | None = Field(3_000_000, ge=1, description="scale rule: at most this many training examples "
                                     "per fit, in whole epochs (epochs = clamp(max_examples // interactions, 1, "
                                     "epochs)); None = always `epochs` (docs/channels.md)")
    batch_size: int = Field(512, ge=2, le=65536)
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    freq_hash_size: int = Field(1 << 16, ge=16)
    freq_hashes: int = Field(2, ge=1, le=8)
    freq_alpha: float = Field(0.01, gt=0, le=1)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")
    lazy_tables_above: int | None = Field(1_000_000, ge=0, description="ID tables of more than this many weights "
                                          "((users + items) × emb_dim) train with a row-sparse (lazy) Adam, the "
                                          "other weights with Adam; None = dense Adam always (docs/channels.md)")

    @model_validator(mode="after")
    def _check(self) -> TwoTowerParams:
        if self.hard_to <= self.hard_from:
            raise ValueError("hard_to must be > hard_from")
        return self



class TwoTowerChannel(TwoTowerHooks):
    """DSSM-style two-tower u2i channel."""

    model = "two_tower"
    kinds = ("u2i",)
    Params = TwoTowerParams
    renamed = {"n_neg": "num_negatives"}

    # -- features ---------------------------------------------------------------------------------
    def _prepare(self, data: TrainData) -> None:
        p: TwoTowerParams = self.params
        self.user_enc, self.user_attr_codes = user_tower_encoding(data.user_attrs if p.use_user_attrs else None,
                                                                  data.n_users)
        self.item_enc = item_tower_encoding(data.item_attrs if p.use_item_attrs else None, data.n_items,
                                            data.category_column)

    def _build_model(self, data: TrainData) -> None:
        p: TwoTowerParams = self.params
        item_emb_item = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
        torch.nn.init.normal_(item_emb_item.weight, std=0.05)
        with torch.no_grad():
            item_emb_item.weight[data.n_items].zero_()
        if p.share_item_emb:
            item_emb_user = item_emb_item
        else:
            item_emb_user = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
            torch.nn.init.normal_(item_emb_user.weight, std=0.05)
            with torch.no_grad():
                item_emb_user.weight[data.n_items].zero_()
        self.user_tower = UserTower(data.n_users, data.n_items, self.user_enc.sizes, p.emb_dim, p.dim, p.hidden,
                                    p.dropout, p.senet, p.use_user_id, item_emb_user, p.recent_last)
        with torch.no_grad():
            self.user_tower.trained_user[: data.n_users] = trained_users(data.user_idx, data.n_users)
        self.item_tower = ItemTower(data.n_items, self.item_enc.codes, self.item_enc.sizes, p.emb_dim, p.dim,
                                    p.hidden, p.dropout, p.senet, item_emb_item)
        self.bias = torch.nn.Parameter(torch.zeros(()))  # pointwise BCE offset

    # -- training ---------------------------------------------------------------------------------
    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: TwoTowerParams = self.params
        self.epochs_run = scaled_epochs(p.epochs, len(data.item_idx), p.max_examples)
        self.loop_config = LoopConfig(epochs=self.epochs_run, batch_size=p.batch_size, lr=p.lr,
                                      weight_decay=p.weight_decay, seed=self.seed, num_threads=p.num_threads,
                                      min_batch=2, progress=progress, desc="two_tower")
        with seeded(self.seed, p.num_threads) as rng:
            self._artifacts = None
            self._prepare(data)
            self._build_model(data)
            self._train(data, rng)
            self.item_vectors = self.encode_items(data).astype(np.float32)
            self.user_vectors = self.encode_users(data).astype(np.float32)

    def _train(self, data: TrainData, rng: np.random.Generator, warm: WarmState | None = None) -> None:
        """Train on every interaction; or, with `warm` (an incremental update), on `warm.examples` only, with the
        carried optimiser and frequency estimator and the modules as `warm` left them (frozen, eval mode)."""
        p: TwoTowerParams = self.params
        n_ex, n_items = len(data.item_idx), data.n_items
        self.losses: list[float] = []
        estimator = warm.estimator if warm else StreamingFrequencyEstimator(p.freq_hash_size, p.freq_hashes,
                                                                            p.freq_alpha, seed=self.seed)
        if warm is None:
            opt = self._optimizers(data)
        else:
            opt = warm.optimizer
        self.optimizer, self.estimator = opt, estimator  # the state an incremental update carries on
        if n_ex == 0 or (warm is not None and len(warm.examples) == 0):
            return
        sampler = PowerSampler(data.item_counts, 0.75)
        exact = log_frequencies(data.item_counts) if p.logq_source == "exact" else None
        keep = keep_probability(data.item_counts, p.pos_subsample)
        positions = np.arange(n_ex, dtype=np.int64)
        examples = (lambda r: positions[r.random(n_ex) < keep[data.item_idx]]) if p.pos_subsample > 0 else positions
        if warm is not None:
            examples = warm.examples
        all_items = torch.arange(n_items, dtype=torch.int64)
        miner = HardNegativeMiner(p.hard_from, p.hard_to, p.hard_refresh)

        def encode_all() -> torch.Tensor:
            was_training = self.item_tower.training
            self.item_tower.eval()
            out = self.item_tower(all_items)
            self.item_tower.train(was_training)
            return out

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            users = data.user_idx[g].astype(np.int64)
            pos_np = data.item_idx[g].astype(np.int64)
            uid, attrs, rec = self._user_inputs(data, users, g)
            uid = drop_user_ids(uid, p.user_id_dropout, data.n_users, rng)
            estimator.update(pos_np)
            pos = torch.as_tensor(pos_np)
            u = self.user_tower(uid, attrs, rec)
            shared, n_hard = batch_negatives(p.negatives, pos_np, rng, sampler, p.num_negatives, p.hard_fraction,
                                             pointwise=p.loss == "pointwise")
            row = miner.mine(u.detach(), n_hard, rng, b.step, encode_all) if n_hard else None
            ids = [pos, shared] + ([row.ravel()] if row is not None else [])
            uniq, inv = torch.unique(torch.cat(ids), return_inverse=True)
            vecs = self.item_tower(uniq)
            n_random = len(shared) - (len(g) if p.negatives == "mixed" else 0)
            log_q = candidate_log_q(p.negatives, uniq, len(g), n_random, sampler, estimator, exact) if p.logq else None
            # relative to a uniform catalogue: a constant shift that cancels in softmax and pairwise losses and
            # spares the pointwise bias from learning −log(1/n_items)
            lq = None if log_q is None else relative_log_q(log_q[inv], n_items, p.logq_weight)
            n_pos, n_sh = len(pos), len(shared)
            v_pos, v_sh = vecs[inv[:n_pos]], vecs[inv[n_pos:n_pos + n_sh]]
            pos_logit = pair_logits(u, v_pos, p.temperature, None if lq is None else lq[:n_pos])
            neg = logits(u, v_sh, p.temperature, None if lq is None else lq[n_pos:n_pos + n_sh])
            valid = torch.as_tensor(shared.numpy()[None, :] != pos_np[:, None])
            if row is not None:
                v_row = vecs[inv[n_pos + n_sh:]].view(len(g), row.shape[1], -1)
                lq_row = None if lq is None else lq[n_pos + n_sh:].view(len(g), -1)
                neg = torch.cat([neg, row_logits(u, v_row, p.temperature, lq_row)], dim=1)
                valid = torch.cat([valid, row != pos.unsqueeze(1)], dim=1)
            return ranking_loss(pos_logit, neg, valid, p.loss, p.temperature, p.margin, self.bias)

        modules = [] if warm is not None else [self.user_tower, self.item_tower]  # eval mode when it returns
        history = train_loop(batch_loss, examples, opt, self.loop_config, rng, modules=modules)
        self.losses = history.losses

    def _optimizers(self, data: TrainData) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        """Adam over every weight; with large ID tables (`lazy_tables_above`), LazyAdam over the tables (only the rows
        a batch touched step, so a step costs O(batch), not O(users + items)) and Adam over the rest."""
        p: TwoTowerParams = self.params
        params = unique_parameters(self.user_tower, self.item_tower) + ([self.bias] if p.loss == "pointwise" else [])
        if p.lazy_tables_above is None or (data.n_users + data.n_items) * p.emb_dim <= p.lazy_tables_above:
            return adam(params, self.loop_config)
        # sparse gradients: only the batch's rows (data-parallel all-gathers those rows: trainer/nn/loop.DataParallel)
        self.user_tower.user_emb.sparse = True
        self.item_tower.item_emb.sparse = True
        tables = unique_parameters([self.user_tower.user_emb.weight, self.item_tower.item_emb.weight,
                                    self.user_tower.item_emb.weight])
        table_ids = {id(t) for t in tables}
        rest = [q for q in params if id(q) not in table_ids]
        return [LazyAdam(tables, lr=p.lr, weight_decay=p.weight_decay), adam(rest, self.loop_config)]
