"""Training-side towers shared by models (an item tower over id + attribute bags). A tower that is *served* at
request time lives in common/towers instead, where the vector server can rebuild it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.towers.layers import SENet, mlp, offsets


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
            idx = torch.where(codes >= 0, codes + offsets(attr_sizes)[None, :, None], torch.full_like(codes, pad))
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
