"""Factorisation machine over vocab-indexed user, item and context features, trained with BCE on
clicks vs sampled negatives (torch, sparse Adam).

    ŷ(x) = w0 + Σ_i w_i x_i + ½ Σ_f [(Σ_i v_if x_i)² − Σ_i v_if² x_i²]

Fields: user id, user attributes, context of the interaction (environment/region when present),
item id, item categories (multi-valued, weight 1/n each) and other categorical or binned numeric item
attributes. The user side (user fields + the user's latest context) and the item side each sum to one
vector, so <[s_U, 1, c_U], [s_I, c_I, 1]> equals the full FM logit: u2i vectors, and cosine i2i / u2u
lists over s_I / s_U (exact faiss). Attributes are encoded by the neural kit's encoder (trainer/nn/encoding.py,
FM's options), trained with its sampler, BCE and loop; the artifacts come from the EmbeddingChannel base.
See docs/channels.md ("FM").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import rankdata
from torch import nn

from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData
from trainer.nn.encoding import ColumnCodes, encode_column, fm_options
from trainer.nn.loop import Batch, LoopConfig, seeded, train_loop
from trainer.nn.losses import bce_loss
from trainer.nn.negatives import PowerSampler

log = logging.getLogger(__name__)

# Embedding-table size (features × factors) above which the tables get sparse gradients and SparseAdam.
SPARSE_ABOVE = 4_000_000
# Rows per step when the exported user/item sums are computed.
EXPORT_CHUNK = 16384


# ---------------------------------------------------------------------------------------------------------
# features


@dataclass
class FieldCodes:
    """One field's encoding: codes [n_rows, m] into `vocab` (-1 = none), weights [n_rows, m]."""

    name: str
    codes: np.ndarray
    weights: np.ndarray
    vocab: list[str]


def fm_field(fc: ColumnCodes) -> FieldCodes:
    """FM's features of an encoded column: one per code that occurs, in code order, the rare bucket (code 0,
    '<rare>') last; a bag's values weigh 1/n each, a missing value is no feature."""
    used = np.unique(fc.codes[fc.codes >= 0])
    order = np.concatenate([used[used > 0], used[used == 0]])
    slot = np.full(fc.size, -1, np.int64)
    slot[order] = np.arange(len(order))
    codes = np.where(fc.codes >= 0, slot[np.clip(fc.codes, 0, None)], -1)
    return FieldCodes(fc.name, codes, fc.weights(), [fc.labels[c] for c in order])


@dataclass
class FeatureSpace:
    """Global feature indices (0 = padding) per side: users [n_users, Fu], items [n_items, Fi],
    context per interaction [n_interactions, Fc] and each user's latest context [n_users, Fc]."""

    user_idx: np.ndarray
    user_w: np.ndarray
    item_idx: np.ndarray
    item_w: np.ndarray
    ctx_idx: np.ndarray
    ctx_w: np.ndarray
    user_ctx_idx: np.ndarray
    user_ctx_w: np.ndarray
    n_features: int
    fields: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # name → (side, offset, size)


