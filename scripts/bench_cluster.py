"""Serving benchmark on a Redis Cluster beside a single Redis node, measured in the same run (docs/redis_cluster.md).

    .venv/bin/python -m scripts.bench_cluster [--users 20000] [--items 20000] [--clicks 200000] [--rounds 2]
        [--duration 15] [--unloaded 500] [--out /tmp/handoff/cluster.md]

Generates (cached under var/bench/) a synthetic dataset, starts a local Redis Cluster (3 masters + 3 replicas,
common/local_cluster.py) and runs the nightly job into it (REDIS_CLUSTER=true, prefix mode: the shipped channels,
training epochs cut to 1, serving cost does not depend on them), then replays the same versions into a single
Redis node in prefix mode (`python -m trainer republish`): both backends hold identical data. Both stacks (vector
server + recall server with 2 workers) run side by side; the measurements alternate between them for `--rounds`
rounds (the CPU is shared with other work: interleaving spreads the noise, and the medians and cluster/single ratios
are what to read). Per backend: unloaded latency (sequential requests), saturation (closed loop, the built-in
generator of scripts/bench_serving.py) and CPU per request of the services and of Redis. Writes a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from scripts.bench_serving import (
    BENCH_DIR,
    ROOT,
    bench_config,
    cpu_seconds,
    loadavg,
    pct,
    run_loadgen,
    start,
    stop,
    wait_ready,
    wait_vector_warm,
    wait_warm,
)


def say(msg: str) -> None:
    print(f"[bench_cluster] {msg}", flush=True)


def config_text() -> str:
    """The shipped channels plus two-tower, every neural channel at 1 epoch (this measures serving)."""
    raw = yaml.safe_load(bench_config(two_tower=True))
    for spec in raw["channels"].values():
        if spec.get("enabled", True) and spec.get("model") in ("item2vec", "two_tower"):
            spec.setdefault("params", {})["epochs"] = 1
    return yaml.safe_dump(raw, sort_keys=False)


def publish(args, work: Path, cfg: Path, cluster_url: str, single_url: str) -> dict:
    """Nightly into the cluster (first run only; later runs replay the archive), then republish into both."""
    from trainer.synth import write_synthetic

    data = BENCH_DIR / f"synth-{args.users}u-{args.items}i-{args.clicks}c"
    if not (data / "synth.json").exists():
        say(f"generating the dataset {data.name}")
        write_synthetic(data, n_users=args.users, n_items=args.items, n_clicks=args.clicks, seed=42)
    base = {**os.environ, "REDIS_KEY_MODE": "prefix", "ARTIFACTS_DIR": str(work / "artifacts"),
            "CHANNELS_CONFIG": str(cfg), "OMP_NUM_THREADS": "1"}
    cluster_env = {**base, "REDIS_URL": cluster_url, "REDIS_CLUSTER": "true", "RUN_DIR": str(work / "run-cluster")}
    single_env = {**base, "REDIS_URL": single_url, "RUN_DIR": str(work / "run-single")}
    marker = work / "published.json"
    info = json.loads(marker.read_text()) if marker.exists() else None
    if info is None or args.retrain:
        say(f"nightly job on {data.name} into the cluster")
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "trainer", "nightly", "--data", str(data), "--config", str(cfg)],
                       cwd=ROOT, env=cluster_env, check=True)
        info = {"nightly_s_on_cluster": round(time.monotonic() - t, 1), "data": data.name}
        marker.write_text(json.dumps(info))
    else:
        say("replaying the archived versions into the cluster (python -m trainer republish)")
        _republish(cluster_env)
    say("replaying the same versions into the single node")
    t = time.monotonic()
    _republish(single_env)
    info["republish_s_single"] = round(time.monotonic() - t, 1)
    return info


def _republish(env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "trainer", "republish"], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"republish failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def measure(name: str, stack: dict, args) -> dict:
    """One round on one backend: unloaded latency, then saturation with CPU accounting."""
    port, paths = stack["port"], stack["paths"]
    run_loadgen("closed", port, paths, duration=3, conns=8)  # warm the connections and caches
    seq = run_loadgen("seq", port, paths, n=args.unloaded)
    lat = np.asarray(seq["latency_s"]) * 1000
    cpu0 = {k: sum(cpu_seconds(p) for p in pids) for k, pids in stack["pgids"].items()}
    closed = run_loadgen("closed", port, paths, duration=args.duration, conns=args.conns)
    used = {k: sum(cpu_seconds(p) for p in pids) - cpu0[k] for k, pids in stack["pgids"].items()}
    n = max(closed["requests"], 1)
    out = {"unloaded_p50_ms": pct(lat, 50), "unloaded_p99_ms": pct(lat, 99), "unloaded_errors": seq["errors"],
           "rps": closed["rps"], "sat_p50_ms": pct(closed["latency_s"], 50) * 1000,
           "sat_p99_ms": pct(closed["latency_s"], 99) * 1000, "sat_errors": closed["errors"],
           "cpu_ms_per_request": {k: v / n * 1000 for k, v in used.items()}, "loadavg_1m": loadavg()}
    say(f"{name}: unloaded p50 {out['unloaded_p50_ms']:.2f} ms, {out['rps']:.0f} rps, CPU ms/request "
        f"{ {k: round(v, 3) for k, v in out['cpu_ms_per_request'].items()} }, load {out['loadavg_1m']:.1f}")
    return out


def summarize(rounds: list[dict]) -> dict:
    """Median over rounds of every figure."""
    keys = [k for k in rounds[0] if k != "cpu_ms_per_request"]
    out = {k: float(np.median([r[k] for r in rounds])) for k in keys}
    out["cpu_ms_per_request"] = {c: float(np.median([r["cpu_ms_per_request"][c] for r in rounds]))
                                 for c in rounds[0]["cpu_ms_per_request"]}
    return out


def render(res: dict) -> str:
    s, c = res["single"], res["cluster"]

    def row(label: str, a: float, b: float, fmt: str = "{:.2f}") -> str:
        return f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |" if a else f"| {label} | – | – | – |"

    cpu = lambda r, k: r["cpu_ms_per_request"][k]  # noqa: E731
    lines = [
        "### Serving on a Redis Cluster (3 masters + 3 replicas) beside one Redis node",
        "",
        f"`python -m scripts.bench_cluster` ({res['date']}; {res['machine']}): {res['dataset']}, the shipped channels "
        f"plus two-tower ({', '.join(res['channels'])}), k={res['k']}, recall server with {res['workers']} workers + "
        "vector server; identical data in both backends (nightly into the cluster, `trainer republish` into the "
        f"single node, both in prefix mode). Median of {res['rounds']} interleaved rounds; saturation = built-in "
        f"closed-loop generator, {res['conns']} connections, {res['duration']:.0f} s. **The 2 cores were shared with "
        f"other jobs during the run (1-min load average {res['load_min']:.1f}–{res['load_max']:.1f}): read the ratios, "
        "not the absolute figures.** All Redis nodes ran on the same machine as the services.",
        "",
        "| | single node | cluster | cluster / single |",
        "|---|---|---|---|",
        row("unloaded p50 (ms)", s["unloaded_p50_ms"], c["unloaded_p50_ms"]),
        row("unloaded p99 (ms)", s["unloaded_p99_ms"], c["unloaded_p99_ms"]),
        row("saturation (rps)", s["rps"], c["rps"], "{:.0f}"),
        row("p99 at saturation (ms)", s["sat_p99_ms"], c["sat_p99_ms"], "{:.1f}"),
        row("CPU ms / request: recall server", cpu(s, "recall"), cpu(c, "recall"), "{:.3f}"),
        row("CPU ms / request: vector server", cpu(s, "vector"), cpu(c, "vector"), "{:.3f}"),
        row("CPU ms / request: Redis (all nodes)", cpu(s, "redis"), cpu(c, "redis"), "{:.3f}"),
        row("CPU ms / request: total", sum(s["cpu_ms_per_request"].values()), sum(c["cpu_ms_per_request"].values()),
            "{:.3f}"),
        "",
        f"Errors: single {s['sat_errors']:.0f}, cluster {c['sat_errors']:.0f} (non-200 answers at saturation). "
        "CPU per request (CPU seconds of each process group during the saturation run / requests served) is the "
        "figure that survives a shared machine; rps and latencies moved by ±30% between rounds of the same backend "
        f"here (rounds: single {', '.join(f'{x:.0f}' for x in res['rps_rounds']['single'])} rps, cluster "
        f"{', '.join(f'{x:.0f}' for x in res['rps_rounds']['cluster'])} rps). The cluster's Redis CPU includes its "
        "six nodes' cluster-bus gossip; its masters would each have cores of their own in production, so on one "
        "machine the cluster can only cost, never add, capacity.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench_cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--clicks", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of each saturation run")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--unloaded", type=int, default=500, help="sequential requests of each unloaded run")
    ap.add_argument("--retrain", action="store_true", help="run the nightly job even if its archive is cached")
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "cluster.json")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--render", action="store_true", help="only print the table of the last run's --json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(args.json.read_text())
        res.setdefault("rps_rounds", {n: [x["rps"] for x in rs] for n, rs in res["all_rounds"].items()})
        print(render(res))
        return 0

    from common.channel_config import load_config
    from common.ids import load_id_map
    from common.keyspace import Keyspace
    from common.local_cluster import LocalCluster
    from common.local_redis import LocalRedis, free_port
    from common.redis_conn import RedisStores

    cfg_text = config_text()
    work = BENCH_DIR / f"cluster-{args.users}u-{args.items}i-{args.clicks}c"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "channels.yaml"
    if cfg.exists() and cfg.read_text() != cfg_text:
        args.retrain = True  # another config: the archive does not match it
    cfg.write_text(cfg_text)
    cluster = LocalCluster()  # fresh every run (temporary dirs): the data comes from the archive
    single = LocalRedis(aof=False)
    procs: list[subprocess.Popen] = []
    try:
        cluster.start()
        single.start()
        info = publish(args, work, cfg, cluster.url, single.url)
        stores = RedisStores(single.url, Keyspace(mode="prefix"))
        users = load_id_map(stores, "user").ids
        stores.close()
        sample = random.Random(42).sample(users, min(20_000, len(users)))
        paths = work / "paths.txt"
        paths.write_text("\n".join(f"/recall?k={args.k}&user_id={u}" for u in sample) + "\n")
        stacks = {}
        for name, url, extra in (("single", single.url, {}), ("cluster", cluster.url, {"REDIS_CLUSTER": "true"})):
            vport, rport = free_port(), free_port()
            env = {**os.environ, "REDIS_URL": url, "REDIS_KEY_MODE": "prefix", "ARTIFACTS_DIR": str(work / "artifacts"),
                   "CHANNELS_CONFIG": str(cfg), "RUN_DIR": str(work / f"run-{name}"), "OMP_NUM_THREADS": "1",
                   "VECTOR_URL": f"http://127.0.0.1:{vport}", **extra}
            logs = work / f"run-{name}"
            logs.mkdir(parents=True, exist_ok=True)
            vector = start("services.vector_server", vport, env, logs / "vector.log")
            recall = start("services.recall_server", rport, env, logs / "recall.log", ["--workers", str(args.workers)])
            procs += [vector, recall]
            redis_pids = [single.proc.pid] if name == "single" else [n.proc.pid for n in cluster.live()]
            stacks[name] = {"port": rport, "vport": vport, "recall": recall, "log": logs / "recall.log",
                            "pgids": {"recall": [recall.pid], "vector": [vector.pid], "redis": redis_pids},
                            "paths": paths}
        for name, st in stacks.items():
            first = wait_ready(st["port"], sample[0], st["recall"], st["log"])
            wait_warm(st["port"])
            wait_vector_warm(st["vport"])
            st["channels"] = list(first["channels"])
            say(f"{name}: serving {', '.join(st['channels'])}")
        rounds: dict[str, list[dict]] = {"single": [], "cluster": []}
        for r in range(args.rounds):
            order = ("single", "cluster") if r % 2 == 0 else ("cluster", "single")
            for name in order:
                say(f"round {r + 1}/{args.rounds}: {name}")
                rounds[name].append(measure(name, stacks[name], args))
        loads = [x["loadavg_1m"] for rs in rounds.values() for x in rs]
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} vCPU {platform.machine()}, Python {platform.python_version()}",
            "dataset": f"synthetic {args.users:,} users × {args.items:,} items × {args.clicks:,} clicks",
            "channels": [c.name for c in load_config(cfg).enabled()], "k": args.k, "workers": args.workers,
            "rounds": args.rounds, "conns": args.conns, "duration": args.duration, "publish": info,
            "load_min": min(loads), "load_max": max(loads),
            "single": summarize(rounds["single"]), "cluster": summarize(rounds["cluster"]), "all_rounds": rounds,
            "rps_rounds": {n: [x["rps"] for x in rs] for n, rs in rounds.items()},
        }
    finally:
        for p in procs:
            stop(p)
        cluster.stop()
        single.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    table = render(result)
    print(table)
    if args.out is not None:
        args.out.write_text(table)
        say(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
