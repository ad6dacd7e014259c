"""The user tower of the multi-task two-tower channel (trainer/channels/multitask_two_tower.py trains it): one shared
bottom over the two-tower fields and one head per task; what it publishes is one head or a blend of heads.

    fields  = [user id] + [attribute codes] + masked mean of recent items + [newest item]   (as two_tower_user)
    h       = bottom(fields)                       shared Linear/ReLU layers (`hidden`)
    u_t     = normalise(head_t(h))                 per task (`head_hidden` layers, then Linear → out_dim)
    forward = Σ_t w_t·u_t          (combine "sum": the tasks share one item tower, score Σ_t w_t <u_t, v>)
            | [√w_t·u_t]_{w_t > 0}  (combine "concat": per-task item vectors [√w_t·v_t], score Σ_t w_t <u_t, v_t>)

`out_weights` (one per task; a single head = one-hot) is a hyper-parameter, not a weight: one trained model
exports one tower per published head/blend, all with the same state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import SENet, attr_embeddings, clamp_ids, known_users, masked_mean, mlp, offsets

Combine = Literal["sum", "concat"]


def bottom_layers(n_in: int, hidden: list[int], dropout: float) -> nn.Sequential:
    """Linear/ReLU(/Dropout) for each hidden size (no last Linear): the shared bottom; empty = identity."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = h
    return nn.Sequential(*layers)


def combine_vectors(vecs: torch.Tensor, weights: list[float], combine: Combine) -> torch.Tensor:
    """[B, T, d] task vectors → [B, d] (Σ_t w_t·v_t) or [B, n·d] ([√w_t·v_t] over the tasks with w_t > 0)."""
    w = torch.tensor(weights, dtype=vecs.dtype)
    if combine == "sum":
        return (vecs * w[None, :, None]).sum(1)
    live = [t for t, x in enumerate(weights) if x > 0]
    return (vecs[:, live] * w[live].sqrt()[None, :, None]).flatten(1)


