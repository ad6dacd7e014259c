"""Incremental updates between nightlies (docs/event_log.md): grown ID tables, frozen layers, carried optimiser and
logQ state, partial re-encoding; end to end, a new user's clicks giving it a user vector served by the vector server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from common.channel_config import ChannelSpec
from common.ids import load_id_map
from common.keyspace import unpack_vector
from common.publish import current_version, read_manifest
from common.towers import load_tower
from trainer.channels.two_tower import TwoTowerChannel
from trainer.data.train_data import TrainData
from trainer.event_log import INCREMENTAL, append_events, read_offset
from trainer.incremental import run_incremental
from trainer.nightly import run_nightly
from trainer.nn.warm_start import BaseVersion, LazyAdam, grow_adam_state, grow_rows, read_checkpoint
from trainer.schedule import Scheduler

T0 = 1_000_000
TINY = {"emb_dim": 8, "dim": 8, "hidden": [16], "epochs": 3, "batch_size": 32, "lr": 0.01, "recent_n": 5}


def planted(n_users: int = 60, n_items: int = 40, clicks: int = 6, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}", T0 + 60 * t) for u in range(n_users)
            for t, i in enumerate(rng.choice(n_items, clicks, replace=False))]
    items = pd.DataFrame({"genre": [f"g{i % 4}" for i in range(n_items + 5)]},
                         index=pd.Index([f"i{i}" for i in range(n_items + 5)], name="item_id"))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items


def published(ch: TwoTowerChannel, data: TrainData, d: Path) -> BaseVersion:
    """What publish_channel leaves on disk for a u2i version (checkpoint and vectors) as the base of an update."""
    art = ch.artifacts(data)["u2i"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "checkpoint.pt").write_bytes(art.checkpoint)
    np.save(d / "item_vectors.npy", art.item_vectors)
    np.save(d / "user_vectors.npy", art.published_user_vectors())
    return BaseVersion("tt", "v1", {"artifacts_dir": str(d)})


def test_grow_rows_copies_old_rows_bit_for_bit_and_keeps_the_tail_last():
    old = torch.randn(5 + 1, 3, dtype=torch.float32)
    grown = grow_rows(old, 5, 8, torch.full((3,), 7.0))
    assert grown.shape == (9, 3)
    assert torch.equal(grown[:5], old[:5]) and torch.equal(grown[8], old[5])
    assert torch.equal(grown[5:8], torch.full((3, 3), 7.0))
    state = grow_adam_state({"step": torch.tensor(4.0), "exp_avg": old, "exp_avg_sq": old.abs()}, 5, 8)
    assert float(state["step"]) == 4.0 and torch.equal(state["exp_avg"][:5], old[:5])
    assert torch.equal(state["exp_avg"][5:8], torch.zeros(3, 3)) and torch.equal(state["exp_avg_sq"][8], old[5].abs())
    with pytest.raises(ValueError, match="only grow"):
        grow_rows(old, 5, 4, old[0])


def test_lazy_adam_leaves_untouched_rows_bit_for_bit():
    w = torch.nn.Parameter(torch.randn(6, 4))
    before = w.detach().clone()
    opt = LazyAdam([w], lr=0.1)
    opt.state[w] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(6, 4), "exp_avg_sq": torch.ones(6, 4)}
    (w[[1, 4]] ** 2).sum().backward()
    opt.step()
    moved = (w.detach() != before).any(1)
    assert moved.tolist() == [False, True, False, False, True, False]  # plain Adam would move every row (momentum)
    assert torch.equal(opt.state[w]["exp_avg"][0], torch.ones(4)) and float(opt.state[w]["step"]) == 4.0


def test_incremental_pass_grows_tables_freezes_layers_and_reencodes_only_what_changed(tmp_path):
    inter, items = planted()
    data0 = TrainData.from_frame(inter, None, items)
    spec = ChannelSpec(name="tt", kind="u2i", model="two_tower", params={**TINY, "dropout": 0.3})
    ch0 = TwoTowerChannel(spec)
    ch0.fit(data0)
    base = published(ch0, data0, tmp_path / "v1")
    tensors, meta = read_checkpoint(base.checkpoint())

    # new events: two new users (one clicks a new item), one old user clicks again
    new = pd.DataFrame([("new1", "i3", T0 + 9000), ("new1", "i40", T0 + 9060), ("new1", "i7", T0 + 9120),
                        ("new2", "i3", T0 + 9000), ("new2", "i41", T0 + 9060), ("u5", "i41", T0 + 9500)],
                       columns=["user_id", "item_id", "timestamp"])
    data1 = TrainData.from_frame(pd.concat([inter, new], ignore_index=True), None, items, data0.user_map,
                                 data0.item_map)
    assert data1.n_users == data0.n_users + 2 and data1.n_items == data0.n_items + 2
    keys = data1.user_idx.astype(np.int64) * data1.n_items + data1.item_idx
    want = data1.user_map.lookup(new["user_id"]) * data1.n_items + data1.item_map.lookup(new["item_id"])
    rows = np.flatnonzero(np.isin(keys, want))
    assert len(rows) == len(new)

    ch1 = TwoTowerChannel(spec)
    report = ch1.incremental_fit(data1, base, rows)
    assert report["examples"] == 6 and report["new_users"] == 2 and report["new_items"] == 2

    # grown tables: old rows of what no new event touched are the published rows, bit for bit
    n_u0, n_i0 = data0.n_users, data0.n_items
    u_old, i_old = tensors["user_tower.user_emb.weight"], tensors["user_tower.item_emb.weight"]
    u_new, i_new = ch1.user_tower.user_emb.weight.detach(), ch1.item_tower.item_emb.weight.detach()
    assert u_new.shape == (n_u0 + 2 + 1, 8) and i_new.shape == (n_i0 + 2 + 1, 8)
    # touched: the new events' items and the items the user tower pooled for them (recent_n before each)
    touched_items = {data1.item_map.get(x) for x in ("i3", "i7", "i40", "i41")}
    for g in rows:
        start = data1.user_ptr[data1.user_idx[g]]
        touched_items |= set(data1.item_idx[max(start, g - TINY["recent_n"]):g].tolist())
    untouched = [i for i in range(n_i0) if i not in touched_items]
    assert torch.equal(i_new[untouched], i_old[untouched])
    assert not torch.equal(i_new[data1.item_map.get("i3")], i_old[data1.item_map.get("i3")])
    assert torch.equal(i_new[-1], torch.zeros(8))  # the padding row stays last and zero
    others = [u for u in range(n_u0) if u != data1.user_map.get("u5")]
    assert torch.equal(u_new[others], u_old[others])
    assert ch1.user_tower.trained_user[data1.user_map.get("new1")]  # the new users have their own rows now

    # every other layer frozen: exactly the published weights, in eval mode, out of the optimiser
    for prefix, module in (("user_tower", ch1.user_tower), ("item_tower", ch1.item_tower)):
        assert not module.training
        for k, v in module.state_dict().items():
            if "emb.weight" in k and ("user_emb" in k or "item_emb" in k) or k == "trained_user":
                continue
            assert torch.equal(v, tensors[f"{prefix}.{k}"]), k
    trained = {id(p) for g in ch1.optimizer.param_groups for p in g["params"]}
    assert trained == {id(ch1.user_tower.user_emb.weight), id(ch1.item_tower.item_emb.weight)}
    # the optimiser state grew with the tables and carried on (steps continue from the nightly's)
    st = ch1.optimizer.state[ch1.user_tower.user_emb.weight]
    assert st["exp_avg"].shape == u_new.shape
    assert float(st["step"]) > float(tensors["adam.user_tower.user_emb.weight.step"])
    assert torch.equal(st["exp_avg"][others], tensors["adam.user_tower.user_emb.weight.exp_avg"][others])
    # logQ frequency state carried on: the nightly's stream position plus the new examples
    assert ch1.estimator.t == int(tensors["freq.t"]) + len(rows)

    # vectors: unchanged items keep their published vectors exactly, the rest re-encoded
    assert ch1.item_vectors.shape == (n_i0 + 2, 8)
    np.testing.assert_array_equal(ch1.item_vectors[untouched], np.load(tmp_path / "v1" / "item_vectors.npy")[untouched])
    assert report["items_reencoded"] == len(touched_items)  # the old items touched plus the two new ones
    enc = ch1._encode_items(np.arange(data1.n_items))
    np.testing.assert_allclose(ch1.item_vectors, enc, atol=1e-6)  # the copied rows are what the tower gives
    np.testing.assert_allclose(ch1.user_vectors, ch1.encode_users(data1), atol=1e-6)
    assert report["users_reencoded"] < data1.n_users  # most users kept their published vectors

    # the next checkpoint chains: it holds the grown tables and the carried state
    t2, m2 = read_checkpoint(ch1.training_checkpoint())
    assert m2["n_users"] == data1.n_users and int(t2["freq.t"]) == ch1.estimator.t
    assert t2["user_tower.user_emb.weight"].shape == u_new.shape


TWO_TOWER_CONFIG = f"""
channels:
  popular: {{kind: list, model: popular, quota: 50}}
  two_tower: {{kind: u2i, model: two_tower, quota: 50, params: {TINY}}}
  itemcf: {{kind: i2i, model: itemcf, quota: 50, params: {{top_k: 20}}}}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from trainer.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny"), n_users=150, n_items=100, n_clicks=3000, progress=False)


