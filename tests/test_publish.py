"""Versioned publishing (common/publish.py) against real Redis: atomic flip, killed writers, GC, prefix mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.publish import (
    Publisher,
    PublishError,
    collect_garbage,
    current_version,
    delete_version,
    read_manifest,
)
from common.redis_conn import RedisStores, _url_for_db

ROOT = Path(__file__).resolve().parents[1]
N_KEYS = 50

# A writer that begins a `features` publish, writes exactly 20 keys (two pipeline chunks of 10), announces its
# version and then hangs, so the test can SIGKILL it half-way.
KILLED_WRITER = """
import sys, time
from common.keyspace import Keyspace
from common.publish import Publisher
from common.redis_conn import RedisStores
url, mode = sys.argv[1:3]
stores = RedisStores(url, Keyspace(mode=mode))
pub = Publisher(stores, "features")
ver = pub.begin()
def records():
    for i in range(1000):
        if i == 25:
            print(ver, flush=True)
            time.sleep(600)
        yield stores.keyspace.user_features(ver, f"u{i}"), b"partial"
pub.write("user_features", records(), chunk=10)
pub.commit({})
"""


def publish(stores: RedisStores, channel: str = "toy", n: int = N_KEYS, tag: str = "", version: str | None = None,
            **kw) -> str:
    """Publish a toy version: n user-feature keys and n item-list keys holding `tag`."""
    ks = stores.keyspace
    pub = Publisher(stores, channel, **kw)
    v = pub.begin(version)
    pub.write("user_features", ((ks.user_features(v, f"u{i}") if channel == FEATURES_CHANNEL
                                 else ks.u2u("user_features", channel, v, f"u{i}"), f"{tag}{i}".encode())
                                for i in range(n)))
    pub.write("lists", ((ks.item_list(channel, v, f"l{i}"), tag.encode()) for i in range(n)))
    return pub.commit({"tag": tag})


def version_keys(stores: RedisStores, channel: str, version: str) -> int:
    ks = stores.keyspace
    return sum(len(stores(s).keys(ks.version_pattern(s, channel, version))) for s in ("user_features", "lists"))


def test_flip_is_atomic_for_concurrent_readers(stores):
    """A reader polling `current` never sees a version whose manifest or keys are incomplete."""
    ks = stores.keyspace
    publish(stores, tag="v0-", grace_s=3600)
    reader = RedisStores(stores.url, ks)
    problems: list[str] = []
    reads = 0
    stop = threading.Event()

    def read_loop():
        nonlocal reads
        while not stop.is_set():
            v = current_version(reader, "toy")
            man = read_manifest(reader, "toy", v)
            vals = reader("user_features").mget([ks.u2u("user_features", "toy", v, f"u{i}") for i in range(N_KEYS)])
            if man is None or man["version"] != v:
                problems.append(f"{v}: manifest {man}")
            if any(x is None for x in vals) or len({x.split(b"-")[0] for x in vals}) != 1:
                problems.append(f"{v}: incomplete or mixed values")
            reads += 1

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        for j in range(1, 6):
            pub = Publisher(stores, "toy", grace_s=3600)
            v = pub.begin()
            pub.write("user_features", ((ks.u2u("user_features", "toy", v, f"u{i}"), f"v{j}-{i}".encode())
                                        for i in range(N_KEYS)), chunk=7)
            before = current_version(stores, "toy")
            assert before != v  # written but not committed: readers still on the previous version
            pub.commit({"j": j})
            assert current_version(stores, "toy") == v
    finally:
        stop.set()
        t.join()
        reader.close()
    assert reads > 0 and problems == []


def test_failed_verification_keeps_previous_version(stores):
    v1 = publish(stores, tag="a")
    pub = Publisher(stores, "toy")
    v2 = pub.begin()
    pub.write("lists", [(stores.keyspace.item_list("toy", v2, "global"), b"x")])

    def verify():
        raise RuntimeError("spot check failed")

    with pytest.raises(PublishError, match="spot check failed"):
        pub.commit({}, verify=verify)
    assert current_version(stores, "toy") == v1
    assert stores("meta").zscore(stores.keyspace.pending("toy"), v2) is not None


@pytest.mark.parametrize("mode", ["db", "prefix"])
def test_killed_writer_leaves_previous_version_and_gc_removes_its_keys(redis_url, mode):
    stores = RedisStores(redis_url, Keyspace(mode=mode))
    ks = stores.keyspace
    try:
        v1 = publish(stores, FEATURES_CHANNEL, tag="good", grace_s=3600)
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, redis_url, mode], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            dead = proc.stdout.readline().strip()
            assert dead, proc.stderr.read()
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL

        # previous version still current and whole; the dead one is pending with its partial keys
        assert current_version(stores, FEATURES_CHANNEL) == v1
        assert stores("user_features").get(ks.user_features(v1, "u7")) == b"good7"
        assert len(stores("user_features").keys(ks.version_pattern("user_features", FEATURES_CHANNEL, dead))) == 20
        assert stores("meta").zscore(ks.pending(FEATURES_CHANNEL), dead) is not None

        assert collect_garbage(stores, FEATURES_CHANNEL, pending_ttl_s=3600) == []  # not stale yet
        assert collect_garbage(stores, FEATURES_CHANNEL, pending_ttl_s=0) == [dead]
        assert stores("user_features").keys(ks.version_pattern("user_features", FEATURES_CHANNEL, dead)) == []
        assert stores("meta").zcard(ks.pending(FEATURES_CHANNEL)) == 0
        assert current_version(stores, FEATURES_CHANNEL) == v1
        assert version_keys(stores, FEATURES_CHANNEL, v1) == 2 * N_KEYS
    finally:
        stores.close()


def test_gc_respects_grace_period_and_keep(stores):
    versions = [publish(stores, tag=f"t{j}", grace_s=3600, keep=2) for j in range(4)]
    assert all(version_keys(stores, "toy", v) == 2 * N_KEYS for v in versions)  # all within grace
    assert collect_garbage(stores, "toy", grace_s=3600, keep=2) == []
    deleted = collect_garbage(stores, "toy", grace_s=3600, keep=2, now=time.time() + 3601)
    assert sorted(deleted) == sorted(versions[:2])
    assert [version_keys(stores, "toy", v) for v in versions] == [0, 0, 2 * N_KEYS, 2 * N_KEYS]
    assert read_manifest(stores, "toy", versions[0]) is None and read_manifest(stores, "toy", versions[3])["tag"] == "t3"
    assert current_version(stores, "toy") == versions[3]
    # keep=1 with the grace long past: only the current version survives
    assert collect_garbage(stores, "toy", grace_s=0, keep=1, now=time.time() + 1) == [versions[2]]
    assert version_keys(stores, "toy", versions[3]) == 2 * N_KEYS


def test_delete_version_removes_exactly_that_version(stores):
    ks = stores.keyspace
    v1 = publish(stores, tag="a", version="V1", grace_s=3600)
    v2 = publish(stores, tag="b", version="V2", grace_s=3600)
    other = publish(stores, "toyx", tag="c", version="V1", grace_s=3600)  # same version id, other channel
    stores("user_features").set(ks.realtime_recent("u1"), b"rt")  # unversioned real-time state
    n = delete_version(stores, "toy", v1)
    assert n == 2 * N_KEYS
    assert version_keys(stores, "toy", v1) == 0
    assert version_keys(stores, "toy", v2) == 2 * N_KEYS
    assert version_keys(stores, "toyx", other) == 2 * N_KEYS
    assert stores("user_features").get(ks.realtime_recent("u1")) == b"rt"
    assert read_manifest(stores, "toy", v1) is None and read_manifest(stores, "toy", v2) is not None
    assert stores("meta").zscore(ks.versions("toy"), v1) is None
    assert current_version(stores, "toy") == v2


def test_prefix_mode_keeps_everything_in_db0(redis_url):
    stores = RedisStores(redis_url, Keyspace(mode="prefix", prefix="mr"))
    try:
        versions = [publish(stores, tag=f"p{j}", grace_s=3600, keep=1) for j in range(3)]
        db0 = redis.Redis.from_url(_url_for_db(redis_url, 0))
        keys = db0.keys("*")
        assert keys and all(k.startswith(b"mr:") for k in keys)
        assert db0.get("mr:{meta}:current:toy") == versions[-1].encode()
        for db in range(1, 16):
            c = redis.Redis.from_url(_url_for_db(redis_url, db))
            assert c.dbsize() == 0, f"db{db} not empty in prefix mode"
            c.close()
        deleted = collect_garbage(stores, "toy", grace_s=3600, keep=1, now=time.time() + 3601)
        assert sorted(deleted) == sorted(versions[:2])
        assert [version_keys(stores, "toy", v) for v in versions] == [0, 0, 2 * N_KEYS]
        assert db0.get(stores.keyspace.u2u("user_features", "toy", versions[-1], "u3")) == b"p23"
        db0.close()
    finally:
        stores.close()
