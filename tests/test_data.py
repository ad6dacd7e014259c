"""The data layer: loading both dataset formats, validation errors, dedupe, the PROTOCOL.md split,
stable id maps (on real Redis), event types, item side information and the TrainData view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.ids import IdMap, load_id_map, publish_id_map, sort_ids
from tests.conftest import SHARED_DATA
from trainer.data.errors import DataError
from trainer.data.events import CLICK, EVENT_TYPES, LIKE, PURCHASE, event_codes, parse_events, rating_events
from trainer.data.io import load_dataset
from trainer.data.split import dedupe_pairs, leave_last_out, validation_split
from trainer.data.train_data import TrainData


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------------------------- loading

ML_INTERACTIONS = """user_id,item_id,rating,timestamp
1,168,5,874965478
1,172,5,874965478
2,168,3,875000000
2,50,4,875000100
"""
ML_USERS = """user_id,age,gender,occupation,zip
1,24,M,technician,85711
2,53,F,other,94043
"""
ML_ITEMS = """item_id,title,release_date,genres
50,Star Wars (1977),01-Jan-1977,Action|Adventure|Romance|Sci-Fi|War
168,Monty Python and the Holy Grail (1974),01-Jan-1974,Comedy
172,"Empire Strikes Back, The (1980)",01-Jan-1980,Action|Adventure|Drama
"""


def test_load_ml100k_format(tmp_path):
    write(tmp_path, "interactions.csv", ML_INTERACTIONS)
    write(tmp_path, "users.csv", ML_USERS)
    write(tmp_path, "items.csv", ML_ITEMS)
    ds = load_dataset(tmp_path)
    inter = ds.interactions
    assert list(inter["user_id"]) == ["1", "1", "2", "2"]
    assert list(inter["item_id"]) == ["168", "172", "168", "50"]
    assert inter["timestamp"].dtype == np.int64
    assert list(inter["timestamp"]) == [874965478, 874965478, 875000000, 875000100]
    assert inter["rating"].dtype == np.float32 and list(inter["rating"]) == [5, 5, 3, 4]
    assert ds.context_columns == []
    assert list(ds.users.index) == ["1", "2"] and ds.users.loc["2", "occupation"] == "other"
    assert ds.category_column == "genres"
    assert ds.items.loc["172", "title"] == "Empire Strikes Back, The (1980)"  # quoted comma survives


def test_load_click_log_format_ms_timestamps(tmp_path):
    write(tmp_path, "click_log.csv", """user_id,article_id,timestamp,environment,region
199999,160417,1507029570190,4,25
199999,5408,1507029571478,4,25
199998,160417,1507029532200,4,13
""")
    write(tmp_path, "articles.csv", """article_id,category_id,created_at_ts,words_count
