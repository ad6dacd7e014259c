"""Building blocks of the two-tower (DSSM) channel: feature encoding, towers, negatives and losses.

A helper module (no Channel subclass): `trainer/channels/two_tower.py` wires these together.
The user tower's `forward(user_idx, attrs, recent)` is the contract of `common/tower_inputs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Feature encoding
# ----------------------------------------------------------------------------------------------


def _value_strings(v) -> list[str]:
    """The string forms a raw attribute value may arrive in at request time (24 → '24', '24.0')."""
    s = [str(v)]
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        s.append(str(float(v)))
    elif isinstance(v, (float, np.floating)) and float(v).is_integer():
        s.append(str(int(v)))
    return s


@dataclass
class AttrEncoding:
    """Categorical codes of some attribute columns; code 0 = unknown/missing/rare."""

    columns: list[str] = field(default_factory=list)
    vocab: dict[str, dict[str, int]] = field(default_factory=dict)  # column → value string → code
    sizes: list[int] = field(default_factory=list)  # codes per column, 0 included
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 1), np.int64))  # [rows, cols, bag]; -1 pads


def encode_attrs(df: pd.DataFrame | None, n_rows: int, multi_valued: bool, min_count: int = 2,
                 max_vocab: int = 2000, numeric_buckets: int = 10, max_int_levels: int = 32,
                 min_coverage: float = 0.5, categorical: tuple[str, ...] = (),
                 max_numeric_values: int | None = None) -> AttrEncoding:
    """Vocab-index the usable categorical columns of an attribute table (row i = entity i).

    Integer columns with at most `max_int_levels` values (or named in `categorical`) are categories; other
    numeric columns are bucketed by quantiles (every observed value string maps to its bucket code). A
    column is dropped when fewer than `min_coverage` of its rows hold a kept value (ids, titles, URLs).
    With `multi_valued`, 'a|b|c' strings become bags of codes. The vocab of a bucketed column lists every
    observed value, so such columns with more than `max_numeric_values` values are dropped (user towers:
    the vocab travels in the manifest).
    """
    enc = AttrEncoding()
    if df is None or n_rows == 0:
        enc.codes = np.zeros((n_rows, 0, 1), np.int64)
        return enc
    df = df.reset_index(drop=True)  # positions, whatever the index was
    bags: list[np.ndarray] = []
    for col in df.columns:
        s = df[col]
        present = s.notna().to_numpy()
        if not present.any():
            continue
        numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
        int_category = False
        if numeric:
            vals = s[present].astype(np.float64).to_numpy()
            uniq = np.unique(vals)
            if np.all(uniq == np.round(uniq)) and (len(uniq) <= max_int_levels or col in categorical):
                s, numeric, int_category = s.astype("Int64"), False, True  # a category coded as a number
        if numeric and max_numeric_values is not None and len(uniq) > max_numeric_values:
            continue
        if numeric:
            bucketed = len(uniq) > numeric_buckets
            edges = np.unique(np.quantile(vals, np.linspace(0, 1, numeric_buckets + 1)[1:-1])) if bucketed else uniq
            ucode = 1 + np.searchsorted(edges, uniq, side="right" if bucketed else "left")
            vocab: dict[str, int] = {}
            for u, c in zip(uniq, ucode, strict=True):
                for key in _value_strings(int(u) if float(u).is_integer() else float(u)):
                    vocab[key] = int(c)
            code = np.zeros(n_rows, np.int64)
            code[present] = 1 + np.searchsorted(edges, vals, side="right" if bucketed else "left")
            enc.columns.append(str(col))
            enc.vocab[str(col)] = vocab
            enc.sizes.append(int(ucode.max()) + 1)
            bags.append(code[:, None])
            continue
        strs = s.astype("string").fillna("")
        if multi_valued and strs.str.contains("|", regex=False).any():
            exploded = strs.str.split("|").explode()
            row = exploded.index.to_numpy()
            vals = exploded.astype(str).str.strip().to_numpy(object)
        else:
            row = np.arange(len(strs))
            vals = strs.astype(str).to_numpy(object)
        keep = vals != ""
        row, vals = row[keep], vals[keep]
        counts = pd.Series(vals).value_counts()
        counts = counts[counts >= min_count].iloc[:max_vocab]
        vocab = {str(v): i + 1 for i, v in enumerate(counts.index)}
        code = pd.Series(vals).map(vocab).fillna(0).to_numpy(np.int64)
        n_codes = len(vocab) + 1
        if int_category:  # the value may arrive as 3 or 3.0
            vocab.update({str(float(k)): c for k, c in list(vocab.items())})
        covered = np.zeros(n_rows, bool)
        covered[row[code > 0]] = True
        if covered.mean() < min_coverage:
            continue
        width = int(np.bincount(row, minlength=n_rows).max()) if len(row) else 1
        mat = np.full((n_rows, max(width, 1)), -1, np.int64)
        mat[:, 0] = 0
        if len(row):
            order = np.lexsort((np.arange(len(row)), row))
            r, c = row[order], code[order]
            starts = np.searchsorted(r, r, side="left")
            mat[r, np.arange(len(r)) - starts] = c
        enc.columns.append(str(col))
        enc.vocab[str(col)] = vocab
        enc.sizes.append(n_codes)
        bags.append(mat)
    width = max([b.shape[1] for b in bags], default=1)
    enc.codes = np.stack([np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=-1) for b in bags], axis=1) \
        if bags else np.zeros((n_rows, 0, 1), np.int64)
    return enc


def recent_matrix(item_idx: np.ndarray, user_start: np.ndarray, end: np.ndarray, n: int, pad: int) -> np.ndarray:
    """Items at positions end-1, end-2, … (newest first) down to `user_start`, padded with `pad`.

    For a training example at position g, end = g gives the items *before* it (no leakage); for export,
    end = one past the user's last interaction gives their latest items.
    """
    pos = end[:, None] - np.arange(1, n + 1)[None, :]
    ok = pos >= user_start[:, None]
    out = np.where(ok, item_idx[np.clip(pos, 0, None)], pad)
    return out.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Towers
# ----------------------------------------------------------------------------------------------


class SENet(nn.Module):
    """Squeeze (mean over the embedding dim) → excitation (two dense layers) → re-weight fields."""

    def __init__(self, n_fields: int, reduction: int = 2):
        super().__init__()
        hidden = max(1, n_fields // reduction)
        self.fc1 = nn.Linear(n_fields, hidden)
        self.fc2 = nn.Linear(hidden, n_fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, F, e]
        z = x.mean(dim=2)
        # 2·sigmoid: weights start near 1 (a ReLU excitation can die at init and zero every field)
        a = 2.0 * torch.sigmoid(self.fc2(torch.relu(self.fc1(z))))
        return x * a.unsqueeze(2)


def mlp(n_in: int, hidden: list[int], n_out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else [0], dtype=torch.int64)


class UserTower(nn.Module):
    """user id + user attribute codes + masked mean of recent items' embeddings (+ optionally the newest
    item's embedding) → MLP → L2-normalised. `recent` is newest first, padded with n_items."""

    def __init__(self, n_users: int, n_items: int, attr_sizes: list[int], emb_dim: int, out_dim: int,
                 hidden: list[int], dropout: float, senet: bool, use_user_id: bool, item_emb: nn.Embedding,
                 recent_last: bool = False):
        super().__init__()
        self.n_users, self.n_items, self.n_attrs = n_users, n_items, len(attr_sizes)
        self.use_user_id = use_user_id
        self.recent_last = recent_last
        self.use_senet = senet
        self.user_emb = nn.Embedding(n_users + 1, emb_dim)  # row n_users = unknown user
        # users without training interactions have untrained rows: they are served as the unknown user
        self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))
        self.attr_emb = nn.Embedding(max(1, sum(attr_sizes)), emb_dim)
        self.register_buffer("attr_offsets", _offsets(attr_sizes), persistent=False)
        self.item_emb = item_emb  # n_items + 1 rows; row n_items pads `recent`
        n_fields = int(use_user_id) + self.n_attrs + 1 + int(recent_last)
        self.senet = SENet(n_fields) if senet else nn.Identity()
        self.mlp = mlp(n_fields * emb_dim, hidden, out_dim, dropout)
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        u = torch.where((user_idx >= 0) & (user_idx < self.n_users), user_idx,
                        torch.full_like(user_idx, self.n_users))
        u = torch.where(self.trained_user[u], u, torch.full_like(u, self.n_users))
        fields: list[torch.Tensor] = []
        if self.use_user_id:
            fields.append(self.user_emb(u))
        if self.n_attrs > 0:
            a = attrs[:, : self.n_attrs].clamp(min=0) + self.attr_offsets.unsqueeze(0)
            fields.extend(self.attr_emb(a).unbind(1))
        rec = torch.where((recent >= 0) & (recent < self.n_items), recent, torch.full_like(recent, self.n_items))
        # masked mean: embedding_bag leaves padding out of the mean (an all-padding row gives zeros)
        pooled = F.embedding_bag(rec, self.item_emb.weight, mode="mean", padding_idx=self.n_items)
        fields.append(pooled)
        if self.recent_last:  # the newest item on its own (recent is newest first; padding row is zero)
            fields.append(self.item_emb(rec[:, 0]))
        x = self.senet(torch.stack(fields, dim=1))
        return F.normalize(self.mlp(x.flatten(1)), dim=1)


