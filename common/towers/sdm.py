"""The user tower of SDM (Lv et al., CIKM 2019, "Sequential Deep Matching"; trainer/channels/sdm.py trains it,
its output item embedding and loss stay on the training side).

Two inputs with distinct names and shapes, both cut from the request's recent items (newest first):

    short  int64 [B, S]      the short-term session: the newest ≤ S items (cut at the first gap > session_gap_s
                             when times are known), in time order (oldest first), right-padded with n_items
    long   int64 [B, F, L]   the long-term behaviour: the L items before the short window, one row per attribute
                             subset f (row 0 item ids, padded with n_items; row f ≥ 1 the items' codes of side
                             field f — category, brand, market —, padded / unknown = that field's size)

Short-term:  x_k = tanh(W_x [e_item; e_cat; …]) → LSTM → multi-head self-attention (causal, residual + layer norm)
             → ĥ_k;  s_t = Σ_{k ≤ t} softmax_k(e_u · ĥ_k) ĥ_k             (user attention, e_u the query)
Long-term:   z_f = Σ_k softmax_k(e_u · g_k^f) g_k^f  for each subset f;   p = tanh(W_p [z_1; …; z_F] + b)
Fusion:      G_t = σ(W1 e_u + W2 s_t + W3 p + b),  o_t = (1 − G_t) ⊙ p + G_t ⊙ s_t     (or o_t = s_t + p: "sum")
with e_u = tanh(W_u [user id emb; user attribute embs] + b). `encode` returns o_t at every position t (training:
every position predicts the next item); `forward` returns the vector at the newest position, L2-normalised when
`normalize`. The side-field codes of every item are a buffer (`item_codes`): serving passes item indices only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import attr_embeddings, clamp_ids, known_users, offsets


class SDMInputs(NamedTuple):
    """The named inputs of `SDMTower.encode` (see the module docstring for shapes)."""

    user: torch.Tensor  # int64 [B]
    attrs: torch.Tensor  # int64 [B, A]
    short: torch.Tensor  # int64 [B, S], time order, right-padded with n_items
    long: torch.Tensor  # int64 [B, F, L], row 0 item ids, rows f ≥ 1 side-field codes


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis where `mask` is True; 0 elsewhere and for a row without any (no NaN)."""
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.softmax(scores, dim=-1) * mask