def history_codes(data: TrainData, n: int, decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each interaction's previous `n` items of the same user (newest first, weights ∝ decay^j summing to 1),
    and each user's latest `n` items (the history a next interaction would see). -1 = none."""
    lengths = np.diff(data.user_ptr)
    rows = np.arange(len(data.user_idx), dtype=np.int64)
    pos = rows - np.repeat(data.user_ptr[:-1], lengths)
    j = np.arange(n, dtype=np.int64)

    def gather(src: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = np.where(ok, data.item_idx[np.clip(src, 0, None)], -1).astype(np.int64)
        w = np.where(ok, np.power(decay, j, dtype=np.float64)[None, :], 0.0)
        tot = w.sum(1, keepdims=True)
        return codes, (w / np.where(tot > 0, tot, 1.0)).astype(np.float32)

    codes, w = gather(rows[:, None] - 1 - j[None, :], pos[:, None] > j[None, :])
    ucodes, uw = gather(data.user_ptr[1:, None] - 1 - j[None, :], lengths[:, None] > j[None, :])
    return codes, w, ucodes, uw


def build_feature_space(data: TrainData, n_bins: int = 10, min_count: int = 2,
                        use_user_attrs: bool = True, use_item_attrs: bool = True,
                        use_context: bool = True, history_n: int = 0, history_decay: float = 0.8) -> FeatureSpace:
    """Vocab-index every feature of `data` (ids, attributes, context, recent items) into one embedding table.

    Attribute columns follow the kit encoder's FM rules (`fm_options`): numbers with more than `n_bins` values in
    quantile bins, values seen fewer than `min_count` times in one '<rare>' feature, id-like columns (more
    distinct values than half the rows) skipped, the item category column a bag of categories."""
    opts = fm_options(n_bins, min_count)
    offset = 1
    fields: dict[str, tuple[str, int, int]] = {}
    blocks: dict[str, list[tuple[np.ndarray, ...]]] = {"user": [], "item": [], "context": []}
    last = data.user_ptr[1:] - 1
    has = np.diff(data.user_ptr) > 0

    def add(side: str, fc: FieldCodes, user_latest: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Append a field; context fields also carry each user's latest value ([n_users, m] codes, weights)."""
        nonlocal offset
        size = len(fc.vocab)
        to_idx = lambda c: np.where(c >= 0, c + offset, 0).astype(np.int64)  # noqa: E731
        block = [to_idx(fc.codes), np.where(fc.codes >= 0, fc.weights, 0.0).astype(np.float32)]
        if side == "context":
            if user_latest is None:  # the context of the user's latest interaction
                codes = np.full((data.n_users, fc.codes.shape[1]), -1, np.int64)
                w = np.zeros(codes.shape, np.float32)
                codes[has], w[has] = fc.codes[last[has]], fc.weights[last[has]]
                user_latest = (codes, w)
            block += [to_idx(user_latest[0]), np.where(user_latest[0] >= 0, user_latest[1], 0.0).astype(np.float32)]
        blocks[side].append(tuple(block))
        fields[f"{side}:{fc.name}"] = (side, offset, size)
        offset += size

    ident = lambda n: np.arange(n, dtype=np.int64)[:, None]  # noqa: E731
    add("user", FieldCodes("id", ident(data.n_users), np.ones((data.n_users, 1), np.float32), data.user_map.ids))
    if use_user_attrs and data.user_attrs is not None:
        for col in data.user_attrs.columns:
            fc = encode_column(str(col), data.user_attrs[col], False, opts)
            if fc is not None:
                add("user", fm_field(fc))
    add("item", FieldCodes("id", ident(data.n_items), np.ones((data.n_items, 1), np.float32), data.item_map.ids))
    if use_item_attrs and data.item_attrs is not None:
        cat = data.category_column
        item_opts = replace(opts, categorical=(cat,) if cat else ())  # an integer category id is not a quantity
        for col in data.item_attrs.columns:
            fc = encode_column(str(col), data.item_attrs[col], col == cat, item_opts)
            if fc is not None:
                add("item", fm_field(fc))
    if use_context:
        ctx_opts = replace(opts, max_unique_fraction=None)  # a context value is never an id
        for col, values in sorted(data.context.items()):
            fc = encode_column(col, pd.Series(values, dtype=object), False, ctx_opts)
            if fc is not None:
                add("context", fm_field(fc))
    if history_n > 0:
        codes, w, ucodes, uw = history_codes(data, history_n, history_decay)
        add("context", FieldCodes("history", codes, w, data.item_map.ids), (ucodes, uw))

    def stack(side: str, n: int, part: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if not blocks[side]:
            return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
        return (np.hstack([b[part] for b in blocks[side]]).astype(np.int64),
                np.hstack([b[part + 1] for b in blocks[side]]).astype(np.float32))

    ui, uw_ = stack("user", data.n_users)
    ii, iw = stack("item", data.n_items)
    ci, cw = stack("context", len(data.user_idx))
    uci, ucw = stack("context", data.n_users, 2)
    return FeatureSpace(ui, uw_, ii, iw, ci, cw, uci, ucw, offset, fields)


# ---------------------------------------------------------------------------------------------------------
# model


def pairwise_naive(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} <v_i, v_j> x_i x_j per row (O(k·n²)); v [B, n, k], x [B, n]. Reference for tests."""
    vx = v * x[..., None]
    gram = torch.einsum("bik,bjk->bij", vx, vx)
    return torch.triu(gram, diagonal=1).sum((1, 2))


def pairwise_fast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same in O(k·n): ½ Σ_f [(Σ_i v_if x_i)² − Σ_i v_if² x_i²]."""
    vx = v * x[..., None]
    s = vx.sum(1)
    return 0.5 * (s * s - (vx * vx).sum(1)).sum(1)


class FMNet(nn.Module):
    """w0 + Σ w_i x_i + pairwise term, over padded index/weight rows (index 0 = padding).

    A row is split into sides (user, context, item); each side gives its sum s = Σ v_i x_i and its own
    linear + within-side pairwise part c, computed once per distinct user / item of a batch, and
    logit = w0 + Σ c + Σ_{sides a<b} <s_a, s_b> (the O(k·n) identity applied side by side).
    """

    def __init__(self, n_features: int, k: int, init_std: float, sparse: bool = False):
        super().__init__()
        self.v = nn.Embedding(n_features, k, padding_idx=0, sparse=sparse)
        self.w = nn.Embedding(n_features, 1, padding_idx=0, sparse=sparse)
        self.w0 = nn.Parameter(torch.zeros(1))
        with torch.no_grad():
            self.v.weight.normal_(0.0, init_std)
            self.v.weight[0] = 0.0
            self.w.weight.zero_()

    def side(self, idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s [B, k], c [B], Σ‖v‖² and Σ w² over the active features) of one side's rows.

        Each distinct feature is looked up once and s is an embedding-bag sum; the squared part of the
        O(k·n) identity is Σ_i x_i² ‖v_i‖², so no [B, F, k] tensor is built (≈3× faster backward)."""
        uniq, inv = torch.unique(idx, return_inverse=True)
        v = self.v(uniq)
        w = self.w(uniq).squeeze(-1)
        s = nn.functional.embedding_bag(inv, v, per_sample_weights=x, mode="sum")
        norms = (v * v).sum(1)[inv]
        c = (w[inv] * x).sum(1) + 0.5 * ((s * s).sum(1) - (norms * x * x).sum(1))
        active = (x != 0).float()
        return s, c, (norms * active).sum(), (w[inv] * w[inv] * active).sum()

    def _combine(self, sides: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w0 + every term within the given sides [B], Σ of their s [B, k], Σ‖v‖², Σ w²)."""
        sums, total, l2v, l2w = [], self.w0, 0.0, 0.0
        for idx, x, inv in sides:
            if idx.shape[1] == 0:
                continue
            s, c, pv, pw = self.side(idx, x)
            if inv is not None:
                s, c = s[inv], c[inv]
            sums.append(s)
            total = total + c
            l2v, l2w = l2v + pv, l2w + pw
        for a in range(len(sums)):
            for b in range(a + 1, len(sums)):
                total = total + (sums[a] * sums[b]).sum(1)
        return total, sum(sums[1:], sums[0]), l2v, l2w

    def forward(self, sides: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sides: (idx [n_s, F_s], x [n_s, F_s], inverse [B] mapping rows to batch positions or None).
        Returns (logits [B], Σ‖v‖², Σ w²) with the penalties over each side's distinct rows."""
        total, _, l2v, l2w = self._combine(sides)
        return total, l2v, l2w

    def grouped(self, query_sides: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                item_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor], per_query: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same FM for Q queries (user + context sides, inverse → query) each scored against
        `per_query` items (item inverse → the Q·per_query rows, query-major): logits [Q, per_query].
        The query part is computed once per query, not once per row (≈2× faster training)."""
        c_q, s_q, l2v, l2w = self._combine(query_sides)
        idx, x, inv = item_side
        s_i, c_i, pv, pw = self.side(idx, x)
        s_i, c_i = s_i[inv].view(len(c_q), per_query, -1), c_i[inv].view(len(c_q), per_query)
        return c_q[:, None] + c_i + (s_q[:, None, :] * s_i).sum(-1), l2v + pv, l2w + pw


class FMParams(BaseModel):
    """FM hyper-parameters; defaults chosen on the ml-100k validation split (PROTOCOL.md)."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(64, ge=1, le=1024, description="latent dimensions k (published vectors: k + 2)")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(2048, ge=1, description="clicks per step (each with its num_negatives negatives)")
    lr: float = Field(0.01, gt=0, description="Adam step")
    reg: float = Field(1e-4, ge=0, description="L2 on the latent vectors of each row's active features")
    reg_linear: float = Field(1e-6, ge=0, description="L2 on the linear weights of each row's active features")
    init_std: float = Field(0.01, gt=0)
    num_negatives: int = Field(4, ge=1, le=100, description="sampled negatives per click")
    negatives: Literal["popularity", "uniform"] = Field("uniform", description="∝ count^negatives_power, or "
                                                        "uniform over the clicked items")
    negatives_power: float = Field(0.75, ge=0, le=2)
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="clicks held out of a first fit to report its AUC")
    refit_full: bool = Field(False, description="after the AUC fit, fit again on all clicks (2× time); "
                                               "false keeps the model trained without the held-out clicks")
    use_user_attrs: bool = True
    use_item_attrs: bool = True
    use_context: bool = True
    history_n: int = Field(10, ge=0, le=200, description="context field: the user's previous n items (0 = off)")
    history_decay: float = Field(0.8, gt=0, le=1, description="weight of the j-th previous item ∝ decay^j")
    n_bins: int = Field(10, ge=2, le=1000, description="quantile bins of numeric attributes")
    min_count: int = Field(2, ge=1, description="attribute values seen fewer times share one '<rare>' feature")
    num_threads: int = Field(1, ge=1, le=256, description="torch threads while fitting (1: bit-reproducible)")
    top_k: int = Field(100, ge=1, le=2000, description="neighbours kept per item (i2i) and per user (u2u)")
    u2u_top_k: int | None = Field(None, ge=1, le=2000, description="neighbours kept per user (None: top_k)")


class FM(EmbeddingChannel):
    """Factorisation machine; emits u2i vectors (inner product = FM logit), cosine i2i and u2u lists."""

    model = "fm"
    kinds = ("u2i", "i2i", "u2u")
    Params = FMParams
    renamed = {"factors": "dim", "neg_ratio": "num_negatives", "negative_sampling": "negatives",
               "neg_power": "negatives_power", "i2i_k": "top_k", "u2u_k": "u2u_top_k"}

    def _sampler(self, data: TrainData, counts: np.ndarray) -> PowerSampler:
        p: FMParams = self.params
        return PowerSampler(counts, p.negatives_power if p.negatives == "popularity" else 0.0)

    def _sides(self, fs: FeatureSpace, users: np.ndarray, inter: np.ndarray, items: np.ndarray):
        """FMNet.forward input for (user, interaction-context, item) triples; each distinct row once."""
        uu, u_inv = np.unique(users, return_inverse=True)
        cc, c_inv = np.unique(inter, return_inverse=True)
        ii, i_inv = np.unique(items, return_inverse=True)
        t = torch.from_numpy
        return [(t(fs.user_idx[uu]), t(fs.user_w[uu]), t(u_inv)),
                (t(fs.ctx_idx[cc]), t(fs.ctx_w[cc]), t(c_inv)),
                (t(fs.item_idx[ii]), t(fs.item_w[ii]), t(i_inv))]

    def _grouped(self, net: FMNet, fs: FeatureSpace, users: np.ndarray, inter: np.ndarray, items: np.ndarray):
        """FMNet.grouped on distinct interactions `inter` (their user and context) × items [Q, n]."""
        uu, u_inv = np.unique(users[inter], return_inverse=True)
        ii, i_inv = np.unique(items, return_inverse=True)
        t = torch.from_numpy
        query = [(t(fs.user_idx[uu]), t(fs.user_w[uu]), t(u_inv)), (t(fs.ctx_idx[inter]), t(fs.ctx_w[inter]), None)]
        return net.grouped(query, (t(fs.item_idx[ii]), t(fs.item_w[ii]), t(i_inv.ravel())), items.shape[1])

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: FMParams = self.params
        t0 = time.perf_counter()
        fs = build_feature_space(data, p.n_bins, p.min_count, p.use_user_attrs, p.use_item_attrs, p.use_context,
                                 p.history_n, p.history_decay)
        self.features = fs
        n = len(data.user_idx)
        all_rows = np.arange(n, dtype=np.int64)
        self.metrics: dict[str, float] = {}
        with seeded(self.seed, p.num_threads) as rng:
            if p.eval_fraction > 0 and n >= 20:
                held = np.zeros(n, bool)
                held[rng.permutation(n)[: max(1, int(round(p.eval_fraction * n)))]] = True
                net = self._train(data, fs, all_rows[~held], all_rows[held], rng, progress, "fm (AUC fit)")
                log.info("fm: held-out AUC %.4f on %d clicks vs sampled negatives", self.metrics["auc"], held.sum())
                train_rows = all_rows[~held]
                if p.refit_full:
                    net = self._train(data, fs, all_rows, all_rows[:0], rng, progress, "fm")
                    train_rows = all_rows
            else:
                train_rows = all_rows
                net = self._train(data, fs, all_rows, all_rows[:0], rng, progress, "fm")
        self._export(net, fs, data, train_rows)
        self.metrics["fit_s"] = time.perf_counter() - t0
        self._artifacts = None
        log.info("fm fitted in %.2fs: %d features over %s, %d clicks", self.metrics["fit_s"], fs.n_features,
                 list(fs.fields), len(train_rows))

    def _train(self, data: TrainData, fs: FeatureSpace, train_rows: np.ndarray, eval_rows: np.ndarray,
               rng: np.random.Generator, progress: bool, desc: str) -> FMNet:
        """One training run on `train_rows`; AUC on `eval_rows` (if any) after every epoch."""
        p: FMParams = self.params
        torch.manual_seed(self.seed)
        sampler = self._sampler(data, np.bincount(data.item_idx[train_rows], minlength=data.n_items))
        # dense Adam is cheaper while the table is small; sparse rows beyond that
        sparse = fs.n_features * p.dim > SPARSE_ABOVE
        net = FMNet(fs.n_features, p.dim, p.init_std, sparse=sparse)
        tables = list(net.v.parameters()) + list(net.w.parameters())
        opts = [torch.optim.SparseAdam(tables, lr=p.lr) if sparse else torch.optim.Adam(tables, lr=p.lr),
                torch.optim.Adam([net.w0], lr=p.lr)]
        users, items = data.user_idx.astype(np.int64), data.item_idx.astype(np.int64)
        k = p.num_negatives
        eval_neg = sampler.sample(rng, len(eval_rows))
        epoch: dict = {}

        def draw_negatives(_: int, clicks: np.ndarray) -> None:
            # a batch = `batch_size` clicks plus num_negatives negatives per click sharing its user and
            # context, so each side (user, context, item) is computed once per distinct row
            epoch["negs"] = sampler.sample(rng, len(clicks) * k).reshape(len(clicks), k)
            epoch["bce"] = 0.0

        def batch_loss(b: Batch) -> torch.Tensor:
            it = np.hstack([items[b.rows, None], epoch["negs"][b.start:b.start + len(b.rows)]])
            logit, l2v, l2w = self._grouped(net, fs, users, b.rows, it)
            bce = bce_loss(logit[:, 0], logit[:, 1:], balance=False, reduction="sum")
            epoch["bce"] += float(bce.detach())
            return (bce + p.reg * l2v + p.reg_linear * l2w) / logit.numel()

        def report(_: int, __: float) -> dict[str, str]:
            self.metrics["loss"] = epoch["bce"] / max(1, len(train_rows) * (1 + k))
            return {"loss": f"{self.metrics['loss']:.4f}"}

        def auc(_: int) -> float:
            self.metrics["auc"] = self._auc(net, fs, users, items, eval_rows, eval_neg)
            return self.metrics["auc"]

        cfg = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=self.seed, num_threads=p.num_threads,
                         min_batch=1, progress=progress, desc=desc)
        train_loop(batch_loss, train_rows, opts, cfg, rng, on_epoch_start=draw_negatives, on_epoch_end=report,
                   validate=auc if len(eval_rows) else None, metric="auc")
        return net

    @torch.no_grad()
    def _auc(self, net: FMNet, fs: FeatureSpace, users, items, rows: np.ndarray, neg_items: np.ndarray) -> float:
        """AUC of held-out clicks vs one sampled negative each (same user and context)."""
        both = self._score(net, fs, users, rows, np.stack([items[rows], neg_items], 1))
        pos, neg = both[:, 0], both[:, 1]
        r = rankdata(np.concatenate([pos, neg]))
        n_p, n_n = len(pos), len(neg)
        return float((r[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))

    @torch.no_grad()
    def _score(self, net: FMNet, fs: FeatureSpace, users: np.ndarray, inter: np.ndarray,
               items: np.ndarray) -> np.ndarray:
        """Logits [Q, n] of distinct interactions `inter` (their user and context) × items [Q, n]."""
        out = [self._grouped(net, fs, users, inter[s:s + 65536], items[s:s + 65536])[0].numpy()
               for s in range(0, len(inter), 65536)]
        return np.concatenate(out) if out else np.zeros((0, items.shape[1]), np.float32)

    @torch.no_grad()
    def _export(self, net: FMNet, fs: FeatureSpace, data: TrainData, train_rows: np.ndarray) -> None:
        """Side sums s and constants c, with features never seen in training zeroed (cold ids → attrs only);
        sets the EmbeddingChannel vectors (u2i: the logit vectors; i2i / u2u: cosine over s_I / s_U)."""
        seen = np.zeros(fs.n_features, bool)
        seen[fs.user_idx[data.user_idx[train_rows]].ravel()] = True
        seen[fs.ctx_idx[train_rows].ravel()] = True
        seen[fs.item_idx[data.item_idx[train_rows]].ravel()] = True
        seen[0] = False
        V = net.v.weight.numpy().copy()
        W = net.w.weight.numpy()[:, 0].copy()
        V[~seen], W[~seen] = 0.0, 0.0
        self.V, self.W, self.w0 = V, W, float(net.w0)

        def side(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s = np.zeros((len(idx), V.shape[1]), np.float32)
            c = np.zeros(len(idx), np.float32)
            for a in range(0, len(idx), EXPORT_CHUNK):  # bounds the [rows, F, k] buffer
                ix, wx = idx[a:a + EXPORT_CHUNK], w[a:a + EXPORT_CHUNK]
                vx = V[ix] * wx[..., None]
                s[a:a + EXPORT_CHUNK] = sa = vx.sum(1)
                c[a:a + EXPORT_CHUNK] = (W[ix] * wx).sum(1) + 0.5 * (sa * sa - (vx * vx).sum(1)).sum(1)
            return s, c

        s_u, c_u = side(np.hstack([fs.user_idx, fs.user_ctx_idx]), np.hstack([fs.user_w, fs.user_ctx_w]))
        s_i, c_i = side(fs.item_idx, fs.item_w)
        self.user_sum, self.item_sum = s_u, s_i
        one_u, one_i = np.ones((len(s_u), 1), np.float32), np.ones((len(s_i), 1), np.float32)
        # <[s_U, 1, w0 + c_U], [s_I, c_I, 1]> = w0 + linear + all pairwise terms = the FM logit
        self.user_vectors = np.hstack([s_u, one_u, self.w0 + c_u[:, None]]).astype(np.float32)
        self.item_vectors = np.hstack([s_i, c_i[:, None], one_i]).astype(np.float32)
        self.i2i_vectors, self.u2u_vectors = s_i, s_u
        self.valid_items = self.trained_items = np.bincount(data.item_idx[train_rows], minlength=data.n_items) > 0
        self.valid_users = self.active_users = np.diff(data.user_ptr) > 0

    def predict_rows(self, users: np.ndarray, inter: np.ndarray, items: np.ndarray) -> np.ndarray:
        """FM logits of (user, interaction-context, item) triples from the exported tables (numpy)."""
        fs = self.features
        idx = np.hstack([fs.user_idx[users], fs.ctx_idx[inter], fs.item_idx[items]])
        w = np.hstack([fs.user_w[users], fs.ctx_w[inter], fs.item_w[items]])
        vx = self.V[idx] * w[..., None]
        s = vx.sum(1)
        return self.w0 + (self.W[idx] * w).sum(1) + 0.5 * (s * s - (vx * vx).sum(1)).sum(1)
