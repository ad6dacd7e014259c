"""EGES item cold start on a synthetic log, and fit seconds: hold out a share of the items entirely from
training (their interactions removed, their attributes kept and registered in the item id map), fit EGES, and
measure how often each held-out item appears in the neighbour lists of the items of its own category, against
chance (a random list of `top_k` of the other valid items).

    .venv/bin/python -m scripts.bench_eges_cold --data var/data/synth-1m [--params '{"epochs": 2}']
    .venv/bin/python -m scripts.bench_eges_cold --data var/data/synth-1m --holdout 0 --fit-only   # fit seconds
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import typer

from common.channel_config import ChannelSpec
from common.ids import IdMap, sort_ids
from trainer.channels.eges import EGESChannel
from trainer.data.io import load_dataset
from trainer.data.train_data import TrainData

ROOT = Path(__file__).resolve().parents[1]


def main(data: Path = typer.Option(ROOT / "var" / "data" / "synth-1m"),
         params: str = typer.Option("{}", help="JSON params updating the channel defaults"),
         holdout: float = typer.Option(0.05, help="share of items held out of training"),
         fit_only: bool = typer.Option(False, help="only time the fit"),
         seed: int = 42) -> None:
    import torch.optim  # noqa: F401 - the first Adam imports torch._dynamo (seconds): not part of the fit

    ds = load_dataset(data)
    ids = np.asarray(sort_ids(ds.items.index), dtype=object)
    held = set(np.random.default_rng(seed).choice(ids, size=int(round(holdout * len(ids))), replace=False).tolist())
    inter = ds.interactions[~ds.interactions["item_id"].astype(str).isin(held)]
    # registration: every item of the items table is in the item id map, with or without interactions
    td = TrainData.from_frame(inter, ds.users, ds.items, item_map=IdMap(ids))
    td.csr, td.user_ptr, td.item_counts  # noqa: B018 - built before timing, as the evaluator does
    p = json.loads(params)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    cpu = time.process_time()
    ch = EGESChannel(ChannelSpec(name="eges", kind="i2i", model="eges", params=p), seed=seed)
    ch.fit(td)
    art = ch.artifacts(td)["i2i"]
    out = {"data": str(data), "params": p, "n_interactions": int(len(td.item_idx)), "n_items": td.n_items,
           "fit_s": round(time.perf_counter() - t, 1), "fit_cpu_s": round(time.process_time() - cpu, 1),
           "load_avg_1m": [round(load0, 1), round(os.getloadavg()[0], 1)], "metrics": ch.metrics}
    if fit_only or not held:
        print(json.dumps(out, default=str))
        return
    cold = td.item_map.lookup(sorted(held))
    cat = td.item_field("category")
    valid = ch.valid_items
    top_k = art.neighbors.shape[1]
    chance = top_k / (valid.sum() - 1)
    warm = ch.warm_items
    share, present, precision = [], [], []
    for h in cold:
        own = np.flatnonzero(warm & (cat == cat[h]))
        share.append((art.neighbors[own] == h).any(1).mean() if len(own) else 0.0)
        present.append(bool((art.neighbors[own] == h).any()))
        nb = art.neighbors[h][art.neighbors[h] >= 0]
        precision.append((cat[nb] == cat[h]).mean() if len(nb) else 0.0)
    cat_share = np.bincount(cat[valid & (cat >= 0)]) / (valid & (cat >= 0)).sum()
    share = np.asarray(share)
    out.update({"n_held_out": len(cold), "n_cold_with_vector": int(ch.cold_items[cold].sum()),
                "top_k": top_k, "chance_share": round(float(chance), 5),
                "mean_share_in_own_category_lists": round(float(share.mean()), 4),
                "median_share": round(float(np.median(share)), 4),
                "lift_vs_chance": round(float(share.mean() / chance), 1),
                "held_out_in_some_own_category_list": round(float(np.mean(present)), 4),
                "own_list_category_precision": round(float(np.mean(precision)), 4),
                "own_list_category_precision_chance": round(float(np.mean(cat_share[cat[cold]])), 4)})
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    typer.run(main)
