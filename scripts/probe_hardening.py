"""Hostile probes against a real stack (issue 17): each attack or fault with its figure, for docs/reliability.md.

    .venv/bin/python -m scripts.probe_hardening [--root DIR] [--keys] [--only header,slowloris,...] [--json OUT]

Builds a tiny synthetic dataset, publishes popular + itemcf + mf with the nightly job into a private Redis, starts
the feature, vector and recall servers from the code tree at --root (default: this one; `git worktree add
/tmp/before HEAD` gives the code before a change) as real processes on 127.0.0.1, runs the probes and prints one
JSON object of figures. --keys turns the API keys and the Host allow-list on (code that has them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
default_k: 50
channels:
  popular: {kind: list, model: popular, weight: 0.3, quota: 30, timeout_ms: 1000}
  itemcf: {kind: i2i, model: itemcf, quota: 60, timeout_ms: 1000, params: {top_k: 50}}
  mf: {kind: u2i, model: mf, quota: 60, timeout_ms: 1000, params: {dim: 16, epochs: 5}}
"""
WRITE_KEY, READ_KEY = "probe-write-key", "probe-read-key"
PROBES = ("header", "slowloris", "body", "five_bodies", "content_type", "auth", "host", "redis_stop", "scores",
          "disconnect", "ids", "duplicates", "event_retry", "post_recall", "long_exclude", "throughput")


def say(msg: str) -> None:
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


# -- raw HTTP ------------------------------------------------------------------------------------------

def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, bytes]:
    """(status, body) of one response, or (None, b"") if the connection closed or reset first."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return None, b""
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head[9:12]), body
    except (ConnectionError, TimeoutError, OSError):
        return None, b""


def send_then_read(port: int, parts: list[bytes], timeout: float = 60.0,
                   piece: int = 1 << 16) -> tuple[int | None, bytes, int]:
    """Send `parts` in pieces, stopping early when the server has answered (it may not read everything):
    (status, body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sent = 0
    try:
        for part in parts:
            view = memoryview(part)
            for a in range(0, len(view), piece):
                if select.select([sock], [], [], 0)[0]:
                    return *read_response(sock, timeout), sent
                try:
                    sock.sendall(view[a:a + piece])
                except OSError:
                    return *read_response(sock, timeout), sent
                sent += len(view[a:a + piece])
        return *read_response(sock, timeout), sent
    finally:
        sock.close()


def held_open(port: int, cap: float, trickle: bytes | None, first: bytes = b"") -> dict:
    """Seconds until the server closes a connection that sends `first`, then `trickle` every second (None:
    nothing more); capped at `cap`."""
    sock = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    status = None
    try:
        if first:
            sock.sendall(first)
        while time.monotonic() - t0 < cap:
            if select.select([sock], [], [], 1.0)[0]:
                data = b""
                try:
                    data = sock.recv(65536)
                except OSError:
                    pass
                if data.startswith(b"HTTP/1.1 "):
                    status = int(data[9:12])
                    continue  # a response, then (normally) the close
                break
            if trickle:
                try:
                    sock.sendall(trickle)
                except OSError:
                    break
        return {"held_s": round(min(time.monotonic() - t0, cap), 1), "capped": time.monotonic() - t0 >= cap,
                "status": status}
    finally:
        sock.close()


def rss_mb(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


# -- the stack -----------------------------------------------------------------------------------------

class Stack:
    """Redis + published tiny dataset + the three services from `root`."""

    def __init__(self, root: Path, keys: bool, work: Path):
        self.root, self.keys, self.work = root, keys, work
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports = {name: _free_port() for name in ("feature", "vector", "recall")}
        self.redis = None

    def headers(self, write: bool = False) -> dict[str, str]:
        return {"x-api-key": WRITE_KEY if write else READ_KEY} if self.keys else {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self) -> Stack:
        from common.local_redis import LocalRedis
        from trainer.synth import write_synthetic

        data = write_synthetic(self.work / "data", n_users=300, n_items=200, n_clicks=6000, seed=7, progress=False)
        (self.work / "channels.yaml").write_text(CONFIG)
        self.redis = LocalRedis(data_dir=self.work / "redis").start()
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "ARTIFACTS_DIR": str(self.work / "artifacts"),
                    "CHANNELS_CONFIG": str(self.work / "channels.yaml"), "RUN_DIR": str(self.work / "run"),
                    "OMP_NUM_THREADS": "1", "VECTOR_URL": self.url("vector"), "FEATURE_URL": self.url("feature")}
        if self.keys:
            self.env |= {"API_WRITE_KEY": WRITE_KEY, "API_READ_KEY": READ_KEY, "ALLOWED_HOSTS": "127.0.0.1,localhost"}
        say("nightly on the tiny dataset")
        subprocess.run([sys.executable, "-m", "trainer", "nightly", "--data", str(data)], cwd=ROOT, env=self.env,
                       check=True, capture_output=True)
        for name in ("feature", "vector", "recall"):
            log = (self.work / f"{name}.log").open("ab")
            self.procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}_server", "serve", "--port",
                                                 str(self.ports[name])], cwd=self.root, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        self.users = [str(u) for u in range(1, 40)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url("recall") + "/recall", params={"user_id": "1"}, headers=self.headers(), timeout=5)
                if r.status_code == 200 and r.json()["channels"]["mf"]["status"] == "ok":
                    self.items = [i["item_id"] for i in r.json()["items"]]
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("stack never served mf; logs in " + str(self.work))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.redis is not None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.redis.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- probes --------------------------------------------------------------------------------------------

