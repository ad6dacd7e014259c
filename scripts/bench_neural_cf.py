"""NeuralCF benchmarks: validation grids / test rows on ml-100k under PROTOCOL.md (fit through the channel, answers
through its serving path), and fit seconds on a bigger log (e.g. the 1M-click synthetic one).

    python -m scripts.bench_neural_cf grid --split val --grid '[{}, {"lr": 0.003}]'
    python -m scripts.bench_neural_cf grid --split test --grid '[{}, {"rescore_n": 0}, {"max_catalog_bruteforce": 5000}]'
    python -m scripts.bench_neural_cf serving --split test --params '{}'
    python -m scripts.bench_neural_cf fit-time --data var/data/synth-1m --params '{}'
    python -m scripts.bench_neural_cf latency --n-items 100000 --requests 1000

Each row is printed and appended as one JSON line to --log.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import typer

from common.channel_config import ChannelSpec
from common.retrieval import retrieve_vectors
from common.towers.rescore import RescoreSettings, two_stage
from scripts.bench_two_tower import evaluate, load
from trainer.channels.base import served_rescorer
from trainer.channels.neural_cf import NeuralCFChannel
from trainer.data.io import load_dataset
from trainer.data.train_data import TrainData
from trainer.evaluate import fit_channel, make_split, protocol_split
from trainer.metrics import calibrate

app = typer.Typer(add_completion=False)
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def _log(path: Path, rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


@app.command()
def grid(split: str = typer.Option("val", help="val (selection) or test (the chosen rows only)"),
         grid: str = typer.Option("[{}]", help="JSON list of param overrides"),
         data: Path = typer.Option(ML100K), log: Path = typer.Option(Path("var/bench/neural_cf.jsonl"))) -> None:
    """HR@50 / HR@200 / NDCG@50 / Coverage@50 / fit s of each parameter set on one split."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ds, splits = load(data)
    train, test = splits[split]
    for params in json.loads(grid):
        cpu = time.process_time()
        r = evaluate(NeuralCFChannel, "u2i", params, ds, train, test)
        _log(log, {"split": split, "params": params, **{k: round(v, 4) for k, v in r.items()},
                   "cpu_s": round(time.process_time() - cpu, 1), "load": round(os.getloadavg()[0], 1)})


