"""Implicit-feedback dedup and the temporal leave-last-out split of shared PROTOCOL.md (v1)."""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_INTERACTIONS = 3


def _sort_key(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    return num if not num.isna().any() else s.astype(str)


def dedupe_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Keep only the earliest occurrence of each (user, item) pair (by timestamp, then row order); every other
    column (rating, event, context) is that row's."""
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy()))
    first = df.iloc[order].drop_duplicates(["user_id", "item_id"], keep="first")
    return first.sort_index()


def order_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Stable sort by (user_id, timestamp, item_id), ids compared numerically when numeric."""
    keys = pd.DataFrame({"u": _sort_key(df["user_id"]), "t": df["timestamp"], "i": _sort_key(df["item_id"])},
                        index=df.index)
    return df.loc[keys.sort_values(["u", "t", "i"], kind="stable").index].reset_index(drop=True)


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