class SDMTower(Tower):
    """SDM's user tower: short-term (LSTM → MHSA → user attention), long-term (per-attribute attention → dense
    tanh) and their gated fusion; inputs `forward(user_idx, attrs, recent, recent_ts)` (common/towers/inputs.py)."""

    arch = "sdm"

    def __init__(self, n_users: int, n_items: int, attr_sizes: list[int], side_sizes: list[int], dim: int,
                 short_n: int, long_n: int, num_heads: int = 2, lstm_layers: int = 1, dropout: float = 0.0,
                 fusion: str = "gate", normalize: bool = True, session_gap_s: int | None = None,
                 use_user_id: bool = True):
        super().__init__()
        if fusion not in ("gate", "sum"):
            raise ValueError(f"fusion must be 'gate' or 'sum', not {fusion!r}")
        if short_n < 1 or long_n < 1:
            raise ValueError("short_n and long_n must be ≥ 1")
        self.hparams = {"n_users": int(n_users), "n_items": int(n_items), "attr_sizes": [int(s) for s in attr_sizes],
                        "side_sizes": [int(s) for s in side_sizes], "dim": int(dim), "short_n": int(short_n),
                        "long_n": int(long_n), "num_heads": int(num_heads), "lstm_layers": int(lstm_layers),
                        "dropout": float(dropout), "fusion": fusion, "normalize": bool(normalize),
                        "session_gap_s": None if session_gap_s is None else int(session_gap_s),
                        "use_user_id": bool(use_user_id)}
        self.n_users, self.n_items, self.n_attrs = n_users, n_items, len(attr_sizes)
        self.short_n, self.long_n, self.recent_n = short_n, long_n, short_n + long_n
        self.n_side = len(side_sizes)
        self.n_fields = 1 + self.n_side  # attribute subsets of the long-term input: item id + side fields
        self.fusion, self.normalize, self.use_user_id = fusion, normalize, use_user_id
        self.session_gap_s = session_gap_s
        # (the order of the layers below is the order of the random draws of their initialisation: keep it)
        self.user_emb = nn.Embedding(n_users + 1, dim)  # row n_users = unknown user
        self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))
        self.attr_emb = nn.Embedding(max(1, sum(attr_sizes)), dim)
        self.register_buffer("attr_offsets", offsets(list(attr_sizes)), persistent=False)
        self.user_proj = nn.Linear(dim * (int(use_user_id) + self.n_attrs) or dim, dim)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # input item embedding; row n_items pads
        # side fields share one table; field f's unknown/padding code is side_sizes[f] → its own zero row
        self.side_emb = nn.Embedding(sum(side_sizes) + self.n_side + 1, dim, padding_idx=sum(side_sizes) + self.n_side)
        self.register_buffer("side_offsets", offsets([s + 1 for s in side_sizes]), persistent=False)
        self.register_buffer("side_sizes", torch.tensor(list(side_sizes) or [0], dtype=torch.int64), persistent=False)
        # item → side-field codes (side_sizes[f] = unknown); row n_items (padding) is all unknown. Part of the state
        self.register_buffer("item_codes", torch.tensor(side_sizes, dtype=torch.int64).repeat(n_items + 1, 1)
                             if side_sizes else torch.zeros((n_items + 1, 0), dtype=torch.int64))
        self.short_in = nn.Linear(self.n_fields * dim, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=lstm_layers, batch_first=True,
                            dropout=dropout if lstm_layers > 1 else 0.0)
        self.mhsa = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.mhsa_norm = nn.LayerNorm(dim)
        self.long_out = nn.Linear(self.n_fields * dim, dim)
        self.gate = nn.Linear(3 * dim, dim)  # W1 e_u + W2 s + W3 p + b on [e_u; s; p]
        self.drop = nn.Dropout(dropout)
        self.register_buffer("causal", torch.triu(torch.ones(short_n, short_n, dtype=torch.bool), 1),
                             persistent=False)
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.side_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()
            self.side_emb.weight[self.side_emb.padding_idx].zero_()

    # -- inputs ---------------------------------------------------------------------------------------------
    def long_codes(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] item ids (padded with n_items) → the long-term input [B, F, L]: ids, then each side field's codes."""
        items = clamp_ids(items, self.n_items)
        side = self.item_codes[items].permute(0, 2, 1)  # [B, n_side, L]
        return torch.cat([items.unsqueeze(1), side], dim=1)

    def split(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
              recent_ts: torch.Tensor | None = None) -> SDMInputs:
        """Request inputs (recent newest first) → the short window (newest ≤ S items, within the newest session
        when `session_gap_s` is set and times are known; time order) and the L items before it (long-term)."""
        rec = clamp_ids(recent, self.n_items)
        valid = rec < self.n_items
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # real items first, order kept
        rec, valid = rec.gather(1, order), valid.gather(1, order)
        b, r = rec.shape
        n_valid = valid.sum(1)
        k = n_valid.clamp(max=self.short_n)
        if self.session_gap_s is not None and recent_ts is not None and r > 1:
            ts = recent_ts.gather(1, order)
            known = (ts > 0) & valid
            cut = known[:, :-1] & known[:, 1:] & (ts[:, :-1] - ts[:, 1:] > self.session_gap_s)  # gap after j
            j = torch.arange(r - 1, device=rec.device).unsqueeze(0)
            first = torch.where(cut, j, torch.full_like(j, r)).amin(1) + 1  # items in the newest session
            k = torch.minimum(k, first)
        pad = torch.full((b, 1), self.n_items, dtype=rec.dtype, device=rec.device)
        padded = torch.cat([rec, pad], dim=1)  # column r pads every gather below
        i = torch.arange(self.short_n, device=rec.device).unsqueeze(0)
        src = k.unsqueeze(1) - 1 - i  # time order: position i holds the (k−1−i)-th newest
        short = padded.gather(1, torch.where(src >= 0, src, torch.full_like(src, r)))
        j = torch.arange(self.long_n, device=rec.device).unsqueeze(0)
        src = k.unsqueeze(1) + j
        long_items = padded.gather(1, torch.where(src < r, src, torch.full_like(src, r)))
        return SDMInputs(user_idx, attrs, short, self.long_codes(long_items))

    # -- the model --------------------------------------------------------------------------------------------
    def user_vector(self, user_idx: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """e_u [B, d]: tanh of a dense layer over the user id and attribute embeddings (users without training
        interactions take the unknown row)."""
        u = known_users(user_idx, self.n_users, self.trained_user)
        fields: list[torch.Tensor] = []
        if self.use_user_id:
            fields.append(self.user_emb(u))
        if self.n_attrs > 0:
            fields.append(attr_embeddings(attrs, self.n_attrs, self.attr_offsets, self.attr_emb).flatten(1))
        if not fields:
            fields.append(self.user_emb(torch.full_like(u, self.n_users)))
        return torch.tanh(self.user_proj(torch.cat(fields, dim=1)))

    def _side(self, codes: torch.Tensor) -> torch.Tensor:
        """Side-field codes [..., n_side] (code ≥ size or < 0: unknown) → rows of the shared side table."""
        sizes = self.side_sizes[: self.n_side]
        ok = (codes >= 0) & (codes < sizes)
        return torch.where(ok, codes + self.side_offsets, torch.full_like(codes, self.side_emb.padding_idx))

    def short_term(self, e_u: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """s_t [B, S, d] at every position t (causal: from the items up to t); 0 where the window is empty."""
        short = clamp_ids(short, self.n_items)
        mask = short < self.n_items
        fields = [self.item_emb(short)]
        if self.n_side:
            fields.append(self.side_emb(self._side(self.item_codes[short])).flatten(2))
        x = self.drop(torch.tanh(self.short_in(torch.cat(fields, dim=2))))
        h, _ = self.lstm(x)  # right padding never reaches a real position
        a, _ = self.mhsa(h, h, h, attn_mask=self.causal, need_weights=False)
        h = self.mhsa_norm(h + self.drop(a))
        scores = torch.einsum("bd,bkd->bk", e_u, h)
        allowed = ~self.causal.unsqueeze(0) & mask.unsqueeze(1)  # [B, t, k]: k ≤ t and k real
        w = masked_softmax(scores.unsqueeze(1).expand(-1, self.short_n, -1), allowed)
        return w @ h

    def long_term(self, e_u: torch.Tensor, long: torch.Tensor) -> torch.Tensor:
        """p [B, d] = tanh(W_p [z_f]_f + b), z_f the e_u-attention pooling of attribute subset f."""
        ids = clamp_ids(long[:, 0], self.n_items)
        g = [self.item_emb(ids)]
        masks = [ids < self.n_items]
        if self.n_side:
            side = self._side(long[:, 1:].permute(0, 2, 1))  # [B, L, n_side]
            g.extend(self.side_emb(side).unbind(2))
            masks.extend((side != self.side_emb.padding_idx).unbind(2))
        g_all = torch.stack(g, dim=1)  # [B, F, L, d]
        scores = torch.einsum("bd,bfld->bfl", e_u, g_all)
        w = masked_softmax(scores, torch.stack(masks, dim=1))
        z = torch.einsum("bfl,bfld->bfd", w, g_all)
        return torch.tanh(self.long_out(self.drop(z.flatten(1))))

    def encode(self, user: torch.Tensor, attrs: torch.Tensor, *, short: torch.Tensor, long: torch.Tensor
               ) -> torch.Tensor:
        """o_t [B, S, d] for every position t of the short window (not normalised). `short` [B, S] and `long`
        [B, F, L] are checked: the two cannot be confused."""
        if short.dim() != 2 or short.shape[1] != self.short_n:
            raise ValueError(f"sdm tower: short must be item ids [B, {self.short_n}], got {tuple(short.shape)}")
        if long.dim() != 3 or tuple(long.shape[1:]) != (self.n_fields, self.long_n):
            raise ValueError(f"sdm tower: long must be attribute codes [B, {self.n_fields}, {self.long_n}], got "
                             f"{tuple(long.shape)}")
        e_u = self.user_vector(user, attrs)
        s = self.short_term(e_u, short)
        p = self.long_term(e_u, long).unsqueeze(1).expand_as(s)
        if self.fusion == "sum":
            return s + p
        g = torch.sigmoid(self.gate(torch.cat([e_u.unsqueeze(1).expand_as(s), s, p], dim=2)))
        return (1 - g) * p + g * s

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return F.normalize(o, dim=-1) if self.normalize else o

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        x = self.split(user_idx, attrs, recent, recent_ts)
        o = self.encode(x.user, x.attrs, short=x.short, long=x.long)
        last = ((x.short < self.n_items).sum(1) - 1).clamp(min=0)  # the newest position (0 for an empty window)
        return self.output(o[torch.arange(len(o)), last])
