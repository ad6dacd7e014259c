"""GraphSAGE / PinSAGE layers in plain torch over fixed-size neighbour tables (from trainer/graph/walks.py).

    SAGEConv       h' = normalize(ReLU(W [h_self ; n_agg] + w)),
                   n_agg = Σ_v α_v · ReLU(Q h_v + q)  (PinSAGE importance pooling, `transform=True`), or
                   n_agg = Σ_v α_v · h_v              (GraphSAGE mean aggregation: α uniform over the sample)
    GraphEncoder   K SAGEConv layers over an input layer h0 (item features), then G2·ReLU(G1 z + g) (+ h0 with
                   `residual`, as DGL's PinSAGE example), L2-normalised; computes only the nodes a batch needs,
                   layer by layer (unique nodes, as DGL's blocks), and the input layer once per call
    uniform_tables GraphSAGE's neighbour tables: one uniform 2-hop sample per layer
    pair_edges     the edges of a batch's training pairs, for `forbid`

A neighbour table is (nbr int64 [n_items, T], -1 = empty slot; w float32 [n_items, T], weights of a row sum to 1
or 0). `forbid` removes (node, neighbour) edges for one batch at every layer — the training pairs' own edges
(edge leakage, PinSAGE §3.3 / DGL's `remove_edges`) — and re-normalises the remaining weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.graph.walks import CSRGraph, uniform_neighbors

Table = tuple[torch.Tensor, torch.Tensor]  # (nbr int64 [n, T], w float32 [n, T])


class SAGEConv(nn.Module):
    """One convolution: importance pooling (`transform`: ReLU(Q h + q) per neighbour) or the plain weighted mean,
    concatenated with the node's own vector, a dense layer, ReLU, L2 normalisation."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, transform: bool = True):
        super().__init__()
        self.transform = transform
        self.q = nn.Linear(d_in, d_hidden) if transform else None
        self.w = nn.Linear(d_in + (d_hidden if transform else d_in), d_out)

    def forward(self, h_self: torch.Tensor, h_src: torch.Tensor, nbr_idx: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """h_self [N, d_in]; h_src [U, d_in] the vectors of the distinct neighbour nodes; nbr_idx [N, T] rows of
        h_src; weights [N, T] (0 on empty slots) → [N, d_out]. Each distinct node's message is computed once and
        pooled by `embedding_bag` with per-sample weights."""
        msg = torch.relu(self.q(h_src)) if self.q is not None else h_src
        agg = F.embedding_bag(nbr_idx, msg, per_sample_weights=weights, mode="sum")
        return F.normalize(torch.relu(self.w(torch.cat([h_self, agg], dim=1))), dim=1)


def masked_weights(nbr: torch.Tensor, w: torch.Tensor, owner: torch.Tensor, n_items: int,
                   forbid: torch.Tensor | None) -> torch.Tensor:
    """Weights of the neighbour rows of `owner` with empty slots and forbidden (owner, neighbour) edges set to 0,
    re-normalised to sum 1 per row (0 when none is left). `forbid`: int64 keys owner · n_items + neighbour."""
    ok = nbr >= 0
    if forbid is not None and len(forbid):
        ok &= ~torch.isin(owner.unsqueeze(1) * n_items + nbr.clamp(min=0), forbid)
    w = torch.where(ok, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True).clamp(min=1e-12)


class GraphEncoder(nn.Module):
    """Item vectors from an input layer `h0(items) → [N, d0]` and K `SAGEConv` layers over neighbour tables, then
    the final G2·ReLU(G1 h + g) (PinSAGE Algorithm 2), plus the input layer's vector with `residual` (projected when
    d0 ≠ out_dim), L2-normalised."""

    def __init__(self, h0: Callable[[torch.Tensor], torch.Tensor] | nn.Module, d0: int, dims: Sequence[int],
                 out_dim: int, n_items: int, transform: bool = True, residual: bool = False):
        super().__init__()
        self.h0 = h0
        self.n_items = n_items
        sizes = [d0, *dims]
        self.convs = nn.ModuleList(SAGEConv(a, a, b, transform) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.g1 = nn.Linear(sizes[-1], sizes[-1])
        self.g2 = nn.Linear(sizes[-1], out_dim)
        self.residual = residual
        self.res = (nn.Identity() if d0 == out_dim else nn.Linear(d0, out_dim, bias=False)) if residual else None

    def forward(self, items: torch.Tensor, tables: Sequence[Table], forbid: torch.Tensor | None = None
                ) -> torch.Tensor:
        """[N, out_dim] vectors of `items` (layer k uses tables[k-1], or tables[0] for every layer)."""
        levels, nodes, pos = [], items, torch.arange(len(items))  # pos: where `items` sit in `nodes`
        for k in range(len(self.convs), 0, -1):  # the node sets, top-down (unique nodes per layer, as DGL's blocks)
            nbr_t, w_t = tables[k - 1] if len(tables) > 1 else tables[0]
            nbr = nbr_t[nodes]
            w = masked_weights(nbr, w_t[nodes], nodes, self.n_items, forbid)
            n, t = nbr.shape
            uniq, inv = torch.unique(torch.cat([nodes, nbr.clamp(min=0).reshape(-1)]), return_inverse=True)
            levels.append((inv[:n], inv[n:].view(n, t), w))
            pos, nodes = inv[:n][pos], uniq
        h = self.h0(nodes)  # the input layer once, bottom-up from here; the residual reuses it
        h_items = h[pos]
        for conv, (self_idx, nbr_idx, w) in zip(self.convs, reversed(levels), strict=True):
            h = conv(h[self_idx], h, nbr_idx, w)
        z = self.g2(torch.relu(self.g1(h)))
        if self.res is not None:
            z = z + self.res(h_items)
        return F.normalize(z, dim=1)


def uniform_tables(item_users: CSRGraph, user_items: CSRGraph, num_neighbors: int, num_layers: int,
                   rng: np.random.Generator) -> list[Table]:
    """GraphSAGE's neighbour tables: one uniform item → user → item sample of `num_neighbors` per layer, weights
    uniform over the filled slots."""
    items = np.arange(item_users.n_src, dtype=np.int64)
    out = []
    for _ in range(num_layers):
        nb = uniform_neighbors(item_users, user_items, items, num_neighbors, rng)
        w = (nb >= 0).astype(np.float32)
        out.append((torch.as_tensor(nb), torch.as_tensor(w / np.maximum(w.sum(1, keepdims=True), 1.0))))
    return out


def pair_edges(q: np.ndarray, i: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted int64 keys (node · n_items + neighbour) of the edges q → i and i → q of a batch's training pairs:
    removed from every neighbourhood of that batch (GraphEncoder `forbid`)."""
    return np.unique(np.concatenate([q * n_items + i, i * n_items + q]))
