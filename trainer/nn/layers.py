"""Layers of the towers: MLP towers, SENet field re-weighting, pooling over a padded history.

Forward code that a *served* user tower runs lives in `common/towers/layers.py` (the vector server imports it,
not trainer/) and is re-exported here: `SENet`, `mlp`, `masked_mean` (embedding-bag mean leaving a padding id
out), `offsets`, `clamp_ids`. What is defined here is for training-side towers (item towers, models without a
served tower); a layer that a served user tower needs moves to common/towers.

History conventions (all pooling layers): a history is [B, L] item ids padded with a `pad` id, or [B, L, d]
vectors with a bool mask [B, L] (True = real item); padding never changes the result, and an all-padding row
pools to zeros. Multi-interest layers (MIND's capsule routing) and sequence encoders (SDM's LSTM/attention) take
the same (vectors, mask) pair and return [B, K, d] / [B, L, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.towers.layers import SENet, clamp_ids, masked_mean, mlp, offsets

__all__ = ["SENet", "mlp", "masked_mean", "offsets", "clamp_ids", "MLPTower", "history_mask", "masked_mean_pool",
           "AttentionPooling"]


class MLPTower(nn.Module):
    """Field embeddings [B, F, e] → (SENet) → flatten → MLP(hidden) → `out_dim` (L2-normalised if `normalize`)."""

    def __init__(self, n_fields: int, emb_dim: int, hidden: list[int], out_dim: int, dropout: float = 0.0,
                 senet: bool = False, normalize: bool = True):
        super().__init__()
        self.senet = SENet(n_fields) if senet else nn.Identity()
        self.mlp = mlp(n_fields * emb_dim, hidden, out_dim, dropout)
        self.normalize = normalize

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.senet(fields).flatten(1))
        return F.normalize(out, dim=1) if self.normalize else out


def history_mask(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """bool [B, L]: True where `ids` holds an item (not `pad`, not out of [0, pad))."""
    return (ids >= 0) & (ids < pad)


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, d] over the positions where mask [B, L] is True; zeros for a row without any."""
    m = mask.to(x.dtype).unsqueeze(2)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class AttentionPooling(nn.Module):
    """Attention-weighted sum of a history x [B, L, d] (padding masked out of the softmax).

    With a query [B, d] (target attention, as DIN/SDM): score = MLP([q, x, q·x, q − x]) (`hidden`), or q·x / √d
    with `hidden=()`. Without one: a learned query vector scores each position (self-attentive pooling).
    An all-padding row gives zeros.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (32,), learned_query: bool = False):
        super().__init__()
        self.dim = dim
        self.score_mlp = mlp(4 * dim, list(hidden), 1, 0.0) if hidden else None
        self.query = nn.Parameter(torch.randn(dim) * dim ** -0.5) if learned_query else None

    def weights(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights [B, L] (0 on padding; a row without items is all zeros)."""
        if query is None:
            if self.query is None:
                raise ValueError("AttentionPooling without a learned query needs a query")
            query = self.query.expand(x.shape[0], -1)
        q = query.unsqueeze(1).expand_as(x)
        if self.score_mlp is not None:
            scores = self.score_mlp(torch.cat([q, x, q * x, q - x], dim=2)).squeeze(2)
        else:
            scores = (q * x).sum(2) / self.dim ** 0.5
        # padding → −inf; a row without items gets finite scores (no NaN, in values or gradients), then weight 0
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(1, keepdim=True), 0.0)
        return torch.softmax(scores, dim=1) * mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        return (self.weights(x, mask, query).unsqueeze(2) * x).sum(1)
