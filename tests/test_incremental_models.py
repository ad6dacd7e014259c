"""Incremental updates of every request-time tower model (one warm start, trainer/channels/warm_tower.py) and the ALS
fold-in of mf (docs/event_log.md): grown tables keep the published rows bit for bit, frozen layers stay as published,
a new user's clicks and a new item get vectors, the published vectors are exactly what the updated model gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.channel_config import ChannelSpec
from common.ids import load_id_map
from common.keyspace import unpack_vector
from common.publish import current_version, read_manifest
from common.towers import encode_user_inputs, load_tower
from trainer.channels import registry
from trainer.data.train_data import TrainData
from trainer.event_log import append_events
from trainer.incremental import NotIncremental, run_incremental
from trainer.nightly import run_nightly
from trainer.nn.warm_start import BaseVersion, WarmStart, read_checkpoint

T0 = 1_000_000
TINY = {
    "two_tower": {"emb_dim": 8, "dim": 8, "hidden": [16], "epochs": 2, "batch_size": 32, "recent_n": 5},
    "youtube_dnn": {"emb_dim": 8, "dim": 8, "hidden": [16], "recent_n": 5, "epochs": 2, "batch_size": 32,
                    "use_user_id": True, "examples_per_user": None, "n_quantiles": 4},
    "multitask_two_tower": {"emb_dim": 8, "dim": 8, "hidden": [16], "epochs": 2, "batch_size": 32, "recent_n": 5,
                            "dropout": 0.2},
    "neural_cf": {"dim": 4, "mlp_layers": 2, "recent_n": 3, "epochs": 2, "batch_size": 64, "pretrain": False},
    "sdm": {"dim": 8, "short_n": 3, "recent_n": 6, "epochs": 2, "batch_size": 32, "num_heads": 2},
    "mind": {"dim": 8, "n_interests": 2, "recent_n": 5, "hidden": [16], "epochs": 2, "batch_size": 32},
}
TOWERS = ["youtube_dnn", "multitask_two_tower", "neural_cf", "sdm", "mind"]  # two_tower: tests/test_incremental.py


class Setup:
    """The nightly's data, the data with the new events, and the positions of the new events in it."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        rows = [(f"u{u}", f"i{i}", T0 + 60 * t) for u in range(60)
                for t, i in enumerate(rng.choice(40, 6, replace=False))]
        items = pd.DataFrame({"category": [f"c{i % 4}" for i in range(40)] + ["c1", "c9"]},
                             index=pd.Index([f"i{i}" for i in range(42)], name="item_id"))
        users = pd.DataFrame({"gender": ["F", "M"] * 31}, index=pd.Index([f"u{u}" for u in range(60)]
                                                                          + ["new1", "new2"], name="user_id"))
        inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
        self.data0 = TrainData.from_frame(inter, users, items)
        # new events: two new users (clicking the new items i40, i41), an old user clicking a new item
        self.new = pd.DataFrame([("new1", "i3", T0 + 9000), ("new1", "i40", T0 + 9060), ("new1", "i7", T0 + 9120),
                                 ("new2", "i3", T0 + 9000), ("new2", "i41", T0 + 9060), ("u5", "i41", T0 + 9500)],
                                columns=["user_id", "item_id", "timestamp"])
        self.data1 = TrainData.from_frame(pd.concat([inter, self.new], ignore_index=True), users, items,
                                          self.data0.user_map, self.data0.item_map)
        d = self.data1
        keys = d.user_idx.astype(np.int64) * d.n_items + d.item_idx
        want = d.user_map.lookup(self.new["user_id"]) * d.n_items + d.item_map.lookup(self.new["item_id"])
        self.rows = np.flatnonzero(np.isin(keys, want))
        assert len(self.rows) == len(self.new) and d.n_users == self.data0.n_users + 2
        assert d.n_items == self.data0.n_items + 2


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def publish_like(ch, data: TrainData, d: Path) -> BaseVersion:  # noqa: ANN001
    """What publish_channel leaves on disk for a u2i version (checkpoint and vectors): the base of an update."""
    art = ch.artifacts(data)["u2i"]
    d.mkdir(parents=True, exist_ok=True)
    assert art.checkpoint is not None
    (d / "checkpoint.pt").write_bytes(art.checkpoint)
    np.save(d / "item_vectors.npy", art.item_vectors)
    np.save(d / "user_vectors.npy", art.published_user_vectors())
    return BaseVersion(ch.spec.name, "v1", {"artifacts_dir": str(d)})


