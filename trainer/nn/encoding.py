"""One attribute encoder for FM and every tower: a table's columns → integer codes with a vocabulary.

Per column (row i = entity i):

- **categorical** (strings, bools, integer columns with few levels or named in `categorical`): a vocabulary of
  the values seen at least `min_count` times (at most `max_vocab`, the most frequent), codes 1…V; every
  other value (rare, or unseen at request time) is code 0 — the rare bucket;
- **numeric** (other numbers): `numeric_buckets` quantile buckets (codes 1…), or one code per value when
  there are no more distinct values than buckets; the vocabulary maps every observed value's spellings
  (`24` and `24.0`) to its code, so request-time values encode without the edges;
- **bags** (`multi_valued`): `'a|b|c'` → several codes in one row (mean-pooled: weight 1/n each);
- **id-like columns are dropped**: too few rows hold a kept value (`min_coverage`: ids, titles, URLs, zip
  codes) and/or too many distinct values (`max_unique_fraction`).

The vocabulary format is the user-tower contract (common/towers/inputs.py): value string → code, 0 = unknown.
Missing values are code 0 too (`missing="unknown"`, towers) or leave the row's slot empty (`missing="none"`,
FM: no feature). `encode_attrs` with its defaults gives exactly the codes and vocabularies of the two-tower
channel's original encoder; `fm_options` gives FM's rules (docs/channels.md, "FM").
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

RARE = "<rare>"  # label of code 0: rare, unknown or (missing="unknown") missing values


@dataclass(frozen=True)
class EncodeOptions:
    """How columns are encoded; the defaults are the towers' rules (`TOWER`), `fm_options` FM's."""

    min_count: int = 2  # values seen fewer times fall into the rare bucket (code 0)
    max_vocab: int | None = 2000  # keep at most this many values (the most frequent)
    numeric_buckets: int = 10  # quantile buckets of numeric columns
    max_int_levels: int = 32  # integer columns with at most this many levels are categorical
    categorical: tuple[str, ...] = ()  # integer columns that are categorical whatever their levels
    min_coverage: float | None = 0.5  # id-like: drop when fewer rows hold a kept value (None: no check)
    max_unique_fraction: float | None = None  # id-like: drop when distinct values > this · rows (not bags)
    max_numeric_values: int | None = None  # drop numeric columns with more distinct values (vocab size bound)
    numeric_min_count: bool = False  # numeric buckets/values also fall into code 0 below `min_count` rows
    missing: Literal["unknown", "none"] = "unknown"  # missing value → code 0, or an empty slot (-1)
    order: Literal["frequency", "sorted"] = "frequency"  # order of the categorical codes 1…V
    strip: bool = False  # strip whitespace around every value (bag parts are always stripped)


TOWER = EncodeOptions()


def fm_options(n_bins: int = 10, min_count: int = 2) -> EncodeOptions:
    """FM's rules: numbers with more than `n_bins` values in quantile bins, integers with fewer as categories,
    id-like = more distinct values than half the rows, missing = no feature, codes in sorted value order."""
    return EncodeOptions(min_count=min_count, max_vocab=None, numeric_buckets=n_bins, max_int_levels=n_bins,
                         min_coverage=None, max_unique_fraction=0.5, numeric_min_count=True, missing="none",
                         order="sorted", strip=True)


@dataclass
class ColumnCodes:
    """One encoded column: codes [n_rows, width] (-1 = empty slot; a bag fills several slots of a row)."""

    name: str
    codes: np.ndarray  # int64 [n_rows, width]
    vocab: dict[str, int]  # value spelling → code ≥ 1 (anything else: 0)
    labels: list[str]  # code → label (labels[0] = RARE); len = number of codes, 0 included
    kind: Literal["categorical", "numeric", "bag"]

    @property
    def size(self) -> int:
        return len(self.labels)

    def weights(self) -> np.ndarray:
        """float32 [n_rows, width]: 1/n for each of a row's n filled slots (mean pooling), 0 for empty slots."""
        filled = self.codes >= 0
        n = filled.sum(1, keepdims=True)
        return np.where(filled, 1.0 / np.maximum(n, 1), 0.0).astype(np.float32)


