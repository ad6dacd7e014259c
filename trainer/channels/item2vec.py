"""item2vec (Barkan & Koenigstein 2016): skip-gram with negative sampling over users' click sessions.

A session is a run of one user's clicks with no gap longer than `session_gap_s` (30 min by default);
gensim's Word2Vec trains on the sessions (negatives ∝ count^ns_exponent, frequent-item subsampling),
and each item's top-K neighbours by cosine (exact faiss inner-product search on normalised vectors)
are published as i2i lists.
"""

from __future__ import annotations

import logging
import time
import zlib

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from trainer.channels.base import Artifacts, Channel, NeighborArtifact
from trainer.data.train_data import TrainData


def split_sessions(user_idx: np.ndarray, ts: np.ndarray, gap_s: int | None) -> np.ndarray:
    """Session id per interaction (arrays sorted by user, then time): a new session starts at a new user or
    after a gap > `gap_s` seconds (None: one session per user)."""
    n = len(user_idx)
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.ones(n, dtype=bool)
    new_user = user_idx[1:] != user_idx[:-1]
    start[1:] = new_user if gap_s is None else new_user | (np.diff(ts) > gap_s)
    return np.cumsum(start) - 1


def session_sentences(item_idx: np.ndarray, session: np.ndarray, min_len: int = 2) -> list[list[str]]:
    """Sessions as lists of item tokens (item index as str), dropping sessions shorter than `min_len`."""
    if len(item_idx) == 0:
        return []
    cuts = np.flatnonzero(np.diff(session)) + 1
    lengths = np.diff(np.concatenate([[0], cuts, [len(session)]]))
    tokens = item_idx.astype(str)
    return [s.tolist() for s, n in zip(np.split(tokens, cuts), lengths, strict=True) if n >= min_len]


def _crc_hash(s: str) -> int:
    return zlib.crc32(s.encode())  # deterministic across processes, unlike hash()


class Item2VecParams(BaseModel):
    """Hyper-parameters (defaults: best found on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(32, ge=2, le=1024)
    window: int = Field(200, ge=1, le=1000, description="context: items up to this many positions away in a session")
    shrink_windows: bool = Field(True, description="word2vec's random effective window in [1, window]; "
                                 "false = every item within `window` (item2vec's 'whole basket' context)")
    negative: int = Field(3, ge=1, le=100, description="negative samples per positive pair")
    ns_exponent: float = Field(0.75, ge=-2, le=2, description="negatives drawn ∝ count^ns_exponent")
    sample: float = Field(1e-3, ge=0, le=1, description="frequent-item subsampling threshold (0 = off)")
    epochs: int = Field(10, ge=1, le=1000)
    alpha: float = Field(0.025, gt=0, le=1, description="initial learning rate")
    min_count: int = Field(1, ge=1)
    session_gap_s: int | None = Field(1800, ge=0, description="gap that starts a new session; null = whole history")
    min_session_len: int = Field(2, ge=1)
    top_k: int = Field(100, ge=1, le=2000, description="neighbours published per item")
    workers: int = Field(1, ge=1, le=64, description=">1 is faster but not reproducible")


class Item2VecChannel(Channel):
    """Skip-gram item embeddings → cosine i2i lists."""

    model = "item2vec"
    kinds = ("i2i",)
    Params = Item2VecParams

    def fit(self, data: TrainData, progress: bool = False) -> None:
        from gensim.models import Word2Vec  # heavy import, only when fitting

        p: Item2VecParams = self.params
        t0 = time.perf_counter()
        self._artifacts = None
        sessions = split_sessions(data.user_idx, data.ts, p.session_gap_s)
        sentences = session_sentences(data.item_idx, sessions, p.min_session_len)
        self.n_sessions = len(sentences)
        self.item_vectors = np.zeros((data.n_items, p.dim), np.float32)
        self.has_vector = np.zeros(data.n_items, bool)
        if sentences:
            logging.getLogger("gensim").setLevel(logging.INFO if progress else logging.WARNING)
            w2v = Word2Vec(sentences=sentences, vector_size=p.dim, window=p.window, min_count=p.min_count,
                           sg=1, hs=0, negative=p.negative, ns_exponent=p.ns_exponent, sample=p.sample,
                           epochs=p.epochs, alpha=p.alpha, min_alpha=p.alpha * 1e-3, seed=self.seed,
                           workers=p.workers, hashfxn=_crc_hash, sorted_vocab=True, shrink_windows=p.shrink_windows)
            keys = np.array([int(k) for k in w2v.wv.index_to_key], dtype=np.int64)
            self.item_vectors[keys] = w2v.wv.vectors
            self.has_vector[keys] = True
        self.fit_s = time.perf_counter() - t0

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if not hasattr(self, "item_vectors"):
            raise RuntimeError("item2vec: fit() must run before build_artifacts()")
        k = self.params.top_k
        n = data.n_items
        nb = np.full((n, k), -1, np.int32)
        sc = np.zeros((n, k), np.float32)
        idx = np.flatnonzero(self.has_vector)
        if len(idx) > 1:
            vecs = np.ascontiguousarray(self.item_vectors[idx], dtype=np.float32)
            faiss.normalize_L2(vecs)
            index = faiss.IndexFlatIP(vecs.shape[1])
            index.add(vecs)
            kk = min(k + 1, len(idx))
            sims, nn = index.search(vecs, kk)
            own = nn == np.arange(len(idx))[:, None]
            # drop each item itself (wherever ties put it), keep the first k others
            order = np.argsort(own, axis=1, kind="stable")[:, : kk - 1][:, :k]
            nn = np.take_along_axis(nn, order, axis=1)
            sims = np.take_along_axis(sims, order, axis=1)
            ok = nn >= 0
            nb[idx, : nn.shape[1]] = np.where(ok, idx[np.clip(nn, 0, None)], -1)
            sc[idx, : nn.shape[1]] = np.where(ok, sims, 0.0)
        return {"i2i": NeighborArtifact(neighbors=nb, scores=sc)}
