"""The numpy twin of the SDM user tower (common/towers/sdm.py), for the request path (one user per call).

The torch forward of `SDMTower` is ~150 small ops (LSTM, self-attention, two attention poolings, the gate); in
numpy the same arithmetic for one user costs a fraction of the dispatch overhead. The vector server uses it only
after `common.towers.numpy_twin.matches` found it equal to the torch forward on probe inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from common.towers.sdm import SDMTower

__all__ = ["SDMTower", "sdm_twin"]

TowerFn = Callable[..., np.ndarray]  # as common.towers.numpy_twin.TowerFn (which imports this module)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sdm_twin(module: nn.Module, meta: dict[str, Any]) -> TowerFn | None:
    """The numpy forward of an `SDMTower` (eval mode), or None if `module` is not one."""
    if not isinstance(module, SDMTower):
        return None
    m = module
    n_users, n_items, n_attrs, n_side = int(m.n_users), int(m.n_items), int(m.n_attrs), int(m.n_side)
    short_n, long_n, gap = int(m.short_n), int(m.long_n), m.session_gap_s
    trained = m.trained_user.detach().numpy().astype(bool)
    user_emb, attr_emb = _np(m.user_emb.weight), _np(m.attr_emb.weight)
    attr_off = m.attr_offsets.detach().numpy().astype(np.int64)
    wu, bu = _np(m.user_proj.weight).T.copy(), _np(m.user_proj.bias)
    item_emb, side_emb = _np(m.item_emb.weight), _np(m.side_emb.weight)
    side_pad = int(m.side_emb.padding_idx)
    side_off = m.side_offsets.detach().numpy().astype(np.int64)[:n_side]
    side_sizes = m.side_sizes.detach().numpy().astype(np.int64)[:n_side]
    codes = m.item_codes.detach().numpy().astype(np.int64)
    ws, bs = _np(m.short_in.weight).T.copy(), _np(m.short_in.bias)
    lstm = [(_np(getattr(m.lstm, f"weight_ih_l{k}")).T.copy(), _np(getattr(m.lstm, f"weight_hh_l{k}")).T.copy(),
             _np(getattr(m.lstm, f"bias_ih_l{k}")) + _np(getattr(m.lstm, f"bias_hh_l{k}")))
            for k in range(m.lstm.num_layers)]
    heads = int(m.mhsa.num_heads)
    w_in, b_in = _np(m.mhsa.in_proj_weight).T.copy(), _np(m.mhsa.in_proj_bias)
    w_out, b_out = _np(m.mhsa.out_proj.weight).T.copy(), _np(m.mhsa.out_proj.bias)
    ln_w, ln_b, ln_eps = _np(m.mhsa_norm.weight), _np(m.mhsa_norm.bias), float(m.mhsa_norm.eps)
    wl, bl = _np(m.long_out.weight).T.copy(), _np(m.long_out.bias)
    wg, bg = _np(m.gate.weight).T.copy(), _np(m.gate.bias)
    dim = item_emb.shape[1]
    hd = dim // heads
    fusion, normalize, use_user_id = m.fusion, bool(m.normalize), bool(m.use_user_id)

    def side_rows(c: np.ndarray) -> np.ndarray:
        ok = (c >= 0) & (c < side_sizes)
        return np.where(ok, c + side_off, side_pad)

    def attend(query: np.ndarray, g: np.ndarray) -> np.ndarray:
        return _softmax(g @ query) @ g if len(g) else np.zeros(dim, np.float32)

    def forward(user: np.ndarray, attrs: np.ndarray, recent: np.ndarray, recent_ts: np.ndarray | None = None
                ) -> np.ndarray:
        # e_u
        u = int(user[0])
        u = u if 0 <= u < n_users and trained[u] else n_users
        fields = []
        if use_user_id:
            fields.append(user_emb[u])
        if n_attrs:
            fields.append(attr_emb[np.maximum(attrs[0, :n_attrs], 0) + attr_off].reshape(-1))
        if not fields:
            fields.append(user_emb[n_users])
        e_u = np.tanh(np.concatenate(fields) @ wu + bu)
        # the request's items: newest first, real ones only; the short window and the long-term rest
        rec = recent[0]
        ok = (rec >= 0) & (rec < n_items)
        items = rec[ok]
        k = min(short_n, len(items))
        if gap is not None and recent_ts is not None and len(items) > 1:
            ts = recent_ts[0][ok]
            cut = (ts[:-1] > 0) & (ts[1:] > 0) & (ts[:-1] - ts[1:] > gap)
            if cut.any():
                k = min(k, int(np.argmax(cut)) + 1)
        short, long_items = items[:k][::-1], items[k:k + long_n]
        # long term: attention per attribute subset, dense tanh
        z = [attend(e_u, item_emb[long_items])]
        if n_side:
            rows = side_rows(codes[long_items])  # [L, n_side]
            for f in range(n_side):
                r = rows[:, f]
                z.append(attend(e_u, side_emb[r[r != side_pad]]))
        p = np.tanh(np.concatenate(z) @ wl + bl)
        # short term: LSTM → causal self-attention (residual, layer norm) → user attention at the newest position
        if k:
            x = [item_emb[short]]
            if n_side:
                x.append(side_emb[side_rows(codes[short])].reshape(k, -1))
            h = np.tanh(np.concatenate(x, axis=1) @ ws + bs)
            for w_ih, w_hh, b in lstm:
                gates_x = h @ w_ih + b
                out = np.empty((k, dim), np.float32)
                hs, cs = np.zeros(dim, np.float32), np.zeros(dim, np.float32)
                for t in range(k):
                    gt = gates_x[t] + hs @ w_hh
                    i, f, g, o = (gt[:dim], gt[dim:2 * dim], gt[2 * dim:3 * dim], gt[3 * dim:])
                    cs = (1 / (1 + np.exp(-f))) * cs + (1 / (1 + np.exp(-i))) * np.tanh(g)
                    hs = (1 / (1 + np.exp(-o))) * np.tanh(cs)
                    out[t] = hs
                h = out
            qkv = h @ w_in + b_in
            q, kk, v = (qkv[:, j * dim:(j + 1) * dim].reshape(k, heads, hd).transpose(1, 0, 2) for j in range(3))
            sc = q @ kk.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((k, k), -np.inf, np.float32), 1)
            a = (_softmax(sc) @ v).transpose(1, 0, 2).reshape(k, dim) @ w_out + b_out
            y = h + a
            mu, var = y.mean(1, keepdims=True), y.var(1, keepdims=True)
            h = (y - mu) / np.sqrt(var + ln_eps) * ln_w + ln_b
            s = _softmax(h @ e_u) @ h
        else:
            s = np.zeros(dim, np.float32)
        if fusion == "sum":
            o_vec = s + p
        else:
            g = 1 / (1 + np.exp(-(np.concatenate([e_u, s, p]) @ wg + bg)))
            o_vec = (1 - g) * p + g * s
        if normalize:
            o_vec = o_vec / max(float(np.sqrt(o_vec.dot(o_vec))), 1e-12)
        return o_vec.astype(np.float32, copy=False)

    return forward
