"""The kit's attribute encoder: the towers' codes and vocabularies exactly, FM's rules, the vocab contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer.nn.encoding import (
    RARE,
    TOWER,
    AttrEncoding,
    EncodeOptions,
    encode_attrs,
    encode_column,
    fm_options,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"

try:  # the two-tower channel's original encoder, while it exists: the kit must give exactly its output
    from trainer.channels._tower_model import encode_attrs as original_encode_attrs
except ImportError:  # ported: the snapshot digests below still pin the output
    original_encode_attrs = None


def digest(enc: AttrEncoding) -> str:
    """Columns, sizes, vocabularies (with their order) and codes, hashed."""
    h = hashlib.sha256()
    h.update(json.dumps([enc.columns, enc.sizes, [[c, list(v.items())] for c, v in enc.vocab.items()]]).encode())
    codes = np.ascontiguousarray(enc.codes, np.int64)
    h.update(repr(codes.shape).encode())
    h.update(codes.tobytes())
    return h.hexdigest()[:16]


def synthetic(seed: int, n: int) -> pd.DataFrame:
    """Every kind of column: few/many-level integers, floats, strings with spaces, bags, ids, bools, missing."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "i_few": rng.integers(0, 5, n), "i_many": rng.integers(0, 100, n), "f": rng.normal(size=n).round(1),
        "few_f": rng.choice([0.5, 1.5, 2.25], n), "s": rng.choice(list("abcdefg") + ["x y", " z"], n),
        "bag": ["|".join(rng.choice(list("pqrst"), int(rng.integers(0, 4)))) for _ in range(n)],
        "idlike": [f"id{i}" for i in range(n)], "b": rng.random(n) < 0.3,
        "nan_f": np.where(rng.random(n) < 0.4, np.nan, rng.normal(size=n)),
        "i_na": pd.array(np.where(rng.random(n) < 0.3, None, rng.integers(0, 8, n)), dtype="Int64"),
        "s_na": pd.array(np.where(rng.random(n) < 0.3, None, rng.choice(list("uvw"), n)), dtype="string"),
    }, index=rng.permutation(n))


SYNTHETIC_OPTIONS = [
    {"multi_valued": False},
    {"multi_valued": True, "numeric_buckets": 4, "min_count": 1},
    {"multi_valued": True, "max_vocab": 3, "max_numeric_values": 20, "categorical": ("i_many",), "min_coverage": 0.2},
]
# digests of the two-tower encoder's output (trainer/channels/_tower_model.py encode_attrs, 2026-12)
SNAPSHOT = {
    (0, 200, 0): "15e689d23f56b750", (0, 200, 1): "561e2d8bb02ff41a", (0, 200, 2): "fc2290bcf8dcbdb3",
    (1, 57, 0): "2aa5cbb561a786c4", (1, 57, 1): "e8d694a8f0708e06", (1, 57, 2): "11a02b9376d79094",
    "ml100k_users": "5bfd7bd9fe6ecfd8", "ml100k_items": "7186d91c409f4461",
}


def same(a: AttrEncoding, b: AttrEncoding) -> None:
    assert a.columns == b.columns
    assert [list(v.items()) for v in a.vocab.values()] == [list(v.items()) for v in b.vocab.values()]
    assert a.sizes == b.sizes
    assert a.codes.dtype == b.codes.dtype and a.codes.shape == b.codes.shape
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("seed,n", [(0, 200), (1, 57)])
@pytest.mark.parametrize("opt", range(len(SYNTHETIC_OPTIONS)))
def test_tower_encoding_reproduces_the_two_tower_encoder_on_synthetic_frames(seed, n, opt):
    df, kw = synthetic(seed, n), SYNTHETIC_OPTIONS[opt]
    enc = encode_attrs(df, n, **kw)
    assert digest(enc) == SNAPSHOT[(seed, n, opt)]
    if original_encode_attrs is not None:
        same(enc, original_encode_attrs(df, n, **kw))


@pytest.mark.skipif(not (SHARED_DATA / "interactions.csv").exists(), reason="ml-100k not available")
def test_tower_encoding_reproduces_the_two_tower_encoder_on_ml100k():
    from trainer.data.io import load_dataset
    from trainer.data.train_data import TrainData

    ds = load_dataset(SHARED_DATA)
    data = TrainData.from_frame(ds.interactions, ds.users, ds.items)
    # exactly the two-tower channel's calls
    users = encode_attrs(data.user_attrs, data.n_users, multi_valued=False, max_numeric_values=2000)
    items = encode_attrs(data.item_attrs, data.n_items, multi_valued=True, categorical=(data.category_column,))
    assert users.columns == ["age", "gender", "occupation"]  # zip: id-like
    assert items.columns == ["release_date", "genres"]  # title, imdb_url: id-like
    assert digest(users) == SNAPSHOT["ml100k_users"] and digest(items) == SNAPSHOT["ml100k_items"]
    if original_encode_attrs is not None:
        same(users, original_encode_attrs(data.user_attrs, data.n_users, multi_valued=False, max_numeric_values=2000))
        same(items, original_encode_attrs(data.item_attrs, data.n_items, multi_valued=True,
                                          categorical=(data.category_column,)))