class ItemTower(nn.Module):
    """item id + (bags of) item attribute codes → MLP → L2-normalised."""

    def __init__(self, n_items: int, attr_codes: np.ndarray, attr_sizes: list[int], emb_dim: int, out_dim: int,
                 hidden: list[int], dropout: float, senet: bool, item_emb: nn.Embedding):
        super().__init__()
        self.n_items, self.n_attrs = n_items, len(attr_sizes)
        self.item_emb = item_emb
        pad = int(sum(attr_sizes))  # extra zero row for bag padding
        self.attr_emb = nn.Embedding(pad + 1, emb_dim, padding_idx=pad)
        nn.init.normal_(self.attr_emb.weight, std=0.05)
        with torch.no_grad():
            self.attr_emb.weight[pad].zero_()
        codes = torch.as_tensor(attr_codes, dtype=torch.int64)  # [n_items, A, L], -1 pads
        if self.n_attrs:
            idx = torch.where(codes >= 0, codes + _offsets(attr_sizes)[None, :, None], torch.full_like(codes, pad))
        else:
            idx = torch.full((n_items, 0, 1), pad, dtype=torch.int64)
        self.register_buffer("attr_idx", idx, persistent=False)
        self.register_buffer("attr_cnt", (codes >= 0).sum(2).clamp(min=1).to(torch.float32), persistent=False)
        n_fields = 1 + self.n_attrs
        self.senet = SENet(n_fields) if senet else nn.Identity()
        self.mlp = mlp(n_fields * emb_dim, hidden, out_dim, dropout)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        fields = [self.item_emb(items).unsqueeze(1)]
        if self.n_attrs:
            bags = self.attr_emb(self.attr_idx[items]).sum(2) / self.attr_cnt[items].unsqueeze(2)
            fields.append(bags)
        x = self.senet(torch.cat(fields, dim=1))
        return F.normalize(self.mlp(x.flatten(1)), dim=1)


