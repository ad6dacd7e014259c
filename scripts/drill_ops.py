"""Fault drills of docs/reliability.md (Redis data loss, tampered artifact, killed nightly, fresh-user flood), measured
from the outside (CLI, HTTP, Redis) so the same script measures an older checkout too:

    python -m scripts.drill_ops --out var/drills.json                    # this tree
    cd /tmp/before && PYTHONPATH=$PWD python -m scripts.drill_ops ...    # another checkout (copy this file there)

Prints one JSON object of figures per drill.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import redis

from common.local_redis import LocalRedis, free_port

ROOT = Path.cwd()
CONFIG = """
default_k: 50
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 30}
  itemcf: {kind: i2i, model: itemcf, quota: 60, params: {top_k: 50}}
  mf: {kind: u2i, model: mf, quota: 60, timeout_ms: 1000, params: {dim: 16, epochs: 5}}
  mf_i2i: {kind: i2i, from: mf, weight: 0.3, quota: 30}
"""
SERVED = ["features", "popular", "itemcf", "mf"]


def url_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


class Work:
    """A private Redis, datasets, a channel config and the processes of one drill."""

    def __init__(self, root: Path):
        from trainer.synth import write_synthetic

        self.root = root
        self.redis = LocalRedis(data_dir=root / "redis").start()
        self.url = self.redis.url
        self.small = write_synthetic(root / "small", n_users=300, n_items=200, n_clicks=6000, seed=5, progress=False)
        self.cfg = root / "channels.yaml"
        self.cfg.write_text(CONFIG)
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "REDIS_URL": self.url, "ARTIFACTS_DIR": str(root / "artifacts"),
                    "CHANNELS_CONFIG": str(self.cfg), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def larger(self) -> Path:
        from trainer.synth import write_synthetic

        return write_synthetic(self.root / "larger", n_users=8000, n_items=1500, n_clicks=60_000, seed=3,
                               progress=False)

    def nightly(self, data: Path, extra_env: dict | None = None, wait: bool = True):
        cmd = [sys.executable, "-m", "trainer", "nightly", "--data", str(data)]
        path = self.root / f"nightly-{time.monotonic_ns()}.log"
        p = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=path.open("wb"),
                             stderr=subprocess.STDOUT)
        if not wait:
            self.procs.append(p)
            return p
        rc = p.wait(600)
        self.last_log = path.read_text(errors="replace")[-2000:]
        return rc

    def start(self, args: list[str], name: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=self.env,
                             stdout=(self.root / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def r(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(url_db(self.url, db))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()


def health(url: str) -> int:
    try:
        return httpx.get(url + "/healthz", timeout=3).status_code
    except httpx.TransportError:
        return 0


def wait(cond, timeout: float, step: float = 0.2) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def drill_flush(w: Work) -> dict:
    """FLUSHALL under /recall load with the three servers and the scheduler running."""
    assert w.nightly(w.small) == 0
    ports = {n: free_port() for n in ("feature", "vector", "recall")}
    w.env.update(VECTOR_URL=f"http://127.0.0.1:{ports['vector']}", FEATURE_URL=f"http://127.0.0.1:{ports['feature']}")
    urls = {}
    for n in ("feature", "vector", "recall"):
        w.start([f"services.{n}_server", "serve", "--port", str(ports[n])], n)
        urls[n] = f"http://127.0.0.1:{ports[n]}"
    at = f"{(time.localtime().tm_hour + 12) % 24:02d}:00"
    w.start(["trainer", "schedule", "--at", at], "scheduler")  # default checks (every 10 s where they exist)
    assert wait(lambda: all(health(u) == 200 for u in urls.values()), 180) is not None

    def whole() -> bool:
        if not all(health(u) == 200 for u in urls.values()):
            return False
        body = httpx.get(urls["recall"] + "/recall", params={"user_id": "1", "k": 20}, timeout=5).json()
        return all(body["channels"][c]["status"] == "ok" for c in ("itemcf", "mf", "popular"))

    assert wait(whole, 60) is not None
    answers: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=urls["recall"], timeout=10) as c:
            i = 0
            while not stop.is_set():
                r = c.get("/recall", params={"user_id": str(1 + i % 50), "k": 20})
                n = len(r.json().get("items", [])) if r.status_code == 200 else -1
                answers.append((time.monotonic(), r.status_code, n))
                i += 1

    t = threading.Thread(target=load, daemon=True)
    t.start()
    time.sleep(2)
    t0 = time.monotonic()
    w.r().flushall()
    codes = {n: set() for n in urls}
    healed = None
    while time.monotonic() - t0 < 60:
        for n, u in urls.items():
            codes[n].add(health(u))
        if whole():
            healed = time.monotonic() - t0
            break
        time.sleep(0.1)
    stop.set()
    t.join(30)
    after = [(s, n) for ts, s, n in answers if ts > t0 and (healed is None or ts < t0 + healed)]
    return {"healed_s": None if healed is None else round(healed, 1), "answers_while_degraded": len(after),
            "empty_answers_pct": round(100 * sum(1 for s, n in after if s == 200 and n == 0) / max(1, len(after)), 1),
            "non_200": sum(1 for s, _ in after if s != 200), "health_codes_seen": {n: sorted(c) for n, c in codes.items()},
            "window_s": 60}


def drill_tamper(w: Work) -> dict:
    """One item vector of the published mf version overwritten in Redis, then the vector server (re)loads it."""
    assert w.nightly(w.small) == 0
    version = w.r().get("current:mf").decode()
    db = w.r(7)
    key = f"iv:mf:{version}:0"
    vec = np.frombuffer(db.get(key), dtype="<f4")
    db.set(key, (-50 * vec).astype("<f4").tobytes())  # the attacker's vector: item 0 first for everyone
    port = free_port()
    w.start(["services.vector_server", "serve", "--port", str(port)], "vector")
    url = f"http://127.0.0.1:{port}"
    state = {}

    def settled() -> bool:
        try:
            body = httpx.get(url + "/healthz", timeout=3).json()
        except (httpx.TransportError, ValueError):
            return False
        state.update(body)
        return "mf" in body.get("channels", {}) or "digest" in str(body.get("not_loaded", {}).get("mf", ""))

    wait(settled, 120)
    served = "mf" in state.get("channels", {})
    log = (w.root / "vector.log").read_text()
    return {"tampered_version_served": served, "refused_with_log": "digest mismatch" in log,
            "not_loaded": state.get("not_loaded", {}).get("mf")}


def pending_keys(w: Work) -> tuple[str | None, str | None, int]:
    for c in SERVED:
        p = w.r().zrange(f"pending:{c}", 0, -1)
        if p:
            v = p[0].decode()
            n = sum(len(list(w.r(db).scan_iter(match=f"*:{c}:{v}:*", count=10_000))) for db in range(1, 11))
            return c, v, n
    return None, None, 0


def drill_kill(w: Work) -> dict:
    """kill -9 of a nightly while it writes a version; the next nightly; two nightlies at once; disk retention."""
    assert w.nightly(w.small) == 0
    larger = w.larger()
    runs = w.root / "artifacts" / "runs"
    n_runs = len(list(runs.glob("*/summary.json")))
    base = sum(w.r(db).dbsize() for db in range(1, 11))
    p = w.nightly(larger, wait=False)
    while p.poll() is None:
        if any(w.r().zcard(f"pending:{c}") for c in SERVED) and sum(w.r(db).dbsize() for db in range(1, 11)) > base + 100:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    p.wait(30)
    channel, version, orphans = pending_keys(w)
    summaries_after_kill = len(list(runs.glob("*/summary.json"))) - n_runs
    killed_summary = None
    for s in runs.glob("*/summary.json"):
        body = json.loads(s.read_text())
        if body.get("status") == "running":
            killed_summary = body
    assert w.nightly(w.small) == 0, w.last_log
    _, _, left = pending_keys(w)
    left_summary = None
    if killed_summary:
        body = json.loads((runs / killed_summary["run_id"] / "summary.json").read_text())
        left_summary = {"status": body.get("status"), "stopped_at": body.get("stopped_at")}
    out = {"killed_in": channel, "orphan_keys_after_kill": orphans, "summary_of_killed_run": summaries_after_kill > 0,
           "killed_summary_last_stage": killed_summary["stages"][-1] if killed_summary else None,
           "orphan_keys_after_next_nightly": left, "killed_summary_after_next_nightly": left_summary}

    # two nightlies at once: the first one frozen (SIGSTOP) once it is under way, a second one started
    a = w.nightly(larger, wait=False)
    wait(lambda: w.r().get("lock:jobs") is not None or any(w.r().zcard(f"pending:{c}") for c in SERVED), 120, 0.005)
    a.send_signal(signal.SIGSTOP)
    before = w.r().get("current:itemcf")
    rc_b = w.nightly(w.small)
    out["second_nightly_exit_code"] = rc_b
    out["second_nightly_published_meanwhile"] = w.r().get("current:itemcf") != before
    a.send_signal(signal.SIGCONT)
    a.wait(600)

    # disk retention (grace 0, keep 2)
    for _ in range(3):
        w.nightly(w.small, {"VERSION_GRACE_S": "0", "KEEP_VERSIONS": "2"})
    dirs = [d for d in (w.root / "artifacts" / "itemcf").iterdir() if d.is_dir()]
    out["itemcf_dirs_on_disk"] = len(dirs)
    out["itemcf_versions_in_redis"] = w.r().zcard("versions:itemcf")
    return out


def drill_flood(w: Work, users: int = 40_000) -> dict:
    """Fresh user ids through POST /events: memory growth, TTLs, then the same flood against a maxmemory bound."""
    assert w.nightly(w.small) == 0
    port = free_port()
    w.start(["services.feature_server", "serve", "--port", str(port)], "feature")
    url = f"http://127.0.0.1:{port}"
    wait(lambda: health(url) in (200, 503), 60)
    r = w.r()

    def flood() -> tuple[dict[int, int], str]:
        codes: dict[int, int] = {}
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(users // 1000):
                events = [{"user_id": f"flood-{uuid.uuid4().hex}", "item_id": str(1 + j % 150)} for j in range(1000)]
                s = c.post("/events", json=events).status_code
                codes[s] = codes.get(s, 0) + 1
        return codes, events[-1]["user_id"]

    artifacts = {db: w.r(db).dbsize() for db in range(3, 11)}
    m0 = int(r.info("memory")["used_memory"])
    codes, last = flood()
    m1 = int(r.info("memory")["used_memory"])
    ttl = w.r(1).ttl(f"rt:recent:{last}")
    out = {"users": users, "unbounded_growth_mb": round((m1 - m0) / 2**20, 1), "bytes_per_user": (m1 - m0) // users,
           "realtime_key_ttl_s": ttl, "policy": r.config_get("maxmemory-policy")["maxmemory-policy"]}
    bound = m1 + 8 * 2**20
    r.config_set("maxmemory", bound)
    codes, _ = flood()
    peak = int(r.info("memory")["used_memory"])
    out.update(bounded_flood_status_codes=codes, bounded_peak_over_bound_mb=round((peak - bound) / 2**20, 2),
               evicted_keys=int(r.info("stats")["evicted_keys"]),
               artifact_keys_intact=all(w.r(db).dbsize() == n for db, n in artifacts.items()),
               current_pointers_intact=all(r.get(f"current:{c}") for c in SERVED))
    return out


DRILLS = {"flush": drill_flush, "tamper": drill_tamper, "kill": drill_kill, "flood": drill_flood}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.drill_ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(DRILLS), help="comma-separated drills")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = {}
    for name in args.only.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"drill-{name}-"))
        w = Work(root)
        try:
            t = time.monotonic()
            results[name] = DRILLS[name](w)
            results[name]["drill_s"] = round(time.monotonic() - t, 1)
        except Exception as exc:  # one drill failing must not hide the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            w.close()
            shutil.rmtree(root, ignore_errors=True)
        print(json.dumps({name: results[name]}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
