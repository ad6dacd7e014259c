"""Airbnb listing embeddings: the global-context (conversion) pairs and the same-market negatives on a toy session
set, negatives never from the pair's own session, cold start by side information, a planted case, bad params."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.channel_config import ChannelSpec, ConfigError, parse_config
from common.ids import IdMap
from tests.channel_contract import ChannelContract
from trainer.channels import registry
from trainer.channels.airbnb import AirbnbChannel
from trainer.channels.neighbors import side_info_neighbors
from trainer.data.sessions import tie_groups
from trainer.data.train_data import TrainData
from trainer.nn.negatives import PowerSampler
from trainer.nn.session_corpus import session_corpus
from trainer.nn.skipgram import draw_negatives, epoch_pairs, sequence_membership

H = 7200  # a gap that starts a new session


def toy_frame() -> pd.DataFrame:
    rows = [  # user, item, t, event
        ("u0", "a1", 0, "click"), ("u0", "a2", 60, "click"), ("u0", "a3", 120, "like"),  # converted on a3
        ("u0", "a4", H, "click"),                                                         # 1 item: dropped
        ("u1", "b1", 0, "click"), ("u1", "b2", 60, "click"),                              # no conversion
        ("u2", "a1", 0, "click"), ("u2", "b1", 60, "like"), ("u2", "a2", 120, "purchase"),
        ("u2", "a5", 180, "click"),                                                       # converted on a2 (last)
        ("u3", "a6", 0, "click"), ("u3", "a7", 60, "click"), ("u3", "b3", 120, "click"), ("u3", "b4", 180, "click"),
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "event"])


def toy_items() -> pd.DataFrame:
    ids = ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "b1", "b2", "b3", "b4"]
    return pd.DataFrame({"market": ["m1" if i[0] == "a" else "m2" for i in ids]}, index=ids)


@pytest.fixture(scope="module")
def data() -> TrainData:
    return TrainData.from_frame(toy_frame(), items=toy_items())


def names(data: TrainData, idx) -> list[str]:
    return [data.item_map.ids[int(i)] for i in np.asarray(idx).ravel()]


def channel(**params) -> AirbnbChannel:
    base = {"dim": 8, "window": 2, "epochs": 2, "num_negatives": 3, "market_negatives": 4, "sample": 0.0,
            "batch_size": 64, "top_k": 10, "conversion_oversample": 1}
    return AirbnbChannel(ChannelSpec(name="airbnb", kind="i2i", model="airbnb", params={**base, **params}))


def test_global_context_pairs_are_the_conversion_for_every_other_session_item(data):
    corpus, extra, stats = session_corpus(data.sessions, data.item_idx, 2, 1, True)
    assert stats == {"sessions": 4, "converted_sessions": 2, "sequences": 4, "tokens": 13, "global_context_pairs": 5}
    got = sorted(zip(names(data, extra.centre), names(data, extra.context), strict=True))
    assert got == sorted([("a1", "a3"), ("a2", "a3"), ("a1", "a2"), ("b1", "a2"), ("a5", "a2")])
    assert "a4" not in names(data, corpus.tokens)  # the one-item session is dropped
    # each pair belongs to its session's sequence in the corpus
    for c, s in zip(extra.centre, extra.seq, strict=True):
        assert c in corpus.tokens[corpus.seq == s]
    # oversampling: each converted session (and its pairs) three times, as separate sequences
    corpus3, extra3, stats3 = session_corpus(data.sessions, data.item_idx, 2, 3, True)
    assert stats3["sequences"] == 2 * 3 + 2 and stats3["global_context_pairs"] == 15 and len(corpus3) == 13 + 2 * 7
    assert sorted(zip(names(data, extra3.centre), names(data, extra3.context), strict=True)) == sorted(got * 3)
    assert len(np.unique(extra3.seq)) == 6
    # off: no extra pairs; and the trainer appends them to every epoch, beyond the window
    assert session_corpus(data.sessions, data.item_idx, 2, 1, False)[1] is None
    ch = channel(window=1, shrink_window=False)
    corpus, extra, pool, cfg = ch.training_setup(data)
    c, o, _ = epoch_pairs(corpus, cfg, np.random.default_rng(0), None, extra)
    tail = sorted(zip(names(data, c[-5:]), names(data, o[-5:]), strict=True))
    assert tail == sorted(got)
    assert ("a1", "a3") not in set(zip(names(data, c[:-5]), names(data, o[:-5]), strict=True))  # outside window 1


def test_shuffled_ties_reorder_only_inside_a_tie_group_and_afresh_per_copy():
    rows = [("u0", "a1", 0, "click"), ("u0", "a2", 60, "click"), ("u0", "a3", 60, "click"),
            ("u0", "a4", 60, "click"), ("u0", "a5", 60, "click"), ("u0", "a6", 120, "like")]
    d = TrainData.from_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "event"]))
    groups = tie_groups(d.user_idx, d.ts)
    orders = set()
    for seed in range(10):
        corpus, extra, stats = session_corpus(d.sessions, d.item_idx, 2, 3, True, groups,
                                              np.random.default_rng(seed))
        assert stats["sequences"] == 3 and len(corpus) == 18
        for s in range(3):
            seq = names(d, corpus.tokens[corpus.seq == s])
            assert seq[0] == "a1" and seq[-1] == "a6" and sorted(seq[1:5]) == ["a2", "a3", "a4", "a5"]
            orders.add(tuple(seq))
        # the global-context pairs do not depend on the order
        assert sorted(names(d, extra.centre)) == sorted(["a1", "a2", "a3", "a4", "a5"] * 3)
    assert len(orders) > 5  # copies and seeds draw different orders of the tie group
    plain, _, _ = session_corpus(d.sessions, d.item_idx, 2, 1, True)
    assert names(d, plain.tokens) == ["a1", "a2", "a3", "a4", "a5", "a6"]
    with pytest.raises(ValueError):
        session_corpus(d.sessions, d.item_idx, 2, 1, True, groups, None)
    ch = channel(ties="shuffle", conversion_oversample=1, market_negatives=0)
    ch.fit(d)
    again = channel(ties="shuffle", conversion_oversample=1, market_negatives=0)
    again.fit(d)
    np.testing.assert_array_equal(ch.item_vectors, again.item_vectors)  # seeded


@pytest.mark.parametrize("negatives", ["per_pair", "shared"])
def test_market_negatives_from_the_centre_market_and_never_from_the_own_session(data, negatives):
    ch = channel(negatives=negatives)
    corpus, extra, pool, cfg = ch.training_setup(data)
    assert ch.market_field == "market" and cfg.num_negatives == 3 and cfg.pool_negatives == 4
    assert cfg.shared_negatives == (negatives == "shared")
    rng = np.random.default_rng(0)
    c, o, s = epoch_pairs(corpus, cfg, rng, None, extra)
    c, o, s = np.tile(c, 200), np.tile(o, 200), np.tile(s, 200)  # many draws
    sampler = PowerSampler(corpus.counts(data.n_items), 0.75)
    drawn = draw_negatives(sampler, c, o, s, cfg, rng, pool, sequence_membership(corpus, data.n_items))
    neg, valid = drawn.columns(), drawn.valid
    assert neg.shape == (len(c), 7)
    market = np.array([x[0] for x in names(data, np.arange(data.n_items))])
    mk = neg[:, 3:]
    assert (market[mk] == market[c][:, None]).all()  # the market part: the centre's market only
    seq_items = {int(q): set(corpus.tokens[corpus.seq == q].tolist()) for q in np.unique(corpus.seq)}
    own = np.array([[int(x) in seq_items[int(q)] for x in row] for row, q in zip(neg, s, strict=True)])
    assert not (own & valid).any()  # no valid negative (random or market) is an item of the pair's session
    assert ((~valid) == (own | (neg == o[:, None]))).all()  # masked exactly there
    assert valid[:, 3:].any() and valid[:, :3].any()
    # the random part reaches the other market; an item never clicked in a session is never drawn
    assert (market[neg[:, :3][valid[:, :3]]] != market[np.repeat(c, 3)[valid[:, :3].ravel()]]).any()
    a4 = data.item_map.get("a4")
    assert not (neg == a4).any()
    if negatives == "shared":  # one random set for the batch, one market set per market: a single matmul
        assert len(drawn.shared) == 3 + 4 * len(np.unique(market[c]))
        assert (neg[:, :3] == neg[0, :3]).all()
        for m in np.unique(market[c]):
            assert (mk[market[c] == m] == mk[market[c] == m][0]).all()


def test_off_switches(data):
    ch = channel(market_negatives=0, conversion_context=False)
    corpus, extra, pool, cfg = ch.training_setup(data)
    assert extra is None and cfg.pool_negatives == 0 and cfg.num_negatives == 3


def test_market_falls_back_to_primary_category():
    items = pd.DataFrame({"genres": ["x|y"] * 6 + ["z"] * 5}, index=toy_items().index)
    d = TrainData.from_frame(toy_frame(), items=items)
    ch = channel()
    ch.training_setup(d)
    assert ch.market_field == "category"


def side_frame() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Planted clusters (4 × 10 items, sessions inside a cluster) with market = cluster and a colour attribute;
    'new' has attributes (market k0, colour red) and no interaction at all."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        t = 0
        for s in range(3):
            c = (u + s) % 4
            for i in rng.choice(10, 4, replace=False) + 10 * c:
                rows.append((f"u{u}", f"i{i:02d}", t, "like" if rng.random() < 0.3 else "click"))
                t += 60
            t += H
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "event"]).drop_duplicates(["user_id", "item_id"])
    ids = [f"i{i:02d}" for i in range(40)] + ["new"]
    colour = ["red" if i % 10 < 3 else "blue" for i in range(40)] + ["red"]
    items = pd.DataFrame({"market": [f"k{i // 10}" for i in range(40)] + ["k0"], "colour": colour}, index=ids)
    return df, items, ids


def test_planted_clusters_and_cold_start_by_side_information():
    df, items, ids = side_frame()
    d = TrainData.from_frame(df, items=items, item_map=IdMap(ids))
    ch = channel(dim=16, window=3, epochs=6, lr=0.02, num_negatives=5, market_negatives=3, cold_k=3)
    ch.fit(d)
    art = ch.artifacts(d)["i2i"]
    cl = np.array([int(x[1:]) // 10 if x != "new" else 0 for x in ids])
    trained = np.flatnonzero(d.item_counts > 0)
    assert (cl[art.neighbors[trained, :3]] == cl[trained, None]).mean() > 0.9
    new = d.item_map.get("new")
    assert list(ch.cold_items) == [new] and ch.valid_items[new]
    # its three nearest by side information: market k0 and red = i00, i01, i02 (all equal: the most clicked first)
    nb, sc = side_info_neighbors(np.where(ch_codes(d) > 0, ch_codes(d), -1), ch_sizes(d), np.array([new]), trained,
                                 d.item_counts, 3)
    assert sorted(names(d, nb[0])) == ["i00", "i01", "i02"] and np.allclose(sc, 1.0)
    np.testing.assert_allclose(ch.item_vectors[new], ch.item_vectors[nb[0]].mean(0), rtol=1e-5)
    assert (art.neighbors[new] >= 0).any()  # it is served: it has a list …
    assert (art.neighbors[trained] == new).any()  # … and can be another item's neighbour
    off = channel(dim=16, window=3, epochs=1, cold_start=False)
    off.fit(d)
    assert not off.valid_items[new] and (off.artifacts(d)["i2i"].neighbors[new] < 0).all()


def ch_codes(d: TrainData) -> np.ndarray:
    from trainer.nn.encoding import encode_attrs
    return encode_attrs(d.item_attrs, d.n_items, multi_valued=True).codes


def ch_sizes(d: TrainData) -> list[int]:
    from trainer.nn.encoding import encode_attrs
    return encode_attrs(d.item_attrs, d.n_items, multi_valued=True).sizes


def test_side_info_neighbors_ties_and_no_overlap():
    codes = np.array([[[1]], [[1]], [[1]], [[2]], [[1]]])  # one column; items 0, 1, 2, 4 share value 1
    nb, sc = side_info_neighbors(codes, [3], np.array([4, 3]), np.array([0, 1, 2, 3]), np.array([1, 5, 5, 9, 0]), 2)
    assert nb[0].tolist() == [1, 2]  # equal similarity: more clicks, then the lower index
    assert nb[1].tolist() == [3, -1]  # item 3 only matches itself among the candidates


def test_deterministic(data):
    a, b = channel(), channel()
    a.fit(data)
    b.fit(data)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)


@pytest.mark.parametrize("key,value", [("market_negatives", -1), ("conversion_oversample", 0), ("window", 0),
                                       ("min_session_len", 1), ("negative", 5), ("cold_k", 0)])
def test_bad_params_fail_at_load_naming_channel_and_key(key, value):
    raw = {"channels": {"air": {"kind": "i2i", "model": "airbnb", "weight": 1.0, "quota": 100,
                                "params": {key: value}}}}
    cfg = parse_config(raw, "test.yaml")
    with pytest.raises(ConfigError) as err:
        registry.validate_params(cfg, "test.yaml")
    assert "channel 'air'" in str(err.value) and f"params.{key}" in str(err.value)


class TestAirbnbContractSmall(ChannelContract):
    """The contract with this model's own small settings (the generic run is in test_channel_contract)."""

    model = "airbnb"
    params = {"dim": 8, "window": 3, "epochs": 2, "num_negatives": 3, "market_negatives": 2, "batch_size": 256,
              "top_k": 20}
