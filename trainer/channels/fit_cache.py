"""One training for several channels (`share_fit`): the latest fits of this process by training key, each reused
on the very same TrainData object by every other channel once (docs/channels.md, multitask_two_tower)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from trainer.data.train_data import TrainData

MAX_FITS = 2  # fits kept at most (the oldest goes first)


@dataclass
class _CacheEntry:
    data: weakref.ref
    consumers: set[str]
    fitted: Any


_FITS: OrderedDict[str, _CacheEntry] = OrderedDict()  # training key → the latest fit


def cached_fit(key: str, data: TrainData, channel: str) -> Any | None:
    """The fit with this key on this very `data` object, unless `channel` already used it (a channel fitting
    again — e.g. the evaluator's timing repeats — trains afresh)."""
    entry = _FITS.get(key)
    if entry is None or entry.data() is not data or channel in entry.consumers:
        return None
    entry.consumers.add(channel)
    return entry.fitted


def store_fit(key: str, data: TrainData, channel: str, fitted: Any) -> None:
    """Keep `fitted` (trained by `channel` on `data`) for the other channels with the same key."""
    _FITS[key] = _CacheEntry(weakref.ref(data), {channel}, fitted)
    _FITS.move_to_end(key)
    while len(_FITS) > MAX_FITS:
        _FITS.popitem(last=False)
