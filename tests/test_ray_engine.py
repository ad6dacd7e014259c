"""The Ray engine (trainer/engine) against a real Ray cluster of local processes: a head and a worker node started
with `ray start` on 127.0.0.1 (private temp dir, free ports), one CPU each. ItemCF and UserCF lists identical to
the local engine's; the nightly end to end on the cluster (sharded co-occurrence, item2vec sessions, sharded
neighbour lists, two-tower on two Ray Train workers over gloo); the cluster's processes gone afterwards."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e '.[ray]')")

from common.channel_config import ChannelSpec, load_config  # noqa: E402
from common.ids import load_id_map  # noqa: E402
from common.keyspace import unpack_vector  # noqa: E402
from common.publish import read_manifest  # noqa: E402
from trainer.channels import itemcf, registry  # noqa: E402
from trainer.data.io import load_dataset  # noqa: E402
from trainer.data.train_data import TrainData  # noqa: E402
from trainer.engine.ray_cluster import LocalRayCluster, _group_alive  # noqa: E402
from trainer.engine.ray_data import ship, unship  # noqa: E402
from trainer.engine.ray_engine import RayEngine  # noqa: E402
from trainer.nightly import run_nightly  # noqa: E402
from trainer.publishing import nn_store  # noqa: E402
from trainer.synth import write_synthetic  # noqa: E402

CONFIG = """
channels:
  popular: {kind: list, model: popular, weight: 0.1, quota: 20}
  itemcf: {kind: i2i, model: itemcf, quota: 100, params: {top_k: 50}}
  usercf: {kind: u2u, model: usercf, weight: 0.1, quota: 20, params: {top_k: 20}}
  mf: {kind: u2i, model: mf, weight: 0.2, quota: 20, params: {dim: 8, epochs: 3, top_k: 20}}
  mf_i2i: {kind: i2i, from: mf, weight: 0.5, quota: 50}
  item2vec: {kind: i2i, model: item2vec, weight: 0.1, quota: 50, params: {dim: 8, epochs: 2, window: 5, top_k: 20}}
  two_tower: {kind: u2i, model: two_tower, weight: 3.0, quota: 50,
              params: {emb_dim: 8, dim: 8, hidden: [16], epochs: 2, batch_size: 256}}
"""
IDENTICAL = ["itemcf", "usercf", "mf_i2i", "item2vec"]  # lists the Ray engine must publish byte for byte


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster(workers=1, cpus_per_node=1, object_store_mb=200).start()
    try:
        yield c
    finally:
        groups = [p.pid for p in c.procs]
        c.stop()
        assert not any(_group_alive(g) for g in groups), "Ray processes left after the cluster stopped"
        assert not c.temp_dir.exists()


@pytest.fixture(scope="module")
def engine(cluster):
    eng = RayEngine(address=cluster.address)
    yield eng
    eng.close()
    ray.shutdown()  # this process was the driver; the cluster fixture then stops the nodes


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> TrainData:
    path = write_synthetic(tmp_path_factory.mktemp("small"), n_users=400, n_items=300, n_clicks=8000, progress=False)
    ds = load_dataset(path)
    return TrainData.from_frame(ds.interactions, ds.users, ds.items)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> TrainData:
    """More items than ItemCF's dense accumulator takes (the sparse path)."""
    path = write_synthetic(tmp_path_factory.mktemp("wide"), n_users=800, n_items=9000, n_clicks=16000, progress=False)
    ds = load_dataset(path)
    data = TrainData.from_frame(ds.interactions, ds.users, ds.items)
    assert data.n_items > itemcf.DENSE_MAX_ITEMS
    return data


def test_an_unreachable_cluster_fails_the_engine_stage_fast(settings, tmp_path):
    """Before any cluster fixture (this process is not yet a Ray driver): `ray.init` would retry for minutes."""
    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    data_dir = write_synthetic(tmp_path / "data", n_users=50, n_items=30, n_clicks=400, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t = time.monotonic()
    out = run_nightly(settings.model_copy(update={"ray_address": f"127.0.0.1:{port}"}), data_dir, progress=False,
                      engine="ray")
    assert time.monotonic() - t < 60
    assert out["status"] == "failed" and [f["stage"] for f in out["failed"]] == ["engine"]
    assert "unreachable" in out["failed"][0]["error"]
    assert not [s for s in out["stages"] if s["stage"].startswith("fit:")]  # nothing fitted, nothing published
    assert not ray.is_initialized()


def test_cluster_has_the_head_and_the_worker_node(engine):
    info = engine.describe()
    assert info["nodes"] == 2 and info["cpus"] == 2 and engine.shards == 2
    # both nodes on this machine (Ray publishes a node started with --node-ip-address 127.0.0.1 under the host's
    # own address)
    assert len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}) == 1


