"""The training data in Ray's object store: numpy arrays and Arrow tables (`ray.put` once per nightly), never
pickled pandas frames; a task or a Ray Train worker rebuilds a `TrainData` (or the slim `ArrayView`) from them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from common.ids import IdMap
from trainer.data.train_data import TrainData

ARRAYS = ("user_idx", "item_idx", "ts", "event", "rating")


@dataclass
class ShippedData:
    """Object refs of one TrainData: its arrays, the id maps and context columns (Arrow arrays), the attribute
    tables (Arrow tables)."""

    arrays: dict[str, Any]
    context: dict[str, Any]
    user_ids: Any
    item_ids: Any
    user_attrs: Any | None
    item_attrs: Any | None

    def refs(self) -> dict[str, Any]:
        """The array refs by name (what the sharded tasks take)."""
        return self.arrays


def _table(df: pd.DataFrame | None) -> Any | None:
    return None if df is None else ray.put(pa.Table.from_pandas(df, preserve_index=False))


def ship(data: TrainData) -> ShippedData:
    """Put `data` into the object store."""
    arrays = {k: ray.put(np.ascontiguousarray(getattr(data, k))) for k in ARRAYS if getattr(data, k) is not None}
    context = {k: ray.put(pa.array(v.tolist(), pa.string())) for k, v in data.context.items()}
    return ShippedData(arrays, context, ray.put(pa.array(data.user_map.ids, pa.string())),
                       ray.put(pa.array(data.item_map.ids, pa.string())), _table(data.user_attrs),
                       _table(data.item_attrs))


def unship(s: ShippedData) -> TrainData:
    """The TrainData back from the object store (in a task or an actor)."""
    arr = {k: np.asarray(ray.get(r)) for k, r in s.arrays.items()}
    ctx = {k: ray.get(r).to_numpy(zero_copy_only=False).astype(object) for k, r in s.context.items()}

    def frame(ref: Any | None) -> pd.DataFrame | None:
        return None if ref is None else ray.get(ref).to_pandas()

    return TrainData(IdMap(ray.get(s.user_ids).to_pylist()), IdMap(ray.get(s.item_ids).to_pylist()),
                     arr["user_idx"], arr["item_idx"], arr["ts"], ctx, frame(s.user_attrs), frame(s.item_attrs),
                     arr.get("rating"), arr.get("event"))


@dataclass
class ArrayView:
    """The interaction arrays and sizes of a TrainData, without id maps or attributes: what the per-user batch
    precompute reads (`item_idx`, `user_ptr`, `n_users`, `n_items`)."""

    user_idx: np.ndarray
    item_idx: np.ndarray
    ts: np.ndarray
    n_users: int
    n_items: int

    @cached_property
    def user_ptr(self) -> np.ndarray:
        return np.searchsorted(self.user_idx, np.arange(self.n_users + 1)).astype(np.int64)

    @classmethod
    def of(cls, data: TrainData) -> ArrayView:
        return cls(data.user_idx, data.item_idx, data.ts, data.n_users, data.n_items)
