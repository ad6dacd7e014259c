"""`python -m trainer evaluate`: offline recall evaluation under shared PROTOCOL.md (v1).

Leave-last-out split, catalog = training items, top-200 lists of unseen items, HR@50/200, NDCG@50,
Coverage@50 (and HR@50 on *liked* targets where the data has ratings or events: trainer/task_metrics.py) and
timings for every channel of the config, plus the MERGED list built by
`common.merge.merge` (the recall server's merge). `--tune` picks merge settings on the validation split.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from common.channel_config import ChannelConfig, ChannelSpec, ConfigError, ServeParams, load_config
from common.merge import ChannelOutput, merge, request_size
from trainer.channels import registry
from trainer.channels.base import Channel
from trainer.data.errors import DataError
from trainer.data.events import LIKE
from trainer.data.io import Dataset, load_dataset
from trainer.data.split import leave_last_out, validation_split
from trainer.data.train_data import TrainData
from trainer.metrics import calibrate, hit_rate, hr_curve, lists_to_matrix, ndcg, summarize, target_ranks
from trainer.task_metrics import liked_hit_rate, target_events

log = logging.getLogger(__name__)

K = 200  # list length scored by the protocol
CURVE_K = 500
CURVE_KS = list(range(10, CURVE_K + 1, 10))
BATCH = 1024
N_SINGLE = 300
SEED = 42
MERGED = "merged"
Lists = list[tuple[np.ndarray, np.ndarray]]

# PROTOCOL.md §8, ML-100K: (reference, HR@50, HR@200, NDCG@50, Coverage@50, fit s)
REFERENCE_ML100K: list[tuple[str, float, float, float, float, float]] = [
    ("MostPopular", 0.143, 0.379, 0.045, 0.155, 0.00),
    ("implicit 0.7.3 ItemItemRecommender (K=20)", 0.211, 0.242, 0.060, 0.536, 0.03),
    ("implicit CosineRecommender (K=20)", 0.247, 0.540, 0.069, 0.465, 0.03),
    ("implicit BM25Recommender (K=20)", 0.260, 0.545, 0.077, 0.348, 0.03),
    ("implicit AlternatingLeastSquares (64 factors, reg 10, alpha 1, 30 it)", 0.318, 0.672, 0.088, 0.512, 0.45),
    ("implicit BayesianPersonalizedRanking (64 factors, lr 0.01, reg 0.001, 50 it)", 0.273, 0.582, 0.076, 0.616, 0.88),
    ("ItemCF (PROTOCOL §8 anchor, α=0.5, last 20 items)", 0.259, 0.591, 0.078, 0.504, 0.11),
]


class EvaluationError(RuntimeError):
    """A channel failed during evaluation; the message names it."""


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    """One protocol split: the training view channels fit on, the evaluated users and their targets."""

    data: TrainData
    users: np.ndarray  # int64 internal user indices, evaluated users in test-frame order
    targets: np.ndarray  # int64 internal item indices; -1 = target outside the catalog (always a miss)
    seen: list[np.ndarray] = field(default_factory=list)  # training items per evaluated user
    events: np.ndarray | None = None  # int8 event code of each target (trainer.data.events; LIKE = liked)

    @property
    def n_eval(self) -> int:
        return len(self.users)

    @property
    def catalog_size(self) -> int:
        return self.data.n_items


def make_split(train: pd.DataFrame, test: pd.DataFrame, dataset: Dataset | None = None) -> Split:
    """Index the training frame only (so item indices = the catalog) and locate the test targets."""
    data = TrainData.from_frame(train, dataset.users if dataset else None, dataset.items if dataset else None)
    data.csr, data.user_ptr, data.item_counts  # noqa: B018 - built here so fit_s starts from the CSR (§5)
    users = data.user_map.lookup(test["user_id"]).astype(np.int64)
    if (users < 0).any():  # cannot happen with leave_last_out (every evaluated user keeps ≥ 2 training rows)
        raise DataError("evaluated user without training data; the split is broken")
    targets = data.item_map.lookup(test["item_id"]).astype(np.int64)
    seen = [data.history(int(u))[0] for u in users]
    return Split(data, users, targets, seen, target_events(test))


def protocol_split(dataset: Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training frame, test frame) of PROTOCOL §2–3."""
    return leave_last_out(dataset.interactions)


