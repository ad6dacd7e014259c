"""A flood of fresh user ids through POST /events (docs/reliability.md, "Redis memory"), for real: per-user real-time
state carries a TTL, and Redis's volatile-lru policy at `maxmemory` evicts only those keys. Redis stays within its
bound, every published artifact stays intact, and the feature server keeps accepting events."""

from __future__ import annotations

import os
import uuid

import httpx
import pytest
import redis
from conftest import TINY_CONFIG, ServerProcess, free_port

from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.local_redis import LocalRedis
from common.publish import current_version, missing_versions
from common.redis_conn import RedisStores
from common.settings import Settings
from trainer.nightly import run_nightly

HEADROOM = 8 * 2**20  # maxmemory = what the artifacts take + this
USERS = 40_000  # fresh ids: their real-time state alone would take well over HEADROOM
BATCH = 1000


def artifact_keys(stores: RedisStores, versions: dict[str, str]) -> int:
    """Every key of the published versions, in every store."""
    ks = stores.keyspace
    return sum(len(list(stores(s).scan_iter(match=ks.version_pattern(s, c, v), count=10_000)))
               for c, v in versions.items() for s in ks.stores if s != "meta")


@pytest.fixture
def bounded(tmp_path):
    from trainer.synth import write_synthetic

    data = write_synthetic(tmp_path / "data", n_users=300, n_items=200, n_clicks=6000, seed=4, progress=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(TINY_CONFIG)
    server = LocalRedis(data_dir=tmp_path / "redis").start()  # (the local Redis's policy: volatile-lru)
    settings = Settings(redis_url=server.url, artifacts_dir=tmp_path / "artifacts", channels_config=cfg)
    stores = RedisStores(server.url, Keyspace.from_settings(settings))
    try:
        assert run_nightly(settings, data, cfg, progress=False)["status"] == "ok"
        yield settings, stores, server
    finally:
        stores.close()
        server.stop()


def test_a_fresh_user_flood_stays_within_maxmemory_and_never_evicts_artifacts(bounded, tmp_path):
    settings, stores, server = bounded
    r = redis.Redis.from_url(server.url)
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
    served = [FEATURES_CHANNEL, "popular", "itemcf", "mf"]
    versions = {c: current_version(stores, c) for c in served}
    n_artifacts = artifact_keys(stores, versions)
    bound = int(r.info("memory")["used_memory"]) + HEADROOM
    r.config_set("maxmemory", bound)
    port = free_port()
    env = {**os.environ, "REDIS_URL": server.url, "OMP_NUM_THREADS": "1"}
    feature = ServerProcess(["services.feature_server", "serve", "--port", str(port)], env, port,
                            tmp_path / "feature.log").start()
    statuses: set[int] = set()
    peak = 0
    try:
        with httpx.Client(base_url=feature.url, timeout=30) as c:
            for b in range(USERS // BATCH):
                events = [{"user_id": f"flood-{uuid.uuid4().hex}", "item_id": str(1 + (b * BATCH + j) % 150)}
                          for j in range(BATCH)]
                resp = c.post("/events", json=events)
                statuses.add(resp.status_code)
                peak = max(peak, int(r.info("memory")["used_memory"]))
            last = events[-1]["user_id"]
            assert c.get(f"/users/{last}").json()["clicks"] == 1  # the newest user is there, read back
            # LRU sampling may later take any real-time key, the newest too: lift the bound, then write one more
            # user whose keys' TTLs are read below
            r.config_set("maxmemory", 0)
            probe = f"probe-{uuid.uuid4().hex}"
            assert c.post("/events", json=[{"user_id": probe, "item_id": "1"}]).status_code == 200
    finally:
        feature.stop()
    assert statuses == {200}, statuses
    stats = r.info("stats")
    assert stats["evicted_keys"] > 0  # the bound was reached: old real-time state went
    # Redis evicts before each command, so one batch's script may pass the bound by its own size (< 1 MB here)
    assert peak <= bound + 2**20, (peak, bound)
    # nothing published was touched
    assert missing_versions(stores, served) == {}
    assert artifact_keys(stores, versions) == n_artifacts
    # per-user and per-item real-time keys carry the TTL
    ks = stores.keyspace
    assert 0 < stores("user_features").ttl(ks.realtime_recent(probe)) <= settings.realtime_ttl_s
    assert 0 < stores("user_features").ttl(ks.realtime_counters(probe)) <= settings.realtime_ttl_s
    assert 0 < stores("item_features").ttl(ks.realtime_item_clicks("1")) <= settings.realtime_ttl_s
    print(f"{USERS} fresh users: peak {peak / 2**20:.1f} MB for a bound of {bound / 2**20:.1f} MB, "
          f"{stats['evicted_keys']} real-time keys evicted, {n_artifacts} artifact keys intact")


def test_the_nightly_warns_when_redis_may_evict_artifacts(settings, stores, tmp_path):
    from trainer.synth import write_synthetic

    data = write_synthetic(tmp_path / "data", n_users=100, n_items=80, n_clicks=1500, seed=4, progress=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(TINY_CONFIG)
    meta = stores("meta")
    old = meta.config_get("maxmemory-policy")["maxmemory-policy"]
    meta.config_set("maxmemory-policy", "allkeys-lru")
    try:
        summary = run_nightly(settings, data, cfg, progress=False)
    finally:
        meta.config_set("maxmemory-policy", old)
    assert summary["status"] == "ok"
    assert any("allkeys-lru" in w and "volatile-lru" in w for w in summary["warnings"])
