"""Implicit-feedback dedup and the temporal leave-last-out split of shared PROTOCOL.md (v1)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.ids import frame_memo, id_codes

MIN_INTERACTIONS = 3


def _sort_key(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    return num if not num.isna().any() else s.astype(str)


def _rank(s: pd.Series, by_number: bool = False) -> np.ndarray:
    """int64 per row that orders the rows as pandas sorts `_sort_key(s)` (by_number) or `s`: equal keys equal, missing
    last. Built on the distinct values only (a sort of 10M id strings → a sort of their ~500k distinct values)."""
    codes, uniq = pd.factorize(s, use_na_sentinel=False)
    key = pd.Series(uniq)
    if by_number:
        key = _sort_key(key)  # numeric iff every distinct value is, as for the whole column
    r = pd.Categorical(key, ordered=True).codes.astype(np.int64)  # what pandas' multi-column sort ranks by
    r[r < 0] = len(r)
    return r[codes]


def dedupe_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Keep only the earliest occurrence of each (user, item) pair (by timestamp, then row order); every other
    column (rating, event, context) is that row's."""
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy()))
    if not df.index.is_unique:
        first = df.iloc[order].drop_duplicates(["user_id", "item_id"], keep="first")
        return first.sort_index()
    # the pair as one int64 of the two columns' codes (what drop_duplicates compares), first occurrence in `order`
    u, nu = _codes(df["user_id"])
    i, ni = _codes(df["item_id"])
    if nu * max(ni, 1) >= 2**62:
        return df.iloc[order].drop_duplicates(["user_id", "item_id"], keep="first").sort_index()
    _, first = np.unique((u * ni + i)[order], return_index=True)  # stable: the first occurrence
    out = df.iloc[np.sort(order[first])]
    return out if out.index.is_monotonic_increasing else out.sort_index()


def _codes(s: pd.Series) -> tuple[np.ndarray, int]:
    codes, uniq = pd.factorize(s, use_na_sentinel=False)
    return codes.astype(np.int64, copy=False), len(uniq)


def order_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Stable sort by (user_id, timestamp, item_id), ids compared numerically when numeric."""
    if not df.index.is_unique:
        keys = pd.DataFrame({"u": _sort_key(df["user_id"]), "t": df["timestamp"], "i": _sort_key(df["item_id"])},
                            index=df.index)
        return df.loc[keys.sort_values(["u", "t", "i"], kind="stable").index].reset_index(drop=True)
    t = df["timestamp"]
    t_key = t.to_numpy(np.int64) if pd.api.types.is_integer_dtype(t.dtype) and not t.hasnans else _rank(t)
    order = np.lexsort((_rank(df["item_id"], True), t_key, _rank(df["user_id"], True)))
    return df.iloc[order].reset_index(drop=True)


def ordered_rows(user: tuple[np.ndarray, np.ndarray], item: tuple[np.ndarray, np.ndarray],
                 ts: np.ndarray) -> np.ndarray:
    """Row positions of `order_interactions(dedupe_pairs(df))` for a frame with a unique increasing index and integer
    timestamps `ts`, given each id column as (code per row, its distinct values) (`common.ids.str_codes`).

    One stable sort by (user, time, item) puts every pair's earliest row (time, then row order) first among the
    pair's rows; keeping those first rows is the dedupe, and what remains is already in `order_interactions`' order."""
    (uc, uv), (ic, iv) = user, item
    if len(ts) == 0:
        return np.empty(0, np.int64)
    ur = _rank(pd.Series(uv, dtype=object), True)[uc]
    ir = _rank(pd.Series(iv, dtype=object), True)[ic]
    t = ts.astype(np.int64, copy=False)
    t0, span = int(t.min()), int(t.max()) - int(t.min()) + 1
    bits = [max(int(x).bit_length(), 1) for x in (len(uv), span, len(iv))]
    if sum(bits) <= 63:  # one int64 key
        key = (ur << (bits[1] + bits[2])) | ((t - t0) << bits[2]) | ir
        order = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((ir, t, ur))
    if len(uv) * max(len(iv), 1) < 2**62:
        dup = pd.Series((uc.astype(np.int64) * max(len(iv), 1) + ic)[order]).duplicated()
    else:
        dup = pd.DataFrame({"u": uc[order], "i": ic[order]}).duplicated()
    rows = order[~dup.to_numpy()]
    return rows.astype(np.int32) if len(ts) < 2**31 else rows  # int32: kept with the frame (frame_memo)


def frame_rows(df: pd.DataFrame) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """(`ordered_rows` of an interactions frame, user and item `id_codes`), once per loaded frame
    (`common.ids.frame_memo`); None where the frame needs the general path (a non-unique or unordered index,
    non-integer timestamps, ids of mixed types)."""
    t = df["timestamp"]
    if not (df.index.is_unique and df.index.is_monotonic_increasing and pd.api.types.is_integer_dtype(t.dtype)
            and not t.hasnans):
        return None
    users, items = id_codes(df, "user_id"), id_codes(df, "item_id")
    if users is None or items is None:
        return None
    rows = frame_memo(df, ("ordered_rows",), ("user_id", "item_id", "timestamp"),
                      lambda: ordered_rows(users, items, t.to_numpy(np.int64)))
    return rows, users, items


def leave_last_out(df: pd.DataFrame, min_interactions: int = MIN_INTERACTIONS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split deduplicated interactions into (train, test): each user with ≥ `min_interactions` rows
    gives its last row (time, then item id order) as the single test target."""
    ordered = order_interactions(dedupe_pairs(df))
    sizes = ordered.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    is_last = ~ordered["user_id"].duplicated(keep="last").to_numpy()
    test_mask = is_last & (sizes >= min_interactions)
    return ordered.loc[~test_mask].reset_index(drop=True), ordered.loc[test_mask].reset_index(drop=True)


def validation_split(train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validation split for tuning: the same rule applied to the training data."""
    return leave_last_out(train)