# ----------------------------------------------------------------------------------------------
# Scores and losses
# ----------------------------------------------------------------------------------------------


def logits(user_vecs: torch.Tensor, item_vecs: torch.Tensor, temperature: float,
           log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Similarity / τ for every (user row, item column) pair, minus log q(item) when given (logQ correction:
    s(x, y) − log p(y), Yi et al. 2019)."""
    out = user_vecs @ item_vecs.T / temperature
    if log_q is not None:
        out = out - log_q.unsqueeze(0)
    return out


def row_logits(user_vecs: torch.Tensor, cand_vecs: torch.Tensor, temperature: float,
               log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row candidates: user_vecs [B, d], cand_vecs [B, C, d] → [B, C] (minus log q [B, C] if given)."""
    out = torch.einsum("bd,bcd->bc", user_vecs, cand_vecs) / temperature
    if log_q is not None:
        out = out - log_q
    return out


def ranking_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, mode: str, temperature: float,
                 margin: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of positive logits [B] against negative logits [B, K] (only `valid` negatives count).

    listwise: softmax cross-entropy over [pos, negs]; pointwise: BCE (1 for pos, 0 for each negative,
    ratio 1:K); hinge: max(0, m + cos(a,c) − cos(a,b)); logistic: −log σ((s_b − s_c)), s = cos/τ.
    """
    validf = valid.to(pos.dtype)
    if mode == "listwise":
        lse_neg = torch.logsumexp(neg.masked_fill(~valid, float("-inf")), dim=1)
        return torch.logaddexp(pos, lse_neg).sub(pos).mean()
    if mode == "pointwise":
        b = bias if bias is not None else torch.zeros((), dtype=pos.dtype)
        # the positive weighs as much as its k negatives together: with 1:k sampled pairs weighted
        # equally, cosine towers collapse to "everything negative"
        lp = F.softplus(-(pos + b))
        ln = (F.softplus(neg + b) * validf).sum(1) / validf.sum(1).clamp(min=1.0)
        return (lp + ln).mean()
    diff = pos.unsqueeze(1) - neg  # in logit units (cos/τ, minus log q when corrected)
    if mode == "hinge":
        per = torch.relu(margin - diff * temperature)
    elif mode == "logistic":
        per = F.softplus(-diff)
    else:
        raise ValueError(f"unknown loss {mode!r}")
    return ((per * validf).sum(1) / validf.sum(1).clamp(min=1.0)).mean()
