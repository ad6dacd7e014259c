"""`python -m scripts.stack up|down|nightly|status`: the local stack behind `make up` / `make down` / `make nightly`.

`up` starts a private Redis (unless REDIS_URL is set), runs the nightly job if nothing is published yet,
then starts the feature (8001), vector (8002) and recall (8000) servers in the background, with PID files
and logs under RUN_DIR (default var/run), and waits until each answers /healthz. `down` stops exactly the
processes whose PID files it finds there (each checked against its command line) and the local Redis,
saved first so the next `up` reloads what was published instead of re-running the nightly job. Both are
idempotent.

The local Redis keeps an append-only file (fsync every second) and evicts only keys with a TTL at REDIS_MAXMEMORY.
When Redis lacks published versions, `up` republishes them from ARTIFACTS_DIR (seconds) before it falls back to
the nightly job, and it also starts the scheduler (`python -m trainer schedule`), which does the same whenever
Redis loses them while the stack runs, and runs the nightly job daily at NIGHTLY_AT (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.liveness import pid_alive

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Service:
    name: str
    module: str
    port_setting: str


SERVICES = (Service("feature", "services.feature_server", "feature_port"),
            Service("vector", "services.vector_server", "vector_port"),
            Service("recall", "services.recall_server", "recall_port"))
SCHEDULER = Service("scheduler", "trainer", "")  # no port: `python -m trainer schedule`


def _settings():
    from common.settings import Settings

    return Settings()


def _abs(p: Path) -> Path:
    return p if p.is_absolute() else (Path.cwd() / p)


def run_dir(settings) -> Path:
    return _abs(settings.run_dir)


def say(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


# -- Redis -----------------------------------------------------------------------------------------

def redis_dir(settings) -> Path:
    return run_dir(settings) / "redis"


def ensure_redis(settings) -> str:
    """REDIS_URL if set, else the local Redis under RUN_DIR/redis (started if needed); returns its URL."""
    if settings.redis_url:
        return settings.redis_url
    d = redis_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "common.local_redis", "start", "--dir", str(d),
                          "--maxmemory", settings.redis_maxmemory], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"could not start a local Redis: {out.stderr.strip() or out.stdout.strip()}")
    url = out.stdout.strip().splitlines()[-1]
    say(f"local Redis at {url} (data in {d})")
    return url


def local_redis_url(settings) -> str | None:
    """URL of the running local Redis of this RUN_DIR, if any."""
    pid_file, url_file = redis_dir(settings) / "redis.pid", redis_dir(settings) / "redis.url"
    if pid_file.exists() and url_file.exists() and pid_alive(int(pid_file.read_text())):
        return url_file.read_text().strip()
    return None


def missing_published(settings, url: str) -> dict[str, str]:
    """What Redis lacks of the versions the stack serves (the features and every channel the config trains)."""
    from common.keyspace import Keyspace
    from common.redis_conn import RedisStores
    from trainer.schedule import Scheduler

    served = Scheduler(settings.model_copy(update={"redis_url": url}), "02:00", None).served()
    stores = RedisStores(url, Keyspace.from_settings(settings))
    try:
        from common.publish import missing_versions

        return missing_versions(stores, served)
    finally:
        stores.close()


def republish(settings, url: str) -> bool:
    """`python -m trainer republish` from ARTIFACTS_DIR; True when Redis is whole afterwards."""
    from trainer.republish import archived_channels

    if not archived_channels(_abs(settings.artifacts_dir)):
        return False
    say(f"republishing the last good versions from {_abs(settings.artifacts_dir)}")
    rc = subprocess.run([sys.executable, "-m", "trainer", "republish"], cwd=ROOT, env=child_env(settings, url),
                        capture_output=True, text=True).returncode
    return rc == 0 and not missing_published(settings, url)


# -- processes -------------------------------------------------------------------------------------

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_file(settings, name: str) -> Path:
    return run_dir(settings) / f"{name}.pid"


def log_file(settings, name: str) -> Path:
    return run_dir(settings) / "logs" / f"{name}.log"


def read_pid(settings, name: str) -> dict | None:
    """The PID record of a service started by `up`, if that process is still the one we started."""
    p = pid_file(settings, name)
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text())
    except (ValueError, OSError):
        return None
    pid = int(rec.get("pid", 0))
    if pid <= 0 or not pid_alive(pid):
        return None
    cmd = _cmdline(pid)
    if cmd and rec.get("module", "") not in cmd:  # the PID was reused by something else
        return None
    return rec


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def service_urls(settings) -> dict[str, str]:
    return {s.name: f"http://127.0.0.1:{getattr(settings, s.port_setting)}" for s in SERVICES}


def child_env(settings, url: str) -> dict[str, str]:
    """Environment of every child: the Redis URL and service URLs derived from the ports unless set."""
    urls = service_urls(settings)
    env = {**os.environ, "REDIS_URL": url, "RUN_DIR": str(run_dir(settings)),
           "ARTIFACTS_DIR": str(_abs(settings.artifacts_dir)), "CHANNELS_CONFIG": str(_abs(settings.channels_config)),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(settings.omp_threads))}
    env.setdefault("FEATURE_URL", urls["feature"])
    env.setdefault("VECTOR_URL", urls["vector"])
    return env


def start_service(settings, svc: Service, env: dict[str, str], extra: list[str] | None = None) -> dict:
    rec = read_pid(settings, svc.name)
    port = getattr(settings, svc.port_setting)
    if rec is not None:
        say(f"{svc.name} server already running (pid {rec['pid']}, port {rec['port']})")
        return rec
    if port_in_use(port):
        raise SystemExit(f"port {port} for the {svc.name} server is already in use by another process; stop it or "
                         f"set {svc.port_setting.upper()}=<free port>")
    log = log_file(settings, svc.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", svc.module, "serve", "--port", str(port), *(extra or [])]
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # own process group: `down` stops it and its workers
    rec = {"pid": proc.pid, "port": port, "module": svc.module, "cmd": cmd, "log": str(log), "started_at": time.time()}
    pid_file(settings, svc.name).write_text(json.dumps(rec))
    say(f"{svc.name} server starting (pid {proc.pid}, port {port}, log {log})")
    return rec


def wait_healthy(settings, svc: Service, rec: dict, timeout: float = 180.0) -> None:
    url = f"http://127.0.0.1:{rec['port']}/healthz"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not pid_alive(rec["pid"]):
            tail = Path(rec["log"]).read_text(errors="replace")[-3000:] if Path(rec["log"]).exists() else ""
            raise SystemExit(f"the {svc.name} server exited during start-up; end of {rec['log']}:\n{tail}")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise SystemExit(f"the {svc.name} server did not become healthy within {timeout:.0f}s ({url}: {last}); "
                     f"see {rec['log']}")


def wait_vector_loaded(rec: dict, timeout: float = 300.0, embedded: bool = False) -> None:
    """Wait until the vector server (or, `embedded`, the recall server's workers) has loaded every published u2i
    channel (its /healthz says 'loading …' for those it has not)."""
    url = f"http://127.0.0.1:{rec['port']}/healthz"
    deadline, said = time.monotonic() + timeout, False
    while time.monotonic() < deadline:
        try:
            body = httpx.get(url, timeout=5.0).json()
            not_loaded = (body.get("vector") or {}).get("not_loaded") if embedded else body.get("not_loaded")
            loading = [c for c, why in (not_loaded or {}).items() if str(why).startswith("loading")]
        except (httpx.TransportError, ValueError):
            loading = ["?"]
        if not loading:
            return
        if not said:
            say(f"{'recall server (VECTOR_MODE=embedded)' if embedded else 'vector server'} loading its indexes "
                f"({', '.join(loading)})")
            said = True
        time.sleep(0.5)
    say(f"the vector server is still loading after {timeout:.0f}s; u2i channels answer once it is done")


def stop_pid(pid: int, name: str, timeout: float = 15.0) -> None:
    """SIGTERM the process group we created for `pid` (uvicorn and its workers), SIGKILL after `timeout`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    say(f"{name} (pid {pid}) did not stop within {timeout:.0f}s: killing it")
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- commands --------------------------------------------------------------------------------------

def run_nightly(settings, url: str, data: Path | None) -> None:
    """The nightly job as a child process (its progress and summary go to this terminal)."""
    if data is None:
        data = settings.data_dir
    if data is None:
        from trainer.synth import ensure_default_dataset

        say("preparing the built-in synthetic dataset (first time only)")
        data = ensure_default_dataset()
    data = _abs(Path(data))
    say(f"nightly job on {data} (fits and publishes every enabled channel)")
    t = time.monotonic()
    rc = subprocess.run([sys.executable, "-m", "trainer", "nightly", "--data", str(data)], cwd=ROOT,
                        env=child_env(settings, url)).returncode
    if rc != 0:
        raise SystemExit(f"the nightly job failed (exit code {rc}); nothing was started")
    say(f"nightly job done in {time.monotonic() - t:.0f}s")


def up(data: Path | None = None, recall_workers: int = 1, settings=None) -> dict[str, str]:
    """Start (or keep) the whole local stack; returns the service URLs."""
    settings = settings or _settings()
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    for svc in SERVICES:  # fail before any slow work if a port is taken by someone else
        port = getattr(settings, svc.port_setting)
        if read_pid(settings, svc.name) is None and port_in_use(port):
            raise SystemExit(f"port {port} for the {svc.name} server is already in use by another process; stop it "
                             f"or set {svc.port_setting.upper()}=<free port>")
    url = ensure_redis(settings)
    missing = missing_published(settings, url)
    if not missing:
        say("features already published: skipping the nightly job (`make nightly` refreshes)")
    elif not republish(settings, url):
        say("nothing published yet" if "features" in missing else f"not published yet: {', '.join(missing)}")
        run_nightly(settings, url, data)
    env = child_env(settings, url)
    recs = {}
    for svc in SERVICES:
        extra = ["--workers", str(recall_workers)] if svc.name == "recall" and recall_workers > 1 else None
        recs[svc.name] = start_service(settings, svc, env, extra)
        if svc.name == "vector":  # the recall server should find the vector server up, its indexes loaded
            wait_healthy(settings, svc, recs[svc.name])
            wait_vector_loaded(recs[svc.name])
    for svc in SERVICES:
        wait_healthy(settings, svc, recs[svc.name])
    start_scheduler(settings, env, data)
    if settings.vector_mode == "embedded":  # the recall workers load the indexes themselves
        wait_vector_loaded(recs["recall"], embedded=True)
    urls = service_urls(settings)
    say("stack is up:")
    for name, u in urls.items():
        say(f"  {name:<8} {u}   (docs {u}/docs, metrics {u}/metrics, log {log_file(settings, name)})")
    say(f"  redis    {url}")
    say(f"try:  curl '{urls['recall']}/recall?user_id=1&k=10&explain=true'")
    say(f"look: {urls['recall']}/ui/   (the inspector, docs/inspector.md)")
    say("stop: make down")
    return urls


def start_scheduler(settings, env: dict[str, str], data: Path | None) -> dict:
    """The scheduler (PID file `scheduler.pid`): republishes what Redis loses, runs the nightly job at NIGHTLY_AT."""
    rec = read_pid(settings, SCHEDULER.name)
    if rec is not None:
        return rec
    data = data if data is not None else settings.data_dir
    log = log_file(settings, SCHEDULER.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", SCHEDULER.module, "schedule", "--at", os.environ.get("NIGHTLY_AT", "02:00"),
           "--check-every", os.environ.get("HEAL_CHECK_S", "10"), *(["--data", str(_abs(Path(data)))] if data else [])]
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    rec = {"pid": proc.pid, "port": None, "module": SCHEDULER.module, "cmd": cmd, "log": str(log),
           "started_at": time.time()}
    pid_file(settings, SCHEDULER.name).write_text(json.dumps(rec))
    say(f"scheduler started (pid {proc.pid}, log {log}): republishes what Redis loses, nightly at {cmd[5]}")
    return rec


def down(settings=None) -> list[int]:
    """Stop the services of RUN_DIR's PID files and the local Redis; returns the PIDs stopped."""
    settings = settings or _settings()
    stopped = []
    for svc in (SCHEDULER, *reversed(SERVICES)):
        rec = read_pid(settings, svc.name)
        if rec is not None:
            stop_pid(int(rec["pid"]), svc.name)
            say(f"stopped the {svc.name}{' server' if svc.port_setting else ''} (pid {rec['pid']})")
            stopped.append(int(rec["pid"]))
        pid_file(settings, svc.name).unlink(missing_ok=True)
    d = redis_dir(settings)
    if (d / "redis.pid").exists():
        pid = int((d / "redis.pid").read_text())
        url = local_redis_url(settings)
        if url:  # keep what was published: the next `up` reloads it instead of re-running the nightly job
            try:
                import redis

                redis.Redis.from_url(url, socket_timeout=30).save()
            except Exception as exc:
                say(f"could not save the local Redis before stopping it ({exc}); the next `up` re-runs the nightly job")
        subprocess.run([sys.executable, "-m", "common.local_redis", "stop", "--dir", str(d)], cwd=ROOT,
                       capture_output=True)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        say(f"stopped the local Redis (pid {pid})")
        stopped.append(pid)
    if not stopped:
        say("nothing to stop")
    return stopped


def nightly(data: Path | None = None, settings=None) -> None:
    settings = settings or _settings()
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    run_nightly(settings, ensure_redis(settings), data)


def status(settings=None) -> int:
    settings = settings or _settings()
    url = settings.redis_url or local_redis_url(settings)
    print(f"redis   : {url or 'not running (no REDIS_URL, no local Redis)'}")
    rc = 0
    for svc in SERVICES:
        rec = read_pid(settings, svc.name)
        if rec is None:
            print(f"{svc.name:<8}: not running")
            rc = 1
            continue
        try:
            r = httpx.get(f"http://127.0.0.1:{rec['port']}/healthz", timeout=2.0)
            health = f"{r.status_code} {r.text[:160]}"
        except httpx.TransportError as exc:
            health, rc = f"no answer ({type(exc).__name__})", 1
        print(f"{svc.name:<8}: pid {rec['pid']}, port {rec['port']}, healthz {health}")
    sched = read_pid(settings, SCHEDULER.name)
    print("scheduler: " + (f"pid {sched['pid']}, log {sched['log']}" if sched else "not running"))
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.stack", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="local Redis (unless REDIS_URL), nightly if nothing is published, the three services")
    p_up.add_argument("--data", type=Path, default=None,
                      help="dataset for the nightly job when nothing is published yet (default: $DATA_DIR or built-in synthetic data)")
    p_up.add_argument("--recall-workers", type=int, default=int(os.environ.get("RECALL_WORKERS", "1")),
                      help="uvicorn workers of the recall server (default $RECALL_WORKERS or 1)")
    sub.add_parser("down", help="stop exactly what `up` started")
    p_n = sub.add_parser("nightly", help="run the nightly job on DATA (default: built-in synthetic data)")
    p_n.add_argument("--data", type=Path, default=None)
    sub.add_parser("status", help="what is running")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        up(args.data, args.recall_workers)
    elif args.cmd == "down":
        down()
    elif args.cmd == "nightly":
        nightly(args.data)
    else:
        return status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