@pytest.fixture(scope="module", params=TOWERS)
def updated(request, setup, tmp_path_factory):
    """(spec, base version, the updated channel, its report) of one model."""
    model = request.param
    spec = ChannelSpec(name=model, kind="u2i", model=model, params=TINY[model])
    ch0 = registry.build(spec)
    ch0.fit(setup.data0)
    base = publish_like(ch0, setup.data0, tmp_path_factory.mktemp(model))
    ch1 = registry.build(spec)
    report = ch1.incremental_fit(setup.data1, base, setup.rows)
    return spec, base, ch1, report


def state_of(ch) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {f"{prefix}.{k}": v for prefix, m in ch.warm_modules().items() for k, v in m.state_dict().items()}


def test_tables_grow_with_the_published_rows_bit_for_bit(updated, setup):
    spec, base, _, _ = updated
    tensors, meta = read_checkpoint(base.checkpoint())
    d0, d1 = setup.data0, setup.data1
    ch = registry.build(spec)
    ch.params = ch.Params(**meta["params"])
    ws = WarmStart(tensors, d0.n_users, d0.n_items, d1.n_users, d1.n_items)
    ch.warm_prepare(d1, tensors, meta)
    ch.warm_build(d1, tensors)
    ws.load(ch.warm_modules(), ch.warm_tables())
    grown = state_of(ch)
    entities = {t.entity for t in ws.tables.values() if t.train}
    assert entities == {"user", "item"}  # the model has both kinds of ID table, and they grew
    for key, t in ws.tables.items():
        if t.derived:
            continue
        n0, n1 = (d0.n_users, d1.n_users) if t.entity == "user" else (d0.n_items, d1.n_items)
        old, now = tensors[key], grown[key]
        assert now.shape[0] == n1 + t.tail, key
        assert torch.equal(now[:n0], old[:n0]), key  # every published row, bit for bit (all old users trained)
        assert torch.equal(now[n1:], old[n0:]), key  # the special rows (unknown user, padding item) stay last
        if t.new == "unknown":  # a new user starts from what serving gave it so far: the unknown-user row
            assert torch.equal(now[n0:n1], old[n0].expand(n1 - n0, *old.shape[1:])), key
    with pytest.raises(ValueError, match="shrank"):
        WarmStart(tensors, d0.n_users, d0.n_items, d0.n_users - 1, d0.n_items)