160417,281,1506942089000,173
5408,4,1506994257000,193
""")
    ds = load_dataset(tmp_path)
    inter = ds.interactions
    assert {"user_id", "item_id", "timestamp", "environment", "region"} <= set(inter.columns)
    assert "article_id" not in inter.columns
    assert list(inter["item_id"]) == ["160417", "5408", "160417"]
    assert list(inter["timestamp"]) == [1507029570, 1507029571, 1507029532]  # ms → s (floored)
    assert ds.context_columns == ["environment", "region"]
    assert list(inter["region"]) == ["25", "25", "13"]
    assert ds.category_column == "category_id"
    assert ds.items.loc["160417", "created_at_ts"] == 1506942089  # ms → s in the attribute table too
    assert ds.items.loc["5408", "words_count"] == 193


def test_date_string_timestamps(tmp_path):
    write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n1,a,2024-03-01 00:00:10\n1,b,2024-03-01T00:01:00Z\n")
    ds = load_dataset(tmp_path)
    assert list(ds.interactions["timestamp"]) == [1709251210, 1709251260]


def test_parquet_is_preferred_and_loads(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [10, 20]}).to_parquet(
        tmp_path / "interactions.parquet")
    write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n9,9,9\n")
    ds = load_dataset(tmp_path)
    assert list(ds.interactions["user_id"]) == ["1", "2"]


# ------------------------------------------------------------------------------------------ validation

def error_of(directory: Path) -> str:
    with pytest.raises(DataError) as exc:
        load_dataset(directory)
    return str(exc.value)


def test_missing_column_names_file_and_column(tmp_path):
    p = write(tmp_path, "interactions.csv", "user_id,item,timestamp\n1,2,3\n")
    msg = error_of(tmp_path)
    assert str(p) in msg and "item_id" in msg and "missing" in msg


def test_missing_column_in_click_log(tmp_path):
    p = write(tmp_path, "click_log.csv", "user_id,article_id,environment\n1,2,4\n")
    msg = error_of(tmp_path)
    assert str(p) in msg and "timestamp" in msg


def test_unparsable_timestamp_names_first_bad_line(tmp_path):
    p = write(tmp_path, "interactions.csv",
              "user_id,item_id,timestamp\n1,10,874965478\n1,11,874965479\n2,10,yesterday\n2,12,soon\n")
    msg = error_of(tmp_path)
    # line 4 of the file = third data row, the first that is not a timestamp
    assert str(p) in msg and "'timestamp'" in msg and "line 4" in msg and "yesterday" in msg


def test_unparsable_date_string_names_first_bad_line(tmp_path):
    write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n1,10,2024-03-01\n1,11,not a date\n")
    msg = error_of(tmp_path)
    assert "'timestamp'" in msg and "line 3" in msg and "not a date" in msg


def test_missing_id_names_line(tmp_path):
    write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n1,10,5\n,11,6\n")
    msg = error_of(tmp_path)
    assert "'user_id'" in msg and "line 3" in msg


def test_empty_file(tmp_path):
    p = write(tmp_path, "interactions.csv", "")
    msg = error_of(tmp_path)
    assert str(p) in msg and "empty" in msg


def test_header_only_file(tmp_path):
    p = write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n")
    msg = error_of(tmp_path)
    assert str(p) in msg and "no rows" in msg


def test_header_only_attribute_table(tmp_path):
    write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n1,2,3\n")
    p = write(tmp_path, "items.csv", "item_id,genres\n")
    msg = error_of(tmp_path)
    assert str(p) in msg and "no rows" in msg


def test_duplicate_id_in_attribute_table(tmp_path):
    write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\n1,2,3\n")
    p = write(tmp_path, "users.csv", "user_id,age\n1,20\n2,30\n3,40\n2,50\n")
    msg = error_of(tmp_path)
    assert str(p) in msg and "'user_id'" in msg and "line 5" in msg and "duplicate" in msg


def test_duplicate_article_in_click_log_format(tmp_path):
    write(tmp_path, "click_log.csv", "user_id,article_id,timestamp,environment,region\n1,5,1507029570190,4,1\n")
    p = write(tmp_path, "articles.csv", "article_id,category_id,created_at_ts,words_count\n5,1,0,1\n5,2,0,1\n")
    msg = error_of(tmp_path)
    assert str(p) in msg and "'item_id'" in msg and "line 3" in msg


def test_not_a_dataset(tmp_path):
    assert "not a directory" in error_of(tmp_path / "nope")
    assert "no interactions" in error_of(tmp_path)


# ------------------------------------------------------------------------------------- dedupe and split

def frame(rows: list[tuple]) -> pd.DataFrame:
    cols = ["user_id", "item_id", "timestamp", "environment"][: len(rows[0])]
    df = pd.DataFrame(rows, columns=cols)
    df["user_id"] = df["user_id"].astype(str).astype(object)
    df["item_id"] = df["item_id"].astype(str).astype(object)
    return df


def test_dedupe_keeps_earliest_then_first_row():
    df = frame([(1, 5, 300, "late"), (1, 5, 100, "early"), (1, 6, 200, "a"), (1, 6, 200, "b"), (2, 5, 50, "x")])
    out = dedupe_pairs(df)
    assert len(out) == 3
    kept = {(r.user_id, r.item_id): (r.timestamp, r.environment) for r in out.itertuples()}
    assert kept[("1", "5")] == (100, "early")
    assert kept[("1", "6")] == (200, "a")  # same timestamp: the earlier row wins
    assert kept[("2", "5")] == (50, "x")


TOY = frame([
    # user 1: tie at t=300 between items 99 and 100 → numeric order puts 100 last (a string sort would say 99)
    (1, 10, 100), (1, 20, 200), (1, 100, 300), (1, 99, 300),
    # user 2: only 2 interactions → kept whole in train, not evaluated
    (2, 10, 100), (2, 30, 200),
    # user 3: item 1 re-clicked at t=500; the dedupe keeps t=50 so the target is item 3
    (3, 1, 50), (3, 2, 100), (3, 3, 200), (3, 1, 500),
    # user 10 sorts after user 9 numerically; exactly 3 interactions → evaluated
    (10, 7, 1), (10, 8, 2), (10, 9, 3),
    (9, 7, 5), (9, 8, 6), (9, 9, 7), (9, 10, 8),
])


def test_leave_last_out_on_toy():
    train, test = leave_last_out(TOY)
    assert list(zip(test["user_id"], test["item_id"], strict=True)) == [("1", "100"), ("3", "3"), ("9", "10"),
                                                                        ("10", "9")]
    assert "2" not in set(test["user_id"])
    assert sorted(train.loc[train["user_id"] == "2", "item_id"]) == ["10", "30"]
    # train is ordered by (user numerically, time, item numerically) and holds everything else, deduped
    assert list(train["user_id"].drop_duplicates()) == ["1", "2", "3", "9", "10"]
    assert list(train.loc[train["user_id"] == "1", "item_id"]) == ["10", "20", "99"]
    assert list(train.loc[train["user_id"] == "3", "item_id"]) == ["1", "2"]
    assert list(train.loc[train["user_id"] == "3", "timestamp"]) == [50, 100]
    assert len(train) + len(test) == len(TOY) - 1  # only the duplicate pair is gone


def test_validation_split_is_the_same_rule_on_train():
    train, _ = leave_last_out(TOY)
    vtrain, val = validation_split(train)
    # user 1 train = 10, 20, 99 → target 99; user 9 → 9; users 3 and 10 have 2 training rows → not evaluated
    assert list(zip(val["user_id"], val["item_id"], strict=True)) == [("1", "99"), ("9", "9")]
    assert len(vtrain) + len(val) == len(train)
    assert set(vtrain.loc[vtrain["user_id"] == "3", "item_id"]) == {"1", "2"}
    assert list(vtrain.loc[vtrain["user_id"] == "1", "item_id"]) == ["10", "20"]


def test_min_interactions_parameter():
    _, test = leave_last_out(TOY, min_interactions=4)
    assert list(test["user_id"]) == ["1", "9"]


# --------------------------------------------------------------------------------------------- id maps

def test_sort_ids_numeric_then_lexicographic():
    assert list(sort_ids(["100", "99", "7", "99"])) == ["7", "99", "100"]
    assert list(sort_ids(["b", "a10", "a9"])) == ["a10", "a9", "b"]


def test_id_map_extend_keeps_old_indices():
    m = IdMap()
    assert m.extend(["100", "99", "5"]) == 3
    assert m.ids == ["5", "99", "100"]
    assert m.extend(["7", "100", "1000"]) == 2
    assert m.ids == ["5", "99", "100", "7", "1000"]  # old indices unchanged, new ones appended
    np.testing.assert_array_equal(m.lookup(["1000", "5", "nope"]), [4, 0, -1])
    assert m.get("7") == 3 and "99" in m and "8" not in m
    with pytest.raises(ValueError):
        IdMap(["1", "1"])


def test_id_map_publish_append_only(stores):
    assert len(load_id_map(stores, "item")) == 0
    m = IdMap(["5", "99", "100"])
    publish_id_map(stores, "item", m)
    assert load_id_map(stores, "item").ids == ["5", "99", "100"]
    assert int(stores("meta").get(stores.keyspace.id_map_len("item"))) == 3
    m.extend(["1", "200"])
    publish_id_map(stores, "item", m)
    assert load_id_map(stores, "item").ids == ["5", "99", "100", "1", "200"]
    with pytest.raises(ValueError, match="append-only"):
        publish_id_map(stores, "item", IdMap(["1", "5", "99", "100", "200"]))  # reordered
    with pytest.raises(ValueError, match="append-only"):
        publish_id_map(stores, "item", IdMap(["5", "99"]))  # shrunk
    assert load_id_map(stores, "item").ids == ["5", "99", "100", "1", "200"]  # refused writes changed nothing
    assert len(load_id_map(stores, "user")) == 0  # entities are separate


def test_train_data_reuses_published_map(stores):
    publish_id_map(stores, "item", IdMap(["30", "10"]))
    train, _ = leave_last_out(TOY)
    td = TrainData.from_frame(train, item_map=load_id_map(stores, "item"))
    assert td.item_map.ids[:2] == ["30", "10"]
    publish_id_map(stores, "item", td.item_map)  # an extension: accepted
    assert load_id_map(stores, "item").ids == td.item_map.ids


# ------------------------------------------------------------------------------------------- TrainData

def test_train_data_from_frame():
    df = frame([(2, 12, 5, "app"), (1, 10, 1, "web"), (1, 11, 3, "app"), (1, 10, 9, "app"), (2, 11, 2, "web"),
                (1, 12, 2, "app")])
    items = pd.DataFrame({"genres": ["Drama|War", "Comedy", "Action", "Zzz"]},
                         index=pd.Index(["10", "11", "12", "99"], name="item_id"))
    td = TrainData.from_frame(df, items=items)
    assert td.n_users == 2 and td.n_items == 3 and len(td.item_idx) == 5  # (1, 10) deduped
    u1, i10 = td.user_map.get("1"), td.item_map.get("10")
    items_u1, ts_u1 = td.history(u1)
    assert [td.item_map.ids[i] for i in items_u1] == ["10", "12", "11"] and list(ts_u1) == [1, 2, 3]
    recent, _ = td.recent(u1, 2)
    assert [td.item_map.ids[i] for i in recent] == ["11", "12"]  # newest first
    assert td.csr.shape == (2, 3) and td.csr.sum() == 5 and td.csr[u1, i10] == 1
    assert list(td.item_counts) == [1, 2, 2]  # items 10, 11, 12 (numeric order)
    np.testing.assert_array_equal(np.diff(td.user_ptr), [3, 2])
    assert [td.item_map.ids[i] for i in td.history(td.user_map.get("2"))[0]] == ["11", "12"]
    assert list(td.context["environment"][td.user_ptr[u1]:td.user_ptr[u1 + 1]]) == ["web", "app", "app"]
    codes, names = td.item_category
    assert names == ["Action", "Comedy", "Drama"]  # multi-valued genres → first value
    assert [names[c] for c in codes] == ["Drama", "Comedy", "Action"]
    assert td.item_attrs.loc[td.item_map.get("12"), "genres"] == "Action"  # attributes aligned to indices


def test_train_data_extends_given_maps():
    base = IdMap(["12", "10"])
    td = TrainData.from_frame(frame([(1, 10, 1), (1, 11, 2), (1, 12, 3)]), item_map=base)
    assert td.item_map.ids == ["12", "10", "11"] and base.ids == ["12", "10"]  # extended copy, input untouched
    items, _ = td.history(0)
    assert [td.item_map.ids[i] for i in items] == ["10", "11", "12"]


# ------------------------------------------------------------------------------ event types, side info

def test_event_column_is_normalised_and_not_context(tmp_path):
    write(tmp_path, "interactions.csv", """user_id,item_id,timestamp,event,environment
