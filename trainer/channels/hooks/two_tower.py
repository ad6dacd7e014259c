"""two_tower's hooks: the served user tower's inputs and export, the published user and item vectors, and the
incremental updates (the mechanism: trainer/channels/warm_tower.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.towers import export_tower, input_meta
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.negatives import StreamingFrequencyEstimator
from trainer.nn.user_inputs import encode_in_batches, tower_inputs
from trainer.nn.warm_start import RowTable, WarmState, estimator_tensors, load_estimator


class TwoTowerHooks(WarmTowerChannel):
    """Publishing and warm-starting the user and item towers (`user_tower`, `item_tower`, set by the channel's
    `fit`; `_build_model` and `_train` are the channel's)."""

    def _user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent) tensors: the encoding of common/towers/inputs.py (the one serving uses)."""
        return tower_inputs(data, users, end, self.params.recent_n, self.user_attr_codes)

    # -- publishing -----------------------------------------------------------------------------
    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "two_tower_user", its hparams and the input meta."""
        return export_tower(self.user_tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                        self.user_enc.columns, self.user_enc.vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """User vectors from each user's latest `recent_n` items (what serving computes)."""
        return encode_in_batches(data, users, lambda u: self.user_tower(
            *self._user_inputs(data, u, data.user_ptr[u + 1])).numpy(), self.params.dim)

    @torch.no_grad()
    def encode_items(self, data: TrainData) -> np.ndarray:
        return self.item_tower(torch.arange(data.n_items, dtype=torch.int64)).numpy()

    # -- incremental updates --------------------------------------------------------------------
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        return {"user_tower": self.user_tower, "item_tower": self.item_tower}

    def warm_tables(self) -> list[RowTable]:
        """Users' rows (a first-time user starts from the unknown-user row); the items' rows, read by the item tower
        and pooled over the recent items by the user tower (one table twice when shared)."""
        return [RowTable("user_tower.user_emb.weight", "user", new="unknown"),
                RowTable("user_tower.trained_user", "user", train=False, derived=True, marks_trained=True),
                RowTable("user_tower.item_emb.weight", "item", history=True),
                RowTable("item_tower.item_emb.weight", "item", item_vector=True)]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The pointwise bias, the logQ frequency estimator, the attribute codes and vocabularies."""
        tensors, meta = self.attrs_checkpoint()
        return {"bias": self.bias.detach(), **tensors, **estimator_tensors(self.estimator)}, meta

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.restore_attrs(data, tensors, meta)

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        self._build_model(data)
        self.bias = torch.nn.Parameter(tensors["bias"].clone(), requires_grad=False)

    def warm_train(self, data: TrainData, rng: np.random.Generator, rows: np.ndarray, opt: torch.optim.Optimizer,
                   tensors: dict[str, torch.Tensor]) -> list[float]:
        p = self.params
        self.loop_config = self.incremental_loop_config(self.progress)
        estimator = load_estimator(StreamingFrequencyEstimator(p.freq_hash_size, p.freq_hashes, p.freq_alpha,
                                                               seed=self.seed), tensors)
        self._train(data, rng, WarmState(rows, opt, estimator))
        return self.losses

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self._encode_items(items)

    @torch.no_grad()
    def _encode_items(self, items: np.ndarray) -> np.ndarray:
        return self.item_tower(torch.as_tensor(items, dtype=torch.int64)).numpy()
