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
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.towers import export_tower, history_inputs, input_meta
from common.towers.youtube_dnn import YouTubeDNNTower, powers, quantile_cdf
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.io import item_field_column
from trainer.data.train_data import TrainData
from trainer.nn.encoding import TOWER, codes_from_vocab, encode_attrs, encode_column, value_strings
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import SampledSoftmax
from trainer.nn.negatives import PowerSampler
from trainer.nn.warm_start import RowTable, WarmState, extend_codes

ZIP_NAMES = ("zip", "postcode", "postal")


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


def zip_prefix_column(name: str, values: pd.Series, n_chars: int) -> tuple[np.ndarray, dict[str, int], int] | None:
    """A zip/postcode column as the category of its first `n_chars` characters: (codes [n_rows], vocab mapping
    every spelling of each *raw* value to its prefix's code — what a request sends —, number of codes), or None."""
    raw = values.reset_index(drop=True)
    col = encode_column(name, raw.astype("string").str.strip().str[:n_chars], options=TOWER)
    if col is None:
        return None
    codes = col.codes[:, 0].astype(np.int64)
    uniq = pd.DataFrame({"v": raw.astype(object), "c": codes})[raw.notna().to_numpy()].drop_duplicates("v")
    vocab = {key: int(c) for v, c in zip(uniq["v"], uniq["c"], strict=True) if c > 0 for key in value_strings(v)}
    return codes, vocab, col.size


def sample_per_user(cand: np.ndarray, cand_user: np.ndarray, k: int | None,
                    rng: np.random.Generator) -> np.ndarray:
    """`k` of each user's candidate positions, drawn without replacement (all of them when a user has ≤ k);
    `cand` grouped by user (`cand_user` non-decreasing). Vectorised: one random key per candidate, ranked within
    its user."""
    if k is None:
        return cand
    keys = rng.random(len(cand))
    order = np.lexsort((keys, cand_user))  # user blocks stay where they are, shuffled inside
    start = np.searchsorted(cand_user, cand_user[order], side="left")
    rank = np.arange(len(cand)) - start
    return np.sort(cand[order][rank < k])


