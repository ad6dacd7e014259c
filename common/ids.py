"""Stable mapping between external ids (strings) and contiguous internal indices.

Append-only: a new dataset extends the map, and existing ids keep their index, so artifacts of
different channel versions share one index space.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import redis


def str_codes(values) -> tuple[np.ndarray, np.ndarray] | None:
    """(int64 code per value, the distinct values as str objects in first-appearance order) for a column of str or
    of integers without missing values, else None. The strings are pandas' `astype(str)` of each value, converted
    once per distinct value instead of once per row (10M rows of ~500k ids: ~0.5 s instead of ~10 s)."""
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if pd.api.types.infer_dtype(s, skipna=False) not in ("string", "integer"):
        return None  # mixed objects (1 and 1.0 hash alike but print differently): convert every row
    codes, uniq = pd.factorize(s)
    if len(codes) and codes.min() < 0:
        return None
    return codes.astype(np.int64, copy=False), pd.Series(uniq).astype(str).to_numpy(object)


def distinct_values(s: pd.Series) -> tuple[np.ndarray, pd.Series] | None:
    """(int64 code per row, the distinct values in first-appearance order, missing included), so that a per-value
    conversion runs once per distinct value; None where factorizing may merge values that print differently
    (floats: 0.0 and -0.0; mixed objects: 1, 1.0 and True hash alike)."""
    if getattr(s.dtype, "kind", "") == "f" or (
            s.dtype == object and pd.api.types.infer_dtype(s, skipna=True) not in ("string", "empty")):
        return None
    codes, uniq = pd.factorize(s, use_na_sentinel=False)
    return codes.astype(np.int64, copy=False), pd.Series(uniq)


def column_distinct(df: pd.DataFrame, column: str) -> tuple[np.ndarray, pd.Series] | None:
    """`distinct_values(df[column])`, once per tracked frame (`frame_memo`)."""
    def compute():
        d = distinct_values(df[column])
        return d if d is None else (d[0].astype(np.int32), d[1])  # int32: kept with the frame

    return frame_memo(df, ("distinct", column), (column,), compute)


def str_objects(s: pd.Series, d: tuple[np.ndarray, pd.Series] | None = None) -> np.ndarray:
    """`s.astype(str).to_numpy(object)` converted once per distinct value (missing stays missing); the rows share
    one str object per value, which also saves ~50 bytes a row over a string per row. `d`: `distinct_values(s)`
    when already known."""
    d = distinct_values(s) if d is None else d
    if d is None:
        return s.astype(str).to_numpy(object)
    return d[1].astype(str).to_numpy(object)[d[0]] if len(d[0]) else np.empty(0, object)


# loaded frame id → (weakref to the frame, {memo key: (the columns it was computed from, value)})
_FRAMES: dict[int, tuple[weakref.ref, dict]] = {}


def _same_column(kept: pd.Series, now: pd.Series) -> bool:
    """Whether `now` still holds the data of `kept` (the same buffer, not equal values)."""
    if kept.dtype != now.dtype or len(kept) != len(now):
        return False
    if isinstance(kept.dtype, np.dtype):
        a, b = kept.to_numpy(), now.to_numpy()  # views of the column's block, no copy
        return a.__array_interface__["data"] == b.__array_interface__["data"] and a.strides == b.strides
    return kept.array is now.array


def track_frame(df: pd.DataFrame) -> None:
    """Let `frame_memo` keep what is computed from `df` (a loaded interactions frame) while `df` lives."""
    key = id(df)
    entry = _FRAMES.get(key)
    if entry is None or entry[0]() is not df:
        _FRAMES[key] = (weakref.ref(df, lambda _, key=key: _FRAMES.pop(key, None)), {})


def frame_memo(df: pd.DataFrame, name: tuple, columns: tuple[str, ...], compute):
    """`compute()`, computed once per frame given to `track_frame` while its `columns` hold the same data (elsewhere
    computed on each call), so that the dedupe, ordering, id maps and features share one factorization and one
    sort of a 10M-row log. The memo keeps a reference to each column: under copy-on-write, writing into the frame
    then copies the column, which tells a changed column from the one the value was computed on."""
    entry = _FRAMES.get(id(df))
    if entry is None or entry[0]() is not df or not all(c in df.columns for c in columns):
        return compute()
    hit = entry[1].get(name)
    if hit is not None and all(_same_column(k, df[c]) for k, c in zip(hit[0], columns, strict=True)):
        return hit[1]
    value = compute()
    entry[1][name] = (tuple(df[c] for c in columns), value)
    return value


def remember_codes(df: pd.DataFrame, column: str, codes: np.ndarray, values: np.ndarray) -> None:
    """Record that `df[column]` is `values[codes]` (distinct str values in first-appearance order; what `str_codes`
    gives), e.g. the loader's factorization, for `id_codes`."""
    track_frame(df)
    frame_memo(df, ("codes", column), (column,), lambda: (codes, values))


