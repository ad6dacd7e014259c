"""The offline evaluator: PROTOCOL metrics on hand-computed toys, PROTOCOL's split, the merged row
through common.merge, tuning on validation only, and the CLI's report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.channel_config import ConfigError, parse_config
from common.merge import ChannelOutput, merge, request_size
from trainer.channels import registry
from trainer.data.io import Dataset, load_dataset
from trainer.evaluate import (
    CURVE_KS,
    evaluate,
    make_split,
    protocol_split,
    report_markdown,
    run_evaluate_cli,
    select_channels,
    tune_merge,
)
from trainer.metrics import coverage, hit_rate, lists_to_matrix, ndcg, summarize, target_ranks

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"

# Toy log (user, item, timestamp). Hand-worked under PROTOCOL §2–4:
#  u1: 1,2,3           → target 3, train {1,2}
#  u2: 1,2,4,5 (4 and 5 tied at t=30: the higher id is last) → target 5, train {1,2,4}
#  u3: 1,3,6           → target 6, which nobody has in training: outside the catalog, a miss
#  u4: 2,3,2(dup),5    → the duplicate is dropped; target 5, train {2,3}
#  u5: 4,3 (2 rows) and u6: 5 (1 row) stay whole in training and are not evaluated.
# Training counts: 1→3, 2→3, 3→3, 4→2, 5→1; catalog {1..5}. MostPopular (ties by ascending id):
#  u1 [3,4,5] rank 1; u2 [3,5] rank 2; u3 [2,4,5] miss; u4 [1,4,5] rank 3.
TOY = [(1, 1, 10), (1, 2, 20), (1, 3, 30),
       (2, 5, 30), (2, 1, 10), (2, 2, 20), (2, 4, 30),
       (3, 1, 5), (3, 3, 6), (3, 6, 7),
       (4, 2, 1), (4, 3, 2), (4, 2, 3), (4, 5, 4),
       (5, 4, 1), (5, 3, 2),
       (6, 5, 1)]
TOY_POPULAR = {"hr@50": 0.75, "hr@200": 0.75, "ndcg@50": (1 + 1 / math.log2(3) + 1 / math.log2(4)) / 4,
               "coverage@50": 1.0}

CONFIG = {
    "merge": {"normalize": "rank", "rank_offset": 20},
    "channels": {
        "popular": {"kind": "list", "model": "popular", "weight": 0.4, "quota": 2,
                    "params": {"top_k": 2000, "categories": False}},
        "itemcf": {"kind": "i2i", "model": "itemcf", "weight": 1.0, "quota": 200},
        "mf": {"kind": "u2i", "model": "mf", "weight": 0.7, "quota": 20, "params": {"dim": 8, "epochs": 3}},
        "usercf": {"kind": "u2u", "model": "usercf", "weight": 0.5, "quota": 200, "enabled": False},
    },
}


def toy_dataset() -> Dataset:
    df = pd.DataFrame(TOY, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": str, "item_id": str})
    return Dataset(interactions=df, name="toy")


# ---- metrics ---------------------------------------------------------------------------------

def test_metrics_on_known_ranks():
    # five users, targets at ranks 1, 3, 60 (beyond 50), absent, and outside the catalog (-1)
    filler = list(range(100, 400))
    lists = [np.array([7] + filler[:99]), np.array([100, 101, 8] + filler[3:100]),
             np.array(filler[:59] + [9] + filler[59:150]), np.array(filler[:10]), np.array(filler[:50])]
    targets = np.array([7, 8, 9, 10, -1])
    mat = lists_to_matrix(lists, 200)
    assert mat.shape == (5, 200) and mat[3, 10] == -1  # short lists are padded with misses
    ranks = target_ranks(mat, targets)
    assert ranks.tolist() == [1, 3, 60, math.inf, math.inf]
    assert hit_rate(ranks, 50) == pytest.approx(2 / 5)
    assert hit_rate(ranks, 200) == pytest.approx(3 / 5)
    assert ndcg(ranks, 50) == pytest.approx((1.0 + 1 / math.log2(4)) / 5)
    # top-50 union: 7, 8, filler[0..49], 100..149 → {7, 8} ∪ {100..149}: 52 items of a 1000-item catalog
    assert coverage(mat, 50, 1000) == pytest.approx(52 / 1000)
    s = summarize(mat, targets, 1000)
    assert s == pytest.approx({"hr@50": 0.4, "hr@200": 0.6, "ndcg@50": 0.3, "coverage@50": 0.052})


def test_padding_never_matches_an_out_of_catalog_target():
    mat = lists_to_matrix([np.array([1, 2])], 5)
    assert target_ranks(mat, np.array([-1]))[0] == math.inf


# ---- the split ---------------------------------------------------------------------------------

def test_split_is_protocols_leave_last_out():
    ds = toy_dataset()
    train, test = protocol_split(ds)
    split = make_split(train, test, ds)
    ids = split.data.user_map.ids
    assert [ids[u] for u in split.users] == ["1", "2", "3", "4"]  # u5, u6 (< 3 rows) not evaluated
    items = split.data.item_map
    assert sorted(items.ids, key=int) == ["1", "2", "3", "4", "5"]  # catalog = training items only
    assert split.catalog_size == 5
    assert split.targets.tolist() == [items.get("3"), items.get("5"), -1, items.get("5")]
    seen = {ids[u]: sorted(items.ids[i] for i in s) for u, s in zip(split.users, split.seen, strict=True)}
    assert seen == {"1": ["1", "2"], "2": ["1", "2", "4"], "3": ["1", "3"], "4": ["2", "3"]}
    assert len(split.data.item_idx) == len(TOY) - 1 - 4  # one duplicate dropped, four test rows held out


def test_popular_channel_scores_match_hand_computation():
    cfg = parse_config(CONFIG)
    report, curves = evaluate(toy_dataset(), cfg, ["popular"], progress=False, calib=False)
    assert report["n_eval_users"] == 4 and report["catalog_size"] == 5
    row = report["channels"]["popular"]
    for key, want in TOY_POPULAR.items():
        assert row[key] == pytest.approx(want), key
    assert row["fit_s"] >= 0 and row["rec_ms_batch"] > 0 and row["rec_ms_single"] > 0
    assert curves["popular"][0] == pytest.approx(0.75) and len(curves["popular"]) == len(CURVE_KS)



def test_liked_column_is_hr50_over_liked_targets_only():
    """Ratings on the toy log's targets: u1 → 3 rated 5 (liked, rank 1), u2 → 5 rated 2 (not liked, rank 2),
    u3 → 6 rated 4 (liked, outside the catalog: miss), u4 → 5 rated 4 (liked, rank 3): HR@50 liked = 2/3, while
    HR@50 over everyone stays 3/4. Without ratings the column is absent."""
    df = toy_dataset().interactions
    rating = {("1", "3"): 5.0, ("2", "5"): 2.0, ("3", "6"): 4.0, ("4", "5"): 4.0}
    df["rating"] = [rating.get((u, i), 3.0) for u, i in zip(df["user_id"], df["item_id"], strict=True)]
    cfg = parse_config(CONFIG)
    report, _ = evaluate(Dataset(interactions=df, name="toy"), cfg, ["popular"], progress=False, curve=False,
                         calib=False)
    row, merged = report["channels"]["popular"], report["merged"]
    assert row["hr@50"] == pytest.approx(0.75) and row["hr@50_liked"] == pytest.approx(2 / 3)
    assert row["n_liked_targets"] == 3 and merged["hr@50_liked"] == pytest.approx(2 / 3)
    md = report_markdown(report)
    assert "| HR@50 | HR@50 liked | HR@200 |" in md and "| popular | list | 0.750 | 0.667 | 0.750 |" in md
    plain, _ = evaluate(toy_dataset(), cfg, ["popular"], progress=False, curve=False, calib=False)
    assert "hr@50_liked" not in plain["channels"]["popular"] and "HR@50 liked" not in report_markdown(plain)

# ---- the merged row ------------------------------------------------------------------------

def _direct_merged(cfg, ds, names):
    """The merged lists computed here, independently, with common.merge.merge."""
    train, test = protocol_split(ds)
    split = make_split(train, test, ds)
    chans = {}
    total = sum(cfg.get(n).quota for n in names)
    for n in names:
        spec = cfg.get(n)
        ch = registry.build(spec)
        ch.fit(split.data)
        chans[n] = (ch, spec)
    out = []
    for r, u in enumerate(split.users):
        outputs = []
        for n, (ch, spec) in chans.items():
            ask = request_size(spec.kind, spec.quota, 200, total)
            assert ask == (20 if spec.kind == "u2i" else max(spec.quota, 200))  # the server's rule
            ids, sc = ch.recommend(split.data, np.array([u]), ask, kind=spec.kind, serve=spec.serve)[0]
            outputs.append(ChannelOutput(n, ids, sc, spec.weight, spec.quota))
        m = merge(outputs, 200, exclude=split.seen[r], normalize=cfg.merge.normalize, rank_offset=cfg.merge.rank_offset)
        out.append(m.ids)
    return summarize(lists_to_matrix(out, 200), split.targets, split.catalog_size)


def test_request_size_is_the_servers_rule():
    assert request_size("i2i", 50, 200, 1000) == 200 and request_size("list", 300, 200, 1000) == 300
    assert request_size("u2u", 150, 200, 150) == 200
    assert request_size("u2i", 25, 200, 1000) == 25  # the quotas fill k: a vector search asks for its quota
    assert request_size("u2i", 25, 200, 125) == 100  # ... plus what they cannot fill


@pytest.fixture(scope="module")
def synth_dataset(tmp_path_factory) -> Dataset:
    from trainer.synth import write_synthetic

    d = write_synthetic(tmp_path_factory.mktemp("synth"), n_users=300, n_items=200, n_clicks=6000, progress=False)
    return load_dataset(d)


@pytest.mark.parametrize("rank_offset,normalize", [(20, "rank"), (1, "rank"), (20, "minmax")])
def test_merged_row_is_common_merge(synth_dataset, rank_offset, normalize):
    raw = json.loads(json.dumps(CONFIG))
    raw["merge"] = {"normalize": normalize, "rank_offset": rank_offset}
    cfg = parse_config(raw)
    report, curves = evaluate(synth_dataset, cfg, None, progress=False, calib=False)
    assert set(report["channels"]) == {"popular", "itemcf", "mf"}  # usercf is disabled
    merged = report["merged"]
    assert merged["channels"] == ["popular", "itemcf", "mf"]
    want = _direct_merged(cfg, synth_dataset, ["popular", "itemcf", "mf"])
    for key in want:
        assert merged[key] == pytest.approx(want[key]), key
    assert merged["merge"]["weights"] == {"popular": 0.4, "itemcf": 1.0, "mf": 0.7}
    assert "merged" in curves


def test_explicit_channel_list_includes_disabled_and_rejects_unknown():
    cfg = parse_config(CONFIG)
    assert [s.name for s in select_channels(cfg, ["usercf"])] == ["usercf"]
    with pytest.raises(ConfigError, match="nosuch"):
        select_channels(cfg, ["itemcf", "nosuch"])


# ---- tuning --------------------------------------------------------------------------------------

def _move_test_targets(ds: Dataset) -> Dataset:
    """The same log with every evaluated user's test item replaced (training and validation unchanged)."""
    _, test = protocol_split(ds)
    df = ds.interactions.copy()
    pairs = pd.MultiIndex.from_frame(test[["user_id", "item_id"]])
    hit = pd.MultiIndex.from_frame(df[["user_id", "item_id"]]).isin(pairs)
    df.loc[hit, "item_id"] = "999999"
    return Dataset(interactions=df, users=ds.users, items=ds.items, name=ds.name)


