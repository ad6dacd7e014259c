"""The indexed, deduplicated, time-ordered training view every channel fits on."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from common.ids import IdMap, column_distinct, sort_order, str_objects
from trainer.data.events import event_codes
from trainer.data.io import item_field_column
from trainer.data.sessions import Sessions
from trainer.data.split import dedupe_pairs, frame_rows, order_interactions

CONTEXT = ("environment", "region")  # context columns kept per interaction


def _indexed(interactions: pd.DataFrame, user_map: IdMap, item_map: IdMap
             ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """`from_frame`'s dedupe, ordering and id mapping done on integer codes of the id columns (factorized once, or
    by the loader): (the other columns of the ordered rows, user index, item index per row, context column values as
    str per row), the maps extended; None
    where the frame needs the general path (non-unique or unordered index, non-integer timestamps, mixed ids)."""
    got = frame_rows(interactions)
    if got is None:
        return None
    rows, users, items = got
    out = []
    for idmap, (codes, values) in ((user_map, users), (item_map, items)):
        codes = codes[rows]
        order, ties = sort_order(values)
        if ties:  # numerically equal ids keep their order of first appearance in the ordered rows (as `sort_ids`)
            seen = pd.unique(codes)
            order = seen[sort_order(values[seen])[0]]
        idmap.extend_sorted(values[order])
        out.append(idmap.indices(values).astype(np.int32)[codes])
    rest = interactions[[c for c in interactions.columns if c not in ("user_id", "item_id", *CONTEXT)]]
    ctx = {}
    for c in CONTEXT:  # each distinct value converted once (shared with the feature build), then taken per row
        if c in interactions.columns:
            d = column_distinct(interactions, c)
            ctx[c] = (str_objects(interactions[c], d) if d is not None else
                      interactions[c].astype(str).to_numpy(object))[rows]
    return rest.take(rows).reset_index(drop=True), out[0], out[1], ctx


@dataclass
class TrainData:
    """Interactions as parallel arrays sorted by (user, time, item), with id maps and attributes.

    `user_idx/item_idx` index into `users`/`items` (IdMaps); `user_ptr[u]:user_ptr[u+1]` is user u's slice;
    `event` holds each interaction's trainer.data.events code (all `click` when the data has none).
    """

    user_map: IdMap
    item_map: IdMap
    user_idx: np.ndarray  # int32, per interaction
    item_idx: np.ndarray  # int32
    ts: np.ndarray  # int64 seconds
    context: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. environment, region (str arrays)
    user_attrs: pd.DataFrame | None = None  # row i = user index i
    item_attrs: pd.DataFrame | None = None  # row i = item index i
    rating: np.ndarray | None = None
    event: np.ndarray | None = None  # int8 EVENT_TYPES code per interaction; None → all click

    def __post_init__(self) -> None:
        if self.event is None:
            self.event = np.zeros(len(self.user_idx), np.int8)

    @classmethod
    def from_frame(cls, interactions: pd.DataFrame, users: pd.DataFrame | None = None,
                   items: pd.DataFrame | None = None, user_map: IdMap | None = None,
                   item_map: IdMap | None = None) -> TrainData:
        """Dedupe, order and index a frame; given id maps are extended (stable), not rebuilt."""
        user_map = IdMap(user_map.ids) if user_map is not None else IdMap()
        item_map = IdMap(item_map.ids) if item_map is not None else IdMap()
        fast = _indexed(interactions, user_map, item_map)
        if fast is not None:
            df, u, i, ctx = fast
        else:
            df = order_interactions(dedupe_pairs(interactions))
            ctx = {c: str_objects(df[c]) for c in CONTEXT if c in df.columns}
            user_map.extend(df["user_id"])
            item_map.extend(df["item_id"])
            u = user_map.lookup(df["user_id"]).astype(np.int32)
            i = item_map.lookup(df["item_id"]).astype(np.int32)
        ts = df["timestamp"].to_numpy(np.int64)
        # order_interactions sorted by external user id; re-sort by internal index, keeping time order
        order = np.lexsort((np.arange(len(df)), u))
        ctx = {c: v[order] for c, v in ctx.items()}
        rating = df["rating"].to_numpy(np.float32)[order] if "rating" in df.columns else None
        event = event_codes(df)[order]
        ua = users.reindex(pd.Index(user_map.ids)).reset_index(drop=True) if users is not None else None
        ia = items.reindex(pd.Index(item_map.ids)).reset_index(drop=True) if items is not None else None
        return cls(user_map, item_map, u[order], i[order], ts[order], ctx, ua, ia, rating, event)

    @property
    def n_users(self) -> int:
        return len(self.user_map)

    @property
    def n_items(self) -> int:
        return len(self.item_map)

    @cached_property
    def user_ptr(self) -> np.ndarray:
        return np.searchsorted(self.user_idx, np.arange(self.n_users + 1)).astype(np.int64)

    @cached_property
    def csr(self) -> sp.csr_matrix:
        """users × items binary matrix (float32)."""
        m = sp.csr_matrix((np.ones(len(self.user_idx), np.float32), (self.user_idx, self.item_idx)),
                          shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    @cached_property
    def item_counts(self) -> np.ndarray:
        return np.bincount(self.item_idx, minlength=self.n_items).astype(np.int64)

    def history(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """User u's items and timestamps, oldest first."""
        a, b = self.user_ptr[u], self.user_ptr[u + 1]
        return self.item_idx[a:b], self.ts[a:b]

    def recent(self, u: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """User u's last `n` items and timestamps, newest first (what the feature server stores)."""
        items, ts = self.history(u)
        return items[::-1][:n], ts[::-1][:n]

    @cached_property
    def sessions(self) -> Sessions:
        """The interactions' sessions (30-minute gap) with each session's conversion (trainer.data.sessions)."""
        return Sessions.build(self.user_idx, self.item_idx, self.ts, self.event)

    @cached_property
    def category_column(self) -> str | None:
        return item_field_column(self.item_attrs, "category")

    @cached_property
    def item_category(self) -> tuple[np.ndarray, list[str]]:
        """(primary category code per item, -1 if unknown; category names). Multi-valued → first value."""
        got = self._field("category")
        return got if got is not None else (np.full(self.n_items, -1, np.int32), [])

    def item_field(self, field: str) -> np.ndarray | None:
        """int32 code per item of a side-information field (`category`, `brand`, `market`, or a column name),
        -1 where unknown; None when the items have no such column. Codes index `item_field_names(field)`."""
        got = self._field(field)
        return None if got is None else got[0]

    def item_field_names(self, field: str) -> list[str] | None:
        """The (sorted) values that the codes of `item_field(field)` stand for; None without the column."""
        got = self._field(field)
        return None if got is None else got[1]

    def _field(self, field: str) -> tuple[np.ndarray, list[str]] | None:
        """(codes, names) of an item field, computed once; a multi-valued value (`a|b`) counts as its first part."""
        cache = self.__dict__.setdefault("_field_cache", {})
        if field not in cache:
            col = item_field_column(self.item_attrs, field)
            got = None
            if col is not None:
                s = self.item_attrs[col].astype("string").str.split("|").str[0]
                codes, names = pd.factorize(s, sort=True)
                got = (codes.astype(np.int32), [str(x) for x in names])
            cache[field] = got
        return cache[field]
