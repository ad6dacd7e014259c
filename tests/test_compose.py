"""docker-compose.yml without a Docker engine: every service's declared command and environment is run as a
local process (hostnames redis/feature/vector/recall → 127.0.0.1, ports → free ports, /data volume → a temp
dir) against the test Redis; the nightly service runs once on a tiny synthetic dataset; /recall answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, TINY_CONFIG, free_port

from common.keyspace import Keyspace
from common.publish import current_version
from common.redis_conn import RedisStores

COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("nightly", "feature", "vector", "recall")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_declares_the_whole_product(compose):
    services = compose["services"]
    assert set(services) == {"redis", *APP_SERVICES}
    images = {services[s]["image"] for s in APP_SERVICES}
    assert len(images) == 1  # one image for everything
    assert all(services[s]["build"] == "." for s in APP_SERVICES)
    for s in APP_SERVICES:
        env = services[s]["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert "artifacts:/data" in services[s]["volumes"]  # one shared artifacts volume
        assert services[s]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nightly"]["command"][:5] == ["python", "-m", "trainer", "schedule", "--at"]
    for s, port in (("feature", 8001), ("vector", 8002), ("recall", 8000)):
        assert f"{port}:{port}" in services[s]["ports"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(services[s]["healthcheck"]["test"])
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert set(compose["volumes"]) == {"artifacts", "redis-data"}


def test_dockerfile_installs_torch_first_then_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1].startswith("FROM python:3.11-slim")
    torch_at = text.index("pip install torch==2.13.0")
    project_at = text.index("pip install .")
    assert torch_at < project_at
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "var" in ignored and ".git" in ignored


class Localised:
    """Rewrites a compose service's command/environment to run here."""

    def __init__(self, redis_url: str, volume: Path, ports: dict[str, int]):
        self.redis_url, self.volume, self.ports = redis_url, volume, ports
        self.port_map = {"8000": str(ports["recall"]), "8001": str(ports["feature"]), "8002": str(ports["vector"])}

    def text(self, value: str) -> str:
        value = re.sub(r"redis://redis:6379(/\d+)?", self.redis_url, value)
        for host, name in (("feature", "feature"), ("vector", "vector"), ("recall", "recall")):
            value = re.sub(rf"//{host}:\d+", f"//127.0.0.1:{self.ports[name]}", value)
        value = re.sub(r"127\.0\.0\.1:(800[012])\b", lambda m: f"127.0.0.1:{self.port_map[m.group(1)]}", value)
        value = value.replace("0.0.0.0", "127.0.0.1")
        if value == "/data" or value.startswith("/data/"):
            value = str(self.volume) + value[len("/data"):]
        return value

    def command(self, cmd: list[str]) -> list[str]:
        out = []
        for i, arg in enumerate(cmd):
            if i == 0 and arg == "python":
                out.append(sys.executable)
            elif i > 0 and cmd[i - 1] == "--port":
                out.append(self.port_map[arg])
            else:
                out.append(self.text(arg))
        return out

    def env(self, declared: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FEATURE_URL", "VECTOR_URL", "DATA_DIR")}
        env.update({k: self.text(str(v)) for k, v in declared.items()})
        return env


def test_compose_services_run_end_to_end(compose, redis_url, tmp_path):
    from trainer.synth import write_synthetic

    services = compose["services"]
    ports = {"feature": free_port(), "vector": free_port(), "recall": free_port()}
    loc = Localised(redis_url, tmp_path / "volume", ports)
    (tmp_path / "volume").mkdir()
    data = write_synthetic(tmp_path / "dataset", n_users=200, n_items=150, n_clicks=4000, seed=5, progress=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(TINY_CONFIG)
    overrides = {"CHANNELS_CONFIG": str(cfg)}  # a small channel set keeps the test fast

    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name: str, extra_env: dict | None = None) -> subprocess.Popen:
        svc = services[name]
        env = {**loc.env(svc["environment"]), **overrides, **(extra_env or {})}
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = subprocess.Popen(loc.command(svc["command"]), cwd=ROOT, env=env, stdout=logs[name].open("wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return procs[name]

    def healthy(name: str, timeout: float = 90.0) -> None:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        cmd = loc.command(test[1:])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert procs[name].poll() is None, logs[name].read_text()[-3000:]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(f"{name} never passed its healthcheck:\n{logs[name].read_text()[-3000:]}")

    try:
        # the nightly service: the scheduler runs the job at start because nothing is published yet
        nightly = start("nightly", {"DATA_DIR": str(data)})
        stores = RedisStores(redis_url, Keyspace.from_settings(_settings(loc, services)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "nightly run 1: ok" not in logs["nightly"].read_text():
            assert nightly.poll() is None, logs["nightly"].read_text()[-3000:]
            time.sleep(0.3)
        log_text = logs["nightly"].read_text()
        assert "nightly run 1: ok" in log_text, log_text[-3000:]
        versions = {c: current_version(stores, c) for c in ("features", "popular", "itemcf", "mf")}
        stores.close()
        assert all(versions.values()), versions
        nightly.terminate()  # SIGTERM: the scheduler stops cleanly between runs
        assert nightly.wait(30) == 0
        assert (tmp_path / "volume" / "artifacts").is_dir()  # artifacts land on the shared volume

        for name in ("feature", "vector"):
            start(name)
        healthy("vector")
        start("recall")
        for name in ("feature", "recall"):
            healthy(name)

        recall = f"http://127.0.0.1:{ports['recall']}"
        deadline = time.monotonic() + 60
        while True:
            body = httpx.get(f"{recall}/recall", params={"user_id": "1", "k": 20, "explain": "true"}, timeout=10).json()
            if all(body["channels"][c]["status"] == "ok" for c in ("popular", "itemcf", "mf", "mf_i2i")):
                break
            assert time.monotonic() < deadline, body["channels"]
            time.sleep(0.3)
        assert len(body["items"]) == 20 and body["versions"]["itemcf"] == versions["itemcf"]
        # the declared FEATURE_URL points the services at each other: a click through it changes the answer
        r = httpx.post(f"http://127.0.0.1:{ports['feature']}/events",
                       json=[{"user_id": "1", "item_id": body["items"][0]["item_id"]}], timeout=10)
        assert r.status_code == 200
        after = httpx.get(f"{recall}/recall", params={"user_id": "1", "k": 20}, timeout=10).json()
        assert body["items"][0]["item_id"] not in [it["item_id"] for it in after["items"]]
        m = httpx.get(f"{recall}/metrics", timeout=10).text  # 2 workers: multi-process metrics
        assert "recall_request_seconds_count" in m
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait(5)


def _settings(loc: Localised, services: dict):
    from common.settings import Settings

    env = loc.env(services["nightly"]["environment"])
    return Settings(redis_url=env["REDIS_URL"])
