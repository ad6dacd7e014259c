"""The numpy twin of an exported user tower gives the torch module's vectors; the twin is chosen by architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.towers import TWINS, export_tower, input_meta, load_tower, matches, numpy_twin
from common.towers.recent_decay import RecentDecayTower
from common.towers.two_tower_user import UserTower


def _exported(senet: bool, use_user_id: bool, recent_last: bool, attr_sizes: list[int], dropout: float):
    """A two_tower_user tower with non-trivial weights, published and rebuilt as the vector server does."""
    torch.manual_seed(0)
    n_users, n_items = 50, 40
    item_emb = torch.nn.Embedding(n_items + 1, 8, padding_idx=n_items)
    tower = UserTower(n_users, n_items, attr_sizes, emb_dim=8, out_dim=6, hidden=[16, 12], dropout=dropout,
                      senet=senet, use_user_id=use_user_id, item_emb=item_emb, recent_last=recent_last)
    with torch.no_grad():
        tower.trained_user[7] = False  # served as the unknown user
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # non-trivial weights everywhere, biases included
    blob, meta = export_tower(tower.eval(), input_meta(
        n_users, n_items, 5, [f"c{i}" for i in range(len(attr_sizes))],
        {f"c{i}": {str(v): v for v in range(1, s)} for i, s in enumerate(attr_sizes)}))
    return load_tower(blob, meta), meta


@pytest.mark.parametrize("senet,use_user_id,recent_last,attr_sizes,dropout", [
    (False, True, True, [3, 5], 0.0), (True, True, False, [4], 0.2), (False, False, True, [], 0.0),
    (True, False, False, [2, 2, 6], 0.1)])
def test_twin_gives_the_torch_vectors(senet, use_user_id, recent_last, attr_sizes, dropout):
    module, meta = _exported(senet, use_user_id, recent_last, attr_sizes, dropout)
    assert meta["arch"] == "two_tower_user" and not module.training
    fn = numpy_twin(module, meta)
    assert fn is not None
    assert matches(fn, module, meta, n=200)
    # the edge cases by hand: unknown, untrained and out-of-range users; all-padding and out-of-range history
    a = np.zeros((1, max(len(attr_sizes), 1)), np.int64)
    for u, rec in [(-1, [40] * 5), (7, [3, 40, 40, 40, 40]), (99, [-1, 5, 200, 6, 40]), (3, [39, 0, 1, 2, 3])]:
        r = np.array([rec], np.int64)
        want = module(torch.tensor([u]), torch.from_numpy(a), torch.from_numpy(r)).detach().reshape(-1).numpy()
        np.testing.assert_allclose(fn(np.array([u]), a, r), want, atol=1e-5)
        np.testing.assert_allclose(fn(np.array([u]), a, r, np.ones_like(r)), want, atol=1e-5)  # times: unused


def test_twin_is_chosen_by_architecture_tag_and_checked():
    module, meta = _exported(False, True, True, [3], 0.0)
    assert "two_tower_user" in TWINS and "recent_decay" not in TWINS  # other archs may add twins
    assert numpy_twin(module, {**meta, "arch": "recent_decay"}) is None  # no twin for that tag: torch serves
    other = RecentDecayTower(n_items=40, dim=6, recent_n=5)
    assert numpy_twin(other, {"arch": "recent_decay"}) is None
    assert numpy_twin(other, meta) is None  # a tag that does not fit the module: refused, not misread
    fn = numpy_twin(module, meta)
    assert not matches(lambda *x: fn(*x) + 1e-2, module, meta)  # a twin that disagrees is refused
