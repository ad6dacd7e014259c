"""YouTubeDNN candidate generation (Covington, Adams & Sargin, RecSys 2016): "next watch" as extreme multiclass
classification. The user tower (common/towers/youtube_dnn.py: history mean, token bags, attributes, continuous
features) feeds a ReLU tower whose output u scores every item by a softmax over the catalogue, u · v_j (+ b_j), where
the v_j are the softmax's own output embeddings; serving is a dot-product search over them.

Training (see docs/channels.md, "YouTubeDNN"):
- examples predict the item at position g of a user's time-ordered history from the items *before* g only (the
  paper's withheld future), and every epoch draws a fixed number `examples_per_user` of target positions per user
  (seeded), so heavy users do not dominate the loss;
- the example age (training cut-off − the example's time, CDF-normalised) enters the first layer through a
  bias-free projection that exists only while training: the served tower is the model at example age 0;
- loss: the kit's `SampledSoftmax` (negatives ∝ count^negatives_power with logQ correction, accidental hits
  masked), which is the full softmax on catalogues up to `full_softmax_up_to` items.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.towers.youtube_dnn import YouTubeDNNTower
from trainer.channels.hooks.youtube_dnn import YouTubeDNNHooks
from trainer.data.examples import sample_per_user
from trainer.data.train_data import TrainData
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import SampledSoftmax
from trainer.nn.negatives import PowerSampler
from trainer.nn.user_inputs import drop_user_ids, trained_users
from trainer.nn.warm_start import WarmState
from trainer.nn.youtube_inputs import age_edges, continuous_edges, example_age, item_tokens, user_attrs


class YouTubeDNNParams(BaseModel):
    """Hyper-parameters of the YouTubeDNN channel (defaults: chosen on the ml-100k validation split, except
    example_age, on as in the paper: ml-100k validation prefers it off, see docs/benchmarks.md)."""

    model_config = ConfigDict(extra="forbid")
    emb_dim: int = Field(64, ge=2, le=1024, description="size of the history, token and attribute embeddings")
    dim: int = Field(64, ge=2, le=1024, description="user / output item vector size (+1 with item_bias)")
    hidden: list[int] = Field(default_factory=lambda: [128], min_length=1, description="ReLU tower layers")
    recent_n: int = Field(50, ge=1, le=500, description="history items pooled (the tower's R)")
    token_fields: list[str] = Field(default_factory=lambda: ["category", "tags"],
                                    description="item fields whose tokens over the history form one bag each "
                                                "(absent fields are skipped)")
    use_history: bool = Field(True, description="the mean of the history's item embeddings")
    newest_item: bool = Field(True, description="also the newest history item's embedding on its own (an extra "
                                                "categorical input; the paper's history is an unordered bag)")
    use_user_id: bool = Field(False, description="a user-id embedding (not in the paper; DeepMatch's version has it)")
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of examples trained as the unknown user "
                                                               "(use_user_id)")
    use_user_attrs: bool = True
    use_continuous: bool = Field(True, description="history length and last gap, CDF-normalised, with x² and √x")
    zip_prefix: int = Field(1, ge=0, le=10, description="characters of a zip/postcode column kept as a category "
                                                       "(0: drop the column)")
    example_age: bool = Field(True, description="the example-age feature while training (0 at serving)")
    examples_per_user: int | None = Field(100, ge=1, description="target positions drawn per user per epoch "
                                                                "(null: every position)")
    num_negatives: int = Field(1000, ge=1, le=1_000_000, description="sampled softmax negatives per batch")
    negatives_power: float = Field(0.75, ge=0, le=2, description="negatives ∝ count^negatives_power")
    full_softmax_up_to: int = Field(5000, ge=0, description="full softmax on catalogues up to this many items "
                                                            "(else sampled)")
    logq: bool = Field(True, description="subtract log q of the sampler from sampled logits")
    item_bias: bool = Field(True, description="a softmax bias per item (published as an extra dimension)")
    normalize: bool = Field(False, description="cosine logits: L2-normalised vectors divided by temperature")
    temperature: float = Field(0.05, gt=0, le=10, description="τ of the cosine logits (normalize only)")
    share_item_emb: bool = Field(False, description="softmax output embeddings = the history input embeddings "
                                                   "(needs emb_dim == dim)")
    n_quantiles: int = Field(32, ge=2, le=1024, description="quantiles of the continuous features' CDFs")
    epochs: int = Field(25, ge=1, le=1000)
    batch_size: int = Field(512, ge=2, le=65536)
    lr: float = Field(0.001, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")

    @model_validator(mode="after")
    def _check(self) -> YouTubeDNNParams:
        if self.share_item_emb and self.emb_dim != self.dim:
            raise ValueError("share_item_emb needs emb_dim == dim")
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden layer sizes must be ≥ 1")
        return self


class YouTubeDNNChannel(YouTubeDNNHooks):
    """YouTubeDNN u2i channel: request-time user tower, softmax output embeddings as item vectors."""

    model = "youtube_dnn"
    kinds = ("u2i",)
    Params = YouTubeDNNParams

    def _prepare(self, data: TrainData) -> None:
        """Attribute codes, item token table, training candidates and the continuous features' quantiles
        (trainer/nn/youtube_inputs.py)."""
        p: YouTubeDNNParams = self.params
        ua = user_attrs(data.user_attrs if p.use_user_attrs else None, data.n_users, p.zip_prefix)
        self.attr_columns, self.attr_vocab, self.attr_sizes, self.user_attr_codes = ua.columns, ua.vocab, ua.sizes, ua.codes
        tok = item_tokens(data, p.token_fields)
        self.token_fields_used, self.token_size, self.token_vocab, self.item_tokens = tok.used, tok.size, tok.vocab, tok.table
        self.set_candidates(data)
        self.cont_edges = continuous_edges(data, self.cand, self.cand_user, p.recent_n, p.n_quantiles)
        self.age_edges = age_edges(data, self.cand, self.cutoff, p.n_quantiles)

    # -- model --------------------------------------------------------------------------------------
    def _build_model(self, data: TrainData) -> None:
        """The user tower, the training-only example-age projection, the softmax's output rows (item tower)."""
        p: YouTubeDNNParams = self.params
        self.tower = YouTubeDNNTower(data.n_items, p.recent_n, self.attr_sizes, p.emb_dim, p.dim, p.hidden,
                                     self.token_size, len(self.token_fields_used), self.item_tokens.shape[2],
                                     p.n_quantiles, p.item_bias, p.normalize, p.temperature, p.use_history,
                                     p.use_continuous, data.n_users, p.use_user_id,
                                     p.newest_item)
        with torch.no_grad():
            self.tower.item_tokens.copy_(torch.as_tensor(self.item_tokens))
            self.tower.cont_edges.copy_(torch.as_tensor(self.cont_edges))
            if p.use_user_id:
                self.tower.trained_user[: data.n_users] = trained_users(self.cand_user, data.n_users)
        # training-only: example age → first layer, no bias (f(0) = 0: the served tower has no age term)
        self.age_proj = torch.nn.Linear(3, p.hidden[0], bias=False) if p.example_age else None
        if p.share_item_emb:
            self.item_out = self.tower.item_emb
        else:
            self.item_out = torch.nn.Embedding(data.n_items, p.dim)
            torch.nn.init.normal_(self.item_out.weight, std=0.05)
        self.item_b = torch.nn.Embedding(data.n_items, 1) if p.item_bias else None
        if self.item_b is not None:
            torch.nn.init.zeros_(self.item_b.weight)

    def item_vectors_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The softmax's output vectors of `ids` (with the bias column when item_bias): <user, item> = logit."""
        v = self.item_out(ids)
        if self.params.normalize:
            v = torch.nn.functional.normalize(v, dim=1)
        if self.item_b is not None:
            v = torch.cat([v, self.item_b(ids)], dim=1)
        return v

    def user_train(self, data: TrainData, users: np.ndarray, positions: np.ndarray,
                   rng: np.random.Generator | None = None) -> torch.Tensor:
        """User vectors of training examples at `positions` (history before them, plus their example age); with
        `rng` and use_user_id, a share `user_id_dropout` of them as the unknown user."""
        p: YouTubeDNNParams = self.params
        uid, attrs, rec, rts = self.user_inputs(data, users, positions)
        if rng is not None and p.use_user_id:
            uid = drop_user_ids(uid, p.user_id_dropout, data.n_users, rng)
        pre = self.tower.first(self.tower.features(uid, attrs, rec, rts))
        if self.age_proj is not None:
            pre = pre + self.age_proj(example_age(data, positions, self.cutoff, self.age_edges))
        return self.tower.output(pre)

    # -- training ---------------------------------------------------------------------------------
    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: YouTubeDNNParams = self.params
        t0 = time.perf_counter()
        self.loop_config = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                                      seed=self.seed, num_threads=p.num_threads, min_batch=2, progress=progress,
                                      desc="youtube_dnn")
        with seeded(self.seed, p.num_threads) as rng:
            self._artifacts = None
            self._prepare(data)
            self._build_model(data)
            self._train(data, rng)
            with torch.no_grad():
                self.item_vectors = self.item_vectors_of(torch.arange(data.n_items)).numpy().astype(np.float32)
            self.user_vectors = self.encode_users(data).astype(np.float32)
        self.metrics = {"fit_s": time.perf_counter() - t0, "loss": self.losses[-1] if self.losses else float("nan")}

    def _train(self, data: TrainData, rng: np.random.Generator, warm: WarmState | None = None) -> None:
        """Train on sampled positions of every user; or, with `warm` (an incremental update), on the candidates
        among `warm.examples` once, with the carried optimiser and the modules as `warm` left them (frozen)."""
        p: YouTubeDNNParams = self.params
        self.losses: list[float] = []
        self.steps = 0
        modules = [m for m in (self.tower, self.age_proj, self.item_out, self.item_b) if m is not None]
        self.optimizer = warm.optimizer if warm else adam(unique_parameters(*modules), self.loop_config)
        if len(self.cand) == 0:
            return
        # the sampler's counts (its log q) are those of every interaction so far, new events included
        self.softmax = SampledSoftmax(PowerSampler(data.item_counts, p.negatives_power), num_sampled=p.num_negatives,
                                      temperature=1.0, logq=p.logq, full_up_to=p.full_softmax_up_to)

        def examples(r: np.random.Generator) -> np.ndarray:
            if warm is not None:
                return np.intersect1d(warm.examples, self.cand)
            return sample_per_user(self.cand, self.cand_user, p.examples_per_user, r)

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            u = self.user_train(data, data.user_idx[g].astype(np.int64), g, rng)
            return self.softmax(u, torch.as_tensor(data.item_idx[g].astype(np.int64)), self.item_vectors_of, rng)

        history = train_loop(batch_loss, examples, self.optimizer, self.loop_config, rng,
                             modules=[] if warm else modules)
        self.losses, self.steps = history.losses, history.steps
