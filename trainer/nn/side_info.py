"""Item side information of the embedding models (EGES): every usable item column, date strings as years, the
category/brand/market columns categorical, encoded by the kit's `encode_attrs` (bags for `a|b` columns)."""

from __future__ import annotations

import pandas as pd

from trainer.data.io import item_field_column
from trainer.data.train_data import TrainData
from trainer.nn.encoding import AttrEncoding, encode_attrs


def side_info_frame(attrs: pd.DataFrame | None, columns: list[str] | None = None) -> tuple[pd.DataFrame | None, list[str]]:
    """The item attribute columns used as side information, with date strings turned into years (ml-100k's
    release date → release year); returns (frame, columns to encode as categories: years and category/brand/market)."""
    if attrs is None:
        return None, []
    if columns is not None:
        missing = [c for c in columns if c not in attrs.columns]
        if missing:
            raise ValueError(f"eges: side_info columns {missing} not in the items table (has {list(attrs.columns)})")
        attrs = attrs[columns]
    out, categorical = attrs.copy(), []
    for col in attrs.columns:
        s = attrs[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            txt = s.dropna().astype(str)
            if len(txt) and txt.str.contains(r"\d", regex=True).all() and txt.str.contains(r"[-/ ]", regex=True).all():
                parsed = pd.to_datetime(s, errors="coerce", format="mixed")
                if parsed.notna().sum() >= 0.9 * s.notna().sum():
                    out[col] = parsed.dt.year.astype("Int64")
                    categorical.append(col)
    for fld in ("category", "brand", "market"):
        col = item_field_column(out, fld)
        if col is not None:
            categorical.append(col)
    return out, categorical


def encode_side_info(data: TrainData, columns: list[str] | None = None) -> AttrEncoding:
    """Side-information fields of every item (kit encoder: bags for `a|b` columns, code 0 = rare/unknown)."""
    frame, categorical = side_info_frame(data.item_attrs, columns)
    return encode_attrs(frame, data.n_items, multi_valued=True, categorical=categorical)
