"""Training examples from the interaction log (ordered by user, then time): the next-item positions (those with an
earlier item of the same user) and a fixed number of them drawn per user (so heavy users do not dominate); the
(item, a later item of the same user) pairs within a window."""

from __future__ import annotations

import numpy as np

from trainer.data.train_data import TrainData


def next_item_positions(data: TrainData) -> tuple[np.ndarray, np.ndarray]:
    """(positions with at least one earlier item of the same user, their users) — both int64, grouped by user."""
    pos = np.arange(len(data.item_idx), dtype=np.int64)
    cand = pos[pos > data.user_ptr[data.user_idx]]
    return cand, data.user_idx[cand].astype(np.int64)


def sample_per_user(cand: np.ndarray, cand_user: np.ndarray, k: int | None,
                    rng: np.random.Generator) -> np.ndarray:
    """`k` of each user's candidate positions, drawn without replacement (all of them when a user has ≤ k);
    `cand` grouped by user (`cand_user` non-decreasing). Vectorised: one random key per candidate, ranked within
    its user."""
    if k is None:
        return cand
    keys = rng.random(len(cand))
    order = np.lexsort((keys, cand_user))  # user blocks stay where they are, shuffled inside
    start = np.searchsorted(cand_user, cand_user[order], side="left")
    rank = np.arange(len(cand)) - start
    return np.sort(cand[order][rank < k])


def sequence_pairs(user_idx: np.ndarray, item_idx: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, i) int64: i clicked 1…`window` positions after q by the same user (interactions ordered by user, time)."""
    qs, is_ = [], []
    for d in range(1, window + 1):
        same = user_idx[d:] == user_idx[:-d]
        qs.append(item_idx[:-d][same])
        is_.append(item_idx[d:][same])
    q = np.concatenate(qs).astype(np.int64) if qs else np.zeros(0, np.int64)
    i = np.concatenate(is_).astype(np.int64) if is_ else np.zeros(0, np.int64)
    keep = q != i
    return q[keep], i[keep]
