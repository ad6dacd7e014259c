"""Incremental updates between nightlies on the synthetic log (docs/event_log.md, "Benchmark").

    .venv/bin/python -m scripts.bench_incremental                     # 5k users, 3k items, 150k clicks, cut at 12 h
    .venv/bin/python -m scripts.bench_incremental --hours 6 --out /tmp/bench_incremental

Train on days 1..D−1 (D = the log's last day), then on day D: (a) the stale nightly, (b) the nightly plus
`python -m trainer incremental` over day D's first `--hours` hours (events appended to the real event log), (c) a
full retrain (the nightly job, which folds the same logged events). Each is scored on the events of day D after the
cut: a user's target is their first later item not in their history; the query vector is what the vector server
computes at request time (the published tower over the user's latest items up to the cut, items unknown to the
version dropped); exact inner-product top-50 over the version's item vectors, the user's history excluded.
Reports HR@50 (all users with a history and a later target; users active in the first hours; targets that are items
first seen on day D) and the seconds of the incremental job and of the retrain, in one run on one machine.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import typer

from common.ids import load_id_map
from common.keyspace import Keyspace
from common.local_redis import LocalRedis
from common.publish import read_manifest
from common.redis_conn import RedisStores
from common.settings import Settings
from common.towers import load_tower
from trainer.data.io import load_dataset
from trainer.data.split import dedupe_pairs, order_interactions
from trainer.event_log import append_events
from trainer.incremental import run_incremental
from trainer.nightly import run_nightly
from trainer.synth import DAY, T0, write_synthetic

K = 50
CONFIG = """
channels:
  popular: {kind: list, model: popular, quota: 50}
  two_tower: {kind: u2i, model: two_tower, quota: 100}
"""


def version_files(stores: RedisStores, channel: str) -> dict[str, Any]:
    """The current version's manifest, tower and item vectors (from the artifacts dir it names)."""
    man = read_manifest(stores, channel)
    d = Path(man["artifacts_dir"])
    return {"version": man["version"], "manifest": man, "items": np.load(d / "item_vectors.npy"),
            "tower": load_tower((d / "user_tower.pt").read_bytes(), man["user_tower_meta"])}


def score(v: dict[str, Any], users: np.ndarray, recent: list[list[int]], seen: list[np.ndarray],
          targets: np.ndarray, user_rows: pd.DataFrame | None) -> np.ndarray:
    """Hit@K per user with the request-time tower of version `v` (what the vector server does)."""
    meta = v["manifest"]["user_tower_meta"]
    n_users, n_items, r = int(meta["n_users"]), int(meta["n_items"]), int(meta["recent_n"])
    rec = np.full((len(users), r), n_items, np.int64)
    for b, items in enumerate(recent):
        known = [i for i in items if i < n_items][:r]
        rec[b, :len(known)] = known
    u = np.where(users < n_users, users, n_users)
    cols, vocab = meta.get("attr_columns", []), meta.get("attr_vocab", {})
    attrs = np.zeros((len(users), max(1, len(cols))), np.int64)
    for j, c in enumerate(cols):  # the user record's attributes, encoded as common/towers/inputs.py does
        if user_rows is not None and c in user_rows.columns:
            attrs[:, j] = [vocab.get(c, {}).get(str(x), 0) if pd.notna(x) else 0 for x in user_rows[c].tolist()]
    with torch.no_grad():
        q = v["tower"](torch.as_tensor(u), torch.as_tensor(attrs), torch.as_tensor(rec)).numpy()
    scores = q @ v["items"].T
    hits = np.zeros(len(users), bool)
    for b in range(len(users)):
        s = scores[b].copy()
        s[seen[b][seen[b] < len(s)]] = -np.inf
        top = np.argpartition(-s, K)[:K] if len(s) > K else np.arange(len(s))
        hits[b] = targets[b] in set(top[np.isfinite(s[top])].tolist())
    return hits


