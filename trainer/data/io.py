"""Load a dataset directory (standard or click-log format) into validated pandas frames.

Standard format: `interactions.csv|parquet` (user_id,item_id,timestamp[,rating][,context columns...]),
optional `users.csv|parquet` and `items.csv|parquet` attribute tables.
Click-log format: `click_log.csv|parquet` (user_id, article_id, timestamp, environment, region) and
`articles.csv|parquet` (article_id, category_id, created_at_ts, words_count), mapped to the same schema.
Timestamps are integer seconds; integer values above 1e11 are taken as milliseconds, and strings are
parsed as dates. An optional `event` column is validated against trainer.data.events.EVENT_TYPES.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.ids import distinct_values, remember_codes, str_codes, track_frame
from trainer.data.errors import DataError, first_bad
from trainer.data.events import event_column, parse_events

CATEGORY_COLUMNS = ("category_id", "category", "genres", "genre")
# item side-information fields recognised by name: field → its columns, the first present one is used
ITEM_FIELDS = {"category": CATEGORY_COLUMNS, "brand": ("brand_id", "brand"), "market": ("market_id", "market")}
# interaction columns that are not context columns
CORE_COLUMNS = ("user_id", "item_id", "timestamp", "rating", "event")
CLICK_LOG_ALIASES = {"article_id": "item_id", "click_article_id": "item_id", "click_timestamp": "timestamp",
                     "click_environment": "environment", "click_region": "region"}
ARTICLE_ALIASES = {"article_id": "item_id"}
MS_THRESHOLD = 1e11


@dataclass
class Dataset:
    """Raw (not deduplicated) interactions plus optional attribute tables, ids as strings."""

    interactions: pd.DataFrame
    users: pd.DataFrame | None = None  # indexed by user_id
    items: pd.DataFrame | None = None  # indexed by item_id
    name: str = "dataset"

    @property
    def category_column(self) -> str | None:
        """The item column used as 'category' (first of category_id, category, genres, genre)."""
        return self.item_field_column("category")

    def item_field_column(self, field: str) -> str | None:
        """The item column of a side-information field (`category`, `brand`, `market`, or a column name)."""
        return item_field_column(self.items, field)

    @property
    def context_columns(self) -> list[str]:
        return [c for c in self.interactions.columns if c not in CORE_COLUMNS]


def item_field_column(items: pd.DataFrame | None, field: str) -> str | None:
    """The first column of `items` among ITEM_FIELDS[field] (any other name: that column), or None."""
    if items is None:
        return None
    return next((c for c in ITEM_FIELDS.get(field, (field,)) if c in items.columns), None)


def _find(directory: Path, stem: str) -> Path | None:
    for ext in (".parquet", ".csv"):
        p = directory / f"{stem}{ext}"
        if p.exists():
            return p
    return None


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype_backend="numpy_nullable")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if df.empty:
        raise DataError(f"{path}: file has a header but no rows")
    return df


def _require(path: Path, df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def _ids(path: Path, df: pd.DataFrame, column: str) -> tuple[pd.Series, tuple[np.ndarray, np.ndarray] | None]:
    """(the id column as stripped str objects, (code per row, distinct ids in first-appearance order) or None)."""
    s = df[column]
    bad = s.isna().to_numpy()
    if bad.any():
        raise first_bad(path, column, bad, s, "missing id")
    fast = str_codes(s)
    if fast is not None:  # the same conversion, on each distinct id once
        codes, uniq = fast
        stripped = pd.Series(uniq, dtype=object).astype(str).str.strip().to_numpy(object)
        empty = (stripped == "")[codes]
        if empty.any():
            raise first_bad(path, column, empty, pd.Series(stripped[codes]), "empty id")
        merged, values = pd.factorize(stripped)  # ids equal once stripped share a code
        codes = merged.astype(np.int32)[codes]  # int32: kept with the frame (common.ids.frame_memo)
        values = np.asarray(values, dtype=object)
        return pd.Series(values[codes], index=s.index, name=column, dtype=object), (codes, values)
    s = s.astype(str).str.strip()
    empty = (s == "").to_numpy()
    if empty.any():
        raise first_bad(path, column, empty, s, "empty id")
    return s.astype(object), None


def _text_column(s: pd.Series) -> pd.Series:
    """`s.astype(str).fillna("")`, converted once per distinct value."""
    d = distinct_values(s)
    if d is None:
        return s.astype(str).fillna("")
    codes, uniq = d
    return uniq.astype(str).fillna("").take(codes).set_axis(s.index).rename(s.name)


def parse_timestamps(path: Path, column: str, s: pd.Series) -> np.ndarray:
    """Integer seconds from ints (ms if > 1e11), floats, or date strings; errors name the first bad row."""
    if s.isna().any():
        raise first_bad(path, column, s.isna().to_numpy(), s, "missing timestamp")
    num = pd.to_numeric(s, errors="coerce")
    if not num.isna().any():
        arr = num.to_numpy(dtype=np.float64)
        if len(arr) and np.nanmedian(arr) > MS_THRESHOLD:
            arr = arr / 1000.0
        return np.floor(arr).astype(np.int64)
    dt = pd.to_datetime(s.astype(str), errors="coerce", utc=True, format="mixed")
    # a mostly numeric column is numeric: its first non-number is the bad row (not its first number)
    bad = (num.isna() if num.notna().sum() > dt.notna().sum() else dt.isna()).to_numpy()
    if bad.any():
        raise first_bad(path, column, bad, s, "unparsable timestamp")
    # resolution-independent (pandas may parse to s, ms, us or ns units)
    return ((dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _attributes(path: Path, df: pd.DataFrame, id_col: str) -> pd.DataFrame:
    _require(path, df, (id_col,))
    ids = _ids(path, df, id_col)[0]
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise first_bad(path, id_col, dup, ids, "duplicate id")
    out = df.drop(columns=[id_col]).copy()
    out.index = pd.Index(ids.to_numpy(), name=id_col)
    return out


def load_interactions_frame(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Validate and normalise an interactions frame (ids → str, timestamp → int seconds, event → its name)."""
    _require(path, df, ("user_id", "item_id", "timestamp"))
    out = df.copy(deep=False)  # copy-on-write: the columns replaced below are never copied
    out["user_id"], user_codes = _ids(path, df, "user_id")
    out["item_id"], item_codes = _ids(path, df, "item_id")
    out["timestamp"] = parse_timestamps(path, "timestamp", df["timestamp"])
    if "rating" in out.columns:
        r = pd.to_numeric(out["rating"], errors="coerce")
        bad = r.isna().to_numpy() & out["rating"].notna().to_numpy()
        if bad.any():
            raise first_bad(path, "rating", bad, out["rating"], "not a number")
        out["rating"] = r.astype("float32")
    if "event" in out.columns:  # a Categorical of the vocabulary (lower case, aliases resolved, missing = click)
        out["event"] = event_column(parse_events(df["event"], path, "event"))
    for c in out.columns:
        if c not in CORE_COLUMNS:
            out[c] = _text_column(out[c])
    out = out.reset_index(drop=True)
    track_frame(out)  # factorized once here, reused by the dedupe, ordering, id maps and features
    for column, codes in (("user_id", user_codes), ("item_id", item_codes)):
        if codes is not None:
            remember_codes(out, column, *codes)
    return out


def load_dataset(directory: str | Path) -> Dataset:
    """Load and validate a dataset directory in either supported format."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory")
    inter = _find(d, "interactions")
    users_p, items_p = _find(d, "users"), _find(d, "items")
    if inter is not None:
        interactions = load_interactions_frame(inter, _read(inter))
    else:
        log_p = _find(d, "click_log")
        if log_p is None:
            raise DataError(f"{d}: no interactions.csv|parquet (or click_log.csv|parquet) found")
        raw = _read(log_p).rename(columns=CLICK_LOG_ALIASES)
        interactions = load_interactions_frame(log_p, raw)
        items_p = items_p or _find(d, "articles")
    users = _attributes(users_p, _read(users_p), "user_id") if users_p else None
    items = None
    if items_p:
        raw_items = _read(items_p).rename(columns=ARTICLE_ALIASES)
        items = _attributes(items_p, raw_items, "item_id")
        for col in ("created_at_ts", "created_ts"):
            if col in items.columns:
                items[col] = parse_timestamps(items_p, col, items[col])
    return Dataset(interactions=interactions, users=users, items=items, name=d.resolve().name)
