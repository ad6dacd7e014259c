"""The numpy twin of the SDM user tower (common/towers/sdm.py), for the request path (one user per call).

The torch forward of `SDMTower` is ~150 small ops (LSTM, self-attention, two attention poolings, the gate); in
numpy the same arithmetic for one user costs a fraction of the dispatch overhead. The vector server uses it only
after `common.towers.numpy_twin.matches` found it equal to the torch forward on probe inputs.

What depends only on an item is computed once, when the twin is built: each item's short-term input
x = tanh(W_x [e_item; e_side…] + b) (one [n_items, dim] float32 table) and the rows of its long-term fields in one
table (item id row, then one row per side field). A request then gathers rows; the LSTM runs its gates as one
[4·dim] vector per step (σ(x) = (1 + tanh(x/2))/2, so one tanh per step covers all four gates).
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
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _lstm_layer(w_ih: np.ndarray, w_hh: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """One LSTM layer (torch gate order i, f, g, o) over a [k, d] sequence; the gates reordered to (i, f, o, g),
    i/f/o pre-scaled by ½ so that one tanh per step gives the three sigmoids and g."""
    d = w_hh.shape[1]
    order = np.r_[0:2 * d, 3 * d:4 * d, 2 * d:3 * d]
    scale = np.r_[np.full(3 * d, 0.5, np.float32), np.ones(d, np.float32)]
    w_ih_t = np.ascontiguousarray((w_ih[order].T * scale).astype(np.float32))
    w_hh_t = np.ascontiguousarray((w_hh[order].T * scale).astype(np.float32))
    b_s = (b[order] * scale).astype(np.float32)

    def run(x: np.ndarray) -> np.ndarray:
        k = len(x)
        gx = x @ w_ih_t
        gx += b_s
        out = np.empty((k, d), np.float32)
        c, tmp = np.zeros(d, np.float32), np.empty(d, np.float32)
        gt = np.empty(4 * d, np.float32)
        sig, s_i, s_f, s_o, g = gt[:3 * d], gt[:d], gt[d:2 * d], gt[2 * d:3 * d], gt[3 * d:]  # views, made once
        for t in range(k):
            if t:
                np.dot(out[t - 1], w_hh_t, out=gt)
                gt += gx[t]
            else:
                gt[:] = gx[0]
            np.tanh(gt, out=gt)
            sig *= 0.5
            sig += 0.5  # σ of i, f, o
            c *= s_f
            np.multiply(s_i, g, out=tmp)
            c += tmp
            np.tanh(c, out=tmp)
            np.multiply(s_o, tmp, out=out[t])
        return out

    return run


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
    codes = m.item_codes.detach().numpy().astype(np.int64)[:n_items]
    side = np.where((codes >= 0) & (codes < side_sizes), codes + side_off, side_pad)  # [n_items, n_side] rows
    dim = item_emb.shape[1]
    # per item, once: the short-term input (what `short_in` makes of its id and side embeddings) ...
    ws, bs = _np(m.short_in.weight).T.copy(), _np(m.short_in.bias)
    x_item = np.empty((n_items, dim), np.float32)
    for a in range(0, n_items, 65536):
        b = min(a + 65536, n_items)
        z = item_emb[a:b] @ ws[:dim]
        for f in range(n_side):
            z += side_emb[side[a:b, f]] @ ws[(1 + f) * dim:(2 + f) * dim]
        x_item[a:b] = np.tanh(z + bs)
    # ... and its long-term fields as rows of one table [item_emb; side_emb] (a missing side code: the zero pad row)
    table = np.concatenate([item_emb, side_emb])
    long_rows = np.concatenate([np.arange(n_items)[:, None], side + len(item_emb)], axis=1)  # [n_items, F]
    long_pad = side_pad + len(item_emb)
    lstm = [_lstm_layer(_np(getattr(m.lstm, f"weight_ih_l{k}")), _np(getattr(m.lstm, f"weight_hh_l{k}")),
                        _np(getattr(m.lstm, f"bias_ih_l{k}")) + _np(getattr(m.lstm, f"bias_hh_l{k}")))
            for k in range(m.lstm.num_layers)]
    heads = int(m.mhsa.num_heads)
    hd = dim // heads
    w_in, b_in = _np(m.mhsa.in_proj_weight).T.copy(), _np(m.mhsa.in_proj_bias)
    w_in[:, :dim] *= np.float32(1 / np.sqrt(hd))  # the scaled dot product's 1/√hd, folded into q
    b_in[:dim] *= np.float32(1 / np.sqrt(hd))
    w_out, b_out = _np(m.mhsa.out_proj.weight).T.copy(), _np(m.mhsa.out_proj.bias)
    ln_w, ln_b, ln_eps = _np(m.mhsa_norm.weight), _np(m.mhsa_norm.bias), float(m.mhsa_norm.eps)
    wl, bl = _np(m.long_out.weight).T.copy(), _np(m.long_out.bias)
    wg, bg = _np(m.gate.weight).T.copy(), _np(m.gate.bias)
    causal = [np.triu(np.full((k, k), -np.inf, np.float32), 1) for k in range(short_n + 1)]
    fusion, normalize, use_user_id = m.fusion, bool(m.normalize), bool(m.use_user_id)
    zeros = np.zeros(dim, np.float32)

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
        # long term: e_u-attention over each attribute subset (one [L, F] score matrix), dense tanh
        if len(long_items):
            rows = long_rows[long_items]  # [L, F]
            g = table[rows]  # [L, F, d]
            sc = g @ e_u
            sc[rows == long_pad] = -np.inf
            top = sc.max(0)
            top[~np.isfinite(top)] = 0.0  # a field without any known code pools to zero
            w = np.exp(sc - top)
            w /= np.maximum(w.sum(0), 1e-30)
            z = np.matmul(w.T[:, None, :], g.transpose(1, 0, 2)).reshape(-1)  # Σ_l w[l, f] g[l, f]
        else:
            z = np.zeros((1 + n_side) * dim, np.float32)
        p = np.tanh(z @ wl + bl)
        # short term: LSTM → causal self-attention (residual, layer norm) → user attention at the newest position
        if k:
            h = x_item[short]
            for layer in lstm:
                h = layer(h)
            qkv = h @ w_in
            qkv += b_in
            q, kk, v = (qkv[:, j * dim:(j + 1) * dim].reshape(k, heads, hd).transpose(1, 0, 2) for j in range(3))
            sc = q @ kk.transpose(0, 2, 1)
            sc += causal[k]
            a = (_softmax(sc) @ v).transpose(1, 0, 2).reshape(k, dim) @ w_out
            a += b_out
            y = h + a
            y -= y.mean(1, keepdims=True)
            y /= np.sqrt((y * y).mean(1, keepdims=True) + ln_eps)
            h = y * ln_w + ln_b
            s = _softmax(h @ e_u) @ h
        else:
            s = zeros
        if fusion == "sum":
            o_vec = s + p
        else:
            g = 1 / (1 + np.exp(-(np.concatenate([e_u, s, p]) @ wg + bg)))
            o_vec = (1 - g) * p + g * s
        if normalize:
            o_vec = o_vec / max(float(np.sqrt(o_vec.dot(o_vec))), 1e-12)
        return o_vec.astype(np.float32, copy=False)

    return forward
