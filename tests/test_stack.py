"""`python -m scripts.stack up|status|down` (what `make up` / `make down` run) on a tiny dataset and free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, TINY_CONFIG, free_port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def stack_env(tmp_path):
    from trainer.synth import write_synthetic

    data = write_synthetic(tmp_path / "data", n_users=200, n_items=150, n_clicks=4000, seed=3, progress=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(TINY_CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FEATURE_URL", "VECTOR_URL", "DATA_DIR")}
    env.update(RUN_DIR=str(tmp_path / "run"), ARTIFACTS_DIR=str(tmp_path / "artifacts"), CHANNELS_CONFIG=str(cfg),
               FEATURE_PORT=str(free_port()), VECTOR_PORT=str(free_port()), RECALL_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    yield env, data, tmp_path / "run"
    subprocess.run([sys.executable, "-m", "scripts.stack", "down"], cwd=ROOT, env=env, capture_output=True, timeout=60)


def stack(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.stack", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_up_serves_then_down_stops_exactly_its_processes(stack_env):
    env, data, run = stack_env
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        r = stack(env, "up", "--data", str(data))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "nightly job" in r.stdout and "stack is up" in r.stdout
        pids = {name: json.loads((run / f"{name}.pid").read_text())["pid"] for name in ("feature", "vector", "recall")}
        redis_pid = int((run / "redis" / "redis.pid").read_text())
        assert all(alive(p) for p in [*pids.values(), redis_pid])

        recall_url = f"http://127.0.0.1:{env['RECALL_PORT']}"
        body = httpx.get(f"{recall_url}/recall", params={"user_id": "1", "k": 20, "explain": "true"}, timeout=10).json()
        assert len(body["items"]) == 20 and body["cold_start"] is False
        assert body["channels"]["itemcf"]["status"] == "ok"
        deadline = time.monotonic() + 30  # the vector server may still be loading mf
        while body["channels"]["mf"]["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.3)
            body = httpx.get(f"{recall_url}/recall", params={"user_id": "1", "k": 20}, timeout=10).json()
        assert body["channels"]["mf"]["status"] == "ok", body["channels"]["mf"]
        feat = httpx.get(f"http://127.0.0.1:{env['FEATURE_PORT']}/users/1", timeout=10)
        assert feat.status_code == 200

        st = stack(env, "status")
        assert st.returncode == 0 and "healthz 200" in st.stdout, st.stdout

        again = stack(env, "up", "--data", str(data))  # idempotent: nothing restarted, no second nightly
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already running" in again.stdout and "nightly job on" not in again.stdout
        assert {n: json.loads((run / f"{n}.pid").read_text())["pid"] for n in pids} == pids

        # `make nightly` against the running stack: new versions, picked up without a restart
        old_version = body["versions"]["itemcf"]
        nightly_run = stack(env, "nightly", "--data", str(data))
        assert nightly_run.returncode == 0, nightly_run.stdout + nightly_run.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fresh = httpx.get(f"{recall_url}/recall", params={"user_id": "1", "k": 20}, timeout=10).json()
            if fresh["versions"]["itemcf"] != old_version:
                break
            time.sleep(0.3)
        assert fresh["versions"]["itemcf"] != old_version and fresh["channels"]["itemcf"]["status"] == "ok"
        assert {n: json.loads((run / f"{n}.pid").read_text())["pid"] for n in pids} == pids  # nothing restarted

        # a stale PID file naming a process that is not ours must not get it killed
        (run / "feature.pid").write_text(json.dumps({"pid": bystander.pid, "port": 1, "module": "services.feature_server"}))
        feature_pid = pids.pop("feature")
        os.kill(feature_pid, 15)  # (stop the real one ourselves, as if it had crashed)

        d = stack(env, "down")
        assert d.returncode == 0, d.stdout + d.stderr
        for p in [*pids.values(), redis_pid]:
            deadline = time.monotonic() + 10
            while alive(p) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(p), p
        assert alive(bystander.pid)  # untouched
        assert not any(run.glob("*.pid")) and not (run / "redis" / "redis.pid").exists()
        assert "nothing to stop" in stack(env, "down").stdout
    finally:
        bystander.kill()
        bystander.wait()


def test_up_fails_clearly_when_a_port_is_taken(stack_env, tmp_path):
    env, data, run = stack_env
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", int(env["FEATURE_PORT"])))
        s.listen()
        r = stack(env, "up", "--data", str(data))
    assert r.returncode != 0
    assert f"port {env['FEATURE_PORT']}" in (r.stdout + r.stderr) and "FEATURE_PORT" in (r.stdout + r.stderr)
