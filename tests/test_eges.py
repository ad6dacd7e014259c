"""EGES channel: the session graph, the side-information aggregation (EGES / GES / BGE), every embedding table
trained, neighbours on planted sessions, and item cold start end to end (nightly → Redis → keyspace → i2i)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from common.channel_config import ChannelSpec, ConfigError, load_config, parse_config
from common.ids import IdMap, load_id_map, sort_ids
from common.keyspace import unpack_neighbors
from common.publish import current_version
from common.retrieval import retrieve_i2i
from trainer.channels import registry
from trainer.channels.eges import EGESChannel, SideInfoEmbedding
from trainer.data.train_data import TrainData
from trainer.graph.session_graph import session_graph, transition_edges, window_edges
from trainer.nn.side_info import encode_side_info, side_info_frame
from trainer.publishing import nn_store

N_CAT, PER_CAT = 4, 10
COLD = ["i40", "i41"]  # registered with attributes (category 1, category 3), never interacted with
# 8 shared negatives: the default 64 exceeds this 42-item catalog (most draws would be same-category items)
FAST = {"dim": 16, "walks_per_node": 8, "walk_length": 10, "window": 3, "epochs": 3, "batch_size": 512,
        "sample": 0.0, "lr": 0.02, "top_k": 10, "num_negatives": 8}


def planted_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """80 users × 3 sessions (2 h apart) of 6 items of one category each, a minute apart; items have a category
    and a brand (two brands per category); the cold items have attributes only."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(80):
        t = 1_700_000_000 + 100_000 * u
        for s in range(3):
            c = (u + s) % N_CAT
            for i in rng.choice(PER_CAT, size=6, replace=False) + c * PER_CAT:
                rows.append((f"u{u:02d}", f"i{i:02d}", t))
                t += 60
            t += 7200
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    n = N_CAT * PER_CAT
    items = pd.DataFrame({"category": [f"c{i // PER_CAT}" for i in range(n)] + ["c1", "c3"],
                          "brand": [f"b{i // 5}" for i in range(n)] + ["b2", "b7"]},
                         index=pd.Index([f"i{i:02d}" for i in range(n)] + COLD, name="item_id"))
    return inter, items


def category(data: TrainData, idx: np.ndarray) -> np.ndarray:
    return data.item_field("category")[np.asarray(idx)]


@pytest.fixture(scope="module")
def data() -> TrainData:
    """The planted log, with the cold items registered in the item id map (as the nightly's map holds them)."""
    inter, items = planted_frames()
    return TrainData.from_frame(inter, None, items, item_map=IdMap(sort_ids(items.index)))


def build(**params) -> EGESChannel:
    return EGESChannel(ChannelSpec(name="eges", kind="i2i", model="eges", params={**FAST, **params}), seed=42)


@pytest.fixture(scope="module")
def fitted(data) -> EGESChannel:
    ch = build()
    ch.fit(data)
    return ch


def test_session_graph_is_directed_weighted_and_cut_at_30_minutes():
    inter = pd.DataFrame({"user_id": ["a"] * 4 + ["b"] * 3 + ["c"] * 2,
                          "item_id": ["x", "y", "z", "w", "x", "y", "w", "x", "y"],
                          "timestamp": [0, 60, 1860, 3661, 0, 10, 20, 0, 5000]})
    # a: x→y (60 s), y→z (1800 s: same session), z→w (1801 s: a new session, no edge); b: x→y, y→w; c: none
    data = TrainData.from_frame(inter)
    ix = {name: data.item_map.get(name) for name in "wxyz"}

    def edges(gap):
        g = session_graph(data, gap).to_scipy().toarray()
        return {(a, b): g[ix[a], ix[b]] for a in "wxyz" for b in "wxyz" if g[ix[a], ix[b]] > 0}

    assert edges(1800) == {("x", "y"): 2.0, ("y", "z"): 1.0, ("y", "w"): 1.0}  # directed: no y→x
    assert edges(None) == {("x", "y"): 3.0, ("y", "z"): 1.0, ("z", "w"): 1.0, ("y", "w"): 1.0}


