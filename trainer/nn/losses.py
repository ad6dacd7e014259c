"""Scores and losses of retrieval models, all in logit units s = score / τ (temperature τ), minus log q where a
sampling-bias (logQ) correction applies: s(x, y) − log q(y) (Yi et al. 2019; TF's sampled_softmax_loss).

A loss takes positive logits `pos` [B] and negative logits `neg` [B, K] with an optional `valid` [B, K] mask
(False: an accidental hit — the negative is the row's positive — or padding; it then counts for nothing):

    softmax_loss       softmax cross-entropy over [pos, valid negs]   (in-batch / sampled / full softmax)
    candidate_softmax_loss   softmax_loss over shared candidates that start with the rows' own positives
    bce_loss           pointwise BCE, positive → 1, negatives → 0 (`balance`: the positive weighs as much as
                       its K negatives together; else every pair one term, the classic 1:K ratio)
    triplet_hinge      mean over negatives of max(0, m − (pos − neg)·τ)   (margin m in score units)
    triplet_logistic   mean over negatives of −log σ(pos − neg)
    ranking_loss       the two-tower channel's dispatch over the four (mode names listwise/pointwise/hinge/logistic)

`sampled_softmax_loss` builds the logits of a sampled softmax (shared or per-row negatives, logQ, accidental
hits masked); `SampledSoftmax` draws the negatives and switches to the full softmax on a small catalogue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from trainer.nn.negatives import PowerSampler

Reduction = Literal["mean", "sum", "none"]


def _reduce(per: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


# -- logits ---------------------------------------------------------------------------------------------------


def logits(user_vecs: torch.Tensor, item_vecs: torch.Tensor, temperature: float = 1.0,
           log_q: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C]: every (user row, item column) pair, user · item / τ, minus log q(item) [C] when given."""
    out = user_vecs @ item_vecs.T / temperature
    if log_q is not None:
        out = out - log_q.unsqueeze(0)
    return out


def row_logits(user_vecs: torch.Tensor, cand_vecs: torch.Tensor, temperature: float = 1.0,
               log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row candidates: user_vecs [B, d], cand_vecs [B, C, d] → [B, C] (minus log q [B, C] when given)."""
    out = torch.einsum("bd,bcd->bc", user_vecs, cand_vecs) / temperature
    if log_q is not None:
        out = out - log_q
    return out


def pair_logits(user_vecs: torch.Tensor, item_vecs: torch.Tensor, temperature: float = 1.0,
                log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Row-aligned pairs: user_vecs [B, d], item_vecs [B, d] → [B] (minus log q [B] when given)."""
    out = (user_vecs * item_vecs).sum(1) / temperature
    if log_q is not None:
        out = out - log_q
    return out


# -- losses ---------------------------------------------------------------------------------------------------


def softmax_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor | None = None,
                 reduction: Reduction = "mean") -> torch.Tensor:
    """Softmax cross-entropy of the positive against [pos, valid negatives]: log(e^pos + Σ e^neg) − pos."""
    if valid is not None:
        neg = neg.masked_fill(~valid, float("-inf"))
    lse_neg = torch.logsumexp(neg, dim=1)
    return _reduce(torch.logaddexp(pos, lse_neg).sub(pos), reduction)


def candidate_softmax_loss(user_vecs: torch.Tensor, cand_vecs: torch.Tensor, cand_ids: np.ndarray,
                           temperature: float = 1.0, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over shared candidates [C] whose first B are the B rows' positives (row i's is candidate i): each
    row's positive against every candidate, its own item (and copies of it) masked; logits minus log q [C]."""
    n = len(user_vecs)
    pos = pair_logits(user_vecs, cand_vecs[:n], temperature, None if log_q is None else log_q[:n])
    neg = logits(user_vecs, cand_vecs, temperature, log_q)
    return softmax_loss(pos, neg, torch.as_tensor(cand_ids[None, :] != cand_ids[:n, None]))


