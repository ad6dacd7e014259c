"""MIND's user tower (Li et al., CIKM 2019, "Multi-Interest Network with Dynamic Routing"): forward code only,
trained by trainer/channels/mind.py and rebuilt by the vector server from its state dict (arch "mind").

    behaviours  e_i  = pooled item embedding (id + side-information bags, mean over the fields), L2-normalised
    bilinear    ê_i  = S e_i            (one matrix S shared by every behaviour and interest)
    routing     b_ij ← fixed seeded N(0, σ²) init (a buffer of the state dict: the same in training-eval and
                serving), then `iterations` times:
                    w_ij = softmax over the live interests j of b_ij   (padding behaviours weigh 0)
                    z_j  = Σ_i w_ij ê_i,   u_j = squash(z_j) = ‖z‖²/(1+‖z‖²) · z/‖z‖
                    b_ij += u_j · ê_i     (non-final iterations see ê without gradient, as DeepMatch/ComiRec)
    K_u         = max(1, min(K, ⌊log2 |I_u|⌋)), |I_u| = non-padding history items (`dynamic_k`; else K)
    interests   v_j = normalise(MLP([u_j, profile]))  (profile = user id / attribute embeddings, optionally the
                newest behaviour e_1 — `recent_last`, not in the paper); rows j ≥ K_u are zero (dead interests,
                dropped by the server's K-vector search)

`forward(user_idx, attrs, recent, recent_ts=None)` → float32 [B, K, d] (common/towers/inputs.py; times unused).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.towers.base import Tower
from common.towers.layers import attr_embeddings, clamp_ids, known_users, mlp, offsets

__all__ = ["ItemPooling", "MindTower", "b2i_routing", "interest_count", "mind_twin", "squash"]


def interest_count(n_hist: torch.Tensor, k_max: int, dynamic: bool = True) -> torch.Tensor:
    """K_u = max(1, min(K, ⌊log2 n⌋)) per entry of `n_hist` (n = 0 → 1), in exact integer arithmetic;
    K everywhere when not `dynamic`."""
    if not dynamic:
        return torch.full_like(n_hist, k_max)
    powers = torch.tensor([2 ** j for j in range(1, k_max + 1)], dtype=n_hist.dtype, device=n_hist.device)
    return (n_hist.unsqueeze(-1) >= powers).sum(-1).clamp(min=1).to(n_hist.dtype)


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule squash along the last axis: ‖z‖²/(1+‖z‖²) · z/‖z‖ (norm in [0, 1); zero stays zero)."""
    n2 = (z * z).sum(-1, keepdim=True)
    return z * (n2 / (1.0 + n2) / torch.sqrt(n2 + eps))


