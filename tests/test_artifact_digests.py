"""No code execution from Redis, and no tampered artifact served (docs/reliability.md, "Artifacts from Redis"): every
manifest carries the sha256 of each artifact; the vector server and the recall server recompute it when they load a
version and refuse one that differs (a clear log line; the previous version keeps serving, or the channel answers
degraded). Towers are state dicts read with weights_only=True: a crafted pickle never runs, even with a forged
digest."""

from __future__ import annotations

import asyncio
import pickle
import time

import httpx
import numpy as np
import pytest
from test_towers import Evil
from test_vector_server import (
    N_ITEMS,
    N_USERS,
    TOWER_META,
    D,
    clustered_items,
    post,
    publish_maps,
    tower_bytes,
    wait_versions,
    write_config,
)

from common.archive import value_digest
from common.channel_config import load_config
from common.keyspace import pack_json, pack_neighbors, pack_vector, unpack_json
from common.publish import Publisher, read_manifest
from common.redis_conn import AsyncRedisStores
from services.recall_server.retrievers import RETRIEVERS
from services.recall_server.state import ServingState
from services.vector_server.index import LoadError, load_bundle, load_id_maps

TW = {"channels": {"tw": {"kind": "u2i", "model": "two_tower", "index": {"type": "flat"}}}}


def publish_u2i(stores, items: np.ndarray, users: np.ndarray, blob: bytes, before_flip=None) -> str:
    """Publish channel "tw" (item vectors, user vectors, a user tower) with the Publisher; `before_flip(version)`
    runs after every key is written and before `current` flips (where a tamperer would strike)."""
    ks, name = stores.keyspace, "tw"
    pub = Publisher(stores, name)
    ver = pub.begin()
    pub.write("item_emb", ((ks.item_vector(name, ver, i), pack_vector(v)) for i, v in enumerate(items)),
              artifact="item_vectors")
    pub.write("user_emb", ((ks.user_vector(name, ver, f"u{u}"), pack_vector(v)) for u, v in enumerate(users)),
              artifact="user_vectors")
    pub.write("item_emb", [(ks.user_tower(name, ver), blob)], artifact="user_tower")
    manifest = {"model": "two_tower", "kinds": ["u2i"], "n_items": N_ITEMS, "n_users": N_USERS, "dim": D,
                "metric": "ip", "has_user_tower": True, "user_tower_meta": TOWER_META, "stores": {"u2i": "item_emb"},
                "counts": {"item_vectors": N_ITEMS, "user_vectors": N_USERS}}
    return pub.commit(manifest, verify=(lambda: before_flip(ver)) if before_flip else None)


def users() -> np.ndarray:
    return np.eye(D, dtype=np.float32)[np.arange(N_USERS) % D]


def crafted_pickle(target) -> bytes:
    return pickle.dumps({"item_emb.weight": Evil(target)})


def forge_digest(stores, channel: str, version: str, artifact: str, value: bytes) -> None:
    """What an attacker who can write the manifest too would do: make its digest match the new value."""
    ks, meta = stores.keyspace, stores("meta")
    m = unpack_json(meta.get(ks.manifest(channel, version)))
    m["digests"][artifact] = value_digest([value])
    meta.set(ks.manifest(channel, version), pack_json(m))


def test_the_manifest_carries_the_digest_of_every_artifact(stores, tmp_path):
    from test_vector_server import publish

    cfg = write_config(tmp_path)
    publish_maps(stores)
    items = clustered_items()
    v = publish(stores, cfg, "tw", items, users()[:N_USERS], True, tmp_path / "artifacts")
    m = read_manifest(stores, "tw", v)
    ks = stores.keyspace
    assert set(m["digests"]) == {"item_vectors", "user_vectors", "user_tower"}
    assert m["digests"]["item_vectors"] == value_digest(
        stores("item_emb").mget([ks.item_vector("tw", v, i) for i in range(N_ITEMS)]))
    assert m["digests"]["user_tower"] == value_digest([stores("item_emb").get(ks.user_tower("tw", v))])
    spec = load_config(cfg).get("tw")
    bundle = load_bundle(stores, spec, v, load_id_maps(stores), user_cache_bytes=2**20)
    assert bundle.tower is not None and bundle.user_vectors is not None  # every check passed


@pytest.mark.parametrize(("what", "artifact"), [("item vector", "item_vectors"), ("user vector", "user_vectors"),
                                                ("tower", "user_tower"), ("deleted item vector", "item_vectors")])
