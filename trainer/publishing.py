"""Writes a fitted channel's artifacts to Redis (through the keyspace) and the artifacts dir, atomically."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.channel_config import ChannelSpec
from common.keyspace import DEFAULT_NN_STORE_BY_MODEL, pack_neighbors, pack_vector, unpack_neighbors
from common.publish import Publisher
from common.redis_conn import RedisStores
from trainer.channels.base import Artifacts, ListArtifact, NeighborArtifact, VectorArtifact
from trainer.data.train_data import TrainData


def nn_store(spec: ChannelSpec, kind: str) -> str:
    """Redis store for a channel's neighbour lists: config `store`, else the model default, else other_nn."""
    if spec.store:
        return spec.store
    store = DEFAULT_NN_STORE_BY_MODEL.get(spec.model or "", "other_nn")
    if kind == "u2u" and store != "usercf_u2u":
        return "other_nn"
    if kind == "i2i" and store == "usercf_u2u":
        return "other_nn"
    return store


def _rows(art: NeighborArtifact):
    for r in range(art.neighbors.shape[0]):
        nb = art.neighbors[r]
        keep = nb >= 0
        if keep.any():
            yield r, nb[keep], art.scores[r][keep]


def publish_channel(stores: RedisStores, spec: ChannelSpec, artifacts: Artifacts, data: TrainData,
                    artifacts_dir: str | Path, extra: dict[str, Any] | None = None, progress: bool = True,
                    **publisher_kwargs) -> str:
    """Publish every artifact of one trained channel as a new version and flip `current`."""
    ks, name = stores.keyspace, spec.name
    pub = Publisher(stores, name, archive_root=artifacts_dir, **publisher_kwargs)
    ver = pub.begin()
    out_dir = pub.archive_dir  # also holds every key written (common/archive.py): `trainer republish` replays it
    manifest: dict[str, Any] = {"model": spec.model, "kinds": sorted(artifacts), "n_items": data.n_items,
                                "n_users": data.n_users, "params": spec.params, "counts": {}, "stores": {},
                                **(extra or {})}
    written: list[tuple[str, str]] = []  # (store, key) samples to verify

    def bar(total: int, what: str):
        return tqdm(total=total, desc=f"publish {name} {what}", unit="key", disable=not progress, leave=False)

    for kind, art in artifacts.items():
        if isinstance(art, NeighborArtifact):
            store = nn_store(spec, kind)
            if kind == "i2i":
                keyf = lambda r, store=store: ks.i2i(store, name, ver, r)  # noqa: E731
            else:
                keyf = lambda r, store=store: ks.u2u(store, name, ver, data.user_map.ids[r])  # noqa: E731
            with bar(art.neighbors.shape[0], kind) as b:
                items = ((keyf(r), pack_neighbors(ids, sc)) for r, ids, sc in _rows(art))
                n = pub.write(store, items, progress=b.update, artifact=kind)
            written += [(store, keyf(r)) for r, *_ in list(_rows(art))[:50]]
            manifest["counts"][kind] = n
            manifest["stores"][kind] = store
            manifest[f"{kind}_k"] = int(art.neighbors.shape[1])
        elif isinstance(art, VectorArtifact):
            d = int(art.item_vectors.shape[1])
            # K interests per user: the user key holds K·d floats, row-major (K = 1: d floats, as always); rows
            # past the user's interest count are zero (docs/vector_server.md, "K vectors per user")
            user_vecs = art.published_user_vectors()
            with bar(len(art.item_vectors) + len(user_vecs), "vectors") as b:
                # digests in index order: what the vector server recomputes when it loads the version
                n_i = pub.write("item_emb", ((ks.item_vector(name, ver, i), pack_vector(v))
                                             for i, v in enumerate(art.item_vectors)), progress=b.update,
                                artifact="item_vectors")
                n_u = pub.write("user_emb", ((ks.user_vector(name, ver, data.user_map.ids[u]), pack_vector(v))
                                             for u, v in enumerate(user_vecs)), progress=b.update,
                                artifact="user_vectors")
            np.save(out_dir / "item_vectors.npy", art.item_vectors.astype(np.float32))
            np.save(out_dir / "user_vectors.npy", user_vecs)
            if art.user_tower is not None:
                pub.write("item_emb", [(ks.user_tower(name, ver), art.user_tower)], artifact="user_tower")
                (out_dir / "user_tower.pt").write_bytes(art.user_tower)
            manifest.update(dim=d, n_interests=art.n_interests, metric=art.metric,
                            has_user_tower=art.user_tower is not None, user_tower_meta=art.user_tower_meta)
            if art.checkpoint is not None:  # what `python -m trainer incremental` warm-starts from (disk only)
                (out_dir / "checkpoint.pt").write_bytes(art.checkpoint)
                manifest["has_checkpoint"] = True
            manifest["counts"]["item_vectors"], manifest["counts"]["user_vectors"] = n_i, n_u
            if user_vecs.ndim == 3:
                live = (user_vecs != 0).any(axis=2)
                np.save(out_dir / "interest_counts.npy", live.sum(axis=1).astype(np.int32))
                manifest["counts"]["interests"] = int(live.sum())
            manifest["stores"][kind] = "item_emb"
            written += [("item_emb", ks.item_vector(name, ver, i)) for i in range(min(50, n_i))]
        elif isinstance(art, ListArtifact):
            # sorted by name, the order of manifest["lists"] in which the recall server checks the digest
            n = pub.write("lists", ((ks.item_list(name, ver, ln), pack_neighbors(*art.lists[ln]))
                                    for ln in sorted(art.lists)), artifact="lists")
            manifest["counts"]["lists"] = n
            manifest["lists"] = sorted(art.lists)
            manifest["stores"][kind] = "lists"
            written += [("lists", ks.item_list(name, ver, ln)) for ln in list(art.lists)[:50]]
        else:
            raise TypeError(f"channel {name!r}: unknown artifact type {type(art).__name__} for kind {kind!r}")

    data.item_map.save(out_dir / "item_ids.json")
    data.user_map.save(out_dir / "user_ids.json")
    manifest["artifacts_dir"] = str(out_dir.resolve())

    def verify() -> None:
        sample = random.Random(0).sample(written, min(20, len(written)))
        for store, key in sample:
            value = stores(store).get(key)
            if value is None:
                raise RuntimeError(f"key {key!r} missing in store {store!r}")
            if store != "item_emb" and store != "user_emb" and len(unpack_neighbors(value)[0]) == 0:
                raise RuntimeError(f"key {key!r} holds an empty list")

    (out_dir / "manifest.json").write_text(json.dumps({**manifest, "version": ver}, indent=1, default=str))
    return pub.commit(manifest, verify=verify)