def test_incremental_pass_freezes_layers_trains_id_rows_and_reencodes_exactly(updated, setup):
    spec, base, ch, report = updated
    tensors, meta = read_checkpoint(base.checkpoint())
    d0, d1 = setup.data0, setup.data1
    assert report["examples"] == 6 and report["new_users"] == 2 and report["new_items"] == 2
    tables = {t.key: t for t in ch.warm_tables()}
    state = state_of(ch)

    # frozen: every weight that is not an ID table is the published one, modules in eval mode (Dropout off)
    for prefix, module in ch.warm_modules().items():
        assert not module.training, prefix
        assert not any(m.training for m in module.modules()), prefix
    for key, v in state.items():
        t = tables.get(key)
        if t is None:
            assert torch.equal(v, tensors[key]), key
        elif not t.train and not t.derived:  # item codes: the published rows kept
            n0 = d0.n_items if t.entity == "item" else d0.n_users
            assert torch.equal(v[:n0], tensors[key][:n0]), key
    # the optimiser holds the ID tables only; their Adam state grew with them and the step carried on
    named = {f"{prefix}.{n}": p for prefix, m in ch.warm_modules().items()
             for n, p in m.named_parameters(remove_duplicate=False)}
    train_ids = {id(named[k]) for k, t in tables.items() if k in named and t.train}
    opt_ids = {id(p) for g in ch.optimizer.param_groups for p in g["params"]}
    assert opt_ids == train_ids and opt_ids
    for name, p in named.items():
        st = ch.optimizer.state.get(p)
        if id(p) in opt_ids and st and f"adam.{name}.exp_avg" in tensors:
            assert st["exp_avg"].shape == p.shape, name
            assert float(st["step"]) > float(tensors[f"adam.{name}.step"]), name

    # users without new events keep their published rows bit for bit; the new users trained their own
    moved_users = set(d1.user_map.lookup(setup.new["user_id"]).tolist())
    still = [u for u in range(d0.n_users) if u not in moved_users]
    new1, unknown = d1.user_map.get("new1"), d1.n_users
    for key, t in tables.items():
        if t.entity != "user" or key not in state:
            continue
        if t.marks_trained:
            assert bool(state[key][new1])  # served by its own row from now on
        elif t.train:
            assert torch.equal(state[key][still], tensors[key][still]), key
            assert not torch.equal(state[key][new1], state[key][unknown]), key  # moved off the unknown row

    # the published vectors are exactly what the updated model gives (only the stale ones were re-encoded)
    with torch.no_grad():
        items = ch.encode_item_rows(d1, np.arange(d1.n_items))
        users = ch.encode_user_rows(d1, np.arange(d1.n_users))
    np.testing.assert_allclose(ch.item_vectors, items, atol=1e-6)
    np.testing.assert_allclose(ch.user_vectors, users, atol=1e-6)
    published_users = np.load(Path(base.directory) / "user_vectors.npy")
    assert report["users_reencoded"] <= d1.n_users and report["items_reencoded"] <= d1.n_items
    kept = [u for u in range(d0.n_users) if not np.array_equal(ch.user_vectors[u], published_users[u])]
    assert len(kept) <= report["users_reencoded"]
    for item in ("i40", "i41"):  # new items: a vector of their own
        v = ch.item_vectors[d1.item_map.get(item)]
        assert np.isfinite(v).all() and np.abs(v).sum() > 0
    vec = ch.user_vectors[new1]
    assert np.isfinite(vec).all() and np.abs(vec).sum() > 0

    # the exported tower (what the vector server runs) gives the new user its published vector from its clicks
    art = ch.artifacts(d1)["u2i"]
    tower = load_tower(art.user_tower, art.user_tower_meta)
    lo, hi = d1.user_ptr[new1], d1.user_ptr[new1 + 1]  # as a request sends them: raw attributes, newest first
    x = encode_user_inputs(art.user_tower_meta, new1, {"gender": d1.user_attrs["gender"].iloc[new1]},
                           d1.item_idx[lo:hi][::-1], d1.ts[lo:hi][::-1])
    with torch.no_grad():
        served = tower(*(torch.as_tensor(a) for a in x)).numpy()[0]
    np.testing.assert_allclose(served, art.published_user_vectors()[new1], atol=1e-5)

    # the next checkpoint chains: the grown sizes and the carried state
    t2, m2 = read_checkpoint(ch.training_checkpoint())
    assert (m2["n_users"], m2["n_items"]) == (d1.n_users, d1.n_items)
    if spec.model == "multitask_two_tower":  # logQ: each task's estimator continued from the nightly's position
        assert int(t2["interacted.freq.t"]) == int(tensors["interacted.freq.t"]) + len(setup.rows)


