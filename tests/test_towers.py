"""The tower contract (common/towers): towers travel as a state dict plus an architecture tag and hyper-parameters,
and the vector server rebuilds them by tag, loading weights only and strictly; nothing in the bytes can run."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from torch import nn

from common.towers import (
    ARCHS,
    TowerError,
    encode_user_inputs,
    export_tower,
    input_meta,
    load_tower,
    tower_bytes,
)
from common.towers.base import Tower
from common.towers.recent_decay import RecentDecayTower
from common.towers.two_tower_user import UserTower
from services.vector_server.index import Bundle, LoadError
from services.vector_server.index import load_tower as serve_tower

N_USERS, N_ITEMS, R, D = 30, 20, 4, 6
INPUTS = input_meta(N_USERS, N_ITEMS, R, ["seg"], {"seg": {"a": 1, "b": 2}})


def two_tower(**kw) -> UserTower:
    torch.manual_seed(0)
    args = {"n_users": N_USERS, "n_items": N_ITEMS, "attr_sizes": [3], "emb_dim": 8, "out_dim": D, "hidden": [16],
            "dropout": 0.0, "senet": False, "use_user_id": True, "recent_last": True, **kw}
    return UserTower(**args).eval()


class Evil:
    """Unpickled by a plain pickle load, this would create `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_export_round_trip_gives_the_same_module():
    tower = two_tower(senet=True)
    blob, meta = export_tower(tower, INPUTS)
    assert meta["arch"] == "two_tower_user" and meta["hparams"]["senet"] is True and meta["n_users"] == N_USERS
    loaded = serve_tower(blob, meta, D)
    assert isinstance(loaded, UserTower) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = [torch.from_numpy(a) for a in encode_user_inputs(meta, 3, {"seg": "b"}, [5, 1, 7])]
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), tower(*x), rtol=0, atol=0)


def test_unknown_architecture_is_a_load_error():
    blob, meta = export_tower(two_tower(), INPUTS)
    with pytest.raises(LoadError, match="unknown tower architecture 'mind_v9'"):
        serve_tower(blob, {**meta, "arch": "mind_v9"}, D)
    with pytest.raises(LoadError, match="unknown tower architecture None"):  # a manifest from before the contract
        serve_tower(blob, INPUTS, D)
    with pytest.raises(LoadError, match="hparams"):
        serve_tower(blob, {**meta, "hparams": None}, D)
    with pytest.raises(LoadError, match="hyper-parameters rejected"):
        serve_tower(blob, {**meta, "hparams": {**meta["hparams"], "layers": 3}}, D)
    with pytest.raises(LoadError, match="n_users"):  # the tower and its inputs disagree
        serve_tower(blob, {**meta, "n_users": N_USERS + 1}, D)


def test_weights_must_fit_the_rebuilt_module_exactly():
    tower = two_tower()
    blob, meta = export_tower(tower, INPUTS)
    state = {k: v.clone() for k, v in tower.state_dict().items()}

    def save(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    bigger = tower_bytes(two_tower(emb_dim=12))
    with pytest.raises(LoadError, match="user_emb.weight is torch.float32 \\(31, 12\\)"):
        serve_tower(bigger, meta, D)
    with pytest.raises(LoadError, match="missing \\['trained_user'\\]"):
        serve_tower(save({k: v for k, v in state.items() if k != "trained_user"}), meta, D)
    with pytest.raises(LoadError, match="unexpected \\['extra'\\]"):
        serve_tower(save({**state, "extra": torch.zeros(1)}), meta, D)
    with pytest.raises(LoadError, match="mlp.0.weight is torch.float64"):
        serve_tower(save({**state, "mlp.0.weight": state["mlp.0.weight"].double()}), meta, D)
    nan = state["item_emb.weight"].clone()
    nan[3, 0] = float("nan")
    with pytest.raises(LoadError, match="non-finite"):
        serve_tower(save({**state, "item_emb.weight": nan}), meta, D)
    with pytest.raises(LoadError, match="not a state dict"):
        serve_tower(save(list(state.values())), meta, D)
    with pytest.raises(LoadError, match="not a state dict"):
        serve_tower(save({**state, "note": "hello"}), meta, D)
    with pytest.raises(LoadError, match="refused"):
        serve_tower(b"not a tower at all", meta, D)
    with pytest.raises(LoadError, match="expected float32 \\(1, 7\\)"):  # the channel's dimension is 7
        serve_tower(blob, meta, D + 1)


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on the raw pickle
def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path, form):
    target = tmp_path / "pwned"
    payload = {"user_emb.weight": Evil(target)}
    if form == "pickle":
        blob = pickle.dumps(payload)
    else:
        buf = io.BytesIO()
        torch.save(payload, buf)
        blob = buf.getvalue()
    assert not target.exists()  # pickling does not call open(); unpickling would
    _, meta = export_tower(two_tower(), INPUTS)
    with pytest.raises(LoadError, match="weights refused"):
        serve_tower(blob, meta, D)
    with pytest.raises(TowerError):
        load_tower(blob, meta)
    assert not target.exists()
    pickle.loads(pickle.dumps(Evil(tmp_path / "control"))).close()  # the payload is live: pickle.loads runs it
    assert (tmp_path / "control").exists()


class TwoInterests(Tower):
    """A test architecture of K = 2 interests per user: [B, 2, dim], the second row zero (a dead interest)."""

    arch = "test_two_interests"

    def __init__(self, n_items: int, dim: int):
        super().__init__()
        self.hparams = {"n_items": n_items, "dim": dim}
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, dim)

    def forward(self, user_idx, attrs, recent, recent_ts=None):
        first = self.item_emb(recent[:, 0].clamp(0, self.n_items))
        return torch.stack([first, torch.zeros_like(first)], dim=1)


def test_an_architecture_is_a_class_and_one_table_entry_and_may_return_k_interests(monkeypatch):
    monkeypatch.setitem(ARCHS, TwoInterests.arch, TwoInterests.from_hparams)
    tower = TwoInterests(N_ITEMS, D)
    blob, meta = export_tower(tower, INPUTS)
    loaded = serve_tower(blob, meta, D)
    bundle = Bundle(channel="c", publisher="c", version="1", dim=D, n_items=N_ITEMS, n_indexed=0, index_type="flat",
                    index_desc="flat", index=faiss.IndexFlatIP(D), row_to_item=None, normalize=False, tower=loaded,
                    tower_meta=meta)
    vec = bundle.tower_vector(2, None, [4, 9])
    assert vec.shape == (2, D) and vec.dtype == np.float32
    np.testing.assert_allclose(vec[0], tower.item_emb.weight[4].detach().numpy())
    assert not vec[1].any()


def test_recent_decay_tower_and_times_in_the_inputs():
    tower = RecentDecayTower(N_ITEMS, D, R, decay=0.5, attr_sizes=[3])
    blob, meta = export_tower(tower, INPUTS)
    loaded = serve_tower(blob, meta, D)
    # unknown items (-1, out of range) are dropped together with their times
    x = encode_user_inputs(meta, 1, {"seg": "a"}, [3, -1, 5, 99, 7], [50, 40, 30, 20, 10])
    np.testing.assert_array_equal(x.recent, [[3, 5, 7, N_ITEMS]])
    np.testing.assert_array_equal(x.recent_ts, [[50, 30, 10, 0]])
    assert encode_user_inputs(meta, 1, None, [3]).recent_ts.tolist() == [[0, 0, 0, 0]]
    w = tower.item_emb.weight.detach()
    a = tower.attr_emb.weight.detach()
    want = w[3] + 0.5 * w[5] + 0.25 * w[7] + a[1]
    with torch.no_grad():
        got = loaded(*(torch.from_numpy(v) for v in x))[0]
    torch.testing.assert_close(got, want / want.norm())
