"""What a request-time user tower (common/towers) is fed while training and publishing: the inputs of users at
positions of the interaction log (common/towers/inputs.py, the encoding serving builds), user-id dropout, which
users trained, and publishing every user's vector in batches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common.towers import history_inputs
from trainer.data.train_data import TrainData

ENCODE_BATCH = 4096  # users per forward pass when publishing


def tower_inputs(data: TrainData, users: np.ndarray, end: np.ndarray, recent_n: int,
                 attr_codes: np.ndarray | None = None, times: bool = False) -> tuple[torch.Tensor, ...]:
    """(user, attrs, recent) tensors of `users` from their items before `end` (training: the example's own
    position, so no leakage; publishing: one past the user's last interaction); with `times`, also recent_ts.
    `attr_codes` [n_users(+1), A] (None: one zero column)."""
    codes = np.zeros((len(users), 1), np.int64) if attr_codes is None else attr_codes[users]
    x = history_inputs(users, codes, data.item_idx, data.user_ptr[users], end, recent_n, data.n_items,
                       data.ts if times else None)
    return tuple(torch.as_tensor(a) for a in (x if times else x[:3]))


def drop_user_ids(uid: torch.Tensor, rate: float, n_users: int, rng: np.random.Generator) -> torch.Tensor:
    """A share `rate` of the ids replaced by the unknown user `n_users` (no draw at rate 0)."""
    if rate <= 0:
        return uid
    drop = torch.as_tensor(rng.random(len(uid)) < rate)
    return torch.where(drop, torch.full_like(uid, n_users), uid)


def trained_users(user_idx: np.ndarray, n_users: int) -> torch.Tensor:
    """bool [n_users]: the users with at least one training example."""
    return torch.as_tensor(np.bincount(user_idx, minlength=n_users)[:n_users] > 0)


def encode_in_batches(data: TrainData, users: np.ndarray | None, encode: Callable[[np.ndarray], np.ndarray],
                      width: int) -> np.ndarray:
    """float32 [n, width]: `encode(user batch)` over `users` (None: every user) in batches of ENCODE_BATCH."""
    users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
    out = [encode(users[b:b + ENCODE_BATCH]) for b in range(0, len(users), ENCODE_BATCH)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)