def probe_header(st: Stack) -> dict:
    """A huge header: how long a concurrent normal request waits, and what the attacker gets."""
    out = {}
    for name, size in (("recall", 64 << 20), ("recall", 32 << 20), ("feature", 32 << 20), ("vector", 32 << 20)):
        res: dict = {}

        def attack(name: str = name, size: int = size, res: dict = res) -> None:
            t0 = time.perf_counter()
            head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
            status, body, sent = send_then_read(st.ports[name], [head, b"a" * size, b"\r\n\r\n"])
            res.update(status=status, body=body[:120].decode("utf-8", "replace"),
                       seconds=round(time.perf_counter() - t0, 2), sent_mb=round(sent / 2**20, 2))

        th = threading.Thread(target=attack)
        th.start()
        time.sleep(0.05)
        lat = []
        with httpx.Client(headers=st.headers(), timeout=60) as c:
            while True:
                t = time.perf_counter()
                c.get(st.url(name) + "/healthz")
                lat.append(time.perf_counter() - t)
                if not th.is_alive():
                    break
        th.join()
        out[f"{name}_{size >> 20}MB"] = {"attacker": res, "concurrent_requests": len(lat),
                                         "concurrent_max_ms": round(1000 * max(lat), 1)}
    return out


def probe_slowloris(st: Stack, cap: float = 40.0) -> dict:
    """Connections that send a header a second, or nothing at all: how long each service holds them."""
    out: dict = {}
    threads = []
    for name in ("recall", "feature", "vector"):
        for kind, first, trickle in (("trickle", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n"),
                                     ("silent", b"", None)):
            def run(name=name, kind=kind, first=first, trickle=trickle):
                out[f"{name}_{kind}"] = held_open(st.ports[name], cap, trickle, first)
            threads.append(threading.Thread(target=run))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _big_search_body(size: int) -> bytes:
    head, tail = b'{"user_id": "1", "channels": {"mf": 10}, "exclude": [', b'"z"]}'
    n = (size - len(head) - len(tail)) // 11
    return head + b'"abcdefgh",' * n + tail


def probe_body(st: Stack) -> dict:
    """A 100 MB /search/user body: answer, time, and the vector server's memory."""
    pid = st.procs["vector"].pid
    before = rss_mb(pid)
    body = _big_search_body(100 << 20)
    head = (f"POST /search/user HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in st.headers().items())
            + "\r\n").encode()
    t0 = time.perf_counter()
    status, answer, sent = send_then_read(st.ports["vector"], [head, body])
    dt = time.perf_counter() - t0
    time.sleep(0.5)
    return {"status": status, "body": answer[:160].decode("utf-8", "replace"), "seconds": round(dt, 2),
            "sent_mb": round(sent / 2**20, 2),
            "rss_before_mb": before["VmRSS"], "peak_before_mb": before["VmHWM"], **{
                f"{k}_after_mb": v for k, v in rss_mb(pid).items()}}


def probe_five_bodies(st: Stack) -> dict:
    """Five 10 MB bodies at the vector server while /recall runs: does the u2i channel keep answering?"""
    body = _big_search_body(10 << 20)
    statuses: list = []

    def attack() -> None:
        try:
            r = httpx.post(st.url("vector") + "/search/user", content=body, timeout=60,
                           headers={"content-type": "application/json", **st.headers()})
            statuses.append(r.status_code)
        except httpx.HTTPError as exc:
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=attack) for _ in range(5)]
    for t in threads:
        t.start()
    mf = []
    with httpx.Client(headers=st.headers(), timeout=30) as c:
        while any(t.is_alive() for t in threads):
            r = c.get(st.url("recall") + "/recall", params={"user_id": random.choice(st.users)})
            mf.append(r.json()["channels"]["mf"]["status"] if r.status_code == 200 else r.status_code)
    for t in threads:
        t.join()
    return {"attack_statuses": statuses, "recalls": len(mf), "mf_failed": sum(s not in ("ok", "skipped") for s in mf),
            "mf_statuses": sorted({str(s) for s in mf})}


