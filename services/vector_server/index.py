"""One loaded u2i channel version: faiss index over its item vectors, optional user tower, id maps.

A `Bundle` is immutable once built; the server swaps whole bundles (one reference assignment), so a request
that picked a bundle keeps a consistent (version, index, tower) triple however long it runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from common import kernels
from common.archive import DigestMismatch, check_digest, hexdigest, new_digest, update_digest, value_digest
from common.channel_config import ChannelSpec, IndexParams
from common.ids import IdMap
from common.publish import read_manifest
from common.redis_conn import RedisStores
from common.retrieval import live_interests, merge_interest_rows, merge_interests, sorted_ids
from common.towers import TowerError, TowerInputs, encode_user_inputs, matches, numpy_twin
from common.towers import load_tower as rebuild_tower
from common.towers.rescore import RescoreSettings, rescore_settings, two_stage
from common.towers.rescore import prepare as prepare_rescorer

log = logging.getLogger(__name__)

MGET_BATCH = 5000
EMPTY_IDS = np.empty(0, dtype=np.int64)
EMPTY_SCORES = np.empty(0, dtype=np.float32)


class LoadError(RuntimeError):
    """A channel version could not be loaded; the previous bundle (if any) keeps serving."""


@dataclass(frozen=True)
class IdMaps:
    """Published item/user id maps plus an object array for vectorised index → external id."""

    item: IdMap
    user: IdMap
    item_ids: np.ndarray  # object array, item_ids[i] = external id of item index i
    n_item: int = 0  # the published lengths this snapshot was built from (id_map_len keys)
    n_user: int = 0

    @classmethod
    def build(cls, item: IdMap, user: IdMap, n_item: int | None = None, n_user: int | None = None) -> IdMaps:
        arr = np.empty(len(item), dtype=object)
        arr[:] = item.ids
        return cls(item, user, arr, len(item) if n_item is None else n_item, len(user) if n_user is None else n_user)

    @classmethod
    def empty(cls) -> IdMaps:
        return cls.build(IdMap(), IdMap(), 0, 0)

    def external_items(self, idx: np.ndarray) -> list[str | None]:
        """External ids of item indices (None where the map has no such index)."""
        if len(idx) == 0:
            return []
        if int(idx.max()) < len(self.item_ids):
            return self.item_ids[idx].tolist()
        return [self.item.ids[i] if i < len(self.item.ids) else None for i in idx.tolist()]

    def item_indices(self, ext_ids: list[str]) -> list[int]:
        """Indices of known external item ids (unknown ones dropped), order kept."""
        get = self.item.get
        return [i for i in (get(x) for x in ext_ids) if i >= 0]


def load_id_maps(stores: RedisStores) -> IdMaps:
    """Read both published id maps (sync; used from a worker thread)."""
    ks, meta = stores.keyspace, stores("meta")
    blobs = meta.mget([ks.id_map("item"), ks.id_map("user"), ks.id_map_len("item"), ks.id_map_len("user")])
    item, user = IdMap.from_bytes(blobs[0]), IdMap.from_bytes(blobs[1])
    return IdMaps.build(item, user, int(blobs[2] or 0), int(blobs[3] or 0))


def search_ef(ef_search: int, ef_factor: float, kk: int) -> int:
    """HNSW beam for a query asking kk results: max(ef_search, ef_factor · kk) (faiss does not raise it with k)."""
    return max(ef_search, int(ef_factor * kk))


def build_index(vectors: np.ndarray, params: IndexParams) -> tuple[faiss.Index, list[Any], str]:
    """Inner-product faiss index of the configured type; returns (index, objects to keep alive, description)."""
    n, d = vectors.shape
    if params.type == "flat" or n == 0:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, [], "flat"
    if params.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        index.add(vectors)
        return index, [], (f"hnsw(M={params.M},efC={params.ef_construction},"
                           f"ef=max({params.ef_search},{params.ef_factor:g}·k))")
    nlist = params.nlist or max(1, int(round(4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    # k-means on a bounded sample (100 points per list) keeps big catalogues fast to load
    train = vectors
    if n > 100 * nlist:
        train = vectors[np.random.default_rng(42).choice(n, 100 * nlist, replace=False)]
    index.train(train)
    index.add(vectors)
    index.nprobe = min(params.nprobe, nlist)
    return index, [quantizer], f"ivf(nlist={nlist},nprobe={min(params.nprobe, nlist)})"


@dataclass
class Bundle:
    """Everything one request needs about one channel version."""

    channel: str
    publisher: str
    version: str
    dim: int
    n_items: int  # catalogue size of the version (manifest n_items)
    n_indexed: int  # vectors actually in the index (missing keys skipped)
    index_type: str
    index_desc: str
    index: faiss.Index
    row_to_item: np.ndarray | None  # faiss row → item index; None when identity
    normalize: bool  # cosine metric: queries are L2-normalised (items were at load)
    ef_search: int = 64
    ef_factor: float = 2.0
    nprobe: int = 16
    tower: Any = None  # torch.nn.Module rebuilt from common/towers (load_tower)
    tower_fn: Any = None  # its numpy twin (common/towers/numpy_twin.py), used on requests when set
    tower_meta: dict[str, Any] = field(default_factory=dict)
    tower_error: str | None = None
    # the tower also rescores the first stage's candidates (tower meta "rescore", common/towers/rescore.py)
    rescore: RescoreSettings | None = None
    index_dims: int = 0  # the index holds the first index_dims columns (the rest are zero for every item); 0: all
    maps: IdMaps | None = None  # private id maps (artifacts dir) when the published ones are too short
    user_vectors: np.ndarray | None = None  # precomputed user vectors held in memory (rows: user index), or None
    user_present: np.ndarray | None = None  # bool per row: the version has a vector for that user
    user_map: IdMap | None = None  # the user id map the rows follow
    n_interests: int = 1  # K vectors per user (manifest n_interests); user_vectors rows are then [K, dim]
    # each user's search results, computed after the swap (`precompute`): ([rows of user_vectors, K] int32 item
    # indices, [rows, K] float32 scores); set once, in one assignment
    user_top: tuple[np.ndarray, np.ndarray] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    keep: list[Any] = field(default_factory=list)
    _default_params: Any = None
    _ef_params: dict[int, Any] = field(default_factory=dict)  # efSearch → reusable faiss search parameters

    def __post_init__(self) -> None:
        if self.index_type == "hnsw":
            self._default_params = faiss.SearchParametersHNSW(efSearch=self.ef_search)
        elif self.index_type == "ivf":
            self._default_params = faiss.SearchParametersIVF(nprobe=self.index.nprobe)

    def _hnsw_params(self, ef: int) -> faiss.SearchParametersHNSW:
        params = self._ef_params.get(ef)
        if params is None:
            params = self._ef_params[ef] = faiss.SearchParametersHNSW(efSearch=ef)
        return params

    @property
    def recent_n(self) -> int:
        return int(self.tower_meta.get("recent_n", 20)) if self.tower is not None else 0

    def search(self, q: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (item index, score) for one query vector, `exclude` item indices removed. Several query vectors
        ([K, dim], [1, K, dim] or K·dim floats: a user's interests) go to `search_interests`."""
        if np.size(q) != self.dim:
            return self.search_interests(q, k, exclude)
        n_ex = 0 if exclude is None else len(exclude)
        kk = min(k + n_ex, self.n_indexed)
        if kk <= 0:
            return EMPTY_IDS, EMPTY_SCORES
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(1, self.dim)
        if self.index_dims:
            q = np.ascontiguousarray(q[:, : self.index_dims])
        if self.normalize:
            q = q / max(float(np.linalg.norm(q)), 1e-12)
        params = self._default_params
        if self.index_type == "hnsw":  # faiss does not raise efSearch with k itself (it returns fewer results)
            params = self._hnsw_params(search_ef(self.ef_search, self.ef_factor, kk))
        scores, rows = self.index.search(q, kk, params=params)
        rows, scores = rows[0], scores[0]
        if rows[-1] < 0:  # fewer results than asked (tiny catalogue or graph misses)
            ok = rows >= 0
            rows, scores = rows[ok], scores[ok]
        ids = rows if self.row_to_item is None else self.row_to_item[rows]
        if n_ex:
            return kernels.filter_kernel(ids.astype(np.int64, copy=False), scores, sorted_ids(exclude),
                                         np.iinfo(np.int64).max, k)
        return ids[:k].astype(np.int64, copy=False), scores[:k]

    def search_user(self, q: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A user's top-k: `search`, or for a rescoring tower `two_stage` (faiss first stage, the tower's score of
        its candidates; the function the evaluator runs)."""
        if self.rescore is None:
            return self.search(q, k, exclude)
        return two_stage(self.tower, q, k, exclude, lambda n: self.search(q, n, exclude), self.rescore)

    def search_interests(self, q: np.ndarray, k: int, exclude: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for a user of several interest vectors: each live one (zero and non-finite rows dropped) searched
        for k + len(exclude) items in one faiss call, the lists merged by max score per item
        (common.retrieval.merge_interests, which the evaluator uses too), `exclude` removed."""
        live = live_interests(q, self.dim)
        if len(live) <= 1:
            return self.search(live[0], k, exclude) if len(live) else (EMPTY_IDS, EMPTY_SCORES)
        kk = min(k + (0 if exclude is None else len(exclude)), self.n_indexed)
        if kk <= 0:
            return EMPTY_IDS, EMPTY_SCORES
        if self.index_dims:
            live = live[:, : self.index_dims]
        if self.normalize:
            live = live / np.maximum(np.linalg.norm(live, axis=1, keepdims=True), 1e-12)
        params = self._default_params
        if self.index_type == "hnsw":
            params = self._hnsw_params(search_ef(self.ef_search, self.ef_factor, kk))
        scores, rows = self.index.search(np.ascontiguousarray(live, dtype=np.float32), kk, params=params)
        if self.row_to_item is not None:
            rows = np.where(rows >= 0, self.row_to_item[np.maximum(rows, 0)], -1)
        return merge_interests(list(zip(rows, scores, strict=True)), k, exclude)

    def cached_user_vector(self, user_id: str) -> tuple[bool, np.ndarray | None]:
        """(True, vector or None) when the precomputed vectors are in memory; (False, None): ask Redis. The vector is
        [K, dim] for a channel of K > 1 interests per user."""
        if self.user_vectors is None:
            return False, None
        i = self.user_map.get(user_id)
        if 0 <= i < len(self.user_vectors) and self.user_present[i]:
            return True, self.user_vectors[i]
        return True, None

    def precomputed_search(self, user_id: str, k: int, exclude: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray] | None:
        """`search` of the user's precomputed vector answered from the results computed at load time; None when
        there are none for this user or too few of them survive `exclude` (the caller then searches)."""
        top = self.user_top
        if top is None:
            return None
        i = self.user_map.get(user_id)
        if not (0 <= i < len(top[0])) or not self.user_present[i]:
            return None
        ids, scores = kernels.filter_kernel(top[0][i].astype(np.int64), top[1][i],
                                            EMPTY_IDS if exclude is None else sorted_ids(exclude),
                                            np.iinfo(np.int64).max, k)
        if len(ids) < k and top[0].shape[1] < self.n_indexed:
            return None  # the stored list was cut at K: a search may find more
        return ids, scores

    def precompute(self, params: IndexParams, max_bytes: int, stop: threading.Event | None = None) -> bool:
        """Search every user's precomputed vector once (channels without a user tower, whose query per user is
        fixed for the version) and keep the results for `precomputed_search`; False when not applicable, too
        big for `max_bytes`, or `stop` was set. Blocking: run it in a thread after the bundle serves."""
        if (self.user_vectors is None or self.tower is not None or not params.precompute_k or not self.n_indexed
                or self.index_dims):
            return False
        top = precompute_user_results(self.index, self.row_to_item, params, self.user_vectors, self.user_present,
                                      self.normalize, max_bytes, f"channel {self.channel} version {self.version}",
                                      stop=stop)
        if top is None:
            return False
        self.user_top = top
        return True

    def tower_vector(self, user_idx: int, attrs: dict[str, Any] | None, recent_idx: list[int],
                     recent_ts: list[int] | None = None) -> np.ndarray:
        """The user's vector from the channel's tower: [dim], or [K, dim] for a tower of K interests (inputs:
        common/towers/inputs.py; `recent_ts`, aligned with `recent_idx`, serve the towers that use times)."""
        x = encode_user_inputs(self.tower_meta, user_idx, attrs, recent_idx, recent_ts)
        if self.tower_fn is not None:
            return self.tower_fn(*x)
        with torch.inference_mode():
            out = self.tower(*_tensors(x))
        return out[0].to(torch.float32).numpy()

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "n_items": self.n_items, "n_indexed": self.n_indexed, "dim": self.dim,
                "n_interests": self.n_interests,
                "index": self.index_type, "index_params": self.index_desc, "tower": self.tower is not None,
                "tower_runtime": ("numpy" if self.tower_fn is not None else "torch") if self.tower is not None else None,
                "tower_error": self.tower_error, "rescore": None if self.rescore is None else vars(self.rescore),
                "index_dims": self.index_dims or self.dim,
                "precomputed_results": self._precomputed_info(),
                "publisher": self.publisher, "load_s": round(self.load_s, 3), "loaded_at": self.loaded_at}

    def _precomputed_info(self) -> dict[str, int] | None:
        top = self.user_top
        return None if top is None else {"users": int(self.user_present.sum()), "k": int(top[0].shape[1])}


