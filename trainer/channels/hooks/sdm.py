"""sdm's hooks: the served tower's inputs and export, the published user and item vectors, and the incremental
updates (the mechanism: trainer/channels/warm_tower.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.towers import export_tower, input_meta
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.user_inputs import encode_in_batches, tower_inputs
from trainer.nn.warm_start import RowTable


class SDMHooks(WarmTowerChannel):
    """Publishing and warm-starting the SDM tower (`tower`), output embedding (`out_emb`) and item side
    (`item_side`), set by the channel's `fit`; `item_vectors_of` is the channel's."""

    def user_inputs(self, data: TrainData, users: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The tower's request inputs of `users` from their latest `recent_n` items and times (what serving
        builds with common/towers/inputs.py)."""
        return tower_inputs(data, users, data.user_ptr[users + 1], self.params.recent_n, self.user_attr_codes,
                            times=True)

    # -- publishing -----------------------------------------------------------------------------
    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "sdm", its hparams and the input meta."""
        return export_tower(self.tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                   self.user_enc.columns, self.user_enc.vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """User vectors from each user's latest `recent_n` items (what serving computes)."""
        return encode_in_batches(data, users, lambda u: self.tower(*self.user_inputs(data, u)).numpy(),
                                 self.params.dim)

    @torch.no_grad()
    def encode_items(self, data: TrainData) -> np.ndarray:
        return self.item_vectors_of(torch.arange(data.n_items, dtype=torch.int64)).numpy()

    # -- incremental updates --------------------------------------------------------------------
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        side = {"item_side": self.item_side} if self.item_side is not None else {}
        return {"tower": self.tower, "out_emb": self.out_emb, **side}

    def warm_tables(self) -> list[RowTable]:
        """The input item embeddings (short- and long-term behaviours) and side codes, the output item embeddings,
        the user rows."""
        return [RowTable("tower.item_emb.weight", "item", history=True),
                RowTable("tower.item_codes", "item", train=False),
                RowTable("out_emb.weight", "item", tail=0, item_vector=True),
                RowTable("tower.user_emb.weight", "user", new="unknown"),
                RowTable("tower.trained_user", "user", train=False, derived=True, marks_trained=True)]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The user (and, with `item_attrs`, item) attribute codes and vocabularies, the side fields' value names."""
        tensors, meta = self.attrs_checkpoint(items=self.item_side is not None)
        return tensors, {**meta, "side_fields": self.side_fields, "side_names": self.side_names}

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        n_i0 = int(meta["n_items"])
        self.restore_attrs(data, tensors, meta)
        self.side_fields, self.side_names = meta["side_fields"], meta["side_names"]
        self.side_sizes = [len(n) for n in self.side_names]
        old = tensors["tower.item_codes"].numpy()[:n_i0]
        new = np.tile(np.asarray(self.side_sizes, np.int64), (data.n_items - n_i0, 1))  # unknown
        for j, f in enumerate(self.side_fields):
            c, names = data.item_field(f), data.item_field_names(f)
            if c is None or not len(new):
                continue
            index = {name: k for k, name in enumerate(self.side_names[j])}  # a new value: unknown until the nightly
            new[:, j] = [index.get(names[x], self.side_sizes[j]) if x >= 0 else self.side_sizes[j]
                         for x in c[n_i0:]]
        self.item_codes = np.concatenate([old, new]).reshape(data.n_items, len(self.side_fields))

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.item_vectors_of(torch.as_tensor(items, dtype=torch.int64)).numpy()
