"""The inputs of the YouTubeDNN tower (common/towers/youtube_dnn.py) built from the training data: user attributes
(a zip/postcode column as the category of its prefix), the token bags of item fields, the quantile edges of the
continuous features and of the example age, and the example-age feature itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.towers.youtube_dnn import powers, quantile_cdf
from trainer.data.io import item_field_column
from trainer.data.train_data import TrainData
from trainer.nn.encoding import TOWER, codes_from_vocab, encode_attrs, encode_column, value_strings

ZIP_NAMES = ("zip", "postcode", "postal")


def zip_prefix_column(name: str, values: pd.Series, n_chars: int) -> tuple[np.ndarray, dict[str, int], int] | None:
    """A zip/postcode column as the category of its first `n_chars` characters: (codes [n_rows], vocab mapping
    every spelling of each *raw* value to its prefix's code — what a request sends —, number of codes), or None."""
    raw = values.reset_index(drop=True)
    col = encode_column(name, raw.astype("string").str.strip().str[:n_chars], options=TOWER)
    if col is None:
        return None
    codes = col.codes[:, 0].astype(np.int64)
    uniq = pd.DataFrame({"v": raw.astype(object), "c": codes})[raw.notna().to_numpy()].drop_duplicates("v")
    vocab = {key: int(c) for v, c in zip(uniq["v"], uniq["c"], strict=True) if c > 0 for key in value_strings(v)}
    return codes, vocab, col.size


@dataclass
class UserAttrs:
    """The tower's categorical user attributes: columns, their vocabularies and sizes, codes [n_users, A]."""

    columns: list[str]
    vocab: dict[str, Any]
    sizes: list[int]
    codes: np.ndarray


def user_attrs(ua: pd.DataFrame | None, n_users: int, zip_prefix: int) -> UserAttrs:
    """Single-valued user attribute codes; zip/postcode columns by their first `zip_prefix` characters (0: dropped)."""
    zips = [c for c in (ua.columns if ua is not None else []) if any(z in str(c).lower() for z in ZIP_NAMES)]
    enc = encode_attrs(ua.drop(columns=zips) if ua is not None else None, n_users, multi_valued=False,
                       max_numeric_values=2000)
    cols, vocab, sizes = list(enc.columns), dict(enc.vocab), list(enc.sizes)
    codes = [enc.codes[:, :, 0]] if enc.columns else []
    for z in zips if zip_prefix > 0 else []:
        got = zip_prefix_column(str(z), ua[z], zip_prefix)
        if got is not None:
            cols.append(str(z))
            vocab[str(z)], codes = got[1], codes + [got[0][:, None]]
            sizes.append(got[2])
    return UserAttrs(cols, vocab, sizes,
                     (np.hstack(codes) if codes else np.zeros((n_users, 1), np.int64)).astype(np.int64))


@dataclass
class ItemTokens:
    """Token bags of item fields offset into one table: table int64 [n_items + 1, F, W] (0 = none), the columns
    used, the table size, each field's {column, vocab, offset}."""

    table: np.ndarray
    used: list[str]
    size: int
    vocab: list[dict[str, Any]]


def item_tokens(data: TrainData, token_fields: list[str]) -> ItemTokens:
    """Each item's codes in each token field (absent fields skipped), offset into one table."""
    fields: list[np.ndarray] = []
    size, used, vocab = 1, [], []
    for f in dict.fromkeys(token_fields):
        col = item_field_column(data.item_attrs, f)
        if col is None or col in used:
            continue
        cc = encode_column(col, data.item_attrs[col], multi=True, options=TOWER) if data.n_items else None
        if cc is None:
            continue
        c = np.where(cc.codes > 0, cc.codes + size - 1, 0)  # code k ≥ 1 → row size-1+k; rare/none → 0
        fields.append(c)
        vocab.append({"column": col, "vocab": cc.vocab, "offset": size - 1})
        size += cc.size - 1
        used.append(col)
    width = max((f.shape[1] for f in fields), default=1)
    tok = np.zeros((data.n_items + 1, max(len(fields), 1), width), np.int64)
    for j, f in enumerate(fields):
        tok[: data.n_items, j, : f.shape[1]] = f
    return ItemTokens(tok, used, size, vocab)


def extend_item_tokens(old: np.ndarray, vocab: list[dict[str, Any]], data: TrainData, n_old: int) -> np.ndarray:
    """A published token table [n_old + 1, F, W] grown to `data`'s items (new rows coded by the published vocab)."""
    new = np.zeros((data.n_items - n_old, *old.shape[1:]), np.int64)
    for j, f in enumerate(vocab):
        if data.item_attrs is not None and f["column"] in data.item_attrs.columns and len(new):
            c = codes_from_vocab(data.item_attrs[f["column"]].iloc[n_old:], f["vocab"], True, old.shape[2])
            new[:, j] = np.where(c > 0, c + f["offset"], 0)
    return np.concatenate([old[:n_old], new, old[n_old:]])


def quantile_edges(values: np.ndarray, n_quantiles: int, force_zero: bool = False) -> np.ndarray:
    """float32 [Q+1]: the quantiles of `values` (0 … Q when empty); the first one 0 with `force_zero`."""
    if len(values) == 0:
        return np.arange(n_quantiles + 1, dtype=np.float32)
    e = np.quantile(values, np.linspace(0, 1, n_quantiles + 1)).astype(np.float32)
    if force_zero:
        e[0] = 0.0
    return e


def continuous_edges(data: TrainData, cand: np.ndarray, cand_user: np.ndarray, recent_n: int,
                     n_quantiles: int) -> np.ndarray:
    """[2, Q+1]: quantiles of log1p(history length) and log1p(last gap, where known) over the candidates."""
    start = data.user_ptr[cand_user]
    n = np.minimum(cand - start, recent_n)
    has2 = cand - 2 >= start
    t1, t2 = data.ts[cand - 1], data.ts[np.maximum(cand - 2, 0)]
    known = has2 & (t1 > 0) & (t2 > 0)
    gap = np.maximum(t1 - t2, 0)[known]
    return np.stack([quantile_edges(np.log1p(n).astype(np.float64), n_quantiles),
                     quantile_edges(np.log1p(gap).astype(np.float64), n_quantiles)])


def age_edges(data: TrainData, cand: np.ndarray, cutoff: int, n_quantiles: int) -> np.ndarray:
    """float32 [Q+1]: quantiles of the candidates' log example age, the first one 0 (age 0 is the served value)."""
    return quantile_edges(log_age(data, cand, cutoff).astype(np.float64), n_quantiles, force_zero=True)


def log_age(data: TrainData, positions: np.ndarray, cutoff: int) -> np.ndarray:
    """log1p(cut-off − the example's time), ≥ 0: the raw example age of the examples at `positions`."""
    return np.log1p(np.maximum(cutoff - data.ts[positions], 0))


def example_age(data: TrainData, positions: np.ndarray, cutoff: int, age_edges: np.ndarray) -> torch.Tensor:
    """[B, 3]: the normalised example age of training examples at `positions` (powers of its CDF; 0 at age 0)."""
    age = torch.as_tensor(log_age(data, positions, cutoff), dtype=torch.float32)
    return powers(quantile_cdf(age, torch.as_tensor(age_edges)))