def test_tuning_uses_the_validation_split_only(synth_dataset):
    cfg = parse_config(CONFIG)
    specs = select_channels(cfg, ["popular", "itemcf"])
    kw = dict(tune_serve=False, tune_quotas=False, max_rounds=1, normalize_options=["rank"], progress=False)
    train, _ = protocol_split(synth_dataset)
    tuned, rec = tune_merge(cfg, specs, synth_dataset, train, **kw)
    assert rec["split"].startswith("validation") and rec["val_hr@50"] >= rec["baseline_val_hr@50"]
    assert rec["trials"] > 10
    chosen = rec["chosen"]
    assert tuned.merge.rank_offset == chosen["merge"]["rank_offset"]
    for n, c in chosen["channels"].items():
        assert tuned.get(n).enabled == c["enabled"]
        if c["enabled"]:
            assert tuned.get(n).weight == c["weight"]
    # the test targets never reach the search: moving them all changes nothing it chooses
    moved = _move_test_targets(synth_dataset)
    train2, test2 = protocol_split(moved)
    assert (test2["item_id"] == "999999").all()
    _, rec2 = tune_merge(cfg, specs, moved, train2, **kw)
    assert rec2["chosen"] == chosen and rec2["val_hr@50"] == rec["val_hr@50"]


def test_tuning_starts_a_disabled_channel_at_weight_0_and_enables_it_when_chosen(synth_dataset):
    """A disabled channel is not in the baseline merge; when the search gives it a weight it is enabled."""
    raw = json.loads(json.dumps(CONFIG))
    raw["channels"]["itemcf"]["enabled"] = False  # far better than popular alone on this log
    cfg = parse_config(raw)
    specs = select_channels(cfg, ["popular", "itemcf"])
    kw = dict(tune_serve=False, tune_quotas=False, max_rounds=1, normalize_options=["rank"], progress=False)
    train, _ = protocol_split(synth_dataset)
    tuned, rec = tune_merge(cfg, specs, synth_dataset, train, **kw)
    alone, rec_alone = tune_merge(cfg, select_channels(cfg, ["popular"]), synth_dataset, train,
                                  **{**kw, "max_rounds": 1})
    assert rec["baseline_val_hr@50"] == rec_alone["baseline_val_hr@50"]  # itemcf not in the baseline
    assert rec["chosen"]["channels"]["itemcf"]["enabled"] and tuned.get("itemcf").enabled
    assert tuned.get("itemcf").weight == rec["chosen"]["channels"]["itemcf"]["weight"] > 0
    assert rec["val_hr@50"] > rec["baseline_val_hr@50"]