def test_unordered_ties_link_whole_tie_groups_with_the_weight_of_the_transitions_they_replace():
    # one session: p | q r s (same second) | t u (same second) | v — then a new session (gap > 30 min): w
    user = np.zeros(8, np.int32)
    item = np.arange(8)  # p q r s t u v w
    ts = np.array([0, 10, 10, 10, 20, 20, 30, 5000])
    edges = {m: {(int(a), int(b)): float(w) for a, b, w in zip(*transition_edges(user, item, ts, 1800, m),
                                                                 strict=True)}
             for m in ("ordered", "unordered")}
    assert edges["ordered"] == {(k, k + 1): 1.0 for k in range(6)}  # log order (item id) inside a tie
    got = edges["unordered"]
    expect = {(0, 1): 1 / 3, (0, 2): 1 / 3, (0, 3): 1 / 3}  # p → every item of {q, r, s}: one transition
    expect |= {(a, b): 1 / 3 for a in (1, 2, 3) for b in (1, 2, 3) if a != b}  # inside: 2 transitions, both ways
    expect |= {(a, b): 1 / 6 for a in (1, 2, 3) for b in (4, 5)}  # {q, r, s} → {t, u}: one transition
    expect |= {(4, 5): 1 / 2, (5, 4): 1 / 2, (4, 6): 1 / 2, (5, 6): 1 / 2}  # inside {t, u}; {t, u} → v
    assert got.keys() == expect.keys()
    for k, w in expect.items():
        assert got[k] == pytest.approx(w)
    assert sum(got.values()) == pytest.approx(6.0)  # = the 6 transitions of the session; none to w
    # without ties both modes agree; the graph builds with either
    flat = np.arange(8) * 10
    assert edges["ordered"] == {(int(a), int(b)): float(w)
                                for a, b, w in zip(*transition_edges(user, item, flat[:7].tolist() + [5000], 1800,
                                                                     "unordered"), strict=True)}
    data = TrainData.from_frame(pd.DataFrame({"user_id": ["a"] * 4, "item_id": list("wxyz"),
                                              "timestamp": [0, 5, 5, 9]}))
    g = session_graph(data, 1800, "unordered").to_scipy().toarray()
    ix = {name: data.item_map.get(name) for name in "wxyz"}
    assert g[ix["w"], ix["x"]] == g[ix["w"], ix["y"]] == 0.5 and g[ix["x"], ix["y"]] == g[ix["y"], ix["x"]] == 0.5
    assert g[ix["x"], ix["z"]] == g[ix["y"], ix["z"]] == 0.5


def test_side_info_frame_turns_dates_into_years_and_keeps_category_brand_market():
    attrs = pd.DataFrame({"title": ["Toy Story (1995)", "Heat (1995)"], "release_date": ["01-Jan-1995", "15-Dec-1995"],
                          "genres": ["Animation|Comedy", "Action"], "brand": ["b1", "b2"]})
    frame, categorical = side_info_frame(attrs)
    assert frame["release_date"].tolist() == [1995, 1995] and frame["title"].tolist() == attrs["title"].tolist()
    assert set(categorical) == {"release_date", "genres", "brand"}
    assert side_info_frame(attrs, ["genres"])[0].columns.tolist() == ["genres"]
    with pytest.raises(ValueError, match="nope"):
        side_info_frame(attrs, ["nope"])


