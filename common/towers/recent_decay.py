"""A tower without hidden layers: the decay-weighted sum of the recent items' embeddings plus one vector per
attribute code, L2-normalised. A baseline (with the item vectors as its table and decay 1 it is the direction of
the mean of the user's latest items), and the tower of the vector server's tests and benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import clamp_ids, offsets


class RecentDecayTower(Tower):
    """Σ_j decay^j · item_emb[recent_j] (j = 0 newest; padding left out) + Σ_columns attr_emb[code] → normalised."""

    arch = "recent_decay"

    def __init__(self, n_items: int, dim: int, recent_n: int, decay: float = 1.0, attr_sizes: list[int] = ()):
        super().__init__()
        self.hparams = {"n_items": int(n_items), "dim": int(dim), "recent_n": int(recent_n), "decay": float(decay),
                        "attr_sizes": [int(s) for s in attr_sizes]}
        self.n_items, self.n_attrs = n_items, len(attr_sizes)
        self.item_emb = nn.Embedding(n_items + 1, dim)  # row n_items: padding (left out whatever it holds)
        self.attr_emb = nn.Embedding(max(1, sum(attr_sizes)), dim)
        self.register_buffer("attr_offsets", offsets(list(attr_sizes)), persistent=False)
        self.register_buffer("attr_sizes", torch.tensor(list(attr_sizes) or [1], dtype=torch.int64), persistent=False)
        self.register_buffer("decay", float(decay) ** torch.arange(recent_n, dtype=torch.float32), persistent=False)

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        rec = clamp_ids(recent, self.n_items)
        w = self.decay[: rec.shape[1]].unsqueeze(0) * (rec < self.n_items)
        v = (self.item_emb(rec) * w.unsqueeze(2)).sum(1)
        if self.n_attrs > 0:
            a = attrs[:, : self.n_attrs]
            a = torch.where((a >= 0) & (a < self.attr_sizes.unsqueeze(0)), a, torch.zeros_like(a))  # else unknown: 0
            v = v + self.attr_emb(a + self.attr_offsets.unsqueeze(0)).sum(1)
        return F.normalize(v, dim=1)
