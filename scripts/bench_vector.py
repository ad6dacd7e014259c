"""Vector server benchmark: HNSW recall@200 against exact search, and /search latency over a 100k catalogue.

    .venv/bin/python -m scripts.bench_vector [--data DIR] [--n-items 100000] [--requests 2000] [--json OUT]

1. recall@200 of the served index (the channel-config defaults: HNSW M=32, efConstruction=200, efSearch = max(64,
   2·k)) vs exact inner-product search
   on real embeddings: every u2i channel published in the Redis at REDIS_URL, else MF (ALS) trained on
   ml-100k through the channel registry; and on a synthetic clustered catalogue (100k × 64).
2. latency of POST /search (k=200) by user_id — tower and precomputed vector — and by explicit vector, against a
   real server process and a private Redis, one request at a time (unloaded), measured at the client.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from common.channel_config import IndexParams, load_config  # noqa: E402
from common.ids import IdMap, publish_id_map  # noqa: E402
from common.keyspace import FEATURES_CHANNEL, Keyspace, pack_json  # noqa: E402
from common.local_redis import LocalRedis, free_port  # noqa: E402
from common.publish import read_manifest  # noqa: E402
from common.redis_conn import RedisStores  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.towers import export_tower, input_meta  # noqa: E402
from common.towers.two_tower_user import UserTower  # noqa: E402
from services.vector_server.index import build_index, read_item_vectors, search_ef  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 200


# -- recall -----------------------------------------------------------------------------------------------

def recall_vs_exact(name: str, items: np.ndarray, queries: np.ndarray, k: int = K,
                    params: IndexParams | None = None) -> dict:
    """recall@k of the served index vs exact IndexFlatIP, plus build time and single-query latency."""
    items = np.ascontiguousarray(items, np.float32)
    queries = np.ascontiguousarray(queries, np.float32)
    params = params or IndexParams()
    kk = min(k, len(items))
    t0 = time.perf_counter()
    index, _keep, desc = build_index(items, params)
    build_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(items)
    _, want = exact.search(queries, kk)
    ef = search_ef(params.ef_search, params.ef_factor, kk)
    sp = faiss.SearchParametersHNSW(efSearch=ef) if params.type == "hnsw" else None
    _, got = index.search(queries, kk, params=sp)
    rec = np.mean([len(np.intersect1d(g[g >= 0], w)) / kk for g, w in zip(got, want, strict=True)])
    sweep = {}
    if params.type == "hnsw":  # what a larger ef_search would buy on this data
        for ef2 in (256, 2 * ef):
            _, g2 = index.search(queries, kk, params=faiss.SearchParametersHNSW(efSearch=ef2))
            sweep[f"recall@{k} ef={ef2}"] = round(float(np.mean(
                [len(np.intersect1d(g[g >= 0], w)) / kk for g, w in zip(g2, want, strict=True)])), 4)
    lat = []
    for q in queries[:300]:
        t = time.perf_counter()
        index.search(q[None], kk, params=sp)
        lat.append(time.perf_counter() - t)
    return {"dataset": name, "n_items": len(items), "dim": items.shape[1], "queries": len(queries), "k": kk,
            "index": desc, "ef": ef if params.type == "hnsw" else None, f"recall@{k}": round(float(rec), 4), "build_s": round(build_s, 2),
            "query_p50_ms": round(float(np.median(lat)) * 1e3, 3), **sweep}


def published_embeddings(settings: Settings, max_users: int = 2000) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(channel, item vectors, user vectors) of every u2i channel published in the Redis at REDIS_URL."""
    if not settings.redis_url:
        return []
    stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings), socket_timeout=30)
    out = []
    try:
        cfg = load_config(settings.channels_config)
        for spec in cfg.channels:
            if spec.kind != "u2i" or not spec.trained:
                continue
            man = read_manifest(stores, spec.name)
            if not man or "dim" not in man:
                continue
            items, _ = read_item_vectors(stores, spec.name, man["version"], int(man["n_items"]), int(man["dim"]))
            users = IdMap.from_bytes(stores("meta").get(stores.keyspace.id_map("user"))).ids[:max_users]
            vals = stores("user_emb").mget([stores.keyspace.user_vector(spec.name, man["version"], u) for u in users])
            uv = np.array([np.frombuffer(v, "<f4") for v in vals if v is not None and len(v) == 4 * man["dim"]])
            if len(uv):
                out.append((f"{spec.name} (published {man['version']})", items, uv))
    except Exception as exc:  # no Redis / nothing published: fall back to training
        print(f"  (published embeddings unavailable: {type(exc).__name__}: {exc})")
    finally:
        stores.close()
    return out


