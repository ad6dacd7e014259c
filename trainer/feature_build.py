"""Batch feature build (a nightly stage; `python -m trainer features` runs it alone): user and item feature
records from a dataset, published as a new `features` version.

Record formats are those of common/features.py. Everything per interaction is vectorised with pandas/numpy;
the only Python loop builds one JSON record per user / item from precomputed arrays.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from tqdm import tqdm

from common.ids import column_distinct, distinct_values, id_codes
from common.keyspace import FEATURES_CHANNEL, Keyspace, pack_json
from common.publish import Publisher
from common.redis_conn import RedisStores
from common.redis_url import resolve_redis_url
from common.settings import Settings
from trainer.data.errors import DataError
from trainer.data.io import Dataset, load_dataset
from trainer.data.split import dedupe_pairs, frame_rows, order_interactions

log = logging.getLogger(__name__)

SEEN_CAP = 5000  # distinct clicked items kept in a user record's "seen"
CREATED_COLUMNS = ("created_at_ts", "created_ts")
CONTEXT_COLUMNS = ("environment", "region")
_MISSING_TEXT = ("", "nan", "<NA>", "None", "NaN")
VERIFY_SAMPLE = 20
_ID = "\x00id\x00"  # placeholder id: where a key name holds the id


def _text(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(stripped string values as object array, mask of present values); '', 'nan', NA count as missing."""
    st = s.astype("string").str.strip()
    ok = (st.notna() & ~st.isin(_MISSING_TEXT)).to_numpy(bool)
    return st.fillna("").to_numpy(object), ok


def _ptr(sorted_codes: np.ndarray, n: int) -> np.ndarray:
    """Group boundaries of a sorted code array: group g is [ptr[g], ptr[g+1])."""
    return np.searchsorted(sorted_codes, np.arange(n + 1)).astype(np.int64)


