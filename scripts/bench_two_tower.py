"""Two-tower ablation (and item2vec figures) on ml-100k under PROTOCOL.md v1; writes docs/benchmarks.md.

    .venv/bin/python -m scripts.bench_two_tower                      # ablation grid, val + test, writes docs
    .venv/bin/python -m scripts.bench_two_tower --splits test --grid reduced
    .venv/bin/python -m scripts.bench_two_tower --tune               # the validation search behind the defaults

Every variant changes one thing from the channel's defaults. Selection (`--tune`) uses the validation
split only; test figures are for reporting.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import typer

from common.channel_config import ChannelSpec
from trainer.channels.base import Channel
from trainer.channels.item2vec import Item2VecChannel
from trainer.channels.two_tower import TwoTowerChannel
from trainer.data.io import Dataset, load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.data.train_data import TrainData
from trainer.metrics import calibrate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"
SECTION = "## Two-tower and item2vec ablations (ml-100k)"

ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("loss = pointwise (BCE 1:k, k=num_negatives)", {"loss": "pointwise"}),
    ("loss = pairwise hinge (m=0.2)", {"loss": "hinge"}),
    ("loss = pairwise logistic", {"loss": "logistic"}),
    ("negatives = random ∝ count^0.75 (num_negatives)", {"negatives": "random"}),
    ("negatives = random, num_negatives=1024", {"negatives": "random", "num_negatives": 1024}),
    ("negatives = mixed (in-batch + num_negatives random)", {"negatives": "mixed"}),
    ("negatives = hard (½ random, ½ model ranks 10–100)", {"negatives": "hard"}),
    ("negatives = full catalog softmax", {"negatives": "full"}),
    ("no logQ correction", {"logq": False}),
    ("logQ from exact counts (not streaming)", {"logq_source": "exact"}),
    ("pairwise logistic, no logQ", {"loss": "logistic", "logq": False}),
    ("logQ weight β = 1 (plain s − log p)", {"logq_weight": 1.0}),
    ("logQ weight β = 1.5", {"logq_weight": 1.5}),
    ("SENet on", {"senet": True}),
    ("τ = 0.02", {"temperature": 0.02}),
    ("τ = 0.1", {"temperature": 0.1}),
    ("τ = 0.2", {"temperature": 0.2}),
    ("positive down-sampling (t=1e-3)", {"pos_subsample": 1e-3}),
    ("no user/item attributes", {"use_user_attrs": False, "use_item_attrs": False}),
    ("no user id (features + recent items only)", {"use_user_id": False}),
    ("no newest-item field (mean pool only)", {"recent_last": False}),
    ("no user-id dropout", {"user_id_dropout": 0.0}),
    ("recent_n = 20", {"recent_n": 20}),
]
REDUCED = {"default", "loss = pointwise (BCE 1:k, k=num_negatives)", "loss = pairwise hinge (m=0.2)",
           "loss = pairwise logistic", "negatives = random ∝ count^0.75 (num_negatives)", "negatives = hard (½ random, ½ model ranks 10–100)",
           "no logQ correction", "SENet on", "τ = 0.02", "τ = 0.2"}

I2V_SERVE = {"recent_n": 20, "recency_decay": 0.8, "per_anchor": 200}  # recommended serve settings
I2V_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("item2vec defaults, recommended serve (20 anchors, decay 0.8, 200 per anchor)", {"serve": I2V_SERVE}),
    ("item2vec defaults, default serve (20 anchors, decay 0.9, 100 per anchor)", {}),
    ("… whole history as one sentence (no session split)", {"session_gap_s": None, "serve": I2V_SERVE}),
    ("… word2vec defaults (window 5, dim 64)", {"window": 5, "dim": 64, "serve": I2V_SERVE}),
    ("… negative 10 (3× the fit time)", {"num_negatives": 10, "serve": I2V_SERVE}),
    ("… no frequent-item subsampling", {"sample": 0.0, "serve": I2V_SERVE}),
]

# the validation search behind the defaults (coordinate steps from the first entry)
TUNE_GRID: list[dict[str, Any]] = [
    {},
    {"epochs": 5}, {"epochs": 20},
    {"lr": 0.001}, {"lr": 0.01},
    {"recent_n": 10}, {"recent_n": 50},
    {"recent_last": True},
    {"emb_dim": 32, "dim": 32}, {"emb_dim": 128, "dim": 128},
    {"hidden": []}, {"hidden": [256]}, {"hidden": [256, 128]},
    {"batch_size": 512}, {"batch_size": 2048},
    {"user_id_dropout": 0.0}, {"user_id_dropout": 0.3},
    {"share_item_emb": False},
    {"logq_weight": 0.5},
    {"temperature": 0.02}, {"temperature": 0.1},
    {"dropout": 0.1},
    {"weight_decay": 1e-6},
]

I2V_TUNE_GRID: list[dict[str, Any]] = [
    {},
    {"window": 10}, {"window": 20}, {"window": 50},
    {"session_gap_s": None},
    {"sample": 0.0}, {"sample": 1e-4},
    {"num_negatives": 5}, {"num_negatives": 20},
    {"negatives_power": 0.5}, {"negatives_power": 1.0}, {"negatives_power": -0.5},
    {"epochs": 5}, {"epochs": 30},
    {"dim": 32}, {"dim": 128},
    {"lr": 0.05}, {"lr": 0.01},
]


def load(data_dir: Path) -> tuple[Dataset, dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    ds = load_dataset(data_dir)
    train, test = leave_last_out(ds.interactions)
    vtrain, vtest = validation_split(train)
    return ds, {"test": (train, test), "val": (vtrain, vtest)}


def evaluate(cls: type[Channel], kind: str, params: dict[str, Any], ds: Dataset, train: pd.DataFrame,
             test: pd.DataFrame, k: int = 200) -> dict[str, float]:
    """Fit on `train`, recommend top-k for each test user through the serving path, score per PROTOCOL.md.
    A "serve" key in `params` holds the channel's serve settings."""
    params = dict(params)
    serve = params.pop("serve", {})
    data = TrainData.from_frame(train, ds.users, ds.items)
    ch = cls(ChannelSpec(name="bench", kind=kind, model=cls.model, params=params, serve=serve), seed=42)
    t0 = time.perf_counter()
    ch.fit(data)
    ch.artifacts(data)
    fit_s = time.perf_counter() - t0
    users = data.user_map.lookup(test["user_id"]).astype(np.int64)
    targets = data.item_map.lookup(test["item_id"])  # -1: not in the catalog → a miss
    recs = ch.recommend(data, users, k)
    ranks = np.full(len(users), np.inf)
    top50: list[np.ndarray] = []
    for j, ((ids, _), t) in enumerate(zip(recs, targets, strict=True)):
        hit = np.flatnonzero(ids == t) if t >= 0 else []
        if len(hit):
            ranks[j] = hit[0] + 1
        top50.append(ids[:50])
    cov = len(np.unique(np.concatenate(top50))) / data.n_items if top50 else 0.0
    return {"hr50": float(np.mean(ranks <= 50)), "hr200": float(np.mean(ranks <= 200)),
            "ndcg50": float(np.mean(np.where(ranks <= 50, 1.0 / np.log2(ranks + 1), 0.0))),
            "cov50": float(cov), "fit_s": fit_s, "users": int(len(users))}


