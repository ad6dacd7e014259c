"""Popular: non-personalised most-clicked lists — 'global' (all time), 'recent' (last `recent_days` of the
data) and 'cat:<category>' per item category. Ties are broken by ascending item index."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from trainer.channels.base import Artifacts, Channel, ListArtifact
from trainer.data.train_data import TrainData


def ranked(counts: np.ndarray, size: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Items with a positive count (optionally within `mask`), count descending, ties by ascending index."""
    keep = counts > 0
    if mask is not None:
        keep &= mask
    idx = np.flatnonzero(keep)
    order = np.lexsort((idx, -counts[idx]))[:size]
    return idx[order].astype(np.int32), counts[idx[order]].astype(np.float32)


class PopularParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(500, ge=1, le=100_000, description="items per list")
    recent_days: float = Field(7.0, gt=0, description="'recent' counts clicks in the data's last recent_days")
    categories: bool = Field(True, description="also emit one 'cat:<category>' list per item category")


class Popular(Channel):
    """Most-popular lists (kind 'list')."""

    model = "popular"
    kinds = ("list",)
    Params = PopularParams
    renamed = {"size": "top_k"}

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: PopularParams = self.params
        n = data.n_items
        counts = np.bincount(data.item_idx, minlength=n)
        lists = {"global": ranked(counts, p.top_k)}
        if len(data.ts):
            since = data.ts.max() - p.recent_days * 86400.0
            recent = data.ts >= since
            lists["recent"] = ranked(np.bincount(data.item_idx[recent], minlength=n), p.top_k)
        else:
            lists["recent"] = ranked(counts, p.top_k)
        if p.categories:
            codes, names = data.item_category
            for c, name in enumerate(names):
                ids, sc = ranked(counts, p.top_k, codes == c)
                if len(ids):
                    lists[f"cat:{name}"] = (ids, sc)
        self._artifacts = {"list": ListArtifact(lists)}

    def incremental_fit(self, data: TrainData, base, rows: np.ndarray, progress: bool = False) -> dict:  # noqa: ANN001
        """Between nightlies the lists are simply recounted on the data with the new events (a few bincounts)."""
        self.fit(data, progress)
        return {"examples": int(len(rows)), "recounted": True}

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if self._artifacts is None:
            self.fit(data)
        return self._artifacts