@pytest.mark.parametrize("model, params", [
    ("itemcf", {}),  # offsets, position decay, order weights, category boost
    ("itemcf", {"position_decay": 1.0, "window": None, "backward_weight": 1.0}),  # the all-pairs product path
    ("itemcf", {"time_decay_s": 3600.0, "category_weight": 1.0, "user_penalty": False}),
    ("usercf", {}),
    ("usercf", {"normalization": "cosine", "region_weight": 1.5, "max_history": None}),
])
def test_lists_identical_to_the_local_engine(engine, small, wide, monkeypatch, model, params):
    # a small pair buffer: the pair loop sums in several flushes, which the row blocks must reproduce
    monkeypatch.setattr(itemcf, "PAIR_BUFFER", 3000)
    kind = "i2i" if model == "itemcf" else "u2u"
    spec = ChannelSpec(name=model, kind=kind, model=model, params=params)
    for data in (small, wide):
        local = registry.build(spec)
        local.fit(data)
        want = local.artifacts(data)[kind]
        remote = registry.build(spec)
        got = engine.fit(remote, data)[kind]
        assert engine.stats.get("blocks", engine.stats.get("tasks")) == 2  # really sharded
        assert (want.neighbors >= 0).sum() > 1000
        np.testing.assert_array_equal(got.neighbors, want.neighbors)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert remote.stats == local.stats


def test_train_data_round_trips_through_the_object_store(engine, small):
    back = ray.get(_unship_remote.remote(ship(small)))
    for name in ("user_idx", "item_idx", "ts", "event"):
        np.testing.assert_array_equal(getattr(back, name), getattr(small, name))
    assert back.user_map.ids == small.user_map.ids and back.item_map.ids == small.item_map.ids
    pd.testing.assert_frame_equal(back.item_attrs, small.item_attrs)
    pd.testing.assert_frame_equal(back.user_attrs, small.user_attrs)
    assert back.context.keys() == small.context.keys()
    for k in small.context:
        assert back.context[k].tolist() == small.context[k].tolist()


@ray.remote
def _unship_remote(shipped) -> TrainData:
    return unship(shipped)


def _published(stores, spec, ver: str, kind: str, keys: list) -> list:
    ks, store = stores.keyspace, nn_store(spec, kind)
    key = ks.i2i if kind == "i2i" else ks.u2u
    return stores(store).mget([key(store, spec.name, ver, k) for k in keys])


def test_nightly_end_to_end_on_the_cluster(engine, cluster, settings, stores, tmp_path):
    data_dir = write_synthetic(tmp_path / "data", n_users=300, n_items=200, n_clicks=6000, progress=False)
    config = tmp_path / "channels.yaml"
    config.write_text(CONFIG)
    cfg = load_config(config)
    local = run_nightly(settings, data_dir, config, progress=False)
    assert local["status"] == "ok", local["failed"]
    on_ray = run_nightly(settings.model_copy(update={"ray_address": cluster.address}), data_dir, config,
                         progress=False, engine="ray")
    assert on_ray["status"] == "ok", on_ray["failed"]
    stages = {s["stage"]: s for s in on_ray["stages"]}
    assert stages["engine"]["status"] == "ok" and "engine" not in {s["stage"] for s in local["stages"]}
    assert on_ray["engine"]["nodes"] == 2 and on_ray["engine"]["address"] == cluster.address
    info = on_ray["channels"]
    assert info["itemcf"]["engine"]["blocks"] == 2 and info["usercf"]["engine"]["tasks"] == 2
    assert info["item2vec"]["engine"]["session_tasks"] == 2
    assert info["mf"]["engine"]["neighbors"]["mf i2i"]["tasks"] >= 1  # mf fits on the driver, its lists in tasks
    assert info["two_tower"]["engine"]["train_workers"] == 2
    # the same lists, byte for byte, published by both runs
    items = list(range(len(load_id_map(stores, "item"))))
    users = load_id_map(stores, "user").ids
    for name in IDENTICAL:
        kind = cfg.get(name).kind
        owner = cfg.get(name).source or name
        spec = cfg.get(owner)
        keys = items if kind == "i2i" else users
        a = _published(stores, spec, local["versions"][owner], kind, keys)
        b = _published(stores, spec, on_ray["versions"][owner], kind, keys)
        assert sum(v is not None for v in a) > 0.5 * len(keys), name
        assert a == b, f"{name}: the Ray engine published different lists"
    # two-tower: trained by the two workers together, every user's vector precomputed, the tower published
    man = read_manifest(stores, "two_tower", on_ray["versions"]["two_tower"])
    assert man["kinds"] == ["u2i"] and man.get("user_tower") or man.get("tower") or "u2i" in man["kinds"]
    ks = stores.keyspace
    vecs = [unpack_vector(v) for v in stores("user_emb").mget(
        [ks.user_vector("two_tower", on_ray["versions"]["two_tower"], u) for u in users])]
    assert all(v is not None and len(v) == 8 and math.isfinite(float(np.abs(v).sum())) for v in vecs)
    assert np.std(np.stack(vecs), axis=0).mean() > 1e-3  # users differ: trained, not an untouched init
    assert os.path.exists(Path(on_ray["summary_path"]))
