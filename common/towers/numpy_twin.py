"""Numpy twins of user towers, used instead of torch on the request path.

A one-user eager torch call of the two-tower `UserTower` (≈30 small ops) costs ≈160 µs, almost all of it
dispatch overhead; the same arithmetic in numpy takes ≈20–50 µs. `TWINS` maps an architecture tag (the
manifest's `user_tower_meta["arch"]`) to a builder reading a loaded module's weights into such a function;
architectures without an entry run in torch. The vector server uses a twin only after it gave the module's answers
on a set of probe inputs (`matches`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from common.towers.layers import SENet
from common.towers.mind import MindTower, mind_twin
from common.towers.multitask import MultiTaskUserTower, multitask_twin
from common.towers.sdm_twin import SDMTower, sdm_twin
from common.towers.two_tower_user import UserTower

# (user [1], attrs [1, A], recent [1, R], recent_ts [1, R]) → [d] (or [K, d] for a K-interest tower)
TowerFn = Callable[..., np.ndarray]


def _linear(mod: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    w = mod.weight.detach().numpy().astype(np.float32)
    b = mod.bias.detach().numpy().astype(np.float32) if mod.bias is not None else np.zeros(w.shape[0], np.float32)
    return np.ascontiguousarray(w.T), b


def _mlp(seq: nn.Module) -> list[tuple[str, Any]] | None:
    layers: list[tuple[str, Any]] = []
    for child in seq.children():
        if isinstance(child, nn.Linear):
            layers.append(("linear", _linear(child)))
        elif isinstance(child, nn.ReLU):
            layers.append(("relu", None))
        elif isinstance(child, nn.Dropout):
            continue  # identity in eval mode
        else:
            return None
    return layers


def two_tower_user_twin(module: nn.Module, meta: dict[str, Any]) -> TowerFn | None:
    """The numpy forward of `UserTower` (common/towers/two_tower_user.py), or None if `module` is not one."""
    if not isinstance(module, UserTower):
        return None
    n_users, n_items, n_attrs = int(module.n_users), int(module.n_items), int(module.n_attrs)
    use_user_id, recent_last = bool(module.use_user_id), bool(module.recent_last)
    trained = module.trained_user.detach().numpy().astype(bool)
    user_emb = module.user_emb.weight.detach().numpy().astype(np.float32)
    attr_emb = module.attr_emb.weight.detach().numpy().astype(np.float32)
    offsets = module.attr_offsets.detach().numpy().astype(np.int64)
    item_emb = module.item_emb.weight.detach().numpy().astype(np.float32)
    if isinstance(module.senet, nn.Identity):
        senet = None
    elif isinstance(module.senet, SENet):
        senet = (_linear(module.senet.fc1), _linear(module.senet.fc2))
    else:
        return None
    layers = _mlp(module.mlp)
    if not layers:
        return None

    emb = item_emb.shape[1]
    n_fields = int(use_user_id) + n_attrs + 1 + int(recent_last)
    attr_at = emb * int(use_user_id)
    pool_at = attr_at + emb * n_attrs

    def forward(user: np.ndarray, attrs: np.ndarray, recent: np.ndarray, recent_ts: np.ndarray | None = None
                ) -> np.ndarray:
        x = np.empty(n_fields * emb, np.float32)  # the fields side by side, as the MLP sees them
        if use_user_id:
            u = int(user[0])
            x[:emb] = user_emb[u if 0 <= u < n_users and trained[u] else n_users]
        if n_attrs:
            x[attr_at:pool_at] = attr_emb[np.maximum(attrs[0, :n_attrs], 0) + offsets].reshape(-1)
        rec = recent[0]
        rec = rec[(rec >= 0) & (rec < n_items)]
        if len(rec):
            np.multiply(item_emb[rec].sum(axis=0), np.float32(1.0 / len(rec)), out=x[pool_at:pool_at + emb])
        else:
            x[pool_at:pool_at + emb] = 0.0
        if recent_last:
            r0 = int(recent[0, 0])
            x[pool_at + emb:] = item_emb[r0 if 0 <= r0 < n_items else n_items]
        if senet is not None:
            (w1, b1), (w2, b2) = senet
            f = x.reshape(n_fields, emb)
            z = np.maximum(f.mean(axis=1) @ w1 + b1, 0)
            x = (f * (2.0 / (1.0 + np.exp(-(z @ w2 + b2))))[:, None]).reshape(-1)
        h = x
        for kind, params in layers:
            h = h @ params[0] + params[1] if kind == "linear" else np.maximum(h, 0)
        return (h / max(float(np.sqrt(h.dot(h))), 1e-12)).astype(np.float32, copy=False)

    return forward


# architecture tag → twin builder (module, meta) → numpy forward or None
TWINS: dict[str, Callable[[nn.Module, dict[str, Any]], TowerFn | None]] = {
    UserTower.arch: two_tower_user_twin,
    MindTower.arch: mind_twin,
    MultiTaskUserTower.arch: multitask_twin,
    SDMTower.arch: sdm_twin,
}


def numpy_twin(module: nn.Module, meta: dict[str, Any]) -> TowerFn | None:
    """The numpy twin of the tower `meta["arch"]` names, or None when that architecture has none."""
    builder = TWINS.get(meta.get("arch"))  # type: ignore[arg-type]
    return None if builder is None else builder(module, meta)


def matches(fn: TowerFn, module: nn.Module, meta: dict[str, Any], n: int = 32, atol: float = 1e-4,
            seed: int = 0) -> bool:
    """True when `fn` gives `module`'s outputs on `n` probe users (known, unknown, with and without history)."""
    rng = np.random.default_rng(seed)
    n_users, n_items, r = int(meta["n_users"]), int(meta["n_items"]), int(meta["recent_n"])
    vocab = meta.get("attr_vocab", {})
    cols = list(meta.get("attr_columns", []))
    for j in range(n):
        u = np.array([rng.integers(0, n_users) if j % 4 else (n_users if j % 8 else -1)], np.int64)
        a = np.zeros((1, max(len(cols), 1)), np.int64)
        for c, col in enumerate(cols):  # a known value's code, or 0 (missing / unknown)
            codes = [0, *vocab.get(col, {}).values()]
            a[0, c] = codes[int(rng.integers(0, len(codes)))]
        rec = np.full((1, r), n_items, np.int64)
        ts = np.zeros((1, r), np.int64)
        m = int(rng.integers(0, r + 1)) if j % 3 else 0
        rec[0, :m] = rng.integers(0, n_items, m)
        ts[0, :m] = 1_700_000_000 - np.sort(rng.integers(0, 86_400 * 30, m))  # newest first
        with torch.inference_mode():
            want = module(torch.from_numpy(u), torch.from_numpy(a), torch.from_numpy(rec), torch.from_numpy(ts))
        want = want[0].numpy()
        got = fn(u, a, rec, ts)
        if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=1e-4):
            return False
    return True
