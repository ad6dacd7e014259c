"""The synthetic generator: determinism, version-1 columns unchanged, schema (through load_dataset), session /
popularity / freshness shape, brands, markets and events with real signal, real collaborative signal (ItemCF
clearly beats popularity), the cached default dataset and the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import trainer.synth as synth
from common.channel_config import ChannelSpec
from tests.conftest import ROOT
from trainer.channels import registry
from trainer.data.events import PURCHASE
from trainer.data.io import load_dataset
from trainer.data.sessions import split_sessions
from trainer.data.split import leave_last_out
from trainer.data.train_data import TrainData
from trainer.synth import ensure_default_dataset, write_synthetic


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """3k users, 1.5k items, 60k clicks (parquet), loaded."""
    out = write_synthetic(tmp_path_factory.mktemp("synth") / "medium", 3000, 1500, 60_000, seed=42, progress=False)
    return out, load_dataset(out)


def read_raw(path) -> pd.DataFrame:
    return pq.read_table(path / "interactions.parquet").to_pandas()


def column_digests(path) -> dict[str, str]:
    """A short sha256 of every column of the three tables (values as strings, in row order)."""
    out = {}
    for name in ("interactions", "users", "items"):
        df = pq.read_table(path / f"{name}.parquet").to_pandas()
        for c in df.columns:
            out[f"{name}.{c}"] = hashlib.sha256(df[c].astype(str).str.cat(sep="\n").encode()).hexdigest()[:16]
    return out


# computed with generator version 1 (before brand, market and event existed): those columns must not move
V1_SMALL = {  # 400 users, 200 items, 5,000 clicks, seed 7
    "interactions.user_id": "21eca6ab0b08fd66", "interactions.item_id": "3697d621283511ab",
    "interactions.timestamp": "8322f65f09647f45", "interactions.environment": "0aba754aed65ef10",
    "interactions.region": "4ffd963e049ec30c", "users.user_id": "0a02567ffb8af9fd",
    "users.age_group": "77470767e6ad6081", "users.gender": "e4c8ed9da39565d2", "users.region": "98091f81a1202037",
    "users.device": "c70e46ee9be8b4e8", "items.item_id": "e19081590f6cca09", "items.category_id": "de8de8daeef4a070",
    "items.words_count": "703cc6d8eab548dd", "items.created_at_ts": "5232f69f90e5a9b0",
    "items.tags": "eb9e20456d234ee4"}
V1_CHUNKED = {  # 1,000 users, 300 items, 20,000 clicks, seed 1, CHUNK_CLICKS 3,000
    "interactions.user_id": "7a1f1f0ded666ae7", "interactions.item_id": "b7fca70402c1fc3a",
    "interactions.timestamp": "46b2e77dfa4f252d", "interactions.environment": "8f5edae7e77c5f84",
    "interactions.region": "d28d59aad66e94db", "users.user_id": "8e2cdcf9a82739c1",
    "users.age_group": "3c4134e79f75118f", "users.gender": "46358ff3c7faffdd", "users.region": "4c4dc2807dc6f918",
    "users.device": "1df51d8bb978ddb3", "items.item_id": "4925363b619a1d78", "items.category_id": "0699d9e668db4ba8",
    "items.words_count": "41a863bd92e1c8cb", "items.created_at_ts": "9e2a54875aa2a36b",
    "items.tags": "3a6f1ae68f31715e"}


def test_version_1_columns_are_unchanged(tmp_path, monkeypatch):
    got = column_digests(write_synthetic(tmp_path / "a", 400, 200, 5000, seed=7, progress=False))
    assert {k: got[k] for k in V1_SMALL} == V1_SMALL
    assert set(got) - set(V1_SMALL) == {"interactions.event", "items.brand", "items.market"}
    monkeypatch.setattr(synth, "CHUNK_CLICKS", 3000)
    got = column_digests(write_synthetic(tmp_path / "b", 1000, 300, 20_000, seed=1, progress=False))
    assert {k: got[k] for k in V1_CHUNKED} == V1_CHUNKED


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic(tmp_path / "a", 400, 200, 5000, seed=7, progress=False)
    b = write_synthetic(tmp_path / "b", 400, 200, 5000, seed=7, progress=False)
    c = write_synthetic(tmp_path / "c", 400, 200, 5000, seed=8, progress=False)
    pd.testing.assert_frame_equal(read_raw(a), read_raw(b))
    for name in ("users", "items"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"))
    assert not read_raw(a)["item_id"].equals(read_raw(c)["item_id"])


def test_chunked_output_is_exact_and_ordered(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK_CLICKS", 3000)
    out = write_synthetic(tmp_path / "d", 1000, 300, 20_000, seed=1, progress=False)
    meta = pq.ParquetFile(out / "interactions.parquet").metadata
    assert meta.num_rows == 20_000 and meta.num_row_groups >= 5  # streamed in row groups, one per chunk
    df = read_raw(out)
    key = df["user_id"].to_numpy() * 10**10 + df["timestamp"].to_numpy()
    assert np.all(np.diff(key) >= 0)  # grouped by user, time-ordered within a user
    assert df["user_id"].between(1, 1000).all() and df["item_id"].between(1, 300).all()


def test_schema_loads_through_load_dataset(medium):
    out, ds = medium
    inter, users, items = ds.interactions, ds.users, ds.items
    assert len(inter) == 60_000
    assert ds.context_columns == ["environment", "region"]  # `event` is not a context column
    assert set(inter["environment"]) <= {"app", "web", "miniapp"}
    assert set(inter["event"]) == {"click", "like", "purchase"}
    assert len(users) == 3000 and {"age_group", "gender", "region", "device"} <= set(users.columns)
    assert len(items) == 1500 and {"category_id", "words_count", "created_at_ts", "tags", "brand",
                                   "market"} <= set(items.columns)
    assert ds.category_column == "category_id"
    assert 20 <= items["category_id"].nunique() <= 50
    assert items["tags"].str.contains("|", regex=False).mean() > 0.3  # multi-valued, '|'-joined
    assert (items["words_count"] > 0).all()
    assert set(inter["user_id"]) <= set(users.index) and set(inter["item_id"]) <= set(items.index)
    span = inter["timestamp"].max() - inter["timestamp"].min()
    assert 25 * 86400 < span < 31 * 86400
    # an item is only clicked after it was published
    created = items["created_at_ts"].reindex(inter["item_id"]).to_numpy()
    assert (created < inter["timestamp"].to_numpy()).all()
    # the home region dominates each user's clicks
    home = users["region"].astype(str).reindex(inter["user_id"]).to_numpy()
    assert (home == inter["region"].to_numpy()).mean() > 0.85
    assert "n_clicks" in (out / "synth.json").read_text()


def test_csv_format_matches_parquet(tmp_path):
    p = load_dataset(write_synthetic(tmp_path / "p", 300, 120, 3000, seed=3, progress=False))
    c = load_dataset(write_synthetic(tmp_path / "c", 300, 120, 3000, seed=3, fmt="csv", progress=False))
    assert (tmp_path / "c" / "interactions.csv").exists() and not (tmp_path / "c" / "interactions.parquet").exists()
    pd.testing.assert_frame_equal(p.interactions, c.interactions)
    assert list(p.items["tags"]) == list(c.items["tags"])
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic(tmp_path / "x", 10, 20, 10, fmt="json")


def test_sessions_popularity_and_freshness(medium):
    _, ds = medium
    inter = ds.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    user = inter["user_id"].to_numpy()
    ts = inter["timestamp"].to_numpy()
    cat = ds.items["category_id"].reindex(inter["item_id"]).to_numpy()
    same_user = user[1:] == user[:-1]
    gap = np.diff(ts)[same_user]
    # bursts minutes apart, and hours to days between sessions
    assert (gap < 600).mean() > 0.5
    assert (gap > 3 * 3600).mean() > 0.1
    # clicks inside a session share a category far more than the base rate
    in_session = (np.diff(ts) < 600) & same_user
    same_cat = cat[1:] == cat[:-1]
    shares = np.bincount(pd.factorize(cat)[0]) / len(cat)
    assert same_cat[in_session].mean() > 0.6 > 3 * (shares**2).sum()
    # heavy-tailed popularity: the top 1 % of items get > 5 % of the clicks, the top item > 10× the median item
    counts = np.sort(inter["item_id"].value_counts().reindex(ds.items.index, fill_value=0).to_numpy())[::-1]
    assert counts[: len(ds.items) // 100].sum() / counts.sum() > 0.05
    assert counts[0] > 10 * np.median(counts)
    # freshness: clicks mostly land within days of an item's publication
    age_days = (ts - ds.items["created_at_ts"].reindex(inter["item_id"]).to_numpy()) / 86400
    assert np.median(age_days) < 4 and (age_days < 2).mean() > 0.25
    # re-clicks of the same item exist (for dedupe) but are rare
    dup = inter.duplicated(["user_id", "item_id"]).mean()
    assert 0 < dup < 0.2


def test_brands_and_markets(medium):
    out, ds = medium
    items = ds.items
    assert ds.item_field_column("brand") == "brand" and ds.item_field_column("market") == "market"
    assert (items.groupby("brand")["category_id"].nunique() == 1).all()  # a brand lives in one category
    assert items.groupby("category_id")["brand"].nunique().max() >= 2
    assert set(items["market"]) == {f"m{m}" for m in range(1, synth.N_MARKETS + 1)}
    meta = json.loads((out / "synth.json").read_text())
    assert meta["brands"] >= items["brand"].nunique() and meta["markets"] == synth.N_MARKETS == 7
    td = TrainData.from_frame(ds.interactions, items=items)
    assert td.item_field("brand").min() >= 0 and len(td.item_field_names("market")) == 7
    # consecutive clicks of a session share a brand far above the base rate
    inter = ds.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    sess = split_sessions(pd.factorize(inter["user_id"])[0], inter["timestamp"].to_numpy())
    brand = items["brand"].reindex(inter["item_id"]).to_numpy()
    share = inter.assign(b=brand)["b"].value_counts(normalize=True).to_numpy()
    assert (brand[1:] == brand[:-1])[sess[1:] == sess[:-1]].mean() > 5 * (share**2).sum()


def test_purchases_follow_clicks_in_their_session(medium):
    out, ds = medium
    inter = ds.interactions
    counts = inter["event"].value_counts()
    assert json.loads((out / "synth.json").read_text())["events"] == {
        "click": counts["click"], "like": counts["like"], "cart": 0, "purchase": counts["purchase"]}
    assert 0.02 < counts["purchase"] / len(inter) < 0.08 and 0.04 < counts["like"] / len(inter) < 0.15
    # on the raw log and on the deduplicated training view alike, no purchase opens its (30-minute) session
    raw = inter.sort_values(["user_id", "timestamp"], kind="stable")
    sess = split_sessions(pd.factorize(raw["user_id"])[0], raw["timestamp"].to_numpy())
    opens = np.r_[True, sess[1:] != sess[:-1]]
    bought = (raw["event"] == "purchase").to_numpy()
    assert bought.sum() > 1000 and not opens[bought].any()
    td = TrainData.from_frame(inter, ds.users, ds.items)
    assert (td.event == PURCHASE).sum() == bought.sum()  # purchases are first clicks of their pair: none deduped
    s = td.sessions
    rank = np.arange(len(td.ts)) - s.starts[s.ids]
    assert (rank[td.event == PURCHASE] > 0).all()
    assert (s.conversion >= 0).mean() > 0.2
    # the purchase stays on the session's topic, and favours items of the user's home market
    cat = ds.items["category_id"].reindex(raw["item_id"]).to_numpy()
    opening_cat = cat[np.flatnonzero(opens)][sess]
    assert (cat == opening_cat)[bought].mean() > (cat == opening_cat)[~opens].mean()
    home = (ds.users["region"].reindex(raw["user_id"]).to_numpy().astype(int) - 1) // synth.REGIONS_PER_MARKET + 1
    market = ds.items["market"].reindex(raw["item_id"]).str[1:].astype(int).to_numpy()
    assert (market == home)[bought].mean() > 1.3 * (market == home).mean()


def hit_rate(channel, td: TrainData, users: np.ndarray, targets: np.ndarray, k: int = 50) -> float:
    recs = channel.recommend(td, users, k)
    return float(np.mean([t in ids[:k] for (ids, _), t in zip(recs, targets, strict=True)]))


def test_itemcf_clearly_beats_popularity(medium):
    _, ds = medium
    train, test = leave_last_out(ds.interactions)
    td = TrainData.from_frame(train, items=ds.items)
    users = td.user_map.lookup(test["user_id"])
    targets = td.item_map.lookup(test["item_id"])  # -1 (never a hit) for items first seen in the test row
    assert len(users) > 2500 and (users >= 0).all()
    pop = registry.build(ChannelSpec(name="popular", kind="list", model="popular"))
    pop.fit(td)
    icf = registry.build(ChannelSpec(name="itemcf", kind="i2i", model="itemcf"))
    icf.fit(td)
    hr_pop, hr_icf = hit_rate(pop, td, users, targets), hit_rate(icf, td, users, targets)
    assert hr_pop > 0.03  # popularity is a real (weak) baseline here
    assert hr_icf >= 1.5 * hr_pop, (hr_icf, hr_pop)


def test_ensure_default_dataset_is_cached(tmp_path):
    path = tmp_path / "default"
    got = ensure_default_dataset(path)
    assert got == path
    meta = pq.ParquetFile(path / "interactions.parquet").metadata
    assert meta.num_rows == synth.DEFAULT_PARAMS["n_clicks"]
    stamp = (path / "interactions.parquet").stat().st_mtime_ns
    assert ensure_default_dataset(path) == path
    assert (path / "interactions.parquet").stat().st_mtime_ns == stamp  # not regenerated
    (path / "synth.json").write_text("{}")  # looks partial / from another generator: rebuilt
    ensure_default_dataset(path)
    assert (path / "interactions.parquet").stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir()] == ["default"]  # no temporary directory left behind


def test_cli_synth(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "trainer", "synth", "--users", "200", "--items", "100",
                           "--clicks", "2000", "--out", str(out), "--format", "csv"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = load_dataset(out)
    assert len(ds.interactions) == 2000 and len(ds.users) == 200 and len(ds.items) == 100
    assert "purchase" in set(ds.interactions["event"]) and {"brand", "market"} <= set(ds.items.columns)