def test_new_user_clicks_give_it_a_user_vector_after_an_incremental_run(settings, stores, start_server, tiny_data,
                                                                         tmp_path):
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(TWO_TOWER_CONFIG)
    env = {"CHANNELS_CONFIG": str(cfg), "ARTIFACTS_DIR": str(settings.artifacts_dir)}
    nightly = run_nightly(settings, data_dir=tiny_data, config_path=cfg, progress=False)
    assert nightly["status"] == "ok", nightly["failed"]
    v0 = {c: current_version(stores, c) for c in ("two_tower", "popular", "itemcf")}
    assert read_manifest(stores, "two_tower")["has_checkpoint"]

    feature = start_server(["services.feature_server", "serve"], env)
    items = load_id_map(stores, "item").ids
    clicks = [{"user_id": "newbie", "item_id": items[k], "timestamp": 1_712_000_000 + k} for k in (3, 5, 8)]
    clicks.append({"user_id": "newbie", "item_id": "fresh-item", "timestamp": 1_712_000_100, "event": "like"})
    assert httpx.post(feature.url + "/events", json=clicks, timeout=10).status_code == 200
    vector = start_server(["services.vector_server", "serve"], env)

    def search_until(version: str) -> httpx.Response:
        """The vector server's answer once it serves `version` (it switches within its poll interval)."""
        for _ in range(300):
            got = httpx.post(vector.url + "/search", json={"channel": "two_tower", "user_id": "newbie", "k": 5},
                             timeout=10)
            if got.status_code == 200 and got.json()["version"] == version:
                break
            time.sleep(0.1)
        return got

    before = search_until(v0["two_tower"])
    assert before.status_code == 200, before.text

    # the scheduler's entry (INCREMENTAL_EVERY_MIN): `python -m trainer incremental` as a child process
    sched = Scheduler(settings.model_copy(update={"channels_config": cfg, "incremental_every_min": 15.0}), "02:00",
                      tiny_data)
    assert sched.run_incremental() == 0, list((settings.artifacts_dir / "runs").glob("*-incremental/summary.json"))
    v1 = {c: current_version(stores, c) for c in ("two_tower", "popular", "itemcf")}
    assert v1["two_tower"] != v0["two_tower"] and v1["popular"] != v0["popular"]
    assert v1["itemcf"] == v0["itemcf"]  # not an incremental channel: stays on the nightly's version
    man = read_manifest(stores, "two_tower")
    assert man["incremental"]["base_version"] == v0["two_tower"] and man["incremental"]["examples"] == 4
    assert man["incremental"]["new_users"] == 1 and man["incremental"]["new_items"] == 1
    assert read_offset(stores, INCREMENTAL) == man["event_log_to"]

    users = load_id_map(stores, "user")
    u = users.get("newbie")
    assert 0 <= u < man["n_users"]
    tower = load_tower((Path(man["artifacts_dir"]) / "user_tower.pt").read_bytes(), man["user_tower_meta"])
    assert bool(tower.trained_user[u])  # its own embedding row, trained on its clicks
    vec = unpack_vector(stores("user_emb").get(stores.keyspace.user_vector("two_tower", v1["two_tower"], "newbie")))
    assert vec is not None and np.isfinite(vec).all() and np.linalg.norm(vec) > 0.5
    assert unpack_vector(stores("item_emb").get(stores.keyspace.item_vector("two_tower", v1["two_tower"],
                                                                            man["n_items"] - 1))) is not None

    got = search_until(v1["two_tower"])
    assert got.status_code == 200 and got.json()["version"] == v1["two_tower"], got.text
    assert got.json()["source"] == "tower" and len(got.json()["ids"]) == 5

    # nothing new: the next run has nothing to do; an unknown --channels name fails at the config stage
    again = run_incremental(settings, data_dir=tiny_data, config_path=cfg)
    assert again["status"] == "ok" and again["versions"] == {}
    assert again["channels"]["two_tower"]["status"].startswith("up to date")
    bad = run_incremental(settings, data_dir=tiny_data, config_path=cfg, channels=["itemcf"])
    assert bad["status"] == "failed" and "itemcf" in bad["failed"][0]["error"]

    # a nightly run later retrains from scratch on everything and is the new base
    append_events(stores, pd.DataFrame([{"user_id": "newbie", "item_id": items[11], "timestamp": 1_712_000_200}]))
    assert run_nightly(settings, data_dir=tiny_data, config_path=cfg, progress=False)["status"] == "ok"
    assert "incremental" not in read_manifest(stores, "two_tower")
