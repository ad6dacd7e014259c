"""Training-side part of the SDM channel (trainer/channels/sdm.py) that the served tower never runs: the output
item side, whose vectors are precomputed into the published item vectors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.towers.layers import offsets


class ItemSide(nn.Module):
    """Output item vectors W [id; bags] + b (L2-normalised when `normalize`) from the id embedding rows `id_vecs` [n, d] and the items'
    attribute bags (codes [n_items, A, L], −1 pads; a bag is the mean of its values' embeddings). It holds no id
    table, so the output id embedding stays one row table of its own (incremental updates grow it)."""

    def __init__(self, attr_codes: np.ndarray, attr_sizes: list[int], dim: int, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.n_attrs = len(attr_sizes)
        pad = int(sum(attr_sizes))  # zero row for bag padding
        self.attr_emb = nn.Embedding(pad + 1, dim, padding_idx=pad)
        nn.init.normal_(self.attr_emb.weight, std=0.05)
        with torch.no_grad():
            self.attr_emb.weight[pad].zero_()
        codes = torch.as_tensor(attr_codes, dtype=torch.int64)
        if self.n_attrs:
            idx = torch.where(codes >= 0, codes + offsets(attr_sizes)[None, :, None], torch.full_like(codes, pad))
        else:
            idx = torch.full((len(codes), 0, 1), pad, dtype=torch.int64)
        self.register_buffer("attr_idx", idx, persistent=False)
        self.register_buffer("attr_cnt", (codes >= 0).sum(2).clamp(min=1).to(torch.float32), persistent=False)
        self.proj = nn.Linear((1 + self.n_attrs) * dim, dim)

    def forward(self, id_vecs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        fields = [id_vecs.unsqueeze(1)]
        if self.n_attrs:
            fields.append(self.attr_emb(self.attr_idx[items]).sum(2) / self.attr_cnt[items].unsqueeze(2))
        v = self.proj(torch.cat(fields, dim=1).flatten(1))
        return F.normalize(v, dim=1) if self.normalize else v
