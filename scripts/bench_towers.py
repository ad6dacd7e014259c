"""Request-time user towers of every u2i model: unloaded POST /search latency by user id over a 100k-item catalogue.

    .venv/bin/python -m scripts.bench_towers [--items 100000] [--users 20000] [--clicks 300000] [--requests 1000]

Runs the real nightly job (`python -m trainer nightly`, 1 epoch per model: latency does not depend on how well a
tower is trained) on a synthetic log whose catalogue has `--items` items, against a private Redis; starts the real
vector server on what it published; then times POST /search {channel, k=200, user_id} one request at a time,
measured at the client, per channel. Every answer must come from the request-time tower (`source` "tower"), so the
figure includes reading the user's recent clicks and attributes, the tower's forward pass and the faiss search
(and, for NeuralCF, the rescoring of the first stage). Writes the "towers" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd
import yaml

from common.local_redis import LocalRedis, free_port
from scripts.bench_vector import RawHTTP, timed_searches

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "var" / "bench" / "towers"
K = 200
# the u2i channels of config/channels.yaml with a request-time user tower
MODELS = ["two_tower", "youtube_dnn", "mind", "sdm", "mt_click", "neural_cf"]


def config(names: list[str]) -> dict:
    """The shipped config's entries of `names` (params, index), each enabled and trained for one epoch."""
    shipped = yaml.safe_load((ROOT / "config" / "channels.yaml").read_text())["channels"]
    out = {}
    for n in names:
        entry = json.loads(json.dumps(shipped[n]))
        entry["enabled"] = True
        entry["params"] = {**entry.get("params", {}), "epochs": 1}
        out[n] = entry
    return {"channels": out}


def run(args) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / f"synth-{args.users}u-{args.items}i-{args.clicks}c"
    if not (data / "interactions.parquet").exists() and not (data / "interactions.csv").exists():
        subprocess.run([sys.executable, "-m", "trainer", "synth", "--users", str(args.users), "--items",
                        str(args.items), "--clicks", str(args.clicks), "--out", str(data)], cwd=ROOT, check=True)
    cfg_path = WORK / "channels.yaml"
    cfg_path.write_text(yaml.safe_dump(config(args.models)))
    out: dict = {"items": args.items, "users": args.users, "clicks": args.clicks, "k": K, "channels": {}}
    with LocalRedis() as rds:
        env = {**os.environ, "REDIS_URL": rds.url, "CHANNELS_CONFIG": str(cfg_path),
               "ARTIFACTS_DIR": str(WORK / "artifacts"), "OMP_NUM_THREADS": "1", "LOG_LEVEL": "warning"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", "nightly", "--data", str(data), "--config", str(cfg_path)],
                       cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2", "LOG_LEVEL": "info"}, check=True)
        out["nightly_s"] = round(time.perf_counter() - t0, 1)
        port = free_port()
        log = (WORK / "server.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "services.vector_server", "serve", "--port", str(port)],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_loaded(f"http://127.0.0.1:{port}", args.models, proc)
            users = pd.read_parquet(data / "interactions.parquet", columns=["user_id"])["user_id"].astype(str).unique()
            rng = np.random.default_rng(7)
            c = RawHTTP("127.0.0.1", port)
            try:
                for name in args.models:
                    bodies = [orjson.dumps({"channel": name, "k": K, "user_id": str(u)})
                              for u in rng.choice(users, args.requests)]
                    out["channels"][name] = timed_searches(c, proc.pid, name, bodies)
                    print(name, json.dumps(out["channels"][name]), flush=True)
            finally:
                c.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return out


def wait_loaded(url: str, names: list[str], proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vector server exited: {(WORK / 'server.log').read_text()[-2000:]}")
        try:
            h = httpx.get(url + "/healthz", timeout=2).json()
            if all(h.get("channels", {}).get(n, {}).get("version") for n in names):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"channels {names} not loaded within {timeout:.0f} s")


def render(r: dict) -> str:
    lines = [f"Measured {datetime.now():%Y-%m-%d} by `python -m scripts.bench_towers`: the nightly job (1 epoch per "
             f"model) on a synthetic log of {r['clicks']:,} clicks, {r['users']:,} users, a {r['items']:,}-item "
             f"catalogue; the real vector server; POST /search by user id, k = {r['k']}, one request at a time, "
             f"measured at the client (nightly {r['nightly_s']:.0f} s). Target: p50 ≤ 2 ms.", "",
             "| channel | p50 ms | p90 ms | p99 ms | server CPU ms / request | answered by |", "|---|---|---|---|---|---|"]
    for n, c in r["channels"].items():
        lines.append(f"| {n} | {c['p50_ms']:.2f} | {c['p90_ms']:.2f} | {c['p99_ms']:.2f} | {c['server_cpu_ms']:.2f} | "
                     f"{', '.join(c['source'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--clicks", type=int, default=300_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated channels of MODELS")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        ap.error(f"unknown --models {sorted(unknown)}; known: {list(MODELS)}")
    r = run(args)
    (WORK / "result.json").write_text(json.dumps(r, indent=1))
    if not args.no_doc:
        from scripts.bench_quality import replace_section

        replace_section("towers", render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
