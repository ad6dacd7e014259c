"""The nightly's side of item registration (`POST /items` of the feature server): registered items join the
dataset's items table and the item id map, so a new item without events gets features, an index and, in the
side-information channels, a cold-start vector and i2i lists."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pandas as pd

from trainer.data.io import Dataset

log = logging.getLogger(__name__)


def registered_frame(registered: dict[str, dict[str, Any]], columns: list[str] | None = None) -> pd.DataFrame:
    """Items table rows (index item_id) of registered items; with `columns`, only those columns (others dropped)."""
    df = pd.DataFrame.from_dict(registered, orient="index") if registered else pd.DataFrame()
    df.index = pd.Index([str(i) for i in df.index], name="item_id")
    if columns is not None:
        dropped = sorted(set(df.columns) - set(columns))
        if dropped:
            log.warning("registered items: attributes %s are not columns of the items table; ignored", dropped)
        df = df.reindex(columns=columns)
    return df


def merge_registered(dataset: Dataset, registered: dict[str, dict[str, Any]]) -> tuple[Dataset, list[str]]:
    """(dataset whose items table also holds the registered items, registered ids in sorted order). For an id
    the items file already lists, the file's row wins; numeric columns of the file stay numeric."""
    if not registered:
        return dataset, []
    items = dataset.items
    new = registered_frame(registered, list(items.columns) if items is not None else None)
    if items is not None:
        new = new[~new.index.isin(items.index)]
        for col in items.columns:
            if pd.api.types.is_numeric_dtype(items[col]):
                new[col] = pd.to_numeric(new[col], errors="coerce")
        merged = pd.concat([items, new]) if len(new) else items
    else:
        merged = new
    return replace(dataset, items=merged), sorted(registered)
