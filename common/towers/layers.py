"""Forward-only building blocks of the user towers (no training code): field re-weighting, MLPs, pooling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
    """Linear/ReLU(/Dropout) layers then a last Linear. Dropout layers hold no weights but shift the indices of
    the state dict's keys, so `dropout > 0` is part of the architecture."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def offsets(sizes: list[int]) -> torch.Tensor:
    """Start row of each column's codes in one shared embedding table (column j's code c → offsets[j] + c)."""
    return torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else [0], dtype=torch.int64)


def clamp_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Ids outside [0, n) become n (the padding / unknown row)."""
    return torch.where((ids >= 0) & (ids < n), ids, torch.full_like(ids, n))


def known_users(user_idx: torch.Tensor, n_users: int, trained: torch.Tensor) -> torch.Tensor:
    """User rows to embed: ids out of range, and users without training rows (`trained` [n_users + 1] bool), become
    n_users (the unknown-user row)."""
    u = clamp_ids(user_idx, n_users)
    return torch.where(trained[u], u, torch.full_like(u, n_users))


def attr_embeddings(attrs: torch.Tensor, n_attrs: int, starts: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
    """[B, n_attrs, d]: each user-attribute code (negative = unknown → 0) looked up at its column's start row."""
    return table(attrs[:, :n_attrs].clamp(min=0) + starts.unsqueeze(0))


def masked_mean(ids: torch.Tensor, table: torch.Tensor, pad: int, sparse: bool = False) -> torch.Tensor:
    """Mean of `table` rows over each row of `ids` [B, R], leaving `pad` out (an all-padding row gives zeros).
    `sparse`: the gradient of `table` holds the rows used only (for a row-sparse optimiser over a big table)."""
    return F.embedding_bag(ids, table, mode="mean", padding_idx=pad, sparse=sparse)
