"""Sessions: the one definition every session model uses, and a session's conversion.

A session is a run of one user's interactions (arrays sorted by user, then time) with no gap longer than
`SESSION_GAP_S` (30 minutes): a gap of exactly 1800 s stays in the session, 1801 s starts a new one.
Gaps are differences of total seconds, never a timedelta's `.seconds` component (which would merge a
gap of 2 days and 5 minutes into 300 s). A session's conversion is its last item whose event is `like` or
`purchase` (trainer.data.events.CONVERSION_EVENTS), or -1 when it has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from trainer.data.events import CONVERSION_EVENTS

SESSION_GAP_S = 1800


def to_seconds(ts: np.ndarray | pd.Series | pd.Index) -> np.ndarray:
    """int64 total seconds: numbers as they are (floored), datetimes since the epoch, timedeltas in full."""
    if isinstance(ts, pd.Series | pd.Index):
        if isinstance(ts.dtype, pd.DatetimeTZDtype):
            ts = pd.DatetimeIndex(ts).tz_convert("UTC").tz_localize(None)
        ts = ts.to_numpy()
    arr = np.asarray(ts)
    if arr.dtype == object:  # datetime / Timestamp / timedelta objects
        first = next((x for x in arr if x is not None), None)
        if isinstance(first, pd.Timedelta | np.timedelta64) or hasattr(first, "total_seconds"):
            arr = pd.to_timedelta(arr).to_numpy()
        else:
            arr = pd.to_datetime(arr, utc=True).tz_localize(None).to_numpy()
    if arr.dtype.kind == "M":
        return ((arr - np.datetime64(0, "s")) // np.timedelta64(1, "s")).astype(np.int64)
    if arr.dtype.kind == "m":
        return (arr // np.timedelta64(1, "s")).astype(np.int64)
    if arr.dtype.kind == "f":
        return np.floor(arr).astype(np.int64)
    return arr.astype(np.int64)


def split_sessions(user_idx: np.ndarray, ts: np.ndarray, gap_s: int | None = SESSION_GAP_S) -> np.ndarray:
    """Session id (0, 1, … in order) per interaction of arrays sorted by user, then time: a new session
    starts at a new user or after a gap > `gap_s` seconds of total time (None: one session per user)."""
    user_idx = np.asarray(user_idx)
    n = len(user_idx)
    if n == 0:
        return np.zeros(0, np.int64)
    sec = to_seconds(ts)
    new_user = user_idx[1:] != user_idx[:-1]
    gaps = np.diff(sec)
    if np.any(user_idx[1:] < user_idx[:-1]) or np.any(gaps[~new_user] < 0):
        raise ValueError("split_sessions needs arrays sorted by user, then time")
    start = np.ones(n, dtype=bool)
    start[1:] = new_user if gap_s is None else new_user | (gaps > gap_s)
    return np.cumsum(start) - 1


def tie_groups(user_idx: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Tie-group id (0, 1, … in order) per interaction of arrays sorted by user, then time: a run of one user's
    interactions with the same second. Events of one group have no order (a log sorted by (user, time, item)
    lists them by item id), so order-sensitive models may treat a group as a set (EGES `ties`, Airbnb `ties`).
    A group never spans two sessions (a session break needs a gap > 0)."""
    user_idx = np.asarray(user_idx)
    n = len(user_idx)
    if n == 0:
        return np.zeros(0, np.int64)
    sec = to_seconds(ts)
    start = np.ones(n, dtype=bool)
    start[1:] = (user_idx[1:] != user_idx[:-1]) | (sec[1:] != sec[:-1])
    return np.cumsum(start) - 1


def shuffle_within_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64 permutation p such that `x[p]` reorders every run of equal (non-decreasing) `groups` ids uniformly
    at random and leaves the runs where they are (one `rng.random(n)`)."""
    groups = np.asarray(groups)
    return np.lexsort((rng.random(len(groups)), groups)).astype(np.int64)


def session_bounds(session_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of equal session ids, in order: session k is `[start[k], start[k] + length[k])`."""
    ids = np.asarray(session_ids)
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]).astype(np.int64)
    return starts, np.diff(np.r_[starts, len(ids)]).astype(np.int64)


def session_conversion(session_ids: np.ndarray, item_idx: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Per session (in `session_bounds` order): its last item whose event is like or purchase, else -1."""
    starts, _ = session_bounds(session_ids)
    if len(starts) == 0:
        return np.zeros(0, np.int64)
    pos = np.where(np.isin(event, CONVERSION_EVENTS), np.arange(len(event)), -1)
    last = np.maximum.reduceat(pos, starts)
    return np.where(last >= 0, np.asarray(item_idx, np.int64)[np.maximum(last, 0)], -1)


@dataclass(frozen=True)
class Sessions:
    """Sessions of a time-ordered interaction log: per-interaction `ids`, per-session bounds, user, conversion."""

    ids: np.ndarray  # int64 session id per interaction
    starts: np.ndarray  # int64 first interaction of each session
    lengths: np.ndarray  # int64 interactions per session
    user: np.ndarray  # user index of each session
    conversion: np.ndarray  # int64 converted item of each session, -1 if none
    gap_s: int | None = SESSION_GAP_S

    @classmethod
    def build(cls, user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, event: np.ndarray,
              gap_s: int | None = SESSION_GAP_S) -> Sessions:
        """Split (sorted by user, then time) interactions into sessions and derive each one's conversion."""
        ids = split_sessions(user_idx, ts, gap_s)
        starts, lengths = session_bounds(ids)
        return cls(ids, starts, lengths, np.asarray(user_idx)[starts], session_conversion(ids, item_idx, event), gap_s)

    def __len__(self) -> int:
        return len(self.starts)
