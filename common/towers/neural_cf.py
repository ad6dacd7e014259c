"""NeuMF (He et al., WWW 2017) as a served module: the user tower of the first stage and the rescorer of the second
(trainer/channels/neural_cf.py trains it).

    ŷ(u, i) = σ(hᵀ [p_u ⊙ q_i ; MLP([p'_u ; q'_i])] + b)        GMF and MLP with separate embeddings

The GMF part is an inner product and can be searched by faiss; the MLP part cannot. So the tower's output, the query
vector, is `[h_GMF ⊙ p_u ; p'_u]` and the published item vectors are `[q_i ; 0]`: their inner product is exactly
the GMF part of the logit (first stage), and `rescore(query, items)` computes the whole NeuMF logit of candidate
items from the same query vector (second stage; common/towers/rescore.py). User embeddings are the user-id row
plus, when `recent_n > 0`, the mean of the user's recent items' history embeddings (the paper's input layer with a
user-history feature), so a click posted a moment ago moves both parts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import clamp_ids, known_users, masked_mean


def halving_tower(n_in: int, hidden: list[int]) -> nn.Sequential:
    """NCF's MLP: Linear + ReLU for every layer (the last one included, as in the paper)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    return nn.Sequential(*layers)


class NeuMFTower(Tower):
    """forward(user, attrs, recent, recent_ts) → query [B, D] (D = dim·gmf + mlp_dim·mlp); `rescore(query, items)` →
    NeuMF logits [B, N]; `score(...)` = both (what training optimises). `gmf=False` / `mlp=False` give the paper's
    MLP-only / GMF-only models (pre-training, ablations). Attributes are not used (pure collaborative filtering)."""

    arch = "neural_cf"

    def __init__(self, n_users: int, n_items: int, dim: int, mlp_dim: int, hidden: list[int], recent_n: int,
                 gmf: bool = True, mlp: bool = True):
        super().__init__()
        if not (gmf or mlp):
            raise ValueError("NeuMF needs GMF, MLP or both")
        self.hparams = {"n_users": int(n_users), "n_items": int(n_items), "dim": int(dim), "mlp_dim": int(mlp_dim),
                        "hidden": [int(h) for h in hidden], "recent_n": int(recent_n), "gmf": bool(gmf),
                        "mlp": bool(mlp)}
        self.n_users, self.n_items, self.dim, self.mlp_dim = n_users, n_items, dim, mlp_dim
        self.use_gmf, self.use_mlp, self.use_recent = gmf, mlp, recent_n > 0
        # row n_users = unknown user; row n_items pads `recent` (held at zero)
        self.gmf_user = nn.Embedding(n_users + 1, dim) if gmf else None
        self.gmf_item = nn.Embedding(n_items + 1, dim) if gmf else None
        self.gmf_hist = nn.Embedding(n_items + 1, dim, padding_idx=n_items) if gmf and self.use_recent else None
        self.mlp_user = nn.Embedding(n_users + 1, mlp_dim) if mlp else None
        self.mlp_item = nn.Embedding(n_items + 1, mlp_dim) if mlp else None
        self.mlp_hist = nn.Embedding(n_items + 1, mlp_dim, padding_idx=n_items) if mlp and self.use_recent else None
        self.tower = halving_tower(2 * mlp_dim, list(hidden)) if mlp else None
        self.predict = nn.Linear(dim * int(gmf) + (hidden[-1] if hidden else 2 * mlp_dim) * int(mlp), 1)
        # users without training interactions are served as the unknown user; items without any are never answered
        self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))
        self.register_buffer("catalog", torch.ones(n_items, dtype=torch.bool))
        for emb in self.embeddings():
            nn.init.normal_(emb.weight, std=0.01)  # the paper's N(0, 0.01)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()

    def embeddings(self) -> list[nn.Embedding]:
        """The embedding tables (GMF and MLP: user, item, history), those that exist."""
        return [e for e in (self.gmf_user, self.gmf_item, self.gmf_hist, self.mlp_user, self.mlp_item, self.mlp_hist)
                if e is not None]

    def set_sparse(self, sparse: bool) -> NeuMFTower:
        """Sparse gradients for the embedding tables (training big catalogues with SparseAdam); no effect on outputs."""
        for e in self.embeddings():
            e.sparse = sparse
        return self

    def _pool(self, rec: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        """Mean of the recent items' history embeddings, padding left out (common/towers/layers.masked_mean, with
        the table's sparse-gradient setting)."""
        if not table.sparse:
            return masked_mean(rec, table.weight, self.n_items)
        return F.embedding_bag(rec, table.weight, mode="mean", padding_idx=self.n_items, sparse=True)

    @property
    def out_dim(self) -> int:
        """D, the query (and published item vector) size."""
        return self.dim * int(self.use_gmf) + self.mlp_dim * int(self.use_mlp)

    def h_gmf(self) -> torch.Tensor:
        """The GMF half of the output weights h."""
        return self.predict.weight[0, : self.dim]

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        u = known_users(user_idx, self.n_users, self.trained_user)
        rec = clamp_ids(recent, self.n_items)
        parts: list[torch.Tensor] = []
        if self.use_gmf:
            p = self.gmf_user(u)
            if self.gmf_hist is not None and rec.shape[1]:
                p = p + self._pool(rec, self.gmf_hist)
            parts.append(p * self.h_gmf().unsqueeze(0))
        if self.use_mlp:
            p = self.mlp_user(u)
            if self.mlp_hist is not None and rec.shape[1]:
                p = p + self._pool(rec, self.mlp_hist)
            parts.append(p)
        return torch.cat(parts, dim=1)

    def rescore(self, query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """NeuMF logits [B, N] of candidate item indices [B, N] for queries [B, D] (forward's output)."""
        it = clamp_ids(items, self.n_items)
        out = self.predict.bias.expand(it.shape)
        if self.use_gmf:  # Σ_k h_k p_k q_k: the query already holds h_GMF ⊙ p_u
            out = out + (self.gmf_item(it) @ query[:, : self.dim].unsqueeze(2)).squeeze(2)
        if self.use_mlp:
            # first layer on [p'_u ; q'_i] = W_user p'_u (once per user) + W_item q'_i: no [B, N, 2e] concatenation
            first = self.tower[0]
            pu = F.linear(query[:, self.out_dim - self.mlp_dim:], first.weight[:, : self.mlp_dim], first.bias)
            z = torch.relu(F.linear(self.mlp_item(it), first.weight[:, self.mlp_dim:]) + pu.unsqueeze(1))
            z = self.tower[2:](z)
            out = out + z @ self.predict.weight[0, self.predict.in_features - z.shape[-1]:]
        return out

    def score(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
              recent_ts: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        """The training path: `rescore(forward(...), items)`, so what is served is what was trained."""
        return self.rescore(self.forward(user_idx, attrs, recent, recent_ts), items)

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """[n_items, D]: `[q_i ; 0]` (GMF item embeddings, zeros where the query holds p'_u), zero for items
        outside the catalog; `<query, item vector>` is the GMF part of the logit."""
        out = torch.zeros(self.n_items, self.out_dim)
        if self.use_gmf:
            out[:, : self.dim] = self.gmf_item.weight[: self.n_items] * self.catalog.unsqueeze(1)
        return out

    @torch.no_grad()
    def numpy_rescorer(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """`rescore` for one query [D] and items [N] in numpy, the first MLP layer's item term precomputed for every
        item (W_item q'_i does not depend on the user); the weights are read now, so call it on a frozen module."""
        w = {k: v.detach().numpy().copy() for k, v in self.state_dict().items()}
        d, md, n = self.dim, self.mlp_dim, self.n_items
        b = float(w["predict.bias"][0])
        gmf_item = w["gmf_item.weight"] if self.use_gmf else None
        if self.use_mlp:
            w0 = w["tower.0.weight"]
            w_user, b0 = w0[:, :md].copy(), w["tower.0.bias"]
            item_first = w["mlp_item.weight"] @ w0[:, md:].T  # the first layer's item term, once per item
            rest = [(np.ascontiguousarray(w[f"tower.{j}.weight"].T), w[f"tower.{j}.bias"])
                    for j in range(2, len(self.tower), 2)]
            h_mlp = w["predict.weight"][0, self.predict.in_features - self.hparams["hidden"][-1]:]

        def rescore(query: np.ndarray, items: np.ndarray) -> np.ndarray:
            it = np.where((items >= 0) & (items < n), items, n)
            out = np.full(len(it), b, np.float32)
            if gmf_item is not None:
                out += gmf_item[it] @ query[:d]
            if self.use_mlp:
                z = item_first[it]
                z += w_user @ query[len(query) - md:] + b0
                np.maximum(z, 0, out=z)
                for wt, bias in rest:
                    z = z @ wt
                    z += bias
                    np.maximum(z, 0, out=z)
                out += z @ h_mlp
            return out

        return rescore
