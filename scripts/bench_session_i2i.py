"""Score the session i2i channels (metric_i2i, airbnb) on a PROTOCOL.md split, for tuning (validation) and the
reported figures (test), with the evaluator's own fit / recommend / metric functions.

    .venv/bin/python -m scripts.bench_session_i2i --model metric_i2i --split val \\
        --grid '[{"loss": "circle"}, {"loss": "multi_similarity"}]' --serve '{"recent_n": 20}'

Each grid entry is merged over --params; `serve` keys in an entry (a dict) override --serve. Prints one JSON
line per configuration: HR@50, HR@200, NDCG@50, Coverage@50, fit_s and the channel's own metrics.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.channel_config import ChannelSpec, ServeParams
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.evaluate import K, clean_lists, fit_channel, make_split, recommend_all
from trainer.metrics import lists_to_matrix, summarize


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/ml-100k")
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--params", default="{}", help="JSON params shared by every configuration")
    ap.add_argument("--serve", default="{}", help="JSON serve settings shared by every configuration")
    ap.add_argument("--grid", default="[{}]", help="JSON list of param overrides (key 'serve': serve overrides)")
    ap.add_argument("--serve-grid", default=None, help="JSON list of serve settings scored on each fit")
    a = ap.parse_args(argv)
    ds = load_dataset(a.data)
    train, test = leave_last_out(ds.interactions)
    if a.split == "val":
        train, test = validation_split(train)
    split = make_split(train, test, ds)
    base, serve0 = json.loads(a.params), json.loads(a.serve)
    for entry in json.loads(a.grid):
        entry = dict(entry)
        serve_over = entry.pop("serve", {})
        params = {**base, **entry}
        spec = ChannelSpec(name=a.model, kind="i2i", model=a.model, params=params,
                           serve=ServeParams(**{**serve0, **serve_over}))
        ch, fit_s = fit_channel(spec, split.data)
        serves = json.loads(a.serve_grid) if a.serve_grid else [{**serve0, **serve_over}]
        for sv in serves:
            lists = clean_lists(recommend_all(ch, spec, split, K, ServeParams(**sv))[0], split, K, a.model)
            row = summarize(lists_to_matrix(lists, K), split.targets, split.catalog_size)
            out = {"split": a.split, "params": entry, "serve": sv, **{k: round(v, 4) for k, v in row.items()},
                   "fit_s": round(fit_s, 2),
                   "metrics": {k: (round(v, 4) if isinstance(v, float) else v)
                               for k, v in getattr(ch, "metrics", {}).items()}}
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
