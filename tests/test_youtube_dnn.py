"""YouTubeDNN channel: example age (training-only, 0 at serving) on a planted freshness case, a fixed number of
examples per user, next-item examples from earlier history only, both softmax paths, the exported tower, a
posted event changing the served answer, and bad params failing at load."""

from __future__ import annotations

import asyncio
import inspect
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from common.channel_config import ChannelSpec, ConfigError, load_config, parse_config
from common.ids import publish_id_map
from common.towers import encode_user_inputs
from common.towers.youtube_dnn import YouTubeDNNTower, powers, quantile_cdf
from services.vector_server.index import load_tower
from tests.channel_contract import planted_data
from trainer.channels import registry
from trainer.channels.youtube_dnn import YouTubeDNNChannel
from trainer.data.examples import sample_per_user
from trainer.data.io import load_dataset
from trainer.data.train_data import TrainData
from trainer.publishing import publish_channel

SMALL = {"emb_dim": 16, "dim": 16, "hidden": [32], "epochs": 30, "batch_size": 64, "lr": 0.01, "recent_n": 10,
         "n_quantiles": 8}
T0 = 1_700_000_000


def fit(data: TrainData, **params) -> YouTubeDNNChannel:
    ch = YouTubeDNNChannel(ChannelSpec(name="ytdnn", kind="u2i", model="youtube_dnn", params={**SMALL, **params}))
    ch.fit(data)
    return ch


def served(ch: YouTubeDNNChannel, data: TrainData):
    art = ch.artifacts(data)["u2i"]
    return load_tower(art.user_tower, art.user_tower_meta, art.item_vectors.shape[1]), art


def run(tower, meta, user_idx, attrs, recent, ts=None) -> np.ndarray:
    with torch.no_grad():
        x = encode_user_inputs(meta, user_idx, attrs, recent, ts)
        return tower(*(torch.from_numpy(a) for a in x))[0].numpy()


# -- data ---------------------------------------------------------------------------------------------------


