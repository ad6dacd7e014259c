"""NeuralCF / NeuMF: the fused GMF + MLP score, pre-training initialisation, two-stage serving (GMF first stage by
faiss, NeuMF rescoring), the exported module, request-time inputs and parameter validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from common.channel_config import ChannelSpec, ConfigError, load_config
from common.towers import encode_user_inputs
from common.towers.neural_cf import NeuMFTower
from common.towers.rescore import RescoreSettings, rescore, rescore_settings, two_stage
from services.vector_server.index import load_bundle, load_tower
from trainer.channels import registry
from trainer.channels.base import served_rescorer
from trainer.channels.neural_cf import NeuralCFChannel
from trainer.data.train_data import TrainData
from trainer.nn.negatives import PowerSampler, pointwise_examples
from trainer.nn.neumf import init_from_pretrained
from trainer.publishing import publish_channel

N_CLUSTERS, PER_CLUSTER, N_USERS, CLICKS = 4, 25, 80, 8
FAST = {"dim": 8, "mlp_layers": 2, "epochs": 10, "batch_size": 128, "lr": 0.03, "recent_n": 5, "pretrain": False}


def planted() -> pd.DataFrame:
    """Users of cluster c click CLICKS random items of cluster c (items c*25 … c*25+24), one per minute."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        c = u % N_CLUSTERS
        items = rng.choice(PER_CLUSTER, size=CLICKS, replace=False) + c * PER_CLUSTER
        rows += [(f"u{u}", f"i{i}", 1_000_000 + 60 * t) for t, i in enumerate(items)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


@pytest.fixture(scope="module")
def data() -> TrainData:
    from common.ids import IdMap

    return TrainData.from_frame(planted(), user_map=IdMap(["cold"]))  # a registered user without clicks


@pytest.fixture(scope="module")
def fitted(data) -> NeuralCFChannel:
    return fitted_or_fit(data, {})


def fit(data: TrainData, **params) -> NeuralCFChannel:
    ch = NeuralCFChannel(ChannelSpec(name="ncf", kind="u2i", model="neural_cf", params={**FAST, **params}))
    ch.fit(data)
    return ch


_CACHE: dict[str, NeuralCFChannel] = {}


def fitted_or_fit(data: TrainData, params: dict) -> NeuralCFChannel:
    key = json.dumps(params, sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = fit(data, **params)
    return _CACHE[key]


def cluster_of(data: TrainData, idx: np.ndarray) -> np.ndarray:
    ext = np.asarray(data.item_map.ids, dtype=object)[np.asarray(idx)]
    return np.array([int(s[1:]) // PER_CLUSTER for s in ext])


def user_cluster(data: TrainData, u: int) -> int:
    return int(data.user_map.ids[u][1:]) % N_CLUSTERS


def items_of(data: TrainData, cluster: int, n: int) -> list[int]:
    return [i for i in range(data.n_items) if cluster_of(data, [i])[0] == cluster][:n]


def query(module: torch.nn.Module, meta: dict, u: int, recent: list[int] | np.ndarray) -> np.ndarray:
    x = encode_user_inputs(meta, u, None, recent)
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in x))[0].numpy()


# -- the model: GMF ⊕ MLP, separate embeddings, the halving tower --------------------------------------------


def test_score_is_neumf_and_the_first_stage_is_its_gmf_part():
    """ŷ = hᵀ[p ⊙ q ; MLP([p' ; q'])] + b from the raw weights; <query, item vector> is exactly the GMF part."""
    torch.manual_seed(0)
    net = NeuMFTower(n_users=5, n_items=7, dim=4, mlp_dim=8, hidden=[8, 4], recent_n=3)
    for emb in (net.gmf_user, net.gmf_item, net.gmf_hist, net.mlp_user, net.mlp_item, net.mlp_hist):
        torch.nn.init.normal_(emb.weight, std=0.5)
    with torch.no_grad():
        net.gmf_hist.weight[7].zero_()
        net.mlp_hist.weight[7].zero_()
    assert net.gmf_user.weight.data_ptr() != net.mlp_user.weight.data_ptr()  # separate embeddings
    assert [m.out_features for m in net.tower if isinstance(m, torch.nn.Linear)] == [8, 4]  # halving: 16 → 8 → 4
    user, recent, items = torch.tensor([2]), torch.tensor([[1, 4, 7]]), torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        got = net.score(user, torch.zeros((1, 1), dtype=torch.int64), recent, None, items)[0].numpy()
        q = net(user, torch.zeros((1, 1), dtype=torch.int64), recent)[0].numpy()
        iv = net.item_vectors().numpy()
    w = {k: v.numpy() for k, v in net.state_dict().items()}
    p = w["gmf_user.weight"][2] + w["gmf_hist.weight"][[1, 4]].mean(0)  # padding (7) left out of the mean
    pm = w["mlp_user.weight"][2] + w["mlp_hist.weight"][[1, 4]].mean(0)
    h, b = w["predict.weight"][0], w["predict.bias"][0]
    for i in range(7):
        z = np.concatenate([pm, w["mlp_item.weight"][i]])
        z = np.maximum(z @ w["tower.0.weight"].T + w["tower.0.bias"], 0)
        z = np.maximum(z @ w["tower.2.weight"].T + w["tower.2.bias"], 0)
        gmf = p * w["gmf_item.weight"][i]
        np.testing.assert_allclose(got[i], h @ np.concatenate([gmf, z]) + b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(q @ iv[i], h[:4] @ gmf, rtol=1e-5, atol=1e-6)
    assert q.shape == (4 + 8,) and iv.shape == (7, 12) and not iv[:, 4:].any()
    np.testing.assert_allclose(net.numpy_rescorer()(q, np.arange(7)), got, rtol=1e-5, atol=1e-5)  # served in numpy
    for gmf, mlp in ((True, False), (False, True)):  # the parts alone (pre-training, variants) in numpy too
        part = NeuMFTower(n_users=5, n_items=7, dim=4, mlp_dim=8, hidden=[8, 4], recent_n=3, gmf=gmf, mlp=mlp)
        for prm in part.parameters():
            torch.nn.init.normal_(prm, std=0.5)
        with torch.no_grad():
            qp = part(user, torch.zeros((1, 1), dtype=torch.int64), recent)
            want = part.rescore(qp, torch.tensor([[0, 3, 6, 9]]))[0].numpy()  # 9: out of range → padding row
        np.testing.assert_allclose(part.numpy_rescorer()(qp[0].numpy(), np.array([0, 3, 6, 9])), want, rtol=1e-5,
                                   atol=1e-5)


def test_pretrained_init_mixes_the_output_layers_with_alpha(data):
    """h = [α h_GMF ; (1−α) h_MLP] (not RecBole's plain concatenation), so at initialisation NeuMF's logit is exactly
    α·GMF + (1−α)·MLP of the pre-trained models."""
    ch = NeuralCFChannel(ChannelSpec(name="ncf", kind="u2i", model="neural_cf", params=FAST))
    torch.manual_seed(1)
    gmf, mlp = ch.new_model(data, True, False), ch.new_model(data, False, True)
    for m in (gmf, mlp):
        for prm in m.parameters():
            torch.nn.init.normal_(prm, std=0.3)
    net = ch.new_model(data, True, True)
    init_from_pretrained(net, gmf, mlp, alpha=0.3)
    x = ch.user_inputs(data, np.arange(6), data.user_ptr[np.arange(6) + 1])
    items = torch.arange(data.n_items).repeat(6, 1)
    with torch.no_grad():
        want = 0.3 * gmf.score(*x, items) + 0.7 * mlp.score(*x, items)
        np.testing.assert_allclose(net.score(*x, items).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net.predict.weight[0, :8].numpy(), 0.3 * gmf.predict.weight[0].numpy())
        np.testing.assert_array_equal(net.gmf_item.weight.numpy(), gmf.gmf_item.weight.numpy())
        np.testing.assert_array_equal(net.tower[0].weight.numpy(), mlp.tower[0].weight.numpy())


@pytest.mark.parametrize("params", [{}, {"pretrain": True, "pretrain_epochs": 8}, {"sparse_above": 0},
                                    {"variant": "gmf"}, {"variant": "mlp", "epochs": 20, "lr": 0.05}, {"recent_n": 0}],
                         ids=["neumf", "pretrained", "sparse_adam", "gmf", "mlp", "ids_only"])
def test_learns_planted_clusters(data, params):
    ch = fitted_or_fit(data, params)
    users = np.array([u for u in range(data.n_users) if len(data.history(u)[0])])
    recs = ch.recommend(data, users, 10)
    prec = np.mean([np.mean(cluster_of(data, ids) == user_cluster(data, u)) for u, (ids, _) in zip(users, recs,
                                                                                                    strict=True)])
    assert prec >= 0.9, prec
    assert set(ch.losses) == ({"gmf", "mlp", "neumf"} if params.get("pretrain") else {params.get("variant", "neumf")})
    assert all(v[-1] < v[0] for v in ch.losses.values())


def test_examples_are_the_positive_and_k_negatives_masked_where_the_user_clicked(data):
    """Pointwise 1:K examples: column 0 the positive, K uniform draws, a draw invalid exactly where the user clicked
    that item in training (or it is the positive itself)."""
    rows = np.arange(len(data.item_idx))
    sampler = PowerSampler(data.item_counts, 0.0)
    observed = np.unique(data.user_idx.astype(np.int64) * data.n_items + data.item_idx)
    items, valid = pointwise_examples(data, rows, 4, sampler, observed, np.random.default_rng(0))
    assert items.shape == (len(rows), 5) and valid.shape == (len(rows), 4)
    np.testing.assert_array_equal(items[:, 0], data.item_idx)
    clicked = set(zip(data.user_idx.tolist(), data.item_idx.tolist(), strict=True))
    want = np.array([[(int(data.user_idx[r]), j) not in clicked for j in items[r, 1:].tolist()] for r in rows])
    np.testing.assert_array_equal(valid, want)
    assert 0.03 < (~valid).mean() < 0.15  # a user clicked 8 of the 100 items
    items2, unmasked = pointwise_examples(data, rows, 4, sampler, None, np.random.default_rng(0))
    np.testing.assert_array_equal(items2, items)
    np.testing.assert_array_equal(unmasked, items[:, 1:] != items[:, :1])


def test_the_loss_is_the_mean_of_the_1_plus_k_bce_terms(data):
    """At initialisation the logits are about the output bias b, and the mean of the 1 + K terms,
    (softplus(−b) + K softplus(b)) / (1 + K), lies in [H(1/(1+K)), ≈ ln 2] = [0.50, 0.70] for K = 4; the balanced
    per-row form softplus(−b) + softplus(b) would be ≥ 2 ln 2."""
    ch = NeuralCFChannel(ChannelSpec(name="ncf", kind="u2i", model="neural_cf",
                                     params={**FAST, "epochs": 1, "lr": 1e-7}))
    ch.fit(data)
    assert 0.50 <= ch.losses["neumf"][0] <= 0.70, ch.losses


# -- two-stage serving ----------------------------------------------------------------------------------------


def hand_tower() -> NeuMFTower:
    """GMF ranks items by index (item i scores i/50); the MLP adds 10 to item 0 only."""
    net = NeuMFTower(n_users=1, n_items=50, dim=2, mlp_dim=2, hidden=[2], recent_n=0)
    with torch.no_grad():
        for prm in net.parameters():
            prm.zero_()
        net.gmf_user.weight[:, 0] = 1.0
        net.gmf_item.weight[:50, 0] = torch.arange(50) / 50
        net.mlp_item.weight[0, 0] = 10.0
        net.tower[0].weight[:] = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
        net.predict.weight[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
        net.catalog[49] = False  # no training click: never answered
    return net.eval()


def test_two_stage_rescores_the_first_stage_candidates_and_brute_force_scores_everything():
    net = hand_tower()
    q = net(torch.tensor([0]), torch.zeros((1, 1), dtype=torch.int64), torch.zeros((1, 0), dtype=torch.int64))[0]
    q, items = q.detach().numpy(), net.item_vectors().numpy()

    def first_stage(n, exclude=None):
        order = [i for i in np.argsort(-(items @ q), kind="stable") if exclude is None or i not in exclude]
        return np.array(order[:n]), (items @ q)[order[:n]]

    ids, _ = first_stage(3)
    assert ids.tolist() == [48, 47, 46]  # GMF alone (49 has a zero vector)
    ids, scores = two_stage(net, q, 3, None, first_stage, RescoreSettings(n=5, bruteforce_max=0))
    assert ids.tolist() == [48, 47, 46] and (np.diff(scores) <= 0).all()  # item 0 is not a candidate
    ids, scores = two_stage(net, q, 3, None, first_stage, RescoreSettings(n=50, bruteforce_max=0))
    assert ids.tolist() == [0, 48, 47]  # the MLP lifts item 0 once it is a candidate
    np.testing.assert_allclose(scores, [10.0, 48 / 50, 47 / 50], rtol=1e-6)
    ids, _ = two_stage(net, q, 3, np.array([0, 47]), lambda n: first_stage(n, {0, 47}),
                       RescoreSettings(n=50, bruteforce_max=0))
    assert ids.tolist() == [48, 46, 45]
    ids, _ = two_stage(net, q, 3, None, lambda n: pytest.fail("no first stage"), RescoreSettings(n=1, bruteforce_max=50))
    assert ids.tolist() == [0, 48, 47]  # brute force: the whole catalog, without 49
    ids, _ = two_stage(net, q, 60, None, first_stage, RescoreSettings(n=5, bruteforce_max=0))
    assert len(ids) == 49 and 49 not in ids  # k above n: k candidates


def test_rescoring_improves_on_the_gmf_part_and_brute_force_on_both(data, fitted):
    """On the planted log, the channel's offline answers (exact search + rescoring) with rescore_n = catalog equal
    brute force, and both differ from the GMF first stage."""
    art = fitted.artifacts(data)["u2i"]
    users = np.arange(1, data.n_users)
    two = fitted.recommend(data, users, 10)
    module, settings = served_rescorer(art)
    assert settings == RescoreSettings(n=500, bruteforce_max=0)
    brute = [two_stage(module, art.user_vectors[u], 10, data.history(int(u))[0], None,
                       RescoreSettings(n=1, bruteforce_max=10**6)) for u in users]
    for (a, sa), (b, sb) in zip(two, brute, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)  # float32 sums in another batch shape
    gmf_only = [np.argsort(-(art.item_vectors @ art.user_vectors[u]))[:10] for u in users]
    assert sum(not np.array_equal(a, g) for (a, _), g in zip(two, gmf_only, strict=True)) > len(users) // 2


# -- export, request time, serving ------------------------------------------------------------------------------


def test_exported_module_reproduces_the_training_model(data, fitted):
    art = fitted.artifacts(data)["u2i"]
    meta = art.user_tower_meta
    assert json.loads(json.dumps(meta)) == meta
    assert meta["arch"] == "neural_cf" and meta["recent_n"] == 5 and meta["rescore"] == {"n": 500, "bruteforce_max": 0}
    module = load_tower(art.user_tower, meta, art.item_vectors.shape[1])  # the vector server's loader
    assert type(module) is NeuMFTower and module is not fitted.net
    assert rescore_settings(meta, module) == RescoreSettings(500, 0)
    for u in (1, 7, data.n_users - 1):
        recent = data.recent(u, 5)[0]
        np.testing.assert_allclose(query(module, meta, u, recent), art.user_vectors[u], atol=1e-6)
    cold = data.user_map.get("cold")
    np.testing.assert_allclose(art.user_vectors[cold], query(module, meta, -1, []), atol=1e-6)  # = unknown user
    x = fitted.user_inputs(data, np.arange(data.n_users), data.user_ptr[1:])
    items = torch.arange(data.n_items).repeat(data.n_users, 1)
    with torch.no_grad():
        np.testing.assert_allclose(module.score(*x, items).numpy(), fitted.net.score(*x, items).numpy(), atol=1e-6)


def test_request_time_vector_follows_new_clicks_through_the_vector_server_bundle(data, fitted, stores, settings):
    """Publish into a real Redis, load it as the vector server does (load_bundle: faiss index + rebuilt module), and
    answer two-stage through the bundle's faiss search: a click posted a moment ago changes the answer."""
    spec = ChannelSpec(name="ncf", kind="u2i", model="neural_cf", params=FAST, index={"type": "flat"})
    art = fitted.artifacts(data)["u2i"]
    ver = publish_channel(stores, spec, {"u2i": art}, data, settings.artifacts_dir, progress=False)
    b = load_bundle(stores, spec, ver)
    assert b.tower is not None and b.tower_error is None and b.dim == art.item_vectors.shape[1] == 8 + 16
    assert b.index_dims == b.index.d == 8  # faiss holds the GMF columns only (the items' MLP columns are zero)
    rs = rescore_settings(b.tower_meta, b.tower)
    assert rs == RescoreSettings(500, 0)

    def answer(u: int, recent: list[int], seen: list[int], k: int = 10) -> np.ndarray:
        q = b.tower_vector(u, {}, recent, [2_000_000 - j for j in range(len(recent))])
        ex = np.array(sorted(set(seen)), np.int64)
        return two_stage(b.tower, q, k, ex, lambda n: b.search(q, n, ex), rs)[0]

    u = 1  # a cluster-0 user
    history, seen = data.recent(u, 5)[0].tolist(), data.history(u)[0].tolist()
    before = answer(u, history, seen)
    # the served answer for the user's current history is the evaluator's (exact search + the same rescoring)
    np.testing.assert_array_equal(before, fitted.recommend(data, np.array([u]), 10)[0][0])
    clicked = items_of(data, 2, 3)
    after = answer(u, clicked[::-1] + history, seen + clicked)  # three cluster-2 clicks, newest first
    assert not np.array_equal(before, after)
    others = np.array(items_of(data, 2, PER_CLUSTER)[3:])  # the cluster's items not clicked

    def mean_score(recent: list[int]) -> float:
        return float(rescore(b.tower, b.tower_vector(u, {}, recent), others).mean())

    assert mean_score(clicked[::-1] + history) > mean_score(history) + 0.5  # the user's cluster-2 logits rise
    # a brand-new user (unknown id) is described by their clicks alone
    new = answer(-1, items_of(data, 3, 4), items_of(data, 3, 4))
    assert np.mean(cluster_of(data, new) == 3) >= 0.8


def test_vector_server_over_http_rescores_and_follows_posted_events(data, fitted, stores, settings, start_server,
                                                                    tmp_path):
    """The real vector server (HTTP, faiss, the module rebuilt from Redis): the evaluator's answer for the user's
    stored state, then a different, rescored answer after clicks posted a moment ago."""
    import yaml

    from common.ids import publish_id_map
    from tests.test_vector_server import post, push_event, wait_versions, write_user_features

    cfg = tmp_path / "channels.yaml"
    cfg.write_text(yaml.safe_dump({"channels": {"ncf": {"kind": "u2i", "model": "neural_cf", "params": FAST,
                                                         "index": {"type": "flat"}}}}))
    art = fitted.artifacts(data)["u2i"]
    ver = publish_channel(stores, load_config(cfg).get("ncf"), {"u2i": art}, data, settings.artifacts_dir,
                          progress=False)
    publish_id_map(stores, "item", data.item_map)
    publish_id_map(stores, "user", data.user_map)
    u, ids = 1, np.asarray(data.item_map.ids, dtype=object)
    items, ts = data.history(u)
    write_user_features(stores, "f1", {data.user_map.ids[u]: {
        "recent": [[ids[i], int(t)] for i, t in zip(items[::-1][:5], ts[::-1][:5], strict=True)],
        "attrs": {}, "seen": ids[items].tolist()}})
    server = start_server(["services.vector_server", "serve"], {"CHANNELS_CONFIG": str(cfg), "VECTOR_POLL_S": "0.2"})
    health = wait_versions(server.url, {"ncf": ver})
    assert health["channels"]["ncf"]["rescore"] == {"n": 500, "bruteforce_max": 0}
    ask = {"channel": "ncf", "k": 10, "user_id": data.user_map.ids[u], "exclude_seen": True}
    before = post(server.url, ask).json()
    assert before["source"] == "tower" and before["ids"] == fitted.recommend(data, np.array([u]), 10)[0][0].tolist()
    gmf_order = np.argsort(-(art.item_vectors @ art.user_vectors[u]), kind="stable")
    assert before["ids"] != [i for i in gmf_order.tolist() if i not in set(items.tolist())][:10]  # rescored
    clicked = items_of(data, 2, 3)
    for j, i in enumerate(clicked):
        push_event(stores, data.user_map.ids[u], ids[i], int(ts[-1]) + 60 * (j + 1))
    after = post(server.url, ask).json()
    module, rs = served_rescorer(art)
    recent = (clicked[::-1] + data.recent(u, 5)[0].tolist())[:5]
    q = query(module, art.user_tower_meta, u, recent)
    seen = np.array(sorted(set(items.tolist()) | set(clicked)), np.int64)
    want = two_stage(module, q, 10, seen, lambda n: (np.argsort(-(art.item_vectors @ q), kind="stable")[:n + len(seen)],
                                                       None), rs)[0]
    assert after["ids"] != before["ids"] and after["ids"] == want.tolist()


# -- configuration ----------------------------------------------------------------------------------------------


def test_registered_and_bad_params_fail_at_load_naming_channel_and_key(tmp_path):
    assert registry.models()["neural_cf"] is NeuralCFChannel
    for params, key in [({"num_negatives": 0}, "params.num_negatives"), ({"variant": "deep"}, "params.variant"),
                        ({"alpha": 1.5}, "params.alpha"), ({"no_such": 1}, "params.no_such"),
                        ({"factors": 8}, "params.factors")]:
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({"channels": {"ncf": {"kind": "u2i", "model": "neural_cf", "params": params}}}))
        with pytest.raises(ConfigError) as err:
            registry.validate_params(load_config(path), str(path))
        assert "channel 'ncf'" in str(err.value) and f"key '{key}'" in str(err.value), str(err.value)
    assert "renamed to 'dim'" in str(err.value)