def id_codes(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """`str_codes(df[column])`, computed once per tracked frame (`frame_memo`)."""
    return frame_memo(df, ("codes", column), (column,), lambda: str_codes(df[column]))


def sort_order(uniq: np.ndarray) -> tuple[np.ndarray, bool]:
    """(stable order that sorts distinct str ids as `sort_ids` does, whether two ids tie: numerically equal ids
    such as "7" and "07", whose order then is their order in `uniq`)."""
    num = pd.to_numeric(pd.Series(uniq, dtype=object), errors="coerce")
    if len(uniq) and not num.isna().any() and (num == num.round()).all():
        key = num.to_numpy()
        order = np.argsort(key, kind="stable")
        ranked = key[order]
        return order, bool((ranked[1:] == ranked[:-1]).any())
    return np.argsort(np.asarray(uniq, dtype=object), kind="stable"), False


def sort_ids(values) -> np.ndarray:
    """Distinct ids as strings, numerically ordered when all are integers, else lexicographically."""
    fast = str_codes(values)
    uniq = fast[1] if fast is not None else pd.unique(pd.Series(values, dtype="string").astype(str))
    return np.asarray(uniq, dtype=object)[sort_order(uniq)[0]]


class IdMap:
    """External id ↔ index; `ids[i]` is the external id of index i."""

    def __init__(self, ids=()):
        self.ids: list[str] = [str(x) for x in ids]
        self._index = {x: i for i, x in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("duplicate ids in IdMap")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, ext: str) -> bool:
        return ext in self._index

    def get(self, ext: str, default: int = -1) -> int:
        return self._index.get(ext, default)

    def extend(self, values) -> int:
        """Append ids not yet present (in `sort_ids` order); returns how many were added."""
        return self.extend_sorted(sort_ids(values))

    def extend_sorted(self, ids) -> int:
        """Append the distinct str ids `ids` not yet present, in their order; returns how many were added."""
        index = self._index
        new = [x for x in ids if x not in index]
        index.update(zip(new, range(len(self.ids), len(self.ids) + len(new)), strict=True))
        self.ids.extend(new)
        return len(new)

    def indices(self, ids) -> np.ndarray:
        """int64 index of each str id (-1 for unknown)."""
        get = self._index.get
        return np.fromiter((get(x, -1) for x in ids), np.int64, len(ids))

    def lookup(self, values) -> np.ndarray:
        """Indices of `values` (int64, -1 for unknown), vectorised through pandas."""
        fast = str_codes(values)
        if fast is not None:  # look up each distinct id once
            codes, uniq = fast
            return pd.Index(self.ids, dtype=object).get_indexer(uniq).astype(np.int64)[codes]
        codes = pd.Index(self.ids).get_indexer(pd.Index(pd.Series(values, dtype="string").astype(str)))
        return codes.astype(np.int64)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.ids)

    @classmethod
    def from_bytes(cls, value: bytes | None) -> IdMap:
        return cls(orjson.loads(value) if value else [])

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> IdMap:
        return cls.from_bytes(Path(path).read_bytes())


def load_id_map(stores, entity: str) -> IdMap:
    """The published id map for 'item' or 'user' (empty if none)."""
    return IdMap.from_bytes(stores("meta").get(stores.keyspace.id_map(entity)))


def publish_id_map(stores, entity: str, idmap: IdMap, retries: int = 5) -> None:
    """Store an extended id map; refuses to shrink or reorder the published one. Compare-and-set (WATCH): a map
    another writer published between our read and our write is re-read and checked again, never overwritten."""
    meta, ks = stores("meta"), stores.keyspace
    key, data = ks.id_map(entity), idmap.to_bytes()
    with meta.pipeline(transaction=True) as pipe:
        for _ in range(retries):
            try:
                pipe.watch(key)
                old = IdMap.from_bytes(pipe.get(key))
                if old.ids != idmap.ids[: len(old)]:
                    raise ValueError(f"{entity} id map must extend the published one (append-only)")
                pipe.multi()
                pipe.set(key, data)
                pipe.set(ks.id_map_len(entity), len(idmap))
                pipe.execute()
                return
            except redis.WatchError:
                continue
    raise RuntimeError(f"{entity} id map: {retries} concurrent publishes in a row won the race; try again")