def _text_codes(s: pd.Series, d: tuple[np.ndarray, pd.Series] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(code per row of its present `_text` value, -1 where missing; the sorted values the codes stand for), with
    `_text` run on the distinct values only (`d`: `distinct_values(s)` when already known)."""
    d = distinct_values(s) if d is None else d
    if d is None:
        vals, ok = _text(s)
        vcodes, names = pd.factorize(pd.Series(vals[ok], dtype=object), sort=True)
        out = np.full(len(s), -1, np.int64)
        out[ok] = vcodes
        return out, np.asarray(names, dtype=object)
    rows, uniq = d
    vals, ok = _text(uniq)
    vcodes, names = pd.factorize(pd.Series(vals[ok], dtype=object), sort=True)
    per_value = np.full(len(uniq), -1, np.int64)
    per_value[ok] = vcodes
    return per_value[rows], np.asarray(names, dtype=object)


def _positions(index: pd.Index, s: pd.Series) -> np.ndarray:
    """`index.get_indexer(s)`, looked up once per distinct value."""
    d = distinct_values(s)
    return index.get_indexer(s) if d is None else index.get_indexer(d[1])[d[0]]


def _id_codes(inter: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, distinct ids as str in first-appearance order) of an interactions id column; the loader's
    factorization when the frame is the one it loaded."""
    got = id_codes(inter, column)
    if got is None:
        codes, uniq = pd.factorize(inter[column].astype(str).to_numpy(object))
        got = codes.astype(np.int64, copy=False), np.asarray(uniq, dtype=object)
    return got


def _distinct_str(s: pd.Series) -> np.ndarray:
    """`pd.unique(s.astype(str))` (first-appearance order), converted once per distinct value."""
    d = distinct_values(s)
    return pd.unique(s.astype(str)) if d is None else pd.unique(d[1].astype(str).to_numpy(object))


def _value_counts(codes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (group, value) counts as (group, value, count), ordered by group, count desc, value asc."""
    vcodes, names = pd.factorize(pd.Series(values, dtype=object), sort=True)
    return _code_counts(codes, vcodes, np.asarray(names, dtype=object))


def _code_counts(codes: np.ndarray, vcodes: np.ndarray, names: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
    """`_value_counts` of values given as codes into the sorted `names`."""
    if len(names) == 0:
        return np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.int64)
    flat = codes.astype(np.int64) * len(names) + vcodes
    size = (int(codes.max()) + 1) * len(names) if len(codes) else 0
    if size <= max(4 * len(flat), 1 << 20):  # a count per possible (group, value): no sort
        counts = np.bincount(flat, minlength=size)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(flat, return_counts=True)
    g, v = keys // len(names), keys % len(names)
    order = np.lexsort((v, -counts, g))
    return g[order], np.asarray(names, dtype=object)[v[order]], counts[order]


def _mode_per_group(codes: np.ndarray, values: pd.Series, n: int,
                    d: tuple[np.ndarray, pd.Series] | None = None) -> np.ndarray:
    """Most frequent present value per group code (ties: smallest value); None where a group has none."""
    vcodes, names = _text_codes(values, d)
    ok = vcodes >= 0
    out = np.full(n, None, dtype=object)
    g, v, _ = _code_counts(codes[ok], vcodes[ok], names)
    first = np.r_[True, g[1:] != g[:-1]] if len(g) else np.empty(0, bool)
    out[g[first]] = v[first]
    return out


def _attr_rows(table: pd.DataFrame | None, ids: pd.Index) -> tuple[list[str], list[list[Any]] | None, np.ndarray]:
    """(columns, JSON-safe row per id or None, mask of ids present in the table)."""
    if table is None or table.shape[1] == 0:
        return [], None, np.zeros(len(ids), bool)
    sub = table.reindex(ids)
    for c in sub.columns:
        if pd.api.types.is_datetime64_any_dtype(sub[c]):
            sub[c] = sub[c].map(lambda t: None if pd.isna(t) else t.isoformat())
    rows = sub.astype(object).where(sub.notna(), None).to_numpy().tolist()
    return [str(c) for c in sub.columns], rows, ids.isin(table.index)


def primary_category(dataset: Dataset) -> pd.Series | None:
    """First value of the item category column (multi-valued `a|b` → `a`), indexed by item id; None if no column."""
    col = dataset.category_column
    if col is None:
        return None
    vals, ok = _text(dataset.items[col].astype("string").str.split("|").str[0])
    return pd.Series(np.where(ok, vals, None), index=dataset.items.index, dtype=object)


@dataclass
class UserFeatures:
    """Per-user arrays (index = position in `ids`) from which records are built."""

    ids: pd.Index
    clicks: np.ndarray
    first_ts: np.ndarray
    last_ts: np.ndarray
    hist_ptr: np.ndarray  # deduplicated history, newest first, grouped by user
    hist_item: np.ndarray
    hist_ts: np.ndarray
    cat_ptr: np.ndarray  # top categories, grouped by user, best first
    cat_name: np.ndarray
    cat_n: np.ndarray
    environment: np.ndarray
    region: np.ndarray
    attr_cols: list[str]
    attr_rows: list[list[Any]] | None
    has_attrs: np.ndarray
    recent_n: int
    top_n: int

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def id_list(self) -> list[str]:
        return self.ids.tolist()

    def record(self, u: int) -> dict[str, Any]:
        a, b = self.hist_ptr[u], self.hist_ptr[u + 1]
        items, ts = self.hist_item[a:b], self.hist_ts[a:b]
        c0, c1 = self.cat_ptr[u], self.cat_ptr[u + 1]
        clicks = int(self.clicks[u])
        return {
            "user_id": self.id_list[u],
            "clicks": clicks,
            "recent": [[i, t] for i, t in zip(items[:self.recent_n].tolist(), ts[:self.recent_n].tolist(), strict=True)],
            "top_categories": [[c, n] for c, n in zip(self.cat_name[c0:c1].tolist(), self.cat_n[c0:c1].tolist(),
                                                      strict=True)],
            "environment": self.environment[u],
            "region": self.region[u],
            "first_ts": int(self.first_ts[u]) if clicks else None,
            "last_ts": int(self.last_ts[u]) if clicks else None,
            "attrs": dict(zip(self.attr_cols, self.attr_rows[u], strict=True)) if self.has_attrs[u] else {},
            "seen": items[:SEEN_CAP].tolist(),
        }

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(user id, `record(u)`) of every user, the per-user arrays converted to lists once, not per record."""
        ptr, cat_ptr = self.hist_ptr.tolist(), self.cat_ptr.tolist()
        hist_item, hist_ts, n_recent = self.hist_item, self.hist_ts, self.recent_n
        cat_name, cat_n = self.cat_name.tolist(), self.cat_n.tolist()
        clicks, first, last = self.clicks.tolist(), self.first_ts.tolist(), self.last_ts.tolist()
        env, region, has = self.environment.tolist(), self.region.tolist(), self.has_attrs.tolist()
        cols, attr_rows = self.attr_cols, self.attr_rows
        block, start, item_list, ts_list = 20_000, 0, [], []
        for u, uid in enumerate(self.id_list):
            if u % block == 0:  # the histories of the next `block` users as lists (not a list per user)
                start, end = ptr[u], ptr[min(u + block, len(ptr) - 1)]
                item_list, ts_list = hist_item[start:end].tolist(), hist_ts[start:end].tolist()
            a, b = ptr[u] - start, ptr[u + 1] - start
            items = item_list[a:b]
            ts = ts_list[a:min(b, a + n_recent)]
            c0, c1 = cat_ptr[u], cat_ptr[u + 1]
            n = clicks[u]
            yield uid, {
                "user_id": uid,
                "clicks": n,
                "recent": list(map(list, zip(items[:n_recent], ts, strict=True))),
                "top_categories": list(map(list, zip(cat_name[c0:c1], cat_n[c0:c1], strict=True))),
                "environment": env[u],
                "region": region[u],
                "first_ts": first[u] if n else None,
                "last_ts": last[u] if n else None,
                "attrs": dict(zip(cols, attr_rows[u], strict=True)) if has[u] else {},
                "seen": items[:SEEN_CAP] if len(items) > SEEN_CAP else items,
            }


def compute_user_features(dataset: Dataset, recent_n: int = 50, top_n: int = 5) -> UserFeatures:
    """User features of every user with interactions or an attribute row (see common/features.py)."""
    inter = dataset.interactions
    user_codes, item_codes = _id_codes(inter, "user_id"), _id_codes(inter, "item_id")
    user_src = [user_codes[1]] + ([_distinct_str(pd.Series(dataset.users.index))] if dataset.users is not None else [])
    ids = pd.Index(pd.unique(np.concatenate(user_src)), dtype=object)
    n = len(ids)
    codes = user_codes[0]  # the interactions' users come first in `ids`, in the same order
    ts = inter["timestamp"].to_numpy(np.int64)

    # raw interactions: clicks (repeats count), first/last activity, categories, context modes
    clicks = np.bincount(codes, minlength=n)
    first_ts = np.full(n, np.iinfo(np.int64).max, np.int64)
    last_ts = np.full(n, np.iinfo(np.int64).min, np.int64)
    np.minimum.at(first_ts, codes, ts)
    np.maximum.at(last_ts, codes, ts)

    cat_ptr, cat_name, cat_n = np.zeros(n + 1, np.int64), np.empty(0, object), np.empty(0, np.int64)
    primary = primary_category(dataset)
    if primary is not None:  # each distinct item's category once, then its code per row
        rows, uniq = item_codes
        cats = primary.reindex(pd.Index(uniq, dtype=object)).to_numpy(object)
        present = pd.notna(cats)
        vc, names = pd.factorize(pd.Series(cats[present], dtype=object), sort=True)
        per_item = np.full(len(uniq), -1, np.int64)
        per_item[present] = vc
        vcodes = per_item[rows]
        ok = vcodes >= 0
        g, name, cnt = _code_counts(codes[ok], vcodes[ok], np.asarray(names, dtype=object))
        ptr = _ptr(g, n)
        keep = np.arange(len(g)) - ptr[g] < top_n  # rank within the user's group
        cat_ptr, cat_name, cat_n = _ptr(g[keep], n), name[keep], cnt[keep]

    context = {}
    for col in CONTEXT_COLUMNS:
        vals = (_mode_per_group(codes, inter[col], n, column_distinct(inter, col)) if col in inter.columns
                else np.full(n, None, dtype=object))
        if dataset.users is not None and col in dataset.users.columns:  # fallback: the user attribute
            attr, ok = _text(dataset.users[col].reindex(ids))
            fill = pd.isna(vals) & ok
            vals[fill] = attr[fill]
        context[col] = vals

    # deduplicated interactions (earliest occurrence of each pair), newest first per user
    got = frame_rows(inter)
    if got is not None:
        rows = got[0][::-1]
        dcodes = codes[rows]
        order = np.argsort(dcodes, kind="stable")
        hist_item = item_codes[1][item_codes[0][rows[order]]]
        hist_ts = ts[rows[order]]
    else:
        ded = order_interactions(dedupe_pairs(inter[["user_id", "item_id", "timestamp"]]))
        dcodes = _positions(ids, ded["user_id"])[::-1]
        order = np.argsort(dcodes, kind="stable")
        hist_item = ded["item_id"].to_numpy(object)[::-1][order]
        hist_ts = ded["timestamp"].to_numpy(np.int64)[::-1][order]
    hist_ptr = _ptr(dcodes[order], n)

    attr_cols, attr_rows, has_attrs = _attr_rows(dataset.users, ids)
    return UserFeatures(ids, clicks, first_ts, last_ts, hist_ptr, hist_item, hist_ts, cat_ptr, cat_name, cat_n,
                        context["environment"], context["region"], attr_cols, attr_rows, has_attrs, recent_n, top_n)


@dataclass
class ItemFeatures:
    """Per-item arrays (index = position in `ids`) from which records are built."""

    ids: pd.Index
    clicks: np.ndarray
    created_ts: np.ndarray  # object: int or None
    category: np.ndarray  # object: str or None
    attr_cols: list[str]
    attr_rows: list[list[Any]] | None
    has_attrs: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def id_list(self) -> list[str]:
        return self.ids.tolist()

    def record(self, i: int) -> dict[str, Any]:
        return {"item_id": self.id_list[i], "clicks": int(self.clicks[i]), "created_ts": self.created_ts[i],
                "category": self.category[i],
                "attrs": dict(zip(self.attr_cols, self.attr_rows[i], strict=True)) if self.has_attrs[i] else {}}

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for i in range(len(self.ids)):
            yield self.id_list[i], self.record(i)


def compute_item_features(dataset: Dataset) -> ItemFeatures:
    """Item features of every clicked or listed item: popularity (raw clicks), created time, primary category."""
    inter, items = dataset.interactions, dataset.items
    codes, uniq = _id_codes(inter, "item_id")
    src = [uniq] + ([_distinct_str(pd.Series(items.index))] if items is not None else [])
    ids = pd.Index(pd.unique(np.concatenate(src)), dtype=object)
    clicks = np.bincount(codes, minlength=len(ids))  # the interactions' items come first in `ids`
    created = np.full(len(ids), None, dtype=object)
    col = next((c for c in CREATED_COLUMNS if items is not None and c in items.columns), None)
    if col is not None:
        s = pd.to_numeric(items[col], errors="coerce").reindex(ids)
        ok = s.notna().to_numpy()
        created[ok] = s[ok].astype(np.int64).to_numpy().tolist()
    primary = primary_category(dataset)
    category = primary.reindex(ids).to_numpy(object) if primary is not None else np.full(len(ids), None, object)
    category = np.where(pd.isna(category), None, category)
    attr_cols, attr_rows, has_attrs = _attr_rows(items, ids)
    return ItemFeatures(ids, clicks, created, category, attr_cols, attr_rows, has_attrs)


def publish_features(stores: RedisStores, dataset: Dataset, settings: Settings, progress: bool = True,
                     owner: str | None = None) -> str:
    """Compute user and item features and publish them as a new `features` version (kept on disk under
    ARTIFACTS_DIR/features/ for `trainer republish`); returns the version. `owner`: the run writing it."""
    ks = stores.keyspace
    users = compute_user_features(dataset, recent_n=settings.recent_n, top_n=settings.top_categories_n)
    items = compute_item_features(dataset)
    pub = Publisher(stores, FEATURES_CHANNEL, grace_s=settings.version_grace_s, pending_ttl_s=settings.pending_ttl_s,
                    keep=settings.keep_versions, owner=owner, archive_root=settings.artifacts_dir)
    ver = pub.begin()
    rng = random.Random(0)
    checks: list[tuple[str, str, bytes]] = []  # (store, key, expected value) spot checks for verify

    def packed(store: str, keyf, table) -> Iterator[tuple[str, bytes]]:
        sample = set(rng.sample(range(len(table)), min(VERIFY_SAMPLE, len(table))))
        pre, _, post = keyf(ver, _ID).partition(_ID)  # the key names embed the id as is: one concatenation a key
        dumps, opt = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY  # common.keyspace.pack_json, without a call per record
        for j, (ext, rec) in enumerate(table.records()):
            key, value = pre + ext + post, dumps(rec, option=opt)
            if j in sample or j == 0:
                if key != keyf(ver, ext) or value != pack_json(rec):
                    raise RuntimeError(f"feature key/value of {ext!r} differs from the keyspace's / pack_json's")
                checks.append((store, key, value))
            yield key, value

    counts = {}
    for store, keyf, table, what in (("user_features", ks.user_features, users, "users"),
                                     ("item_features", ks.item_features, items, "items")):
        with tqdm(total=len(table), desc=f"publish features: {what}", unit=what[:-1], disable=not progress,
                  leave=False) as bar:
            counts[what] = pub.write(store, packed(store, keyf, table), progress=bar.update, artifact=store)
        if counts[what] != len(table):
            raise RuntimeError(f"wrote {counts[what]} {what} records, expected {len(table)}")

    def verify() -> None:
        for store, key, expected in checks:
            got = stores(store).get(key)
            if got is None:
                raise RuntimeError(f"key {key!r} missing in store {store!r}")
            if got != expected:
                raise RuntimeError(f"key {key!r} in store {store!r} does not hold the record written")

    manifest = {"n_users": counts["users"], "n_items": counts["items"], "n_interactions": len(dataset.interactions),
                "recent_n": settings.recent_n, "top_categories_n": settings.top_categories_n, "seen_cap": SEEN_CAP,
                "dataset": dataset.name, "category_column": dataset.category_column}
    version = pub.commit(manifest, verify=verify)
    log.info("features version %s: %d users, %d items", version, counts["users"], counts["items"])
    return version


def run_features_cli(data: Path, settings: Settings, progress: bool = True) -> int:
    """`python -m trainer features`: build and publish features from DATA, print the version; the exit code."""
    try:
        url = resolve_redis_url(settings)
        dataset = load_dataset(data)
    except (RuntimeError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stores = RedisStores(url, Keyspace.from_settings(settings))
    try:
        version = publish_features(stores, dataset, settings, progress=progress)
    finally:
        stores.close()
    print(version)
    return 0
