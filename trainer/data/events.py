"""Event types of interactions: one vocabulary, its validation, and the rating → `like` rule.

An interaction row may carry an `event` column (`click`, `like`, `cart`, `purchase`; absent = `click`).
Without one, a `rating` column gives `like` where rating ≥ 4 (the ML-100K convention) and `click`
elsewhere. Events never select rows: the dedupe and the split ignore them, they only label rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.event_types import EVENT_ALIASES, EVENT_TYPES
from trainer.data.errors import DataError, first_bad

CLICK, LIKE, CART, PURCHASE = range(len(EVENT_TYPES))
CONVERSION_EVENTS = (LIKE, PURCHASE)  # what makes an item a session's conversion
LIKE_MIN_RATING = 4.0


def parse_events(values: pd.Series, path: Path | None = None, column: str = "event") -> np.ndarray:
    """int8 event codes from strings (case and spaces ignored, aliases accepted, missing/empty = click).

    An unknown string raises DataError naming `path`, `column` and its row (ValueError without a path)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        raw, uniques = values.cat.codes.to_numpy(), values.cat.categories
    else:
        raw, uniques = pd.factorize(values)  # missing → -1
    names = pd.Series(np.asarray(uniques, dtype=object), dtype="string").str.strip().str.lower().fillna("")
    names = names.replace({"": "click", **EVENT_ALIASES})
    lookup = np.r_[pd.Index(EVENT_TYPES).get_indexer(names.to_numpy(object)), CLICK]  # [-1] = missing → click
    codes = lookup[raw].astype(np.int8)
    bad = codes < 0
    if bad.any():
        why = f"unknown event type, expected one of {', '.join(EVENT_TYPES)}"
        if path is not None:
            raise first_bad(path, column, bad, values, why)
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"column {column!r}: row {i}: {why} ({values.iloc[i]!r})")
    return codes


def event_column(codes: np.ndarray) -> pd.Categorical:
    """Event codes as the loader stores them: a pandas Categorical over EVENT_TYPES."""
    return pd.Categorical.from_codes(codes, categories=list(EVENT_TYPES))


def rating_events(rating: np.ndarray) -> np.ndarray:
    """The ML-100K rule: `like` where rating ≥ LIKE_MIN_RATING (4), else `click` (missing rating: click)."""
    r = np.asarray(rating, dtype=np.float64)
    return np.where(r >= LIKE_MIN_RATING, LIKE, CLICK).astype(np.int8)


def event_codes(df: pd.DataFrame) -> np.ndarray:
    """Event code per row of an interactions frame: its `event` column, else the rating rule, else click."""
    if "event" in df.columns:
        return parse_events(df["event"])
    if "rating" in df.columns:
        return rating_events(df["rating"].to_numpy(np.float64, na_value=np.nan))
    return np.zeros(len(df), np.int8)
