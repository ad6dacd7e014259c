"""The numpy twin of the exported user tower gives the TorchScript module's vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.vector_server.tower_numpy import matches, numpy_tower
from trainer.channels._tower_model import UserTower


def _scripted(senet: bool, use_user_id: bool, recent_last: bool, attr_sizes: list[int], dropout: float):
    torch.manual_seed(0)
    n_users, n_items = 50, 40
    item_emb = torch.nn.Embedding(n_items + 1, 8, padding_idx=n_items)
    tower = UserTower(n_users, n_items, attr_sizes, emb_dim=8, out_dim=6, hidden=[16, 12], dropout=dropout,
                      senet=senet, use_user_id=use_user_id, item_emb=item_emb, recent_last=recent_last)
    with torch.no_grad():
        tower.trained_user[7] = False  # served as the unknown user
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # non-trivial weights everywhere, biases included
    meta = {"n_users": n_users, "n_items": n_items, "recent_n": 5,
            "attr_columns": [f"c{i}" for i in range(len(attr_sizes))],
            "attr_vocab": {f"c{i}": {str(v): v for v in range(1, s)} for i, s in enumerate(attr_sizes)}}
    return torch.jit.script(tower.eval()), meta


@pytest.mark.parametrize("senet,use_user_id,recent_last,attr_sizes,dropout", [
    (False, True, True, [3, 5], 0.0), (True, True, False, [4], 0.2), (False, False, True, [], 0.0),
    (True, False, False, [2, 2, 6], 0.1)])
def test_twin_gives_the_torchscript_vectors(senet, use_user_id, recent_last, attr_sizes, dropout):
    module, meta = _scripted(senet, use_user_id, recent_last, attr_sizes, dropout)
    fn = numpy_tower(module, meta)
    assert fn is not None
    assert matches(fn, module, meta, n=200)
    # the edge cases by hand: unknown, untrained and out-of-range users; all-padding and out-of-range history
    a = np.zeros((1, max(len(attr_sizes), 1)), np.int64)
    for u, rec in [(-1, [40] * 5), (7, [3, 40, 40, 40, 40]), (99, [-1, 5, 200, 6, 40]), (3, [39, 0, 1, 2, 3])]:
        r = np.array([rec], np.int64)
        want = module(torch.tensor([u]), torch.from_numpy(a), torch.from_numpy(r)).detach().reshape(-1).numpy()
        np.testing.assert_allclose(fn(np.array([u]), a, r), want, atol=1e-5)


def test_unknown_structures_stay_on_torchscript():
    class Other(torch.nn.Module):
        def forward(self, u: torch.Tensor, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.ones(1, 4)

    assert numpy_tower(torch.jit.script(Other()), {}) is None
    module, meta = _scripted(False, True, True, [3], 0.0)
    fn = numpy_tower(module, meta)
    assert not matches(lambda u, a, r: fn(u, a, r) + 1e-2, module, meta)  # a twin that disagrees is refused
