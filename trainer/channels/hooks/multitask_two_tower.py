"""multitask_two_tower's hooks: the served user tower with this channel's out weights (one head or a blend), the
published item and user vectors, and the incremental updates (the mechanism: trainer/channels/warm_tower.py).
Each published channel (head or blend) updates its own copy of the model: two heads of one nightly fit diverge
slightly until the next nightly."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from common.towers import export_tower, input_meta
from common.towers.multitask import Combine, MultiTaskUserTower, combine_vectors
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.multitask import MIN_TASK_POSITIVES, FittedMultiTask, task_labels, train_multitask
from trainer.nn.negatives import StreamingFrequencyEstimator
from trainer.nn.user_inputs import encode_in_batches, tower_inputs
from trainer.nn.warm_start import (
    RowTable,
    WarmState,
    encoding_meta,
    estimator_tensors,
    extend_codes,
    load_estimator,
    restore_encoding,
)


class MultiTaskTwoTowerHooks(WarmTowerChannel):
    """Publishing and warm-starting a `FittedMultiTask` (`self.fitted`, set by the channel's `fit`)."""

    fitted: FittedMultiTask | None = None

    def publish_weights(self, fitted: FittedMultiTask) -> list[float]:
        """One weight per trained task (fitted.tasks) for what this channel publishes; a published task that the
        data had no positives for is an error naming it."""
        want = self.params.publish_weights()
        missing = sorted(set(want) - set(fitted.tasks))
        if missing:
            raise ValueError(f"{self.model}: cannot publish {missing}: the data has fewer than {MIN_TASK_POSITIVES} "
                             f"positives of it (trained tasks: {fitted.tasks})")
        return [want.get(t, 0.0) for t in fitted.tasks]

    @property
    def combine(self) -> Combine:
        return "sum" if self.params.item_heads == "shared" else "concat"

    # -- publishing -----------------------------------------------------------------------------
    def served_tower(self, weights: list[float] | None = None) -> MultiTaskUserTower:
        """A copy of the trained user tower that outputs what this channel publishes (its own out weights)."""
        assert self.fitted is not None, "fit() first"
        src = self.fitted.user_tower
        w = self.publish_weights(self.fitted) if weights is None else weights
        with torch.random.fork_rng(devices=[]):  # the fresh module's initial draws must not move the global RNG
            tower = MultiTaskUserTower.from_hparams({**src.hparams, "out_weights": w, "combine": self.combine})
        tower.load_state_dict(src.state_dict(), strict=True)
        return tower.eval().requires_grad_(False)

    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "multitask_user" with this channel's out weights."""
        assert self.fitted is not None, "fit() first"
        enc = self.fitted.user_enc
        return export_tower(self.served_tower(), input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                            enc.columns, enc.vocab))

    @torch.no_grad()
    def task_item_vectors(self, data: TrainData, items: np.ndarray | None = None) -> np.ndarray:
        """float32 [n_towers, n_items, d]: the item vectors of each item tower (one when shared, else one per task);
        of `items` only when given."""
        assert self.fitted is not None, "fit() first"
        ids = torch.arange(data.n_items, dtype=torch.int64) if items is None else torch.as_tensor(items, dtype=torch.int64)
        return np.stack([t(ids).numpy() for t in self.fitted.item_towers]).astype(np.float32)

    def encode_items(self, data: TrainData, weights: list[float], items: np.ndarray | None = None) -> np.ndarray:
        """Published item vectors: the shared tower's (combine sum) or [√w_t·v_t] (combine concat)."""
        vecs = self.task_item_vectors(data, items)
        if self.combine == "sum":
            return vecs[0]
        return combine_vectors(torch.as_tensor(vecs).transpose(0, 1), weights, "concat").numpy()

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None,
                     weights: list[float] | None = None) -> np.ndarray:
        """Published user vectors from each user's latest `recent_n` items (what the served tower computes)."""
        assert self.fitted is not None, "fit() first"
        f, tower = self.fitted, self.served_tower(weights)
        w = self.publish_weights(f) if weights is None else weights
        width = self.params.dim * (1 if self.combine == "sum" else sum(x > 0 for x in w))
        return encode_in_batches(data, users, lambda u: tower(*tower_inputs(
            data, u, data.user_ptr[u + 1], self.params.recent_n, f.user_attr_codes)).numpy(), width)

    # -- incremental updates --------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:  # type: ignore[override]
        return self.fitted.optimizer if self.fitted is not None else None

    @optimizer.setter
    def optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        if self.fitted is not None:
            self.fitted.optimizer = opt

    def warm_modules(self) -> dict[str, torch.nn.Module]:
        assert self.fitted is not None, "fit() first"
        return {"user_tower": self.fitted.user_tower,
                **{f"item_tower{j}": t for j, t in enumerate(self.fitted.item_towers)}}

    def warm_tables(self) -> list[RowTable]:
        """The user rows; the item rows, pooled by the user tower and read by every item tower (one shared table)."""
        n = len(self.fitted.item_towers) if self.fitted is not None else 0
        return [RowTable("user_tower.user_emb.weight", "user", new="unknown"),
                RowTable("user_tower.trained_user", "user", train=False, derived=True, marks_trained=True),
                RowTable("user_tower.item_emb.weight", "item", history=True),
                *[RowTable(f"item_tower{j}.item_emb.weight", "item", item_vector=True) for j in range(n)]]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The attribute codes and vocabularies, the trained tasks and each task's logQ frequency estimator."""
        f = self.fitted
        tensors = {"user_attr_codes": torch.as_tensor(f.user_attr_codes),
                   "item_attr_codes": torch.as_tensor(f.item_enc.codes)}
        for t, est in f.estimators.items():
            tensors.update({f"{t}.{k}": v for k, v in estimator_tensors(est).items()})
        return tensors, {"tasks": f.tasks, "positives": f.positives, "user_fields": encoding_meta(f.user_enc),
                         "item_fields": encoding_meta(f.item_enc)}

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        n_u0, n_i0 = int(meta["n_users"]), int(meta["n_items"])
        codes = extend_codes(tensors["user_attr_codes"].numpy(), n_u0, data.n_users, data.user_attrs,
                             meta["user_fields"], tail=1)
        items = extend_codes(tensors["item_attr_codes"].numpy(), n_i0, data.n_items, data.item_attrs,
                             meta["item_fields"])
        self._warm_encodings = (restore_encoding(meta["user_fields"], codes, data.n_users), codes,
                                restore_encoding(meta["item_fields"], items, data.n_items))
        self._warm_tasks = (list(meta["tasks"]), dict(meta["positives"]))

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        self.fitted = self._build(data, *self._warm_tasks, encodings=self._warm_encodings)
        self.fitted.task_losses = {t: [] for t in self.fitted.tasks}

    def warm_train(self, data: TrainData, rng: np.random.Generator, rows: np.ndarray, opt: torch.optim.Optimizer,
                   tensors: dict[str, torch.Tensor]) -> list[float]:
        p = self.params
        f = self.fitted
        t0 = time.perf_counter()
        labels = np.stack([task_labels(data, t) for t in f.tasks])
        examples = rows[labels[:, rows].any(0)]
        tasks = f.tasks if p.logq_per_task else f.tasks[:1]
        estimators = [load_estimator(StreamingFrequencyEstimator(p.freq_hash_size, p.freq_hashes, p.freq_alpha,
                                                                 seed=self.seed),
                                     {k[len(t) + 1:]: v for k, v in tensors.items() if k.startswith(f"{t}.freq.")})
                      for t in tasks]
        if len(examples):
            train_multitask(p, self.seed, data, f, labels, examples, self.incremental_loop_config(self.progress), rng,
                            WarmState(examples, opt, estimators))
        f.train_s = time.perf_counter() - t0
        return f.losses

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.encode_items(data, self.publish_weights(self.fitted), items)

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        return self.encode_users(data, users)