def b2i_routing(e_hat: torch.Tensor, mask: torch.Tensor, live: torch.Tensor, init: torch.Tensor,
                iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Behaviour-to-interest dynamic routing. e_hat [B, L, d] mapped behaviours, mask [B, L] real behaviours,
    live [B, K] live interests (≥ 1 per row), init [L, K] or [B, L, K] routing logits. Returns the interest
    capsules [B, K, d] (zero where not live) and the last coupling coefficients w [B, L, K] (each real
    behaviour's row sums to 1 over the live interests; padding rows are 0)."""
    b = init.expand(e_hat.shape[0], -1, -1) if init.dim() == 2 else init
    dead = (~live).unsqueeze(1)  # [B, 1, K]
    e_stop = e_hat.detach()
    keep = mask.unsqueeze(2).to(e_hat.dtype)
    u = w = None
    for it in range(iterations):
        w = torch.softmax(b.masked_fill(dead, float("-inf")), dim=2) * keep
        last = it == iterations - 1
        u = squash(torch.einsum("blk,bld->bkd", w, e_hat if last else e_stop))
        if not last:
            b = b + torch.einsum("bkd,bld->blk", u, e_stop)
    return u * live.unsqueeze(2).to(u.dtype), w


class ItemPooling(nn.Module):
    """An item's embedding: the mean of its id embedding and one mean-pooled bag per side-information column
    (`attr_idx` [n_items + 1, A, W], a persistent buffer; the last row and the code `sum(attr_sizes)` pad).
    Row n_items (padding) pools to zero."""

    def __init__(self, n_items: int, dim: int, attr_sizes: list[int], attr_width: int):
        super().__init__()
        self.n_items, self.n_attrs = n_items, len(attr_sizes)
        self.id_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.pad = int(sum(attr_sizes))
        self.attr_emb = nn.Embedding(self.pad + 1, dim, padding_idx=self.pad)
        self.register_buffer("attr_idx", torch.full((n_items + 1, len(attr_sizes), max(1, attr_width)), self.pad,
                                                    dtype=torch.int64))
        nn.init.normal_(self.id_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)
        with torch.no_grad():
            self.id_emb.weight[n_items].zero_()
            self.attr_emb.weight[self.pad].zero_()

    @torch.no_grad()
    def set_codes(self, codes: np.ndarray, attr_sizes: list[int]) -> None:
        """Fill `attr_idx` from encoded columns [n_items, A, W] (-1 = empty slot; code c of column a → its row)."""
        c = torch.as_tensor(codes, dtype=torch.int64)
        idx = torch.where(c >= 0, c + offsets(attr_sizes)[None, :, None], torch.full_like(c, self.pad))
        self.attr_idx.fill_(self.pad)
        self.attr_idx[: c.shape[0], :, : c.shape[2]] = idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = clamp_ids(ids, self.n_items)
        e = self.id_emb(ids)
        if not self.n_attrs:
            return e
        idx = self.attr_idx[ids.reshape(-1)]  # [N, A, W]
        real = (idx != self.pad).to(e.dtype)
        w = real / real.sum(-1, keepdim=True).clamp(min=1.0)  # each column's bag mean; summed over columns below
        bags = F.embedding_bag(idx.flatten(1), self.attr_emb.weight, mode="sum", per_sample_weights=w.flatten(1))
        return (e + bags.view(e.shape)) / (1 + self.n_attrs)


class MindTower(Tower):
    """MIND user tower: recent items → K interest vectors [B, K, dim] (see the module docstring)."""

    arch = "mind"

    def __init__(self, n_users: int, n_items: int, dim: int, n_interests: int, recent_n: int, iterations: int = 3,
                 dynamic_k: bool = True, routing_std: float = 1.0, routing_seed: int = 42, hidden: list[int] = (),
                 user_attr_sizes: list[int] = (), item_attr_sizes: list[int] = (), item_attr_width: int = 1,
                 use_user_id: bool = False, recent_last: bool = False):
        super().__init__()
        self.hparams = {"n_users": int(n_users), "n_items": int(n_items), "dim": int(dim),
                        "n_interests": int(n_interests), "recent_n": int(recent_n), "iterations": int(iterations),
                        "dynamic_k": bool(dynamic_k), "routing_std": float(routing_std),
                        "routing_seed": int(routing_seed), "hidden": [int(h) for h in hidden],
                        "user_attr_sizes": [int(s) for s in user_attr_sizes],
                        "item_attr_sizes": [int(s) for s in item_attr_sizes], "item_attr_width": int(item_attr_width),
                        "use_user_id": bool(use_user_id), "recent_last": bool(recent_last)}
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.k, self.iterations, self.dynamic_k = n_interests, iterations, dynamic_k
        self.n_attrs, self.use_user_id, self.recent_last = len(user_attr_sizes), use_user_id, recent_last
        # (the order of the layers below is the order of the random draws of their initialisation: keep it)
        self.items = ItemPooling(n_items, dim, list(item_attr_sizes), item_attr_width)
        self.bilinear = nn.Linear(dim, dim, bias=False)  # S, shared by all behaviours
        # the fixed routing-logit init b_ij ~ N(0, σ²), one row per history position: a buffer, so training-eval
        # and the served tower start from the same logits (user vectors are deterministic per version)
        init = np.random.default_rng(routing_seed).standard_normal((recent_n, n_interests)) * routing_std
        self.register_buffer("routing_init", torch.as_tensor(init.astype(np.float32)))
        self.user_emb = nn.Embedding(n_users + 1, dim) if use_user_id else None  # row n_users = unknown user
        # users without training interactions have untrained rows: they are served as the unknown user
        self.register_buffer("trained_user", torch.ones(n_users + 1, dtype=torch.bool))
        self.attr_emb = nn.Embedding(max(1, sum(user_attr_sizes)), dim)
        self.register_buffer("attr_offsets", offsets(list(user_attr_sizes)), persistent=False)
        self.mlp = mlp(dim * (1 + int(use_user_id) + self.n_attrs + int(recent_last)), list(hidden), dim, 0.0)
        if self.user_emb is not None:
            nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)

    def profile(self, user_idx: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """[B, P·dim]: the user id embedding (unknown/untrained → row n_users) and one embedding per attribute."""
        fields: list[torch.Tensor] = []
        if self.user_emb is not None:
            fields.append(self.user_emb(known_users(user_idx, self.n_users, self.trained_user)))
        if self.n_attrs > 0:
            fields.append(attr_embeddings(attrs, self.n_attrs, self.attr_offsets, self.attr_emb).flatten(1))
        return torch.cat(fields, dim=1) if fields else torch.zeros(len(user_idx), 0)

    def interests(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                  init: torch.Tensor | None = None, item_table: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(interest vectors [B, K, dim], L2-normalised, zero past K_u; live mask [B, K]). `init` replaces the
        fixed routing-logit init (training with fresh draws; None = the fixed buffer); `item_table` [n_items + 1,
        dim] = `items(arange(n_items + 1))` when the caller has it already (training on a small catalogue)."""
        rec = clamp_ids(recent, self.n_items)
        mask = rec < self.n_items
        k_u = interest_count(mask.sum(1), self.k, self.dynamic_k)
        live = torch.arange(self.k, device=rec.device).unsqueeze(0) < k_u.unsqueeze(1)
        e = F.normalize(self.items(rec) if item_table is None else item_table[rec], dim=2)  # unit behaviours
        e_hat = self.bilinear(e)
        caps, _ = b2i_routing(e_hat, mask, live, self.routing_init[: rec.shape[1]] if init is None else init,
                              self.iterations)
        prof = self.profile(user_idx, attrs)
        if self.recent_last:  # the newest item on its own (padding pools to zero)
            prof = torch.cat([prof, e[:, 0]], dim=1)
        x = torch.cat([caps, prof.unsqueeze(1).expand(-1, self.k, -1)], dim=2)
        v = F.normalize(self.mlp(x), dim=2) * live.unsqueeze(2).to(caps.dtype)
        return v, live

    def forward(self, user_idx: torch.Tensor, attrs: torch.Tensor, recent: torch.Tensor,
                recent_ts: torch.Tensor | None = None) -> torch.Tensor:
        return self.interests(user_idx, attrs, recent)[0]


def mind_twin(module: nn.Module, meta: dict) -> Callable[..., np.ndarray] | None:
    """The numpy forward of `MindTower` for one user (common/towers/numpy_twin.py TWINS), or None if `module` is
    not one. The mapped behaviours S·normalise(item embedding) of every item are computed once, here."""
    if not isinstance(module, MindTower):
        return None
    with torch.no_grad():
        e = F.normalize(module.items(torch.arange(module.n_items)), dim=1)
        e_hat = module.bilinear(e).numpy().astype(np.float32)
        e_unit = e.numpy().astype(np.float32)
        init = module.routing_init.numpy().astype(np.float64)
        user_emb = None if module.user_emb is None else module.user_emb.weight.numpy().astype(np.float32)
        trained = module.trained_user.numpy().astype(bool)
        attr_emb = module.attr_emb.weight.numpy().astype(np.float32)
        offs = module.attr_offsets.numpy().astype(np.int64)
    layers: list[tuple[np.ndarray, np.ndarray] | None] = []
    for child in module.mlp.children():
        if isinstance(child, nn.Linear):
            layers.append((child.weight.detach().numpy().T.astype(np.float32),
                           child.bias.detach().numpy().astype(np.float32)))
        elif isinstance(child, nn.ReLU):
            layers.append(None)
        else:
            return None
    n_users, n_items, k, n_attrs = module.n_users, module.n_items, module.k, module.n_attrs
    powers = 2 ** np.arange(1, k + 1)

    def forward(user: np.ndarray, attrs: np.ndarray, recent: np.ndarray, recent_ts: np.ndarray | None = None
                ) -> np.ndarray:
        rec = recent[0]
        pos = np.flatnonzero((rec >= 0) & (rec < n_items))
        k_u = max(1, int((len(pos) >= powers).sum())) if module.dynamic_k else k
        caps = np.zeros((k, e_hat.shape[1]), np.float32)
        if len(pos):
            eh = e_hat[rec[pos]]  # [n, d]
            b = init[pos, :k_u].copy()
            for it in range(module.iterations):
                w = np.exp(b - b.max(1, keepdims=True))
                w /= w.sum(1, keepdims=True)
                z = w.T.astype(np.float32) @ eh  # [k_u, d]
                n2 = (z * z).sum(1, keepdims=True)
                u = z * (n2 / (1.0 + n2) / np.sqrt(n2 + 1e-9))
                if it < module.iterations - 1:
                    b += eh @ u.T
            caps[:k_u] = u
        prof = []
        if user_emb is not None:
            i = int(user[0])
            prof.append(user_emb[i if 0 <= i < n_users and trained[i] else n_users])
        if n_attrs:
            prof.append(attr_emb[np.maximum(attrs[0, :n_attrs], 0) + offs].reshape(-1))
        if module.recent_last:
            r0 = int(rec[0])
            prof.append(e_unit[r0] if 0 <= r0 < n_items else np.zeros(e_unit.shape[1], np.float32))
        h = np.concatenate([caps, np.tile(np.concatenate(prof) if prof else np.zeros(0, np.float32), (k, 1))], 1)
        for layer in layers:
            h = np.maximum(h, 0) if layer is None else h @ layer[0] + layer[1]
        h = h / np.maximum(np.sqrt((h * h).sum(1, keepdims=True)), 1e-12)
        h[k_u:] = 0.0
        return h.astype(np.float32, copy=False)

    return forward
