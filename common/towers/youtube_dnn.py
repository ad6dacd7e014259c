"""The user tower of the YouTubeDNN channel (Covington et al., RecSys 2016; trainer/channels/youtube_dnn.py trains
it): the masked mean of the history's item embeddings, one mean-pooled bag of the history's tokens per token field
(genres, categories, tags), the user's attribute embeddings and normalised continuous features (with x² and √x)
→ ReLU tower → the user vector, scored by inner product against the softmax's output item embeddings.

Example age (the paper's freshness feature) is a training-only input: the served tower has no input for it. While
training, the channel adds `W_age · f(age)` (no bias) to the first layer's pre-activation, where f(0) = 0, so the
served forward is exactly the training model at example age 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import attr_embeddings, clamp_ids, known_users, masked_mean, offsets

# continuous features computed from the request-time inputs (common/towers/inputs.py), in this order
CONTINUOUS = ("history_len", "last_gap")


def quantile_cdf(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The empirical CDF of `x` [B] from quantile `edges` [Q+1] (ascending), piecewise linear, in [0, 1]:
    the paper's normalisation of continuous features (x̃ = ∫ df, uniform in [0, 1) on the training data)."""
    q = edges.shape[0] - 1
    i = torch.searchsorted(edges, x.contiguous(), right=True).clamp(1, q)
    lo, hi = edges[i - 1], edges[i]
    span = hi - lo
    frac = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(x))
    return ((i - 1).to(x.dtype) + frac.clamp(0, 1)).div(q).clamp(0, 1)


