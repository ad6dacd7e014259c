"""Popular: global / recent / per-category lists on a toy log, and PROTOCOL's MostPopular on ml-100k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from common.channel_config import ChannelSpec, ServeParams
from trainer.channels.popular import Popular
from trainer.data.split import leave_last_out
from trainer.data.train_data import TrainData

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
DAY = 86400


def toy() -> tuple[pd.DataFrame, pd.DataFrame]:
    # (user, item, day): item 1 is clicked 3 times long ago; items 2, 3 twice; item 4 once;
    # in the last 7 days: item 4 twice (days 95, 100), item 2 once (day 99), item 3 once (day 100)
    rows = [("a", 1, 0), ("b", 1, 1), ("c", 1, 2), ("a", 2, 3), ("d", 3, 3), ("e", 4, 95),
            ("b", 2, 99), ("c", 3, 100), ("d", 4, 100), ("e", 5, 10)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"item_id": str})
    df["timestamp"] *= DAY
    items = pd.DataFrame({"genres": ["Drama|Comedy", "Comedy", "Drama", "Comedy", "Action"]},
                         index=["1", "2", "3", "4", "5"])
    return df, items


def fit(**params) -> tuple[Popular, TrainData]:
    df, items = toy()
    data = TrainData.from_frame(df, items=items)
    ch = Popular(ChannelSpec(name="popular", kind="list", model="popular", params=params))
    ch.fit(data)
    return ch, data


def as_ext(data: TrainData, ids: np.ndarray) -> list[str]:
    return [data.item_map.ids[i] for i in ids]


def test_global_recent_and_category_lists():
    ch, data = fit()
    lists = ch.artifacts(data)["list"].lists
    ids, sc = lists["global"]
    # counts: 1→3, 2→2, 3→2, 4→2, 5→1; ties (2, 3, 4) by ascending item index
    assert as_ext(data, ids) == ["1", "2", "3", "4", "5"]
    assert sc.tolist() == [3, 2, 2, 2, 1]
    ids, sc = lists["recent"]  # since day 100 - 7 = 93
    assert as_ext(data, ids) == ["4", "2", "3"] and sc.tolist() == [2, 1, 1]
    # primary category = first genre: 1 Drama, 2 Comedy, 3 Drama, 4 Comedy, 5 Action
    assert set(lists) == {"global", "recent", "cat:Action", "cat:Comedy", "cat:Drama"}
    assert as_ext(data, lists["cat:Drama"][0]) == ["1", "3"]
    assert as_ext(data, lists["cat:Comedy"][0]) == ["2", "4"]
    assert as_ext(data, lists["cat:Action"][0]) == ["5"]
    assert all(ids.dtype == np.int32 and sc.dtype == np.float32 for ids, sc in lists.values())


def test_top_k_recent_days_and_categories_switch():
    ch, data = fit(top_k=2, recent_days=0.5, categories=False)
    lists = ch.artifacts(data)["list"].lists
    assert set(lists) == {"global", "recent"}
    assert as_ext(data, lists["global"][0]) == ["1", "2"]
    assert as_ext(data, lists["recent"][0]) == ["3", "4"]  # day ≥ 99.5: items 3 and 4 once each
    assert lists["recent"][1].tolist() == [1, 1]


def test_recommend_serves_the_configured_list_without_seen_items():
    ch, data = fit()
    a = data.user_map.get("a")  # clicked 1 and 2
    (ids, _), = ch.recommend(data, np.array([a]), k=3)
    assert as_ext(data, ids) == ["3", "4", "5"]
    (ids, _), = ch.recommend(data, np.array([a]), k=3, serve=ServeParams(lists=["recent"]))
    assert as_ext(data, ids) == ["4", "3"]


def test_unknown_param_is_rejected():
    with pytest.raises(ValidationError, match="window"):
        Popular(ChannelSpec(name="popular", kind="list", model="popular", params={"window": 3}))


@pytest.mark.skipif(not (SHARED_DATA / "interactions.csv").exists(), reason="ml-100k not available")
def test_global_list_reproduces_protocol_most_popular_on_ml100k():
    """PROTOCOL.md MostPopular: HR@50 0.143, HR@200 0.379."""
    from trainer.data.io import load_dataset

    ds = load_dataset(SHARED_DATA)
    train, test = leave_last_out(ds.interactions)
    data = TrainData.from_frame(train, items=ds.items)
    ch = Popular(ChannelSpec(name="popular", kind="list", model="popular", params={"top_k": 2000}))
    ch.fit(data)
    users, targets = data.user_map.lookup(test["user_id"]), data.item_map.lookup(test["item_id"])
    recs = ch.recommend(data, users, k=200)
    ranks = np.array([(np.flatnonzero(ids == t)[0] + 1) if t in ids else 10**9
                      for (ids, _), t in zip(recs, targets, strict=True)])
    assert np.mean(ranks <= 50) == pytest.approx(0.143, abs=0.0006)
    assert np.mean(ranks <= 200) == pytest.approx(0.379, abs=0.0006)
    assert any(name.startswith("cat:") for name in ch.artifacts(data)["list"].lists)
