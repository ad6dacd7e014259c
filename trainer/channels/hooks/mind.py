"""mind's hooks: the served tower's inputs and export, the published interest vectors (K_u live ones per user) and
item vectors, and the incremental updates (the mechanism: trainer/channels/warm_tower.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.towers import export_tower, input_meta
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.user_inputs import ENCODE_BATCH, tower_inputs
from trainer.nn.warm_start import RowTable


class MindHooks(WarmTowerChannel):
    """Publishing and warm-starting the MIND tower (`self.tower`, set by the channel's `fit`)."""

    def user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent) tensors in the encoding of common/towers/inputs.py (the one serving uses)."""
        return tower_inputs(data, users, end, self.params.recent_n, self.user_attr_codes)

    # -- publishing -----------------------------------------------------------------------------
    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "mind", its hparams and the input meta."""
        return export_tower(self.tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                   self.user_enc.columns, self.user_enc.vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([n, K, d] interest vectors from each user's latest `recent_n` items (what serving computes; rows past
        K_u zero), int32 [n] K_u)."""
        users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        vecs, counts = [], []
        for b0 in range(0, len(users), ENCODE_BATCH):
            u = users[b0:b0 + ENCODE_BATCH]
            v, live = self.tower.interests(*self.user_inputs(data, u, data.user_ptr[u + 1]))
            vecs.append(v.numpy())
            counts.append(live.sum(1).numpy())
        if not vecs:
            return np.zeros((0, self.params.n_interests, self.params.dim), np.float32), np.zeros(0, np.int32)
        return np.concatenate(vecs).astype(np.float32), np.concatenate(counts).astype(np.int32)

    @torch.no_grad()
    def encode_items(self, data: TrainData, items: np.ndarray | None = None) -> np.ndarray:
        """float32 [n_items, d]: the L2-normalised pooled item embeddings (score = cos(interest, item)); of `items`
        only when given."""
        ids = torch.arange(data.n_items) if items is None else torch.as_tensor(items, dtype=torch.int64)
        return F.normalize(self.tower.items(ids), dim=1).numpy().astype(np.float32)

    # -- incremental updates --------------------------------------------------------------------
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        return {"tower": self.tower}

    def warm_tables(self) -> list[RowTable]:
        """The items' id rows (behaviours and item vectors alike) and side-information bags, the user rows."""
        return [RowTable("tower.items.id_emb.weight", "item", history=True, item_vector=True),
                RowTable("tower.items.attr_idx", "item", train=False),
                RowTable("tower.user_emb.weight", "user", new="unknown"),
                RowTable("tower.trained_user", "user", train=False, derived=True, marks_trained=True)]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The attribute codes and vocabularies of users and items."""
        return self.attrs_checkpoint()

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.restore_attrs(data, tensors, meta)

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        self.tower = self.build_tower(data)

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.encode_items(data, items)

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        return self.encode_users(data, users)[0]

    def set_vectors(self, item_vectors: np.ndarray, user_vectors: np.ndarray) -> None:
        super().set_vectors(item_vectors, user_vectors)
        self.interest_counts = (self.user_vectors != 0).any(axis=2).sum(axis=1).astype(np.int32)