class YouTubeDNNChannel(WarmTowerChannel):
    """YouTubeDNN u2i channel: request-time user tower, softmax output embeddings as item vectors."""

    model = "youtube_dnn"
    kinds = ("u2i",)
    Params = YouTubeDNNParams

    # -- features ---------------------------------------------------------------------------------
    def _prepare(self, data: TrainData) -> None:
        """Attribute codes, item token table, training candidates and the continuous features' quantiles."""
        p: YouTubeDNNParams = self.params
        ua = data.user_attrs if p.use_user_attrs else None
        zips = [c for c in (ua.columns if ua is not None else []) if any(z in str(c).lower() for z in ZIP_NAMES)]
        enc = encode_attrs(ua.drop(columns=zips) if ua is not None else None, data.n_users, multi_valued=False,
                           max_numeric_values=2000)
        cols, vocab, sizes = list(enc.columns), dict(enc.vocab), list(enc.sizes)
        codes = [enc.codes[:, :, 0]] if enc.columns else []
        for z in zips if p.zip_prefix > 0 else []:
            got = zip_prefix_column(str(z), ua[z], p.zip_prefix)
            if got is not None:
                cols.append(str(z))
                vocab[str(z)], codes = got[1], codes + [got[0][:, None]]
                sizes.append(got[2])
        self.attr_columns, self.attr_vocab, self.attr_sizes = cols, vocab, sizes
        self.user_attr_codes = (np.hstack(codes) if codes else np.zeros((data.n_users, 1), np.int64)).astype(np.int64)
        self._item_tokens(data)
        self._candidates(data)
        self.cont_edges = self._continuous_edges(data)
        ages = np.log1p(np.maximum(self.cutoff - data.ts[self.cand], 0)).astype(np.float64)
        self.age_edges = self._edges(ages, force_zero=True)

    def _candidates(self, data: TrainData) -> None:
        """Training candidates: every position with at least one earlier item of the same user; the cut-off time."""
        pos = np.arange(len(data.item_idx), dtype=np.int64)
        self.cand = pos[pos > data.user_ptr[data.user_idx]]
        self.cand_user = data.user_idx[self.cand].astype(np.int64)
        self.cutoff = int(data.ts.max()) if len(data.ts) else 0

    def _item_tokens(self, data: TrainData) -> None:
        """int64 [n_items + 1, F, W]: each item's codes in each token field, offset into one table (0 = none)."""
        p: YouTubeDNNParams = self.params
        fields: list[np.ndarray] = []
        size, used, vocab = 1, [], []
        for f in dict.fromkeys(p.token_fields):
            col = item_field_column(data.item_attrs, f)
            if col is None or col in used:
                continue
            cc = encode_column(col, data.item_attrs[col], multi=True, options=TOWER) if data.n_items else None
            if cc is None:
                continue
            c = np.where(cc.codes > 0, cc.codes + size - 1, 0)  # code k ≥ 1 → row size-1+k; rare/none → 0
            fields.append(c)
            vocab.append({"column": col, "vocab": cc.vocab, "offset": size - 1})
            size += cc.size - 1
            used.append(col)
        self.token_fields_used, self.token_size, self.token_vocab = used, size, vocab
        width = max((f.shape[1] for f in fields), default=1)
        tok = np.zeros((data.n_items + 1, max(len(fields), 1), width), np.int64)
        for j, f in enumerate(fields):
            tok[: data.n_items, j, : f.shape[1]] = f
        self.item_tokens = tok

    def _edges(self, values: np.ndarray, force_zero: bool = False) -> np.ndarray:
        q = self.params.n_quantiles
        if len(values) == 0:
            return np.arange(q + 1, dtype=np.float32)
        e = np.quantile(values, np.linspace(0, 1, q + 1)).astype(np.float32)
        if force_zero:
            e[0] = 0.0
        return e

    def _continuous_edges(self, data: TrainData) -> np.ndarray:
        """[2, Q+1]: quantiles of log1p(history length) and log1p(last gap, where known) over the candidates."""
        g, start = self.cand, data.user_ptr[self.cand_user]
        n = np.minimum(g - start, self.params.recent_n)
        has2 = g - 2 >= start
        t1, t2 = data.ts[g - 1], data.ts[np.maximum(g - 2, 0)]
        known = has2 & (t1 > 0) & (t2 > 0)
        gap = np.maximum(t1 - t2, 0)[known]
        return np.stack([self._edges(np.log1p(n).astype(np.float64)), self._edges(np.log1p(gap).astype(np.float64))])

    def _inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent, recent_ts): the encoding of common/towers/inputs.py (the one serving uses)."""
        x = history_inputs(users, self.user_attr_codes[users], data.item_idx, data.user_ptr[users], end,
                           self.params.recent_n, data.n_items, ts=data.ts)
        return tuple(torch.as_tensor(a) for a in x)

    def example_age(self, data: TrainData, positions: np.ndarray) -> torch.Tensor:
        """[B, 3]: the normalised example age of training examples at `positions` (powers of its CDF; 0 at age 0)."""
        age = torch.as_tensor(np.log1p(np.maximum(self.cutoff - data.ts[positions], 0)), dtype=torch.float32)
        return powers(quantile_cdf(age, torch.as_tensor(self.age_edges)))

    # -- model --------------------------------------------------------------------------------------
    def _build_model(self, data: TrainData) -> None:
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
                self.tower.trained_user[: data.n_users] = torch.as_tensor(np.bincount(
                    self.cand_user, minlength=data.n_users)[: data.n_users] > 0)
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
        uid, attrs, rec, rts = self._inputs(data, users, positions)
        if rng is not None and self.params.use_user_id and self.params.user_id_dropout > 0:
            drop = torch.as_tensor(rng.random(len(uid)) < self.params.user_id_dropout)
            uid = torch.where(drop, torch.full_like(uid, data.n_users), uid)
        pre = self.tower.first(self.tower.features(uid, attrs, rec, rts))
        if self.age_proj is not None:
            pre = pre + self.age_proj(self.example_age(data, positions))
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
        opt = self.optimizer

        def examples(r: np.random.Generator) -> np.ndarray:
            if warm is not None:
                return np.intersect1d(warm.examples, self.cand)
            return sample_per_user(self.cand, self.cand_user, p.examples_per_user, r)

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            u = self.user_train(data, data.user_idx[g].astype(np.int64), g, rng)
            return self.softmax(u, torch.as_tensor(data.item_idx[g].astype(np.int64)), self.item_vectors_of, rng)

        history = train_loop(batch_loss, examples, opt, self.loop_config, rng, modules=[] if warm else modules)
        self.losses, self.steps = history.losses, history.steps

    # -- export -----------------------------------------------------------------------------------
    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "youtube_dnn", its hparams and the input meta."""
        return export_tower(self.tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                   self.attr_columns, self.attr_vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """Served user vectors (example age 0) from each user's latest `recent_n` items and their times."""
        users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        out = [self.tower(*self._inputs(data, users[b:b + 4096], data.user_ptr[users[b:b + 4096] + 1])).numpy()
               for b in range(0, len(users), 4096)]
        width = self.params.dim + int(self.params.item_bias)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    # -- incremental updates between nightlies (docs/event_log.md; the mechanism: trainer/channels/warm_tower.py) --
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"tower": self.tower, "age_proj": self.age_proj, "item_b": self.item_b,
                "item_out": None if self.params.share_item_emb else self.item_out}
        return {k: m for k, m in mods.items() if m is not None}

    def warm_tables(self) -> list[RowTable]:
        """The history embeddings and token codes of the items, the softmax's output rows (and biases) — which grow
        like the item table —, the user rows (use_user_id)."""
        shared = self.params.share_item_emb
        return [RowTable("tower.item_emb.weight", "item", history=True, item_vector=shared),
                RowTable("tower.item_tokens", "item", train=False),
                RowTable("tower.user_emb.weight", "user", new="unknown"),
                RowTable("tower.trained_user", "user", train=False, derived=True, marks_trained=True),
                RowTable("item_out.weight", "item", tail=0, item_vector=True),
                RowTable("item_b.weight", "item", tail=0, item_vector=True)]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The user attribute codes and vocabularies, the token fields' vocabularies, the example-age quantiles."""
        return {"user_attr_codes": torch.as_tensor(self.user_attr_codes)}, {
            "attr_columns": self.attr_columns, "attr_vocab": self.attr_vocab, "attr_sizes": self.attr_sizes,
            "token_vocab": self.token_vocab, "token_size": self.token_size, "age_edges": self.age_edges.tolist()}

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        n_u0, n_i0 = int(meta["n_users"]), int(meta["n_items"])
        self.attr_columns, self.attr_vocab, self.attr_sizes = meta["attr_columns"], meta["attr_vocab"], meta["attr_sizes"]
        fields = [{"name": c, "vocab": self.attr_vocab[c], "kind": "categorical"} for c in self.attr_columns]
        self.user_attr_codes = extend_codes(tensors["user_attr_codes"].numpy(), n_u0, data.n_users,
                                            data.user_attrs if self.params.use_user_attrs else None, fields)
        self.token_vocab, self.token_size = meta["token_vocab"], int(meta["token_size"])
        self.token_fields_used = [f["column"] for f in self.token_vocab]
        old = tensors["tower.item_tokens"].numpy()
        new = np.zeros((data.n_items - n_i0, *old.shape[1:]), np.int64)
        for j, f in enumerate(self.token_vocab):
            if data.item_attrs is not None and f["column"] in data.item_attrs.columns and len(new):
                c = codes_from_vocab(data.item_attrs[f["column"]].iloc[n_i0:], f["vocab"], True, old.shape[2])
                new[:, j] = np.where(c > 0, c + f["offset"], 0)
        self.item_tokens = np.concatenate([old[:n_i0], new, old[n_i0:]])
        self.cont_edges = tensors["tower.cont_edges"].numpy()
        self.age_edges = np.asarray(meta["age_edges"], np.float32)
        self._candidates(data)  # the cut-off moves to the newest event: the new examples are the youngest

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.item_vectors_of(torch.as_tensor(items, dtype=torch.int64)).numpy()
