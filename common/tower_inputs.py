"""The contract between an exported user tower (TorchScript) and whoever calls it at request time.

An embedding channel that exports a user tower stores `user_tower_meta` in its manifest:
    {"n_users": U, "n_items": I, "recent_n": R, "attr_columns": [...], "attr_vocab": {col: {value: code}}}
and its TorchScript module has `forward(user_idx: int64[B], attrs: int64[B, A], recent: int64[B, R]) -> float32[B, d]`
where an unknown user is index U, a missing/unknown attribute value is code 0, and `recent` is padded with I.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_user_inputs(meta: dict[str, Any], user_idx: int, attrs: dict[str, Any] | None,
                       recent_item_idx: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build the three int64 input arrays (batch of one) for the user tower."""
    n_users, n_items, r = int(meta["n_users"]), int(meta["n_items"]), int(meta["recent_n"])
    u = np.array([user_idx if 0 <= user_idx < n_users else n_users], dtype=np.int64)
    cols = list(meta.get("attr_columns", []))
    vocab = meta.get("attr_vocab", {})
    a = np.zeros((1, max(len(cols), 1)), dtype=np.int64)
    for j, c in enumerate(cols):
        v = (attrs or {}).get(c)
        a[0, j] = vocab.get(c, {}).get(str(v), 0) if v is not None else 0
    rec = np.full((1, r), n_items, dtype=np.int64)
    items = [int(i) for i in recent_item_idx if 0 <= int(i) < n_items][:r]
    rec[0, : len(items)] = items
    return u, a, rec
