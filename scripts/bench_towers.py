"""Request-time user towers of every u2i model: unloaded POST /search latency by user id over a 100k-item catalogue.

    .venv/bin/python -m scripts.bench_towers [--items 100000] [--users 20000] [--clicks 300000] [--requests 1000]
        [--models mind,sdm,two_tower] [--epochs 1] [--reuse] [--baseline DIR] [--index mind:type=ivf,nprobe=64]
        [--no-doc]

Runs the real nightly job (`python -m trainer nightly`, 1 epoch per model unless `--epochs`: a tower's cost does
not depend on its training, but an HNSW search's does — it visits more of the graph when the item vectors are spread
out) on a synthetic log whose catalogue has `--items` items, against a private Redis; starts the real
vector server on what it published; then times POST /search {channel, k=200, user_id} one request at a time,
measured at the client, per channel. Every answer must come from the request-time tower (`source` "tower"), so the
figure includes reading the user's recent clicks and attributes, the tower's forward pass and the faiss search
(and, for NeuralCF, the rescoring of the first stage). Writes the "towers" section of docs/benchmarks.md.

`--reuse` serves what an earlier run with the same log and `--models` published (its Redis data dir and artifacts
are kept under var/bench/towers/) instead of training again. `--baseline DIR` also serves the same Redis from
another source tree (e.g. `git archive HEAD | tar -x -C DIR`) and times both servers alternately on the same
requests: same-run "before" and "after" figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd
import redis
import yaml

from common.local_redis import LocalRedis, free_port
from scripts.bench_vector import RawHTTP, _cpu_s, percentiles

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "var" / "bench" / "towers"
K = 200
# the u2i channels of config/channels.yaml with a request-time user tower
MODELS = ["two_tower", "youtube_dnn", "mind", "sdm", "mt_click", "neural_cf"]


def config(names: list[str], epochs: int = 1) -> dict:
    """The shipped config's entries of `names` (params, index), each enabled and trained for `epochs` epochs
    (0: the model's own setting)."""
    shipped = yaml.safe_load((ROOT / "config" / "channels.yaml").read_text())["channels"]
    out = {}
    for n in names:
        entry = json.loads(json.dumps(shipped[n]))
        entry["enabled"] = True
        entry["params"] = {**entry.get("params", {}), **({"epochs": epochs} if epochs else {})}
        out[n] = entry
    return {"channels": out}


def run(args) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / f"synth-{args.users}u-{args.items}i-{args.clicks}c"
    if not (data / "interactions.parquet").exists() and not (data / "interactions.csv").exists():
        subprocess.run([sys.executable, "-m", "trainer", "synth", "--users", str(args.users), "--items",
                        str(args.items), "--clicks", str(args.clicks), "--out", str(data)], cwd=ROOT, check=True)
    epochs = "" if args.epochs == 1 else f"-e{args.epochs}"
    state = WORK / f"state-{data.name}-{'-'.join(sorted(args.models))}{epochs}"  # Redis data + artifacts of a nightly
    done = state / "nightly.json"
    if not args.reuse or not done.exists():
        shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    cfg_path = state / "channels.yaml"
    cfg_path.write_text(yaml.safe_dump(config(args.models, args.epochs)))
    out: dict = {"items": args.items, "users": args.users, "clicks": args.clicks, "k": K, "epochs": args.epochs,
                 "channels": {}}
    with LocalRedis(data_dir=state / "redis") as rds:
        env = {**os.environ, "REDIS_URL": rds.url, "CHANNELS_CONFIG": str(cfg_path),
               "ARTIFACTS_DIR": str(state / "artifacts"), "OMP_NUM_THREADS": "1", "LOG_LEVEL": "warning"}
        if done.exists():
            out["nightly_s"] = json.loads(done.read_text())["nightly_s"]
        else:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "trainer", "nightly", "--data", str(data), "--config", str(cfg_path)],
                           cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2", "LOG_LEVEL": "info"}, check=True)
            out["nightly_s"] = round(time.perf_counter() - t0, 1)
            rds_client = redis.Redis.from_url(rds.url)
            try:
                rds_client.bgrewriteaof()
            finally:
                rds_client.close()
            done.write_text(json.dumps({"nightly_s": out["nightly_s"]}))
        trees = {"after": ROOT, **({"before": Path(args.baseline).resolve()} if args.baseline else {})}
        serve_env = {tag: env for tag in trees}
        if args.index:  # the "after" server serves with the index settings of --index
            after_cfg = state / "channels-after.yaml"
            cfg = yaml.safe_load(cfg_path.read_text())
            for name, params in args.index.items():
                cfg["channels"][name]["index"] = {**cfg["channels"][name].get("index", {}), **params}
            after_cfg.write_text(yaml.safe_dump(cfg))
            serve_env["after"] = {**env, "CHANNELS_CONFIG": str(after_cfg)}
            out["index_after"] = args.index
        servers = {tag: start_server(tree, serve_env[tag], tag) for tag, tree in trees.items()}
        try:
            for tag, (proc, port) in servers.items():
                wait_loaded(f"http://127.0.0.1:{port}", args.models, proc, tag)
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["channels"]
                for name in args.models:
                    key = name if tag == "after" else f"{name} (before)"
                    out.setdefault("index", {})[key] = {"index": health[name]["index_params"],
                                                        "load_s": health[name]["load_s"],
                                                        "tower_runtime": health[name]["tower_runtime"]}
            users = pd.read_parquet(data / "interactions.parquet", columns=["user_id"])["user_id"].astype(str).unique()
            rng = np.random.default_rng(7)
            for name in args.models:
                bodies = [orjson.dumps({"channel": name, "k": K, "user_id": str(u)})
                          for u in rng.choice(users, args.requests)]
                # alternate the trees in halves (before, after, after, before) so a drift in load hits both
                order = list(servers) if len(servers) == 1 else ["before", "after", "after", "before"]
                halves = [bodies[: len(bodies) // 2], bodies[len(bodies) // 2:]]
                runs: dict[str, list[dict]] = {t: [] for t in servers}
                for j, tag in enumerate(order):
                    part = bodies if len(servers) == 1 else halves[j // 2]
                    runs[tag].append(timed(servers[tag], name, part))
                for tag, rs in runs.items():
                    key = name if tag == "after" else f"{name} (before)"
                    out["channels"][key] = combine(rs)
                    print(key, json.dumps(out["channels"][key]), flush=True)
                if len(servers) > 1:
                    out.setdefault("same_answers", {})[name] = same_answers(servers, bodies[:50])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    out["load_1min"] = round(os.getloadavg()[0], 2)
    return out


def start_server(tree: Path, env: dict, tag: str) -> tuple[subprocess.Popen, int]:
    """The vector server of source tree `tree` (its own code: started from it), logging to WORK/server-<tag>.log."""
    port = free_port()
    log = (WORK / f"server-{tag}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.vector_server", "serve", "--port", str(port)],
                            env={**env, "PYTHONPATH": str(tree)}, cwd=tree, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc, port


def timed(server: tuple[subprocess.Popen, int], name: str, bodies: list[bytes], warm: int = 100) -> dict:
    """POST /search each body one at a time after `warm` warm-up requests: latencies at the client, the server's
    CPU ms per request, the answers' `source`; raises on any non-200 answer (scripts.bench_vector.timed_searches
    with the latencies kept, so halves can be pooled). A fresh connection: the server closes idle ones."""
    proc, port = server
    c = RawHTTP("127.0.0.1", port)
    try:
        for b in bodies[:warm]:
            c.request("POST", "/search", b)
        lat, answers = [], []
        cpu0 = _cpu_s(proc.pid)
        for b in bodies:
            t = time.perf_counter()
            answers.append(c.request("POST", "/search", b))
            lat.append(time.perf_counter() - t)
        cpu_ms = (_cpu_s(proc.pid) - cpu0) / len(bodies) * 1e3
    finally:
        c.close()
    bad = [a for a in answers if a[0] != 200]
    if bad:
        raise RuntimeError(f"{name}: {bad[0][0]} {bad[0][1][:300]!r}")
    return {"lat_s": lat, "server_cpu_ms": cpu_ms, "source": {orjson.loads(a[1]).get("source", "?") for a in answers}}


def combine(runs: list[dict]) -> dict:
    """Timed halves → one figure: latency percentiles of all the requests, server CPU ms averaged."""
    lat = [x for r in runs for x in r.pop("lat_s")]
    return {**percentiles(lat), "server_cpu_ms": round(float(np.mean([r["server_cpu_ms"] for r in runs])), 3),
            "source": sorted({s for r in runs for s in r["source"]})}


def same_answers(servers: dict[str, tuple[subprocess.Popen, int]], bodies: list[bytes]) -> float:
    """Mean fraction of the "before" server's item ids that the "after" server returns too (1.0: same sets)."""
    clients = {t: RawHTTP("127.0.0.1", port) for t, (_, port) in servers.items()}
    try:
        kept = []
        for b in bodies:
            ids = {t: set(orjson.loads(c.request("POST", "/search", b)[1])["ids"]) for t, c in clients.items()}
            kept.append(len(ids["before"] & ids["after"]) / max(1, len(ids["before"])))
    finally:
        for c in clients.values():
            c.close()
    return round(float(np.mean(kept)), 4)


def wait_loaded(url: str, names: list[str], proc: subprocess.Popen, tag: str = "after", timeout: float = 600) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vector server exited: {(WORK / f'server-{tag}.log').read_text()[-2000:]}")
        try:
            h = httpx.get(url + "/healthz", timeout=2).json()
            if all(h.get("channels", {}).get(n, {}).get("version") for n in names):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"channels {names} not loaded within {timeout:.0f} s")


def render(r: dict) -> str:
    ep = r.get("epochs", 1)
    ep = "each model's own epochs" if ep == 0 else f"{ep} epoch{'s' if ep > 1 else ''} per model"
    lines = [f"Measured {datetime.now():%Y-%m-%d} by `python -m scripts.bench_towers`: the nightly job ({ep}) on a "
             f"synthetic log of {r['clicks']:,} clicks, {r['users']:,} users, a {r['items']:,}-item "
             f"catalogue; the real vector server; POST /search by user id, k = {r['k']}, one request at a time, "
             f"measured at the client (nightly {r['nightly_s']:.0f} s). Target: p50 ≤ 2 ms.", "",
             "| channel | p50 ms | p90 ms | p99 ms | server CPU ms / request | answered by | index (load s) |",
             "|---|---|---|---|---|---|---|"]
    for n, c in r["channels"].items():
        ix = r.get("index", {}).get(n)
        ix = f"{ix['index']} ({ix['load_s']:.0f} s)" if ix else ""
        lines.append(f"| {n} | {c['p50_ms']:.2f} | {c['p90_ms']:.2f} | {c['p99_ms']:.2f} | {c['server_cpu_ms']:.2f} | "
                     f"{', '.join(c['source'])} | {ix} |")
    lines += ["", f"1-min load average at the end of the run: {r.get('load_1min', float('nan')):.2f}."]
    if r.get("index_after"):
        lines.append("Index settings of the (after) server over the shipped ones: "
                     + "; ".join(f"{n}: {p}" for n, p in r["index_after"].items()) + ".")
    if r.get("same_answers"):
        lines.append("Fraction of the before server's ids the after server returns (50 users per channel): "
                     + ", ".join(f"{n} {v:.4f}" for n, v in r["same_answers"].items()) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--clicks", type=int, default=300_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated channels of MODELS")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs per model (0: each model's own setting; "
                    "HNSW search cost depends on the embeddings' geometry, which training shapes)")
    ap.add_argument("--index", action="append", default=[], metavar="CHANNEL:KEY=VALUE[,KEY=VALUE]",
                    help="index settings of a channel for the (after) server, over the shipped ones, e.g. "
                    "mind:type=ivf,nprobe=64 (the nightly is unaffected; repeatable)")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="serve an earlier run's nightly output (same log, --models)")
    ap.add_argument("--baseline", help="also serve from this source tree and time both (same-run before/after)")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    index: dict[str, dict] = {}
    for spec in args.index:
        name, _, kv = spec.partition(":")
        if name not in args.models or not kv:
            ap.error(f"--index {spec!r}: expected CHANNEL:KEY=VALUE,… with CHANNEL one of --models")
        index[name] = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in kv.split(","))}
    args.index = index
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
