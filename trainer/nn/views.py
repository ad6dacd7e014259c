"""Perturbed views of an entity for contrastive learning (MIC, trainer/channels/mic.py): masking of the tower's
inputs and of its fields, and dropout in embedding space, applied to an unchanged tower.

    rec = mask_ids(rec, 0.2, pad, rng)                # history-id masking: each id → pad w.p. 0.2
    with perturb(tower, n_fields, 0.2, 0.1, rng):     # field masking + embedding dropout
        z = tower(*inputs)

`perturb` works on any tower whose `mlp` takes its flattened field embeddings [B, F·e] (the user tower
common/towers/two_tower_user.py, the item tower trainer/nn/towers.py): a forward pre-hook on `mlp` zeroes each
(row, field) with probability `field_rate` — one field of a row is always kept — then applies dropout. Draws come
from the caller's seeded generator (field masks) and torch's seeded generator (dropout): same seed, same views.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mask_ids(ids: torch.Tensor, rate: float, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """`ids` with each entry replaced by `pad` with probability `rate` (a masked history item pools as padding)."""
    if rate <= 0:
        return ids
    drop = torch.as_tensor(rng.random(tuple(ids.shape)) < rate)
    return torch.where(drop, torch.full_like(ids, pad), ids)


def field_keep_mask(n_rows: int, n_fields: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """bool [n_rows, n_fields]: each field kept with probability 1 − rate; a row that lost every field keeps one
    drawn at random (an all-zero input carries no view of the entity)."""
    keep = rng.random((n_rows, n_fields)) >= rate
    rescue = rng.integers(0, n_fields, size=n_rows)
    keep[np.arange(n_rows), rescue] |= ~keep.any(1)
    return keep


@contextmanager
def perturb(tower: nn.Module, n_fields: int, field_rate: float, dropout: float,
            rng: np.random.Generator) -> Iterator[None]:
    """Inside the block, every forward of `tower` masks fields and drops embedding coordinates (see the module)."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        b = x.shape[0]
        if x.shape[1] % n_fields:
            raise ValueError(f"perturb: the MLP input has {x.shape[1]} columns, not a multiple of {n_fields} fields")
        keep = torch.as_tensor(field_keep_mask(b, n_fields, field_rate, rng), dtype=x.dtype)
        x = (x.view(b, n_fields, -1) * keep.unsqueeze(2)).flatten(1)
        return (F.dropout(x, dropout, training=True) if dropout > 0 else x,)

    handle = tower.mlp.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