def run_one(users: int, items: int, clicks: int, hours: float, out: Path, seed: int) -> tuple[dict, dict]:
    """One synthetic log (seed): (counts, rows a/b/c with HR@50s and seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    full = write_synthetic(out / "full", n_users=users, n_items=items, n_clicks=clicks, seed=seed, progress=False)
    ds = load_dataset(full)
    inter = ds.interactions
    day_d = T0 + 29 * DAY
    cut = day_d + int(hours * 3600)
    base_dir = out / "base"
    base_dir.mkdir()
    inter[inter["timestamp"] < day_d].to_parquet(base_dir / "interactions.parquet", index=False)
    for name in ("users", "items"):
        shutil.copy(full / f"{name}.parquet", base_dir / f"{name}.parquet")
    first_hours = inter[(inter["timestamp"] >= day_d) & (inter["timestamp"] < cut)]
    later = inter[inter["timestamp"] >= cut]
    cfg = out / "channels.yaml"
    cfg.write_text(CONFIG)
    rows: dict[str, dict[str, Any]] = {}
    with LocalRedis(out / "redis") as server:
        settings = Settings(redis_url=server.url, artifacts_dir=out / "artifacts")
        stores = RedisStores(server.url, Keyspace.from_settings(settings))
        t = time.perf_counter()
        a = run_nightly(settings, data_dir=base_dir, config_path=cfg, progress=False)
        assert a["status"] == "ok", a["failed"]
        rows["a"] = {"what": "(a) stale nightly (days 1..D−1)", "job_s": time.perf_counter() - t,
                     "fit_s": a["channels"]["two_tower"]["fit_s"], **version_files(stores, "two_tower")}
        append_events(stores, first_hours)  # what POST /events would have logged during those hours
        t = time.perf_counter()
        b = run_incremental(settings, data_dir=base_dir, config_path=cfg)
        assert b["status"] == "ok" and "two_tower" in b["versions"], b
        rows["b"] = {"what": f"(b) nightly + incremental over day D's first {hours:g} h",
                     "job_s": time.perf_counter() - t, "fit_s": b["channels"]["two_tower"]["fit_s"],
                     "report": b["channels"]["two_tower"]["report"], **version_files(stores, "two_tower")}
        t = time.perf_counter()
        c = run_nightly(settings, data_dir=base_dir, config_path=cfg, progress=False)  # folds the logged events
        assert c["status"] == "ok" and c["events"]["total"] == len(first_hours), c
        rows["c"] = {"what": f"(c) full retrain (days 1..D−1 + first {hours:g} h)", "job_s": time.perf_counter() - t,
                     "fit_s": c["channels"]["two_tower"]["fit_s"], **version_files(stores, "two_tower")}
        user_map, item_map = load_id_map(stores, "user"), load_id_map(stores, "item")
        stores.close()

    # the evaluation: history = everything before the cut (deduplicated like the training data)
    hist = order_interactions(dedupe_pairs(pd.concat([inter[inter["timestamp"] < cut]], ignore_index=True)))
    hist_u, hist_i = user_map.lookup(hist["user_id"]), item_map.lookup(hist["item_id"])
    by_user: dict[int, list[int]] = {}
    for u, i in zip(hist_u.tolist(), hist_i.tolist(), strict=True):
        by_user.setdefault(u, []).append(i)
    active = set(user_map.lookup(first_hours["user_id"]).tolist())
    new_items = set(item_map.lookup(inter.loc[inter["timestamp"] >= day_d, "item_id"]).tolist()) - set(
        item_map.lookup(inter.loc[inter["timestamp"] < day_d, "item_id"]).tolist())
    lat = order_interactions(later)
    eval_u, eval_t = [], []
    for uid, grp in lat.groupby("user_id", sort=False):
        u = user_map.get(str(uid))
        if u < 0 or u not in by_user:
            continue  # no history before the cut: a cold user, not what this compares
        seen = set(by_user[u])
        fresh = [i for i in item_map.lookup(grp["item_id"]).tolist() if i not in seen]
        if fresh:
            eval_u.append(u)
            eval_t.append(fresh[0])
    eval_u, eval_t = np.array(eval_u), np.array(eval_t)
    recent = [by_user[u][::-1] for u in eval_u]
    seen_arr = [np.array(by_user[u], np.int64) for u in eval_u]
    is_active = np.array([u in active for u in eval_u])
    is_new_target = np.array([t in new_items for t in eval_t])
    user_rows = ds.users.reindex([user_map.ids[u] for u in eval_u]) if ds.users is not None else None
    for key in "abc":
        hits = score(rows[key], eval_u, recent, seen_arr, eval_t, user_rows)
        rows[key].update(hr=hits.mean(), hr_active=hits[is_active].mean() if is_active.any() else float("nan"),
                         hr_new=hits[is_new_target].mean() if is_new_target.any() else float("nan"))

    counts = {"users": users, "items": items, "clicks": clicks, "base_rows": int((inter["timestamp"] < day_d).sum()),
              "first_hours_events": len(first_hours), "later_events": len(later), "eval_users": len(eval_u),
              "eval_active": int(is_active.sum()), "eval_new_item_targets": int(is_new_target.sum())}
    return counts, rows


def main(users: int = typer.Option(5000), items: int = typer.Option(3000), clicks: int = typer.Option(150_000),
         hours: float = typer.Option(12.0, help="day D's first hours given to the incremental job"),
         out: Path = typer.Option(Path("/tmp/bench_incremental"), help="work dir (data, Redis, artifacts)"),
         report: Path = typer.Option(Path("/tmp/handoff/log.md"), help="results table (markdown) appended here"),
         seeds: str = typer.Option("42,7,1", help="synthetic logs (comma-separated seeds)")) -> None:
    runs = [run_one(users, items, clicks, hours, out / f"seed{s}", int(s)) for s in seeds.split(",")]
    per = lambda key, field: [r[key][field] for _, r in runs]  # noqa: E731
    fmt = lambda xs, d=3: f"{np.mean(xs):.{d}f} ({' / '.join(f'{x:.{d}f}' for x in xs)})"  # noqa: E731
    lines = [f"Synthetic logs ({users} users, {items} items, {clicks} clicks; seeds {seeds}); day D = day 30; day "
             f"D's first {hours:g} h go to the event log ({' / '.join(str(c['first_hours_events']) for c, _ in runs)} "
             f"events); scored: users with a history and a later target "
             f"({' / '.join(str(c['eval_users']) for c, _ in runs)}; active in the first hours "
             f"{' / '.join(str(c['eval_active']) for c, _ in runs)}; targets first seen on day D "
             f"{' / '.join(str(c['eval_new_item_targets']) for c, _ in runs)}). Channel two_tower (defaults), HR@50 "
             f"with the request-time tower; mean (per seed); {platform.machine()}, torch threads "
             f"{torch.get_num_threads()}, one run on a shared 2-core machine.", "",
             "| model | HR@50 all | HR@50 active users | HR@50 new-item targets | job s | two_tower fit s |",
             "|---|---|---|---|---|---|"]
    for key in "abc":
        lines.append(f"| {runs[0][1][key]['what']} | {fmt(per(key, 'hr'))} | {fmt(per(key, 'hr_active'))} | "
                     f"{fmt(per(key, 'hr_new'))} | {fmt(per(key, 'job_s'), 1)} | {fmt(per(key, 'fit_s'), 1)} |")
    lines += ["", "Incremental passes: " + "; ".join(json.dumps(r["b"]["report"]) for _, r in runs) + ". `job s` = the "
              "whole job (load, ids, fit and publish of two_tower and popular); `two_tower fit s` = its warm start + "
              "one pass + re-encoding, or its full fit."]
    text = "\n".join(lines)
    print(text)
    (out / "results.json").write_text(json.dumps([{"counts": c, "rows": {k: {x: y for x, y in v.items() if x not in
                                                  ("tower", "items", "manifest")} for k, v in r.items()}}
                                                 for c, r in runs], indent=1, default=str))
    report.parent.mkdir(parents=True, exist_ok=True)
    with report.open("a") as f:
        f.write("\n## Incremental updates between nightlies (scripts/bench_incremental.py)\n\n" + text + "\n")


if __name__ == "__main__":
    typer.run(main)