def test_aggregations_follow_the_paper():
    torch.manual_seed(0)
    codes = [np.array([[1], [2], [0]]), np.array([[1, 2], [2, -1], [-1, -1]])]  # a category and a bag
    m = SideInfoEmbedding(3, 4, codes, [3, 3], "eges")
    with torch.no_grad():
        m.attn.weight.copy_(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    ids = torch.arange(3)
    w0, w1, w2 = m.id_emb.weight, m.fields[0].weight, m.fields[1].weight
    stack = torch.stack([w0[ids], w1[[1, 2, 0]], torch.stack([(w2[1] + w2[2]) / 2, w2[2], torch.zeros(4)])], 1)
    a = torch.softmax(m.attn.weight, -1)
    torch.testing.assert_close(m(ids), (a.unsqueeze(-1) * stack).sum(1))  # H_v = Σ_j softmax(a_v)_j W_j(v)
    m.aggregation = "ges"
    torch.testing.assert_close(m(ids), stack.mean(1))
    m.aggregation = "bge"
    torch.testing.assert_close(m(ids), w0)
    # cold start: the mean over fields with a known value (code > 0); item 2 knows none → no vector
    cv, has = m.cold_vectors(ids)
    assert has.tolist() == [True, True, False]
    torch.testing.assert_close(cv[0], (w1[1] + (w2[1] + w2[2]) / 2) / 2)
    torch.testing.assert_close(cv[1], (w1[2] + w2[2]) / 2)


def test_every_embedding_table_is_registered_and_trained(data, fitted):
    # the reference DGL example keeps its tables in a plain list, so Adam never sees them: ours are submodules
    names = {n for n, _ in fitted.skipgram.model.named_parameters()}
    assert names == {"centre.id_emb.weight", "centre.fields.0.weight", "centre.fields.1.weight",
                     "centre.attn.weight", "context.weight"}
    enc = encode_side_info(data)
    assert enc.columns == ["category", "brand"] == fitted.side_info_columns
    torch.manual_seed(42)  # the centre is the first module built under the run's seed
    p = fitted.params
    init = SideInfoEmbedding(data.n_items, FAST["dim"], [f.codes for f in enc.fields], enc.sizes, "eges",
                             id_prior=p.id_prior, attn_scale=p.attn_scale)
    warm = torch.as_tensor(np.flatnonzero(fitted.warm_items))
    trained = fitted.centre
    assert not torch.equal(trained.id_emb.weight[warm], init.id_emb.weight[warm])
    assert (trained.id_emb.weight[warm] != init.id_emb.weight[warm]).any(1).all()  # every walked item's row
    for j in range(2):
        assert not torch.equal(trained.fields[j].weight, init.fields[j].weight)
    assert (trained.attn.weight[warm] != init.attn.weight[warm]).any(1).all()  # a_v learned for every walked item
    assert (fitted.skipgram.model.context.weight[warm] != 0).any(1).all()


def test_neighbours_come_from_the_item_category(data, fitted):
    art = fitted.artifacts(data)["i2i"]
    warm = np.flatnonzero(fitted.warm_items)
    assert len(warm) == N_CAT * PER_CAT and art.neighbors.shape == (data.n_items, 10)
    nb = art.neighbors[warm, :5]
    assert (nb >= 0).all() and not (nb == warm[:, None]).any()
    assert (category(data, nb) == category(data, warm)[:, None]).mean() > 0.9  # chance ≈ 0.23
    w = fitted.field_weights(warm)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["ges", "bge"])
def test_variants_fit_and_bge_has_no_cold_start(data, aggregation):
    ch = build(aggregation=aggregation, epochs=1, walks_per_node=2)
    ch.fit(data)
    cold = data.item_map.lookup(COLD)
    assert ch.valid_items[cold].all() == (aggregation == "ges")
    if aggregation == "bge":
        assert ch.side_info_columns == [] and not ch.cold_items.any()


