"""The session item graph (EGES): a directed, weighted item graph whose weight of i → j is the number of
consecutive i → j transitions inside sessions (`trainer.data.sessions`, 30-minute rule). With `ties: unordered`
the events of one user in one second (a tie group: no order, the log lists them by item id) form a set: edges from
every item of a group to every item of the next, and both ways inside, weighted to stand for the transitions they
replace (`transition_edges`). With `edge_window` k > 1 (an option; the paper's graph is k = 1) an item also links
to the items up to k positions after it in its session (`window_edges`), still "transitions inside sessions"."""

from __future__ import annotations

from typing import Literal

import numpy as np

from trainer.data.sessions import session_bounds, split_sessions, tie_groups
from trainer.data.train_data import TrainData
from trainer.graph.walks import CSRGraph, csr_from_edges


def _cross_pairs(a0: np.ndarray, na: np.ndarray, b0: np.ndarray, nb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (a, b) with a in [a0[k], a0[k] + na[k]) and b in [b0[k], b0[k] + nb[k]), for every k, vectorised:
    int64 (a positions, b positions), block k's na[k]·nb[k] pairs in row-major order."""
    cnt = (na * nb).astype(np.int64)
    blk = np.repeat(np.arange(len(cnt), dtype=np.int64), cnt)
    p = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return a0[blk] + p // nb[blk], b0[blk] + p % nb[blk]


def transition_edges(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, gap_s: int | None,
                     ties: Literal["ordered", "unordered"] = "ordered"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, weight) of the session transitions of a log sorted by (user, time) (self-loops dropped).

    `ordered`: every consecutive i → j inside a session, weight 1 (the paper). `unordered`: interactions of one
    tie group (same user, same second: `trainer.data.sessions.tie_groups`) have no order, so a group G_k of
    n_k items is a set: every item of G_k → every item of the next group G_{k+1} of the session, weight
    1 / (n_k · n_{k+1}) (the one transition the boundary stands for), and inside G_k every ordered pair of
    distinct items both ways, weight 1 / n_k (the n_k − 1 transitions the group stands for). The total weight
    of a session is its length − 1 in both modes; without ties the two modes give the same edges."""
    item_idx = np.asarray(item_idx, np.int64)
    sess = split_sessions(user_idx, ts, gap_s)
    if ties == "ordered":
        same = sess[1:] == sess[:-1]
        src, dst = item_idx[:-1][same], item_idx[1:][same]
        w = np.ones(len(src))
    elif ties == "unordered":
        starts, sizes = session_bounds(tie_groups(user_idx, ts))
        nxt = np.flatnonzero(sess[starts][1:] == sess[starts][:-1])  # group k → k + 1 of the same session
        a, b = _cross_pairs(starts[nxt], sizes[nxt], starts[nxt + 1], sizes[nxt + 1])
        wa = 1.0 / np.repeat(sizes[nxt] * sizes[nxt + 1], sizes[nxt] * sizes[nxt + 1])
        big = np.flatnonzero(sizes > 1)
        c, d = _cross_pairs(starts[big], sizes[big], starts[big], sizes[big])
        wc = 1.0 / np.repeat(sizes[big], sizes[big] ** 2)
        off = c != d
        src, dst = item_idx[np.r_[a, c[off]]], item_idx[np.r_[b, d[off]]]
        w = np.r_[wa, wc[off]]
    else:
        raise ValueError(f"unknown ties mode {ties!r}")
    keep = src != dst
    return src[keep], dst[keep], w[keep]


def window_edges(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, gap_s: int | None, k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, weight 1) of every i → j where j follows i by 1..k positions in the same session (self-loops
    dropped): the k-step transitions of a log sorted by (user, time); k = 1 is `transition_edges(ordered)`."""
    item_idx = np.asarray(item_idx, np.int64)
    sess = split_sessions(user_idx, ts, gap_s)
    src, dst = [], []
    for d in range(1, k + 1):
        same = np.flatnonzero(sess[d:] == sess[:-d]) if d < len(sess) else np.zeros(0, np.int64)
        src.append(item_idx[same])
        dst.append(item_idx[same + d])
    src, dst = np.concatenate(src), np.concatenate(dst)
    keep = src != dst
    return src[keep], dst[keep], np.ones(int(keep.sum()))


def session_graph(data: TrainData, gap_s: int | None, ties: Literal["ordered", "unordered"] = "ordered",
                  edge_window: int = 1) -> CSRGraph:
    """Directed item graph: weight of i → j = summed weight of the i → j session transitions (`transition_edges`:
    with `ordered` ties, the number of consecutive i → j transitions inside sessions); with `edge_window` k > 1
    the transitions 1..k steps apart (`window_edges`, ordered ties only)."""
    if edge_window > 1:
        if ties != "ordered":
            raise ValueError("edge_window > 1 needs ties: ordered")
        src, dst, w = window_edges(data.user_idx, data.item_idx, data.ts, gap_s, edge_window)
    else:
        src, dst, w = transition_edges(data.user_idx, data.item_idx, data.ts, gap_s, ties)
    return csr_from_edges(src, dst, w, data.n_items, data.n_items)
