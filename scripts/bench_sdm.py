"""SDM on ml-100k under PROTOCOL.md: validation search and the gate-vs-sum ablation (one JSON line per run).

    .venv/bin/python -m scripts.bench_sdm --split val --grid '[{}, {"dim": 32}]'   # tune: validation only
    .venv/bin/python -m scripts.bench_sdm --split test --grid '[{}, {"fusion": "sum"}]'   # ablation on test
    .venv/bin/python -m scripts.bench_sdm --fit-only --data-dir var/data/synth-1m        # fit seconds only
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from common.channel_config import ChannelSpec
from scripts.bench_two_tower import evaluate, load
from trainer.channels.sdm import SDMChannel
from trainer.data.train_data import TrainData

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


def main(data_dir: Path = typer.Option(DEFAULT_DATA, help="dataset directory (ml-100k layout)"),
         split: str = typer.Option("val", help="val (tuning) or test"),
         base: str = typer.Option("{}", help="JSON params every grid entry starts from"),
         grid: str = typer.Option("[{}]", help="JSON list of param overrides, one run each"),
         fit_only: bool = typer.Option(False, help="only time the fit (+ artifacts) on the split's training data")
         ) -> None:
    ds, splits = load(data_dir)
    train, test = splits[split]
    for step in json.loads(grid):
        params = {**json.loads(base), **step}
        if fit_only:
            data = TrainData.from_frame(train, ds.users, ds.items)
            data.csr, data.user_ptr, data.item_counts  # noqa: B018 - prepared before the clock, as the evaluator
            ch = SDMChannel(ChannelSpec(name="bench", kind="u2i", model="sdm", params=params), seed=42)
            t0, c0 = time.perf_counter(), time.process_time()
            ch.fit(data)
            ch.artifacts(data)
            print(json.dumps({"data": str(data_dir), "params": params, "fit_s": round(time.perf_counter() - t0, 2),
                              "cpu_s": round(time.process_time() - c0, 2), "interactions": len(data.item_idx),
                              "users": data.n_users, "items": data.n_items, "epoch_losses": ch.losses}), flush=True)
            continue
        r = evaluate(SDMChannel, "u2i", params, ds, train, test)
        print(json.dumps({"split": split, "params": params, **{k: round(v, 4) for k, v in r.items()}}), flush=True)


if __name__ == "__main__":
    typer.run(main)
