"""The Ray engine against the local engine (docs/scaling.md).

    python -m scripts.bench_ray nightly --clicks 1000000 --tower-epochs 1   # local vs Ray (head + 1 worker node)
    python -m scripts.bench_ray tower                                        # two-tower HR@50 on ml-100k, both engines

`nightly`: one synthetic log (scripts.bench_quality's, cached under var/bench/), the shipped channel config
(two-tower's epochs overridable), one nightly process per engine against a private Redis, run back to back in the
same window; the Ray run uses a local cluster of two nodes (`ray start` head + one worker, one CPU each) on this
machine, so parity, not a speed-up, is the expectation. Per-stage seconds from each run's summary.json, the
Ray stats of each channel (object-store puts, tasks, gather), peak RSS of the nightly (driver) process.
`tower`: the evaluator's protocol split of ml-100k, two-tower with its shipped params fitted by each engine,
HR@50 / HR@200 of the channel's own lists.
Results go to stdout and, with --out, to a markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from scripts.bench_quality import ML100K, ROOT, WORK, ensure_synth, run_measured


def _config(tower_epochs: int | None) -> Path:
    raw = yaml.safe_load((ROOT / "config" / "channels.yaml").read_text())
    if tower_epochs is not None:
        raw["channels"]["two_tower"].setdefault("params", {})["epochs"] = tower_epochs
    out = WORK / f"ray_channels_e{tower_epochs}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _nightly(engine: str, data: Path, config: Path, redis_url: str, artifacts: Path, address: str | None,
             timeout_s: float) -> dict:
    env = {**os.environ, "REDIS_URL": redis_url, "ARTIFACTS_DIR": str(artifacts), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trainer", "nightly", "--data", str(data), "--config", str(config),
           "--engine", engine] + (["--ray-address", address] if address else [])
    log = WORK / f"ray-bench-{engine}.log"
    rc, wall, rss = run_measured(cmd, env, log, timeout_s)
    runs = sorted((artifacts / "runs").glob("*/summary.json"))
    summary = json.loads(runs[-1].read_text())
    if rc != 0:
        raise SystemExit(f"{engine} nightly failed (exit {rc}); see {log}")
    return {"wall_s": wall, "rss_mb": rss, "summary": summary}


def bench_nightly(clicks: int, tower_epochs: int | None, timeout_s: float) -> str:
    from common.local_redis import LocalRedis
    from trainer.engine.ray_cluster import LocalRayCluster

    data = ensure_synth(clicks)
    config = _config(tower_epochs)
    res: dict[str, dict] = {}
    started = datetime.now()
    load0 = os.getloadavg()[0]
    with LocalRedis(aof=False) as redis_server:
        res["local"] = _nightly("local", data, config, redis_server.url, WORK / "ray-bench-local", None, timeout_s)
        res["redis"] = redis_breakdown(redis_server.url)  # what one published nightly holds (docs/scaling.md)
        with LocalRayCluster(workers=1, cpus_per_node=1, object_store_mb=2048) as cluster:
            res["ray"] = _nightly("ray", data, config, redis_server.url, WORK / "ray-bench-ray", cluster.address,
                                  timeout_s)
        res["equal"] = compare_lists(redis_server.url, config, res["local"]["summary"], res["ray"]["summary"])
    (WORK / f"ray-bench-{clicks}.json").write_text(json.dumps(res, indent=1, default=str))
    return render_nightly(clicks, tower_epochs, res, started, load0, os.getloadavg()[0])


def compare_lists(url: str, config: Path, local: dict, on_ray: dict, batch: int = 5000) -> dict[str, str]:
    """Every i2i / u2u list both runs published, compared value for value (both versions are kept: KEEP_VERSIONS
    ≥ 2): 'identical (N keys)' or how many differ."""
    from common.channel_config import load_config
    from common.ids import load_id_map
    from common.keyspace import Keyspace
    from common.redis_conn import RedisStores
    from common.settings import Settings
    from trainer.publishing import nn_store

    cfg = load_config(config)
    stores = RedisStores(url, Keyspace.from_settings(Settings(redis_url=url)))
    ks = stores.keyspace
    out: dict[str, str] = {}
    try:
        items = list(range(len(load_id_map(stores, "item"))))
        users = load_id_map(stores, "user").ids
        for spec in cfg.enabled():
            if spec.kind not in ("i2i", "u2u"):
                continue
            owner = cfg.get(spec.source or spec.name)
            va, vb = local["versions"].get(owner.name), on_ray["versions"].get(owner.name)
            if not va or not vb:
                out[spec.name] = "not published by both"
                continue
            store = nn_store(owner, spec.kind)
            key = ks.i2i if spec.kind == "i2i" else ks.u2u
            ids = items if spec.kind == "i2i" else users
            differ = present = 0
            for lo in range(0, len(ids), batch):
                part = ids[lo:lo + batch]
                a = stores(store).mget([key(store, owner.name, va, k) for k in part])
                b = stores(store).mget([key(store, owner.name, vb, k) for k in part])
                differ += sum(x != y for x, y in zip(a, b, strict=True))
                present += sum(x is not None for x in a)
            if not present:
                out[spec.name] = "no lists found"
            else:
                out[spec.name] = (f"identical ({present:,} lists)" if not differ
                                  else f"{differ:,} of {len(ids):,} differ")
    finally:
        stores.close()
    return out


def redis_breakdown(url: str, sample: int = 300) -> dict:
    """Redis memory by key family (ids and versions masked) over every db: keys, sampled bytes per key (MEMORY
    USAGE of up to `sample` keys per family), estimated total MB; plus `used_memory` of INFO."""
    import random
    import re

    import redis

    mask = re.compile(r"\d{8}T\d{9}-[0-9a-f]{4}|\b\d+\b")
    out: dict[str, dict] = {}
    first = redis.Redis.from_url(url)
    used = int(first.info("memory")["used_memory"])
    dbs = [int(k[2:]) for k in first.info("keyspace")]
    first.close()
    for db in dbs:
        r = redis.Redis.from_url(re.sub(r"/\d*$", "", url) + f"/{db}")  # the URL's db wins over db=
        fams: dict[str, list[bytes]] = {}
        for key in r.scan_iter(count=5000):
            fams.setdefault(f"db{db} " + mask.sub("#", key.decode(errors="replace")), []).append(key)
        for fam, keys in fams.items():
            pick = random.Random(0).sample(keys, min(sample, len(keys)))
            sizes = [r.memory_usage(k, samples=0) or 0 for k in pick]
            per_key = sum(sizes) / max(1, len(sizes))
            out[fam] = {"keys": len(keys), "bytes_per_key": round(per_key), "mb": round(per_key * len(keys) / 2**20, 1)}
        r.close()
    return {"used_memory_mb": round(used / 2**20, 1),
            "families": dict(sorted(out.items(), key=lambda kv: -kv[1]["mb"]))}


def render_nightly(clicks: int, tower_epochs: int | None, res: dict, started: datetime, load0: float,
                   load1: float) -> str:
    loc, ray_ = res["local"]["summary"], res["ray"]["summary"]
    lst = {s["stage"]: s for s in loc["stages"]}
    rst = {s["stage"]: s for s in ray_["stages"]}
    order = [s["stage"] for s in ray_["stages"]]
    rows = ["| stage | local s | Ray s | Ray / local | Ray − local s | on Ray: what the engine did |",
            "|---|---|---|---|---|---|"]
    for name in order:
        a, b = lst.get(name, {}).get("seconds"), rst[name].get("seconds", 0.0)
        ch = name.split(":", 1)[1] if name.startswith("fit:") else None
        detail = ""
        if ch and "engine" in ray_["channels"].get(ch, {}):
            e = dict(ray_["channels"][ch]["engine"])
            e.pop("fit_s", None)
            detail = ", ".join(f"{k} {v}" for k, v in e.items() if not isinstance(v, dict))
            if "neighbors" in e:
                detail += "; lists " + ", ".join(f"{k}: {v['tasks']} tasks {v['seconds']} s"
                                                 for k, v in e["neighbors"].items())
        if name == "engine":
            eng = ray_.get("engine", {})
            detail = f"connect to {eng.get('nodes')} nodes / {eng.get('cpus')} CPUs"
        ratio = f"{b / a:.2f}" if a else "–"
        diff = f"{b - a:+.1f}" if a is not None else f"+{b:.1f}"
        rows.append(f"| {name} | {a if a is not None else '–'} | {b} | {ratio} | {diff} | {detail} |")
    tot_a, tot_b = res["local"]["wall_s"], res["ray"]["wall_s"]
    rows.append(f"| **total wall s** (process) | **{tot_a:.1f}** | **{tot_b:.1f}** | **{tot_b / tot_a:.2f}** | "
                f"{tot_b - tot_a:+.1f} | |")
    rows.append(f"| peak RSS of the nightly process (MB) | {res['local']['rss_mb']:,.0f} | "
                f"{res['ray']['rss_mb']:,.0f} (driver only) | | | |")
    c = loc["counts"]
    head = (f"### Nightly, local engine vs Ray ({clicks:,} clicks; {c['n_interactions']:,} interactions / "
            f"{c['n_users']:,} users / {c['n_items']:,} items)\n\n"
            f"`python -m scripts.bench_ray nightly --clicks {clicks}"
            + (f" --tower-epochs {tower_epochs}" if tower_epochs is not None else "") +
            f"`, {started:%Y-%m-%d %H:%M}, run back to back on one {os.cpu_count()}-CPU machine shared with "
            f"other jobs (load average {load0:.1f} before, {load1:.1f} after): compare the ratios of this run, "
            f"not the seconds with other tables. Local: one process. Ray: the same nightly with `--engine ray` "
            f"against a local cluster of 2 nodes (`ray start` head + 1 worker, 1 CPU each); shipped config"
            + (f", two-tower {tower_epochs} epoch(s)" if tower_epochs is not None else "") + ".\n\n")
    table = head + "\n".join(rows) + "\n"
    if "redis" in res:
        rb = res["redis"]
        fams = [(k, v) for k, v in rb["families"].items() if v["mb"] >= 0.5]
        table += (f"\nRedis after the local run (one published nightly): used_memory {rb['used_memory_mb']:,.0f} MB; "
                  "largest key families (ids masked as #, sampled MEMORY USAGE):\n\n"
                  "| key family | keys | bytes / key | MB |\n|---|---|---|---|\n"
                  + "\n".join(f"| `{k}` | {v['keys']:,} | {v['bytes_per_key']:,} | {v['mb']:,.1f} |"
                               for k, v in fams[:15]) + "\n")
    eq = res.get("equal")
    if eq:
        table += "\nPublished lists, Ray vs local: " + ", ".join(f"{k} {v}" for k, v in eq.items()) + "\n"
    return table


def bench_tower(workers: int) -> str:
    import ray

    from common.channel_config import load_config
    from trainer.channels import registry
    from trainer.data.io import load_dataset
    from trainer.engine.ray_cluster import LocalRayCluster
    from trainer.engine.ray_engine import RayEngine
    from trainer.evaluate import SEED, clean_lists, make_split, protocol_split, recommend_all
    from trainer.metrics import lists_to_matrix, summarize

    ds = load_dataset(ML100K)
    split = make_split(*protocol_split(ds), ds)
    spec = load_config(ROOT / "config" / "channels.yaml").get("two_tower")

    def score(ch) -> dict:
        lists, _ = recommend_all(ch, spec, split, 200)
        mat = lists_to_matrix(clean_lists(lists, split, 200, spec.name), 200)
        return summarize(mat, split.targets, split.catalog_size)

    out = {}
    t = time.perf_counter()
    ch = registry.build(spec, seed=SEED)
    ch.fit(split.data)
    out["local"] = {**score(ch), "fit_s": time.perf_counter() - t}
    with LocalRayCluster(workers=workers - 1, cpus_per_node=1, object_store_mb=512) as cluster:
        eng = RayEngine(address=cluster.address, train_workers=workers)
        t = time.perf_counter()
        ch = registry.build(spec, seed=SEED)
        eng.fit(ch, split.data)
        out["ray"] = {**score(ch), "fit_s": time.perf_counter() - t, **eng.stats}
        eng.close()
        ray.shutdown()
    rows = ["| engine | HR@50 | HR@200 | NDCG@50 | fit s |", "|---|---|---|---|---|"]
    for k, v in out.items():
        label = f"{k} (Ray Train, {workers} gloo workers)" if k == "ray" else k
        rows.append(f"| {label} | {v['hr@50']:.4f} | "
                    f"{v['hr@200']:.4f} | {v['ndcg@50']:.4f} | {v['fit_s']:.1f} |")
    d = out["ray"]["hr@50"] - out["local"]["hr@50"]
    return (f"### Two-tower on Ray Train vs local (ml-100k, evaluator's test split)\n\n"
            f"{datetime.now():%Y-%m-%d %H:%M}; shipped params ({spec.params or 'defaults'}), seed {SEED}. "
            f"HR@50 difference {d:+.4f} (target ±0.01).\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["nightly", "tower"])
    ap.add_argument("--clicks", type=int, default=1_000_000)
    ap.add_argument("--tower-epochs", type=int, default=None, help="override two-tower's epochs (default: shipped)")
    ap.add_argument("--workers", type=int, default=2, help="tower: Ray Train workers (= local nodes, 1 CPU each)")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    text = bench_nightly(args.clicks, args.tower_epochs, args.timeout) if args.what == "nightly" \
        else bench_tower(args.workers)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