def test_tower_vocab_buckets_bags_and_id_like_columns():
    users = pd.DataFrame({"age": [20 + u % 7 for u in range(80)], "gender": ["M" if u % 2 else "F" for u in range(80)],
                          "zip": [f"z{u}" for u in range(80)]}, index=[f"u{u}" for u in range(80)])
    enc = encode_attrs(users, 80)
    assert enc.columns == ["age", "gender"]  # zip is unique per user → dropped
    # an integer category: both spellings of a value map to its code (request-time values come either way)
    assert enc.vocab["age"]["24"] == enc.vocab["age"]["24.0"] == enc.codes[4, 0, 0] > 0
    assert set(enc.vocab["gender"]) == {"M", "F"} and enc.sizes == [8, 3]
    items = pd.DataFrame({"genres": ["a|b" if i % 3 == 0 else "b" for i in range(30)]})
    ienc = encode_attrs(items, 30, multi_valued=True)
    a, b = ienc.vocab["genres"]["a"], ienc.vocab["genres"]["b"]
    assert b == 1 and a == 2  # most frequent first
    assert ienc.codes[0, 0].tolist() == [a, b] and ienc.codes[1, 0].tolist() == [b, -1]
    np.testing.assert_allclose(ienc.fields[0].weights()[:2], [[0.5, 0.5], [1.0, 0.0]])
    # numbers: quantile buckets, and every observed value's spellings in the vocab
    nenc = encode_attrs(pd.DataFrame({"x": np.arange(100.0)}), 100, numeric_buckets=4)
    assert sorted(set(nenc.codes[:, 0, 0].tolist())) == [1, 2, 3, 4]
    assert nenc.vocab["x"]["0"] == nenc.vocab["x"]["0.0"] == 1 and nenc.vocab["x"]["99"] == 4
    assert encode_attrs(None, 5).codes.shape == (5, 0, 1)


def test_rare_bucket_missing_values_and_max_vocab():
    s = pd.Series(["a", "a", "b", "b", "b", "c", None, ""], dtype="string")
    tower = encode_column("x", s, options=TOWER)
    assert tower.vocab == {"b": 1, "a": 2} and tower.labels == [RARE, "b", "a"]
    assert tower.codes[:, 0].tolist() == [2, 2, 1, 1, 1, 0, 0, 0]  # rare 'c' and missing → 0 (unknown)
    fm = encode_column("x", s, options=fm_options(min_count=2))
    assert fm.labels == [RARE, "a", "b"]  # sorted
    assert fm.codes[:, 0].tolist() == [1, 1, 2, 2, 2, 0, -1, -1]  # missing → no feature, rare → 0
    top1 = encode_column("x", s, options=EncodeOptions(max_vocab=1, min_coverage=None))
    assert top1.vocab == {"b": 1}


def test_fm_options():
    ages = pd.Series(np.arange(100, dtype=float))
    fc = encode_column("age", ages, options=fm_options(n_bins=4))
    assert fc.size == 5 and fc.codes.shape == (100, 1)
    assert (np.bincount(fc.codes[:, 0])[1:] == 25).all()  # quantile bins
    assert encode_column("title", pd.Series([f"t{i}" for i in range(50)]), options=fm_options()) is None  # id-like
    g = encode_column("genres", pd.Series(["x|y", "y", "x|y|z", "z"]), True, fm_options(min_count=1))
    assert g.labels == [RARE, "x", "y", "z"] and g.kind == "bag"
    assert np.allclose(g.weights().sum(1), 1.0)
    assert sorted(g.codes[2].tolist()) == [1, 2, 3] and np.allclose(g.weights()[2], 1 / 3)
    # a value seen once: a rare bin / value (FM), its own code (towers)
    few = pd.Series([0.5, 0.5, 1.5, 2.5, 2.5])
    assert encode_column("f", few, options=fm_options()).codes[:, 0].tolist() == [1, 1, 0, 3, 3]
    assert encode_column("f", few).codes[:, 0].tolist() == [1, 1, 2, 3, 3]
