"""Tune and score the classic channels (ItemCF, UserCF, Popular) under shared PROTOCOL.md.

    .venv/bin/python -m scripts.tune_classic --data ../shared/data/ml-100k [--grid]

Without --grid: fits each channel with its defaults (and the serve settings below) on the test split
and prints HR@50/HR@200/NDCG@50/Coverage@50/fit_s. With --grid: selects ItemCF/UserCF params and serve
settings on the validation split only (highest HR@50, then NDCG@50, then grid order), re-fits on the
full training data and scores once on test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import dataclass

import numpy as np

from common.channel_config import ChannelSpec, ServeParams
from trainer.channels.registry import build
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.data.train_data import TrainData

# Serve settings used without --grid: the ones selected on the ml-100k validation split.
SERVE = {
    "itemcf": {"recent_n": 10, "recency_decay": 0.6, "per_anchor": 200},
    "usercf": {"per_anchor": 50, "neighbor_items": 20},
    "popular": {"lists": ["global"]},
}
# Where the grid search starts (the pre-tuning defaults), so a re-run repeats the recorded search.
START = {
    "itemcf": ({"window": None, "position_decay": 1.0, "backward_weight": 1.0, "category_weight": 1.0},
               {"recent_n": 20, "recency_decay": 0.9, "per_anchor": 100}),
    "usercf": ({"top_k": 50, "normalization": "power", "beta": 0.5, "max_history": 200},
               {"per_anchor": 50, "neighbor_items": 30}),
}
# Staged grid: each stage searches its axes around the best configuration of the previous stages.
STAGES = {
    "itemcf": [
        {"params": {"alpha": [0.5, 0.6, 0.7], "max_history": [50, 100, 200], "position_decay": [1.0, 0.95, 0.9, 0.8],
                    "window": [None, 30]}},
        {"params": {"time_decay_s": [None, 3600, 86400], "backward_weight": [1.0, 0.85, 0.7],
                    "category_weight": [1.0, 1.2]}},
        {"serve": {"recent_n": [10, 20, 50], "recency_decay": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                   "per_anchor": [50, 100, 200]}},
        # params again under the chosen serve settings (coordinate ascent), then the serve settings again
        {"params": {"alpha": [0.5, 0.6, 0.7], "max_history": [50, 100, 200], "position_decay": [1.0, 0.95, 0.9, 0.8],
                    "window": [None, 30]}},
        {"serve": {"recency_decay": [0.9, 0.8, 0.7, 0.6, 0.5], "per_anchor": [50, 100, 200]}},
    ],
    "usercf": [
        {"params": {"normalization": ["power", "cosine"], "beta": [0.3, 0.5, 0.7, 0.9], "max_history": [20, 50, 200],
                    "top_k": [200]}},
        {"params": {"max_history": [10, 20, 30, 50, 100]}},
        {"serve": {"per_anchor": [20, 50, 100, 200], "neighbor_items": [5, 10, 20, 30, 50, 100]}},
    ],
}
# All extra weights off, every neighbour kept: PROTOCOL.md's reference ItemCF.
REFERENCE_ITEMCF = {"alpha": 0.5, "max_history": None, "window": None, "position_decay": 1.0, "time_decay_s": None,
                    "forward_weight": 1.0, "backward_weight": 1.0, "category_weight": 1.0, "top_k": 2000}
KIND = {"itemcf": "i2i", "usercf": "u2u", "popular": "list"}


@dataclass
class Split:
    data: TrainData
    users: np.ndarray
    targets: np.ndarray


def make_split(train, test, ds) -> Split:
    data = TrainData.from_frame(train, ds.users, ds.items)
    users = data.user_map.lookup(test["user_id"])
    targets = data.item_map.lookup(test["item_id"])  # -1: not in the catalog, always a miss
    return Split(data, users, targets)


def score(split: Split, recs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    ranks = np.full(len(split.users), np.inf)
    top50: set[int] = set()
    for n, ((ids, _), t) in enumerate(zip(recs, split.targets, strict=True)):
        hit = np.flatnonzero(ids == t)
        if t >= 0 and len(hit):
            ranks[n] = hit[0] + 1
        top50.update(ids[:50].tolist())
    return {"HR@50": float(np.mean(ranks <= 50)), "HR@200": float(np.mean(ranks <= 200)),
            "NDCG@50": float(np.mean(np.where(ranks <= 50, 1 / np.log2(ranks + 1), 0.0))),
            "Cov@50": len(top50) / split.data.n_items}


def run(split: Split, model: str, params: dict, serve: dict, repeats: int = 1) -> tuple[dict[str, float], float]:
    """Fit (median fit seconds of `repeats` fresh fits) and score one configuration."""
    spec = ChannelSpec(name=model, kind=KIND[model], model=model, params=params, serve=ServeParams(**serve))
    times = []
    for _ in range(repeats):
        ch = build(spec)
        t0 = time.perf_counter()
        ch.fit(split.data)
        times.append(time.perf_counter() - t0)
    return score(split, ch.recommend(split.data, split.users, k=200)), float(np.median(times))


def select(val: Split, model: str, grid: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Best (params, serve) on validation: HR@50, then NDCG@50, then the earlier configuration."""
    best, best_key = grid[0], (-1.0, -1.0)
    for params, serve in grid:
        m, _ = run(val, model, params, serve)
        key = (round(m["HR@50"], 6), round(m["NDCG@50"], 6))
        print(f"  val {model} {params} {serve}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()), flush=True)
        if key > best_key:
            best, best_key = (params, serve), key
    return best


def product(**axes) -> list[dict]:
    if not axes:
        return [{}]
    keys = list(axes)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*axes.values())]


def calib_s() -> float:
    """PROTOCOL §5 calibration workload (5 dense 1000×1000 matmuls + argsort of 2·10⁶ floats), median of 3."""
    rng = np.random.default_rng(42)
    a, v, times = rng.random((1000, 1000)), rng.random(2_000_000), []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        np.argsort(v)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--models", default="popular,itemcf,usercf")
    ap.add_argument("--repeats", type=int, default=3, help="fresh fits timed for the test figures (median)")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    train, test = leave_last_out(ds.interactions)
    test_split = make_split(train, test, ds)
    print(f"evaluated users {len(test_split.users)}, catalog {test_split.data.n_items}")
    chosen = {m: ({}, SERVE[m]) for m in args.models.split(",")}
    if args.grid:
        vtrain, vtest = validation_split(train)
        val = make_split(vtrain, vtest, ds)
        for model in chosen:
            params, serve = START.get(model, chosen[model])
            for stage in STAGES.get(model, []):
                grid = [({**params, **sp}, {**serve, **ss}) for sp in product(**stage.get("params", {}))
                        for ss in product(**stage.get("serve", {}))]
                params, serve = select(val, model, grid)
                print(f"  stage best {model}: {params} {serve}", flush=True)
            chosen[model] = (params, serve)
    print(f"calib_s {calib_s():.3f} load average {os.getloadavg()}")
    rows = [(model, model, params, serve) for model, (params, serve) in chosen.items()]
    if "itemcf" in chosen:  # PROTOCOL's reference ItemCF, timed in the same run for a fit-time ratio
        rows.append(("itemcf_reference", "itemcf", REFERENCE_ITEMCF, {"recent_n": 20, "recency_decay": 1.0,
                                                                    "per_anchor": 2000}))
    for label, model, params, serve in rows:
        m, fit_s = run(test_split, model, params, serve, repeats=args.repeats)
        print(f"TEST {label} params={params} serve={serve}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items())
              + f" fit_s={fit_s:.3f}", flush=True)
    print(f"calib_s {calib_s():.3f} load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
