"""Start a private, real Redis Cluster (masters + replicas on free ports) for tests and benchmarks.

Every node is a `LocalRedis` started with `--cluster-enabled yes`; `redis-cli --cluster create` assigns the slots
and the replicas. A small `cluster-node-timeout` makes a killed master's failover take about a second or two.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from common.local_redis import LocalRedis, find_redis_server, free_port


def cluster_support() -> str | None:
    """None when this machine can run a local cluster, else why not (for a test's skip reason)."""
    try:
        server = find_redis_server()
    except RuntimeError as exc:
        return str(exc)
    cli = shutil.which("redis-cli")
    if cli is None:
        return "no redis-cli on PATH (needed for `redis-cli --cluster create`)"
    out = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.", out)
    if not m or int(m.group(1)) < 5:
        return f"redis-server {out.strip()!r} is older than 5.0 (no cluster support in redis-cli)"
    return None


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class LocalCluster:
    """`masters` masters with `replicas` replicas each, on 127.0.0.1; use as a context manager. `url` names one
    master (clients discover the rest)."""

    def __init__(self, data_dir: str | Path | None = None, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1000, maxmemory: str | None = None):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="mr-cluster-"))
        self.n_masters, self.n_replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.maxmemory = maxmemory
        self.nodes: list[LocalRedis] = []

    @property
    def url(self) -> str:
        return self.urls()[0]

    def urls(self) -> list[str]:
        """One URL per live node."""
        return [n.url for n in self.live()]

    def live(self) -> list[LocalRedis]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def start(self, timeout: float = 30.0) -> LocalCluster:
        why = cluster_support()
        if why:
            raise RuntimeError(f"cannot start a local Redis Cluster: {why}")
        try:
            for _ in range(self.n_masters * (1 + self.n_replicas)):
                port = _cluster_port()
                d = self.data_dir / str(port)
                node = LocalRedis(data_dir=d, port=port, aof=False, maxmemory=self.maxmemory, extra_args=[
                    "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                    "--cluster-node-timeout", str(self.node_timeout_ms)])
                self.nodes.append(node)
                node.start()
            cmd = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr}")
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0, replicas: bool = True) -> None:
        """Block until every live node says cluster_state:ok and sees every slot served, and (with `replicas`)
        every master has its replicas in sync."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                states = [self._node_ok(n, replicas) for n in self.live()]
                if states and all(ok for ok, _ in states):
                    return
                last = "; ".join(why for ok, why in states if not ok)
            except redis.exceptions.RedisError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"Redis Cluster not ok within {timeout:.0f}s: {last}")

    def _node_ok(self, node: LocalRedis, replicas: bool) -> tuple[bool, str]:
        c = redis.Redis(port=node.port, socket_timeout=1)
        try:
            info = c.cluster("info")
            ranges = c.execute_command("CLUSTER", "SLOTS")
            repl = c.info("replication")
        finally:
            c.close()
        if info.get("cluster_state") != "ok":
            return False, f"{node.port}: cluster_state {info.get('cluster_state')}"
        covered = sum(int(r[1]) - int(r[0]) + 1 for r in ranges)
        if covered != 16384:
            return False, f"{node.port}: {covered} slots covered"
        if replicas and any(len(r) - 3 < self.n_replicas for r in ranges):
            return False, f"{node.port}: a master has fewer than {self.n_replicas} replica(s)"
        if replicas and repl.get("role") == "slave" and repl.get("master_link_status") != "up":
            return False, f"{node.port}: replica not in sync"
        return True, ""

    def master_of(self, key: str) -> LocalRedis:
        """The node that serves `key`'s slot now."""
        c = redis.Redis(port=self.live()[0].port, socket_timeout=1)
        try:
            slot = int(c.cluster("keyslot", key))
            for start, end, master, *_ in c.cluster("slots"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            c.close()
        raise RuntimeError(f"no master serves the slot of {key!r}")

    def kill(self, node: LocalRedis) -> None:
        """SIGKILL one node (a crash: no shutdown, no handover)."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(5)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        self.nodes.clear()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