def probe_content_type(st: Stack) -> dict:
    """A text/plain POST /events (what a cross-site form or fetch can send without a preflight)."""
    ev = orjson.dumps([{"user_id": "ct-probe", "item_id": st.items[0]}])
    r = httpx.post(st.url("feature") + "/events", content=ev,
                   headers={"content-type": "text/plain", **st.headers(write=True)})
    return {"status": r.status_code, "body": r.text[:160]}


def probe_auth(st: Stack) -> dict:
    """Requests without a key, with a wrong key, and a write with the read key."""
    ev = [{"user_id": "auth-probe", "item_id": st.items[0]}]
    out = {
        "recall_no_key": httpx.get(st.url("recall") + "/recall", params={"user_id": "1"}).status_code,
        "recall_wrong_key": httpx.get(st.url("recall") + "/recall", params={"user_id": "1"},
                                      headers={"x-api-key": "nope"}).status_code,
        "events_no_key": httpx.post(st.url("feature") + "/events", json=ev).status_code,
        "events_read_key": httpx.post(st.url("feature") + "/events", json=ev,
                                      headers={"x-api-key": READ_KEY}).status_code,
        "events_write_key": httpx.post(st.url("feature") + "/events", json=ev,
                                       headers={"x-api-key": WRITE_KEY}).status_code,
        "search_no_key": httpx.post(st.url("vector") + "/search/user",
                                    json={"user_id": "1", "channels": {"mf": 5}}).status_code,
        "metrics_no_key": httpx.get(st.url("recall") + "/metrics").status_code,
        "healthz_no_key": httpx.get(st.url("recall") + "/healthz").status_code,
    }
    return out


def probe_host(st: Stack) -> dict:
    """A request whose Host is not ours (DNS rebinding)."""
    r = httpx.get(st.url("recall") + "/recall", params={"user_id": "1"},
                  headers={"host": "evil.example", **st.headers()})
    return {"status": r.status_code, "body": r.text[:160]}


