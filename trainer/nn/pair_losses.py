"""Pair-based metric-learning losses over one batch of L2-normalised embeddings (EasyRec's CoMetricLearningI2I):
the session pair masks, circle loss (Sun et al., CVPR 2020) and multi-similarity loss (Wang et al., CVPR 2019).

Masks over the flat batch (item id, positive label, session id per slot; padding already removed):

    positive[a, p] = same session  ∧  a and p both positive  ∧  different item ids
    negative[a, n] = different item ids  ∧  not positive[a, n]     (every other item of the batch)

so two non-positive (non-clicked) items of a session are never positives of each other (EasyRec's
`get_anchor_positive_triplet_mask` compares labels for equality and makes them positives: a bug), and the same
item id in two sessions (or twice in one) is masked, neither positive nor negative (in EasyRec it is a negative
of itself). An anchor without any positive pair has no metric-learning term: it is left out of the mean and
counted (`PairStats.no_positive`).

Circle loss, per anchor (cosines s, α stop-gradient):
    α_p = [1 + m − s_p]₊, α_n = [s_n + m]₊, Δ_p = 1 − m, Δ_n = m
    L = softplus( logsumexp_n γ α_n (s_n − Δ_n) + logsumexp_p −γ α_p (s_p − Δ_p) )
Multi-similarity loss, per anchor (optional MS mining with margin ε on the detached cosines):
    L = (1/α) log(1 + Σ_p e^{−α (s_p − λ)}) + (1/β) log(1 + Σ_n e^{β (s_n − λ)})
The cosines are used as they are (EasyRec additionally clips them at 0 in the MS loss; the paper does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_FILL = -1e9  # finite "minus infinity" of masked logits: exp underflows to 0 and gradients stay finite


@dataclass(frozen=True)
class PairStats:
    """Counts of one batch: anchors (slots), anchors without a positive pair, positive and negative pairs."""

    anchors: int
    no_positive: int
    positive_pairs: int
    negative_pairs: int


def pair_masks(items: torch.Tensor, positive: torch.Tensor, session: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive [M, M], negative [M, M]) bool masks of a flat batch; see the module docstring."""
    same_item = items[:, None] == items[None, :]
    same_session = session[:, None] == session[None, :]
    pos = same_session & positive[:, None] & positive[None, :] & ~same_item
    neg = ~same_item & ~pos
    return pos, neg


def _masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(torch.where(mask, x, torch.full_like(x, _FILL)), dim=1)


def circle_loss(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float = 0.25,
                gamma: float = 32.0) -> torch.Tensor:
    """Per-anchor circle loss [M] of a cosine matrix `sim` [M, M] (0 for an anchor without positives)."""
    a_p = torch.relu(1.0 + margin - sim.detach())
    a_n = torch.relu(sim.detach() + margin)
    logit_p = -gamma * a_p * (sim - (1.0 - margin))
    logit_n = gamma * a_n * (sim - margin)
    return F.softplus(_masked_lse(logit_n, neg) + _masked_lse(logit_p, pos))


def ms_mine(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MS pair mining: keep a negative if s_n > min_p s_p − ε, a positive if s_p < max_n s_n + ε (per anchor)."""
    s = sim.detach()
    inf = torch.full_like(s, float("inf"))
    min_pos = torch.where(pos, s, inf).min(dim=1, keepdim=True).values
    max_neg = torch.where(neg, s, -inf).max(dim=1, keepdim=True).values
    return pos & (s < max_neg + eps), neg & (s > min_pos - eps)


def multi_similarity_loss(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, alpha: float = 2.0,
                          beta: float = 50.0, lam: float = 0.5, eps: float = 0.1,
                          mining: bool = False) -> torch.Tensor:
    """Per-anchor multi-similarity loss [M] of a cosine matrix `sim` [M, M] (terms over empty sets are 0)."""
    if mining:
        pos, neg = ms_mine(sim, pos, neg, eps)
    pos_term = F.softplus(_masked_lse(-alpha * (sim - lam), pos)) / alpha
    neg_term = F.softplus(_masked_lse(beta * (sim - lam), neg)) / beta
    return pos_term + neg_term


def metric_loss(emb: torch.Tensor, items: torch.Tensor, positive: torch.Tensor, session: torch.Tensor,
                loss: str = "circle", **kw: float) -> tuple[torch.Tensor, PairStats]:
    """(mean loss over anchors with ≥ 1 positive pair, stats) of L2-normalised embeddings `emb` [M, d]."""
    pos, neg = pair_masks(items, positive, session)
    has_pos = pos.any(dim=1)
    stats = PairStats(len(items), int((~has_pos).sum()), int(pos.sum()), int(neg[has_pos].sum()))
    if not bool(has_pos.any()):
        return emb.sum() * 0.0, stats
    sim = emb[has_pos] @ emb.T
    pos, neg = pos[has_pos], neg[has_pos]
    if loss == "circle":
        per = circle_loss(sim, pos, neg, kw.get("margin", 0.25), kw.get("gamma", 32.0))
    elif loss == "multi_similarity":
        per = multi_similarity_loss(sim, pos, neg, kw.get("alpha", 2.0), kw.get("beta", 50.0), kw.get("lam", 0.5),
                                    kw.get("eps", 0.1), bool(kw.get("mining", False)))
    else:
        raise ValueError(f"unknown metric loss {loss!r}")
    return per.mean(), stats
