"""The kit's training loop: deterministic with a seed, batches and draws as documented, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters


def toy(seed: int, epochs: int = 3, **cfg):
    """A small regression MLP trained with the loop; returns (model, history, batches seen)."""
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    y = (x @ torch.arange(5.0)).unsqueeze(1)
    config = LoopConfig(epochs=epochs, batch_size=32, lr=0.01, weight_decay=1e-4, seed=seed, num_threads=1, **cfg)
    seen: list[Batch] = []
    with seeded(config.seed, config.num_threads) as rng:
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

        def batch_loss(b: Batch) -> torch.Tensor:
            seen.append(b)
            noise = torch.as_tensor(rng.normal(size=len(b.rows)), dtype=torch.float32)  # draws from the run's rng
            return ((model(x[b.rows]).squeeze(1) - y[b.rows, 0] - 0.01 * noise) ** 2).mean()

        hist = train_loop(batch_loss, np.arange(200), adam(model.parameters(), config), config, rng, modules=[model])
    return model, hist, seen


def test_same_seed_gives_bit_identical_weights():
    a, ha, _ = toy(3)
    b, hb, _ = toy(3)
    c, _, _ = toy(4)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert ha.losses == hb.losses
    assert not torch.equal(a[0].weight, c[0].weight)
    assert ha.losses[-1] < ha.losses[0]
    assert not a.training  # modules are left in eval mode


def test_batches_permutation_and_skipped_tail():
    _, hist, seen = toy(5, epochs=2)
    # 200 examples, batches of 32: 6 full batches and a tail of 8 per epoch
    assert [len(b.rows) for b in seen[:7]] == [32] * 6 + [8]
    assert [b.start for b in seen[:7]] == list(range(0, 224, 32))
    assert [b.step for b in seen] == list(range(14)) and hist.steps == 14
    rng = np.random.default_rng(5)
    first = rng.permutation(np.arange(200))  # the loop's first draw is the epoch's permutation
    np.testing.assert_array_equal(np.concatenate([b.rows for b in seen[:7]]), first)
    assert sorted(np.concatenate([b.rows for b in seen[7:]]).tolist()) == list(range(200))
    _, _, seen = toy(5, epochs=1, min_batch=9)
    assert [len(b.rows) for b in seen] == [32] * 6  # the tail of 8 < min_batch is skipped


def test_threads_are_restored_and_the_loop_can_seed_itself():
    before = torch.get_num_threads()
    with seeded(1, num_threads=1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before

    def run() -> list[float]:
        torch.manual_seed(0)
        w = nn.Parameter(torch.zeros(3))
        cfg = LoopConfig(epochs=2, batch_size=4, lr=0.1, seed=9)
        return train_loop(lambda b: ((w - float(b.rows.mean())) ** 2).sum(), np.arange(10),
                          adam([w], cfg), cfg).losses

    assert run() == run()


def test_early_stop_on_a_validation_score_restores_the_best_weights():
    w = nn.Linear(1, 1)
    scores = [0.5, 0.7, 0.6, 0.65, 0.6, 0.9]
    snapshots = []

    def validate(epoch: int) -> float:
        snapshots.append(w.weight.detach().clone())
        return scores[epoch]

    cfg = LoopConfig(epochs=6, batch_size=2, lr=0.1, patience=2)
    ends = []
    hist = train_loop(lambda b: (w(torch.ones(len(b.rows), 1)) - 3.0).pow(2).mean(), np.arange(6), adam(w.parameters(), cfg),
                      cfg, on_epoch_end=lambda e, loss: ends.append((e, loss)) or {"extra": "1"}, validate=validate,
                      modules=[w])
    assert hist.scores == [0.5, 0.7, 0.6, 0.65] and hist.stopped_early  # 2 epochs after the best (epoch 1)
    assert hist.best_epoch == 1 and hist.best_score == 0.7 and len(hist.losses) == 4
    assert torch.equal(w.weight.detach(), snapshots[1])  # the best epoch's weights are back
    assert [e for e, _ in ends] == [0, 1, 2, 3]
    # lower is better, no patience: runs every epoch, no restore
    cfg = LoopConfig(epochs=3, batch_size=2, lr=0.1, higher_is_better=False)
    hist = train_loop(lambda b: w(torch.ones(1, 1)).sum(), np.arange(4), adam(w.parameters(), cfg), cfg,
                      validate=lambda e: [3.0, 1.0, 2.0][e])
    assert hist.best_epoch == 1 and not hist.stopped_early and len(hist.losses) == 3


def test_unique_parameters_keeps_shared_ones_once():
    shared = nn.Embedding(4, 2)
    a, b = nn.Sequential(shared, nn.Linear(2, 2)), nn.Sequential(shared, nn.Linear(2, 1))
    extra = nn.Parameter(torch.zeros(()))
    params = unique_parameters(a, b, [extra])
    assert len(params) == len(list(a.parameters())) + 2 + 1
    assert params[0] is shared.weight and params[-1] is extra


@pytest.mark.parametrize("examples", [np.arange(50, 90), lambda rng: np.arange(50, 90)[rng.random(40) < 0.5]])
def test_examples_array_or_drawn_each_epoch(examples):
    seen = []
    cfg = LoopConfig(epochs=2, batch_size=100, min_batch=1)
    w = nn.Parameter(torch.zeros(1))
    train_loop(lambda b: seen.append(b.rows) or (w * 0).sum(), examples, adam([w], cfg), cfg,
               np.random.default_rng(0))
    assert all(set(r.tolist()) <= set(range(50, 90)) for r in seen)
    assert callable(examples) or sorted(seen[0].tolist()) == list(range(50, 90))