async def _hammer(port: int, path: bytes, headers: bytes, seconds: float, conns: int) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while loop.time() < end:
            t = time.perf_counter()
            w.write(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            n = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")).split(b":")[1])
            await r.readexactly(n)
            out.append((int(head[9:12]), time.perf_counter() - t))
        w.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return out


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(1000 * v[min(len(v) - 1, int(q * len(v)))], 1) if v else float("nan")


def probe_redis_stop(st: Stack, seconds: float = 5.0, conns: int = 64) -> dict:
    """SIGSTOP Redis under 64 connections of GET /recall and GET /users, then SIGCONT: latencies, recovery."""
    hdr = b"".join(f"{k}: {v}\r\n".encode() for k, v in st.headers().items())
    pid = st.redis.proc.pid
    out = {}
    os.kill(pid, signal.SIGSTOP)
    try:
        for name, path in (("recall", b"/recall?user_id=1"), ("feature", b"/users/1")):
            res = asyncio.run(_hammer(st.ports[name], path, hdr, seconds, conns))
            lat = [t for _, t in res]
            out[name] = {"requests": len(res), "statuses": sorted({s for s, _ in res}), "p50_ms": _pct(lat, 0.5),
                         "p99_ms": _pct(lat, 0.99), "max_ms": _pct(lat, 1.0)}
    finally:
        os.kill(pid, signal.SIGCONT)
    t0 = time.perf_counter()
    with httpx.Client(headers=st.headers(), timeout=10) as c:
        while time.perf_counter() - t0 < 30:
            r = c.get(st.url("recall") + "/recall", params={"user_id": "1"})
            if r.status_code == 200 and r.json()["channels"]["itemcf"]["status"] == "ok":
                break
            time.sleep(0.02)
    out["recovered_after_sigcont_s"] = round(time.perf_counter() - t0, 2)
    return out


def probe_scores(st: Stack) -> dict:
    """POST /search with huge finite components (float32 overflow)."""
    dim = 16
    r = httpx.post(st.url("vector") + "/search", json={"channel": "mf", "k": 5, "vector": [3e38] * dim},
                   headers=st.headers())
    body = r.json()
    return {"status": r.status_code, "null_scores": sum(s is None for s in body.get("scores", [])),
            "body": r.text[:160]}


def probe_disconnect(st: Stack) -> dict:
    """A client that closes mid-body on POST /events: what the server records."""
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", st.ports["feature"]))
        hdr = "".join(f"{k}: {v}\r\n" for k, v in st.headers(write=True).items())
        sock.sendall(f"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 1000\r\n{hdr}\r\n[{{\"user_id\":".encode())
        time.sleep(0.1)
        sock.close()
    time.sleep(0.5)
    text = httpx.get(st.url("feature") + "/metrics", headers=st.headers()).text
    lines = [x for x in text.splitlines() if x.startswith("feature_server_request_seconds_count") and "/events" in x]
    log = (st.work / "feature.log").read_text(errors="replace")
    return {"events_metrics": lines, "exceptions_in_log": log.count("Exception in ASGI application")}


def probe_ids(st: Stack) -> dict:
    """Ids /recall cannot express, posted as events."""
    out = {}
    for label, uid in (("nul", "u\x00x"), ("control", "u\x07x"), ("comma", "u,x")):
        r = httpx.post(st.url("feature") + "/events", json=[{"user_id": uid, "item_id": st.items[0]}],
                       headers=st.headers(write=True))
        out[f"events_{label}"] = r.status_code
        out[f"recall_{label}"] = httpx.get(st.url("recall") + "/recall", params={"user_id": uid},
                                           headers=st.headers()).status_code
    return out


def probe_duplicates(st: Stack) -> dict:
    r = httpx.get(st.url("recall") + "/recall?user_id=1&user_id=2&k=5&k=7", headers=st.headers())
    body = r.json()
    return {"status": r.status_code, "answered_for": body.get("user_id"), "k": body.get("k"), "body": r.text[:160]}


def probe_event_retry(st: Stack) -> dict:
    """The same click sent twice (a client retry), with and without an event id."""
    item = st.items[-1]
    url = st.url("feature")

    def clicks() -> int:
        return httpx.get(f"{url}/items/{item}", headers=st.headers()).json().get("realtime_clicks", 0)

    out = {}
    for label, extra in (("without_event_id", {}), ("with_event_id", {"event_id": str(uuid.uuid4())})):
        c0 = clicks()
        statuses = [httpx.post(url + "/events", json=[{"user_id": "retry-probe", "item_id": item, **extra}],
                               headers=st.headers(write=True)).status_code for _ in range(2)]
        out[label] = {"statuses": statuses, "counted": clicks() - c0}
    return out


def probe_post_recall(st: Stack) -> dict:
    r = httpx.post(st.url("recall") + "/recall", json={"user_id": "1", "k": 5, "exclude": st.items[:3]},
                   headers=st.headers())
    return {"status": r.status_code, "items": len(r.json().get("items", [])) if r.status_code == 200 else None}


def probe_long_exclude(st: Stack) -> dict:
    """10,000 excluded UUIDs: in the URL (GET) and in a JSON body (POST)."""
    excl = [str(uuid.uuid4()) for _ in range(10_000)]
    out = {}
    hdr = "".join(f"{k}: {v}\r\n" for k, v in st.headers().items())
    for n in (1000, 1700, 2000, 10_000):  # raw: httpx itself refuses URLs over 64 KiB
        head = f"GET /recall?user_id=1&exclude={','.join(excl[:n])} HTTP/1.1\r\nHost: 127.0.0.1\r\n{hdr}\r\n"
        out[f"get_{n}"] = send_then_read(st.ports["recall"], [head.encode()], timeout=30)[0]
    r = httpx.post(st.url("recall") + "/recall", json={"user_id": "1", "exclude": excl}, headers=st.headers(),
                   timeout=30)
    out["post_10000"] = r.status_code
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe_throughput(st: Stack, seconds: float = 10.0, conns: int = 16) -> dict:
    """Saturation GET /recall (closed loop, one recall worker, remote vector server), a sequential p50, and the CPU
    time the recall and vector servers spend per request (what other load on the machine disturbs least)."""
    from scripts.bench_serving import run_loadgen

    paths = Path(tempfile.mkstemp(prefix="probe-paths-")[1])
    paths.write_text("\n".join(f"/recall?user_id={u}" for u in st.users))
    port = st.ports["recall"]
    seq = run_loadgen("seq", port, paths, n=2000)
    pids = [st.procs[n].pid for n in ("recall", "vector")]
    cpu0 = sum(cpu_s(p) for p in pids)
    closed = run_loadgen("closed", port, paths, duration=seconds, conns=conns)
    cpu = sum(cpu_s(p) for p in pids) - cpu0
    paths.unlink()
    return {"rps": round(closed["rps"], 1), "errors": closed["errors"], "p50_ms_unloaded": _pct(seq["latency_s"], 0.5),
            "cpu_us_per_request": round(1e6 * cpu / max(closed["requests"], 1), 1),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.probe_hardening", description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="code tree the services run from")
    ap.add_argument("--keys", action="store_true", help="API keys and a Host allow-list on")
    ap.add_argument("--only", default=",".join(PROBES), help=f"comma-separated subset of {','.join(PROBES)}")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    chosen = [p for p in a.only.split(",") if p]
    unknown = set(chosen) - set(PROBES)
    if unknown:
        ap.error(f"unknown probes {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="probe-"))
    st = Stack(a.root.resolve(), a.keys, work)
    results: dict = {"root": str(a.root), "keys": a.keys}
    try:
        st.start()
        for name in chosen:
            say(name)
            try:
                results[name] = globals()[f"probe_{name}"](st)
            except Exception as exc:  # a probe that breaks the old code is a figure too
                results[name] = {"probe_error": f"{type(exc).__name__}: {exc}"[:300]}
            say(json.dumps(results[name])[:400])
    finally:
        st.stop()
    text = json.dumps(results, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
