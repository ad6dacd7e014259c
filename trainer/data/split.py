"""Implicit-feedback dedup and the temporal leave-last-out split of shared PROTOCOL.md (v1)."""

from __future__ import annotations

import numpy as np
import pandas as pd

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
