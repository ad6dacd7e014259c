"""EGES figures on ml-100k under PROTOCOL.md v1: variants scored on the validation split (selection) or the
test split (reporting), the EGES / GES / BGE ablation, and fit seconds.

    .venv/bin/python -m scripts.bench_eges --split val --variants '[{"window": 3}, {"window": 10}]'
    .venv/bin/python -m scripts.bench_eges --split test --ablation          # eges vs ges vs bge, defaults
    .venv/bin/python -m scripts.bench_eges --split val --serves '[{"recent_n": 20, "recency_decay": 0.8}]'
    .venv/bin/python -m scripts.bench_eges --split test --ablation --item2vec    # + item2vec, same split

Each variant is the channel defaults updated by the given params (and serve settings); selection uses the
validation split only; test figures are for reporting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from common.channel_config import ChannelSpec, ServeParams
from trainer.channels.eges import EGESChannel
from trainer.channels.item2vec import Item2VecChannel
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.evaluate import clean_lists, make_split, recommend_all
from trainer.metrics import lists_to_matrix, summarize

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-100k"
RECOMMENDED_SERVE = {"recent_n": 20, "recency_decay": 0.8, "per_anchor": 200}
ITEM2VEC_SERVE = {"recent_n": 5, "recency_decay": 0.9, "per_anchor": 100}  # its serve in config/channels.yaml


def make(data_dir: Path, split: str):
    """The protocol split ('test') or its validation split ('val') of a dataset."""
    ds = load_dataset(data_dir)
    train, test = leave_last_out(ds.interactions)
    if split == "val":
        train, test = validation_split(train)
    return make_split(train, test, ds)


def score(sp, params: dict[str, Any], serves: list[dict[str, Any]], progress: bool = False,
          model: str = "eges") -> list[dict[str, Any]]:
    """Fit once with `params`, score each serve setting; one row per serve."""
    spec = ChannelSpec(name=model, kind="i2i", model=model, params=params)
    t = time.perf_counter()
    ch = (EGESChannel if model == "eges" else Item2VecChannel)(spec, seed=42)
    ch.fit(sp.data, progress=progress)
    ch.artifacts(sp.data)
    fit_s = time.perf_counter() - t
    rows = []
    for sv in serves:
        lists, _ = recommend_all(ch, spec, sp, 200, ServeParams(**sv))
        mat = lists_to_matrix(clean_lists(lists, sp, 200, model), 200)
        m = summarize(mat, sp.targets, sp.catalog_size)
        extra = {k: v for k, v in getattr(ch, "metrics", {}).items() if k != "side_info"}  # item2vec has none
        rows.append({"model": model, "params": params, "serve": sv, **{k: round(v, 4) for k, v in m.items()},
                     "fit_s": round(fit_s, 2), **extra})
    return rows


def main(split: str = typer.Option("val", help="val | test"),
         variants: str = typer.Option("[{}]", help="JSON list of param dicts (each updates the defaults)"),
         serves: str = typer.Option(json.dumps([RECOMMENDED_SERVE]), help="JSON list of serve dicts"),
         ablation: bool = typer.Option(False, help="eges vs ges vs bge (overrides --variants' aggregation)"),
         data: Path = typer.Option(DEFAULT_DATA),
         progress: bool = typer.Option(False, help="tqdm bars of the fit on stderr"),
         item2vec: bool = typer.Option(False, help="also score item2vec (its defaults) on the same split, at its "
                                       "config serve and at each --serves setting")) -> None:
    sp = make(data, split)
    vs = json.loads(variants)
    if ablation:
        vs = [{**v, "aggregation": a} for v in vs for a in ("eges", "ges", "bge")]
    for v in vs:
        for row in score(sp, v, json.loads(serves), progress):
            print(json.dumps({"split": split, **row}), flush=True)
    if item2vec:
        i2v_serves = [ITEM2VEC_SERVE, *[sv for sv in json.loads(serves) if sv != ITEM2VEC_SERVE]]
        for row in score(sp, {}, i2v_serves, progress, model="item2vec"):
            print(json.dumps({"split": split, **row}), flush=True)
    np.set_printoptions()


if __name__ == "__main__":
    typer.run(main)
