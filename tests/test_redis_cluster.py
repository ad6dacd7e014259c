"""The product on a real Redis Cluster (docs/redis_cluster.md): 3 masters + 3 replicas on free ports, a nightly-style
publish in prefix/cluster mode, the three services serving /recall, /events and /search from it, the hot-path reader
following MOVED and ASK, and a master killed under load (its replica takes over; the services recover by
themselves: 503s in the window, no 500s, no wrong answers)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import pytest
import redis
from conftest import ServerProcess, free_port
from test_recall_server import CONFIG, PUBLISHERS, wait_until_served

from common.ids import load_id_map
from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.local_cluster import LocalCluster, cluster_support
from common.publish import Publisher, collect_garbage, current_version
from common.redis_cluster import ClusterReads, sync_cluster
from common.redis_conn import RedisStores
from common.settings import Settings

pytestmark = pytest.mark.skipif(cluster_support() is not None, reason=f"no local Redis Cluster: {cluster_support()}")

KS = Keyspace(mode="prefix", cluster=True)


def nightly(settings: Settings, data_dir, config_path) -> dict:
    """The nightly job (in-process) into the cluster; the train data as it indexed it, and the versions."""
    from trainer.data.io import load_dataset
    from trainer.data.train_data import TrainData
    from trainer.nightly import run_nightly

    summary = run_nightly(settings, data_dir=data_dir, config_path=config_path, progress=False)
    assert summary["status"] == "ok", summary
    stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
    try:
        ds = load_dataset(data_dir)
        data = TrainData.from_frame(ds.interactions, ds.users, ds.items, user_map=load_id_map(stores, "user"),
                                    item_map=load_id_map(stores, "item"))
        return {"data": data, "versions": {c: current_version(stores, c) for c in PUBLISHERS}}
    finally:
        stores.close()


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory):
    from trainer.synth import write_synthetic

    root = tmp_path_factory.mktemp("cluster")
    cluster = LocalCluster(data_dir=root / "redis", node_timeout_ms=1000).start()
    procs: dict[str, ServerProcess] = {}
    try:
        data_dir = write_synthetic(root / "data", n_users=200, n_items=150, n_clicks=4000, seed=7, progress=False)
        config_path = root / "channels.yaml"
        config_path.write_text(CONFIG)
        settings = Settings(redis_url=cluster.url, redis_key_mode="prefix", redis_cluster=True,
                            artifacts_dir=root / "artifacts", channels_config=config_path, run_dir=root / "run")
        published = nightly(settings, data_dir, config_path)
        ports = {"feature": free_port(), "vector": free_port(), "recall": free_port()}
        env = {**os.environ, "REDIS_URL": cluster.url, "REDIS_KEY_MODE": "prefix", "REDIS_CLUSTER": "true",
               "ARTIFACTS_DIR": str(settings.artifacts_dir), "CHANNELS_CONFIG": str(config_path),
               "RUN_DIR": str(settings.run_dir), "OMP_NUM_THREADS": "1",
               "VECTOR_URL": f"http://127.0.0.1:{ports['vector']}", "FEATURE_URL": f"http://127.0.0.1:{ports['feature']}"}
        for name in ("feature", "vector", "recall"):
            procs[name] = ServerProcess([f"services.{name}_server", "serve", "--port", str(ports[name])], env,
                                        ports[name], root / f"{name}.log")
        starters = [threading.Thread(target=p.start) for p in procs.values()]  # three imports at once
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        recall = httpx.Client(base_url=procs["recall"].url, timeout=10.0)
        feature = httpx.Client(base_url=procs["feature"].url, timeout=10.0)
        vector = httpx.Client(base_url=procs["vector"].url, timeout=10.0)
        wait_until_served(recall, published["versions"])
        yield {"cluster": cluster, "settings": settings, "procs": procs, "recall": recall, "feature": feature,
               "vector": vector, **published}
        for c in (recall, feature, vector):
            c.close()
    finally:
        for p in procs.values():
            p.stop()
        cluster.stop()


def warm_users(stack, n: int) -> list[str]:
    data = stack["data"]
    return [data.user_map.ids[u] for u in sorted(range(data.n_users), key=lambda u: -(data.user_ptr[u + 1] - data.user_ptr[u]))[:n]]


def history(stack, user_id: str) -> set[str]:
    data = stack["data"]
    items, _ = data.history(data.user_map.get(user_id))
    return {data.item_map.ids[i] for i in items}


def recall(stack, **params) -> dict:
    r = stack["recall"].get("/recall", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_publish_spreads_keys_over_every_master_and_keeps_a_user_on_one(cluster_stack):
    cluster = cluster_stack["cluster"]
    client = sync_cluster(cluster.url)
    try:
        per_master = [client.dbsize(target_nodes=n) for n in client.get_primaries()]
        assert len(per_master) == 3 and min(per_master) > 0.2 * sum(per_master), per_master
        fver = cluster_stack["versions"][FEATURES_CHANNEL]
        user = warm_users(cluster_stack, 1)[0]
        assert client.get(KS.user_features(fver, user)) is not None
        # what a request reads about one user lives on one node: one round trip
        keys = [KS.user_features(fver, user), KS.realtime_recent(user), KS.realtime_counters(user),
                KS.u2u("usercf_u2u", "usercf", cluster_stack["versions"]["usercf"], user)]
        assert len({int(client.cluster_keyslot(k)) for k in keys}) == 1
        assert len({int(client.cluster_keyslot(KS.current(c))) for c in cluster_stack["versions"]}) == 1
    finally:
        client.close()


def test_garbage_collection_scans_every_master(cluster_stack):
    stores = RedisStores(cluster_stack["settings"].redis_url, KS)
    try:
        versions = []
        for j in range(3):
            pub = Publisher(stores, "toy", grace_s=3600, keep=1)
            v = pub.begin()
            pub.write("itemcf_i2i", ((KS.i2i("itemcf_i2i", "toy", v, i), b"%d" % j) for i in range(300)))
            pub.write("usercf_u2u", ((KS.u2u("usercf_u2u", "toy", v, f"u{i}"), b"%d" % j) for i in range(300)))
            pub.commit({"n_items": 0})
            versions.append(v)
        client = stores("meta")

        def on_each_master(v: str) -> list[int]:
            return [sum(1 for s in ("itemcf_i2i", "usercf_u2u") for _ in client.scan_iter(
                match=KS.version_pattern(s, "toy", v), count=1000, target_nodes=n)) for n in client.get_primaries()]

        assert all(min(on_each_master(v)) > 0 for v in versions)  # each version spread over the three masters
        deleted = collect_garbage(stores, "toy", grace_s=3600, keep=1, now=time.time() + 3601)
        assert sorted(deleted) == versions[:2]
        assert [sum(on_each_master(v)) for v in versions] == [0, 0, 600]
        assert current_version(stores, "toy") == versions[-1]
    finally:
        stores.close()


def test_recall_events_and_search_on_the_cluster(cluster_stack):
    user = warm_users(cluster_stack, 3)[2]
    before = recall(cluster_stack, user_id=user, k=50, explain="true")
    assert before["cold_start"] is False and before["versions"]["itemcf"] == cluster_stack["versions"]["itemcf"]
    assert all(c["status"] == "ok" for c in before["channels"].values()), before["channels"]
    assert not {it["item_id"] for it in before["items"]} & history(cluster_stack, user)

    client = sync_cluster(cluster_stack["cluster"].url)
    try:
        log_before = client.xlen(KS.event_log())
        clicked = [it["item_id"] for it in before["items"][:3]]
        batch = [{"user_id": user, "item_id": i, "event_id": f"e-{user}-{i}"} for i in clicked]
        r = cluster_stack["feature"].post("/events", json=batch)
        assert r.status_code == 200 and r.json() == {"accepted": 3}, r.text
        again = cluster_stack["feature"].post("/events", json=batch)  # a client retry: deduplicated
        assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicates": 3}, again.text
        assert client.xlen(KS.event_log()) == log_before + 3
        assert int(client.get(KS.realtime_item_clicks(clicked[0]))) == 1
    finally:
        client.close()
    stores = RedisStores(cluster_stack["settings"].redis_url, KS)
    try:  # the nightly's consumer folds them from the log on the cluster
        from trainer.event_log import archive_new_events

        folded = archive_new_events(stores, cluster_stack["settings"]).new
        assert sorted(folded["item_id"].astype(str)) == sorted(clicked)
    finally:
        stores.close()
    feats = cluster_stack["feature"].get(f"/users/{user}").json()
    assert feats["realtime_clicks"] == 3 and [i for i, _ in feats["recent"][:3]] == clicked[::-1]
    item = cluster_stack["feature"].get(f"/items/{clicked[0]}").json()
    assert item["realtime_clicks"] == 1

    after = recall(cluster_stack, user_id=user, k=50, explain="true")
    assert not {it["item_id"] for it in after["items"]} & set(clicked)  # seen now

    def itemcf(body: dict) -> set[str]:
        return {it["item_id"] for it in body["items"] if "itemcf" in it["channels"]}

    assert itemcf(after) - itemcf(before)  # the new clicks are the newest i2i anchors

    r = cluster_stack["vector"].post("/search", json={"channel": "mf", "user_id": user, "k": 10, "exclude_seen": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == cluster_stack["versions"]["mf"] and len(body["item_ids"]) == 10
    assert not set(body["item_ids"]) & (history(cluster_stack, user) | set(clicked))  # seen read from the cluster


def test_hot_path_reader_follows_moved_and_ask(cluster_stack):
    cluster = cluster_stack["cluster"]
    admin = sync_cluster(cluster.url)
    keys = [f"probe:{i}" for i in range(40)]
    for k in keys:
        admin.set(k, k)
    key = "probe:ask"  # a slot being migrated: the key is already on the target, the source answers ASK
    slot = admin.keyslot(key)
    src = admin.get_node_from_key(key)
    dst = next(n for n in admin.get_primaries() if n.name != src.name)
    src_c, dst_c = redis.Redis(host=src.host, port=src.port), redis.Redis(host=dst.host, port=dst.port)

    async def reads_follow() -> None:
        reads = ClusterReads(cluster.url, timeout_s=2.0)
        try:
            assert await reads.mget(keys) == [k.encode() for k in keys]  # per-slot MGETs over three nodes
            # a stale slot map (as after a resharding): every node answers MOVED, the reader follows and learns
            reads._slots = [reads._slots[admin.keyslot("probe:0")]] * len(reads._slots)
            reads._refreshed_at = time.monotonic() + 3600  # no proactive refresh: only the MOVED replies teach it
            assert await reads.mget(keys) == [k.encode() for k in keys]
            assert len(set(reads._slots)) == 3
            assert (await reads.execute([("GET", key)]))[0] == b"on-target"
        finally:
            reads.close()

    try:
        dst_c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_c.cluster("myid"))
        src_c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_c.cluster("myid"))
        pipe = dst_c.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.set(key, b"on-target")
        pipe.execute()
        asyncio.run(reads_follow())
    finally:
        pipe = dst_c.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.delete(key)
        pipe.execute()
        for c in (src_c, dst_c):
            c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            c.close()
        admin.delete(*keys)
        admin.close()


def test_master_killed_under_load_fails_over_and_services_recover(cluster_stack):
    """Runs last: kills the master that holds every meta key (and a third of the users) while /recall requests
    flow. Every answer is a 200 equal to the one before the kill or a 503; the services follow the promoted
    replica without a restart."""
    cluster: LocalCluster = cluster_stack["cluster"]
    users = warm_users(cluster_stack, 12)
    baseline = {u: recall(cluster_stack, user_id=u, k=20, explain="true") for u in users}
    pids = {n: p.proc.pid for n, p in cluster_stack["procs"].items()}
    log: list[tuple[float, str, int, dict | None]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=cluster_stack["procs"]["recall"].url, timeout=10.0) as c:
            j = 0
            while not stop.is_set():
                u = users[j % len(users)]
                j += 1
                r = c.get("/recall", params={"user_id": u, "k": 20, "explain": "true"})
                log.append((time.monotonic(), u, r.status_code, r.json() if r.status_code == 200 else None))
                time.sleep(0.01)

    def all_ok(body: dict | None) -> bool:
        return body is not None and all(c["status"] == "ok" for c in body["channels"].values())

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(1.0)
        victim = cluster.master_of(KS.current("itemcf"))
        t_kill = time.monotonic()
        cluster.kill(victim)
        deadline = t_kill + 40
        while time.monotonic() < deadline:  # recovered: the last 30 answers are full 200s
            tail = [e for e in log if e[0] > t_kill][-30:]
            if len(tail) == 30 and all(s == 200 and all_ok(b) for _, _, s, b in tail):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        loader.join(30)
    statuses = {s for _, _, s, _ in log}
    assert statuses <= {200, 503}, statuses
    after = [e for e in log if e[0] > t_kill]
    tail = after[-30:]
    assert len(tail) == 30 and all(s == 200 and all_ok(b) for _, _, s, b in tail), \
        f"no recovery within 40 s: {[(round(t - t_kill, 2), s) for t, _, s, _ in after[-10:]]}"
    degraded = 0
    for _, u, s, body in log:
        if s != 200:
            continue
        assert body["versions"] == baseline[u]["versions"]
        assert not {it["item_id"] for it in body["items"]} & history(cluster_stack, u)
        if all_ok(body):
            assert body["items"] == baseline[u]["items"], f"user {u}: a different answer"
        else:
            degraded += 1
    bad = [t for t, _, s, b in after if s != 200 or not all_ok(b)]
    window = (bad[-1] - t_kill) if bad else 0.0
    print(f"\nfailover: {len(after)} requests after the kill, {sum(s == 503 for _, _, s, _ in after)} × 503, "
          f"{degraded} degraded 200s, last non-full answer {window:.2f}s after the kill")
    assert all(p.proc.poll() is None and p.proc.pid == pids[n] for n, p in cluster_stack["procs"].items())
    # every service follows the new master: health, events, search
    for name in ("recall", "feature", "vector"):
        assert cluster_stack[name].get("/healthz").status_code == 200, name
    r = cluster_stack["feature"].post("/events", json=[{"user_id": users[0], "item_id": baseline[users[0]]["items"][0]["item_id"]}])
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    r = cluster_stack["vector"].post("/search", json={"channel": "mf", "user_id": users[1], "k": 5})
    assert r.status_code == 200, r.text
    cluster.wait_ok(timeout=20, replicas=False)  # the replica is a master now; the cluster is whole again
    assert cluster.master_of(KS.current("itemcf")).port != victim.port