1,10,1,click,app
1,11,2, Purchase ,app
1,12,3,,web
2,10,4,like,app
2,11,5,buy,app
2,12,6,VIEW,app
""")
    ds = load_dataset(tmp_path)
    assert list(ds.interactions["event"]) == ["click", "purchase", "click", "like", "purchase", "click"]
    assert ds.context_columns == ["environment"]
    td = TrainData.from_frame(ds.interactions)
    assert [EVENT_TYPES[c] for c in td.event] == ["click", "purchase", "click", "like", "purchase", "click"]
    assert td.event.dtype == np.int8


def test_unknown_event_names_file_column_and_line(tmp_path):
    p = write(tmp_path, "interactions.csv", "user_id,item_id,timestamp,event\n1,10,1,click\n1,11,2,like\n1,12,3,share\n")
    with pytest.raises(DataError, match=r"interactions\.csv: column 'event': line 4: unknown event type.*'share'"):
        load_dataset(tmp_path)
    p.unlink()
    pd.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1, 2], "event": ["click", "refund"]}).to_parquet(
        tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match=r"interactions\.parquet: column 'event': row 1: unknown event type"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="row 0"):
        parse_events(pd.Series(["nope"]))


def test_rating_rule_maps_four_and_above_to_like(tmp_path):
    np.testing.assert_array_equal(rating_events(np.array([1, 3, 3.5, 4, 5, np.nan])),
                                  [CLICK, CLICK, CLICK, LIKE, LIKE, CLICK])
    write(tmp_path, "interactions.csv", ML_INTERACTIONS)
    ds = load_dataset(tmp_path)
    assert "event" not in ds.interactions.columns  # the rule labels TrainData; the loaded rows stay as they are
    td = TrainData.from_frame(ds.interactions)
    assert list(td.rating) == [5, 5, 3, 4]  # aligned with the interactions, as the events are
    np.testing.assert_array_equal(td.event, [LIKE, LIKE, CLICK, LIKE])
    # an explicit event column wins over the rating; no rating, no event: all click
    df = ds.interactions.assign(event="purchase")
    assert (event_codes(df) == PURCHASE).all()
    assert (event_codes(ds.interactions.drop(columns="rating")) == CLICK).all()
    direct = TrainData(td.user_map, td.item_map, td.user_idx, td.item_idx, td.ts)
    assert direct.event.dtype == np.int8 and (direct.event == CLICK).all()


def test_events_ride_along_without_changing_dedupe_or_split():
    rows = [(1, 10, 1), (1, 11, 2), (1, 12, 3), (1, 10, 4), (2, 10, 1), (2, 12, 2), (3, 11, 5)]
    plain = frame(rows)
    tagged = plain.assign(event=["click", "like", "purchase", "purchase", "click", "like", "click"])
    for split in (dedupe_pairs, lambda d: leave_last_out(d)[0], lambda d: leave_last_out(d)[1],
                  lambda d: validation_split(leave_last_out(d)[0])[0]):
        a, b = split(plain), split(tagged)
        pd.testing.assert_frame_equal(a, b.drop(columns="event"))
    train, test = leave_last_out(tagged)
    assert list(test["event"]) == ["purchase"]  # user 1's last item, 12
    # the dedupe keeps the earliest row of a pair with its own event: the later 'purchase' of (1, 10) is dropped
    assert train.set_index(["user_id", "item_id"]).loc[("1", "10"), "event"] == "click"
    td = TrainData.from_frame(train)
    by_pair = {(td.user_map.ids[u], td.item_map.ids[i]): EVENT_TYPES[e]
               for u, i, e in zip(td.user_idx, td.item_idx, td.event, strict=True)}
    assert by_pair == {("1", "10"): "click", ("1", "11"): "like", ("2", "10"): "click", ("2", "12"): "like",
                       ("3", "11"): "click"}


def test_item_side_information_fields():
    items = pd.DataFrame({"category_id": [3, 1, 3, 2], "brand": ["b2", "b1", "b2", None], "market_id": [7, 7, 5, 5],
                          "tags": ["x|y", "y", "z", "x"]}, index=pd.Index(["10", "11", "12", "13"], name="item_id"))
    td = TrainData.from_frame(frame([(1, 10, 1), (1, 11, 2), (2, 12, 3), (2, 13, 4)]), items=items)
    codes, names = td.item_category
    assert names == ["1", "2", "3"] and list(codes) == [2, 0, 2, 1]
    np.testing.assert_array_equal(td.item_field("category"), codes)
    np.testing.assert_array_equal(td.item_field("brand"), [1, 0, 1, -1])  # missing → -1
    assert td.item_field_names("brand") == ["b1", "b2"]
    np.testing.assert_array_equal(td.item_field("market"), [1, 1, 0, 0])  # found under its alias market_id
    assert td.item_field_names("market") == ["5", "7"]
    np.testing.assert_array_equal(td.item_field("tags"), [0, 1, 2, 0])  # any column by name, first of 'a|b'
    assert td.item_field("colour") is None and td.item_field_names("colour") is None
    bare = TrainData.from_frame(frame([(1, 10, 1)]), items=items[["category_id"]])
    assert bare.item_field("brand") is None and bare.item_field("market") is None
    none = TrainData.from_frame(frame([(1, 10, 1)]))
    assert none.item_field("category") is None and none.item_category[1] == []


# --------------------------------------------------------------------------------- real data (optional)

@pytest.mark.skipif(not (SHARED_DATA / "interactions.csv").exists(), reason="shared ml-100k data not present")
def test_ml100k_split_matches_protocol():
    ds = load_dataset(SHARED_DATA)
    train, test = leave_last_out(ds.interactions)
    assert len(test) == 943 and test["user_id"].is_unique
    assert train["item_id"].nunique() == 1679  # PROTOCOL.md §8 test catalog
    assert len(train) + len(test) == 100_000
    assert ds.category_column == "genres"
