"""Multi-task two-tower figures on a dataset under PROTOCOL.md v1, with HR@50 on liked targets too.

    .venv/bin/python -m scripts.bench_multitask --split val --grid tune        # the validation search
    .venv/bin/python -m scripts.bench_multitask --split test --grid report     # the reported rows + ablation

Each row: one channel (model + params + the head/blend it publishes) fitted on the split's training data and
scored through the evaluator's own functions (trainer.evaluate: fit_channel, recommend_all, clean_lists;
trainer.metrics.summarize), plus `liked_hit_rate` (trainer/task_metrics.py). Rows of the same training params
share one fit (the channel's `share_fit`), so a model's heads are scored from one training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from common.channel_config import ChannelSpec
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.evaluate import K, clean_lists, fit_channel, make_split, recommend_all
from trainer.metrics import calibrate, lists_to_matrix, summarize
from trainer.task_metrics import event_hit_rate, liked_hit_rate, target_events

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"

Row = tuple[str, str, dict[str, Any]]  # (label, model, params)


def heads(label: str, params: dict[str, Any], which: tuple[str, ...] = ("interacted", "liked")) -> list[Row]:
    """One row per published head of one trained model (the rows share the fit)."""
    return [(f"{label} · head {h}", "multitask_two_tower", {**params, "head": h}) for h in which]


GRIDS: dict[str, list[Row]] = {
    "tune": [
        ("two_tower defaults", "two_tower", {}),
        *heads("mt defaults (shared items, w=1/1, negatives auto)", {}),
        *heads("mt negatives in_batch (every task)", {"negatives": "in_batch"}),
        *heads("mt negatives mixed (every task)", {"negatives": "mixed"}),
        *heads("mt per-task item towers", {"item_heads": "per_task"}),
        *heads("mt liked weight 0.5", {"loss_weights": {"liked": 0.5}}),
        *heads("mt liked weight 2", {"loss_weights": {"liked": 2.0}}),
        *heads("mt head_hidden [64]", {"head_hidden": [64]}),
        *heads("mt shared logQ", {"logq_per_task": False}),
        ("mt blend interacted 1 + liked 1", "multitask_two_tower", {"blend": {"interacted": 1.0, "liked": 1.0}}),
    ],
    "report": [
        ("two_tower defaults", "two_tower", {}),
        *heads("mt defaults", {}),
        *[(f"mt defaults · blend interacted 1 + liked {w}", "multitask_two_tower",
           {"blend": {"interacted": 1.0, "liked": w}}) for w in (1.0, 2.0)],
        *heads("mt shared logQ (ablation)", {"logq_per_task": False}),
        *heads("mt no logQ", {"logq": False}),
        *heads("mt single task (tasks [interacted])", {"tasks": ["interacted"]}, ("interacted",)),
    ],
    "ablation": [
        *heads("mt defaults", {}),
        *heads("mt shared logQ (ablation)", {"logq_per_task": False}),
    ],
}


def main(data: Path = typer.Option(DEFAULT_DATA), split: str = typer.Option("val", help="val | test"),
         grid: str = typer.Option("tune", help=f"one of {sorted(GRIDS)}"),
         rows: str = typer.Option("", help="comma-separated row indices of the grid (default all)"),
         extra: str = typer.Option("", help="JSON params merged into every multitask row"),
         out: Path = typer.Option(Path("/tmp/bench_multitask.jsonl"))) -> None:
    dataset = load_dataset(data)
    train, test = leave_last_out(dataset.interactions)
    if split == "val":
        train, test = validation_split(train)
    sp = make_split(train, test, dataset)
    events = target_events(test)
    n_liked = int((events == 1).sum())
    print(f"{dataset.name} {split}: {sp.n_eval} users ({n_liked} liked targets), catalog {sp.catalog_size}; "
          f"load {os.getloadavg()[0]:.1f}, calib_s {calibrate():.3f}", flush=True)
    chosen = GRIDS[grid] if not rows else [GRIDS[grid][int(i)] for i in rows.split(",")]
    more = json.loads(extra) if extra else {}
    results = []
    for label, model, params in chosen:
        if model == "multitask_two_tower":
            params = {**params, **more}
        spec = ChannelSpec(name="mt_" + str(abs(hash(label)) % 10**8), kind="u2i", model=model, params=params)
        t = time.perf_counter()
        ch, fit_s = fit_channel(spec, sp.data)
        lists, _ = recommend_all(ch, spec, sp, K)
        mat = lists_to_matrix(clean_lists(lists, sp, K, spec.name), K)
        res = {"label": label, "split": split, "params": params, **summarize(mat, sp.targets, sp.catalog_size),
               "hr@50_liked": liked_hit_rate(mat, sp.targets, events, 50),
               "hr@50_other": event_hit_rate(mat, sp.targets, events, 50, (0, 2, 3)),
               "fit_s": fit_s, "reused_fit": bool((getattr(ch, "metrics", None) or {}).get("reused_fit")),
               "total_s": time.perf_counter() - t}
        results.append(res)
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"{label:60s} HR@50 {res['hr@50']:.4f} HR@200 {res['hr@200']:.4f} NDCG@50 {res['ndcg@50']:.4f} "
              f"liked HR@50 {res['hr@50_liked']:.4f} other {res['hr@50_other']:.4f} fit {fit_s:.1f}s"
              f"{' (reused)' if res['reused_fit'] else ''}", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}, calib_s {calibrate():.3f}")


if __name__ == "__main__":
    typer.run(main)
