"""The inputs of a user tower: one encoding, imported by the trainers (training examples, export) and by the
vector server (requests).

Every tower's `forward(user_idx, attrs, recent, recent_ts=None)` takes the four arrays of `TowerInputs`:

    user       int64 [B]      user index; an unknown user is index n_users
    attrs      int64 [B, A]   one code per attribute column of the manifest (A ≥ 1); 0 = missing/unknown value
    recent     int64 [B, R]   the latest items, newest first, padded with n_items (R = recent_n)
    recent_ts  int64 [B, R]   their timestamps (seconds), 0 where padded or not known (all 0 when the caller
                              has no times); the two-tower tower uses no times

`user_tower_meta` (manifest) carries what the encoding needs, next to the architecture (common/towers/registry.py):
    {"n_users": U, "n_items": I, "recent_n": R, "attr_columns": [...], "attr_vocab": {col: {value string: code}}}
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class TowerInputs(NamedTuple):
    user: np.ndarray
    attrs: np.ndarray
    recent: np.ndarray
    recent_ts: np.ndarray


def input_meta(n_users: int, n_items: int, recent_n: int, attr_columns: list[str],
               attr_vocab: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The input half of `user_tower_meta` (JSON-ready)."""
    return {"n_users": int(n_users), "n_items": int(n_items), "recent_n": int(recent_n),
            "attr_columns": [str(c) for c in attr_columns],
            "attr_vocab": {str(c): {str(k): int(v) for k, v in voc.items()} for c, voc in attr_vocab.items()}}


def encode_user_inputs(meta: dict[str, Any], user_idx: int, attrs: dict[str, Any] | None,
                       recent_item_idx: list[int] | np.ndarray,
                       recent_ts: list[int] | np.ndarray | None = None) -> TowerInputs:
    """Request time: the tower inputs of one user (batch of one) from raw attribute values and the user's latest
    item indices, newest first (out-of-range indices, e.g. -1 for an unknown item, are dropped together with
    their time). `recent_ts`, when given, is aligned with `recent_item_idx`."""
    n_users, n_items, r = int(meta["n_users"]), int(meta["n_items"]), int(meta["recent_n"])
    u = np.array([user_idx if 0 <= user_idx < n_users else n_users], dtype=np.int64)
    cols = meta.get("attr_columns", ())
    a = np.zeros((1, max(len(cols), 1)), dtype=np.int64)
    if cols:
        vocab = meta.get("attr_vocab", {})
        for j, c in enumerate(cols):
            v = (attrs or {}).get(c)
            a[0, j] = vocab.get(c, {}).get(str(v), 0) if v is not None else 0
    rec = np.full((1, r), n_items, dtype=np.int64)
    ts = np.zeros((1, r), dtype=np.int64)
    if recent_ts is None:
        items = [int(i) for i in recent_item_idx if 0 <= int(i) < n_items][:r]
        rec[0, : len(items)] = items
        return TowerInputs(u, a, rec, ts)
    kept = [(int(i), int(t)) for i, t in zip(recent_item_idx, recent_ts, strict=True) if 0 <= int(i) < n_items][:r]
    if kept:
        rec[0, : len(kept)], ts[0, : len(kept)] = zip(*kept, strict=True)
    return TowerInputs(u, a, rec, ts)


def recent_matrix(values: np.ndarray, user_start: np.ndarray, end: np.ndarray, n: int, pad: int) -> np.ndarray:
    """`values` (a per-interaction column, e.g. item indices or timestamps, ordered by user then time) at
    positions end-1, end-2, … (newest first) down to `user_start`, padded with `pad`; int64 [len(end), n].

    For a training example at position g, end = g gives the items *before* it (no leakage); for export,
    end = one past the user's last interaction gives their latest items.
    """
    pos = end[:, None] - np.arange(1, n + 1)[None, :]
    ok = pos >= user_start[:, None]
    out = np.where(ok, values[np.clip(pos, 0, None)], pad)
    return out.astype(np.int64)


def history_inputs(users: np.ndarray, attr_codes: np.ndarray, item_idx: np.ndarray, user_start: np.ndarray,
                   end: np.ndarray, recent_n: int, n_items: int, ts: np.ndarray | None = None) -> TowerInputs:
    """Training/export time: the tower inputs of a batch of users from the interaction log (`item_idx`, `ts`:
    ordered by user then time; user b's history starts at `user_start[b]` and the window ends before `end[b]`)
    and their attribute codes [B, A] (the codes `attr_vocab` maps raw values to). The same layout as
    `encode_user_inputs`: recent items newest first, padded with `n_items`; times 0 when `ts` is not given."""
    rec = recent_matrix(item_idx, user_start, end, recent_n, n_items)
    rts = np.zeros_like(rec) if ts is None else recent_matrix(ts, user_start, end, recent_n, 0)
    return TowerInputs(np.asarray(users, dtype=np.int64), np.asarray(attr_codes, dtype=np.int64), rec, rts)
