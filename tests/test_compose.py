"""docker-compose.yml without a Docker engine: every service's declared command and environment is run as a
local process (hostnames redis/feature/vector/recall → 127.0.0.1, ports → free ports, /data volume → a temp
dir, `${VAR:-default}` → its default); the redis service's own command runs too (password, AOF, eviction policy),
and every other service reaches it with the declared password; the nightly service runs once on a tiny synthetic
dataset; /recall answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from conftest import ROOT, TINY_CONFIG, free_port

from common.keyspace import Keyspace
from common.local_redis import find_redis_server, wait_for_redis
from common.publish import current_version
from common.redis_conn import RedisStores

COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("nightly", "feature", "vector", "recall")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_declares_the_whole_product(compose):
    services = compose["services"]
    default = {s for s, d in services.items() if not d.get("profiles")}  # what `docker compose up` starts
    assert default == {"redis", *APP_SERVICES}
    assert {s for s in services if s not in default} == {"ray-head", "ray-worker"}  # opt-in: `--profile ray`
    assert all(services[s]["profiles"] == ["ray"] for s in ("ray-head", "ray-worker"))
    images = {services[s]["image"] for s in APP_SERVICES}
    assert len(images) == 1  # one image for everything
    assert all(services[s]["build"] == "." for s in APP_SERVICES)
    for s in APP_SERVICES:
        env = services[s]["environment"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:-[^}]+\}@redis:6379/0", env["REDIS_URL"])  # the password
        assert "artifacts:/data" in services[s]["volumes"]  # one shared artifacts volume
        for key in ("API_WRITE_KEY", "API_READ_KEY"):  # API keys on, each overridable from the environment
            assert re.fullmatch(rf"\$\{{{key}:-[^}}]+\}}", env[key]), env.get(key)
        assert services[s]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nightly"]["command"][:5] == ["python", "-m", "trainer", "schedule", "--at"]
    for s, port in (("feature", 8001), ("vector", 8002), ("recall", 8000)):
        # published on the loopback interface unless BIND_ADDRESS says otherwise
        assert [interpolate(p) for p in services[s]["ports"]] == [f"127.0.0.1:{port}:{port}"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(services[s]["healthcheck"]["test"])
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "ports" not in services["redis"]  # Redis is reachable from the other containers only
    cmd = [interpolate(a) for a in services["redis"]["command"]]
    opts: dict[str, str] = {}
    for arg in cmd[1:]:  # "--name value [value …]"
        if arg.startswith("--"):
            name = arg
            opts[name] = ""
        else:
            opts[name] = f"{opts[name]} {arg}".strip()
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "everysec"
    assert opts["--maxmemory-policy"] == "volatile-lru" and opts["--maxmemory"] == "2gb"
    password = opts["--requirepass"]
    assert password and services["redis"]["environment"]["REDISCLI_AUTH"] == services["redis"]["command"][-1]
    assert all(interpolate(services[s]["environment"]["REDIS_URL"]) == f"redis://:{password}@redis:6379/0"
               for s in APP_SERVICES)
    assert set(compose["volumes"]) == {"artifacts", "redis-data"}


def test_dockerfile_installs_torch_first_then_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1].startswith("FROM python:3.11-slim")
    torch_at = text.index("pip install torch==2.13.0")
    project_at = text.index("pip install .")
    assert torch_at < project_at
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "var" in ignored and ".git" in ignored


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` substitution (from `env`, default: no variables set)."""
    env = env or {}
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def start_compose_redis(services: dict, port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    """The redis service's declared command, run here on `port` (its image's binary → the local redis-server)."""
    cmd = [interpolate(a) for a in services["redis"]["command"]]
    assert cmd[0] == "redis-server"
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([find_redis_server(), *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(data_dir), "--daemonize", "no", "--logfile", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


class Localised:
    """Rewrites a compose service's command/environment to run here."""

    def __init__(self, redis_url: str, volume: Path, ports: dict[str, int]):
        self.redis_url, self.volume, self.ports = redis_url, volume, ports
        self.port_map = {"8000": str(ports["recall"]), "8001": str(ports["feature"]), "8002": str(ports["vector"])}

    def text(self, value: str) -> str:
        value = interpolate(value)
        value = re.sub(r"redis://(:[^@]*@)?redis:6379(/\d+)?", lambda m: self.redis_url.replace(
            "redis://", "redis://" + (m.group(1) or ""), 1), value)
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


def test_compose_services_run_end_to_end(compose, tmp_path):
    from trainer.synth import write_synthetic

    services = compose["services"]
    ports = {"feature": free_port(), "vector": free_port(), "recall": free_port()}
    redis_port = free_port()
    redis_proc = start_compose_redis(services, redis_port, tmp_path / "redis-data", tmp_path / "redis.log")
    loc = Localised(f"redis://127.0.0.1:{redis_port}/0", tmp_path / "volume", ports)

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
        password_url = loc.text(services["nightly"]["environment"]["REDIS_URL"])
        wait_for_redis(password_url, 10, redis_proc)
        with pytest.raises(redis.exceptions.AuthenticationError):  # no password, no access
            redis.Redis(port=redis_port).ping()
        config = redis.Redis.from_url(password_url).config_get("*")
        assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "volatile-lru"
        assert int(config["maxmemory"]) == 2 * 2**30

        # the nightly service: the scheduler runs the job at start because nothing is published yet
        nightly = start("nightly", {"DATA_DIR": str(data)})
        stores = RedisStores(password_url, Keyspace.from_settings(_settings(loc, services)))
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
        declared = loc.env(services["recall"]["environment"])  # compose turns the API keys on
        read, write = {"x-api-key": declared["API_READ_KEY"]}, {"x-api-key": declared["API_WRITE_KEY"]}
        assert httpx.get(f"{recall}/recall", params={"user_id": "1"}, timeout=10).status_code == 401
        deadline = time.monotonic() + 60
        while True:
            body = httpx.get(f"{recall}/recall", params={"user_id": "1", "k": 20, "explain": "true"}, headers=read,
                             timeout=10).json()
            if all(body["channels"][c]["status"] == "ok" for c in ("popular", "itemcf", "mf", "mf_i2i")):
                break
            assert time.monotonic() < deadline, body["channels"]
            time.sleep(0.3)
        assert len(body["items"]) == 20 and body["versions"]["itemcf"] == versions["itemcf"]
        # the declared FEATURE_URL points the services at each other: a click through it changes the answer
        r = httpx.post(f"http://127.0.0.1:{ports['feature']}/events",
                       json=[{"user_id": "1", "item_id": body["items"][0]["item_id"]}], headers=write, timeout=10)
        assert r.status_code == 200
        after = httpx.get(f"{recall}/recall", params={"user_id": "1", "k": 20}, headers=read, timeout=10).json()
        assert body["items"][0]["item_id"] not in [it["item_id"] for it in after["items"]]
        m = httpx.get(f"{recall}/metrics", headers=read, timeout=10).text  # 2 workers: multi-process metrics
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
        redis_proc.terminate()
        redis_proc.wait(10)


def _settings(loc: Localised, services: dict):
    from common.settings import Settings

    env = loc.env(services["nightly"]["environment"])
    return Settings(redis_url=env["REDIS_URL"])
