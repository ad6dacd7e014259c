"""The base of every embedding model (in the spirit of implicit's MatrixFactorizationBase): a model writes
`fit`, which sets its vectors, and this base builds the u2i artifact and the i2i / u2u neighbour lists once.

What `fit` sets (attributes of the instance):
    item_vectors     float32 [n_items, d]          u2i item side (score = <user, item>)
    user_vectors     float32 [n_users, d]           one vector per user, or
                     float32 [n_users, K, d]        K interests per user (rows past a user's count are zero)
    interest_counts  int32 [n_users] | None         live interests per user when user_vectors is 3-D
    i2i_vectors      [n_items, d'] | None           vectors of the i2i cosine lists (default: item_vectors)
    u2u_vectors      [n_users, d'] | None           vectors of the u2u cosine lists (default: 2-D user_vectors)
    valid_items      bool [n_items] | None          items that get and can be i2i neighbours (default: all)
    valid_users      bool [n_users] | None          users that get and can be u2u neighbours (default: all)
and optionally overrides `export_user_tower` to publish a request-time user tower (common/towers).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from trainer.channels.base import Artifacts, Channel, NeighborArtifact, VectorArtifact
from trainer.channels.neighbors import cosine_neighbors
from trainer.data.train_data import TrainData


class EmbeddingChannel(Channel):
    """A channel whose artifacts all follow from vectors: subclasses implement `fit` only."""

    metric: ClassVar[str] = "ip"
    user_vectors: np.ndarray | None = None
    interest_counts: np.ndarray | None = None
    i2i_vectors: np.ndarray | None = None
    u2u_vectors: np.ndarray | None = None
    valid_items: np.ndarray | None = None
    valid_users: np.ndarray | None = None
    # the i2i/u2u list search (same signature as cosine_neighbors); the Ray engine sets its sharded twin
    neighbor_search = staticmethod(cosine_neighbors)

    def neighbors_k(self, kind: str) -> int:
        """How many neighbours each published i2i/u2u row keeps: params `top_k` (u2u: `u2u_top_k` if set)."""
        if kind == "u2u" and getattr(self.params, "u2u_top_k", None):
            return int(self.params.u2u_top_k)
        return int(self.params.top_k)

    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]] | None:
        """(serialised tower, manifest meta) of a request-time user tower, or None (precomputed vectors only)."""
        return None

    def training_checkpoint(self) -> bytes | None:
        """Training state that `python -m trainer incremental` warm-starts from (published to disk with the u2i
        artifact), or None: a model without incremental updates."""
        return None

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if getattr(self, "item_vectors", None) is None:
            raise RuntimeError(f"{self.model}: fit() must run before build_artifacts()")
        out: Artifacts = {}
        for kind in self.kinds:
            if kind == "u2i":
                out[kind] = self.vector_artifact(data)
            elif kind in ("i2i", "u2u"):
                out[kind] = self.neighbor_artifact(kind)
            else:
                raise ValueError(f"{self.model}: an embedding channel cannot emit {kind!r}")
        return out

    def vector_artifact(self, data: TrainData) -> VectorArtifact:
        if self.user_vectors is None:
            raise RuntimeError(f"{self.model}: fit() set no user_vectors, which a u2i artifact needs")
        tower = self.export_user_tower(data)
        return VectorArtifact(item_vectors=np.ascontiguousarray(self.item_vectors, np.float32),
                              user_vectors=np.ascontiguousarray(self.user_vectors, np.float32), metric=self.metric,
                              user_tower=None if tower is None else tower[0],
                              user_tower_meta={} if tower is None else tower[1],
                              interest_counts=self.interest_counts, checkpoint=self.training_checkpoint())

    def neighbor_artifact(self, kind: str) -> NeighborArtifact:
        if kind == "i2i":
            vecs = self.i2i_vectors if self.i2i_vectors is not None else self.item_vectors
            valid = self.valid_items
        else:
            vecs = self.u2u_vectors if self.u2u_vectors is not None else self.user_vectors
            if vecs is None or vecs.ndim != 2:
                raise RuntimeError(f"{self.model}: u2u lists need 2-D u2u_vectors (or user_vectors)")
            valid = self.valid_users
        return self.neighbor_search(vecs, self.neighbors_k(kind), valid=valid, desc=f"{self.model} {kind}")
