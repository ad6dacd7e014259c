"""Sessions (trainer/data/sessions.py) on known answers: the 30-minute gap on total seconds, users never
sharing a session, bounds, a session's conversion, the TrainData view, and the ML-100K figures."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA
from trainer.data.events import CART, CLICK, LIKE, PURCHASE
from trainer.data.io import load_dataset
from trainer.data.sessions import (
    SESSION_GAP_S,
    Sessions,
    session_bounds,
    session_conversion,
    shuffle_within_groups,
    split_sessions,
    tie_groups,
    to_seconds,
)
from trainer.data.train_data import TrainData

DAY = 86_400


def test_gap_of_exactly_1800_s_stays_1801_splits():
    assert SESSION_GAP_S == 1800
    user = np.zeros(4, np.int32)
    ts = np.array([0, 1800, 3601, 5401])  # gaps 1800, 1801, 1800
    np.testing.assert_array_equal(split_sessions(user, ts), [0, 0, 1, 1])
    np.testing.assert_array_equal(split_sessions(user, ts, gap_s=1801), [0, 0, 0, 0])
    np.testing.assert_array_equal(split_sessions(user, ts, gap_s=None), [0, 0, 0, 0])


def test_users_never_share_a_session():
    user = np.array([0, 0, 1, 1, 3])
    ts = np.array([100, 200, 200, 300, 300])  # user 1 starts 0 s after user 0's last click
    np.testing.assert_array_equal(split_sessions(user, ts), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(split_sessions(user, ts, gap_s=None), [0, 0, 1, 1, 2])
    assert split_sessions(np.zeros(0, np.int32), np.zeros(0, np.int64)).shape == (0,)


def test_multi_day_gap_with_small_seconds_component_splits():
    # 2 days and 5 minutes: a timedelta's `.seconds` component is 300 (the classic bug), the total is 173,100
    gap = pd.Timedelta(days=2, minutes=5)
    assert gap.seconds == 300 and to_seconds(pd.Series([gap]))[0] == 2 * DAY + 300
    user = np.zeros(3, np.int32)
    np.testing.assert_array_equal(split_sessions(user, np.array([0, 60, 60 + 2 * DAY + 300])), [0, 0, 1])
    # the same log as datetimes (numpy, pandas with a time zone, Python objects) gives the same sessions
    t0 = pd.Timestamp("2024-03-01 10:00:00", tz="Europe/Paris")
    stamps = pd.Series([t0, t0 + pd.Timedelta(minutes=1), t0 + pd.Timedelta(minutes=1) + gap])
    for ts in (stamps, stamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(),
               np.array([x.to_pydatetime() for x in stamps], dtype=object)):
        np.testing.assert_array_equal(split_sessions(user, ts), [0, 0, 1])
    assert to_seconds(stamps)[0] == int(t0.timestamp())
    assert to_seconds(np.array([dt.timedelta(days=2, minutes=5)], dtype=object))[0] == 2 * DAY + 300


def test_unsorted_input_is_refused():
    with pytest.raises(ValueError, match="sorted"):
        split_sessions(np.array([0, 0]), np.array([10, 5]))
    with pytest.raises(ValueError, match="sorted"):
        split_sessions(np.array([1, 0]), np.array([0, 5]))


def test_session_bounds():
    starts, lengths = session_bounds(np.array([0, 0, 0, 1, 2, 2]))
    np.testing.assert_array_equal(starts, [0, 3, 4])
    np.testing.assert_array_equal(lengths, [3, 1, 2])
    starts, lengths = session_bounds(np.zeros(0, np.int64))
    assert len(starts) == len(lengths) == 0


def test_conversion_is_the_last_liked_or_purchased_item():
    session = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    item = np.array([10, 11, 12, 20, 21, 30, 31, 32, 40])
    event = np.array([CLICK, PURCHASE, CLICK,  # bought mid-session: still the conversion
                      CLICK, CART,  # a cart is not a conversion
                      LIKE, PURCHASE, LIKE,  # the last one counts, whatever its kind
                      CLICK])
    np.testing.assert_array_equal(session_conversion(session, item, event), [11, -1, 32, -1])
    assert session_conversion(np.zeros(0, np.int64), np.zeros(0), np.zeros(0)).shape == (0,)


def test_sessions_build_and_train_data_view():
    df = pd.DataFrame({"user_id": ["1", "1", "1", "2", "2", "1"], "item_id": ["5", "6", "7", "5", "8", "9"],
                       "timestamp": [0, 100, 4000, 50, 60, 4100],
                       "event": ["click", "like", "click", "purchase", "click", "click"]})
    td = TrainData.from_frame(df)
    s = td.sessions
    assert isinstance(s, Sessions) and len(s) == 3 and s.gap_s == SESSION_GAP_S
    np.testing.assert_array_equal(s.ids, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(s.starts, [0, 2, 4])
    np.testing.assert_array_equal(s.lengths, [2, 2, 2])
    assert [td.user_map.ids[u] for u in s.user] == ["1", "1", "2"]
    assert [td.item_map.ids[i] if i >= 0 else None for i in s.conversion] == ["6", None, "5"]
    assert td.sessions is s  # cached
    wide = Sessions.build(td.user_idx, td.item_idx, td.ts, td.event, gap_s=None)
    assert len(wide) == 2 and [td.item_map.ids[i] for i in wide.conversion] == ["6", "5"]


@pytest.mark.skipif(not (SHARED_DATA / "interactions.csv").exists(), reason="shared ml-100k data not present")
def test_ml100k_sessions_and_conversions():
    """The figures of MODEL_NOTES §0.2: 2,793 sessions (2,283 with ≥ 2 items); with the rating rule 86 % of
    sessions convert and in 49 % the last item is liked."""
    ds = load_dataset(SHARED_DATA)
    td = TrainData.from_frame(ds.interactions, items=ds.items)
    s = td.sessions
    assert len(s) == 2793 and int((s.lengths >= 2).sum()) == 2283 and np.median(s.lengths) == 11
    assert (s.conversion >= 0).mean() == pytest.approx(0.857, abs=0.001)
    assert (td.event[s.starts + s.lengths - 1] == LIKE).mean() == pytest.approx(0.491, abs=0.001)


def test_tie_groups_are_one_users_same_second_runs_and_shuffles_stay_inside_them():
    user = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    ts = np.array([0, 5, 5, 5, 9, 9, 9, 10])  # user 1's first second equals user 0's last: separate groups
    np.testing.assert_array_equal(tie_groups(user, ts), [0, 1, 1, 1, 2, 3, 3, 4])
    assert tie_groups(np.zeros(0, np.int32), np.zeros(0, np.int64)).shape == (0,)
    g = tie_groups(user, ts)
    seen = set()
    for seed in range(30):
        p = shuffle_within_groups(g, np.random.default_rng(seed))
        np.testing.assert_array_equal(g[p], g)  # every run stays where it is, as a whole
        assert sorted(p.tolist()) == list(range(8))
        seen.add(tuple(p[1:4].tolist()))
    assert len(seen) == 6  # all 3! orders of the group of 3 occur
    np.testing.assert_array_equal(shuffle_within_groups(g, np.random.default_rng(1)),
                                  shuffle_within_groups(g, np.random.default_rng(1)))  # seeded
