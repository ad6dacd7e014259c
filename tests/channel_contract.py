"""The channel contract as a reusable mixin, in the spirit of implicit's RecommenderBaseTestMixin.

A model's tests reuse it with a few lines:

    class TestMyModelContract(ChannelContract):
        model = "my_model"              # registry name (or set `channel_class` for a class outside the registry)
        params = {"dim": 8, "epochs": 2}  # small, fast settings; None = the generic SMALL_HINTS that fit
        approx = None                   # None: two seeded fits are bit-identical; else the allowed abs tolerance

and gets, on a small planted log: fit → artifacts of the declared kinds and shapes → publish into a real Redis →
read back through the keyspace (current → manifest → keys) equal to the in-memory artifacts → answer a known
user (non-empty, no seen items) and a cold user (no crash; list channels still answer) → deterministic with the
seed → a second publish flips `current` atomically, the first stays readable until GC.
tests/test_channel_contract.py runs it for every model the registry finds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from common.channel_config import ChannelSpec, ServeParams
from common.ids import IdMap, sort_ids
from common.keyspace import unpack_json, unpack_neighbors, unpack_vector
from common.publish import collect_garbage, current_version, read_manifest
from trainer.channels import registry
from trainer.channels.base import Channel, ListArtifact, NeighborArtifact, VectorArtifact
from trainer.data.train_data import TrainData
from trainer.publishing import nn_store, publish_channel

# Small, fast settings, applied to any model whose Params has a field of that name (and accepts the value),
# when a contract class gives no `params`.
SMALL_HINTS = {"dim": 8, "emb_dim": 8, "hidden": [16], "epochs": 2, "num_negatives": 8,
               "num_threads": 1, "workers": 1, "top_k": 20, "u2u_top_k": 20}

N_USERS, N_ITEMS, N_CLUSTERS = 60, 40, 4
COLD = "zz_cold"  # a registered user without any interaction
KNOWN = "u00"


def small_params(cls: type[Channel]) -> dict:
    """The SMALL_HINTS that `cls.Params` accepts (renamed old names skipped)."""
    params: dict = {}
    for key, value in SMALL_HINTS.items():
        if key in cls.Params.model_fields and key not in cls.renamed:
            try:
                cls.Params(**{**params, key: value})
            except ValidationError:
                continue
            params[key] = value
    return params


def planted_data() -> TrainData:
    """60 users in 4 clusters; each clicks 7 items of its cluster's 10 plus 1 other, a minute apart."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        c = u % N_CLUSTERS
        own = rng.choice(10, size=7, replace=False) + 10 * c
        other = rng.choice(np.flatnonzero(np.arange(N_ITEMS) // 10 != c), size=1)
        for p, i in enumerate(rng.permutation(np.concatenate([own, other]))):
            rows.append((f"u{u:02d}", f"i{i:02d}", 1_700_000_000 + 1000 * u + 60 * p, float(rng.integers(1, 6)),
                         ["app", "web"][p % 2], f"r{c}"))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "environment", "region"])
    user_ids = [f"u{u:02d}" for u in range(N_USERS)] + [COLD]
    users = pd.DataFrame({"age": [20 + u % 40 for u in range(N_USERS + 1)],
                          "gender": ["M", "F"] * ((N_USERS + 1) // 2) + ["M"],
                          "region": [f"r{u % N_CLUSTERS}" for u in range(N_USERS + 1)]}, index=user_ids)
    items = pd.DataFrame({"category": [f"c{i // 10}" for i in range(N_ITEMS)],
                          "created_at_ts": [1_690_000_000 + 3600 * i for i in range(N_ITEMS)]},
                         index=[f"i{i:02d}" for i in range(N_ITEMS)])
    return TrainData.from_frame(df, users, items, user_map=IdMap(sort_ids(user_ids)))


def check_readback(stores, spec: ChannelSpec, ver: str, arts, data: TrainData) -> None:
    """Every published key decodes to exactly the in-memory artifact."""
    ks, name = stores.keyspace, spec.name
    manifest = read_manifest(stores, name, ver)
    assert manifest is not None and manifest["version"] == ver
    assert manifest["kinds"] == sorted(arts)
    for kind, art in arts.items():
        store = manifest["stores"][kind]
        if isinstance(art, NeighborArtifact):
            assert store == nn_store(spec, kind)
            client, n_rows, n_keys = stores(store), art.neighbors.shape[0], 0
            keys = [ks.i2i(store, name, ver, r) if kind == "i2i" else ks.u2u(store, name, ver, data.user_map.ids[r])
                    for r in range(n_rows)]
            for r, value in enumerate(client.mget(keys)):
                keep = art.neighbors[r] >= 0
                if not keep.any():
                    assert value is None
                    continue
                n_keys += 1
                ids, sc = unpack_neighbors(value)
                np.testing.assert_array_equal(ids, art.neighbors[r][keep])
                np.testing.assert_array_equal(sc, art.scores[r][keep].astype(np.float32))
            assert manifest["counts"][kind] == n_keys > 0
        elif isinstance(art, VectorArtifact):
            assert manifest["n_interests"] == art.n_interests
            items = stores("item_emb").mget([ks.item_vector(name, ver, i) for i in range(data.n_items)])
            users = stores("user_emb").mget([ks.user_vector(name, ver, u) for u in data.user_map.ids])
            np.testing.assert_array_equal(np.stack([unpack_vector(v) for v in items]),
                                          art.item_vectors.astype(np.float32))
            # K·d floats per user key, row-major (K = 1: the d floats of a 2-D artifact)
            np.testing.assert_array_equal(np.stack([unpack_vector(v) for v in users]),
                                          art.published_user_vectors().reshape(data.n_users, -1))
            if art.user_tower is not None:
                assert stores("item_emb").get(ks.user_tower(name, ver)) == art.user_tower
        else:
            assert manifest["lists"] == sorted(art.lists)
            for ln, (ids, sc) in art.lists.items():
                got_ids, got_sc = unpack_neighbors(stores("lists").get(ks.item_list(name, ver, ln)))
                np.testing.assert_array_equal(got_ids, ids)
                np.testing.assert_array_equal(got_sc, np.asarray(sc, np.float32))


def serve_for(art, kind: str) -> ServeParams:
    if kind == "list":
        return ServeParams(lists=["global"] if "global" in art.lists else [sorted(art.lists)[0]])
    return ServeParams(recent_n=5, per_anchor=20, neighbor_items=10)


class ChannelContract:
    """Mixin: the shared assertions every channel model must pass (subclass with `model` and `params`)."""

    model: ClassVar[str]
    params: ClassVar[dict[str, Any] | None] = None  # None: small_params(the class)
    approx: ClassVar[float | None] = None  # None: two fits with the same seed are bit-identical
    channel_class: ClassVar[type[Channel] | None] = None  # None: the registry's class of `model`

    @classmethod
    def cls(cls) -> type[Channel]:
        return cls.channel_class or registry.models()[cls.model]

    @classmethod
    def build(cls, seed: int = 42) -> Channel:
        ch_cls = cls.cls()
        params = small_params(ch_cls) if cls.params is None else dict(cls.params)
        spec = ChannelSpec(name=f"c_{cls.model}"[:40], kind=ch_cls.kinds[0], model=cls.model, params=params)
        return ch_cls(spec, seed=seed)

    @pytest.fixture(scope="class")
    @classmethod
    def data(cls) -> TrainData:
        return planted_data()

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, data) -> tuple[Channel, Channel]:
        """Two independent fits with seed 42."""
        out = []
        for _ in range(2):
            ch = cls.build(seed=42)
            ch.fit(data)
            out.append(ch)
        return out[0], out[1]

    def test_params_forbid_unknown_keys(self):
        cls = self.cls()
        assert cls.kinds and set(cls.kinds) <= {"i2i", "u2u", "u2i", "list"}
        cls.Params(**(small_params(cls) if self.params is None else self.params))
        with pytest.raises(ValidationError):
            cls.Params(no_such_param_xyz=1)

    def test_artifacts_have_the_declared_kinds_and_shapes(self, data, fitted):
        ch = fitted[0]
        arts = ch.artifacts(data)
        assert set(arts) == set(type(ch).kinds)
        for kind, art in arts.items():
            if kind in ("i2i", "u2u"):
                assert isinstance(art, NeighborArtifact)
                n = data.n_items if kind == "i2i" else data.n_users
                assert art.neighbors.shape[0] == n and art.neighbors.shape == art.scores.shape
                nb, sc = art.neighbors, art.scores
                assert ((nb >= -1) & (nb < n)).all()
                assert (nb >= 0).any()
                valid = nb >= 0
                assert not (~valid[:, :-1] & valid[:, 1:]).any(), "-1 padding must be trailing"
                assert not (nb == np.arange(n)[:, None]).any(), "an entity is not its own neighbour"
                both = valid[:, 1:] & valid[:, :-1]
                assert (sc[:, 1:][both] <= sc[:, :-1][both] + 1e-6).all(), "scores sorted descending"
                for r in range(n):  # no duplicate neighbours
                    row = nb[r][nb[r] >= 0]
                    assert len(np.unique(row)) == len(row)
            elif kind == "u2i":
                assert isinstance(art, VectorArtifact)
                uv = art.user_vectors
                assert art.item_vectors.shape[0] == data.n_items and uv.shape[0] == data.n_users
                assert uv.ndim in (2, 3) and art.item_vectors.shape[1] == uv.shape[-1]
                assert np.isfinite(art.item_vectors).all() and np.isfinite(uv).all()
                if art.interest_counts is not None:
                    assert uv.ndim == 3 and art.interest_counts.shape == (data.n_users,)
                    assert ((art.interest_counts >= 0) & (art.interest_counts <= art.n_interests)).all()
            else:
                assert isinstance(art, ListArtifact) and art.lists
                for ids, sc in art.lists.values():
                    assert len(ids) == len(sc) > 0 and ((ids >= 0) & (ids < data.n_items)).all()
                    assert len(np.unique(ids)) == len(ids)

    def test_publish_and_read_back_through_the_keyspace(self, data, fitted, stores, settings):
        ch = fitted[0]
        arts = ch.artifacts(data)
        ver = publish_channel(stores, ch.spec, arts, data, settings.artifacts_dir, progress=False)
        assert current_version(stores, ch.spec.name) == ver
        assert unpack_json(stores("meta").get(stores.keyspace.manifest(ch.spec.name, ver)))["model"] == self.model
        assert (settings.artifacts_dir / ch.spec.name / ver / "manifest.json").exists()
        check_readback(stores, ch.spec, ver, arts, data)

    def test_answers_known_and_cold_users(self, data, fitted):
        ch = fitted[0]
        known, cold = data.user_map.get(KNOWN), data.user_map.get(COLD)
        assert len(data.history(cold)[0]) == 0
        seen = set(data.history(known)[0].tolist())
        for kind, art in ch.artifacts(data).items():
            serve = serve_for(art, kind)
            (ids, scores), = ch.recommend(data, np.array([known]), k=10, kind=kind, serve=serve)
            assert len(ids) > 0, f"{self.model}/{kind}: no answer for a known user"
            assert not seen & set(ids.tolist()), f"{self.model}/{kind}: recommended seen items"
            assert len(set(ids.tolist())) == len(ids) and ((ids >= 0) & (ids < data.n_items)).all()
            assert (np.diff(scores) <= 1e-6).all()
            (cids, _), = ch.recommend(data, np.array([cold]), k=10, kind=kind, serve=serve)
            assert len(set(cids.tolist())) == len(cids) and ((cids >= 0) & (cids < data.n_items)).all()
            if kind == "list":
                assert len(cids) == min(10, len(art.lists[serve.lists[0]][0])), "list channels answer cold users"
            elif kind == "i2i":
                assert len(cids) == 0  # no history, no anchors
            # u2u/u2i may answer a cold user (e.g. from attributes) or not; either way without crashing

    def test_deterministic_with_seed(self, data, fitted):
        first, second = fitted[0].artifacts(data), fitted[1].artifacts(data)
        tol = self.approx
        assert set(first) == set(second)

        def same(a, b):
            if tol is None:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, atol=tol)

        for kind, a in first.items():
            b = second[kind]
            if isinstance(a, NeighborArtifact):
                if tol is None:
                    np.testing.assert_array_equal(a.neighbors, b.neighbors)
                same(a.scores, b.scores)
            elif isinstance(a, VectorArtifact):
                same(a.item_vectors, b.item_vectors)
                same(a.user_vectors, b.user_vectors)
            else:
                assert a.lists.keys() == b.lists.keys()
                for ln in a.lists:
                    np.testing.assert_array_equal(a.lists[ln][0], b.lists[ln][0])
                    same(a.lists[ln][1], b.lists[ln][1])

    def test_second_publish_flips_current_and_first_stays_until_gc(self, data, fitted, stores, settings):
        ch = fitted[0]
        arts, name = ch.artifacts(data), ch.spec.name
        v1 = publish_channel(stores, ch.spec, arts, data, settings.artifacts_dir, progress=False)
        v2 = publish_channel(stores, ch.spec, arts, data, settings.artifacts_dir, progress=False)
        assert v1 != v2 and v2 > v1
        assert current_version(stores, name) == v2
        check_readback(stores, ch.spec, v1, arts, data)  # still fully readable in its grace period
        check_readback(stores, ch.spec, v2, arts, data)
        assert collect_garbage(stores, name, grace_s=0, keep=1) == [v1]
        assert read_manifest(stores, name, v1) is None
        for store in read_manifest(stores, name, v2)["stores_used"]:
            pattern = stores.keyspace.version_pattern(store, name, v1)
            assert not list(stores(store).scan_iter(match=pattern)), f"{store} still holds {v1} keys"
        assert current_version(stores, name) == v2
        check_readback(stores, ch.spec, v2, arts, data)
