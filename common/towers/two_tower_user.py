"""The user tower of the two-tower (DSSM) channel (trainer/channels/two_tower.py trains it; its item tower and
losses stay on the training side)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import SENet, attr_embeddings, clamp_ids, known_users, masked_mean, mlp, offsets


class UserTower(Tower):
    """user id + user attribute codes + masked mean of recent items' embeddings (+ optionally the newest
    item's embedding) → MLP → L2-normalised. `recent` is newest first, padded with n_items; times unused.

    `item_emb` (n_items + 1 rows, the last pads `recent`) may be shared with the item tower while training; left
    None (rebuilding for serving), the tower makes its own.
    """

    arch = "two_tower_user"

    def __init__(self, n_users: int, n_items: int, attr_sizes: list[int], emb_dim: int, out_dim: int,
                 hidden: list[int], dropout: float, senet: bool, use_user_id: bool,
                 item_emb: nn.Embedding | None = None, recent_last: bool = False):
        super().__init__()
        self.hparams = {"n_users": int(n_users), "n_items": int(n_items), "attr_sizes": [int(s) for s in attr_sizes],
                        "emb_dim": int(emb_dim), "out_dim": int(out_dim), "hidden": [int(h) for h in hidden],
                        "dropout": float(dropout), "senet": bool(senet), "use_user_id": bool(use_user_id),
                        "recent_last": bool(recent_last)}
        self.n_users, self.n_items, self.n_attrs = n_users, n_items, len(attr_sizes)
        self.use_user_id = use_user_id
        self.recent_last = recent_last
        self.use_senet = senet
        # (the order of the layers below is the order of the random draws of their initialisation: keep it)
        self.user_emb = nn.Embedding(n_users + 1, emb_dim)  # row n_users = unknown user
        # users without training interactions have untrained rows: they are served as the unknown user
        self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))
        self.attr_emb = nn.Embedding(max(1, sum(attr_sizes)), emb_dim)
        self.register_buffer("attr_offsets", offsets(attr_sizes), persistent=False)
        if item_emb is None:
            item_emb = nn.Embedding(n_items + 1, emb_dim, padding_idx=n_items)
        self.item_emb = item_emb  # n_items + 1 rows; row n_items pads `recent`
        n_fields = int(use_user_id) + self.n_attrs + 1 + int(recent_last)
        self.senet = SENet(n_fields) if senet else nn.Identity()
        self.mlp = mlp(n_fields * emb_dim, hidden, out_dim, dropout)
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        u = known_users(user_idx, self.n_users, self.trained_user)
        fields: list[torch.Tensor] = []
        if self.use_user_id:
            fields.append(self.user_emb(u))
        if self.n_attrs > 0:
            fields.extend(attr_embeddings(attrs, self.n_attrs, self.attr_offsets, self.attr_emb).unbind(1))
        rec = clamp_ids(recent, self.n_items)
        fields.append(masked_mean(rec, self.item_emb.weight, self.n_items, sparse=self.item_emb.sparse))
        if self.recent_last:  # the newest item on its own (recent is newest first; padding row is zero)
            fields.append(self.item_emb(rec[:, 0]))
        x = self.senet(torch.stack(fields, dim=1))
        return F.normalize(self.mlp(x.flatten(1)), dim=1)
