"""The reference prototype of PERFORMANCE_NOTES.md ("the ceiling"), rebuilt so it can be measured on the
same machine, in the same run, as the real recall server.

    .venv/bin/python -m scripts.bench_prototype [--duration 20] [--json OUT]

One FastAPI endpoint, 2 uvicorn workers: per request it reads a user's 20 recent items and 64-d embedding
(one pipelined round trip), fetches the 20 items' packed i2i lists of 50 neighbours (one MGET), runs one
faiss HNSW search (k=200, efSearch 256, 100k × 64-d items), merges the ~1,000 candidates into a top-300
with numpy and answers with orjson. No channels config, no metrics, no versions, no fault handling: the
shape whose throughput PERFORMANCE_NOTES quotes (≈1,350 rps on the machine it was measured on). The
machines here vary in speed from day to day, so `scripts.bench_serving` reports its figures beside this.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_ITEMS, N_USERS, DIM, RECENT, PER_ITEM, K = 100_000, 100_000, 64, 20, 50, 300
ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[bench_prototype] {msg}", flush=True)


def seed(url: str, index_path: Path) -> None:
    """Random packed i2i lists, user records and clustered item vectors (HNSW written to `index_path`)."""
    import faiss
    import redis

    rng = np.random.default_rng(7)
    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for i in range(N_ITEMS):
        ids = rng.integers(0, N_ITEMS, PER_ITEM, dtype=np.int32)
        sc = np.sort(rng.random(PER_ITEM, dtype=np.float32))[::-1]
        pipe.set(f"p:i:{i}", ids.tobytes() + sc.tobytes())
        if i % 5000 == 4999:
            pipe.execute()
    centers = rng.standard_normal((200, DIM)).astype(np.float32)
    for u in range(N_USERS):
        rec = rng.integers(0, N_ITEMS, RECENT, dtype=np.int32)
        emb = (centers[u % 200] + 0.3 * rng.standard_normal(DIM)).astype(np.float32)
        pipe.set(f"p:u:{u}", rec.tobytes() + emb.tobytes())
        if u % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    items = (centers[rng.integers(0, 200, N_ITEMS)] + 0.3 * rng.standard_normal((N_ITEMS, DIM))).astype(np.float32)
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(items)
    faiss.write_index(index, str(index_path))


def create_app():
    """The prototype endpoint (uvicorn factory; REDIS_URL and PROTOTYPE_INDEX from the environment)."""
    import faiss
    import orjson
    import redis.asyncio as aioredis
    from fastapi import FastAPI
    from fastapi.responses import Response

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(os.environ["PROTOTYPE_INDEX"])
    params = faiss.SearchParametersHNSW(efSearch=256)
    client = aioredis.Redis.from_url(os.environ["REDIS_URL"], protocol=2)
    app = FastAPI()
    gc.collect()
    gc.freeze()

    @app.get("/recall")
    async def recall(user_id: int) -> Response:
        raw = await client.get(f"p:u:{user_id}")
        recent = np.frombuffer(raw, np.int32, RECENT)
        emb = np.frombuffer(raw, np.float32, DIM, offset=4 * RECENT).reshape(1, DIM)
        values = await client.mget([f"p:i:{i}" for i in recent.tolist()])
        ids = np.concatenate([np.frombuffer(v, np.int32, PER_ITEM) for v in values]).astype(np.int64)
        sc = np.concatenate([np.frombuffer(v, np.float32, PER_ITEM, offset=4 * PER_ITEM) for v in values])
        d, i = index.search(emb, 200, params=params)
        ids = np.concatenate([ids, i[0]])
        sc = np.concatenate([sc, d[0] / max(float(d[0].max()), 1e-9)])
        uniq, inv = np.unique(ids, return_inverse=True)
        total = np.bincount(inv, weights=sc)
        top = np.argsort(-total, kind="stable")[:K]
        body = {"user_id": user_id, "items": [{"item_id": int(a), "score": float(b)}
                                              for a, b in zip(uniq[top].tolist(), total[top].tolist(), strict=True)]}
        return Response(orjson.dumps(body), media_type="application/json")

    return app


def measure(duration: float, conns: int = 32, unloaded: int = 1000, rate: float | None = None,
            rate_runs: int = 3) -> dict:
    """Start a private Redis and the prototype (2 workers), drive it with wrk; return rps and latencies (and the
    latency at a fixed `rate`, with the serving benchmark's open-loop generator, when given)."""
    from common.local_redis import LocalRedis, free_port
    from scripts.bench_serving import cpu_seconds, fixed_rate, pct, run_loadgen, stop, wrk_saturation

    work = Path(tempfile.mkdtemp(prefix="prototype-"))
    redis_server = LocalRedis(data_dir=work / "redis", port=free_port()).start()
    proc = None
    try:
        say("seeding 100k item lists, 100k users and an HNSW index (100k × 64)")
        seed(redis_server.url, work / "index.faiss")
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis_server.url, "PROTOTYPE_INDEX": str(work / "index.faiss"),
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "scripts.bench_prototype:create_app", "--factory",
                                 "--port", str(port), "--workers", "2", "--no-access-log", "--log-level", "warning"],
                                cwd=ROOT, env=env, start_new_session=True)
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/recall?user_id=1", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the prototype never answered")
            time.sleep(0.5)
        users = work / "users.txt"
        users.write_text("\n".join(str(u) for u in np.random.default_rng(1).integers(0, N_USERS, 20_000)) + "\n")
        paths = work / "paths.txt"
        paths.write_text("\n".join(f"/recall?user_id={u}" for u in users.read_text().split()) + "\n")
        run_loadgen("closed", port, paths, duration=3, conns=8)
        seq = run_loadgen("seq", port, paths, n=unloaded)
        lat = np.asarray(seq["latency_s"]) * 1000
        cpu0 = cpu_seconds(proc.pid)
        sat = wrk_saturation(port, users, duration, conns, "k=300")
        cpu_ms = (cpu_seconds(proc.pid) - cpu0) / max(sat["requests"], 1) * 1000
        out = {"rps": sat["rps"], "p50_ms": sat["p50_ms"], "p99_ms": sat["p99_ms"], "non_2xx": sat["non_2xx"],
               "unloaded_p50_ms": round(pct(lat, 50), 3), "unloaded_p99_ms": round(pct(lat, 99), 3),
               "cpu_ms_per_request": round(cpu_ms, 3), "tool": sat["tool"]}
        if rate:
            out["at_rate"] = fixed_rate(port, paths, rate, duration, rate_runs)
        return out
    finally:
        if proc is not None:
            stop(proc)
        redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench_prototype", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = measure(args.duration)
    say(f"prototype: {res['rps']:.0f} rps at saturation, unloaded p50 {res['unloaded_p50_ms']} ms, "
        f"CPU {res['cpu_ms_per_request']} ms per request")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
