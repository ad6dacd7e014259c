"""Shared fixtures: a real Redis (private server, or REDIS_URL), clean DBs, settings, helpers to run servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from common.keyspace import Keyspace
from common.local_redis import LocalRedis
from common.redis_conn import RedisStores, _url_for_db
from common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis for the whole session: REDIS_URL if set, else a private server on a free port."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with LocalRedis() as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server):
    """The session Redis, with every DB this test may use flushed before and after."""
    def flush():
        for db in range(16):
            c = redis.Redis.from_url(_url_for_db(redis_server, db))  # a URL's /0 path would override db=db
            try:
                c.flushdb()
            finally:
                c.close()
    flush()
    yield redis_server
    flush()


@pytest.fixture
def settings(redis_url, tmp_path) -> Settings:
    return Settings(redis_url=redis_url, artifacts_dir=tmp_path / "artifacts", run_dir=tmp_path / "run")


@pytest.fixture
def stores(settings):
    s = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
    yield s
    s.close()


# A small channel config for the end-to-end stack tests (make up / compose): one channel of each kind but u2u.
TINY_CONFIG = """
default_k: 50
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 30}
  itemcf: {kind: i2i, model: itemcf, quota: 60, params: {top_k: 50}}
  mf: {kind: u2i, model: mf, quota: 60, timeout_ms: 1000, params: {dim: 16, epochs: 5}}
  mf_i2i: {kind: i2i, from: mf, weight: 0.3, quota: 30}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A service started with `python -m ...` on a free port; stopped on exit."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path):
        self.args, self.env, self.port, self.log = args, env, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", *self.args], env=self.env, cwd=ROOT,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                httpx.get(self.url + "/healthz", timeout=1.0)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.args} did not start listening:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start_server(tmp_path, settings):
    """Factory: start_server(["services.feature_server", "serve"], extra_env) → running ServerProcess."""
    started: list[ServerProcess] = []

    def _start(args: list[str], env: dict[str, str] | None = None, port: int | None = None) -> ServerProcess:
        port = port or free_port()
        full_env = {**os.environ, "REDIS_URL": settings.redis_url, "ARTIFACTS_DIR": str(settings.artifacts_dir),
                    "OMP_NUM_THREADS": "1", **(env or {})}
        proc = ServerProcess([*args, "--port", str(port)], full_env, port, tmp_path / f"server-{port}.log")
        started.append(proc)
        return proc.start()

    yield _start
    for p in started:
        p.stop()