# ---- CLI and report files --------------------------------------------------------------------------

def _write(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "toy"
    data.mkdir()
    pd.DataFrame(TOY, columns=["user_id", "item_id", "timestamp"]).to_csv(data / "interactions.csv", index=False)
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(json.dumps(CONFIG))  # JSON is YAML
    return data, cfg


def test_cli_writes_report_files(tmp_path):
    data, cfg = _write(tmp_path)
    out = tmp_path / "report"
    assert run_evaluate_cli(data, out, cfg, "popular,itemcf", repeats=2, tune=False) == 0
    rep = json.loads((out / "report.json").read_text())
    assert {"dataset", "n_eval_users", "catalog_size", "prep_s", "calib_s", "channels", "merged", "config",
            "versions"} <= set(rep)
    assert rep["dataset"] == "toy" and rep["repeats"] == 2 and rep["calib_s"]["start"] > 0
    for key, want in TOY_POPULAR.items():
        assert rep["channels"]["popular"][key] == pytest.approx(want)
    assert {"hr@50", "hr@200", "ndcg@50", "coverage@50", "fit_s", "rec_ms_batch", "rec_ms_single"} <= set(rep["merged"])
    md = (out / "report.md").read_text()
    assert "| popular | list |" in md and "**merged**" in md and "MostPopular" not in md  # refs only for ml-100k
    assert (out / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_clear(tmp_path, capsys):
    data, cfg = _write(tmp_path)
    assert run_evaluate_cli(data, tmp_path / "o", cfg, "itemcf,nosuch", 1, False) == 2
    assert "nosuch" in capsys.readouterr().err
    assert run_evaluate_cli(tmp_path / "missing", tmp_path / "o", cfg, None, 1, False) == 2
    assert "not a directory" in capsys.readouterr().err
    (data / "interactions.csv").write_text("user_id,item_id\n1,2\n")
    assert run_evaluate_cli(data, tmp_path / "o", cfg, None, 1, False) == 2
    err = capsys.readouterr().err
    assert "interactions.csv" in err and "timestamp" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (ML100K / "interactions.csv").exists(), reason="shared ml-100k not available")
def test_ml100k_most_popular_reproduces_protocol_reference():
    """PROTOCOL §8's MostPopular row (0.143 / 0.379 / 0.045 / 0.155) on 943 users and a 1,679-item catalog."""
    cfg = parse_config(CONFIG)
    report, _ = evaluate(load_dataset(ML100K), cfg, ["popular"], progress=False, curve=False, calib=False)
    assert report["n_eval_users"] == 943 and report["catalog_size"] == 1679
    row = report["channels"]["popular"]
    assert row["hr@50"] == pytest.approx(0.143, abs=5e-4)
    assert row["hr@200"] == pytest.approx(0.379, abs=5e-4)
    assert row["ndcg@50"] == pytest.approx(0.045, abs=5e-4)
    assert row["coverage@50"] == pytest.approx(0.155, abs=5e-4)