@app.command()
def serving(split: str = typer.Option("val"), params: str = typer.Option("{}"),
            rescore_n: str = typer.Option("0,100,200,500,1000", help="first-stage sizes (0: the GMF part alone)"),
            data: Path = typer.Option(ML100K), log: Path = typer.Option(Path("var/bench/neural_cf.jsonl"))) -> None:
    """One fit, scored with several serving settings: GMF first stage alone, two-stage with each rescore_n, brute
    force (every item rescored)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ds, splits = load(data)
    train, test = splits[split]
    tdata = TrainData.from_frame(train, ds.users, ds.items)
    ch = NeuralCFChannel(ChannelSpec(name="bench", kind="u2i", model="neural_cf", params=json.loads(params)), seed=42)
    ch.fit(tdata)
    art = ch.artifacts(tdata)["u2i"]
    module, _ = served_rescorer(art)
    torch.set_num_threads(1)  # as the vector server (one thread per worker)
    users = tdata.user_map.lookup(test["user_id"]).astype(np.int64)
    targets = tdata.item_map.lookup(test["item_id"])
    rows = [(f"two_stage n={n}" if n else "gmf first stage", RescoreSettings(n, 0) if n else None)
            for n in (int(x) for x in rescore_n.split(","))] + [("brute force", RescoreSettings(1, 2**62))]
    for name, rs in rows:
        t = time.process_time()
        recs = []
        for u in users:
            seen = tdata.history(int(u))[0]
            q = art.user_vectors[u]
            first = lambda n, q=q, seen=seen: retrieve_vectors(q, art.item_vectors, n, seen)  # noqa: E731
            recs.append(first(200) if rs is None else two_stage(module, q, 200, seen, first, rs))
        rank = np.array([(np.flatnonzero(ids == t)[0] + 1) if t >= 0 and (ids == t).any() else np.inf
                         for (ids, _), t in zip(recs, targets, strict=True)])
        _log(log, {"split": split, "params": json.loads(params), "serving": name,
                   "hr50": round(float(np.mean(rank <= 50)), 4), "hr200": round(float(np.mean(rank <= 200)), 4),
                   "ndcg50": round(float(np.mean(np.where(rank <= 50, 1 / np.log2(rank + 1), 0))), 4),
                   "ms_per_user": round(1000 * (time.process_time() - t) / len(users), 3)})


@app.command("fit-time")
def fit_time(data: Path = typer.Option(..., help="dataset directory"), params: str = typer.Option("{}"),
             repeats: int = typer.Option(1), log: Path = typer.Option(Path("var/bench/neural_cf.jsonl"))) -> None:
    """Seconds to fit the channel alone (TrainData of the protocol's training split → artifacts built)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    train, test = protocol_split(ds)
    split = make_split(train, test, ds)
    spec = ChannelSpec(name="neural_cf", kind="u2i", model="neural_cf", params=json.loads(params))
    calib = calibrate()
    for _ in range(repeats):
        cpu = time.process_time()
        _, sec = fit_channel(spec, split.data)
        _log(log, {"data": str(data), "params": spec.params, "fit_s": round(sec, 1),
                   "cpu_s": round(time.process_time() - cpu, 1), "calib_s": round(calib, 3),
                   "load": round(os.getloadavg()[0], 1), "n_users": split.data.n_users,
                   "n_items": split.data.n_items, "n_train": len(split.data.item_idx)})


@app.command()
def latency(n_items: int = typer.Option(100_000), n_users: int = typer.Option(20_000),
            requests: int = typer.Option(1000), params: str = typer.Option('{"epochs": 1, "pretrain": false}'),
            index: str = typer.Option("hnsw", help="the channel's index type (hnsw, ivf, flat)"), log: Path = typer.Option(Path("var/bench/neural_cf.jsonl"))) -> None:
    """Unloaded POST /search by user id (k=200) on the real vector server over an `n_items` catalogue: the channel
    fitted (1 epoch: latency does not depend on quality) on a synthetic log, published into a private Redis twice,
    as the real vector server loads it (faiss over the GMF columns, NeuMF rescoring of the top `rescore_n`)."""
    import subprocess
    import sys

    import httpx
    import orjson
    import pandas as pd
    import yaml

    from common.channel_config import load_config
    from common.ids import publish_id_map
    from common.keyspace import FEATURES_CHANNEL, Keyspace, pack_json
    from common.local_redis import LocalRedis, free_port
    from common.redis_conn import RedisStores
    from common.towers.rescore import RESCORE_KEY
    from scripts.bench_vector import RawHTTP, timed_searches
    from trainer.publishing import publish_channel

    log.parent.mkdir(parents=True, exist_ok=True)
    work = log.parent / "neural_cf_latency"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_clicks = 2 * n_items  # every item clicked at least once: the whole catalogue is served
    items = np.concatenate([rng.permutation(n_items), rng.integers(0, n_items, n_clicks - n_items)])
    frame = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, n_users, n_clicks)],
                          "item_id": items.astype(str), "timestamp": 1_700_000_000 + np.arange(n_clicks)})
    data = TrainData.from_frame(frame)
    cfg_path = work / "channels.yaml"
    user_params = json.loads(params)
    cfg_path.write_text(yaml.safe_dump({"channels": {"ncf": {"kind": "u2i", "model": "neural_cf",
                                                             "params": user_params, "index": {"type": index}}}}))
    cfg = load_config(cfg_path)
    ch = NeuralCFChannel(cfg.get("ncf"), seed=42)
    t0 = time.perf_counter()
    ch.fit(data)
    art = ch.artifacts(data)["u2i"]
    out: dict = {"bench": "latency", "n_items": n_items, "n_users": data.n_users, "params": user_params,
                 "fit_s": round(time.perf_counter() - t0, 1), "dim": int(art.item_vectors.shape[1]),
                 "rescore": art.user_tower_meta.get(RESCORE_KEY), "channels": {}}
    with LocalRedis() as rds:
        stores = RedisStores(rds.url, Keyspace(), socket_timeout=30)
        versions = {"ncf": publish_channel(stores, cfg.get("ncf"), {"u2i": art}, data, work / "artifacts",
                                           progress=False)}
        publish_id_map(stores, "item", data.item_map)
        publish_id_map(stores, "user", data.user_map)
        ks, pipe = stores.keyspace, stores("user_features").pipeline(transaction=False)
        ids = np.asarray(data.item_map.ids, dtype=object)
        for u in range(data.n_users):
            hist, ts = data.history(u)
            pipe.set(ks.user_features("bench", data.user_map.ids[u]), pack_json({
                "user_id": data.user_map.ids[u], "recent": [[ids[i], int(t)] for i, t in zip(hist[::-1], ts[::-1],
                                                                                             strict=True)],
                "attrs": {}, "seen": ids[hist].tolist()}))
        pipe.execute()
        stores("meta").set(ks.current(FEATURES_CHANNEL), "bench")
        port = free_port()
        env = {**os.environ, "REDIS_URL": rds.url, "CHANNELS_CONFIG": str(cfg_path), "OMP_NUM_THREADS": "1",
               "ARTIFACTS_DIR": str(work / "artifacts"), "LOG_LEVEL": "warning"}
        server_log = (work / "server.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "services.vector_server", "serve", "--port", str(port)],
                                env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None or time.perf_counter() - t0 > 900:
                    raise RuntimeError(f"server not ready: {(work / 'server.log').read_text()[-2000:]}")
                try:
                    h = httpx.get(url + "/healthz", timeout=2).json()
                    if all(h["channels"].get(c, {}).get("version") == v for c, v in versions.items()):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            out["index"] = h["channels"]["ncf"]["index_params"]
            out["index_dims"], out["load_s"] = h["channels"]["ncf"]["index_dims"], h["channels"]["ncf"]["load_s"]
            c = RawHTTP("127.0.0.1", port)
            try:
                for name in versions:
                    bodies = [orjson.dumps({"channel": name, "k": 200, "user_id": data.user_map.ids[u],
                                            "exclude_seen": True}) for u in rng.integers(0, data.n_users, requests)]
                    out["channels"][name] = {**timed_searches(c, proc.pid, name, bodies),
                                             "rescore": h["channels"][name]["rescore"]}
            finally:
                c.close()
        finally:
            proc.terminate()
            proc.wait(10)
            server_log.close()
            stores.close()
    _log(log, {**out, "load": round(os.getloadavg()[0], 1)})


if __name__ == "__main__":
    app()