def _fmt(r: dict[str, float] | None, key: str, digits: int = 3) -> str:
    return "–" if r is None else f"{r[key]:.{digits}f}"


def render(rows: list[dict[str, Any]], i2v_rows: list[dict[str, Any]], note: str) -> str:
    lines = [SECTION, "",
             "Written by `scripts/bench_two_tower.py` (PROTOCOL.md v1 split, seed 42; one change from the "
             "two-tower defaults per row). *val* = validation split (the only one used to choose defaults), "
             "*test* = the protocol test split (943 users). Reference on the same test split: implicit ALS "
             "HR@50 0.318 / HR@200 0.672.", "", note, "",
             "| variant | val HR@50 | test HR@50 | test HR@200 | test NDCG@50 | test Cov@50 | fit s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r.get('val'), 'hr50')} | {_fmt(r.get('test'), 'hr50')} | "
                     f"{_fmt(r.get('test'), 'hr200')} | {_fmt(r.get('test'), 'ndcg50')} | "
                     f"{_fmt(r.get('test'), 'cov50')} | {_fmt(r.get('test') or r.get('val'), 'fit_s', 1)} |")
    if i2v_rows:
        lines += ["", "item2vec (one change per row from the defaults; i2i lists served through `retrieve_i2i`):", "",
                  "| variant | val HR@50 | test HR@50 | test HR@200 | test NDCG@50 | test Cov@50 | fit s |",
                  "|---|---|---|---|---|---|---|"]
        for r in i2v_rows:
            lines.append(f"| {r['name']} | {_fmt(r.get('val'), 'hr50')} | {_fmt(r.get('test'), 'hr50')} | "
                         f"{_fmt(r.get('test'), 'hr200')} | {_fmt(r.get('test'), 'ndcg50')} | "
                         f"{_fmt(r.get('test'), 'cov50')} | {_fmt(r.get('test') or r.get('val'), 'fit_s', 1)} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this script's section in docs/benchmarks.md (or append it); other sections are untouched."""
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(data_dir: Path = typer.Option(DEFAULT_DATA, help="dataset directory (ml-100k layout)"),
         splits: str = typer.Option("val,test", help="comma list of val,test"),
         grid: str = typer.Option("full", help="full | reduced | defaults (only the default rows)"),
         item2vec: bool = typer.Option(True, help="also run the item2vec variants"),
         tune: bool = typer.Option(False, help="run the validation search instead of the ablation"),
         tune_model: str = typer.Option("two_tower", help="which model --tune searches: two_tower | item2vec"),
         base: str = typer.Option("{}", help="--tune: JSON params every grid entry starts from"),
         grid_json: str = typer.Option("", help="--tune: JSON list of steps replacing the built-in grid"),
         out: Path = typer.Option(ROOT / "var" / "bench_two_tower.jsonl", help="raw results (JSON lines)"),
         docs: Path = typer.Option(ROOT / "docs" / "benchmarks.md", help="file whose section is rewritten"),
         write_docs: bool = typer.Option(True),
         reuse: Path = typer.Option(None, help="JSON lines of an earlier run: rows with the same name and params "
                                   "are taken from it (only valid if the model code did not change)")) -> None:
    if not data_dir.exists():
        raise typer.BadParameter(f"{data_dir}: dataset not found")
    ds, sp = load(data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    which = [s.strip() for s in splits.split(",") if s.strip()]

    def log(rec: dict[str, Any]) -> None:
        print(json.dumps(rec), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    if tune:
        best = None
        cls, kind, grid_ = ((Item2VecChannel, "i2i", I2V_TUNE_GRID) if tune_model == "item2vec"
                            else (TwoTowerChannel, "u2i", TUNE_GRID))
        for step in (json.loads(grid_json) if grid_json else grid_):
            params = {**json.loads(base), **step}
            r = evaluate(cls, kind, params, ds, *sp["val"])
            log({"tune": params, "model": tune_model, "val": r})
            key = (r["hr50"], r["ndcg50"])
            if best is None or key > best[0]:
                best = (key, params)
        print("best on validation:", best)
        return
    previous: dict[str, dict[str, Any]] = {}
    if reuse is not None and reuse.exists():
        for line in reuse.read_text().splitlines():
            rec = json.loads(line)
            if "name" in rec:
                previous[json.dumps([rec["name"], rec["params"]], sort_keys=True)] = rec
    reused: list[str] = []
    t_start = time.time()
    calib0, load0 = calibrate(), os.getloadavg()[0]
    variants = [v for v in ABLATION if grid == "full" or (grid == "reduced" and v[0] in REDUCED) or v[0] == "default"]
    rows = []
    def run_row(cls: type[Channel], kind: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
        old = previous.get(json.dumps([name, params], sort_keys=True), {})
        reused.extend(s for s in which if s in old)
        row: dict[str, Any] = {"name": name, "params": params}
        for s in which:
            row[s] = old[s] if s in old else evaluate(cls, kind, params, ds, *sp[s])
        log(row)
        return row

    for name, params in variants:
        rows.append(run_row(TwoTowerChannel, "u2i", name, params))
    i2v_rows = []
    if item2vec:
        for name, params in (I2V_VARIANTS if grid != "defaults" else I2V_VARIANTS[:1]):
            i2v_rows.append(run_row(Item2VecChannel, "i2i", name, params))
    calib1, load1 = calibrate(), os.getloadavg()[0]
    note = (f"Grid: {grid} ({len(variants)} two-tower variants), splits: {', '.join(which)}; run "
            f"{time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} vCPUs shared with other jobs, "
            f"{(time.time() - t_start) / 60:.0f} min in all"
            f"{f' ({len(reused)} row-splits reused from an earlier run of the same code)' if reused else ''}. calib_s {calib0:.2f} → {calib1:.2f}, 1-min load "
            f"{load0:.1f} → {load1:.1f}; fit s = fit + artifact build (user vectors, user-tower export), "
            f"single-thread torch, and noisy (PROTOCOL §6).")
    if write_docs:
        write_section(docs, render(rows, i2v_rows, note))
        print(f"wrote section to {docs}")


if __name__ == "__main__":
    typer.run(main)
