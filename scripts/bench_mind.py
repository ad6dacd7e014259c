"""MIND on ml-100k under PROTOCOL.md v1: validation search (defaults), ablation (dynamic vs fixed K, …), fit times.

    .venv/bin/python -m scripts.bench_mind --splits val --grid '[{}, {"attention_power": 5}]'   # validation steps
    .venv/bin/python -m scripts.bench_mind --splits val,test --ablation                          # the ablation rows
    .venv/bin/python -m scripts.bench_mind --fit-only --data-dir var/data/synth-1m --params '{"epochs": 1}'

Selection uses the validation split only; test figures are for reporting. Rows go to stdout and `--out` (JSON lines).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from common.channel_config import ChannelSpec
from scripts.bench_two_tower import evaluate, load
from trainer.channels.mind import MindChannel
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out
from trainer.data.train_data import TrainData
from trainer.metrics import calibrate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"

ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("default (dynamic K, K=4)", {}),
    ("fixed K = 4 (no dynamic interest count)", {"dynamic_k": False}),
    ("K = 1 (single interest)", {"n_interests": 1}),
    ("attention power p = 0 (uniform over interests)", {"attention_power": 0.0}),
    ("routing init: fresh N(0,1) draws in training", {"routing_init": "random"}),
]


def fit_seconds(data_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Fit MIND on the protocol training split of `data_dir`; seconds of fit (+ artifact build) alone."""
    ds = load_dataset(data_dir)
    train, _ = leave_last_out(ds.interactions)
    data = TrainData.from_frame(train, ds.users, ds.items)
    data.csr, data.user_ptr, data.item_counts  # noqa: B018 - as trainer/evaluate.py: fit_s starts from the CSR
    ch = MindChannel(ChannelSpec(name="mind", kind="u2i", model="mind", params=params), seed=42)
    t0 = time.perf_counter()
    ch.fit(data)
    fit_s = time.perf_counter() - t0
    ch.artifacts(data)
    return {"fit_s": fit_s, "fit_and_build_s": time.perf_counter() - t0, "interactions": int(len(data.item_idx)),
            "users": data.n_users, "items": data.n_items, "losses": ch.losses,
            "mean_interests": float(np.mean(ch.interest_counts))}


def main(data_dir: Path = typer.Option(DEFAULT_DATA, help="dataset directory"),
         splits: str = typer.Option("val", help="comma list of val,test"),
         grid: str = typer.Option("[{}]", help="JSON list of param sets, each merged over --params"),
         params: str = typer.Option("{}", help="JSON base params"),
         ablation: bool = typer.Option(False, help="run the ablation rows instead of --grid"),
         fit_only: bool = typer.Option(False, help="only time one fit on the protocol training split"),
         out: Path = typer.Option(ROOT / "var" / "bench_mind.jsonl", help="raw results (JSON lines)")) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(rec: dict[str, Any]) -> None:
        print(json.dumps(rec), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    base = json.loads(params)
    if fit_only:
        c0, l0 = calibrate(), os.getloadavg()[0]
        r = fit_seconds(data_dir, base)
        log({"fit_only": str(data_dir), "params": base, **r, "calib_s": [c0, calibrate()],
             "load": [l0, os.getloadavg()[0]]})
        return
    ds, sp = load(data_dir)
    rows = ABLATION if ablation else [(json.dumps(g), g) for g in json.loads(grid)]
    for name, step in rows:
        p = {**base, **step}
        rec: dict[str, Any] = {"name": name, "params": p}
        for s in [x.strip() for x in splits.split(",") if x.strip()]:
            rec[s] = evaluate(MindChannel, "u2i", p, ds, *sp[s])
        log(rec)


if __name__ == "__main__":
    typer.run(main)