@dataclass
class AttrEncoding:
    """Encoded columns of a table; `codes` stacks them for the towers: [n_rows, n_columns, width], -1 pads."""

    fields: list[ColumnCodes] = field(default_factory=list)
    n_rows: int = 0

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def vocab(self) -> dict[str, dict[str, int]]:
        """column → value string → code (0 = unknown): the `attr_vocab` of a user tower's manifest."""
        return {f.name: f.vocab for f in self.fields}

    @property
    def sizes(self) -> list[int]:
        """Codes per column, 0 included."""
        return [f.size for f in self.fields]

    @property
    def codes(self) -> np.ndarray:
        if not self.fields:
            return np.zeros((self.n_rows, 0, 1), np.int64)
        width = max(f.codes.shape[1] for f in self.fields)
        return np.stack([np.pad(f.codes, ((0, 0), (0, width - f.codes.shape[1])), constant_values=-1)
                         for f in self.fields], axis=1)


def value_strings(v) -> list[str]:
    """The string forms a raw attribute value may arrive in at request time (24 → '24', '24.0')."""
    s = [str(v)]
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        s.append(str(float(v)))
    elif isinstance(v, (float, np.floating)) and float(v).is_integer():
        s.append(str(int(v)))
    return s


def encode_attrs(df: pd.DataFrame | None, n_rows: int, multi_valued: bool | Collection[str] = False,
                 min_count: int = 2, max_vocab: int | None = 2000, numeric_buckets: int = 10,
                 max_int_levels: int = 32, min_coverage: float | None = 0.5, categorical: Collection[str] = (),
                 max_numeric_values: int | None = None, *, options: EncodeOptions | None = None) -> AttrEncoding:
    """Encode every usable column of an attribute table (row i = entity i; the index is ignored).

    `multi_valued`: True → any column holding a '|' becomes a bag; or the names of the bag columns. The keyword
    arguments are those of `EncodeOptions` (defaults: the towers' rules); `options` replaces them all.
    """
    opts = options if options is not None else EncodeOptions(
        min_count=min_count, max_vocab=max_vocab, numeric_buckets=numeric_buckets, max_int_levels=max_int_levels,
        categorical=tuple(categorical), min_coverage=min_coverage, max_numeric_values=max_numeric_values)
    enc = AttrEncoding(n_rows=n_rows)
    if df is None or n_rows == 0:
        return enc
    df = df.reset_index(drop=True)  # positions, whatever the index was
    for col in df.columns:
        multi = multi_valued if isinstance(multi_valued, bool) else col in multi_valued
        fc = encode_column(str(col), df[col], multi, opts)
        if fc is not None:
            enc.fields.append(fc)
    return enc


def user_tower_encoding(attrs: pd.DataFrame | None, n_users: int) -> tuple[AttrEncoding, np.ndarray]:
    """A request-time user tower's attributes: (single-valued encoding, codes [n_users + 1, A] whose last row is the
    unknown user, all unknown; one zero column without attributes)."""
    enc = encode_attrs(attrs, n_users, multi_valued=False, max_numeric_values=2000)
    ua = enc.codes[:, :, 0] if enc.columns else np.zeros((n_users, 1), np.int64)
    return enc, np.vstack([ua, np.zeros((1, ua.shape[1]), np.int64)])


def item_tower_encoding(attrs: pd.DataFrame | None, n_items: int, category_column: str | None) -> AttrEncoding:
    """An item tower's side information: bags of every column, the category column categorical."""
    return encode_attrs(attrs, n_items, multi_valued=True, categorical=(category_column or "",))


def encode_column(name: str, s: pd.Series, multi: bool = False, options: EncodeOptions = TOWER) -> ColumnCodes | None:
    """Codes of one column (row i = position i), or None when it is unusable (empty, id-like, too many values)."""
    o = options
    s = s.reset_index(drop=True)
    present = s.notna().to_numpy()
    if not present.any():
        return None
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        vals = s[present].astype(np.float64).to_numpy()
        uniq = np.unique(vals)
        if np.all(uniq == np.round(uniq)) and (len(uniq) <= o.max_int_levels or name in o.categorical):
            return _categorical(name, s.astype("Int64"), multi, o, int_category=True)  # a category coded as a number
        if o.max_numeric_values is not None and len(uniq) > o.max_numeric_values:
            return None
        return _numeric(name, vals, uniq, present, o)
    return _categorical(name, s, multi, o)


