"""YouTubeDNN on ml-100k under PROTOCOL.md v1: defaults, the ablation of its signature ideas (example age; fixed
examples per user), and the validation search behind the defaults; plus fit seconds on any dataset.

    .venv/bin/python -m scripts.bench_youtube_dnn --grid ablation --splits val,test
    .venv/bin/python -m scripts.bench_youtube_dnn --grid tune --splits val          # selection: validation only
    .venv/bin/python -m scripts.bench_youtube_dnn --fit-only --data-dir var/data/synth-1m --repeats 1

Every variant changes one thing from the channel's defaults (`--base JSON` changes the defaults first); results
go to stdout as JSON lines (and `--out FILE`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from scripts.bench_two_tower import DEFAULT_DATA, evaluate, load
from trainer.channels.youtube_dnn import YouTubeDNNChannel

GRIDS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "defaults": [("default", {})],
    "ablation": [
        ("default", {}),
        ("no example age", {"example_age": False}),
        ("every position (no fixed examples per user)", {"examples_per_user": None}),
        ("no example age, every position", {"example_age": False, "examples_per_user": None}),
        ("no newest-item field (the paper's unordered bag only)", {"newest_item": False}),
        ("sampled softmax (1000 negatives, logQ)", {"full_softmax_up_to": 0}),
        ("sampled softmax, no logQ", {"full_softmax_up_to": 0, "logq": False}),
        ("no token bags", {"token_fields": []}),
        ("no user attributes", {"use_user_attrs": False}),
        ("no continuous features", {"use_continuous": False}),
        ("no item bias", {"item_bias": False}),
        ("cosine logits (τ = 0.05)", {"normalize": True}),
        ("output = input item embeddings", {"share_item_emb": True}),
    ],
    "tune": [
        ("default", {}),
        ("epochs 10", {"epochs": 10}), ("epochs 40", {"epochs": 40}),
        ("examples_per_user 10", {"examples_per_user": 10}), ("examples_per_user 20", {"examples_per_user": 20}),
        ("examples_per_user 100", {"examples_per_user": 100}),
        ("lr 0.0005", {"lr": 0.0005}), ("lr 0.003", {"lr": 0.003}), ("lr 0.01", {"lr": 0.01}),
        ("hidden 256-128", {"hidden": [256, 128]}),
        ("emb/dim 32", {"emb_dim": 32, "dim": 32}),
        ("recent_n 20", {"recent_n": 20}), ("recent_n 10", {"recent_n": 10}),
        ("cosine τ 0.05", {"normalize": True}), ("cosine τ 0.1", {"normalize": True, "temperature": 0.1}),
        ("zip_prefix 2", {"zip_prefix": 2}), ("weight_decay 1e-5", {"weight_decay": 1e-5}),
        ("batch 256", {"batch_size": 256}),
    ],
}


def main(data_dir: Path = typer.Option(DEFAULT_DATA, help="dataset directory"),
         grid: str = typer.Option("ablation", help=", ".join(GRIDS)),
         splits: str = typer.Option("val,test", help="val and/or test"),
         base: str = typer.Option("{}", help="JSON params applied before every variant"),
         only: str = typer.Option("", help="semicolon-separated variant names to run (default: all)"),
         fit_only: bool = typer.Option(False, help="time fits on the full data (no split, no scoring)"),
         repeats: int = typer.Option(1, help="fits timed (median) with --fit-only"),
         out: Path | None = typer.Option(None, help="append JSON lines here")) -> None:
    base_params = json.loads(base)
    rows = GRIDS[grid]
    if only:
        keep = {s.strip() for s in only.split(";")}
        rows = [r for r in rows if r[0] in keep]

    def emit(rec: dict[str, Any]) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(line + "\n")

    if fit_only:
        from common.channel_config import ChannelSpec
        from trainer.data.io import load_dataset
        from trainer.data.train_data import TrainData
        from trainer.metrics import calibrate

        ds = load_dataset(data_dir)
        data = TrainData.from_frame(ds.interactions, ds.users, ds.items)
        data.csr, data.user_ptr, data.item_counts  # noqa: B018 - prep, not fit (PROTOCOL §5)
        for name, params in rows:
            times, cpu = [], []
            for _ in range(repeats):
                ch = YouTubeDNNChannel(ChannelSpec(name="bench", kind="u2i", model="youtube_dnn",
                                                   params={**base_params, **params}), seed=42)
                t0, c0 = time.perf_counter(), time.process_time()
                ch.fit(data)
                ch.artifacts(data)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            emit({"variant": name, "data": str(data_dir), "users": data.n_users, "items": data.n_items,
                  "interactions": int(len(data.item_idx)), "fit_s": sorted(times)[len(times) // 2],
                  "fit_cpu_s": sorted(cpu)[len(cpu) // 2], "steps": int(getattr(ch, "steps", 0)),
                  "calib_s": calibrate(), "load1": os.getloadavg()[0], "softmax": "full" if ch.softmax.full
                  else f"sampled({ch.softmax.num_sampled})"})
        return
    ds, sp = load(data_dir)
    for name, params in rows:
        for split in [s.strip() for s in splits.split(",") if s.strip()]:
            train, test = sp[split]
            r = evaluate(YouTubeDNNChannel, "u2i", {**base_params, **params}, ds, train, test)
            emit({"variant": name, "split": split, "params": {**base_params, **params}, **r,
                  "load1": os.getloadavg()[0]})


if __name__ == "__main__":
    typer.run(main)