def mf_on_dataset(data_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Train the MF channel (registry) on a dataset directory; its item/user vectors."""
    if not data_dir.is_dir():
        print(f"  ({data_dir} not found: skipping real-embedding recall)")
        return []
    from common.channel_config import parse_config
    from trainer.channels.registry import build, models
    from trainer.data.io import load_dataset
    from trainer.data.train_data import TrainData

    if "mf" not in models():
        print("  (no 'mf' model in trainer/channels: skipping real-embedding recall)")
        return []
    ds = load_dataset(data_dir)
    data = TrainData.from_frame(ds.interactions, ds.users, ds.items)
    spec = parse_config({"channels": {"mf": {"kind": "u2i", "model": "mf"}}}).get("mf")
    ch = build(spec)
    t0 = time.perf_counter()
    ch.fit(data)
    art = ch.artifacts(data)["u2i"]
    print(f"  trained mf on {data_dir.name} in {time.perf_counter() - t0:.1f}s")
    return [(f"mf (ALS) on {data_dir.name}", art.item_vectors, art.user_vectors)]


def synthetic_catalogue(n: int, d: int = 64, n_clusters: int = 1000, n_queries: int = 1000, noise: float = 0.5,
                        seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit item vectors (unit centre + noise of norm ≈ `noise`) and queries drawn the same way."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = centers[rng.integers(0, n_clusters, m)] + noise / np.sqrt(d) * rng.standard_normal((m, d)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(n_queries)


# -- latency ------------------------------------------------------------------------------------------------

def bench_tower(items: np.ndarray, n_users: int, n_attr_codes: int = 8, hidden: int = 128,
                seed: int = 42) -> UserTower:
    """The two-tower channel's user tower (arch "two_tower_user", served by its numpy twin like the real channel's)
    with the catalogue's vectors as item embeddings and random other weights."""
    torch.manual_seed(seed)
    n, d = items.shape
    tower = UserTower(n_users, n, [n_attr_codes], emb_dim=d, out_dim=d, hidden=[hidden], dropout=0.0, senet=False,
                      use_user_id=True, recent_last=True)
    with torch.no_grad():
        tower.item_emb.weight[:n] = torch.from_numpy(items)
        tower.item_emb.weight[n].zero_()
    return tower.eval()


def publish_bench(stores: RedisStores, items: np.ndarray, n_users: int, recent_n: int, artifacts_dir: Path,
                  config_path: Path) -> dict[str, str]:
    """Publish a tower channel and a precomputed-only channel over `items`, plus id maps and user features."""
    from trainer.channels.base import VectorArtifact
    from trainer.data.train_data import TrainData
    from trainer.publishing import publish_channel

    rng = np.random.default_rng(1)
    n, d = items.shape
    item_ids, user_ids = [str(i) for i in range(n)], [f"u{j}" for j in range(n_users)]
    recent = rng.integers(0, n, (n_users, recent_n))
    users = items[recent].mean(1).astype(np.float32)
    blob, meta = export_tower(bench_tower(items, n_users), input_meta(
        n_users, n, recent_n, ["segment"], {"segment": {str(s): s + 1 for s in range(7)}}))
    empty = np.empty(0, np.int32)
    data = TrainData(IdMap(user_ids), IdMap(item_ids), empty, empty, np.empty(0, np.int64))
    cfg = load_config(config_path)
    versions = {
        "bench_tower": publish_channel(stores, cfg.get("bench_tower"), {"u2i": VectorArtifact(
            items, users, user_tower=blob, user_tower_meta=meta)}, data, artifacts_dir, progress=False),
        "bench_pre": publish_channel(stores, cfg.get("bench_pre"), {"u2i": VectorArtifact(items, users)}, data,
                                     artifacts_dir, progress=False),
    }
    publish_id_map(stores, "item", data.item_map)
    publish_id_map(stores, "user", data.user_map)
    ks, pipe = stores.keyspace, stores("user_features").pipeline(transaction=False)
    for j, u in enumerate(user_ids):
        pipe.set(ks.user_features("bench", u), pack_json({
            "user_id": u, "recent": [[item_ids[i], 1_700_000_000 - t] for t, i in enumerate(recent[j])],
            "attrs": {"segment": str(j % 7)}}))
    pipe.execute()
    stores("meta").set(ks.current(FEATURES_CHANNEL), "bench")
    return versions