def freshness_log(n_users: int = 120, n_fill: int = 30, clicks: int = 6) -> TrainData:
    """Users arrive one per day; each clicks `clicks` random filler items a minute apart, then one hit: the
    "old" hit (item h0) in the first 70 % of the days, the "new" hit (h1) after. h0 has more clicks overall, the
    histories (fillers only) say nothing about time, so only the example age can tell that h1 is what is clicked
    *now*."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(n_users):
        t = T0 + 86_400 * u
        fill = rng.choice(n_fill, size=clicks, replace=False)
        rows += [(f"u{u}", f"f{i}", t + 60 * j) for j, i in enumerate(fill)]
        rows.append((f"u{u}", "h0" if u < 0.7 * n_users else "h1", t + 60 * clicks))
    return TrainData.from_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))


def attr_log() -> tuple[TrainData, pd.DataFrame]:
    """4 clusters of 10 items with genres; users with age, gender and a zip code (used by its prefix)."""
    rng = np.random.default_rng(2)
    rows = []
    for u in range(48):
        c = u % 4
        for j, i in enumerate(rng.choice(10, size=6, replace=False) + 10 * c):
            rows.append((f"u{u}", f"i{i}", T0 + 1000 * u + 30 * j * (1 + u % 3)))
    users = pd.DataFrame({"age": [20 + u % 30 for u in range(48)], "gender": ["M", "F"] * 24,
                          "zip": [f"{u % 4}{u:04d}" for u in range(48)]},  # id-like; its first digit = cluster
                         index=pd.Index([f"u{u}" for u in range(48)], name="user_id"))
    items = pd.DataFrame({"genres": [f"g{i // 10}|x{i % 2}" for i in range(40)]},
                         index=pd.Index([f"i{i}" for i in range(40)], name="item_id"))
    return TrainData.from_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), users, items), users


@pytest.fixture(scope="module")
def attr_data():
    return attr_log()


@pytest.fixture(scope="module")
def attr_model(attr_data):
    return fit(attr_data[0], epochs=15)


def cluster_precision(ch: YouTubeDNNChannel, data: TrainData, k: int = 5) -> float:
    ids = np.asarray(data.item_map.ids)
    users = np.arange(data.n_users)
    hits = []
    for u, (rec, _) in zip(users, ch.recommend(data, users, k), strict=True):
        c = int(data.user_map.ids[u][1:]) % 4
        hits.append(np.mean([int(ids[i][1:]) // 10 == c for i in rec]))
    return float(np.mean(hits))


# -- the signature mechanisms --------------------------------------------------------------------------------


def test_example_age_learns_freshness_and_serving_uses_age_zero():
    data = freshness_log()
    h0, h1 = (int(data.item_map.lookup([h])[0]) for h in ("h0", "h1"))
    assert data.item_counts[h0] > data.item_counts[h1]  # the old hit is the more popular overall
    rng = np.random.default_rng(5)
    fill = np.flatnonzero(~np.isin(np.arange(data.n_items), [h0, h1]))
    recent = np.stack([rng.choice(fill, size=6, replace=False) for _ in range(50)])
    n_items = data.n_items

    def new_minus_old(ch: YouTubeDNNChannel) -> np.ndarray:
        """Per filler history: logit of the new hit − logit of the old one, from the served tower."""
        art = ch.artifacts(data)["u2i"]
        tower, meta = served(ch, data)[0], art.user_tower_meta
        v = np.stack([run(tower, meta, -1, None, r, [T0 - 60 * j for j in range(6)]) for r in recent])
        return v @ (art.item_vectors[h1] - art.item_vectors[h0])

    kw = {"examples_per_user": None, "epochs": 25, "token_fields": [], "recent_n": 6}
    on, off = fit(data, **kw), fit(data, example_age=False, **kw)
    assert off.age_proj is None and on.age_proj is not None
    d_on, d_off = new_minus_old(on), new_minus_old(off)
    assert np.mean(d_on > 0) >= 0.9  # at example age 0 the model predicts what is clicked now
    assert np.mean(d_off > 0) <= 0.3 and d_off.mean() < 0  # without it: the all-time popular one
    # example age changes training (the shared weights end up elsewhere) ...
    assert not np.allclose(on.item_vectors, off.item_vectors)
    # ... and serving is the training model at age 0: the age term vanishes there and only there
    x = tuple(torch.as_tensor(a) for a in encode_user_inputs(on.artifacts(data)["u2i"].user_tower_meta, -1, None,
                                                             recent[0], [T0 - 60 * j for j in range(6)]))
    with torch.no_grad():
        pre = on.tower.first(on.tower.features(*x))
        age_edges = torch.as_tensor(on.age_edges)
        at = [on.tower.output(pre + on.age_proj(powers(quantile_cdf(torch.tensor([a]), age_edges))))
              for a in (0.0, float(np.log1p(30 * 86_400)))]
        srv = served(on, data)[0](*x)
    torch.testing.assert_close(srv, at[0], rtol=0, atol=1e-6)
    assert not torch.allclose(srv, at[1], atol=1e-3)
    # structurally: the served tower has no example-age input and no age weights
    assert list(inspect.signature(YouTubeDNNTower.forward).parameters) == ["self", "user_idx", "attrs", "recent",
                                                                          "recent_ts"]
    assert not any("age" in k for k in on.tower.state_dict())
    assert float(quantile_cdf(torch.tensor([0.0]), age_edges)) == 0.0 and n_items == len(on.item_vectors)


def test_fixed_examples_per_user_vectorised_and_seeded():
    # user 0: 101 candidate positions (heavy), user 1: 2, user 2: 5
    cand_user = np.repeat([0, 1, 2], [101, 2, 5])
    cand = np.arange(len(cand_user)) * 3 + 7
    a = sample_per_user(cand, cand_user, 4, np.random.default_rng(0))
    b = sample_per_user(cand, cand_user, 4, np.random.default_rng(0))
    c = sample_per_user(cand, cand_user, 4, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for got in (a, c):
        users = cand_user[np.searchsorted(cand, got)]
        assert np.bincount(users, minlength=3).tolist() == [4, 2, 4]  # heavy user capped; light users all
        assert len(np.unique(got)) == len(got) and np.isin(got, cand).all()
    np.testing.assert_array_equal(sample_per_user(cand, cand_user, None, np.random.default_rng(0)), cand)


def test_examples_predict_next_item_from_earlier_history_only(attr_data):
    data, _ = attr_data
    ch = fit(data, epochs=1)
    starts = data.user_ptr[data.user_idx[ch.cand]]
    assert (ch.cand > starts).all()  # every example has an earlier item; first clicks are never targets
    assert len(ch.cand) == len(data.item_idx) - int((np.diff(data.user_ptr) > 0).sum())
    u = 5
    g = int(data.user_ptr[u]) + 3
    _, _, rec, ts = ch.user_inputs(data, np.array([u]), np.array([g]))
    np.testing.assert_array_equal(rec[0, :3].numpy(), data.item_idx[g - 3:g][::-1])  # newest first, before g
    assert (rec[0, 3:] == data.n_items).all() and (ts[0, :3].numpy() == data.ts[g - 3:g][::-1]).all()
    # per epoch: min(examples_per_user, candidates) positions per user
    ch2 = fit(data, epochs=1, examples_per_user=2)
    drawn = sample_per_user(ch2.cand, ch2.cand_user, 2, np.random.default_rng(0))
    assert len(drawn) == 2 * data.n_users


@pytest.mark.parametrize("params", [{}, {"full_softmax_up_to": 0, "num_negatives": 12}],
                         ids=["full-softmax", "sampled-softmax-logq"])
def test_both_softmax_paths_learn_planted_clusters(attr_data, params):
    data, _ = attr_data
    ch = fit(data, epochs=20, **params)
    assert ch.softmax.full is (not params)
    assert np.isfinite(ch.losses).all() and ch.losses[-1] < ch.losses[0]
    assert cluster_precision(ch, data) > 0.7  # random: 0.25


# -- export and serving --------------------------------------------------------------------------------------


def test_exported_tower_reproduces_the_training_model(attr_data, attr_model):
    data, users = attr_data
    ch = attr_model
    tower, art = served(ch, data)
    meta = art.user_tower_meta
    assert meta["arch"] == "youtube_dnn" and meta["recent_n"] == 10
    assert meta["attr_columns"] == ["age", "gender", "zip"]  # zip kept through its prefix
    assert meta["attr_vocab"]["zip"]["10005"] == meta["attr_vocab"]["zip"]["10001"] > 0  # raw value → prefix code
    assert art.item_vectors.shape == (data.n_items, 17) and art.user_vectors.shape == (data.n_users, 17)
    assert type(tower) is YouTubeDNNTower and tower is not ch.tower
    for u in (0, 7, data.n_users - 1):
        items, ts = data.recent(u, 10)
        attrs = users.loc[data.user_map.ids[u]].to_dict()
        np.testing.assert_allclose(run(tower, meta, u, attrs, items, ts), art.user_vectors[u], atol=1e-5)
        # the training path at example age 0 is the served vector too
        x = ch.user_inputs(data, np.array([u]), data.user_ptr[[u + 1]])
        with torch.no_grad():
            np.testing.assert_allclose(ch.tower(*x)[0].numpy(), art.user_vectors[u], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(art.user_vectors[:, -1], 1.0)  # the bias column
    # raw attribute values: a zip seen in training is coded by its prefix, an unseen one is unknown (0)
    x = encode_user_inputs(meta, -1, {"age": 24.0, "gender": "M", "zip": "20034"}, [])
    assert x.attrs[0].tolist() == [meta["attr_vocab"]["age"]["24"], meta["attr_vocab"]["gender"]["M"],
                                   meta["attr_vocab"]["zip"]["20002"]]
    assert encode_user_inputs(meta, -1, {"zip": "29999"}, []).attrs[0, 2] == 0
    # an unknown user with a few clicks of cluster 2 gets cluster-2 items
    recent = [int(data.item_map.lookup([f"i{i}"])[0]) for i in (21, 23, 25, 27, 29)]
    times = [T0 + 120, T0 + 90, T0 + 60, T0 + 30, T0]
    v = run(tower, meta, -1, None, recent, times)
    top = np.argsort(-(art.item_vectors @ v))[:5]
    assert np.mean([int(data.item_map.ids[i][1:]) // 10 == 2 for i in top]) >= 0.8
    # times change the served vector (the last-gap feature), a missing time is "unknown", not a crash
    w = run(tower, meta, -1, None, recent, [T0 + 9000, *times[1:]])
    assert not np.allclose(v, w)
    assert np.isfinite(run(tower, meta, -1, None, recent)).all() and np.isfinite(run(tower, meta, -1, None, [])).all()


def test_optional_user_id_and_newest_item_export_exactly():
    """The options outside the paper (DeepMatch's user-id input, the newest item on its own) are served exactly
    too; a registered user without interactions is served as the unknown user."""
    data = planted_data()
    ch = fit(data, epochs=3, use_user_id=True, newest_item=True, recent_n=5)
    tower, art = served(ch, data)
    meta = art.user_tower_meta
    assert meta["hparams"]["use_user_id"] and meta["hparams"]["newest_item"]
    for u in (0, 9):
        items, ts = data.recent(u, 5)
        x = ch.user_inputs(data, np.array([u]), data.user_ptr[[u + 1]])
        with torch.no_grad():
            np.testing.assert_allclose(tower(*x)[0].numpy(), art.user_vectors[u], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(encode_user_inputs(meta, u, None, items, ts).recent, x[2].numpy())
    cold = int(data.user_map.lookup(["zz_cold"])[0])
    recent = [1, 2]
    np.testing.assert_array_equal(run(tower, meta, cold, None, recent), run(tower, meta, -1, None, recent))
    assert not np.allclose(run(tower, meta, 0, None, recent), run(tower, meta, -1, None, recent))
    assert not np.allclose(run(tower, meta, -1, None, [1, 2]), run(tower, meta, -1, None, [2, 1]))  # newest item


def test_registered_and_bad_params_fail_at_load_naming_channel_and_key():
    assert registry.models()["youtube_dnn"] is YouTubeDNNChannel

    def check(params: dict, *needles: str) -> None:
        raw = {"channels": {"ytdnn": {"kind": "u2i", "model": "youtube_dnn", "params": params}}}
        cfg = parse_config(raw, "test.yaml")
        if not needles:
            registry.validate_params(cfg, "test.yaml")
            return
        with pytest.raises(ConfigError) as err:
            registry.validate_params(cfg, "test.yaml")
        for n in ("test.yaml", "ytdnn", *needles):
            assert n in str(err.value), (n, str(err.value))

    check({"examples_per_user": 20, "recent_n": 50})
    check({"examples_per_user": 0}, "examples_per_user")
    check({"hidden": []}, "hidden")
    check({"num_negatives": 0}, "num_negatives")
    check({"share_item_emb": True, "emb_dim": 8, "dim": 16}, "share_item_emb")
    check({"example_ages": True}, "example_ages")


def test_posted_event_changes_the_served_answer(tmp_path, settings, stores):
    """Publish the channel and the user features into Redis, serve it with the vector server's core (the same
    code as its HTTP app, embedded in this process), POST an event to the feature server app: the next search by
    user id is computed by the tower from the new click."""
    from fastapi.testclient import TestClient

    from services.feature_server.app import create_app
    from services.vector_server.embedded import EmbeddedVectorSearch
    from trainer.feature_build import publish_features

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data, users = attr_log()
    frame = pd.DataFrame({"user_id": np.asarray(data.user_map.ids)[data.user_idx],
                          "item_id": np.asarray(data.item_map.ids)[data.item_idx], "timestamp": data.ts})
    frame.to_csv(data_dir / "interactions.csv", index=False)
    users.to_csv(data_dir / "users.csv")
    ds = load_dataset(data_dir)
    data = TrainData.from_frame(ds.interactions, ds.users, ds.items)
    cfg_path = tmp_path / "channels.yaml"
    cfg_path.write_text(yaml.safe_dump({"channels": {"ytdnn": {"kind": "u2i", "model": "youtube_dnn",
                                                               "index": {"type": "flat"},
                                                               "params": {**SMALL, "epochs": 15,
                                                                          "use_user_attrs": False}}}}))
    spec = load_config(cfg_path).get("ytdnn")
    ch = registry.build(spec, seed=42)
    ch.fit(data)
    publish_id_map(stores, "user", data.user_map)
    publish_id_map(stores, "item", data.item_map)
    publish_channel(stores, spec, ch.artifacts(data), data, tmp_path / "artifacts", progress=False)
    s = settings.model_copy(update={"channels_config": cfg_path, "vector_poll_s": 0.1, "recent_n": 10})
    publish_features(stores, ds, s, progress=False)
    user = "u0"  # cluster 0
    cluster = {i: int(x[1:]) // 10 for i, x in enumerate(data.item_map.ids)}

    async def search(vs: EmbeddedVectorSearch) -> dict:
        for _ in range(200):
            res = (await vs.search_user_channels(user, {"ytdnn": 10}))["ytdnn"]
            if res.get("status", 200) == 200:
                return res
            await asyncio.sleep(0.05)
        raise AssertionError(res)

    new = [f"i{i}" for i in (31, 33, 35, 37, 39)]  # cluster 3
    now = int(time.time())

    async def scenario() -> tuple[dict, dict]:
        vs = EmbeddedVectorSearch(s)
        await vs.start()
        try:
            before = await search(vs)
            with TestClient(create_app(s)) as fs:
                body = [{"user_id": user, "item_id": i, "timestamp": now + j} for j, i in enumerate(new)]
                assert fs.post("/events", json=body).status_code < 300
            return before, await search(vs)
        finally:
            await vs.aclose()

    before, after = asyncio.run(scenario())
    before["ids"], after["ids"] = [int(i) for i in before["ids"]], [int(i) for i in after["ids"]]
    assert before["source"] == after["source"] == "tower"
    assert np.mean([cluster[i] == 0 for i in before["ids"]]) >= 0.6
    assert before["ids"] != after["ids"]
    assert sum(cluster[i] == 3 for i in after["ids"]) > sum(cluster[i] == 3 for i in before["ids"])
    # exactly the tower's answer on the new recent clicks (newest first, with their times) + the batch ones
    art = ch.artifacts(data)["u2i"]
    tower, meta = load_tower(art.user_tower, art.user_tower_meta, art.item_vectors.shape[1]), art.user_tower_meta
    items, ts = data.recent(int(data.user_map.lookup([user])[0]), 10)
    recent = [int(i) for i in data.item_map.lookup(new[::-1])] + items.tolist()
    times = [now + j for j in range(len(new))][::-1] + ts.tolist()
    v = run(tower, meta, int(data.user_map.lookup([user])[0]), None, recent[:10], times[:10])
    assert after["ids"] == np.argsort(-(art.item_vectors @ v), kind="stable")[:10].tolist()
