"""Fit seconds of one channel on a dataset's PROTOCOL training split (PROTOCOL §5 fit_s: from TrainData to artifacts
built), with the calibration workload and the load average before and after.

    .venv/bin/python -m scripts.time_multitask_fit --data var/data/synth-1m
    .venv/bin/python -m scripts.time_multitask_fit --data ../shared/data/ml-100k --model two_tower --repeats 3
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import typer

from common.channel_config import ChannelSpec
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out
from trainer.evaluate import fit_channel, make_split
from trainer.metrics import calibrate


def main(data: Path = typer.Option(...), model: str = typer.Option("multitask_two_tower"),
         params: str = typer.Option("{}", help="JSON params"), repeats: int = typer.Option(1)) -> None:
    t = time.perf_counter()
    dataset = load_dataset(data)
    train, test = leave_last_out(dataset.interactions)
    split = make_split(train, test, dataset)
    prep_s = time.perf_counter() - t
    info = {"data": str(data), "model": model, "params": json.loads(params), "n_train": int(len(split.data.item_idx)),
            "n_users": split.data.n_users, "n_items": split.data.n_items, "prep_s": round(prep_s, 2),
            "load_start": os.getloadavg()[0], "calib_start": calibrate()}
    print(json.dumps(info), flush=True)
    times = []
    for r in range(repeats):
        spec = ChannelSpec(name=f"timing_{r}", kind="u2i", model=model, params={**json.loads(params), "share_fit": False}
                           if model == "multitask_two_tower" else json.loads(params))
        _, sec = fit_channel(spec, split.data)
        times.append(sec)
        print(json.dumps({"repeat": r, "fit_s": round(sec, 2)}), flush=True)
    info.update(fit_s=round(statistics.median(times), 2), fit_s_all=[round(x, 2) for x in times],
                load_end=os.getloadavg()[0], calib_end=calibrate())
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    typer.run(main)
