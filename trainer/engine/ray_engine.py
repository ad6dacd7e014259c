"""The Ray engine: the nightly's heavy stages as Ray tasks and Ray Train workers (docs/scaling.md).

| model | on Ray | result vs the local engine |
|---|---|---|
| itemcf | map: forward pairs per item block; reduce: + transposed pieces, score, top-K per block | identical |
| usercf | one task per run of user chunks (similarity rows + top-K) | identical |
| item2vec | sessions cut per user range in tasks; gensim in one task | identical (one gensim worker) |
| two_tower | Ray Train, N gloo workers, gradients averaged (ID-table rows all-gathered); user vectors precomputed in tasks | HR@50 within ±0.01 |
| every embedding channel | i2i / u2u cosine lists: one index, query blocks searched in tasks | identical |
| the rest | fit on the driver, as locally | identical |

The data goes to the object store once per nightly (numpy arrays, Arrow tables; trainer/engine/ray_data.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from trainer.channels.base import Artifacts, Channel
from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData

log = logging.getLogger(__name__)


class RayEngine:
    """Connects to the Ray cluster at `address` (None: starts a local one in this process) and fits channels on it."""

    name = "ray"

    def __init__(self, address: str | None = None, train_workers: int = 2, shards: int | None = None,
                 num_cpus: int | None = None):
        import ray

        self.address, self.train_workers = address, train_workers
        self.stats: dict[str, Any] = {}
        self._owns = False
        if not ray.is_initialized():
            if address:
                _check_reachable(address)
            t = time.perf_counter()
            ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
            self._owns = True
            self.connect_s = round(time.perf_counter() - t, 3)
        else:
            self.connect_s = 0.0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.shards = shards or max(1, cpus)
        self._data_key: int | None = None
        self._shipped: Any = None
        self._view: Any = None

    def describe(self) -> dict[str, Any]:
        import ray

        res = ray.cluster_resources()
        return {"name": self.name, "address": self.address or "local", "nodes": sum(1 for n in ray.nodes() if n["Alive"]),
                "cpus": int(res.get("CPU", 0)), "memory_gb": round(res.get("memory", 0) / 2**30, 1),
                "shards": self.shards, "train_workers": self.train_workers, "connect_s": self.connect_s}

    def _ship(self, data: TrainData) -> None:
        """Put `data` into the object store once (every channel of a nightly fits on the same TrainData)."""
        import ray

        from trainer.engine.ray_data import ArrayView, ship

        if self._data_key != id(data):
            t = time.perf_counter()
            self._shipped = ship(data)
            self._view = ray.put(ArrayView.of(data))
            self._data_key = id(data)
            self.stats["ship_s"] = round(time.perf_counter() - t, 3)

    def fit(self, ch: Channel, data: TrainData, progress: bool = False) -> Artifacts:
        from trainer.engine import ray_cooccurrence, ray_sessions, ray_train
        from trainer.engine.ray_neighbors import RayNeighborSearch

        self.stats = {}
        search = RayNeighborSearch(self.shards)
        if isinstance(ch, EmbeddingChannel):
            ch.neighbor_search = search
        t = time.perf_counter()
        if ch.model == "itemcf":
            self.stats.update(ray_cooccurrence.fit_itemcf(ch, data, self.shards))
        elif ch.model == "usercf":
            self.stats.update(ray_cooccurrence.fit_usercf(ch, data, self.shards))
        elif ch.model == "item2vec":
            self._ship(data)
            self.stats.update(ray_sessions.fit_item2vec(ch, self._shipped.refs(), data.user_ptr, data.n_items,
                                                        self.shards))
        elif ch.model in ray_train.TRAIN_MODELS:
            self._ship(data)
            self.stats.update(ray_train.fit_tower(ch, self._shipped, self._view, data.n_users, self.train_workers,
                                                  self.shards))
        else:
            self.stats["on"] = "driver"
            ch.fit(data, progress=progress)
        self.stats["fit_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        artifacts = ch.artifacts(data)
        if search.stats:
            self.stats["neighbors"] = search.stats
        self.stats["artifacts_s"] = round(time.perf_counter() - t, 3)
        return artifacts

    def close(self) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._shipped = self._view = None
        self._data_key = None


CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when the head's GCS port does not answer (`ray.init` itself retries for minutes). Only plain
    host:port addresses are checked; `auto` and `ray://` client addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(f"Ray cluster at {address} is unreachable ({exc}): start it (docs/scaling.md) or set "
                              f"RAY_ADDRESS / --ray-address") from exc
