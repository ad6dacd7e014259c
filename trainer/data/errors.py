"""The data layer's error type and the helper that names a bad row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Bad input data; the message names the file, the column and the first bad row."""


def first_bad(path: Path, column: str, mask: np.ndarray, values: pd.Series, why: str) -> DataError:
    """A DataError naming `path`, `column` and the first True row of `mask` (CSV line, or parquet row)."""
    i = int(np.flatnonzero(mask)[0])
    line = f"line {i + 2}" if path.suffix == ".csv" else f"row {i}"
    return DataError(f"{path}: column {column!r}: {line}: {why} ({values.iloc[i]!r})")