def test_a_tampered_artifact_is_refused_before_it_is_used(stores, tmp_path, what, artifact):
    publish_maps(stores)
    items = clustered_items()
    v = publish_u2i(stores, items, users(), tower_bytes(items))
    ks = stores.keyspace
    canary = tmp_path / "pwned"
    if what == "item vector":
        stores("item_emb").set(ks.item_vector("tw", v, 7), pack_vector(-items[7]))
    elif what == "deleted item vector":
        stores("item_emb").delete(ks.item_vector("tw", v, 7))
    elif what == "user vector":
        stores("user_emb").set(ks.user_vector("tw", v, "u3"), pack_vector(np.ones(D, np.float32)))
    else:
        stores("item_emb").set(ks.user_tower("tw", v), crafted_pickle(canary))
    spec = load_config(write_config(tmp_path, TW)).get("tw")
    with pytest.raises(LoadError, match=f"{artifact} digest mismatch .*refused, not loaded"):
        load_bundle(stores, spec, v, load_id_maps(stores), user_cache_bytes=2**20)
    assert not canary.exists()  # the crafted tower was never unpickled


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on the raw pickle
def test_a_crafted_pickle_with_a_forged_digest_still_runs_nothing(stores, tmp_path):
    publish_maps(stores)
    items = clustered_items()
    v = publish_u2i(stores, items, users(), tower_bytes(items))
    canary = tmp_path / "pwned"
    blob = crafted_pickle(canary)
    stores("item_emb").set(stores.keyspace.user_tower("tw", v), blob)
    forge_digest(stores, "tw", v, "user_tower", blob)
    spec = load_config(write_config(tmp_path, TW)).get("tw")
    bundle = load_bundle(stores, spec, v, load_id_maps(stores), user_cache_bytes=2**20)
    # weights_only=True refuses it; the channel serves its precomputed user vectors instead
    assert bundle.tower is None and "weights refused" in bundle.tower_error
    assert bundle.user_vectors is not None
    assert not canary.exists()


def test_the_vector_server_refuses_a_tampered_version_and_keeps_serving_the_previous(stores, tmp_path, start_server):
    publish_maps(stores)
    items = clustered_items()
    v1 = publish_u2i(stores, items, users(), tower_bytes(items))
    server = start_server(["services.vector_server", "serve", "--poll-s", "0.1"],
                          {"CHANNELS_CONFIG": str(write_config(tmp_path, TW))})
    wait_versions(server.url, {"tw": v1})
    ks = stores.keyspace
    canary = tmp_path / "pwned"

    def tamper(version: str) -> None:  # written, verified, about to flip: an item vector and the tower swapped
        stores("item_emb").set(ks.item_vector("tw", version, 7), pack_vector(-items[7]))
        stores("item_emb").set(ks.user_tower("tw", version), crafted_pickle(canary))

    v2 = publish_u2i(stores, items, users(), tower_bytes(items), before_flip=tamper)
    deadline = time.monotonic() + 30
    while "digest mismatch" not in server.log.read_text():
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.1)
    log_line = next(line for line in server.log.read_text().splitlines() if "digest mismatch" in line)
    assert f"'tw' version {v2}: item_vectors digest mismatch" in log_line and "refused, not loaded" in log_line
    health = httpx.get(server.url + "/healthz").json()
    assert health["channels"]["tw"]["version"] == v1  # never loaded: the previous version serves
    r = post(server.url, {"channel": "tw", "k": 5, "vector": np.eye(D)[2].tolist()})
    assert r.status_code == 200 and r.json()["version"] == v1
    assert 'vector_load_errors_total{channel="tw"}' in httpx.get(server.url + "/metrics").text
    assert not canary.exists()

    v3 = publish_u2i(stores, items, users(), tower_bytes(items))  # the next clean version is served
    wait_versions(server.url, {"tw": v3})


def test_the_recall_server_refuses_a_tampered_list_and_keeps_the_previous(stores, settings, tmp_path):
    cfg = load_config(write_config(tmp_path, {"channels": {"pop": {"kind": "list", "model": "popular"}}}))
    publish_maps(stores)
    ks = stores.keyspace

    def publish_list(ids: list[int], tamper: bool = False) -> str:
        pub = Publisher(stores, "pop")
        v = pub.begin()
        value = pack_neighbors(np.array(ids, np.int32), np.linspace(1, 0.5, len(ids), dtype=np.float32))
        pub.write("lists", [(ks.item_list("pop", v, "global"), value)], artifact="lists")
        before_flip = (lambda: stores("lists").set(ks.item_list("pop", v, "global"), pack_neighbors(
            np.array([9, 9], np.int32), np.ones(2, np.float32)))) if tamper else None
        return pub.commit({"model": "popular", "kinds": ["list"], "lists": ["global"], "stores": {"list": "lists"},
                           "n_items": N_ITEMS}, verify=before_flip)

    async def run() -> None:
        astores = AsyncRedisStores(settings.redis_url, ks)
        state = ServingState(cfg, astores, RETRIEVERS)
        try:
            v1 = publish_list([1, 2, 3])
            await state.sync({"pop": v1, "features": None})
            view = state.snapshot.views["pop"]
            assert view.version == v1 and view.lists["global"][0].tolist() == [1, 2, 3]
            v2 = publish_list([4, 5, 6], tamper=True)
            await state.sync({"pop": v2, "features": None})
            view = state.snapshot.views["pop"]
            assert view.version == v1 and view.lists["global"][0].tolist() == [1, 2, 3]  # v2 refused
            fresh = ServingState(cfg, astores, RETRIEVERS)  # nothing held: the channel says why it cannot answer
            await fresh.sync({"pop": v2, "features": None})
            assert "lists digest mismatch" in fresh.snapshot.views["pop"].unavailable
        finally:
            await astores.close()

    asyncio.run(run())
