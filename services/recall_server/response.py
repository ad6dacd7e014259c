"""The `items` array of a /recall answer written straight to JSON bytes.

Building 300 `{"item_id", "score"}` dicts and serialising them was ≈ 12 % of a request's CPU. Instead, each
item's `{"item_id":"<id>","score":` prefix is encoded once per id map (`item_fragments`) and a compiled kernel
writes the array from those prefixes and the rounded scores; orjson embeds it as a `Fragment`. The bytes parse to
the same values as `round(score, 6)` (`0.5`, `1`, `0.000001`).
"""

from __future__ import annotations

import numpy as np
import orjson

from common import kernels

ItemFragments = tuple[np.ndarray, np.ndarray]  # (uint8 bytes of every prefix, int64 offsets: item i's is [o[i], o[i+1]))


def item_fragments(item_ids) -> ItemFragments:
    """The JSON prefix of each item of an id map (internal index order)."""
    parts = [b'{"item_id":' + orjson.dumps(i) + b',"score":' for i in item_ids]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(x) for x in parts], out=offsets[1:])
    return np.frombuffer(b"".join(parts), np.uint8), offsets


def items_json(frags: ItemFragments, item_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> orjson.Fragment:
    """`[{"item_id": ..., "score": ...}, ...]` for internal `ids` (all < the id map's length) as an orjson Fragment."""
    if not len(ids):
        return orjson.Fragment(b"[]")
    out = kernels.items_json_kernel(np.asarray(ids, np.int64), scores, frags[0], frags[1])
    if len(out):
        return orjson.Fragment(out.tobytes())
    # a score the kernel does not write (non-finite, huge): let orjson do it
    return orjson.Fragment(orjson.dumps([{"item_id": i, "score": round(float(s), 6)}
                                         for i, s in zip(item_ids[ids].tolist(), scores.tolist(), strict=True)]))
