"""MIC figures on a dataset under PROTOCOL.md v1: each row fits MIC once and scores its three channels (u2i, u2u
lists, i2i lists), optionally over a small grid of serve settings for the lists; baselines are fitted the same way.

    .venv/bin/python -m scripts.bench_mic --split val --grid tune          # the validation search
    .venv/bin/python -m scripts.bench_mic --split test --grid ablation     # the reported rows + ablation

Scoring goes through the evaluator's own functions (trainer.evaluate: fit_channel, recommend_all, clean_lists;
trainer.metrics.summarize), so the figures equal `python -m trainer evaluate` for the same params and serve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from common.channel_config import ChannelSpec, ServeParams
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.evaluate import K, clean_lists, fit_channel, make_split, recommend_all
from trainer.metrics import calibrate, lists_to_matrix, summarize

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"

# serve settings of the published lists: the config's (item2vec / usercf entries) and a few more for the search
I2I_SERVES = {"i2v": {"recent_n": 5, "recency_decay": 0.9, "per_anchor": 100},
              "r10d06": {"recent_n": 10, "recency_decay": 0.6, "per_anchor": 200},
              "r20d08": {"recent_n": 20, "recency_decay": 0.8, "per_anchor": 200}}
U2U_SERVES = {"ucf": {"per_anchor": 20, "neighbor_items": 20},
              "p50n20": {"per_anchor": 50, "neighbor_items": 20},
              "p100n50": {"per_anchor": 100, "neighbor_items": 50}}

Row = tuple[str, str, dict[str, Any]]  # (label, model, params)
OFF = {"knn_positives": 0, "hard_negatives": 0}
GRIDS: dict[str, list[Row]] = {
    "baselines": [("two_tower", "two_tower", {}), ("usercf", "usercf", {}), ("item2vec", "item2vec", {})],
    "tune": [
        ("mic defaults", "mic", {}),
        ("mic no contrastive (= two_tower backbone)", "mic", {"u2u_weight": 0, "i2i_weight": 0, **OFF}),
        ("mic weights 0.3", "mic", {"u2u_weight": 0.3, "i2i_weight": 0.3}),
        ("mic weights 0.03", "mic", {"u2u_weight": 0.03, "i2i_weight": 0.03}),
        ("mic cl τ 0.2", "mic", {"cl_temperature": 0.2}),
        ("mic cl τ 0.05", "mic", {"cl_temperature": 0.05}),
        ("mic i2i only", "mic", {"u2u_weight": 0}),
        ("mic u2u only", "mic", {"i2i_weight": 0}),
        ("mic no mining (SimCLR views only)", "mic", OFF),
    ],
    "ablation": [
        ("mic defaults", "mic", {}),
        ("mic without kNN positives", "mic", {"knn_positives": 0}),
        ("mic without hard negatives", "mic", {"hard_negatives": 0}),
        ("mic without perturbation", "mic", {"perturb": False}),
        ("mic without contrastive losses (backbone only)", "mic", {"u2u_weight": 0, "i2i_weight": 0, **OFF}),
    ],
}


def kinds_of(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, serve label, serve) rows to score for one fitted model."""
    if model == "mic":
        return ([("u2i", "", {})] + [("u2u", k, v) for k, v in U2U_SERVES.items()]
                + [("i2i", k, v) for k, v in I2I_SERVES.items()])
    if model == "usercf":
        return [("u2u", k, v) for k, v in U2U_SERVES.items()]
    if model == "item2vec":
        return [("i2i", k, v) for k, v in I2I_SERVES.items()]
    return [("u2i", "", {})]


def main(data: Path = typer.Option(DEFAULT_DATA), split: str = typer.Option("val", help="val | test"),
         grid: str = typer.Option("tune", help=f"one of {sorted(GRIDS)}"),
         rows: str = typer.Option("", help="comma-separated row indices of the grid (default all)"),
         extra: str = typer.Option("", help="JSON params merged into every mic row"),
         out: Path = typer.Option(Path("/tmp/bench_mic.jsonl"))) -> None:
    dataset = load_dataset(data)
    train, test = leave_last_out(dataset.interactions)
    if split == "val":
        train, test = validation_split(train)
    sp = make_split(train, test, dataset)
    print(f"{dataset.name} {split}: {sp.n_eval} users, catalog {sp.catalog_size}; load {os.getloadavg()[0]:.1f}, "
          f"calib_s {calibrate():.3f}", flush=True)
    chosen = GRIDS[grid] if not rows else [GRIDS[grid][int(i)] for i in rows.split(",")]
    more = json.loads(extra) if extra else {}
    for label, model, params in chosen:
        params = {**params, **more} if model == "mic" else params
        kinds = kinds_of(model)
        spec = ChannelSpec(name="bench", kind=kinds[0][0], model=model, params=params)
        ch, fit_s = fit_channel(spec, sp.data)
        for kind, serve_label, serve in kinds:
            s = ChannelSpec(name="bench", kind=kind, model=model, params=params, serve=ServeParams(**serve))
            mat = lists_to_matrix(clean_lists(recommend_all(ch, s, sp, K)[0], sp, K, s.name), K)
            res = {"label": label, "split": split, "kind": kind, "serve": serve_label, "params": params,
                   **summarize(mat, sp.targets, sp.catalog_size), "fit_s": fit_s}
            with open(out, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"{label:50s} {kind} {serve_label:8s} HR@50 {res['hr@50']:.4f} HR@200 {res['hr@200']:.4f} "
                  f"NDCG@50 {res['ndcg@50']:.4f} Cov@50 {res['coverage@50']:.3f} fit {fit_s:.1f}s", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}, calib_s {calibrate():.3f}")


if __name__ == "__main__":
    typer.run(main)