# ---------------------------------------------------------------------------------------------
# channels: fit, lists, timings
# ---------------------------------------------------------------------------------------------

def fit_channel(spec: ChannelSpec, data: TrainData) -> tuple[Channel, float]:
    """Fit a fresh channel; seconds from TrainData to ready to answer (artifacts built)."""
    t = time.perf_counter()
    try:
        ch = registry.build(spec, seed=SEED)
        ch.fit(data, progress=False)
        ch.artifacts(data)
    except Exception as exc:
        raise EvaluationError(f"channel {spec.name!r} (model {spec.model!r}): fit failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    return ch, time.perf_counter() - t


def recommend_all(ch: Channel, spec: ChannelSpec, split: Split, k: int, serve: ServeParams | None = None,
                  users: np.ndarray | None = None) -> tuple[Lists, float]:
    """Top-k lists for all evaluated users in batches of 1,024; (lists, seconds)."""
    users = split.users if users is None else users
    serve = serve or spec.serve
    out: Lists = []
    t = time.perf_counter()
    try:
        for s in range(0, len(users), BATCH):
            out.extend(ch.recommend(split.data, users[s:s + BATCH], k, kind=spec.kind, serve=serve))
    except Exception as exc:
        raise EvaluationError(f"channel {spec.name!r}: recommend failed: {type(exc).__name__}: {exc}") from exc
    return out, time.perf_counter() - t


def clean_lists(lists: Lists, split: Split, k: int, name: str) -> Lists:
    """Enforce PROTOCOL §4 (distinct, unseen, ≤ k); a channel violating it is logged, not trusted."""
    out, bad = [], 0
    for (ids, sc), seen in zip(lists, split.seen, strict=True):
        ids = np.asarray(ids, np.int64)
        keep = ~np.isin(ids, seen) & (ids >= 0)
        if len(ids) > 1:
            _, first = np.unique(ids, return_index=True)
            dup = np.ones(len(ids), bool)
            dup[first] = False
            keep &= ~dup
        if not keep.all():
            bad += 1
            ids, sc = ids[keep], np.asarray(sc)[keep]
        out.append((ids[:k], np.asarray(sc, np.float32)[:k]))
    if bad:
        log.warning("channel %s returned seen/duplicate items for %d users (removed)", name, bad)
    return out


def single_latency_users(split: Split) -> np.ndarray:
    """The first 300 evaluated users in a seeded (42) random order (PROTOCOL §5 rec_ms_single)."""
    order = np.random.default_rng(SEED).permutation(split.n_eval)
    return split.users[order[:N_SINGLE]]


def time_single(query: Callable[[np.ndarray], Any], users: np.ndarray) -> float:
    """Mean ms of one-user queries."""
    times = []
    for u in users:
        t = time.perf_counter()
        query(np.array([u], np.int64))
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.mean(times)) if times else 0.0


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

@dataclass
class MergeSetup:
    """Everything the merged row depends on besides the channel lists."""

    weights: dict[str, float]
    quotas: dict[str, int]
    kinds: dict[str, str]
    normalize: str = "rank"
    rank_offset: float = 20.0

    def ask(self, name: str, k: int = K) -> int:
        """Candidates requested from a channel, by the recall server's rule (common.merge.request_size)."""
        total = sum(q for n, q in self.quotas.items() if self.weights.get(n, 0) > 0)
        return request_size(self.kinds[name], self.quotas[name], k, total)


