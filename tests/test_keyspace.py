"""common/keyspace.py: encodings, DB layout, prefix mode, store overrides, version patterns (also on real Redis)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np
import pytest

from common.keyspace import (
    DEFAULT_STORES,
    FEATURES_CHANNEL,
    Keyspace,
    pack_json,
    pack_neighbors,
    pack_vector,
    unpack_json,
    unpack_neighbors,
    unpack_vector,
)
from common.redis_conn import RedisStores
from common.settings import Settings


def test_neighbors_round_trip():
    ids = np.array([7, 3, 2**31 - 1, 0])
    scores = np.array([0.9, 0.5, -1.25, 1e-8])
    got_ids, got_scores = unpack_neighbors(pack_neighbors(ids, scores))
    assert got_ids.dtype == np.int32 and got_scores.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores.astype(np.float32))
    assert len(pack_neighbors(ids, scores)) == 8 * len(ids)
    for empty in (None, b""):
        i, s = unpack_neighbors(empty)
        assert i.shape == s.shape == (0,)
    with pytest.raises(ValueError):
        pack_neighbors(np.arange(3), np.ones(2))


def test_vector_and_json_round_trip():
    v = np.array([0.5, -2.0, 3.25], dtype=np.float64)
    out = unpack_vector(pack_vector(v))
    assert out.dtype == np.float32 and out.tolist() == [0.5, -2.0, 3.25]
    assert unpack_vector(None) is None
    rec = {"user_id": "u1", "recent": [["i1", 10]], "vec": np.array([1, 2]), "none": None, "uni": "é"}
    assert unpack_json(pack_json(rec)) == {**rec, "vec": [1, 2]}
    assert unpack_json(None) is None


def test_default_db_layout():
    ks = Keyspace()
    expected = {"meta": 0, "user_features": 1, "item_features": 2, "mf_i2i": 3, "itemcf_i2i": 4, "usercf_u2u": 5,
                "fm_i2i": 6, "item_emb": 7, "user_emb": 8}
    assert {s: ks.db(s) for s in expected} == expected
    assert ks.all_dbs() == sorted(set(DEFAULT_STORES.values()))
    assert Keyspace.from_settings(Settings()).stores == DEFAULT_STORES
    with pytest.raises(KeyError, match="nope"):
        ks.db("nope")
    # db mode: keys carry no store prefix (the DB number says where they are)
    assert ks.user_features("v1", "42") == f"uf:{FEATURES_CHANNEL}:v1:42"
    assert ks.current("mf") == "current:mf"


def test_prefix_mode():
    ks = Keyspace(mode="prefix", prefix="rec")
    assert {ks.db(s) for s in DEFAULT_STORES} == {0} and ks.all_dbs() == [0]
    assert ks.user_features("v1", "42") == f"rec:user_features:uf:{FEATURES_CHANNEL}:v1:{{u:42}}"
    assert ks.i2i("itemcf_i2i", "itemcf", "v1", 5) == "rec:itemcf_i2i:i2i:itemcf:v1:5"
    assert ks.current("mf") == "rec:{meta}:current:mf"
    ks2 = Keyspace.from_settings(Settings(redis_key_mode="prefix", redis_prefix="x"))
    assert ks2.realtime_recent("u") == "x:user_features:rt:recent:{u:u}" and ks2.db("item_emb") == 0
    assert not ks2.cluster and ks.layout == 2 and Keyspace().layout == 1


def test_prefix_mode_hash_tags_keep_what_is_read_together_in_one_slot():
    """Redis Cluster: a user's keys share a slot, an item's too, every meta key one slot, the event log with its
    offsets and event-id markers one slot; untagged artifacts spread over all slots; db mode has no tags."""
    from redis.crc import key_slot

    def slots(keys) -> set[int]:
        return {key_slot(k.encode()) for k in keys}

    ks = Keyspace(mode="prefix", cluster=True)
    for user in ("42", "}odd{", "a:b"):
        assert len(slots([ks.user_features("v1", user), ks.realtime_recent(user), ks.realtime_counters(user),
                          ks.u2u("usercf_u2u", "usercf", "v2", user), ks.user_vector("mf", "v3", user)])) == 1
    assert len(slots([ks.item_features("v1", "9"), ks.realtime_item_clicks("9")])) == 1
    assert len(slots([ks.current("a"), ks.current("b"), ks.manifest("a", "v"), ks.versions("a"), ks.retired("b"),
                      ks.pending("a"), ks.pending_owner("a"), ks.channels_index(), ks.id_map("item"),
                      ks.id_map_len("user"), ks.job_lock(), ks.run_lease("r1")])) == 1
    assert len(slots([ks.event_log(), ks.event_log_offsets(), ks.realtime_event_id("e1")])) == 1
    assert len(slots([ks.i2i("itemcf_i2i", "itemcf", "v1", i) for i in range(100)])) > 90
    assert len(slots([ks.user_features("v1", str(u)) for u in range(100)])) > 90
    db = Keyspace()
    assert "{" not in db.user_features("v1", "42") + db.event_log() + db.current("mf") + db.realtime_event_id("e")
    with pytest.raises(ValueError, match="prefix"):
        Keyspace(mode="db", cluster=True)
    with pytest.raises(ValueError, match="braces"):
        Keyspace(mode="prefix", prefix="a{b}")
    with pytest.raises(ValueError, match="REDIS_KEY_MODE=prefix"):
        Settings(redis_cluster=True)
    assert Keyspace.from_settings(Settings(redis_cluster=True, redis_key_mode="prefix")).cluster


def test_store_override_through_settings(monkeypatch):
    ks = Keyspace.from_settings(Settings(redis_stores={"item_emb": 11}))
    assert ks.db("item_emb") == 11 and ks.db("user_emb") == 8 and ks.db("user_features") == 1
    monkeypatch.setenv("REDIS_STORES", '{"user_features": 12, "lists": 13}')
    ks = Keyspace.from_settings(Settings())
    assert (ks.db("user_features"), ks.db("lists"), ks.db("item_features")) == (12, 13, 2)
    assert 12 in ks.all_dbs() and 1 not in ks.all_dbs()


def versioned_keys(ks: Keyspace, channel: str, version: str) -> list[tuple[str, str]]:
    """(store, key) from every key method that takes a version."""
    keys = [("itemcf_i2i", ks.i2i("itemcf_i2i", channel, version, 17)),
            ("usercf_u2u", ks.u2u("usercf_u2u", channel, version, "u:1")),
            ("item_emb", ks.item_vector(channel, version, 3)),
            ("user_emb", ks.user_vector(channel, version, "u1")),
            ("item_emb", ks.user_tower(channel, version)),
            ("lists", ks.item_list(channel, version, "cat:news"))]
    if channel == FEATURES_CHANNEL:
        keys += [("user_features", ks.user_features(version, "u1")), ("item_features", ks.item_features(version, "i9"))]
    return keys


@pytest.mark.parametrize("mode", ["db", "prefix"])
def test_every_versioned_key_has_the_documented_shape(mode):
    ks = Keyspace(mode=mode, prefix="mr")
    for channel in ("itemcf", FEATURES_CHANNEL):
        for store, key in versioned_keys(ks, channel, "20260101T000000000-abcd"):
            body = key.removeprefix(f"mr:{store}:") if mode == "prefix" else key
            if mode == "prefix":
                assert key.startswith(f"mr:{store}:"), key
            kind, ch, ver, *rest = body.split(":")
            assert (ch, ver) == (channel, "20260101T000000000-abcd") and kind and rest, key
            assert fnmatchcase(key, ks.version_pattern(store, channel, "20260101T000000000-abcd")), key
            assert not fnmatchcase(key, ks.version_pattern(store, channel, "20260101T000000000-ffff")), key
            assert not fnmatchcase(key, ks.version_pattern(store, channel + "x", "20260101T000000000-abcd")), key


@pytest.mark.parametrize("mode", ["db", "prefix"])
def test_version_pattern_scans_exactly_one_version_in_real_redis(redis_url, mode):
    stores = RedisStores(redis_url, Keyspace(mode=mode))
    ks = stores.keyspace
    try:
        for channel in ("itemcf", FEATURES_CHANNEL):
            for version in ("v1", "v2"):
                for store, key in versioned_keys(ks, channel, version):
                    stores(store).set(key, b"1")
        stores("user_features").set(ks.realtime_recent("u1"), b"rt")
        for store, key in versioned_keys(ks, FEATURES_CHANNEL, "v1"):
            found = {k.decode() for k in stores(store).scan_iter(match=ks.version_pattern(store, FEATURES_CHANNEL, "v1"))}
            expected = {k for s, k in versioned_keys(ks, FEATURES_CHANNEL, "v1") if ks.db(s) == ks.db(store)
                        and (mode == "db" or k.startswith(f"mr:{store}:"))}
            assert key in found and found == expected, (store, found)
    finally:
        stores.close()