def test_mf_als_fold_in_solves_touched_users_and_new_items_only(setup, tmp_path):
    spec = ChannelSpec(name="mf", kind="u2i", model="mf", params={"dim": 8, "epochs": 5})
    d0, d1 = setup.data0, setup.data1
    ch0 = registry.build(spec)
    ch0.fit(d0)
    base = publish_like(ch0, d0, tmp_path / "mf")
    ch = registry.build(spec)
    report = ch.incremental_fit(d1, base, setup.rows)
    touched = {d1.user_map.get(u) for u in ("new1", "new2", "u5")}
    assert report == {"examples": 6, "new_users": 2, "new_items": 2, "users_reencoded": 3, "items_reencoded": 2,
                      "i2i": "rebuilt"}
    # fixed factors: every old item and every untouched user bit for bit
    np.testing.assert_array_equal(ch.factor_item[:d0.n_items], ch0.factor_item)
    still = [u for u in range(d0.n_users) if u not in touched]
    np.testing.assert_array_equal(ch.user_vectors[still], ch0.user_vectors[still])
    assert not np.array_equal(ch.user_vectors[d1.user_map.get("u5")], ch0.user_vectors[d1.user_map.get("u5")])
    new1, i40 = d1.user_map.get("new1"), d1.item_map.get("i40")
    assert np.abs(ch.user_vectors[new1]).sum() > 0 and np.abs(ch.item_vectors[i40]).sum() > 0
    # a touched user's vector is the exact ALS least-squares solution against the fixed item factors (Hu et al.:
    # (YᵀY + Σ_i (c_ui − 1) y_i y_iᵀ + λI) x_u = Σ_i c_ui y_i over its clicked items, with the recency confidences)
    conf = ch._confidence(d1)
    y = ch.factor_item.astype(np.float64)
    for u in (new1, d1.user_map.get("u5")):
        row = conf[u]
        yi, c = y[row.indices], row.data.astype(np.float64)
        a = y.T @ y + (yi.T * (c - 1)) @ yi + 40.0 * np.eye(8)
        np.testing.assert_allclose(ch.user_vectors[u], np.linalg.solve(a, yi.T @ c), rtol=1e-3, atol=1e-4)
    art = ch.artifacts(d1)
    assert art["u2i"].user_vectors.shape == (d1.n_users, 8) and art["i2i"].neighbors[i40][0] >= 0  # i40 has a list
    assert i40 in set(art["i2i"].neighbors[d1.item_map.get("i3")].tolist()) | set(
        art["i2i"].neighbors[i40].tolist())
    funk = registry.build(ChannelSpec(name="mf", kind="u2i", model="mf", params={"algorithm": "funksvd"}))
    with pytest.raises(NotIncremental, match="FunkSVD"):
        funk.incremental_fit(d1, base, setup.rows)


ALL_MODELS_CONFIG = "channels:\n" + "".join(
    f"  {m}: {{kind: u2i, model: {m}, quota: 50, params: {json.dumps(p)}}}\n" for m, p in TINY.items() if m != "two_tower"
) + "  mf: {kind: u2i, model: mf, quota: 50, params: {dim: 8, epochs: 3}}\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny"), n_users=120, n_items=80, n_clicks=2000, progress=False)


def test_incremental_job_updates_every_model_and_publishes_one_version_each(settings, stores, tiny_data, tmp_path):
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(ALL_MODELS_CONFIG)
    nightly = run_nightly(settings, data_dir=tiny_data, config_path=cfg, progress=False)
    assert nightly["status"] == "ok", nightly["failed"]
    models = [*TOWERS, "mf"]
    v0 = {m: current_version(stores, m) for m in models}
    items = load_id_map(stores, "item").ids
    append_events(stores, pd.DataFrame([{"user_id": "newbie", "item_id": items[k], "timestamp": 1_712_000_000 + k}
                                        for k in (3, 5, 8)]
                                       + [{"user_id": "newbie", "item_id": "fresh-item", "timestamp": 1_712_000_100}]))
    summary = run_incremental(settings, data_dir=tiny_data, config_path=cfg)
    assert summary["status"] == "ok", summary["failed"]
    users = load_id_map(stores, "user")
    for m in models:
        info = summary["channels"][m]
        assert info["status"] == "ok", (m, info)
        ver = current_version(stores, m)
        assert ver != v0[m] and summary["versions"][m] == ver
        man = read_manifest(stores, m, ver)
        assert man["incremental"]["base_version"] == v0[m] and man["incremental"]["new_users"] == 1
        assert man["incremental"]["new_items"] == 1 and man["event_log_to"] == summary["events"]["to"]
        # one version holds all of it: the tower, the new item's vector and the new user's vector
        assert man["has_user_tower"] == (m != "mf") and man["n_items"] == len(items) + 1
        fresh = unpack_vector(stores("item_emb").get(stores.keyspace.item_vector(m, ver, man["n_items"] - 1)))
        assert fresh is not None and np.isfinite(fresh).all()
        vec = unpack_vector(stores("user_emb").get(stores.keyspace.user_vector(m, ver, "newbie")))
        assert vec is not None and np.isfinite(vec).all() and np.abs(vec).sum() > 0, m
        assert users.get("newbie") < man["n_users"]
    again = run_incremental(settings, data_dir=tiny_data, config_path=cfg)
    assert again["versions"] == {} and all(c["status"].startswith("up to date") for c in again["channels"].values())