def read_item_vectors(stores: RedisStores, publisher: str, version: str, n_items: int,
                      dim: int, digest: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """All item vectors of a version (MGET in batches; missing/malformed keys skipped) and the row → item map.
    `digest` (common.archive.new_digest()) is fed every value read, in index order."""
    ks, client = stores.keyspace, stores("item_emb")
    nbytes = 4 * dim
    chunks: list[bytes] = []
    present: list[np.ndarray] = []
    for start in range(0, n_items, MGET_BATCH):
        stop = min(start + MGET_BATCH, n_items)
        values = client.mget([ks.item_vector(publisher, version, i) for i in range(start, stop)])
        if digest is not None:
            for v in values:
                if v is not None:
                    update_digest(digest, v)
        ok = np.fromiter((v is not None and len(v) == nbytes for v in values), dtype=bool, count=len(values))
        chunks.extend(v for v, good in zip(values, ok, strict=True) if good)
        present.append(np.flatnonzero(ok) + start)
    vectors = np.frombuffer(b"".join(chunks), dtype="<f4").reshape(-1, dim).astype(np.float32, copy=True)
    rows = np.concatenate(present) if present else np.empty(0, dtype=np.int64)
    identity = len(rows) == n_items
    return vectors, None if identity else rows.astype(np.int64)


def read_user_vectors(stores: RedisStores, publisher: str, version: str, user_ids: list[str],
                      dim: int, n_interests: int = 1, digest: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed vectors of `user_ids` (one row each, zeros where missing; [users, K, dim] for K > 1 interests
    per user) and the mask of those present. `digest` is fed every value read, in order."""
    ks, client = stores.keyspace, stores("user_emb")
    nbytes = 4 * dim * n_interests
    out = np.zeros((len(user_ids), dim) if n_interests == 1 else (len(user_ids), n_interests, dim), dtype=np.float32)
    present = np.zeros(len(user_ids), dtype=bool)
    for start in range(0, len(user_ids), MGET_BATCH):
        part = user_ids[start:start + MGET_BATCH]
        values = client.mget([ks.user_vector(publisher, version, u) for u in part])
        for j, v in enumerate(values):
            if digest is not None and v is not None:
                update_digest(digest, v)
            if v is not None and len(v) == nbytes:
                out[start + j] = np.frombuffer(v, dtype="<f4").reshape(out.shape[1:])
                present[start + j] = True
    return out, present


def _tensors(x: TowerInputs) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(v) for v in x)


def load_tower(blob: bytes, meta: dict[str, Any], dim: int) -> torch.nn.Module:
    """Rebuild a channel's user tower from common/towers by its architecture tag (`meta["arch"]`, `["hparams"]`)
    and load its state dict: weights only (nothing in the bytes runs), strictly (keys, shapes and dtypes of the
    rebuilt module). Then check it answers one user with [1, dim] — or [1, K, dim], a tower of K interests.
    LoadError otherwise (unknown architecture, bad weights, wrong output)."""
    try:
        module = rebuild_tower(blob, meta)
    except TowerError as exc:
        raise LoadError(f"user tower: {exc}") from exc
    shapes = set()
    try:
        history = list(range(min(int(meta["n_items"]), int(meta["recent_n"]))))
        probes = [encode_user_inputs(meta, -1, {}, []),  # unknown user, nothing known: the no-history answer
                  encode_user_inputs(meta, 0, {}, history, [1_700_000_000 - 60 * j for j in range(len(history))])]
        with torch.inference_mode():
            for x in probes:
                out = module(*_tensors(x))
                shapes.add((tuple(out.shape), out.dtype))
    except Exception as exc:
        raise LoadError(f"user tower {meta.get('arch')!r} failed on a probe input: {type(exc).__name__}: {exc}") from exc
    (shape, dtype), *others = shapes
    if others or dtype != torch.float32 or not (shape == (1, dim) or (len(shape) == 3 and shape[0] == 1
                                                                         and shape[1] >= 1 and shape[2] == dim)):
        got = ", ".join(f"{s} {d}" for s, d in sorted(shapes, key=str))
        raise LoadError(f"user tower {meta.get('arch')!r} returned {got} for one user; expected float32 (1, {dim}) "
                        f"or (1, K, {dim})")
    return module


def twin_of(tower, meta: dict[str, Any], what: str):
    """The tower's numpy twin (common/towers/numpy_twin.py TWINS, chosen by architecture tag) when it reproduces
    the torch forward on probe inputs, else None (torch serves)."""
    try:
        fn = numpy_twin(tower, meta)
        if fn is None or matches(fn, tower, meta):
            return fn
        why = "it disagrees with the torch forward"
    except Exception as exc:  # a twin is an optimisation: never a reason not to serve the tower
        why = f"{type(exc).__name__}: {exc}"
    log.warning("%s: user tower served by torch (numpy twin unusable: %s)", what, why)
    return None


def _file_maps(manifest: dict[str, Any]) -> IdMaps | None:
    d = manifest.get("artifacts_dir")
    if not d:
        return None
    items, users = Path(d) / "item_ids.json", Path(d) / "user_ids.json"
    try:
        return IdMaps.build(IdMap.load(items), IdMap.load(users) if users.exists() else IdMap())
    except OSError:
        return None


def load_bundle(stores: RedisStores, spec: ChannelSpec, version: str, maps: IdMaps | None = None,
                user_cache_bytes: int = 0) -> Bundle:
    """Read a published u2i version from Redis and build its index and tower (blocking; run in a thread).

    Its precomputed user vectors are loaded too when they fit in `user_cache_bytes`, so a search by user needs
    no Redis read; otherwise they are read per request (see also `Bundle.precompute`)."""
    t0 = time.perf_counter()
    publisher = spec.publisher
    manifest = read_manifest(stores, publisher, version)
    if manifest is None:
        raise LoadError(f"channel {publisher!r} version {version}: manifest missing")
    if "dim" not in manifest:
        raise LoadError(f"channel {publisher!r} version {version}: manifest has no 'dim' (not a u2i artifact?)")
    dim, n_items = int(manifest["dim"]), int(manifest.get("n_items", 0))
    metric = str(manifest.get("metric", "ip")).lower()
    if metric not in ("ip", "dot", "cos", "cosine"):
        raise LoadError(f"channel {publisher!r}: unsupported metric {metric!r} (ip or cosine)")
    what = f"channel {publisher!r} version {version}"
    h = new_digest()  # every artifact read is checked against the manifest's digest: a mismatch is never loaded
    vectors, rows = read_item_vectors(stores, publisher, version, n_items, dim, digest=h)
    _check(manifest, "item_vectors", h, what)
    normalize = metric in ("cos", "cosine")
    if normalize and len(vectors):
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if len(vectors) < n_items:
        log.warning("channel %s version %s: %d of %d item vectors missing; skipped", spec.name, version,
                    n_items - len(vectors), n_items)
    tower_meta = dict(manifest.get("user_tower_meta") or {})
    index_dims = first_stage_dims(vectors, tower_meta, normalize)
    index, keep, desc = build_index(np.ascontiguousarray(vectors[:, :index_dims]) if index_dims else vectors, spec.index)

    tower, tower_error, tower_fn = None, None, None
    if manifest.get("has_user_tower"):
        try:
            blob = stores("item_emb").get(stores.keyspace.user_tower(publisher, version))
            if blob is None:
                raise LoadError("user tower key missing")
            _check(manifest, "user_tower", value_digest([blob]), what)  # before a byte of it is unpickled
            tower = load_tower(blob, tower_meta, dim)
            tower_fn = twin_of(tower, tower_meta, f"channel {spec.name} version {version}")
        except LoadError as exc:
            if isinstance(exc.__cause__, DigestMismatch):  # tampered: refuse the whole version
                raise
            tower, tower_fn, tower_error = None, None, f"{type(exc).__name__}: {exc}"
            log.error("channel %s version %s: user tower unusable, falling back to precomputed vectors: %s",
                      spec.name, version, tower_error)
        except Exception as exc:  # serve the precomputed vectors rather than nothing
            tower, tower_fn, tower_error = None, None, f"{type(exc).__name__}: {exc}"
            log.error("channel %s version %s: user tower unusable, falling back to precomputed vectors: %s",
                      spec.name, version, tower_error)

    rescore = rescore_settings(tower_meta, tower) if tower is not None else None
    if rescore is not None:
        prepare_rescorer(tower)  # its catalogue and numpy scorer, before the first request
    private_maps = None
    if maps is None or len(maps.item) < n_items:  # published maps too short (or newer than ours): re-read, then files
        private_maps = load_id_maps(stores)
        if len(private_maps.item) < n_items:
            private_maps = _file_maps(manifest) or private_maps
    user_vectors = user_present = user_map = None
    n_users = int((manifest.get("counts") or {}).get("user_vectors", 0))
    n_interests = max(1, int(manifest.get("n_interests", 1)))  # K·dim floats per user key
    if 0 < n_users and n_users * n_interests * dim * 4 <= user_cache_bytes:
        user_map = (private_maps or maps or load_id_maps(stores)).user
        if len(user_map) >= n_users:  # else (a map older than the version) read vectors per request
            users = user_map.ids[:n_users]
            h = new_digest()
            user_vectors, user_present = read_user_vectors(stores, publisher, version, list(users), dim, n_interests,
                                                           digest=h)
            _check(manifest, "user_vectors", h, what)
        else:
            user_map = None
    return Bundle(channel=spec.name, publisher=publisher, version=version, dim=dim, n_items=n_items,
                  n_indexed=int(index.ntotal), index_type=spec.index.type if len(vectors) else "flat",
                  index_desc=desc, index=index, row_to_item=rows, normalize=normalize,
                  ef_search=spec.index.ef_search, ef_factor=spec.index.ef_factor, nprobe=spec.index.nprobe, tower=tower, tower_fn=tower_fn, tower_meta=tower_meta,
                  tower_error=tower_error, rescore=rescore, index_dims=index_dims, maps=private_maps, manifest=manifest, user_vectors=user_vectors,
                  user_present=user_present, user_map=user_map, n_interests=n_interests,
                  load_s=time.perf_counter() - t0, keep=keep)


def _check(manifest: dict[str, Any], artifact: str, got: Any, what: str) -> None:
    """LoadError (the version is refused, never loaded) when `artifact` differs from the manifest's digest."""
    try:
        check_digest(manifest, artifact, got if isinstance(got, str) else hexdigest(got), what)
    except DigestMismatch as exc:
        raise LoadError(str(exc)) from exc


def first_stage_dims(vectors: np.ndarray, tower_meta: dict[str, Any], normalize: bool) -> int:
    """For a rescoring channel (tower meta "rescore") whose item vectors end in columns that are zero for every item
    (NeuMF: `[q_i ; 0]`, the query's tail feeds only the rescorer), the columns the index needs; 0 otherwise (all).
    The inner products, and so the first stage, are unchanged."""
    if normalize or not len(vectors) or rescore_settings(tower_meta) is None:
        return 0
    used = np.flatnonzero(vectors.any(axis=0))
    n = int(used[-1]) + 1 if len(used) else vectors.shape[1]
    return n if n < vectors.shape[1] else 0


def precompute_user_results(index: faiss.Index, rows: np.ndarray | None, params: IndexParams, user_vectors: np.ndarray,
                            present: np.ndarray, normalize: bool, max_bytes: int, what: str,
                            batch: int = 2048, stop: threading.Event | None = None
                            ) -> tuple[np.ndarray, np.ndarray] | None:
    """Every present user's top-K items (K = params.precompute_k, capped at the index size) as int32 item indices
    and float32 scores, rows of absent users left at -1; None when [users, K] does not fit `max_bytes` or when
    `stop` is set between two batches (a server shutting down does not wait for the rest). Users of several
    interests ([users, n_interests, dim]): each live interest searched for K, merged by max score per item
    (common.retrieval.merge_interest_rows, the batched `merge_interests` of a live search)."""
    k = min(params.precompute_k, int(index.ntotal))
    n = len(user_vectors)
    if k <= 0 or n * k * 8 > max_bytes:
        log.info("%s: per-user results not precomputed (%d users × %d × 8 bytes > VECTOR_PRECOMPUTE_MB)", what, n, k)
        return None
    t0 = time.perf_counter()
    top_ids = np.full((n, k), -1, np.int32)
    top_scores = np.zeros((n, k), np.float32)
    search_params = None
    if params.type == "hnsw":
        search_params = faiss.SearchParametersHNSW(efSearch=search_ef(params.ef_search, params.ef_factor, k))
    elif params.type == "ivf":
        search_params = faiss.SearchParametersIVF(nprobe=min(params.nprobe, getattr(index, "nlist", params.nprobe)))
    users = np.flatnonzero(present)
    for start in range(0, len(users), batch):
        if stop is not None and stop.is_set():
            return None
        part = users[start:start + batch]
        q = np.ascontiguousarray(user_vectors[part], dtype=np.float32)
        if q.ndim == 3:  # K interests per user
            top_ids[part], top_scores[part] = _search_merged(index, rows, q, k, normalize, search_params)
            continue
        if normalize:
            q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores, found = index.search(q, k, params=search_params)
        if rows is not None:
            found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        top_ids[part], top_scores[part] = found, scores
    log.info("%s: top %d items of %d users precomputed in %.1fs (%.0f MB)", what, k, len(users),
             time.perf_counter() - t0, (top_ids.nbytes + top_scores.nbytes) / 2**20)
    return top_ids, top_scores


def _search_merged(index: faiss.Index, rows: np.ndarray | None, q: np.ndarray, k: int, normalize: bool,
                   search_params: Any) -> tuple[np.ndarray, np.ndarray]:
    """[users, K, dim] interest vectors → each user's merged top k ([users, k], -1 padded)."""
    n_users, n_int, dim = q.shape
    flat = q.reshape(-1, dim)
    live = np.isfinite(flat).all(axis=1) & (flat != 0).any(axis=1)
    owner = np.repeat(np.arange(n_users), n_int)[live]
    flat = np.ascontiguousarray(flat[live])
    if not len(flat):
        return np.full((n_users, k), -1, np.int64), np.zeros((n_users, k), np.float32)
    if normalize:
        flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    scores, found = index.search(flat, k, params=search_params)
    if rows is not None:
        found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
    return merge_interest_rows(owner, found, scores, n_users, k)


def unpack_user_vector(value: bytes | None, dim: int, n_interests: int = 1) -> np.ndarray | None:
    """A precomputed user vector ([K, dim] for K > 1 interests per user), or None when absent or of the wrong
    size."""
    if value is None or len(value) != 4 * dim * n_interests:
        return None
    vec = np.frombuffer(value, dtype="<f4")
    return vec if n_interests == 1 else vec.reshape(n_interests, dim)


__all__ = ["Bundle", "IdMaps", "LoadError", "build_index", "search_ef", "load_bundle", "load_id_maps", "read_item_vectors", "read_user_vectors",
           "unpack_user_vector"]