def _numeric(name: str, vals: np.ndarray, uniq: np.ndarray, present: np.ndarray, o: EncodeOptions) -> ColumnCodes:
    bucketed = len(uniq) > o.numeric_buckets
    side = "right" if bucketed else "left"
    edges = np.unique(np.quantile(vals, np.linspace(0, 1, o.numeric_buckets + 1)[1:-1])) if bucketed else uniq
    ucode = 1 + np.searchsorted(edges, uniq, side=side)
    vocab: dict[str, int] = {}
    for u, c in zip(uniq, ucode, strict=True):
        for key in value_strings(int(u) if float(u).is_integer() else float(u)):
            vocab[key] = int(c)
    code = np.full(len(present), 0 if o.missing == "unknown" else -1, np.int64)
    code[present] = 1 + np.searchsorted(edges, vals, side=side)
    size = int(ucode.max()) + 1
    if o.numeric_min_count and o.min_count > 1:
        rare = np.bincount(code[present], minlength=size) < o.min_count
        rare[0] = False
        code = np.where((code > 0) & rare[np.clip(code, 0, None)], 0, code)
        vocab = {k: c for k, c in vocab.items() if not rare[c]}
    if bucketed:
        bounds = [-np.inf, *edges.tolist(), np.inf]
        labels = [RARE] + [f"[{bounds[b]:g}, {bounds[b + 1]:g})" for b in range(size - 1)]
    else:
        labels = [RARE] + [f"{u:g}" for u in uniq]
    return ColumnCodes(name, code[:, None], vocab, labels, "numeric")


def _categorical(name: str, s: pd.Series, multi: bool, o: EncodeOptions, int_category: bool = False) -> ColumnCodes | None:
    n_rows = len(s)
    strs = s.astype("string").fillna("")
    if o.strip:
        strs = strs.str.strip()
    bag = multi and bool(strs.str.contains("|", regex=False).any())
    if bag:
        exploded = strs.str.split("|").explode()
        row = exploded.index.to_numpy()
        vals = exploded.astype(str).str.strip().to_numpy(object)
    else:
        row = np.arange(len(strs))
        vals = strs.astype(str).to_numpy(object)
    keep = vals != ""
    row, vals = row[keep], vals[keep]
    if not len(row):
        return None
    counts = pd.Series(vals).value_counts()
    if o.max_unique_fraction is not None and not multi and len(counts) > o.max_unique_fraction * n_rows \
            and len(counts) > o.numeric_buckets:
        return None  # id-like: a distinct value for most rows
    counts = counts[counts >= o.min_count]
    if o.max_vocab is not None:
        counts = counts.iloc[:o.max_vocab]
    kept = [str(v) for v in counts.index]
    if o.order == "sorted":
        kept.sort()
    vocab = {v: i + 1 for i, v in enumerate(kept)}
    code = pd.Series(vals).map(vocab).fillna(0).to_numpy(np.int64)
    labels = [RARE, *kept]
    if int_category:  # the value may arrive as 3 or 3.0
        vocab.update({str(float(k)): c for k, c in list(vocab.items())})
    if o.min_coverage is not None:
        covered = np.zeros(n_rows, bool)
        covered[row[code > 0]] = True
        if covered.mean() < o.min_coverage:
            return None  # id-like: few rows hold a value seen often enough
    width = int(np.bincount(row, minlength=n_rows).max())
    mat = np.full((n_rows, max(width, 1)), -1, np.int64)
    if o.missing == "unknown":
        mat[:, 0] = 0
    order = np.lexsort((np.arange(len(row)), row))
    r, c = row[order], code[order]
    starts = np.searchsorted(r, r, side="left")
    mat[r, np.arange(len(r)) - starts] = c
    return ColumnCodes(name, mat, vocab, labels, "bag" if bag else "categorical")


def codes_from_vocab(values: pd.Series, vocab: dict[str, int], bag: bool, width: int) -> np.ndarray:
    """int64 [n, width] codes of new rows through a fitted column's vocabulary (what a request-time encoder does):
    a value's spellings (`value_strings`) looked up, unseen or missing → 0; a bag's first `width` parts; -1 pads.
    Encodes rows that arrive after the fit (new users / items between nightlies) without moving existing codes."""
    out = np.full((len(values), max(width, 1)), -1, np.int64)
    out[:, 0] = 0
    for r, v in enumerate(values.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            continue
        parts = [p.strip() for p in str(v).split("|")] if bag else [v]
        codes = [next((vocab[s] for s in value_strings(p) if s in vocab), 0) for p in parts if str(p) != ""]
        if codes:
            codes = codes[:out.shape[1]]
            out[r, :len(codes)] = codes
    return out