def bce_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, balance: bool = True, reduction: Reduction = "mean") -> torch.Tensor:
    """Pointwise binary cross-entropy: σ(pos + b) → 1, σ(neg + b) → 0 for each valid negative.

    balance=True: per row softplus(−pos) + the mean over its negatives of softplus(neg), so the positive weighs
    as much as its K negatives together (cosine towers otherwise collapse to "everything negative").
    balance=False: every (row, candidate) pair is one BCE term (1:K, as FM and NeuralCF train); "mean" divides
    by the number of terms.
    """
    b = bias if bias is not None else torch.zeros((), dtype=pos.dtype)
    if balance:
        validf = torch.ones_like(neg) if valid is None else valid.to(pos.dtype)
        lp = F.softplus(-(pos + b))
        ln = (F.softplus(neg + b) * validf).sum(1) / validf.sum(1).clamp(min=1.0)
        return _reduce(lp + ln, reduction)
    x = torch.cat([pos.unsqueeze(1), neg], dim=1)
    if bias is not None:
        x = x + bias
    y = torch.zeros_like(x)
    y[:, 0] = 1.0
    w = None if valid is None else torch.cat([torch.ones_like(pos).unsqueeze(1), valid.to(pos.dtype)], dim=1)
    if reduction == "none":
        return F.binary_cross_entropy_with_logits(x, y, weight=w, reduction="none")
    total = F.binary_cross_entropy_with_logits(x, y, weight=w, reduction="sum")
    if reduction == "sum":
        return total
    return total / (x.numel() if w is None else w.sum().clamp(min=1.0))


