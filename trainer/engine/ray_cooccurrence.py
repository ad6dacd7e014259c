"""ItemCF and UserCF on Ray: sharded co-occurrence with a reduce and a per-shard top-K.

ItemCF (pair path): map task s sums the forward pairs whose first item is in item block s (`itemcf.pair_rows`) and
returns that block cut into one column piece per block; reduce task t joins its own row block F[t, :] with the
pieces F[:, t] of every map (the transposed, backward pairs), weights, normalises and keeps each row's top-K
(`itemcf.score_rows`, `sparse_top_k`). ItemCF (all-pairs product path): one task per row block. UserCF: one task
per run of user chunks (`usercf.similarity_rows`). The inputs go to the object store once (`ray.put`); each row
adds the same terms in the same order as the local fit, so the lists are identical.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from trainer.channels import itemcf, usercf
from trainer.channels.base import NeighborArtifact
from trainer.channels.neighbors import sparse_top_k
from trainer.data.train_data import TrainData


def item_blocks(prep: itemcf.ItemCFInputs, n_blocks: int) -> list[tuple[int, int]]:
    """Contiguous item ranges with about the same number of pair anchors each (at least one item per block)."""
    n = prep.n_items
    n_blocks = max(1, min(n_blocks, n))
    anchors = np.bincount(prep.items, weights=np.minimum(prep.remaining, max(prep.max_d, 1)).astype(np.float64),
                          minlength=n)
    cum = np.cumsum(anchors)
    cuts = [0]
    for b in range(1, n_blocks):
        at = int(np.searchsorted(cum, cum[-1] * b / n_blocks, side="right")) if cum[-1] > 0 else n * b // n_blocks
        cuts.append(min(max(at, cuts[-1] + 1), n - (n_blocks - b)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@ray.remote
def _forward_pieces(prep: itemcf.ItemCFInputs, lo: int, hi: int, cuts: list[int]) -> list[sp.csr_matrix]:
    """Map: the forward co-occurrence of rows [lo, hi), cut into column pieces at `cuts`."""
    rows = itemcf.pair_rows(prep, lo, hi)
    return [rows[:, a:b].tocsr() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


@ray.remote
def _reduce_block(prep: itemcf.ItemCFInputs, lo: int, hi: int, *pieces: sp.csr_matrix
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Reduce: rows [lo, hi) = forward·F[t, :] + backward·F[:, t]ᵀ, scored, top-K. `pieces`: the block's own row
    pieces F[t, u] for every block u, then the column pieces F[s, t] of every block s."""
    p = prep.params
    s = len(pieces) // 2
    forward = sp.hstack(pieces[:s], format="csr")
    backward = sp.vstack(pieces[s:], format="csr").T.tocsr()
    co = (p.forward_weight * forward + p.backward_weight * backward).tocsr()
    co.eliminate_zeros()
    co = itemcf.score_rows(co, lo, prep)
    nb, sc = sparse_top_k(co, p.top_k, self_offset=lo)
    return nb, sc, int(co.nnz)


@ray.remote
def _product_block(prep: itemcf.ItemCFInputs, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, int]:
    """All-pairs path: rows [lo, hi) of the symmetric product, scored, top-K."""
    co = itemcf.score_rows(itemcf.product_rows(prep, lo, hi), lo, prep)
    nb, sc = sparse_top_k(co, prep.params.top_k, self_offset=lo)
    return nb, sc, int(co.nnz)


def fit_itemcf(ch: itemcf.ItemCF, data: TrainData, shards: int) -> dict[str, Any]:
    """Fit `ch` (an ItemCF channel) with sharded tasks; returns the engine stats."""
    t0 = time.perf_counter()
    p: itemcf.ItemCFParams = ch.params
    prep = itemcf.prepare(data, p)
    blocks = item_blocks(prep, shards)
    t_prep = time.perf_counter()
    ref = ray.put(prep)
    t_put = time.perf_counter()
    if prep.plain:
        outs = ray.get([_product_block.remote(ref, lo, hi) for lo, hi in blocks])
    else:
        cuts = [lo for lo, _ in blocks] + [prep.n_items]
        s = len(blocks)
        maps = [_forward_pieces.options(num_returns=s).remote(ref, lo, hi, cuts) for lo, hi in blocks]
        maps = [m if isinstance(m, list) else [m] for m in maps]
        outs = ray.get([_reduce_block.remote(ref, lo, hi, *maps[t], *[maps[m][t] for m in range(s)])
                        for t, (lo, hi) in enumerate(blocks)])
    t_tasks = time.perf_counter()
    nb = np.concatenate([o[0] for o in outs])
    sc = np.concatenate([o[1] for o in outs])
    ch.n_pairs = prep.n_pairs
    ch.stats = {"interactions_used": int(len(prep.items)), "pairs": int(prep.n_pairs),
                "nnz": int(sum(o[2] for o in outs))}
    ch._artifacts = {"i2i": NeighborArtifact(nb, sc)}
    return {"blocks": len(blocks), "prepare_s": round(t_prep - t0, 3), "put_s": round(t_put - t_prep, 3),
            "tasks_s": round(t_tasks - t_put, 3), "gather_s": round(time.perf_counter() - t_tasks, 3)}


@ray.remote
def _user_chunks(prep: usercf.UserCFInputs, chunks: list[tuple[int, int]]) -> tuple[int, np.ndarray, np.ndarray, int]:
    """Users of consecutive chunks: (first user, ids, scores, non-zeros)."""
    got = [usercf.similarity_rows(prep, a, b) for a, b in chunks]
    return chunks[0][0], np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]), \
        sum(g[2] for g in got)


def fit_usercf(ch: usercf.UserCF, data: TrainData, shards: int) -> dict[str, Any]:
    """Fit `ch` (a UserCF channel) with one task per run of user chunks; returns the engine stats."""
    t0 = time.perf_counter()
    p: usercf.UserCFParams = ch.params
    prep = usercf.prepare(data, p)
    chunks = usercf.chunk_bounds(prep)
    # at least `shards` tasks: split the users evenly when the memory budget made fewer chunks
    if len(chunks) < shards and data.n_users >= shards:
        edges = np.unique(np.r_[[a for a, _ in chunks], np.linspace(0, data.n_users, shards + 1).astype(int)])
        chunks = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    groups = [list(g) for g in np.array_split(np.arange(len(chunks)), min(shards, len(chunks))) if len(g)]
    t_prep = time.perf_counter()
    ref = ray.put(prep)
    t_put = time.perf_counter()
    outs = ray.get([_user_chunks.remote(ref, [chunks[i] for i in g]) for g in groups])
    t_tasks = time.perf_counter()
    ids = np.full((data.n_users, p.top_k), -1, np.int32)
    scores = np.zeros((data.n_users, p.top_k), np.float32)
    for start, i, s, _ in outs:
        ids[start:start + len(i)], scores[start:start + len(s)] = i, s
    ch.stats = {"interactions_used": prep.interactions_used, "nnz": int(sum(o[3] for o in outs))}
    ch._artifacts = {"u2u": NeighborArtifact(ids, scores)}
    return {"tasks": len(groups), "prepare_s": round(t_prep - t0, 3), "put_s": round(t_put - t_prep, 3),
            "tasks_s": round(t_tasks - t_put, 3), "gather_s": round(time.perf_counter() - t_tasks, 3)}
