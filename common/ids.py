"""Stable mapping between external ids (strings) and contiguous internal indices.

Append-only: a new dataset extends the map, and existing ids keep their index, so artifacts of
different channel versions share one index space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd


def sort_ids(values) -> np.ndarray:
    """Distinct ids as strings, numerically ordered when all are integers, else lexicographically."""
    uniq = pd.unique(pd.Series(values, dtype="string").astype(str))
    num = pd.to_numeric(pd.Series(uniq), errors="coerce")
    if len(uniq) and not num.isna().any() and (num == num.round()).all():
        order = np.argsort(num.to_numpy(), kind="stable")
    else:
        order = np.argsort(uniq, kind="stable")
    return np.asarray(uniq, dtype=object)[order]


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
        added = 0
        for x in sort_ids(values):
            if x not in self._index:
                self._index[x] = len(self.ids)
                self.ids.append(x)
                added += 1
        return added

    def lookup(self, values) -> np.ndarray:
        """Indices of `values` (int64, -1 for unknown), vectorised through pandas."""
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


def publish_id_map(stores, entity: str, idmap: IdMap) -> None:
    """Store an extended id map; refuses to shrink or reorder the published one."""
    meta, ks = stores("meta"), stores.keyspace
    old = load_id_map(stores, entity)
    if old.ids != idmap.ids[: len(old)]:
        raise ValueError(f"{entity} id map must extend the published one (append-only)")
    pipe = meta.pipeline(transaction=True)
    pipe.set(ks.id_map(entity), idmap.to_bytes())
    pipe.set(ks.id_map_len(entity), len(idmap))
    pipe.execute()
