"""item2vec (Barkan & Koenigstein 2016): skip-gram with negative sampling over users' click sessions.

A session is a run of one user's clicks with no gap longer than `session_gap_s` (30 min by default);
gensim's Word2Vec trains on the sessions (negatives ∝ count^negatives_power, frequent-item subsampling),
and each item's top-K neighbours by cosine (EmbeddingChannel: one batched faiss search over the
normalised vectors) are published as i2i lists.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from trainer.budget import scaled_epochs
from trainer.channels.embedding import EmbeddingChannel
from trainer.data.sessions import split_sessions
from trainer.data.train_data import TrainData


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
    num_negatives: int = Field(3, ge=1, le=100, description="negative samples per positive pair")
    negatives_power: float = Field(0.75, ge=-2, le=2, description="negatives drawn ∝ count^negatives_power")
    sample: float = Field(1e-3, ge=0, le=1, description="frequent-item subsampling threshold (0 = off)")
    epochs: int = Field(10, ge=1, le=1000)
    max_examples: int | None = Field(3_000_000, ge=1, description="scale rule: at most this many session tokens "
                                     "trained per fit, in whole epochs (epochs = clamp(max_examples // tokens, 1, "
                                     "epochs)); None = always `epochs` (docs/channels.md)")
    lr: float = Field(0.025, gt=0, le=1, description="initial learning rate (decays linearly to lr/1000)")
    min_count: int = Field(1, ge=1)
    session_gap_s: int | None = Field(1800, ge=0, description="gap that starts a new session; null = whole history")
    min_session_len: int = Field(2, ge=1)
    top_k: int = Field(100, ge=1, le=2000, description="neighbours published per item")
    workers: int = Field(1, ge=1, le=64, description=">1 is faster but not reproducible")



def train_word2vec(sentences: list[list[str]], p: Item2VecParams, seed: int, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """gensim skip-gram on the sentences: (item indices, their vectors); epochs by the scale rule."""
    from gensim.models import Word2Vec  # heavy import, only when fitting

    epochs = scaled_epochs(p.epochs, sum(len(s) for s in sentences), p.max_examples)

    logging.getLogger("gensim").setLevel(logging.INFO if progress else logging.WARNING)
    w2v = Word2Vec(sentences=sentences, vector_size=p.dim, window=p.window, min_count=p.min_count,
                   sg=1, hs=0, negative=p.num_negatives, ns_exponent=p.negatives_power, sample=p.sample,
                   epochs=epochs, alpha=p.lr, min_alpha=p.lr * 1e-3, seed=seed,
                   workers=p.workers, hashfxn=_crc_hash, sorted_vocab=True, shrink_windows=p.shrink_windows)
    return np.array([int(k) for k in w2v.wv.index_to_key], dtype=np.int64), w2v.wv.vectors


class Item2VecChannel(EmbeddingChannel):
    """Skip-gram item embeddings → cosine i2i lists."""

    model = "item2vec"
    kinds = ("i2i",)
    Params = Item2VecParams
    renamed = {"negative": "num_negatives", "alpha": "lr", "ns_exponent": "negatives_power"}

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: Item2VecParams = self.params
        t0 = time.perf_counter()
        self._artifacts = None
        sessions = split_sessions(data.user_idx, data.ts, p.session_gap_s)
        sentences = session_sentences(data.item_idx, sessions, p.min_session_len)
        self.n_sessions = len(sentences)
        self.item_vectors = np.zeros((data.n_items, p.dim), np.float32)
        self.has_vector = np.zeros(data.n_items, bool)
        if sentences:
            keys, vectors = train_word2vec(sentences, p, self.seed, progress)
            self.item_vectors[keys] = vectors
            self.has_vector[keys] = True
        self.valid_items = self.has_vector  # items never in a session of ≥ min_session_len: no list, no neighbour
        self.fit_s = time.perf_counter() - t0
