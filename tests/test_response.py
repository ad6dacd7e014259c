"""The /recall `items` array written by the compiled kernel parses to what the dict path produced."""

from __future__ import annotations

import numpy as np
import orjson

from services.recall_server.response import item_fragments, items_json


def test_items_json_equals_the_dicts_it_replaces():
    rng = np.random.default_rng(3)
    ext = [f"item-{i}" for i in range(500)] + ['quote"d', "back\\slash", "ünï", "tab\there", "7"]
    arr = np.empty(len(ext), dtype=object)
    arr[:] = ext
    frags = item_fragments(ext)
    for trial in range(300):
        n = int(rng.integers(0, 40))
        ids = rng.choice(len(ext), n, replace=False).astype(np.int64)
        scale = [1e-7, 1e-3, 1.0, 50.0, 1e5][trial % 5]
        scores = (rng.standard_normal(n) * scale).astype(np.float32)
        if n and trial % 7 == 0:
            scores[0] = 0.0
        got = orjson.loads(orjson.dumps({"items": items_json(frags, arr, ids, scores)}))["items"]
        want = [{"item_id": i, "score": s} for i, s in
                zip(arr[ids].tolist(), np.round(scores.astype(np.float64), 6).tolist(), strict=True)]
        assert got == want


def test_scores_the_kernel_does_not_write_fall_back_to_orjson():
    frags = item_fragments(["a", "b"])
    arr = np.array(["a", "b"], dtype=object)
    out = orjson.loads(orjson.dumps(items_json(frags, arr, np.array([1, 0]), np.array([np.nan, 2e12], np.float32))))
    assert out == [{"item_id": "b", "score": None}, {"item_id": "a", "score": 1999999991808.0}]
    assert orjson.loads(orjson.dumps(items_json(frags, arr, np.array([], np.int64), np.array([], np.float32)))) == []
