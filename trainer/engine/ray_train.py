"""Tower training on Ray Train: N workers (torch DDP semantics over a gloo process group) fit one model together.

Every worker rebuilds the TrainData from the object store (trainer/engine/ray_data.py), builds the channel under
the same seed and runs its unchanged `fit` inside `trainer.nn.loop.data_parallel`: the same global batches in the
same order on every worker, each worker computes the loss of its share of each batch, and the gradients are
averaged across the workers before every optimiser step (dense ones all-reduced, the touched rows of sparse ID tables
all-gathered: trainer.nn.loop.DataParallel), so the model sees the local batch size and step count.
Rank 0 hands the fitted channel back through a small actor (no shared storage needed); the user vectors are then
precomputed in sharded tasks (trainer/engine/ray_neighbors.py) instead of by one worker.
"""

from __future__ import annotations

import pickle
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray

from trainer.channels import registry
from trainer.channels.embedding import EmbeddingChannel
from trainer.engine.ray_data import ShippedData, unship
from trainer.engine.ray_neighbors import encode_users_sharded

# models whose fit runs data-parallel on Ray Train (their training goes through trainer.nn.loop.train_loop, and
# they encode users with `encode_users(data, users)`)
TRAIN_MODELS = ("two_tower",)


@ray.remote(num_cpus=0)
class _ResultBox:
    """Holds rank 0's fitted channel until the driver takes it."""

    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the channel's own fit, data-parallel; rank 0 returns the channel (no user vectors)."""
    import ray.train

    from trainer.nn.loop import data_parallel

    data = unship(config["data"])
    ch = registry.build(config["spec"], seed=config["seed"])
    dim = int(getattr(ch.params, "dim", 0))
    # every user's vector is precomputed afterwards, sharded across the cluster, not here on each worker
    ch.encode_users = lambda _data, users=None: np.zeros((0, dim), np.float32)
    with data_parallel(ch.seed):
        ch.fit(data, progress=False)
    del ch.encode_users
    if ray.train.get_context().get_world_rank() == 0:
        ch.user_vectors = None
        # pickled bytes, not the object: unpickled on the driver its arrays are its own (writable), not read-only
        # views into the object store
        ray.get(config["box"].put.remote(pickle.dumps(ch, protocol=pickle.HIGHEST_PROTOCOL)))


def fit_tower(ch: EmbeddingChannel, shipped: ShippedData, view_ref: Any, n_users: int, workers: int, shards: int,
              storage: str | Path | None = None) -> dict[str, Any]:
    """Fit `ch` on `workers` Ray Train workers, then precompute its user vectors in `shards` tasks; returns stats."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    box = _ResultBox.remote()
    storage = Path(storage or Path(tempfile.gettempdir()) / "multirecall-ray-train").resolve()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"data": shipped, "spec": ch.spec, "seed": ch.seed, "box": box},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"{ch.spec.name}-{uuid.uuid4().hex[:8]}", storage_path=str(storage)))
    trainer.fit()
    payload = ray.get(box.get.remote())
    ray.kill(box)
    if payload is None:
        raise RuntimeError(f"{ch.spec.name}: Ray Train finished without a fitted model from rank 0")
    fitted = pickle.loads(payload)
    t_train = time.perf_counter()
    ch.__dict__.update(fitted.__dict__)
    ch.user_vectors = encode_users_sharded(ray.put(ch), view_ref, n_users, shards)
    return {"train_workers": workers, "train_s": round(t_train - t0, 3),
            "encode_users_s": round(time.perf_counter() - t_train, 3)}