def powers(c: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 3]: x̃, x̃², √x̃ (the paper's super- and sub-linear forms of a normalised feature)."""
    return torch.stack([c, c * c, c.clamp(min=0).sqrt()], dim=1)


def continuous_raw(recent: torch.Tensor, recent_ts: torch.Tensor | None, n_items: int) -> tuple[torch.Tensor, ...]:
    """(log1p history length, log1p seconds between the two newest clicks, 1 where that gap is known) from the
    tower inputs (`recent` newest first, padded with n_items; times 0 = unknown)."""
    valid = recent < n_items
    n = valid.sum(1).to(torch.float32)
    if recent_ts is None or recent.shape[1] < 2:
        zero = torch.zeros_like(n)
        return torch.log1p(n), zero, zero
    t0, t1 = recent_ts[:, 0], recent_ts[:, 1]
    known = valid[:, 0] & valid[:, 1] & (t0 > 0) & (t1 > 0)
    gap = torch.where(known, (t0 - t1).clamp(min=0), torch.zeros_like(t0)).to(torch.float32)
    return torch.log1p(n), torch.log1p(gap), known.to(torch.float32)


class YouTubeDNNTower(Tower):
    """history mean ⊕ token bags ⊕ attribute embeddings ⊕ continuous [x̃, x̃², √x̃] → Linear → ReLU → … → `dim`.

    `item_tokens` [n_items + 1, n_token_fields, token_width] holds each item's token codes into one shared token
    table (0 = none; row n_items pads `recent`); `cont_edges` [2, n_quantiles + 1] the training quantiles of the
    log1p continuous features. `item_bias`: the output gets a constant 1 appended (the items carry the softmax
    bias in that column), so <user, item> is the exact softmax logit. `normalize`: the vector is L2-normalised
    and divided by `temperature` (cosine logits).
    """

    arch = "youtube_dnn"

    def __init__(self, n_items: int, recent_n: int, attr_sizes: list[int], emb_dim: int, dim: int,
                 hidden: list[int], token_size: int = 1, n_token_fields: int = 0, token_width: int = 1,
                 n_quantiles: int = 32, item_bias: bool = True, normalize: bool = False, temperature: float = 1.0,
                 use_history: bool = True, use_continuous: bool = True, n_users: int = 0, use_user_id: bool = False,
                 newest_item: bool = False):
        super().__init__()
        if not hidden:
            raise ValueError("hidden must hold at least one layer (the ReLU tower)")
        self.hparams = {"n_items": int(n_items), "recent_n": int(recent_n), "attr_sizes": [int(s) for s in attr_sizes],
                        "emb_dim": int(emb_dim), "dim": int(dim), "hidden": [int(h) for h in hidden],
                        "token_size": int(token_size), "n_token_fields": int(n_token_fields),
                        "token_width": int(token_width), "n_quantiles": int(n_quantiles),
                        "item_bias": bool(item_bias), "normalize": bool(normalize),
                        "temperature": float(temperature), "use_history": bool(use_history),
                        "use_continuous": bool(use_continuous), "n_users": int(n_users),
                        "use_user_id": bool(use_user_id), "newest_item": bool(newest_item)}
        self.n_items, self.n_attrs, self.n_token_fields = n_items, len(attr_sizes), n_token_fields
        self.item_bias, self.normalize, self.temperature = item_bias, normalize, temperature
        self.use_history, self.use_continuous = use_history, use_continuous
        self.n_users, self.use_user_id, self.newest_item = n_users, use_user_id, newest_item
        # (the order of the layers below is the order of the random draws of their initialisation: keep it)
        self.item_emb = nn.Embedding(n_items + 1, emb_dim, padding_idx=n_items)  # input (history) embeddings
        self.token_emb = nn.Embedding(max(1, token_size), emb_dim, padding_idx=0)
        self.attr_emb = nn.Embedding(max(1, sum(attr_sizes)), emb_dim)
        self.register_buffer("attr_offsets", offsets(list(attr_sizes)), persistent=False)
        self.register_buffer("item_tokens", torch.zeros(n_items + 1, max(n_token_fields, 1), token_width,
                                                        dtype=torch.int64))
        self.register_buffer("cont_edges", torch.arange(n_quantiles + 1, dtype=torch.float32)
                             .repeat(len(CONTINUOUS), 1))
        n_in = emb_dim * (int(use_history) + n_token_fields + self.n_attrs + int(use_user_id) + int(newest_item)) \
            + (7 if use_continuous else 0)
        self.first = nn.Linear(n_in, hidden[0])
        layers: list[nn.Module] = [nn.ReLU()]
        for a, b in zip(hidden[:-1], hidden[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(hidden[-1], dim))
        self.head = nn.Sequential(*layers)
        for e in (self.item_emb, self.token_emb, self.attr_emb):
            nn.init.normal_(e.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()
            self.token_emb.weight[0].zero_()
        if use_user_id:  # row n_users = unknown user; users without training examples are served as unknown
            self.user_emb = nn.Embedding(n_users + 1, emb_dim)
            nn.init.normal_(self.user_emb.weight, std=0.05)
            self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))

    def features(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                 recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n_in]: the concatenated input of the ReLU tower."""
        rec = clamp_ids(recent, self.n_items)
        parts: list[torch.Tensor] = []
        if self.use_user_id:
            parts.append(self.user_emb(known_users(user_idx, self.n_users, self.trained_user)))
        if self.use_history:
            parts.append(masked_mean(rec, self.item_emb.weight, self.n_items))
        if self.newest_item:  # the newest history item on its own (the padding row is zero)
            parts.append(self.item_emb(rec[:, 0]))
        if self.n_token_fields > 0:  # one bag per field: every token of every history item, mean-pooled
            parts.append(self.token_bags(rec).flatten(1))
        if self.n_attrs > 0:
            parts.append(attr_embeddings(attrs, self.n_attrs, self.attr_offsets, self.attr_emb).flatten(1))
        if self.use_continuous:
            n, gap, known = continuous_raw(rec, recent_ts, self.n_items)
            parts += [powers(quantile_cdf(n, self.cont_edges[0])),
                      powers(quantile_cdf(gap, self.cont_edges[1])) * known.unsqueeze(1), known.unsqueeze(1)]
        return torch.cat(parts, dim=1)

    def token_bags(self, rec: torch.Tensor) -> torch.Tensor:
        """[B, F, emb_dim]: per token field, the mean of the embeddings of every token of the history's items
        (token counts [B, F, T] times the table: the same mean as an embedding bag, far cheaper to differentiate)."""
        b, r = rec.shape
        tok = self.item_tokens[rec].permute(0, 2, 1, 3).reshape(b, self.n_token_fields, -1)  # [B, F, R·W]
        counts = torch.zeros(b, self.n_token_fields, self.token_emb.num_embeddings, device=rec.device)
        counts.scatter_add_(2, tok, torch.ones_like(tok, dtype=torch.float32))
        counts[:, :, 0] = 0.0  # code 0: no token
        counts = counts / counts.sum(2, keepdim=True).clamp(min=1.0)
        return counts @ self.token_emb.weight

    def output(self, pre: torch.Tensor) -> torch.Tensor:
        """The user vector from the first layer's pre-activation [B, hidden[0]]."""
        u = self.head(pre)
        if self.normalize:
            u = F.normalize(u, dim=1) / self.temperature
        if self.item_bias:
            u = torch.cat([u, torch.ones_like(u[:, :1])], dim=1)
        return u

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        """The served user vector [B, dim (+1 with item_bias)]: example age 0, i.e. no age term at all."""
        return self.output(self.first(self.features(user_idx, attrs, recent, recent_ts)))
