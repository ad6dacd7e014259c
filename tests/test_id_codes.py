"""The integer-code path of TrainData.from_frame and the feature build (ids factorized once at load) gives what the
general path (dedupe_pairs → order_interactions → IdMap.extend/lookup on the id strings) gives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.ids import IdMap
from trainer.data.io import load_dataset
from trainer.data.split import dedupe_pairs, order_interactions
from trainer.data.train_data import TrainData
from trainer.feature_build import compute_item_features, compute_user_features


def _write(tmp_path, n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.array(["7", "07", "12", "3", "100", "8", "9", "1e1"], dtype=object)  # "7"/"07" tie numerically
    items = np.array([f"{k}" for k in range(40)] + ["040", "5.0"], dtype=object)  # "40"/"040", "5"/"5.0" tie
    df = pd.DataFrame({"user_id": rng.choice(users, n), "item_id": rng.choice(items, n),
                       "timestamp": rng.integers(1000, 1060, n),  # many equal timestamps and repeated pairs
                       "environment": rng.choice(["a", "b", ""], n), "region": rng.integers(0, 3, n)})
    df.to_parquet(tmp_path / "interactions.parquet", index=False)  # (a CSV would read "07" as the number 7)
    pd.DataFrame({"item_id": items, "genres": [f"g{k % 4}|x" for k in range(len(items))]}).to_parquet(
        tmp_path / "items.parquet", index=False)
    return load_dataset(tmp_path)


def _reference(df: pd.DataFrame, user_map: IdMap, item_map: IdMap):
    ded = order_interactions(dedupe_pairs(df))
    um, im = IdMap(user_map.ids), IdMap(item_map.ids)
    um.extend(ded["user_id"])
    im.extend(ded["item_id"])
    u, i = um.lookup(ded["user_id"]), im.lookup(ded["item_id"])
    order = np.lexsort((np.arange(len(ded)), u))
    return um.ids, im.ids, u[order], i[order], ded["timestamp"].to_numpy()[order], ded["environment"].to_numpy()[order]


def _check(td: TrainData, ref) -> None:
    assert td.user_map.ids == ref[0] and td.item_map.ids == ref[1]
    np.testing.assert_array_equal(td.user_idx, ref[2])
    np.testing.assert_array_equal(td.item_idx, ref[3])
    np.testing.assert_array_equal(td.ts, ref[4])
    assert td.context["environment"].tolist() == [str(x) for x in ref[5]]


def test_code_path_matches_the_string_path(tmp_path):
    ds = _write(tmp_path)
    maps = IdMap(["ghost", "12", "07"]), IdMap(["39", "x"])
    td = TrainData.from_frame(ds.interactions, ds.users, ds.items, *maps)
    _check(td, _reference(ds.interactions, *maps))
    assert td.user_map.ids[:3] == ["ghost", "12", "07"]  # append-only
    # "7" and "07" tie as numbers: their order is their first appearance in the ordered rows, as sort_ids has it
    assert {"7", "07"} <= set(td.user_map.ids)


def test_a_frame_written_in_place_is_not_served_from_the_load_time_codes(tmp_path):
    ds = _write(tmp_path, seed=1)
    TrainData.from_frame(ds.interactions)  # computes (and keeps) the codes and the ordered rows
    ds.interactions.loc[0, "user_id"] = "brand-new"
    ds.interactions.loc[1, "timestamp"] = 5
    td = TrainData.from_frame(ds.interactions)
    _check(td, _reference(ds.interactions, IdMap(), IdMap()))
    assert "brand-new" in td.user_map


def test_features_on_codes_match_the_general_path(tmp_path):
    ds = _write(tmp_path, seed=2)
    general = ds.interactions.assign(timestamp=ds.interactions["timestamp"].astype(np.float64))  # no code path
    other = type(ds)(interactions=general, users=ds.users, items=ds.items, name=ds.name)
    fast_u, slow_u = compute_user_features(ds), compute_user_features(other)
    assert list(fast_u.records()) == list(slow_u.records())
    assert [r for _, r in fast_u.records()] == [fast_u.record(u) for u in range(len(fast_u))]
    assert list(compute_item_features(ds).records()) == list(compute_item_features(other).records())
