"""A real Ray cluster of local processes: one head and N worker nodes on 127.0.0.1, each `ray start --block` in a
process group of its own, with a private temp dir and free ports, so `stop()` ends exactly these processes and
nothing else on the machine (never `ray stop`, which stops every Ray on the host). Used by the tests and the
benchmark (scripts/bench_ray.py); on real machines run `ray start` as in docs/scaling.md.

    with LocalRayCluster(workers=1, cpus_per_node=1) as cluster:
        engine = RayEngine(address=cluster.address)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 90.0
START_TRIES = 3  # attempts per worker node


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A port free now, never handed out before by this process (Ray refuses one port for two components)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _ray_cli() -> str:
    """The `ray` command of this interpreter's environment."""
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else "ray"


class LocalRayCluster:
    """Head + `workers` worker nodes, `cpus_per_node` CPUs each, `object_store_mb` of object store each."""

    def __init__(self, workers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 256,
                 temp_dir: str | Path | None = None):
        self.workers, self.cpus, self.store_mb = workers, cpus_per_node, object_store_mb
        self._own_temp = temp_dir is None
        # short: Ray's unix socket paths live under it (107-byte limit)
        self.temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = _free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _node(self, head: bool, n: int) -> subprocess.Popen:
        args = [_ray_cli(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
                "--object-store-memory", str(self.store_mb * 2**20), "--disable-usage-stats",
                "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
                "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
                "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port())]
        if head:
            args += ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir), "--include-dashboard",
                     "false", "--dashboard-port", str(_free_port())]
        else:
            args += ["--address", self.address]
        log = open(self._log(n), "ab")  # noqa: SIM115 - closed below, once the process has its own copy
        # no drain on SIGTERM (Ray waits up to 30 s for a node's leftover actors): stop() comes after the jobs
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        env.pop("RAY_ADDRESS", None)
        with log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append(proc)
        return proc

    def _wait(self, ready, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"ray start did not come up within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")

    def start(self) -> LocalRayCluster:
        """Start the head, then the worker nodes one after the other; returns when every node has started.

        One node at a time: a node that starts while another is still coming up competes with it for the CPUs,
        and Ray gives a starting raylet a fixed 30 s to register with the GCS (on 2 busy cores a first, cold start
        can miss that: "The current node timed out during startup"). A worker node that fails to start is ended
        (its whole process group) and started again on fresh ports, up to START_TRIES times."""
        try:
            head = self._node(True, 0)
            self._wait(lambda: _listening(self.port), head, self._log(0))
            self._wait(self._started(0), head, self._log(0))
            for n in range(1, self.workers + 1):
                for attempt in range(1, START_TRIES + 1):
                    proc = self._node(False, n)
                    try:
                        self._wait(self._started(n), proc, self._log(n))
                        break
                    except (RuntimeError, TimeoutError):
                        _end_group(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=10)
                        self.procs.remove(proc)
                        if attempt == START_TRIES:
                            raise
        except BaseException:
            self.stop()
            raise
        return self

    def _log(self, n: int) -> Path:
        return self.temp_dir / f"node-{n}.log"

    def _started(self, n: int):
        return lambda: "Ray runtime started" in self._log(n).read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM each `ray start --block` (it stops its raylet, GCS and workers), SIGKILL whatever is left of its
        process group after `timeout_s`; then remove the temp dir."""
        for proc in reversed(self.procs):  # workers first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            while (proc.poll() is None or _group_alive(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(proc.pid):
                _end_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _end_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: a node's processes outlive `ray start`
    by a moment, are re-parented to PID 1, and where PID 1 does not reap (a container's) stay <defunct>."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            return True
    return False
