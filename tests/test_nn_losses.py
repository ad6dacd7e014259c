"""The kit's losses on known answers: logQ, softmax (in-batch, sampled, full), BCE with a ratio, triplets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.nn.losses import (
    SampledSoftmax,
    bce_loss,
    full_softmax_loss,
    in_batch_softmax_loss,
    logits,
    pair_logits,
    ranking_loss,
    row_logits,
    sampled_softmax_loss,
    softmax_loss,
    triplet_hinge,
    triplet_logistic,
)
from trainer.nn.negatives import PowerSampler

try:  # the two-tower channel's original losses, while they exist: the kit must give the same numbers
    from trainer.channels._tower_model import logits as original_logits
    from trainer.channels._tower_model import ranking_loss as original_ranking_loss
    from trainer.channels._tower_model import row_logits as original_row_logits
except ImportError:  # ported onto the kit: the known answers above still pin the numbers
    original_ranking_loss = None

sp = F.softplus


def vecs(seed: int, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_logq_shifts_logits_by_exactly_minus_log_q():
    u, v = vecs(0, 6, 8), vecs(1, 5, 8)
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    plain = logits(u, v, 0.05)
    torch.testing.assert_close(plain, u @ v.T / 0.05)
    assert torch.equal(logits(u, v, 0.05, torch.log(q)), plain - torch.log(q).unsqueeze(0))
    cand = v.unsqueeze(0).expand(6, -1, -1)
    lq = torch.log(q).expand(6, -1)
    assert torch.equal(row_logits(u, cand, 0.05, lq), row_logits(u, cand, 0.05) - lq)
    torch.testing.assert_close(row_logits(u, cand, 0.05), plain)
    assert torch.equal(pair_logits(u, v[:1].expand(6, -1), 0.05, lq[:, 0]), pair_logits(u, v[:1].expand(6, -1), 0.05)
                       - lq[:, 0])


def test_sampled_softmax_with_every_item_sampled_is_the_full_softmax():
    n, b = 30, 7
    u, items = vecs(2, b, 16), vecs(3, n, 16)
    pos = torch.tensor([0, 5, 5, 29, 11, 3, 17])
    full = full_softmax_loss(u, items, pos, temperature=0.1)
    torch.testing.assert_close(full, F.cross_entropy(u @ items.T / 0.1, pos))
    all_ids = torch.arange(n)
    # every item as a negative: the positive's own copy is an accidental hit, masked
    sampled = sampled_softmax_loss(u, items[pos], items, 0.1, pos_ids=pos, neg_ids=all_ids)
    torch.testing.assert_close(sampled, full)
    # a uniform q shifts every logit alike: no change
    lq = torch.full((n,), float(np.log(1 / n)))
    torch.testing.assert_close(sampled_softmax_loss(u, items[pos], items, 0.1, lq[pos], lq, pos, all_ids), full)
    # per-row negatives [B, K, d]: the same
    per_row = sampled_softmax_loss(u, items[pos], items.expand(b, -1, -1), 0.1, pos_ids=pos,
                                   neg_ids=all_ids.expand(b, -1))
    torch.testing.assert_close(per_row, full)
    # without masking the accidental hits the positive counts twice: a different (larger) loss
    assert sampled_softmax_loss(u, items[pos], items, 0.1) > full


def test_sampled_softmax_logq_and_accidental_hits_by_hand():
    u = torch.tensor([[1.0, 0.0]])
    pos_v, neg_v = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    lq_pos, lq_neg = torch.tensor([np.log(0.5)]), torch.log(torch.tensor([0.1, 0.5, 0.2]))
    got = sampled_softmax_loss(u, pos_v, neg_v, 1.0, lq_pos, lq_neg, torch.tensor([4]), torch.tensor([2, 4, 9]))
    s_pos = 1.0 - np.log(0.5)
    s_neg = [0.0 - np.log(0.1), -1.0 - np.log(0.2)]  # the second negative is item 4 = the positive: masked
    expect = -s_pos + np.log(np.exp(s_pos) + np.exp(s_neg).sum())
    assert got.item() == pytest.approx(expect, rel=1e-6)


def test_sampled_softmax_switches_to_the_full_softmax_on_a_small_catalogue():
    counts = np.arange(1, 51)
    u, table = vecs(4, 8, 4), vecs(5, 50, 4)
    pos = torch.tensor([1, 2, 3, 4, 5, 6, 7, 49])
    small = SampledSoftmax(PowerSampler(counts), num_sampled=10, temperature=0.2)
    assert small.full
    rng = np.random.default_rng(0)
    torch.testing.assert_close(small(u, pos, lambda ids: table[ids], rng), full_softmax_loss(u, table, pos, 0.2))
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn
    big = SampledSoftmax(PowerSampler(counts), num_sampled=10, temperature=0.2, full_up_to=20)
    assert not big.full
    got = big(u, pos, lambda ids: table[ids], np.random.default_rng(1))
    neg = torch.as_tensor(PowerSampler(counts).sample(np.random.default_rng(1), 10))
    lq = PowerSampler(counts).log_q
    expect = sampled_softmax_loss(u, table[pos], table[neg], 0.2, lq[pos], lq[neg], pos, neg)
    torch.testing.assert_close(got, expect)


def test_in_batch_softmax_masks_the_diagonal_and_duplicate_items():
    u, v = vecs(6, 5, 8), vecs(7, 5, 8)
    ids = torch.tensor([3, 1, 3, 2, 0])
    lg = u @ v.T / 0.5
    expect = []
    for r in range(5):
        keep = [c for c in range(5) if c == r or ids[c] != ids[r]]
        expect.append(-torch.log_softmax(lg[r, keep], 0)[keep.index(r)])
    torch.testing.assert_close(in_batch_softmax_loss(u, v, 0.5, item_ids=ids), torch.stack(expect).mean())
    lq = torch.log(torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1]))
    torch.testing.assert_close(in_batch_softmax_loss(u, v, 0.5, lq),
                               F.cross_entropy(lg - lq.unsqueeze(0), torch.arange(5)))


def test_bce_with_a_negative_ratio_by_hand():
    pos = torch.tensor([2.0, -1.0])
    neg = torch.tensor([[1.0, 3.0], [0.5, -2.0]])
    valid = torch.tensor([[True, True], [True, False]])
    # balanced: the positive weighs as much as its valid negatives together
    b0 = sp(torch.tensor(-2.0)) + (sp(torch.tensor(1.0)) + sp(torch.tensor(3.0))) / 2
    b1 = sp(torch.tensor(1.0)) + sp(torch.tensor(0.5))
    torch.testing.assert_close(bce_loss(pos, neg, valid), (b0 + b1) / 2)
    # 1:K, every valid pair one term: (5 terms) − log σ(2) − log(1 − σ(1)) …
    terms = [sp(torch.tensor(-2.0)), sp(torch.tensor(1.0)), sp(torch.tensor(3.0)), sp(torch.tensor(1.0)),
             sp(torch.tensor(0.5))]
    torch.testing.assert_close(bce_loss(pos, neg, valid, balance=False, reduction="sum"), torch.stack(terms).sum())
    torch.testing.assert_close(bce_loss(pos, neg, valid, balance=False), torch.stack(terms).mean())
    # a bias shifts every logit; without a mask all 6 terms count (NeuralCF: 4 negatives per positive)
    bias = torch.tensor(0.5)
    every = torch.stack([sp(-(pos + 0.5)).sum(), sp(neg + 0.5).sum()]).sum() / 6
    torch.testing.assert_close(bce_loss(pos, neg, bias=bias, balance=False), every)


def test_triplet_hinge_and_logistic_by_hand():
    pos = torch.tensor([2.0, -1.0])
    neg = torch.tensor([[1.0, 3.0], [0.5, -2.0]])
    valid = torch.tensor([[True, True], [True, False]])
    tau, m = 0.5, 0.2
    # hinge in score units: max(0, m + cos_c − cos_b) with cos = logit·τ
    h0 = (max(0, m + 0.5 - 1.0) + max(0, m + 1.5 - 1.0)) / 2
    h1 = max(0, m + 0.25 + 0.5)
    torch.testing.assert_close(triplet_hinge(pos, neg, valid, m, tau), torch.tensor((h0 + h1) / 2))
    # τ = 1, margin 1, no mask: pos − neg = [[1, −1], [−1.5, 1]] → relu(1 − d) = [[0, 2], [2.5, 0]]
    torch.testing.assert_close(triplet_hinge(pos, neg, None, 1.0), torch.tensor(((0 + 2.0) / 2 + (2.5 + 0) / 2) / 2))
    l0 = (sp(torch.tensor(-1.0)) + sp(torch.tensor(1.0))) / 2
    l1 = sp(torch.tensor(1.5))
    torch.testing.assert_close(triplet_logistic(pos, neg, valid), (l0 + l1) / 2)


def test_softmax_loss_by_hand():
    pos = torch.tensor([2.0, -1.0])
    neg = torch.tensor([[1.0, 3.0], [0.5, -2.0]])
    valid = torch.tensor([[True, True], [True, False]])
    ce = [-torch.log_softmax(torch.tensor([2.0, 1.0, 3.0]), 0)[0], -torch.log_softmax(torch.tensor([-1.0, 0.5]), 0)[0]]
    torch.testing.assert_close(softmax_loss(pos, neg, valid), torch.stack(ce).mean())
    torch.testing.assert_close(softmax_loss(pos, neg, valid, reduction="none"), torch.stack(ce))


@pytest.mark.parametrize("mode", ["listwise", "pointwise", "hinge", "logistic"])
def test_ranking_loss_gives_the_two_tower_numbers(mode):
    g = torch.Generator().manual_seed(11)
    pos, neg = torch.randn(64, generator=g) * 5, torch.randn(64, 40, generator=g) * 5
    valid = torch.rand(64, 40, generator=g) > 0.2
    valid[3] = False  # a row without a valid negative
    bias = torch.tensor(0.3)
    got = ranking_loss(pos, neg, valid, mode, 0.05, 0.2, bias)
    assert torch.isfinite(got)
    expect = {"listwise": softmax_loss(pos, neg, valid), "pointwise": bce_loss(pos, neg, valid, bias),
              "hinge": triplet_hinge(pos, neg, valid, 0.2, 0.05), "logistic": triplet_logistic(pos, neg, valid)}[mode]
    assert torch.equal(got, expect)
    if original_ranking_loss is not None:
        assert torch.equal(got, original_ranking_loss(pos, neg, valid, mode, 0.05, 0.2, bias))
        u, v = vecs(8, 6, 8), vecs(9, 5, 8)
        lq = torch.log(torch.rand(5, generator=g))
        assert torch.equal(logits(u, v, 0.05, lq), original_logits(u, v, 0.05, lq))
        cand, lqr = v.expand(6, -1, -1), lq.expand(6, -1)
        assert torch.equal(row_logits(u, cand, 0.05, lqr), original_row_logits(u, cand, 0.05, lqr))
    with pytest.raises(ValueError):
        ranking_loss(pos, neg, valid, "nope", 0.05, 0.2)
