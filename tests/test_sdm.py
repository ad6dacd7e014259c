"""SDM channel: windows for multi-position training, the causal mask, the split of a request into short- and
long-term inputs (which cannot be swapped), attribute subsets from the tower's own buffer, the gate, the exported
tower, and a posted event changing the answer of the real vector server."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ServerProcess, free_port

from common.channel_config import ChannelSpec, ConfigError, load_config, parse_config
from common.ids import IdMap, publish_id_map
from common.keyspace import Keyspace
from common.local_redis import LocalRedis
from common.redis_conn import RedisStores
from common.towers import encode_user_inputs, matches, numpy_twin
from common.towers.sdm import SDMTower
from services.vector_server.index import load_tower
from trainer.channels import registry
from trainer.channels.sdm import SDMChannel, windows
from trainer.data.train_data import TrainData
from trainer.publishing import publish_channel

C, PER, N_USERS, LEN = 4, 40, 64, 24
S, R = 3, 12
FAST = {"dim": 16, "short_n": S, "recent_n": R, "epochs": 20, "batch_size": 32, "lr": 0.01, "user_id_dropout": 0.0,
        "use_user_id": False}


def planted() -> TrainData:
    """Even users follow sessions (blocks of 6 clicks in one random cluster: the next click is in the current
    block's cluster); odd users are loyal (each click in the user's own cluster with probability 0.7, else in a
    random one). Item category = cluster; a user attribute says which kind the user is; one click a minute."""
    rng = np.random.default_rng(0)
    u = np.repeat(np.arange(N_USERS), LEN)
    pos = np.tile(np.arange(LEN), N_USERS)
    block = rng.integers(0, C, (N_USERS, LEN // 6))[u, pos // 6]
    loyal = np.where(rng.random(len(u)) < 0.7, (u // 2) % C, rng.integers(0, C, len(u)))
    cluster = np.where(u % 2 == 0, block, loyal)
    item = cluster * PER + rng.integers(0, PER, len(u))
    inter = pd.DataFrame({"user_id": [f"u{x:02d}" for x in u], "item_id": [f"i{x:03d}" for x in item],
                          "timestamp": 1_700_000_000 + 3600 * u + 60 * pos})
    users = pd.DataFrame({"kind": ["session" if j % 2 == 0 else "loyal" for j in range(N_USERS)]},
                         index=[f"u{j:02d}" for j in range(N_USERS)])
    items = pd.DataFrame({"category": [f"c{i // PER}" for i in range(C * PER)]},
                         index=[f"i{i:03d}" for i in range(C * PER)])
    return TrainData.from_frame(inter, users, items)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as training (num_threads: 1) and the vector server (OMP_NUM_THREADS=1) run: on a busy
    machine a second OpenMP thread makes every small op of these one-user forwards wait for it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def data() -> TrainData:
    return planted()


@pytest.fixture(scope="module")
def fitted(data) -> SDMChannel:
    return fit(data)


def fit(data: TrainData, **params) -> SDMChannel:
    ch = SDMChannel(ChannelSpec(name="sdm", kind="u2i", model="sdm", params={**FAST, **params}))
    ch.fit(data)
    return ch


def cluster(data: TrainData, idx) -> np.ndarray:
    return np.array([int(data.item_map.ids[i][1:]) // PER for i in np.atleast_1d(idx)])


def ext_user(data: TrainData, u: int) -> int:
    return int(data.user_map.ids[u][1:])


def small_tower(fusion: str = "gate", session_gap_s: int | None = None, side: bool = True) -> SDMTower:
    torch.manual_seed(0)
    tower = SDMTower(n_users=5, n_items=20, attr_sizes=[3], side_sizes=[4] if side else [], dim=8, short_n=3,
                     long_n=5, num_heads=2, fusion=fusion, session_gap_s=session_gap_s).eval()
    if side:
        with torch.no_grad():
            tower.item_codes[:20, 0] = torch.arange(20) % 4
    return tower


# -- params -----------------------------------------------------------------------------------------------


def config(params: dict) -> dict:
    return {"channels": {"sdm": {"kind": "u2i", "model": "sdm", "weight": 1.0, "quota": 100, "params": params}}}


@pytest.mark.parametrize("params, key", [
    ({"shortn": 5}, "params.shortn"),
    ({"fusion": "max"}, "params.fusion"),
    ({"short_n": 10, "recent_n": 10}, "params.recent_n"),
    ({"dim": 30, "num_heads": 4}, "params.num_heads"),
    ({"dropout": 1.5}, "params.dropout"),
])
def test_bad_params_fail_at_load_naming_channel_and_key(params, key, tmp_path):
    with pytest.raises(ConfigError, match=rf"channel 'sdm', key '{key}'"):
        registry.validate_params(parse_config(config(params), "test.yaml"), "test.yaml")
    path = tmp_path / "c.yaml"  # the file loader of the nightly job and the evaluator
    path.write_text(yaml.safe_dump(config(params)))
    with pytest.raises(ConfigError, match=rf"c\.yaml.*channel 'sdm', key '{key}'"):
        registry.validate_params(load_config(path), str(path))
    registry.validate_params(parse_config(config({"short_n": 5, "recent_n": 20}), "ok.yaml"), "ok.yaml")
    assert registry.models()["sdm"] is SDMChannel


# -- multi-position training: windows and the causal mask -----------------------------------------------------


@pytest.mark.parametrize("gap", [None, 1800])
def test_windows_cover_every_next_item_once_within_users_and_sessions(gap):
    rng = np.random.default_rng(3)
    rows = []
    for u in range(30):
        t = 1_000_000 + np.cumsum(rng.choice([60, 1800, 1801, 7200], size=int(rng.integers(1, 25))))
        rows += [(f"u{u}", f"i{j}", int(ts)) for j, ts in enumerate(t)]
    d = TrainData.from_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    for seed in (0, 1):
        start, length = windows(d, 4, gap, np.random.default_rng(seed))
        assert (length >= 1).all() and (length <= 4).all()
        covered = np.concatenate([np.arange(a, a + n) for a, n in zip(start, length, strict=True)])
        assert len(np.unique(covered)) == len(covered)  # windows do not overlap
        users = d.user_idx
        assert (users[start] == users[start + length - 1]).all()  # never across users
        # every interaction but each user's first is the target of exactly one window position
        targets = covered + 1
        targets = targets[targets < d.user_ptr[users[covered] + 1]]
        firsts = set(d.user_ptr[:-1].tolist())
        assert sorted(targets.tolist()) == [g for g in range(len(users)) if g not in firsts]
        if gap is not None:  # a window never spans a gap longer than the session gap
            for a, n in zip(start, length, strict=True):
                assert (np.diff(d.ts[a:a + n]) <= gap).all()
    a, _ = windows(d, 4, None, np.random.default_rng(0))
    b, _ = windows(d, 4, None, np.random.default_rng(1))
    assert not np.array_equal(a, b)  # the grid's offset is drawn per user and epoch


def test_causal_mask_each_position_sees_only_the_items_up_to_it():
    tower = small_tower()
    user, attrs = torch.tensor([1, 2]), torch.tensor([[1], [2]])
    long = tower.long_codes(torch.tensor([[4, 5, 6, 20, 20], [7, 20, 20, 20, 20]]))
    a = torch.tensor([[1, 2, 3], [8, 9, 20]])
    b = torch.tensor([[1, 2, 11], [8, 12, 20]])
    with torch.no_grad():
        oa, ob = tower.encode(user, attrs, short=a, long=long), tower.encode(user, attrs, short=b, long=long)
    torch.testing.assert_close(oa[0, :2], ob[0, :2])  # positions 0, 1 of row 0 do not see position 2
    torch.testing.assert_close(oa[1, :1], ob[1, :1])
    assert not torch.allclose(oa[0, 2], ob[0, 2]) and not torch.allclose(oa[1, 1], ob[1, 1])
    # the served vector is the one at the newest position, equal to the prefix's own last position
    with torch.no_grad():
        prefix = tower.encode(user[:1], attrs[:1], short=torch.tensor([[1, 2, 20]]), long=long[:1])
    torch.testing.assert_close(prefix[0, :2], oa[0, :2])


# -- request split: short vs long, session rule, attribute subsets ------------------------------------------


def test_short_and_long_inputs_have_distinct_names_and_shapes_and_cannot_be_swapped():
    tower = small_tower()
    x = tower.split(torch.tensor([1]), torch.tensor([[1]]), torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2]]))
    assert x._fields == ("user", "attrs", "short", "long")
    assert x.short.shape == (1, 3) and x.long.shape == (1, 2, 5)  # [B, S] ids vs [B, F, L] attribute codes
    assert x.short.tolist() == [[7, 8, 9]]  # the newest 3, in time order
    assert x.long[0, 0].tolist() == [6, 5, 4, 3, 2] and x.long[0, 1].tolist() == [2, 1, 0, 3, 2]  # ids, categories
    with pytest.raises(ValueError, match="short must be"):
        tower.encode(x.user, x.attrs, short=x.long, long=x.short)
    with pytest.raises(ValueError, match="long must be"):
        tower.encode(x.user, x.attrs, short=x.short, long=x.long[:, 0])  # ids alone are not the long input
    with pytest.raises(TypeError):
        tower.encode(x.user, x.attrs, x.short, x.long)  # keyword-only: no positional mix-up
    # a square configuration (S = L, no side field) still cannot be confused: long is [B, F, L], short [B, S]
    sq = SDMTower(5, 20, [], [], 8, short_n=4, long_n=4, num_heads=2)
    y = sq.split(torch.tensor([0]), torch.zeros((1, 1), dtype=torch.int64), torch.arange(8).unsqueeze(0))
    assert y.short.shape == (1, 4) and y.long.shape == (1, 1, 4)
    with pytest.raises(ValueError):
        sq.encode(y.user, y.attrs, short=y.long, long=y.short)


def test_short_window_is_the_newest_session_by_the_30_minute_rule():
    tower = small_tower(session_gap_s=1800)
    user, attrs = torch.tensor([1]), torch.tensor([[0]])
    rec = torch.tensor([[9, 8, 7, 6, 5, 20, 20, 20]])
    t0 = 1_700_000_000
    # gaps newest→older: 1800 (same session), 1801 (new session)
    ts = torch.tensor([[t0, t0 - 1800, t0 - 3601, t0 - 3660, t0 - 3720, 0, 0, 0]])
    x = tower.split(user, attrs, rec, ts)
    assert x.short.tolist() == [[8, 9, 20]]  # the session of the two newest items, in time order
    assert x.long[0, 0].tolist() == [7, 6, 5, 20, 20]  # the rest of the window is long-term
    # without times (a request that sent its own recent items) the window is the newest short_n
    assert tower.split(user, attrs, rec, torch.zeros_like(ts)).short.tolist() == [[7, 8, 9]]
    assert small_tower().split(user, attrs, rec, ts).short.tolist() == [[7, 8, 9]]  # no gap rule


def test_long_term_attends_per_attribute_subset_from_the_towers_own_codes():
    tower = small_tower()
    assert "item_codes" in tower.state_dict()  # serving passes item indices only: the codes travel with the tower
    x = tower.split(torch.tensor([1]), torch.tensor([[1]]), torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2]]))
    with torch.no_grad():
        e_u = tower.user_vector(x.user, x.attrs)
        p = tower.long_term(e_u, x.long)
        # by hand: z_f = Σ softmax(e_u · g) g per subset, p = tanh(W [z_item; z_cat] + b)
        z = []
        for f, table in ((0, tower.item_emb.weight), (1, tower.side_emb.weight)):
            g = table[x.long[0, f] + (tower.side_offsets[0] if f else 0)]
            z.append(torch.softmax(g @ e_u[0], 0) @ g)
        torch.testing.assert_close(p[0], torch.tanh(tower.long_out(torch.cat(z))))
        before = tower(torch.tensor([1]), torch.tensor([[1]]), torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2]]))
        tower.item_codes[4, 0] = 3  # re-categorise one long-term item: the category subset changes p
        after = tower(torch.tensor([1]), torch.tensor([[1]]), torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2]]))
        assert not torch.allclose(before, after)
        tower.item_codes[4, 0] = 4  # unknown category (= the field's size): left out of that subset's attention
        masked = tower.long_term(e_u, tower.long_codes(torch.tensor([[6, 5, 4, 3, 2]])))
        g = tower.side_emb.weight[torch.tensor([2, 1, 3, 2]) + tower.side_offsets[0]]
        z_cat = torch.softmax(g @ e_u[0], 0) @ g
        z_item = z[0]
        torch.testing.assert_close(masked[0], torch.tanh(tower.long_out(torch.cat([z_item, z_cat]))))


def test_gate_fuses_short_and_long_as_in_the_paper():
    tower, summed = small_tower("gate"), small_tower("sum")
    user, attrs = torch.tensor([1]), torch.tensor([[2]])
    x = tower.split(user, attrs, torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2]]))
    with torch.no_grad():
        e_u = tower.user_vector(user, attrs)
        s, p = tower.short_term(e_u, x.short)[:, -1], tower.long_term(e_u, x.long)
        w = tower.gate.weight
        d = e_u.shape[1]
        g = torch.sigmoid(e_u @ w[:, :d].T + s @ w[:, d:2 * d].T + p @ w[:, 2 * d:].T + tower.gate.bias)
        torch.testing.assert_close(tower.encode(user, attrs, short=x.short, long=x.long)[:, -1], (1 - g) * p + g * s)
        torch.testing.assert_close(summed.encode(user, attrs, short=x.short, long=x.long)[:, -1], s + p)
        tower.gate.bias.fill_(40.0)  # G → 1: the short-term vector alone; G → 0: the long-term one
        torch.testing.assert_close(tower.encode(user, attrs, short=x.short, long=x.long)[:, -1], s)
        tower.gate.bias.fill_(-40.0)
        torch.testing.assert_close(tower.encode(user, attrs, short=x.short, long=x.long)[:, -1], p)


# -- the planted case: session users follow their session, loyal users their long-term cluster --------------


def gate_of(ch: SDMChannel, data: TrainData) -> np.ndarray:
    tower = ch.tower
    x = tower.split(*ch.user_inputs(data, np.arange(data.n_users)))
    with torch.no_grad():
        e_u = tower.user_vector(x.user, x.attrs)
        last = (x.short < tower.n_items).sum(1) - 1
        s = tower.short_term(e_u, x.short)[torch.arange(len(last)), last]
        p = tower.long_term(e_u, x.long)
        return torch.sigmoid(tower.gate(torch.cat([e_u, s, p], 1))).mean(1).numpy()


def planted_hits(ch: SDMChannel, data: TrainData) -> tuple[float, float]:
    """Top-10 share of the right cluster: session users' current session cluster, loyal users' own cluster."""
    users = np.arange(data.n_users)
    recs = ch.recommend(data, users, 10)
    kind = np.array([ext_user(data, u) % 2 for u in users])  # 0 session, 1 loyal
    newest = cluster(data, data.item_idx[data.user_ptr[1:] - 1])
    own = np.array([(ext_user(data, u) // 2) % C for u in users])
    hit_session = [np.mean(cluster(data, ids) == newest[u]) for u, (ids, _) in enumerate(recs) if kind[u] == 0]
    hit_loyal = [np.mean(cluster(data, ids) == own[u]) for u, (ids, _) in enumerate(recs) if kind[u] == 1]
    return float(np.mean(hit_session)), float(np.mean(hit_loyal))


def test_planted_sessions_and_loyal_users_and_the_gate_tells_them_apart(data, fitted):
    ch = fitted
    assert np.isfinite(ch.losses).all() and ch.losses[-1] < ch.losses[0]
    session, loyal = planted_hits(ch, data)
    # chance is 1/4: session users get the cluster of their current session, loyal ones their own (measured with the
    # default item_attrs: 0.92, 0.58)
    assert session > 0.75 and loyal > 0.45
    g = gate_of(ch, data)
    kind = np.array([ext_user(data, u) % 2 for u in range(data.n_users)])
    assert g[kind == 0].mean() > g[kind == 1].mean() + 0.05  # more weight on the short term for session users
    # the same model with o = s + p instead of the gate does worse on both kinds together, both scored against id-only
    # output vectors (category bags in the item vectors give the planted clusters away to either fusion; measured:
    # gate 0.90, 0.62; sum 0.77, 0.57)
    g_s, g_l = planted_hits(fit(data, item_attrs=False), data)
    s_sum, l_sum = planted_hits(fit(data, fusion="sum", item_attrs=False), data)
    assert g_s + g_l > s_sum + l_sum + 0.05


def test_output_item_vectors_read_the_items_attribute_bags(data, fitted):
    ch = fitted
    assert ch.item_side is not None and ch.item_enc.columns == ["category"]
    ids = torch.arange(data.n_items)
    with torch.no_grad():
        published = ch.item_vectors_of(ids).numpy()
        one_row = ch.item_side(ch.out_emb(ids[:1]).expand(data.n_items, -1), ids).numpy()  # item 0's id row for all
    np.testing.assert_allclose(published, ch.artifacts(data)["u2i"].item_vectors, atol=1e-6)
    # with the same id row, items differ only by their category bag: equal within a cluster, apart across
    cl = cluster(data, ids.numpy())
    for c in range(C):
        np.testing.assert_allclose(one_row[cl == c], np.broadcast_to(one_row[cl == c][0], one_row[cl == c].shape),
                                   atol=1e-6)
    centres = np.stack([one_row[cl == c][0] for c in range(C)])
    assert (np.abs(centres[:, None] - centres[None]).sum(2) + np.eye(C) > 1e-3).all()
    plain = fit(data, item_attrs=False, epochs=1)
    assert plain.item_side is None
    with torch.no_grad():
        np.testing.assert_allclose(plain.item_vectors_of(ids).numpy(),
                                   torch.nn.functional.normalize(plain.out_emb(ids), dim=1).numpy(), atol=1e-6)


# -- export and serving ---------------------------------------------------------------------------------------


def test_exported_tower_gives_the_training_models_vectors(data, fitted):
    ch = fitted
    art = ch.artifacts(data)["u2i"]
    meta = art.user_tower_meta
    assert meta["arch"] == "sdm" and meta["recent_n"] == R and meta["hparams"]["long_n"] == R - S
    assert meta["attr_columns"] == ["kind"] and meta["hparams"]["side_sizes"] == [C]
    tower = load_tower(art.user_tower, meta, 16)  # what the vector server rebuilds from the published bytes
    assert type(tower) is SDMTower and tower is not ch.tower
    torch.testing.assert_close(tower.item_codes, ch.tower.item_codes)
    np.testing.assert_allclose(np.linalg.norm(art.item_vectors, axis=1), 1.0, rtol=1e-5)
    for u in (0, 1, 17, data.n_users - 1):
        items, ts = data.recent(u, R)
        x = encode_user_inputs(meta, u, {"kind": "session" if ext_user(data, u) % 2 == 0 else "loyal"}, items, ts)
        with torch.no_grad():
            served = tower(*(torch.from_numpy(a) for a in x))[0].numpy()
        np.testing.assert_allclose(served, art.user_vectors[u], atol=1e-5)
        # = the training forward at the last position of the window that ends with the user's newest click
        end = int(data.user_ptr[u + 1])
        uid, attrs, short, long, _ = ch.window_inputs(data, np.array([end - S]), np.array([S]))
        with torch.no_grad():
            trained = ch.tower.output(ch.tower.encode(uid, attrs, short=short, long=long))[0, -1].numpy()
        np.testing.assert_allclose(trained, art.user_vectors[u], atol=1e-5)
    # what the vector server runs per request: the numpy twin of the rebuilt tower, same vectors
    twin = numpy_twin(tower, meta)
    assert twin is not None and matches(twin, tower, meta, n=48)
    for u in (0, 1):
        items, ts = data.recent(u, R)
        x = encode_user_inputs(meta, u, {"kind": "session" if ext_user(data, u) % 2 == 0 else "loyal"}, items, ts)
        np.testing.assert_allclose(twin(*x), art.user_vectors[u], atol=1e-5)


@pytest.mark.parametrize("kw", [{"fusion": "sum", "session_gap_s": 1800}, {"lstm_layers": 2, "session_gap_s": 60},
                                {"side_sizes": [], "attr_sizes": [], "use_user_id": False}])
def test_numpy_twin_matches_the_torch_tower(kw):
    torch.manual_seed(1)
    args = {"n_users": 30, "n_items": 50, "attr_sizes": [3, 4], "side_sizes": [5, 2], "dim": 8, "short_n": 4,
            "long_n": 6, "num_heads": 2, **kw}
    tower = SDMTower(**args).eval()
    with torch.no_grad():
        if tower.n_side:
            tower.item_codes[:50] = torch.stack([torch.arange(50) % 6, torch.arange(50) % 3], 1)  # some unknown
        tower.trained_user[::4] = False
    meta = {"n_users": 30, "n_items": 50, "recent_n": 10, "attr_columns": ["a", "b"][:len(args["attr_sizes"])],
            "attr_vocab": {"a": {"x": 1, "y": 2}, "b": {"p": 1, "q": 3}}}
    twin = numpy_twin(tower, {**meta, "arch": "sdm"})
    assert twin is not None and matches(twin, tower, meta, n=64)


def test_posted_event_changes_the_answer_of_the_vector_server(data, fitted, tmp_path):
    """Real Redis, the real vector server process, the published SDM channel: a click posted a moment ago (recorded
    the way the feature server records it) changes the tower's vector and the answer."""
    from test_vector_server import post, push_event, wait_versions, write_user_features

    ch = fitted
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(yaml.safe_dump({"channels": {"sdm": {"kind": "u2i", "model": "sdm", "params": FAST,
                                                        "index": {"type": "flat"}}}}))
    art = ch.artifacts(data)["u2i"]
    u = next(j for j in range(data.n_users) if ext_user(data, j) % 2 == 0)  # a session user
    uid = data.user_map.ids[u]
    items, ts = data.recent(u, R)
    with LocalRedis() as rds:
        stores = RedisStores(rds.url, Keyspace())
        try:
            ver = publish_channel(stores, load_config(cfg).get("sdm"), {"u2i": art}, data, tmp_path / "art",
                                  progress=False)
            publish_id_map(stores, "item", IdMap(data.item_map.ids))
            publish_id_map(stores, "user", IdMap(data.user_map.ids))
            recent = [[data.item_map.ids[i], int(t)] for i, t in zip(items, ts, strict=True)]
            write_user_features(stores, "f1", {uid: {"recent": recent, "attrs": {"kind": "session"}}})
            env = {**os.environ, "REDIS_URL": rds.url, "ARTIFACTS_DIR": str(tmp_path / "art"),
                   "CHANNELS_CONFIG": str(cfg), "VECTOR_POLL_S": "0.2", "OMP_NUM_THREADS": "1",
                   "VECTOR_USER_CACHE_MB": "0"}
            port = free_port()
            server = ServerProcess(["services.vector_server", "serve", "--port", str(port)], env, port,
                                   tmp_path / "server.log").start()
            try:
                wait_versions(server.url, {"sdm": ver})
                before = post(server.url, {"channel": "sdm", "k": 20, "user_id": uid}).json()
                assert before["source"] == "tower"
                np.testing.assert_allclose(before["scores"][0], float(np.max(art.item_vectors @ art.user_vectors[u])),
                                           rtol=1e-4)
                # three clicks in a cluster other than the current session's, a moment after the last one
                other = (int(cluster(data, items[0])[0]) + 2) % C
                new = [f"i{other * PER + j:03d}" for j in (1, 2, 3)]
                for j, item in enumerate(new):
                    push_event(stores, uid, item, int(ts[0]) + 60 * (j + 1))
                after = post(server.url, {"channel": "sdm", "k": 20, "user_id": uid}).json()
                assert after["source"] == "tower" and after["ids"] != before["ids"]
                want = encode_user_inputs(art.user_tower_meta, u, {"kind": "session"},
                                          [data.item_map.get(x) for x in new[::-1]] + list(items),
                                          [int(ts[0]) + 60 * j for j in (3, 2, 1)] + list(ts))
                with torch.no_grad():
                    q = ch.tower(*(torch.from_numpy(a) for a in want))[0].numpy()
                np.testing.assert_allclose(after["scores"][0], float(np.max(art.item_vectors @ q)), rtol=1e-4)
                assert np.mean(cluster(data, after["ids"][:10]) == other) > np.mean(
                    cluster(data, before["ids"][:10]) == other)
            finally:
                server.stop()
        finally:
            stores.close()
