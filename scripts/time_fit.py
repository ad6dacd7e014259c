"""Time one channel's fit (and its artifact build) on a dataset's PROTOCOL training split, as the evaluator does.

    .venv/bin/python -m scripts.time_fit --data var/data/synth-1m --model airbnb [--params '{"epochs": 3}']

Prints one JSON line: dataset size, fit seconds, artifact seconds, the channel's own metrics, calib_s and the
1-minute load average before and after (PROTOCOL §5–6: compare timings as fit_s / calib_s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common.channel_config import ChannelSpec
from trainer.channels.registry import build, models
from trainer.data.io import load_dataset
from trainer.data.split import leave_last_out
from trainer.evaluate import make_split
from trainer.metrics import calibrate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        calib0, load0 = calibrate(), os.getloadavg()[0]
        t = time.perf_counter()
        ds = load_dataset(a.data)
        train, test = leave_last_out(ds.interactions)
        split = make_split(train, test, ds)
        prep_s = time.perf_counter() - t
        kind = models()[a.model].kinds[0]
        ch = build(ChannelSpec(name=a.model, kind=kind, model=a.model, params=json.loads(a.params)))
        t = time.perf_counter()
        ch.fit(split.data, progress=a.progress)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        ch.artifacts(split.data)
        art_s = time.perf_counter() - t
        calib1, load1 = calibrate(), os.getloadavg()[0]
    metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in getattr(ch, "metrics", {}).items()}
    print(json.dumps({"data": a.data, "model": a.model, "params": json.loads(a.params),
                      "interactions": int(len(split.data.item_idx)), "items": split.data.n_items, "prep_s": round(prep_s, 2),
                      "fit_s": round(fit_s, 2), "artifacts_s": round(art_s, 2), "total_s": round(fit_s + art_s, 2),
                      "calib_s": [round(calib0, 3), round(calib1, 3)], "load_1m": [round(load0, 1), round(load1, 1)],
                      "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