def test_cold_item_gets_the_mean_of_its_side_info_embeddings_only(data, fitted):
    cold = data.item_map.lookup(COLD)
    assert fitted.cold_items[cold].all() and fitted.valid_items[cold].all() and not fitted.warm_items[cold].any()
    c = fitted.centre
    cat = torch.as_tensor(c.codes_0[cold, 0])
    brand = torch.as_tensor(c.codes_1[cold, 0])
    expect = (c.fields[0].weight[cat] + c.fields[1].weight[brand]) / 2
    np.testing.assert_allclose(fitted.item_vectors[cold], expect.detach().numpy(), rtol=1e-5, atol=1e-7)
    # the id table and a_v are never read for a cold item: changing them changes nothing
    with torch.no_grad():
        saved_id, saved_a = c.id_emb.weight.clone(), c.attn.weight.clone()
        c.id_emb.weight.normal_()
        c.attn.weight.normal_()
        again, has = c.cold_vectors(torch.as_tensor(cold))
        c.id_emb.weight.copy_(saved_id)
        c.attn.weight.copy_(saved_a)
    assert has.all()
    np.testing.assert_allclose(again.numpy(), fitted.item_vectors[cold], rtol=1e-6)


def test_cold_items_are_recallable_through_the_i2i_lists(data, fitted):
    art = fitted.artifacts(data)["i2i"]
    cold = data.item_map.lookup(COLD)
    for item in cold:
        own = category(data, art.neighbors[item][:5])
        assert (own == category(data, [item])[0]).mean() >= 0.8  # its neighbours are its category's items
        same = np.flatnonzero((category(data, np.arange(data.n_items)) == category(data, [item])[0])
                              & fitted.warm_items)
        others = np.flatnonzero((category(data, np.arange(data.n_items)) != category(data, [item])[0])
                                & fitted.warm_items)
        in_same = (art.neighbors[same] == item).any(1).mean()
        in_others = (art.neighbors[others, :5] == item).any(1).mean()
        assert in_same >= 0.8 and in_others <= 0.1  # in its category's lists, never near the top of others'
    # a user whose recent items are of category 1 is served the cold category-1 item by the i2i retriever
    anchors = np.flatnonzero((category(data, np.arange(data.n_items)) == 1) & fitted.warm_items)[:5]
    ids, _ = retrieve_i2i([(art.neighbors[i], art.scores[i]) for i in anchors], 20, 0.9, 20, anchors)
    assert cold[0] in ids.tolist() and cold[1] not in ids.tolist()


def test_bad_params_fail_at_load_naming_channel_and_key(tmp_path):
    for params, key in [({"aggregation": "attention"}, "params.aggregation"), ({"walk_length": 1}, "params.walk_length"),
                        ({"windw": 3}, "params.windw"), ({"dim": 0}, "params.dim")]:
        raw = {"channels": {"my_eges": {"kind": "i2i", "model": "eges", "params": params}}}
        with pytest.raises(ConfigError) as err:
            registry.validate_params(parse_config(raw, "t.yaml"), "t.yaml")
        assert "channel 'my_eges'" in str(err.value) and f"key '{key}'" in str(err.value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"channels": {"e": {"kind": "u2i", "model": "eges"}}}))
    with pytest.raises(ConfigError, match="channel 'e', key 'kind'"):
        registry.validate_params(load_config(path), str(path))


def test_untrained_side_info_values_are_left_out_of_a_cold_vector():
    # a cold item whose brand no walked item has: that brand's row never trained, so only the category counts
    codes = [np.array([[1], [1], [1]]), np.array([[1], [1], [2]])]
    m = SideInfoEmbedding(3, 4, codes, [2, 3], "eges")
    m.mark_trained(torch.tensor([0, 1]))
    cv, has = m.cold_vectors(torch.tensor([2]))
    assert has.all()
    torch.testing.assert_close(cv[0], m.fields[0].weight[1])