class RawHTTP:
    """Minimal blocking HTTP/1.1 keep-alive client, so the client's own CPU (httpx: ≈1 ms a call) does not
    compete with the server for the same cores and end up in the figures."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {len(body)}\r\n\r\n".encode()
        self.sock.sendall(head + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head_b, rest = buf.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"(?i)content-length:\s*(\d+)", head_b).group(1))
        while len(rest) < n:
            rest += self.sock.recv(65536)
        return int(head_b[9:12]), rest[:n]

    def close(self) -> None:
        self.sock.close()


def percentiles(lat: list[float]) -> dict:
    a = np.asarray(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "n": len(a)}


def timed_searches(c: RawHTTP, pid: int, name: str, bodies: list[bytes], warm: int = 100) -> dict:
    """POST /search each body one at a time (after `warm` warm-up requests): latency percentiles at the client, the
    server's CPU ms per request and the answers' `source`; raises on any non-200 answer."""
    for b in bodies[:warm]:
        c.request("POST", "/search", b)
    lat, answers = [], []
    cpu0 = _cpu_s(pid)
    for b in bodies:
        t = time.perf_counter()
        answers.append(c.request("POST", "/search", b))
        lat.append(time.perf_counter() - t)
    cpu_ms = (_cpu_s(pid) - cpu0) / len(bodies) * 1e3
    bad = [a for a in answers if a[0] != 200]
    if bad:
        raise RuntimeError(f"{name}: {bad[0][0]} {bad[0][1][:300]!r}")
    return {**percentiles(lat), "server_cpu_ms": round(cpu_ms, 3),
            "source": sorted({orjson.loads(a[1]).get("source", "?") for a in answers})}


def latency_bench(n_items: int, n_users: int, requests: int, tmp: Path) -> dict:
    """Start Redis + the vector server, publish a synthetic catalogue, time POST /search one request at a time."""
    tmp.mkdir(parents=True, exist_ok=True)
    items, _ = synthetic_catalogue(n_items)
    cfg_path = tmp / "channels.yaml"
    cfg_path.write_text(yaml.safe_dump({"channels": {"bench_tower": {"kind": "u2i", "model": "two_tower"},
                                                     "bench_pre": {"kind": "u2i", "model": "mf"}}}))
    out: dict = {"n_items": n_items, "dim": items.shape[1], "n_users": n_users, "k": K}
    with LocalRedis() as rds:
        stores = RedisStores(rds.url, Keyspace(), socket_timeout=30)
        t0 = time.perf_counter()
        versions = publish_bench(stores, items, n_users, 20, tmp / "artifacts", cfg_path)
        out["publish_s"] = round(time.perf_counter() - t0, 1)
        port = free_port()
        env = {**os.environ, "REDIS_URL": rds.url, "CHANNELS_CONFIG": str(cfg_path),
               "ARTIFACTS_DIR": str(tmp / "artifacts"), "OMP_NUM_THREADS": "1", "LOG_LEVEL": "warning"}
        log = (tmp / "server.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "services.vector_server", "serve", "--port", str(port)],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
                try:
                    h = httpx.get(url + "/healthz", timeout=2).json()
                    if all(h["channels"].get(c, {}).get("version") == v for c, v in versions.items()):
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError("channels not loaded within 300 s")
                time.sleep(0.2)
            out["ready_s"] = round(time.perf_counter() - t0, 1)
            out["load_s"] = {c: h["channels"][c]["load_s"] for c in versions}
            rng = np.random.default_rng(7)
            qv = synthetic_catalogue(n_items, n_queries=requests, seed=7)[1]
            cases = {
                "user_id, tower": lambda i: {"channel": "bench_tower", "k": K, "user_id": f"u{rng.integers(n_users)}"},
                "user_id, precomputed": lambda i: {"channel": "bench_pre", "k": K,
                                                   "user_id": f"u{rng.integers(n_users)}"},
                "explicit vector": lambda i: {"channel": "bench_pre", "k": K, "vector": qv[i].tolist()},
            }
            c = RawHTTP("127.0.0.1", port)
            try:
                floor = []
                cpu0 = _cpu_s(proc.pid)
                for _ in range(requests):
                    t = time.perf_counter()
                    c.request("GET", "/no-such-path")
                    floor.append(time.perf_counter() - t)
                out["http_floor (404 route)"] = {**percentiles(floor),
                                                 "server_cpu_ms": round((_cpu_s(proc.pid) - cpu0) / requests * 1e3, 3)}
                for name, make in cases.items():
                    out[name] = timed_searches(c, proc.pid, name, [orjson.dumps(make(i)) for i in range(requests)],
                                               warm=200)
            finally:
                c.close()
            out["server_rss_mb"] = round(_rss_mb(proc.pid), 0)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            stores.close()
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (robust to other load on the machine, unlike wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k",
                    help="dataset to train MF on when no u2i channel is published at REDIS_URL")
    ap.add_argument("--n-items", type=int, default=100_000)
    ap.add_argument("--n-users", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-recall", action="store_true")
    ap.add_argument("--json", type=Path, default=ROOT / "var" / "bench" / "vector_server.json")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    result: dict = {"load_avg_start": os.getloadavg()[0], "faiss": faiss.__version__, "torch": torch.__version__}

    if not args.skip_recall:
        print("recall@200, served index vs exact search")
        sets = published_embeddings(Settings()) or mf_on_dataset(args.data)
        items, queries = synthetic_catalogue(args.n_items)
        sets.append((f"synthetic clustered {args.n_items // 1000}k × 64", items, queries))
        rows = []
        for name, it, q in sets:
            for params in (IndexParams(), IndexParams(type="ivf")):
                rows.append(recall_vs_exact(name, it, q, K, params))
                print("  " + json.dumps(rows[-1]))
        result["recall"] = rows
    if not args.skip_latency:
        print(f"POST /search latency, k={K}, {args.n_items} items, one request at a time")
        result["latency"] = latency_bench(args.n_items, args.n_users, args.requests, ROOT / "var" / "bench" / "vector")
        print("  " + json.dumps(result["latency"], indent=1))
    result["load_avg_end"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
