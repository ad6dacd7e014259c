"""The kit's layers: pooling over a padded history ignores the padding; MLP tower; the served layers are shared."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common.towers.layers as served
from trainer.nn import layers
from trainer.nn.layers import AttentionPooling, MLPTower, history_mask, masked_mean, masked_mean_pool


def test_served_layers_are_the_common_ones():
    for name in ("SENet", "mlp", "masked_mean", "offsets", "clamp_ids"):
        assert getattr(layers, name) is getattr(served, name)


def test_masked_mean_ignores_padding():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(11, 4, generator=g)  # 10 items + padding row 10 (holding garbage on purpose)
    short = torch.tensor([[1, 2, 3], [4, 10, 10]])
    padded = torch.tensor([[1, 2, 3, 10, 10], [4, 10, 10, 10, 10]])
    a, b = masked_mean(short, table, 10), masked_mean(padded, table, 10)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], table[[1, 2, 3]].mean(0))
    torch.testing.assert_close(masked_mean(torch.full((1, 3), 10), table, 10), torch.zeros(1, 4))
    # the dense form over [B, L, d] vectors and a mask gives the same
    mask = history_mask(padded, 10)
    torch.testing.assert_close(masked_mean_pool(table[padded], mask), b)
    torch.testing.assert_close(masked_mean_pool(table[padded[:1, :0]], mask[:1, :0]), torch.zeros(1, 4))


def test_attention_pooling_ignores_padding():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, generator=g)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [False, False, False, False]])
    query = torch.randn(3, 8, generator=g)
    for pool in (AttentionPooling(8), AttentionPooling(8, hidden=()), AttentionPooling(8, learned_query=True)):
        q = None if pool.query is not None else query
        out = pool(x, mask, q)
        # the same history without its padding (and with different garbage in the padded slots)
        short = pool(x[1:2, :2], mask[1:2, :2], None if q is None else q[1:2])
        torch.testing.assert_close(out[1:2], short)
        noisy = x.clone()
        noisy[~mask] = 1e3
        torch.testing.assert_close(pool(noisy, mask, q), out)
        torch.testing.assert_close(out[2], torch.zeros(8))  # no items: zeros
        w = pool.weights(x, mask, q)
        torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 1.0, 0.0]))
        xg = x.clone().requires_grad_(True)
        pool(xg, mask, q).sum().backward()  # finite gradients even through the all-padding row
        assert torch.isfinite(xg.grad).all() and (xg.grad[~mask] == 0).all()
        assert all(torch.isfinite(p.grad).all() for p in pool.parameters() if p.grad is not None)
    # dot-product scores: the weights are softmax(q·x/√d) over the real items
    dot = AttentionPooling(8, hidden=())
    expect = torch.softmax((query[1:2, None, :] * x[1:2, :2]).sum(2) / 8 ** 0.5, dim=1)
    torch.testing.assert_close(dot.weights(x, mask, query)[1:2, :2], expect)


def test_mlp_tower():
    torch.manual_seed(0)
    tower = MLPTower(n_fields=3, emb_dim=4, hidden=[8], out_dim=5, senet=True)
    out = tower(torch.randn(6, 3, 4))
    assert out.shape == (6, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
    raw = MLPTower(3, 4, [], 5, normalize=False)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(raw(x), raw.mlp(x.flatten(1)))
    assert not torch.allclose(F.normalize(raw(x), dim=1), raw(x))
