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
from common.towers import load_tower
from common.towers.rescore import RESCORE_KEY, RescoreSettings, rescore_settings, two_stage
from trainer.data.train_data import TrainData


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RenamedParamError(ValueError):
    """A channel's params use a name that was renamed (one vocabulary across models)."""


# One vocabulary across models: an old name → its new name. A model lists the ones that applied to it in
# `Channel.renamed`; using an old name fails at config load with a message naming the new one.
VOCABULARY = {
    "dim": "dimension of the published vectors",
    "reg": "L2 penalty in the objective (torch optimisers' decoupled term stays `weight_decay`)",
    "bias_reg": "L2 penalty on bias terms, where a model has them apart from `reg`",
    "epochs": "passes over the training data (ALS sweeps included)",
    "lr": "learning rate",
    "batch_size": "examples per optimisation step",
    "top_k": "entries kept per row of a published neighbour list (or list)",
    "u2u_top_k": "entries kept per row of a published u2u list, where a model also publishes i2i lists",
    "negatives": "the negative sampling scheme (a name)",
    "num_negatives": "how many negatives per positive (or per batch, for shared schemes)",
    "negatives_power": "negatives drawn ∝ count^negatives_power",
    "num_threads": "torch/OpenMP threads while fitting",
}


@dataclass
class NeighborArtifact:
    """Top-K neighbour lists: row r = entity r (item for i2i, user for u2u); -1 pads short rows."""

    neighbors: np.ndarray  # int32 [n, K]
    scores: np.ndarray  # float32 [n, K]


@dataclass
class VectorArtifact:
    """Item and user embeddings; score = <user, item>. A user may have K interest vectors ([n_users, K, d]):
    each live one is searched and the results merged by max score. `user_tower` is an optional serialised
    tower computing the user vector(s) from request-time inputs (common/towers; see the vector server)."""

    item_vectors: np.ndarray  # float32 [n_items, d]
    user_vectors: np.ndarray  # float32 [n_users, d] or [n_users, K, d]
    metric: str = "ip"
    user_tower: bytes | None = None
    user_tower_meta: dict[str, Any] = field(default_factory=dict)
    interest_counts: np.ndarray | None = None  # int [n_users]: live interests per user (3-D user_vectors)
    checkpoint: bytes | None = None  # training state an incremental update warm-starts from (trainer/nn/warm_start.py)

    @property
    def n_interests(self) -> int:
        """K: interest vectors per user (1 for a 2-D user_vectors)."""
        return 1 if self.user_vectors.ndim == 2 else int(self.user_vectors.shape[1])

    def published_user_vectors(self) -> np.ndarray:
        """float32 user vectors as published and served: [n_users, d], or [n_users, K, d] with every row past a
        user's interest count zeroed (a zero row is a dead interest: the server and the evaluator skip it)."""
        vecs = np.asarray(self.user_vectors, dtype=np.float32)
        if vecs.ndim == 3 and self.interest_counts is not None:
            dead = np.arange(vecs.shape[1])[None, :] >= np.asarray(self.interest_counts)[:, None]
            if dead.any():
                vecs = vecs.copy()
                vecs[dead] = 0.0
        return vecs


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
    renamed: ClassVar[dict[str, str]] = {}  # old param name → new name (see VOCABULARY)

    def __init__(self, spec: ChannelSpec, seed: int = 42):
        self.spec = spec
        self.check_renamed(spec.params)
        self.params = self.Params(**spec.params)
        self.seed = seed
        self._artifacts: Artifacts | None = None

    @classmethod
    def check_renamed(cls, params: dict[str, Any]) -> None:
        """Raise RenamedParamError naming the new name when `params` use an old one."""
        for old in params:
            if old in cls.renamed:
                raise RenamedParamError(f"params.{old}: renamed to {cls.renamed[old]!r} "
                                        f"(model {cls.model!r}; one vocabulary across models, docs/channels.md)")

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


def user_interests(art: VectorArtifact, u: int) -> np.ndarray:
    """User u's query vector(s) as published: [d], or [K, d] with the rows past its interest count zeroed
    (one user's row of `VectorArtifact.published_user_vectors`)."""
    vecs = art.user_vectors[u]
    if vecs.ndim == 2 and art.interest_counts is not None and int(art.interest_counts[u]) < len(vecs):
        vecs = vecs.copy()
        vecs[max(int(art.interest_counts[u]), 0):] = 0.0
    return vecs


def _offline_i2i(art: NeighborArtifact, data: TrainData, u: int, k: int, serve: ServeParams, seen: np.ndarray):
    recent, _ = data.recent(u, serve.recent_n)
    lists = [(art.neighbors[i], art.scores[i]) for i in recent]
    return retrieval.retrieve_i2i(lists, k, serve.recency_decay, serve.per_anchor, seen)


def _offline_u2u(art: NeighborArtifact, data: TrainData, u: int, k: int, serve: ServeParams, seen: np.ndarray):
    nb, sims = art.neighbors[u][: serve.per_anchor], art.scores[u][: serve.per_anchor]
    keep = nb >= 0
    recents = [data.recent(int(v), serve.neighbor_items)[0] for v in nb[keep]]
    return retrieval.retrieve_u2u(sims[keep], recents, k, seen)


def served_rescorer(art: VectorArtifact) -> tuple[Any, RescoreSettings] | None:
    """(module rebuilt from the published tower bytes, settings) when the artifact's tower rescores (meta "rescore",
    common/towers/rescore.py), else None; rebuilt once per artifact, as the vector server loads it."""
    if art.user_tower is None or RESCORE_KEY not in art.user_tower_meta:
        return None
    cached = art.__dict__.get("_rescorer")
    if cached is None or cached[0] is not art.user_tower:
        module = load_tower(art.user_tower, art.user_tower_meta)
        settings = rescore_settings(art.user_tower_meta, module)
        cached = art.__dict__["_rescorer"] = (art.user_tower, None if settings is None else (module, settings))
    return cached[1]


def _offline_u2i(art: VectorArtifact, data: TrainData, u: int, k: int, serve: ServeParams, seen: np.ndarray):
    q = user_interests(art, u)
    rescorer = served_rescorer(art)
    if rescorer is None:
        return retrieval.retrieve_vectors(q, art.item_vectors, k, seen)
    module, settings = rescorer  # the vector server's Bundle.search_user, the exact search as first stage
    return two_stage(module, q, k, seen, lambda n: retrieval.retrieve_vectors(q, art.item_vectors, n, seen), settings)


def _offline_list(art: ListArtifact, data: TrainData, u: int, k: int, serve: ServeParams, seen: np.ndarray):
    ids, sc = art.lists[serve.lists[0]]
    return retrieval.retrieve_list(ids, sc, k, seen)


# The offline twin of the recall server's RETRIEVERS table: artifact kind → one user's candidates.
OFFLINE_RETRIEVERS = {"i2i": _offline_i2i, "u2u": _offline_u2u, "u2i": _offline_u2i, "list": _offline_list}


def recommend_from_artifact(art: Any, kind: str, data: TrainData, users: np.ndarray, k: int,
                            serve: ServeParams) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exactly what the recall server does for one channel, evaluated in memory."""
    retrieve = OFFLINE_RETRIEVERS.get(kind)
    if retrieve is None:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return [retrieve(art, data, int(u), k, serve, data.history(int(u))[0]) for u in np.asarray(users)]