def merge_setup(cfg: ChannelConfig, specs: Sequence[ChannelSpec]) -> MergeSetup:
    return MergeSetup({s.name: s.weight for s in specs}, {s.name: s.quota for s in specs},
                      {s.name: s.kind for s in specs}, cfg.merge.normalize, cfg.merge.rank_offset)


def merge_one(setup: MergeSetup, per_channel: dict[str, tuple[np.ndarray, np.ndarray]], seen: np.ndarray,
              k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """One user's merged list through common.merge.merge (exactly the recall server's call)."""
    outputs = [ChannelOutput(name, ids[: setup.ask(name, k)], sc[: setup.ask(name, k)], setup.weights[name],
                             setup.quotas[name]) for name, (ids, sc) in per_channel.items()]
    m = merge(outputs, k, exclude=seen, normalize=setup.normalize, rank_offset=setup.rank_offset)
    return m.ids, m.scores


def merge_lists(setup: MergeSetup, lists: dict[str, Lists], split: Split, k: int = K,
                users: Sequence[int] | None = None) -> Lists:
    """Merged lists for every evaluated user (or the rows `users`) from per-channel lists."""
    rows = range(split.n_eval) if users is None else users
    names = [n for n in lists if setup.weights.get(n, 0) > 0]
    return [merge_one(setup, {n: lists[n][r] for n in names}, split.seen[r], k) for r in rows]


# ---------------------------------------------------------------------------------------------
# tuning on the validation split
# ---------------------------------------------------------------------------------------------

WEIGHT_GRID = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0]
QUOTA_GRID = [25, 50, 100, 150, 200, 300]
OFFSET_GRID = [1.0, 5.0, 10.0, 20.0, 40.0, 60.0, 100.0, 200.0]
SERVE_GRID: dict[str, dict[str, list]] = {
    "i2i": {"recent_n": [5, 10, 20, 30, 50, 100], "recency_decay": [0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
            "per_anchor": [50, 100, 200]},
    "u2u": {"per_anchor": [10, 20, 50, 100, 200], "neighbor_items": [10, 20, 30, 50, 100]},
}


@dataclass
class TuneState:
    normalize: str
    rank_offset: float
    weights: dict[str, float]
    quotas: dict[str, int]
    serve: dict[str, ServeParams]
    kinds: dict[str, str]

    def key(self) -> str:
        return json.dumps([self.normalize, self.rank_offset, self.weights, self.quotas,
                           {n: s.model_dump() for n, s in self.serve.items()}], sort_keys=True)

    def setup(self) -> MergeSetup:
        return MergeSetup(dict(self.weights), dict(self.quotas), dict(self.kinds), self.normalize, self.rank_offset)


def _coordinates(specs: Sequence[ChannelSpec], normalize_options: Sequence[str], tune_serve: bool,
                 tune_quotas: bool) -> list[tuple[str, list, Callable[[TuneState, Any], TuneState]]]:
    """(label, grid, apply) per tuned coordinate, in search order."""
    def with_(st: TuneState, **kw) -> TuneState:
        return TuneState(**{**st.__dict__, **kw})

    coords: list[tuple[str, list, Callable]] = [
        ("merge.normalize", list(normalize_options), lambda st, v: with_(st, normalize=v)),
        ("merge.rank_offset", OFFSET_GRID, lambda st, v: with_(st, rank_offset=float(v))),
    ]
    for s in specs:
        n = s.name
        coords.append((f"{n}.weight", WEIGHT_GRID, lambda st, v, n=n: with_(st, weights={**st.weights, n: v})))
        if tune_quotas:
            coords.append((f"{n}.quota", QUOTA_GRID, lambda st, v, n=n: with_(st, quotas={**st.quotas, n: v})))
        if tune_serve:
            for key, grid in SERVE_GRID.get(s.kind, {}).items():
                coords.append((f"{n}.serve.{key}", grid, lambda st, v, n=n, key=key: with_(
                    st, serve={**st.serve, n: st.serve[n].model_copy(update={key: v})})))
    return coords


def tune_merge(cfg: ChannelConfig, specs: Sequence[ChannelSpec], dataset: Dataset, train: pd.DataFrame, *,
               tune_serve: bool = True, tune_quotas: bool = True, max_rounds: int = 3,
               normalize_options: Sequence[str] | None = None, progress: bool = True) -> tuple[ChannelConfig, dict]:
    """Coordinate search over merge settings maximising validation HR@50 (ties: NDCG@50, then the
    earlier configuration); returns the config with the chosen values and a record of the search."""
    t0 = time.perf_counter()
    vtrain, vtest = validation_split(train)
    split = make_split(vtrain, vtest, dataset)
    log.info("validation split: %d users, catalog %d", split.n_eval, split.catalog_size)
    fitted = _fit_sources(cfg, specs, split.data, repeats=1, progress=progress, what="fit (validation)")[0]
    depth = max(max(QUOTA_GRID) if tune_quotas else 0, *(s.quota for s in specs), K)
    cache: dict[tuple[str, str], Lists] = {}

    def lists_for(st: TuneState) -> dict[str, Lists]:
        out = {}
        for s in specs:
            key = (s.name, st.serve[s.name].model_dump_json())
            if key not in cache:
                ch = fitted[s.publisher]
                cache[key] = clean_lists(recommend_all(ch, s, split, depth, st.serve[s.name])[0], split, depth, s.name)
            out[s.name] = cache[key]
        return out

    scores: dict[str, tuple[float, float]] = {}

    def score(st: TuneState) -> tuple[float, float]:
        k = st.key()
        if k not in scores:
            mat = lists_to_matrix(merge_lists(st.setup(), lists_for(st), split, K), 50)
            ranks = target_ranks(mat, split.targets)
            scores[k] = (hit_rate(ranks, 50), ndcg(ranks, 50))
        return scores[k]

    # a disabled channel starts at weight 0 (the shipped merge); the search may give it a weight, which enables it
    state = TuneState(cfg.merge.normalize, cfg.merge.rank_offset,
                      {s.name: s.weight if s.enabled else 0.0 for s in specs},
                      {s.name: s.quota for s in specs}, {s.name: s.serve for s in specs},
                      {s.name: s.kind for s in specs})
    baseline = score(state)
    best = baseline
    options = list(normalize_options or ["rank", "minmax"])
    coords = _coordinates(specs, options, tune_serve, tune_quotas)
    history = []
    for rnd in range(max_rounds):
        changed = False
        bar = tqdm(coords, desc=f"tune round {rnd + 1}", unit="coord", disable=not progress, leave=False)
        for label, grid, apply in bar:
            for v in grid:
                cand = apply(state, v)
                sc = score(cand)
                if sc > best:  # strict: ties keep the earlier configuration
                    best, state, changed = sc, cand, True
                    history.append({"round": rnd + 1, "set": label, "value": v, "val_hr@50": sc[0],
                                    "val_ndcg@50": sc[1]})
            bar.set_postfix(hr50=f"{best[0]:.4f}")
        if not changed:
            break
    # apply the chosen values; a weight of 0 means the channel is disabled
    new_channels = []
    for c in cfg.channels:
        if c.name in state.weights:
            w = state.weights[c.name]
            upd: dict[str, Any] = {"quota": state.quotas[c.name], "serve": state.serve[c.name]}
            if w > 0:
                upd["weight"], upd["enabled"] = w, True
            else:
                upd["enabled"] = False
            c = c.model_copy(update=upd)
        new_channels.append(c)
    tuned = cfg.model_copy(update={"channels": new_channels, "merge": cfg.merge.model_copy(
        update={"normalize": state.normalize, "rank_offset": state.rank_offset})})
    record = {
        "split": "validation (PROTOCOL §3: last training interaction of each evaluated user)",
        "n_val_users": split.n_eval, "val_catalog_size": split.catalog_size,
        "baseline_val_hr@50": baseline[0], "baseline_val_ndcg@50": baseline[1],
        "val_hr@50": best[0], "val_ndcg@50": best[1], "trials": len(scores), "seconds": time.perf_counter() - t0,
        "chosen": {"merge": {"normalize": state.normalize, "rank_offset": state.rank_offset},
                   "channels": {n: {"enabled": state.weights[n] > 0, "weight": state.weights[n],
                                    "quota": state.quotas[n], "serve": state.serve[n].model_dump()}
                                for n in state.weights}},
        "steps": history,
    }
    return tuned, record


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------

def select_channels(cfg: ChannelConfig, names: Sequence[str] | None) -> list[ChannelSpec]:
    """The channels to score: the named ones (even if disabled), else every enabled one."""
    if not names:
        specs = cfg.enabled()
    else:
        known = [c.name for c in cfg.channels]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--channels: unknown channel(s) {unknown}; known: {known}")
        specs = [cfg.get(n) for n in names]
    if not specs:
        raise ConfigError("no channel to evaluate (none enabled in the config)")
    return specs


def _fit_sources(cfg: ChannelConfig, specs: Sequence[ChannelSpec], data: TrainData, repeats: int, progress: bool,
                 what: str = "fit") -> tuple[dict[str, Channel], dict[str, list[float]]]:
    """Fit every trained channel the specs need (`from` channels need their source) `repeats` times;
    keep the first fitted object, return all fit seconds."""
    owners: list[ChannelSpec] = []
    for s in specs:
        owner = s if s.trained else cfg.get(s.publisher)
        if owner.name not in [o.name for o in owners]:
            owners.append(owner)
    fitted: dict[str, Channel] = {}
    times: dict[str, list[float]] = {}
    bar = tqdm(total=len(owners) * repeats, desc=what, unit="fit", disable=not progress, leave=False)
    for o in owners:
        times[o.name] = []
        for r in range(repeats):
            bar.set_postfix(channel=o.name)
            ch, sec = fit_channel(o, data)
            times[o.name].append(sec)
            if r == 0:
                fitted[o.name] = ch
            bar.update()
    bar.close()
    return fitted, times


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "pandas", "torch", "faiss-cpu", "implicit", "gensim", "redis", "multirecall"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_as_mapping(cfg: ChannelConfig) -> dict:
    """A ChannelConfig back in the YAML file's shape (channels as name → entry)."""
    chans = {}
    for c in cfg.channels:
        # the identifying and merge fields always, everything else only where it differs from the default
        d = {"kind": c.kind, **({"model": c.model} if c.trained else {"from": c.source}), "enabled": c.enabled,
             "weight": c.weight, "quota": c.quota}
        d.update({k: v for k, v in c.model_dump(by_alias=True, exclude={"name"}, exclude_defaults=True).items()
                  if k not in d and v not in (None, {}, [])})
        chans[c.name] = d
    return {"merge": cfg.merge.model_dump(), "default_k": cfg.default_k, "channels": chans}


def evaluate(dataset: Dataset, cfg: ChannelConfig, channels: Sequence[str] | None = None, repeats: int = 1,
             tune: bool = False, progress: bool = True, curve: bool = True,
             calib: bool = True) -> tuple[dict, dict[str, list[float]]]:
    """Run the protocol; returns (report dict, HR@K curves by row name). `calib=False` skips the
    calibration workload (calib_s is then null; for tests)."""
    if repeats < 1:
        raise ValueError("--repeats must be ≥ 1")
    try:
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(limits=1, user_api="blas")  # PROTOCOL §7: BLAS limited to 1 thread
    except ImportError:  # pragma: no cover
        blas = None
    try:
        return _evaluate(dataset, cfg, channels, repeats, tune, progress, curve, calib)
    finally:
        if blas is not None:
            blas.restore_original_limits()


def liked_row(mat: np.ndarray, split: Split) -> dict[str, float]:
    """{"hr@50_liked": HR@50 over the users whose target is liked}, or {} when no target is (no ratings/events)."""
    if split.events is None:
        return {}
    v = liked_hit_rate(mat, split.targets, split.events, 50)
    return {} if np.isnan(v) else {"hr@50_liked": v, "n_liked_targets": int((split.events == LIKE).sum())}


def _evaluate(dataset: Dataset, cfg: ChannelConfig, channels: Sequence[str] | None, repeats: int, tune: bool,
              progress: bool, curve: bool, calib: bool) -> tuple[dict, dict[str, list[float]]]:
    specs = select_channels(cfg, channels)
    calib_start, load_start = calibrate() if calib else None, os.getloadavg()[0]
    t = time.perf_counter()
    train, test = protocol_split(dataset)
    split = make_split(train, test, dataset)
    prep_s = time.perf_counter() - t
    log.info("%s: %d evaluated users, catalog %d items, prep %.2fs", dataset.name, split.n_eval, split.catalog_size, prep_s)
    if split.n_eval == 0:
        raise DataError(f"{dataset.name}: no user has ≥ 3 interactions; nothing to evaluate")

    tuned_record = None
    if tune:
        cfg, tuned_record = tune_merge(cfg, specs, dataset, train, progress=progress)
        specs = [cfg.get(s.name) for s in specs]
        log.info("tuned on validation: HR@50 %.4f → %.4f", tuned_record["baseline_val_hr@50"], tuned_record["val_hr@50"])

    fitted, fit_times = _fit_sources(cfg, specs, split.data, repeats, progress)
    rows: dict[str, dict[str, Any]] = {}
    lists200: dict[str, Lists] = {}
    curves: dict[str, list[float]] = {}
    single_users = single_latency_users(split)
    long_lists: dict[str, Lists] = {}
    depth_long = max([CURVE_K] + [s.quota for s in specs])
    for s in tqdm(specs, desc="score", unit="channel", disable=not progress, leave=False):
        ch = fitted[s.publisher]
        batch_s, lists = [], None
        for _ in range(repeats):
            out, sec = recommend_all(ch, s, split, K)
            batch_s.append(sec)
            lists = lists or out
        single = [time_single(lambda u, ch=ch, s=s: ch.recommend(split.data, u, K, kind=s.kind, serve=s.serve),
                              single_users) for _ in range(repeats)]
        lists200[s.name] = clean_lists(lists, split, K, s.name)
        mat = lists_to_matrix(lists200[s.name], K)
        rows[s.name] = {"kind": s.kind, **({"model": s.model} if s.trained else {"from": s.source}), "enabled": s.enabled,
                        **summarize(mat, split.targets, split.catalog_size), **liked_row(mat, split),
                        "fit_s": _median(fit_times[s.publisher]),
                        "rec_ms_batch": 1000.0 * _median(batch_s) / split.n_eval, "rec_ms_single": _median(single)}
        if curve:
            long_lists[s.name] = clean_lists(recommend_all(ch, s, split, depth_long)[0], split, depth_long, s.name)
            curves[s.name] = hr_curve(lists_to_matrix(long_lists[s.name], CURVE_K), split.targets, CURVE_KS)

    live = [s for s in specs if s.enabled and s.weight > 0]
    if len(live) >= 1:
        setup = merge_setup(cfg, live)
        rows[MERGED] = _score_merged(setup, live, fitted, split, repeats, single_users)
        rows[MERGED]["fit_s"] = sum(_median(fit_times[n]) for n in {s.publisher for s in live})
        rows[MERGED]["channels"] = [s.name for s in live]
        if curve:
            src = {s.name: long_lists[s.name] for s in live}
            merged_long = merge_lists(setup, src, split, CURVE_K)
            curves[MERGED] = hr_curve(lists_to_matrix(merged_long, CURVE_K), split.targets, CURVE_KS)

    report = {
        "protocol": "shared PROTOCOL.md v1 (leave-last-out by time)",
        "dataset": dataset.name, "n_eval_users": split.n_eval, "catalog_size": split.catalog_size,
        "n_train_interactions": int(len(split.data.item_idx)), "prep_s": prep_s, "repeats": repeats,
        "calib_s": {"start": calib_start, "end": calibrate() if calib else None},
        "load_avg_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "channels": {n: r for n, r in rows.items() if n != MERGED},
        "merged": rows.get(MERGED),
        "tuned": tuned_record,
        "config": config_as_mapping(cfg),
        "versions": library_versions(),
        "command": None,  # set by the CLI
    }
    return report, curves


def _score_merged(setup: MergeSetup, live: Sequence[ChannelSpec], fitted: dict[str, Channel], split: Split,
                  repeats: int, single_users: np.ndarray) -> dict[str, Any]:
    """The merged row: channels asked for request_size(...) candidates (as the recall server does), merged by
    common.merge to k=200; timed end to end (channels run one after the other here)."""
    batch_s, merged = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        per: dict[str, Lists] = {}
        for s in live:
            per[s.name] = recommend_all(fitted[s.publisher], s, split, setup.ask(s.name))[0]
        out = merge_lists(setup, per, split, K)
        batch_s.append(time.perf_counter() - t)
        merged = merged or out
    pos = {int(u): r for r, u in enumerate(split.users)}

    def one(u: np.ndarray) -> None:
        r = pos[int(u[0])]
        per = {s.name: fitted[s.publisher].recommend(split.data, u, setup.ask(s.name), kind=s.kind, serve=s.serve)[0]
               for s in live}
        merge_one(setup, per, split.seen[r], K)

    single = [time_single(one, single_users) for _ in range(repeats)]
    mat = lists_to_matrix(merged, K)
    return {**summarize(mat, split.targets, split.catalog_size), **liked_row(mat, split),
            "rec_ms_batch": 1000.0 * _median(batch_s) / split.n_eval, "rec_ms_single": _median(single),
            "merge": {"normalize": setup.normalize, "rank_offset": setup.rank_offset,
                      "weights": setup.weights, "quotas": setup.quotas}}


# ---------------------------------------------------------------------------------------------
# report files
# ---------------------------------------------------------------------------------------------

def _f(x: float | None, nd: int = 3) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def report_markdown(report: dict) -> str:
    """report.md: the quality/timing table, with the PROTOCOL §8 reference rows on ML-100K."""
    lines = [f"# Recall evaluation — {report['dataset']}", "",
             f"Protocol: {report['protocol']}. {report['n_eval_users']:,} evaluated users, "
             f"catalog {report['catalog_size']:,} items, prep {report['prep_s']:.2f} s, "
             f"timings median of {report['repeats']}.",
             f"calib_s {_f(report['calib_s']['start'])} (start) / {_f(report['calib_s']['end'])} (end); "
             f"1-min load average {report['load_avg_1m']['start']:.2f} / {report['load_avg_1m']['end']:.2f}.", ""]
    if report.get("tuned"):
        t = report["tuned"]
        lines += [f"Merge settings tuned on the **validation split** only ({t['n_val_users']} users): validation "
                  f"HR@50 {t['baseline_val_hr@50']:.4f} → {t['val_hr@50']:.4f} over {t['trials']} configurations; "
                  "chosen values are in report.json (`tuned.chosen`) and tuned_channels.yaml.", ""]
    rows = list(report["channels"].items()) + ([(MERGED, report["merged"])] if report.get("merged") else [])
    liked = any("hr@50_liked" in r for _, r in rows)  # the column only where the targets have like events
    if liked:
        n = next(r["n_liked_targets"] for _, r in rows if "n_liked_targets" in r)
        lines += [f"HR@50 liked: HR@50 over the {n:,} evaluated users whose target is liked (rating ≥ 4 or a like "
                  "event).", ""]
    lines += ["| channel | kind | HR@50 | " + ("HR@50 liked | " if liked else "") + "HR@200 | NDCG@50 | Coverage@50 | "
              "fit s | rec ms/user (batch) | rec ms (single) |", "|---|---|---|" + ("---|" if liked else "") +
              "---|---|---|---|---|---|"]
    for name, r in rows:
        label = f"**{name}**" if name == MERGED else name
        kind = r.get("kind", "+".join(r.get("channels", [])))
        if "from" in r:
            kind += f" (from {r['from']})"
        liked_cell = f"{_f(r.get('hr@50_liked'))} | " if liked else ""
        lines.append(f"| {label} | {kind} | {_f(r['hr@50'])} | {liked_cell}{_f(r['hr@200'])} | {_f(r['ndcg@50'])} | "
                     f"{_f(r['coverage@50'])} | {_f(r['fit_s'], 2)} | {_f(r['rec_ms_batch'], 3)} | "
                     f"{_f(r['rec_ms_single'], 3)} |")
    if report["dataset"] == "ml-100k":
        lines += ["", "Reference figures (shared PROTOCOL.md §8, same split, measured earlier on another run — "
                  "compare timings only as `fit_s / calib_s`):", "",
                  "| reference | HR@50 | HR@200 | NDCG@50 | Coverage@50 | fit s |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} | {e:.2f} |" for n, a, b, c, d, e in REFERENCE_ML100K]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
              *([f"Command: `{report['command']}`", ""] if report.get("command") else [])]
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """recall_at_k.png: HR@K for K = 10..500, one curve per channel plus merged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, ys in curves.items():
        ax.plot(CURVE_KS, ys, label=name, lw=2.6 if name == MERGED else 1.4, color="black" if name == MERGED else None)
    for k in (50, 200):
        ax.axvline(k, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("K")
    ax.set_ylabel("HR@K (= Recall@K, one target)")
    ax.set_title(title)
    ax.set_xlim(0, CURVE_K)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, curves: dict[str, list[float]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(report_markdown(report))
    if curves:
        plot_curves(curves, out / "recall_at_k.png", f"HR@K — {report['dataset']} (PROTOCOL v1)")
    if report.get("tuned"):
        (out / "tuned_channels.yaml").write_text(
            "# merge settings tuned on the validation split by `python -m trainer evaluate --tune`\n"
            + yaml.safe_dump(report["config"], sort_keys=False))


def run_evaluate_cli(data: Path, out: Path, config: Path | None, channels: str | None, repeats: int,
                     tune: bool) -> int:
    """CLI entry point; returns the exit code (2 for bad input, 1 for a failing channel)."""
    from common.settings import get_settings

    try:
        cfg_path = config or get_settings().channels_config
        cfg = load_config(cfg_path)
        registry.validate_params(cfg, str(cfg_path))
        names = [n.strip() for n in channels.split(",") if n.strip()] if channels else None
        select_channels(cfg, names)
        dataset = load_dataset(data)
        report, curves = evaluate(dataset, cfg, names, repeats=repeats, tune=tune)
        report["command"] = " ".join(["python -m trainer evaluate", f"--data {data}", f"--out {out}",
                                      *([f"--config {config}"] if config else []),
                                      *([f"--channels {channels}"] if channels else []),
                                      f"--repeats {repeats}", *(["--tune"] if tune else [])])
    except (ConfigError, DataError, ValueError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EvaluationError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_report(report, curves, Path(out))
    print(report_markdown(report))
    print(f"report written to {Path(out).resolve()}/ (report.json, report.md, recall_at_k.png)")
    return 0
