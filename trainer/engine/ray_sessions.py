"""item2vec on Ray: the users' click sessions (its walks) are cut in parallel tasks, one per range of users, and
come back as numpy token arrays; the skip-gram training (gensim, whose pair building is internal and not
distributable) runs as one task on the cluster. Sessions never span users, so the sentences, and with one gensim
worker the vectors, are those of the local fit.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from trainer.channels.item2vec import Item2VecChannel, Item2VecParams, train_word2vec
from trainer.data.sessions import split_sessions


def user_ranges(user_ptr: np.ndarray, n_shards: int) -> list[tuple[int, int]]:
    """Interaction ranges [a, b) that start and end at user boundaries, about equal in size."""
    n = int(user_ptr[-1])
    if n == 0:
        return []
    want = np.linspace(0, n, max(1, n_shards) + 1)
    cuts = np.unique(user_ptr[np.searchsorted(user_ptr, want[1:-1])].tolist() + [0, n])
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))


@ray.remote
def _session_tokens(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, a: int, b: int,
                    gap_s: int | None, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Sessions of interactions [a, b) with at least `min_len` items: (tokens, length per session)."""
    sess = split_sessions(user_idx[a:b], ts[a:b], gap_s)
    starts = np.flatnonzero(np.r_[True, np.diff(sess) != 0])
    lengths = np.diff(np.r_[starts, len(sess)])
    keep = np.repeat(lengths >= min_len, lengths)
    return np.asarray(item_idx[a:b][keep], np.int32), lengths[lengths >= min_len].astype(np.int64)


@ray.remote
def _word2vec(p: Item2VecParams, seed: int, *shards: tuple[np.ndarray, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """gensim on every shard's sessions, in order: (item indices, vectors, sessions)."""
    sentences: list[list[str]] = []
    for tokens, lengths in shards:
        sentences.extend(s.tolist() for s in np.split(tokens.astype(str), np.cumsum(lengths)[:-1]) if len(s))
    if not sentences:
        return np.zeros(0, np.int64), np.zeros((0, p.dim), np.float32), 0
    keys, vectors = train_word2vec(sentences, p, seed)
    return keys, vectors, len(sentences)


def fit_item2vec(ch: Item2VecChannel, refs: dict[str, Any], user_ptr: np.ndarray, n_items: int,
                 shards: int) -> dict[str, Any]:
    """Fit `ch` with sessions cut in `shards` tasks and gensim in one task; returns the engine stats."""
    t0 = time.perf_counter()
    p: Item2VecParams = ch.params
    ch._artifacts = None
    ranges = user_ranges(user_ptr, shards)
    parts = [_session_tokens.remote(refs["user_idx"], refs["item_idx"], refs["ts"], a, b, p.session_gap_s,
                                    p.min_session_len) for a, b in ranges]
    keys, vectors, n_sessions = ray.get(_word2vec.options(num_cpus=p.workers).remote(p, ch.seed, *parts))
    ch.n_sessions = n_sessions
    ch.item_vectors = np.zeros((n_items, p.dim), np.float32)
    ch.has_vector = np.zeros(n_items, bool)
    ch.item_vectors[keys] = vectors
    ch.has_vector[keys] = True
    ch.valid_items = ch.has_vector
    ch.fit_s = time.perf_counter() - t0
    return {"session_tasks": len(ranges), "tasks_s": round(time.perf_counter() - t0, 3)}