def _per_negative_mean(per: torch.Tensor, valid: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    validf = torch.ones_like(per) if valid is None else valid.to(per.dtype)
    return _reduce((per * validf).sum(1) / validf.sum(1).clamp(min=1.0), reduction)


def triplet_hinge(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor | None = None, margin: float = 0.2,
                  temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean over valid negatives of max(0, m − (pos − neg)·τ): with logits = cos/τ, max(0, m + cos(a,c) − cos(a,b))
    with the margin in cosine units."""
    diff = pos.unsqueeze(1) - neg
    return _per_negative_mean(torch.relu(margin - diff * temperature), valid, reduction)


def triplet_logistic(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor | None = None,
                     reduction: Reduction = "mean") -> torch.Tensor:
    """Mean over valid negatives of −log σ(pos − neg) (BPR's loss; the soft version of the hinge)."""
    return _per_negative_mean(F.softplus(-(pos.unsqueeze(1) - neg)), valid, reduction)


def ranking_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, mode: str, temperature: float,
                 margin: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The two-tower channel's loss by name: listwise → softmax_loss, pointwise → bce_loss (balanced, learned
    bias), hinge → triplet_hinge, logistic → triplet_logistic; mean over rows."""
    if mode == "listwise":
        return softmax_loss(pos, neg, valid)
    if mode == "pointwise":
        return bce_loss(pos, neg, valid, bias)
    if mode == "hinge":
        return triplet_hinge(pos, neg, valid, margin, temperature)
    if mode == "logistic":
        return triplet_logistic(pos, neg, valid)
    raise ValueError(f"unknown loss {mode!r}")


# -- softmax over a catalogue ---------------------------------------------------------------------------------


def in_batch_softmax_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, temperature: float = 1.0,
                          log_q: torch.Tensor | None = None, item_ids: torch.Tensor | None = None,
                          reduction: Reduction = "mean") -> torch.Tensor:
    """Row b's positive is item b of the batch, the other rows' items its negatives ([B, B] logits minus log q
    of each column); with `item_ids`, another row holding the same item is an accidental hit and masked."""
    lg = logits(user_vecs, item_vecs, temperature, log_q)
    b = lg.shape[0]
    valid = ~torch.eye(b, dtype=torch.bool)
    if item_ids is not None:
        valid &= item_ids.unsqueeze(0) != item_ids.unsqueeze(1)
    return softmax_loss(lg.diagonal(), lg, valid, reduction)


def sampled_softmax_loss(user_vecs: torch.Tensor, pos_vecs: torch.Tensor, neg_vecs: torch.Tensor,
                         temperature: float = 1.0, pos_log_q: torch.Tensor | None = None,
                         neg_log_q: torch.Tensor | None = None, pos_ids: torch.Tensor | None = None,
                         neg_ids: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """Sampled softmax: each row's positive [B, d] against negatives shared by the batch [K, d] (or per row
    [B, K, d]), all logits minus their log q ([B]; [K] or [B, K]) when given. A negative whose id equals the
    row's positive id (an accidental hit) is masked. With every item as a negative and no (or uniform) q this is
    the full softmax cross-entropy."""
    pos = pair_logits(user_vecs, pos_vecs, temperature, pos_log_q)
    if neg_vecs.dim() == 2:
        neg = logits(user_vecs, neg_vecs, temperature, neg_log_q)
        hit_ids = None if neg_ids is None else neg_ids.unsqueeze(0)
    else:
        neg = row_logits(user_vecs, neg_vecs, temperature, neg_log_q)
        hit_ids = neg_ids
    valid = None if hit_ids is None or pos_ids is None else hit_ids != pos_ids.unsqueeze(1)
    return softmax_loss(pos, neg, valid, reduction)


def full_softmax_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, pos_ids: torch.Tensor,
                      temperature: float = 1.0, reduction: Reduction = "mean") -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue item_vecs [n_items, d] (nothing sampled: no logQ)."""
    return F.cross_entropy(logits(user_vecs, item_vecs, temperature), pos_ids, reduction=reduction)


# catalogues up to this many items train with the full softmax by default (ml-100k: 1,682)
FULL_SOFTMAX_UP_TO = 10_000


@dataclass
class SampledSoftmax:
    """Softmax over a catalogue: `num_sampled` negatives shared by the batch, drawn by `sampler` (∝ count^power)
    with logQ correction and accidental hits masked; the full softmax when the catalogue has at most `full_up_to`
    items or `num_sampled` would cover it.

        loss = SampledSoftmax(PowerSampler(counts), num_sampled=1000, temperature=0.05)
        loss(user_vecs, pos_ids, item_vectors=lambda ids: model.items(ids), rng=rng)
    """

    sampler: PowerSampler
    num_sampled: int = 1000
    temperature: float = 1.0
    logq: bool = True
    full_up_to: int = FULL_SOFTMAX_UP_TO

    @property
    def full(self) -> bool:
        return self.sampler.n_items <= self.full_up_to or self.num_sampled >= self.sampler.n_items

    def __call__(self, user_vecs: torch.Tensor, pos_ids: torch.Tensor,
                 item_vectors: Callable[[torch.Tensor], torch.Tensor], rng: np.random.Generator,
                 reduction: Reduction = "mean") -> torch.Tensor:
        """Loss of rows user_vecs [B, d] whose positives are pos_ids [B]; `item_vectors(ids)` → [len(ids), d]."""
        n = self.sampler.n_items
        if self.full:
            return full_softmax_loss(user_vecs, item_vectors(torch.arange(n)), pos_ids, self.temperature, reduction)
        neg = torch.as_tensor(self.sampler.sample(rng, self.num_sampled))
        uniq, inv = torch.unique(torch.cat([pos_ids, neg]), return_inverse=True)
        vecs = item_vectors(uniq)
        b = len(pos_ids)
        lq = self.sampler.log_q[uniq][inv] if self.logq else None
        return sampled_softmax_loss(user_vecs, vecs[inv[:b]], vecs[inv[b:]], self.temperature,
                                    None if lq is None else lq[:b], None if lq is None else lq[b:],
                                    pos_ids, neg, reduction)
