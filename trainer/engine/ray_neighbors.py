"""The batch precompute of neighbour lists and user vectors on Ray, sharded.

`RayNeighborSearch` is the sharded twin of `cosine_neighbors` (the i2i/u2u lists of every embedding channel): the
index is built once here, serialised into the object store, and each task searches whole SEARCH_BATCH blocks of
query rows, so every faiss call gets the inputs of the local one and the lists are identical.
`encode_users_sharded`: a fitted tower channel's user vectors, one task per range of users (4096-aligned, the
local batches).
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np
import ray

from trainer.channels.base import NeighborArtifact
from trainer.channels.neighbors import (
    EXACT_MAX_ROWS,
    SEARCH_BATCH,
    cosine_index,
    normalised_rows,
    search_batch,
)


@ray.remote
def _search(index_bytes: np.ndarray, x: np.ndarray, rows: np.ndarray, starts: list[int], k: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of the query rows of the SEARCH_BATCH blocks at `starts` (rows order)."""
    index = faiss.deserialize_index(index_bytes)
    ids, dist = [], []
    for s in starts:
        i, d = search_batch(index, x, rows, rows[s:s + SEARCH_BATCH], k)
        ids.append(i), dist.append(d)
    return np.concatenate(ids), np.concatenate(dist)


class RayNeighborSearch:
    """Callable like `cosine_neighbors`; records what it did in `stats`."""

    def __init__(self, shards: int):
        self.shards = shards
        self.stats: dict[str, Any] = {}

    def __call__(self, vectors: np.ndarray, k: int, valid: np.ndarray | None = None, progress: bool = False,
                 desc: str = "neighbours", exact_max_rows: int = EXACT_MAX_ROWS) -> NeighborArtifact:
        t0 = time.perf_counter()
        x, rows = normalised_rows(vectors, valid)
        n = len(x)
        nb = np.full((n, k), -1, np.int32)
        sc = np.zeros((n, k), np.float32)
        if len(rows) < 2 or k < 1:
            return NeighborArtifact(nb, sc)
        index = cosine_index(x, rows, k, exact_max_rows)
        index_ref, x_ref, rows_ref = ray.put(faiss.serialize_index(index)), ray.put(x), ray.put(rows)
        blocks = list(range(0, len(rows), SEARCH_BATCH))
        groups = [g.tolist() for g in np.array_split(np.array(blocks), min(self.shards, len(blocks))) if len(g)]
        outs = ray.get([_search.remote(index_ref, x_ref, rows_ref, g, k) for g in groups])
        for g, (ids, dist) in zip(groups, outs, strict=True):
            q = rows[g[0]:min(g[-1] + SEARCH_BATCH, len(rows))]
            m = ids.shape[1]
            nb[q, :m], sc[q, :m] = ids, dist
        self.stats[desc] = {"tasks": len(groups), "seconds": round(time.perf_counter() - t0, 3)}
        return NeighborArtifact(nb, sc)


@ray.remote
def _encode(ch: Any, view: Any, lo: int, hi: int) -> np.ndarray:
    return ch.encode_users(view, np.arange(lo, hi)).astype(np.float32)


def encode_users_sharded(ch_ref: ray.ObjectRef, view_ref: ray.ObjectRef, n_users: int, shards: int,
                         batch: int = 4096) -> np.ndarray:
    """`ch.encode_users(data)` (every user) in `shards` tasks over 4096-aligned ranges of users."""
    blocks = np.arange(0, n_users, batch)
    if len(blocks) == 0:
        return ray.get(_encode.remote(ch_ref, view_ref, 0, 0))
    groups = [g for g in np.array_split(blocks, min(shards, len(blocks))) if len(g)]
    ranges = [(int(g[0]), min(int(g[-1]) + batch, n_users)) for g in groups]
    return np.concatenate(ray.get([_encode.remote(ch_ref, view_ref, a, b) for a, b in ranges]))
