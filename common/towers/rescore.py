"""Two-stage u2i serving: a published tower that can also *rescore* candidates (a score that faiss cannot index,
e.g. NeuMF's MLP) re-ranks the first-stage search results. One function, `two_stage`, used by the vector server
(after its faiss search) and by the evaluator (after the exact search), so offline numbers are what is served.

A rescoring tower is a `Tower` (common/towers/base.py) that also has
    rescore(query float32 [B, D], items int64 [B, N]) → float32 [B, N]     the final score of each candidate
    catalog  bool [n_items] buffer                                        the items it may answer
and optionally `numpy_rescorer()` → (query [D], items [N]) → [N], the same score in numpy (faster per request).
where `query` is the tower's own output for the user (so precomputed user vectors work too). The channel's
`user_tower_meta` says how to use it:
    "rescore": {"n": N, "bruteforce_max": M}
N: first-stage candidates rescored (at least k); M: catalogues of at most M items are scored whole (no first stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.retrieval import EMPTY_IDS, EMPTY_SCORES, top_k

RESCORE_KEY = "rescore"


@dataclass(frozen=True)
class RescoreSettings:
    n: int  # first-stage candidates rescored (at least k)
    bruteforce_max: int  # catalogues of at most this many items are scored whole


def rescore_meta(n: int, bruteforce_max: int) -> dict[str, Any]:
    """The `user_tower_meta` entry of a rescoring tower (JSON-ready)."""
    return {RESCORE_KEY: {"n": int(n), "bruteforce_max": int(bruteforce_max)}}


def rescore_settings(meta: dict[str, Any] | None, module: Any = None) -> RescoreSettings | None:
    """The settings of a rescoring tower, or None when `meta` has none (or `module`, when given, cannot rescore)."""
    spec = (meta or {}).get(RESCORE_KEY)
    if not isinstance(spec, dict) or (module is not None and not callable(getattr(module, "rescore", None))):
        return None
    return RescoreSettings(n=max(1, int(spec.get("n", 1))), bruteforce_max=int(spec.get("bruteforce_max", 0)))


def catalog_mask(module: Any) -> np.ndarray:
    """bool [n_items]: the items the rescorer may answer (cached on the module, which is frozen once loaded)."""
    mask = getattr(module, "_catalog_mask", None)
    if mask is None:
        mask = module.catalog.detach().cpu().numpy().astype(bool)
        module._catalog_mask, module._catalog_ids = mask, np.flatnonzero(mask).astype(np.int64)
    return mask


def catalog_ids(module: Any) -> np.ndarray:
    """int64 indices of the items the rescorer may answer (cached like `catalog_mask`)."""
    catalog_mask(module)
    return module._catalog_ids


def numpy_rescorer(module: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """The module's `numpy_rescorer()` (built once, cached on the frozen module), or None when it has none."""
    fn = module.__dict__.get("_numpy_rescore")
    if fn is None and callable(getattr(module, "numpy_rescorer", None)):
        fn = module.__dict__["_numpy_rescore"] = module.numpy_rescorer()
    return fn


def prepare(module: Any) -> None:
    """Build the module's cached catalogue and numpy scorer now (at load), not on the first request."""
    catalog_mask(module)
    numpy_rescorer(module)


def rescore(module: Any, query: np.ndarray, items: np.ndarray) -> np.ndarray:
    """float32 [N]: the module's scores of `items` for one query vector (by its `numpy_rescorer()` when it has one,
    built once and cached on the frozen module, else by torch)."""
    if not len(items):
        return EMPTY_SCORES
    fn = numpy_rescorer(module)
    if fn is not None:
        return fn(np.asarray(query, np.float32).reshape(-1), np.asarray(items, np.int64).reshape(-1))
    with torch.inference_mode():
        q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1))
        out = module.rescore(q, torch.from_numpy(np.asarray(items, np.int64).reshape(1, -1)))
    return out[0].to(torch.float32).numpy()


def two_stage(module: Any, query: np.ndarray, k: int, exclude: np.ndarray | None,
              first_stage: Callable[[int], tuple[np.ndarray, np.ndarray]],
              settings: RescoreSettings) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (item index, score) by the rescorer: the whole catalog when it has at most `bruteforce_max` items, else
    the first stage's `max(k, n)` best (`first_stage(n)`: ids with `exclude` already removed) rescored. `exclude`
    is removed; score descending, ties by ascending id."""
    if k <= 0:
        return EMPTY_IDS, EMPTY_SCORES
    catalog = catalog_ids(module)
    if len(catalog) <= settings.bruteforce_max:
        cand = catalog
    else:
        cand, _ = first_stage(max(k, settings.n))
        cand = np.asarray(cand, np.int64)
        mask = catalog_mask(module)
        cand = cand[(cand >= 0) & (cand < len(mask))]
        cand = cand[mask[cand]]
    return top_k(cand, rescore(module, query, cand), k, exclude)