class MultiTaskUserTower(Tower):
    """Shared-bottom user tower with one L2-normalised head per task; `forward` publishes `out_weights` of the
    heads, combined by `combine` (module docstring). `recent` newest first, padded with n_items; times unused."""

    arch = "multitask_user"

    def __init__(self, n_users: int, n_items: int, attr_sizes: list[int], emb_dim: int, out_dim: int,
                 hidden: list[int], head_hidden: list[int], dropout: float, senet: bool, use_user_id: bool,
                 tasks: list[str], out_weights: list[float] | None = None, combine: Combine = "sum",
                 recent_last: bool = True, item_emb: nn.Embedding | None = None):
        super().__init__()
        if not tasks:
            raise ValueError("a multi-task tower needs at least one task")
        weights = [1.0] + [0.0] * (len(tasks) - 1) if out_weights is None else [float(w) for w in out_weights]
        if len(weights) != len(tasks) or min(weights) < 0 or max(weights) <= 0:
            raise ValueError(f"out_weights {weights} must be one non-negative weight per task {tasks}, not all 0")
        if combine not in ("sum", "concat"):
            raise ValueError(f"combine must be 'sum' or 'concat', not {combine!r}")
        self.hparams = {"n_users": int(n_users), "n_items": int(n_items), "attr_sizes": [int(s) for s in attr_sizes],
                        "emb_dim": int(emb_dim), "out_dim": int(out_dim), "hidden": [int(h) for h in hidden],
                        "head_hidden": [int(h) for h in head_hidden], "dropout": float(dropout),
                        "senet": bool(senet), "use_user_id": bool(use_user_id), "tasks": [str(t) for t in tasks],
                        "out_weights": weights, "combine": str(combine), "recent_last": bool(recent_last)}
        self.n_users, self.n_items, self.n_attrs = n_users, n_items, len(attr_sizes)
        self.use_user_id, self.recent_last = use_user_id, recent_last
        self.tasks, self.out_weights, self.combine = list(tasks), weights, combine
        self.user_emb = nn.Embedding(n_users + 1, emb_dim)  # row n_users = unknown user
        # users without training interactions have untrained rows: they are served as the unknown user
        self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))
        self.attr_emb = nn.Embedding(max(1, sum(attr_sizes)), emb_dim)
        self.register_buffer("attr_offsets", offsets(attr_sizes), persistent=False)
        if item_emb is None:
            item_emb = nn.Embedding(n_items + 1, emb_dim, padding_idx=n_items)
        self.item_emb = item_emb  # n_items + 1 rows; row n_items pads `recent` (shared with the item side in training)
        n_fields = int(use_user_id) + self.n_attrs + 1 + int(recent_last)
        self.senet = SENet(n_fields) if senet else nn.Identity()
        self.bottom = bottom_layers(n_fields * emb_dim, hidden, dropout)
        n_bottom = hidden[-1] if hidden else n_fields * emb_dim
        self.heads = nn.ModuleList(mlp(n_bottom, head_hidden, out_dim, dropout) for _ in tasks)
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)

    def shared(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        """The shared bottom's output h [B, hidden[-1]] (the fields themselves without hidden layers)."""
        u = known_users(user_idx, self.n_users, self.trained_user)
        fields: list[torch.Tensor] = []
        if self.use_user_id:
            fields.append(self.user_emb(u))
        if self.n_attrs > 0:
            fields.extend(attr_embeddings(attrs, self.n_attrs, self.attr_offsets, self.attr_emb).unbind(1))
        rec = clamp_ids(recent, self.n_items)
        fields.append(masked_mean(rec, self.item_emb.weight, self.n_items))
        if self.recent_last:  # the newest item on its own (padding row is zero)
            fields.append(self.item_emb(rec[:, 0]))
        return self.bottom(self.senet(torch.stack(fields, dim=1)).flatten(1))

    def task_vectors(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        """[B, T, out_dim]: every task head's L2-normalised user vector (what training scores)."""
        h = self.shared(user_idx, attrs, recent)
        return F.normalize(torch.stack([head(h) for head in self.heads], dim=1), dim=2)

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        return combine_vectors(self.task_vectors(user_idx, attrs, recent), self.out_weights, self.combine)


def _linear(mod: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return (np.ascontiguousarray(mod.weight.detach().numpy().astype(np.float32).T),
            mod.bias.detach().numpy().astype(np.float32))


def _dense(seq: nn.Module) -> list[tuple[np.ndarray, np.ndarray] | None] | None:
    """A Sequential of Linear/ReLU/Dropout as [(W, b) | None (= ReLU)], or None for any other layer."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for child in seq.children():
        if isinstance(child, nn.Linear):
            out.append(_linear(child))
        elif isinstance(child, nn.ReLU):
            out.append(None)
        elif not isinstance(child, nn.Dropout):
            return None
    return out


def _run(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray] | None]) -> np.ndarray:
    for layer in layers:
        x = np.maximum(x, 0) if layer is None else x @ layer[0] + layer[1]
    return x


def multitask_twin(module: nn.Module, meta: dict[str, Any]) -> Callable[..., np.ndarray] | None:
    """The numpy forward of `MultiTaskUserTower` for one request (only the published heads run), or None."""
    if not isinstance(module, MultiTaskUserTower):
        return None
    n_users, n_items, n_attrs = module.n_users, module.n_items, module.n_attrs
    use_user_id, recent_last = module.use_user_id, module.recent_last
    trained = module.trained_user.detach().numpy().astype(bool)
    user_emb = module.user_emb.weight.detach().numpy().astype(np.float32)
    attr_emb = module.attr_emb.weight.detach().numpy().astype(np.float32)
    offs = module.attr_offsets.detach().numpy().astype(np.int64)
    item_emb = module.item_emb.weight.detach().numpy().astype(np.float32)
    senet = None if isinstance(module.senet, nn.Identity) else (_linear(module.senet.fc1), _linear(module.senet.fc2))
    bottom = _dense(module.bottom)
    heads = [_dense(h) for h in module.heads]
    if bottom is None or any(h is None for h in heads):
        return None
    w = np.asarray(module.out_weights, np.float32)
    live = [t for t in range(len(w)) if w[t] > 0]
    scale = w if module.combine == "sum" else np.sqrt(w)
    emb = item_emb.shape[1]
    n_fields = int(use_user_id) + n_attrs + 1 + int(recent_last)

    def forward(user: np.ndarray, attrs: np.ndarray, recent: np.ndarray, recent_ts: np.ndarray | None = None
                ) -> np.ndarray:
        f = np.empty((n_fields, emb), np.float32)
        j = 0
        if use_user_id:
            u = int(user[0])
            f[0] = user_emb[u if 0 <= u < n_users and trained[u] else n_users]
            j = 1
        if n_attrs:
            f[j:j + n_attrs] = attr_emb[np.maximum(attrs[0, :n_attrs], 0) + offs]
            j += n_attrs
        rec = recent[0]
        rec = rec[(rec >= 0) & (rec < n_items)]
        f[j] = item_emb[rec].mean(axis=0) if len(rec) else 0.0
        if recent_last:
            r0 = int(recent[0, 0])
            f[j + 1] = item_emb[r0 if 0 <= r0 < n_items else n_items]
        if senet is not None:
            (w1, b1), (w2, b2) = senet
            z = np.maximum(f.mean(axis=1) @ w1 + b1, 0)
            f = f * (2.0 / (1.0 + np.exp(-(z @ w2 + b2))))[:, None]
        h = _run(f.reshape(-1), bottom)
        outs = []
        for t in live:
            v = _run(h, heads[t])
            outs.append(v * (scale[t] / max(float(np.sqrt(v.dot(v))), 1e-12)))
        out = np.sum(outs, axis=0) if module.combine == "sum" else np.concatenate(outs)
        return out.astype(np.float32, copy=False)

    return forward
