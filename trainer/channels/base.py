"""The shared base of every trained channel, and the artifacts a channel can emit.

A channel fits on `TrainData` and returns artifacts of the kinds of ARCHITECTURE.md (i2i, u2u, u2i
vectors, lists). `recommend` answers through the same retrieval functions the recall server uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from common import retrieval
from common.channel_config import ChannelSpec, ServeParams
from trainer.data.train_data import TrainData


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class NeighborArtifact:
    """Top-K neighbour lists: row r = entity r (item for i2i, user for u2u); -1 pads short rows."""

    neighbors: np.ndarray  # int32 [n, K]
    scores: np.ndarray  # float32 [n, K]


@dataclass
class VectorArtifact:
    """Item and user embeddings; score = <user, item>. `user_tower` is an optional TorchScript file
    computing the user vector from features at request time (see the vector server)."""

    item_vectors: np.ndarray  # float32 [n_items, d]
    user_vectors: np.ndarray  # float32 [n_users, d]
    metric: str = "ip"
    user_tower: bytes | None = None
    user_tower_meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ListArtifact:
    """Named non-personalised lists ('global', 'recent', 'cat:<name>') of (item ids, scores)."""

    lists: dict[str, tuple[np.ndarray, np.ndarray]]


Artifacts = dict[str, Any]  # kind ('i2i' | 'u2u' | 'u2i' | 'list') → artifact


class Channel(ABC):
    """Base class: subclasses set `model`, `kinds`, `Params` and implement `fit` and `artifacts`."""

    model: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # artifact kinds this model emits
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, spec: ChannelSpec, seed: int = 42):
        self.spec = spec
        self.params = self.Params(**spec.params)
        self.seed = seed
        self._artifacts: Artifacts | None = None

    @abstractmethod
    def fit(self, data: TrainData, progress: bool = False) -> None:
        """Train on `data` (vectorised; no Python loops over interactions)."""

    @abstractmethod
    def build_artifacts(self, data: TrainData) -> Artifacts:
        """The artifacts to publish, one per kind in `kinds`."""

    def artifacts(self, data: TrainData) -> Artifacts:
        if self._artifacts is None:
            self._artifacts = self.build_artifacts(data)
        return self._artifacts

    def recommend(self, data: TrainData, users: np.ndarray, k: int, kind: str | None = None,
                  serve: ServeParams | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k unseen items per user through the serving path of artifact `kind`."""
        kind = kind or self.spec.kind
        return recommend_from_artifact(self.artifacts(data)[kind], kind, data, users, k, serve or self.spec.serve)


def recommend_from_artifact(art: Any, kind: str, data: TrainData, users: np.ndarray, k: int,
                            serve: ServeParams) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exactly what the recall server does for one channel, evaluated in memory."""
    out = []
    for u in np.asarray(users):
        seen, _ = data.history(int(u))
        if kind == "i2i":
            recent, _ = data.recent(int(u), serve.recent_n)
            lists = [(art.neighbors[i], art.scores[i]) for i in recent]
            out.append(retrieval.retrieve_i2i(lists, k, serve.recency_decay, serve.per_anchor, seen))
        elif kind == "u2u":
            nb, sims = art.neighbors[u][: serve.per_anchor], art.scores[u][: serve.per_anchor]
            keep = nb >= 0
            nb, sims = nb[keep], sims[keep]
            recents = [data.recent(int(v), serve.neighbor_items)[0] for v in nb]
            out.append(retrieval.retrieve_u2u(sims, recents, k, seen))
        elif kind == "u2i":
            out.append(retrieval.retrieve_vector(art.user_vectors[u], art.item_vectors, k, seen))
        elif kind == "list":
            ids, sc = art.lists[serve.lists[0]]
            out.append(retrieval.retrieve_list(ids, sc, k, seen))
        else:
            raise ValueError(f"unknown artifact kind {kind!r}")
    return out


def top_k_rows(scores: np.ndarray, k: int, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a dense score matrix (ties by ascending column); -1/-inf pad if k > n."""
    n_rows, n_cols = scores.shape
    scores = scores.astype(np.float32, copy=True)
    if exclude_self and n_rows == n_cols:
        np.fill_diagonal(scores, -np.inf)
    kk = min(k, n_cols)
    idx = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    part = np.take_along_axis(scores, idx, axis=1)
    order = np.lexsort((idx, -part), axis=1)
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int32)
    sc = np.take_along_axis(part, order, axis=1)
    bad = ~np.isfinite(sc)
    idx[bad], sc[bad] = -1, 0.0
    if kk < k:
        idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
        sc = np.pad(sc, ((0, 0), (0, k - kk)))
    return idx, sc