def test_edge_window_links_items_up_to_k_positions_apart_inside_a_session():
    # one user: p q r s in one session, then t after a 30-minute gap
    user, item, ts = np.zeros(5, np.int32), np.arange(5), np.array([0, 10, 20, 30, 5000])
    got = {(int(a), int(b)) for a, b, _ in zip(*window_edges(user, item, ts, 1800, 2), strict=True)}
    assert got == {(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)}  # 1 and 2 steps ahead; never across the gap
    one = {(int(a), int(b)) for a, b, _ in zip(*window_edges(user, item, ts, 1800, 1), strict=True)}
    assert one == {(int(a), int(b)) for a, b, _ in zip(*transition_edges(user, item, ts, 1800), strict=True)}
    data = TrainData.from_frame(pd.DataFrame({"user_id": ["a"] * 4 + ["b"] * 2, "item_id": list("wxyzwy"),
                                              "timestamp": [0, 1, 2, 3, 0, 1]}))
    g = session_graph(data, 1800, edge_window=2).to_scipy().toarray()
    ix = [data.item_map.get(name) for name in "wxyz"]
    assert g[np.ix_(ix, ix)].tolist() == [[0, 1, 2, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]  # w→y twice
    with pytest.raises(ValueError, match="ordered"):
        session_graph(data, 1800, "unordered", edge_window=2)


def test_field_dropout_and_attn_scale_shape_the_field_weights_only_while_training():
    codes = [np.array([[1], [2], [1]]), np.array([[1], [1], [2]])]
    m = SideInfoEmbedding(3, 4, codes, [3, 3], "eges", id_prior=2.0, attn_scale=0.1, field_dropout=0.9)
    ids = torch.arange(3)
    a = m.logits(ids)
    torch.testing.assert_close(a, torch.tensor([[2.0, 0.0, 0.0]] * 3))  # the id prior survives the scale
    m.eval()  # no dropout at inference: H_v = Σ_j softmax(a_v)_j W_j(v)
    w = torch.softmax(a, -1).unsqueeze(-1)
    stack = torch.stack([m.id_emb.weight[ids], m.fields[0].weight[[1, 2, 1]], m.fields[1].weight[[1, 1, 2]]], 1)
    torch.testing.assert_close(m(ids), (w * stack).sum(1))
    m.train()
    torch.manual_seed(0)
    many = torch.zeros(2000, dtype=torch.int64)
    out = m(many)  # dropped fields leave the softmax: a row keeps the id and the fields that survived
    only_id = torch.isclose(out, m.id_emb.weight[0].expand_as(out)).all(1)
    assert 0.7 < only_id.float().mean() < 0.9  # both fields dropped: 0.81
    with torch.no_grad():
        m.attn.weight[:, 1] += 1.0
        assert m.logits(ids)[0, 1].item() == pytest.approx(0.1)  # a step on b_v moves a_v by attn_scale


def test_item_registered_over_http_is_recalled_after_the_nightly(settings, stores, tmp_path, start_server):
    """End to end over HTTP: two items unknown to the data (no events, not in items.csv) are registered with their
    attributes at the feature server; the nightly fits EGES and publishes; their lists and their places in other
    items' lists are read back through the keyspace, and the recall server serves the category-1 one to a new
    user who just clicked category-1 items."""
    import httpx

    from trainer.nightly import run_nightly

    inter, items = planted_frames()
    d = tmp_path / "data"
    d.mkdir()
    inter.to_csv(d / "interactions.csv", index=False)
    items.drop(COLD).reset_index().to_csv(d / "items.csv", index=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(yaml.safe_dump({"channels": {"eges": {"kind": "i2i", "model": "eges", "quota": 20,
                                                         "params": FAST}}}))
    feature = start_server(["services.feature_server", "serve"])
    fs = httpx.Client(base_url=feature.url, timeout=10.0)
    r = fs.post("/items", json=[{"item_id": "i40", "attrs": {}}])
    assert r.status_code == 422 and "items[0].attrs" in r.text
    assert fs.post("/items", json={"item_id": "i40", "attrs": {"category": "c1"}, "x": 1}).status_code == 422
    assert fs.get("/items/i40").status_code == 404
    reg = [{"item_id": c, "attrs": dict(items.loc[c])} for c in COLD]
    assert fs.post("/items", json=reg).json() == {"registered": 2}
    assert fs.get("/items/i40").json()["attrs"] == {"category": "c1", "brand": "b2"}

    summary = run_nightly(settings, d, cfg, progress=False)
    assert summary["status"] == "ok", summary["failed"]
    assert summary["counts"]["registered_items"] == 2 and summary["channels"]["eges"]["metrics"]["n_cold"] == 2
    rec = fs.get("/items/i41").json()
    assert rec["category"] == "c3" and rec["clicks"] == 0 and rec["registered"]
    item_map = load_id_map(stores, "item")
    ver, ks = current_version(stores, "eges"), stores.keyspace
    store = nn_store(load_config(cfg).get("eges"), "i2i")
    raw = stores(store).mget([ks.i2i(store, "eges", ver, i) for i in range(len(item_map))])
    lists = {item_map.ids[i]: unpack_neighbors(v)[0] for i, v in enumerate(raw) if v is not None}
    cat = dict(zip(items.index, items["category"], strict=True))
    for cold in COLD:
        assert np.mean([cat[item_map.ids[j]] == cat[cold] for j in lists[cold][:5]]) >= 0.8
        idx = item_map.get(cold)
        own = [k for k in lists if cat[k] == cat[cold] and k != cold]
        assert np.mean([idx in lists[k].tolist() for k in own]) >= 0.8  # in its category's lists
        assert not [k for k, v in lists.items() if cat[k] != cat[cold] and idx in v[:5].tolist()]

    recall = start_server(["services.recall_server", "serve"], {"CHANNELS_CONFIG": str(cfg),
                                                                "FEATURE_URL": feature.url})
    assert fs.post("/events", json=[{"user_id": "fan", "item_id": i} for i in ("i10", "i11", "i12")]).json() == \
        {"accepted": 3}
    body = httpx.get(recall.url + "/recall", params={"user_id": "fan", "k": 20}, timeout=10.0).json()
    assert body["channels"]["eges"]["status"] == "ok"
    got = [it["item_id"] for it in body["items"]]
    assert "i40" in got and "i41" not in got
    fs.close()


def test_scale_rule_bounds_walk_tokens_and_keeps_small_logs_unchanged():
    """max_examples bounds epochs × walk tokens: whole epochs where one fits; above that, max_examples //
    walk_length walks that start at every node once before any twice. Small logs are untouched."""
    from trainer.budget import walk_starts

    rng = np.random.default_rng(0)
    nodes = np.arange(10, 20)
    np.testing.assert_array_equal(walk_starts(nodes, 3, 5, None, rng), np.repeat(nodes, 3))
    np.testing.assert_array_equal(walk_starts(nodes, 3, 5, 150, rng), np.repeat(nodes, 3))  # 10·3·5 = 150 fits
    s = walk_starts(nodes, 3, 5, 70, rng)  # 14 walks: every node once, then 4 of them a second time
    assert len(s) == 14 and set(s[:10]) == set(nodes.tolist()) and len(set(s[10:])) == 4
    assert len(walk_starts(nodes, 3, 5, 1, rng)) == 1  # never less than one walk


def test_scale_rule_in_the_fit(data):
    full = build(walks_per_node=2, walk_length=10, epochs=4, max_examples=None)
    full.fit(data)
    tokens = full.metrics["n_tokens"]
    assert full.metrics["epochs"] == 4 and tokens <= full.metrics["n_walks"] * 10
    half = build(walks_per_node=2, walk_length=10, epochs=4, max_examples=2 * tokens)
    half.fit(data)
    assert half.metrics["epochs"] == 2 and half.metrics["n_walks"] == full.metrics["n_walks"]
    tiny = build(walks_per_node=2, walk_length=10, epochs=4, max_examples=tokens // 4)
    tiny.fit(data)
    assert tiny.metrics["n_walks"] == tokens // 4 // 10
    assert tiny.metrics["epochs"] * tiny.metrics["n_tokens"] <= tokens // 4
