"""Incremental updates of the request-time tower channels between nightlies (docs/event_log.md, "Incremental
updates"): two_tower, youtube_dnn, multitask_two_tower, neural_cf, sdm and mind all warm-start the same way.

From the published version's training checkpoint (every module's weights, the optimiser's Adam state, the model's
encodings and sampling state): the model extends its encodings to the new users and items through the published
vocabularies, builds its modules at the new sizes, and `trainer.nn.warm_start.WarmStart` loads the checkpoint into
them with every user- and item-indexed tensor grown (`RowTable`s: old rows bit for bit), freezes everything but the
ID embedding tables (eval mode: Dropout off, BatchNorm on its running statistics) and gives their row-sparse Adam
with the grown state. The model then trains one pass over the new interactions with its nightly loss, and only the
items and users whose vectors can have changed are re-encoded; the rest are the published vectors.

A model implements the hooks (`warm_modules`, `warm_tables`, `warm_prepare`, `encode_item_rows`, optionally
`warm_extra`, `warm_build`, `warm_train`, `encode_user_rows`) and keeps its nightly optimiser in `self.optimizer`;
`attrs_checkpoint` / `restore_attrs` carry the user (and item) attribute encodings most towers share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData
from trainer.nn.loop import LoopConfig, seeded
from trainer.nn.warm_start import (
    BaseVersion,
    RowTable,
    WarmStart,
    WarmState,
    encoding_meta,
    extend_codes,
    named_unique_parameters,
    optimizer_tensors,
    pack_checkpoint,
    read_checkpoint,
    restore_encoding,
    reuse_rows,
)


class WarmTowerChannel(EmbeddingChannel):
    """An embedding channel whose towers warm-start between nightlies (module docstring)."""

    optimizer: Any = None  # the optimiser(s) of the last training: its Adam state goes into the checkpoint

    # -- hooks ------------------------------------------------------------------------------------------------
    def warm_modules(self) -> dict[str, nn.Module]:
        """Prefix → module, every trained weight of the model; the first one is the user tower (its n_users and
        n_items are the model's sizes)."""
        raise NotImplementedError

    def warm_tables(self) -> list[RowTable]:
        """The user- and item-indexed tensors of `warm_modules` (absent keys are ignored)."""
        raise NotImplementedError

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Extra checkpoint tensors and meta: the encodings' codes and vocabularies, sampling state."""
        return {}, {}

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """The published encodings extended to `data`'s new users and items (codes of existing rows unchanged)."""
        raise NotImplementedError

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        """Fresh modules at `data`'s sizes (the new rows' initial draws are made here); default: the nightly's."""
        self._build_model(data)

    def warm_train(self, data: TrainData, rng: np.random.Generator, rows: np.ndarray,
                   opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> list[float]:
        """One pass of the nightly's loss over the interactions at `rows`, stepping `opt`, modules left as they are
        (frozen, eval mode); returns the losses. Default: the nightly's `_train` with no logQ state carried."""
        self.loop_config = self.incremental_loop_config(self.progress, min_batch=self.warm_min_batch)
        self._train(data, rng, WarmState(rows, opt, None))
        return self.losses

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        """The published vectors of `items`."""
        raise NotImplementedError

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        """The published vectors of `users` (from their latest items)."""
        return self.encode_users(data, users)

    warm_min_batch = 2  # the smallest batch the default `warm_train` steps on

    # -- shared pieces of the hooks ------------------------------------------------------------------------------
    def attrs_checkpoint(self, items: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """`warm_extra`'s part for the user (and item) attribute codes and vocabularies."""
        tensors = {"user_attr_codes": torch.as_tensor(self.user_attr_codes)}
        meta = {"user_fields": encoding_meta(self.user_enc)}
        if items:
            tensors["item_attr_codes"] = torch.as_tensor(self.item_enc.codes)
            meta["item_fields"] = encoding_meta(self.item_enc)
        return tensors, meta

    def restore_attrs(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """`warm_prepare`'s part: the checkpointed attribute encodings extended to `data`'s new users (and items)."""
        n_u0, n_i0 = int(meta["n_users"]), int(meta["n_items"])
        self.user_attr_codes = extend_codes(tensors["user_attr_codes"].numpy(), n_u0, data.n_users, data.user_attrs,
                                            meta["user_fields"], tail=1)
        self.user_enc = restore_encoding(meta["user_fields"], self.user_attr_codes, data.n_users)
        if "item_attr_codes" in tensors:
            codes = extend_codes(tensors["item_attr_codes"].numpy(), n_i0, data.n_items, data.item_attrs,
                                 meta["item_fields"])
            self.item_enc = restore_encoding(meta["item_fields"], codes, data.n_items)

    def warm_lr(self) -> float:
        return float(self.params.lr)

    def incremental_loop_config(self, progress: bool, min_batch: int = 2) -> LoopConfig:
        """The nightly's batches and step size, one epoch."""
        p = self.params
        return LoopConfig(epochs=1, batch_size=p.batch_size, lr=self.warm_lr(),
                          weight_decay=getattr(p, "weight_decay", 0.0), seed=self.seed,
                          num_threads=getattr(p, "num_threads", 1), min_batch=min_batch, progress=progress,
                          desc=f"{self.model} incremental")

    # -- the mechanism -----------------------------------------------------------------------------------------
    def training_checkpoint(self) -> bytes | None:
        """What an incremental update warm-starts from (published next to the artifacts, never served)."""
        if self.optimizer is None:
            return None
        modules = self.warm_modules()
        tower = next(iter(modules.values()))
        tensors = {f"{prefix}.{k}": v for prefix, m in modules.items() for k, v in m.state_dict().items()}
        tensors.update(optimizer_tensors(self.optimizer, named_unique_parameters(**modules)))
        extra, meta = self.warm_extra()
        tensors.update(extra)
        return pack_checkpoint(tensors, {"model": self.model, "n_users": int(tower.n_users),
                                         "n_items": int(tower.n_items), "params": self.params.model_dump(), **meta})

    def incremental_fit(self, data: TrainData, base: BaseVersion, rows: np.ndarray, progress: bool = False) -> dict:
        """Warm-start from `base`'s checkpoint at `data`'s sizes, train one pass over the interactions at `rows` (the
        new events) with only the ID tables trainable, re-encode only what changed; returns a report."""
        tensors, meta = read_checkpoint(base.checkpoint())
        if meta.get("model") != self.model:
            raise ValueError(f"checkpoint of model {meta.get('model')!r}, not {self.model!r}")
        self.params = self.Params(**meta["params"])  # the published architecture, whatever the config says now
        rows = np.asarray(rows, np.int64)
        n_u0, n_i0 = int(meta["n_users"]), int(meta["n_items"])
        ws = WarmStart(tensors, n_u0, n_i0, data.n_users, data.n_items)
        self.progress = progress
        with seeded(self.seed, getattr(self.params, "num_threads", 1)) as rng:
            self._artifacts = None
            self.warm_prepare(data, tensors, meta)
            self.warm_build(data, tensors)
            ws.load(self.warm_modules(), self.warm_tables())
            self.optimizer = ws.optimizer(self.warm_lr(), getattr(self.params, "weight_decay", 0.0))
            losses = self.warm_train(data, rng, rows, self.optimizer, tensors)
        stale_items, stale_users = ws.stale(ws.changed(), data, rows, int(self.params.recent_n))
        published_items, published_users = base.array("item_vectors"), base.array("user_vectors")
        with torch.no_grad():
            self.set_vectors(reuse_rows(published_items, stale_items, lambda i: self.encode_item_rows(data, i)),
                             reuse_rows(published_users, stale_users, lambda u: self.encode_user_rows(data, u)))
        return {"examples": int(len(rows)), "loss": losses[-1] if losses else None,
                "new_users": data.n_users - n_u0, "new_items": data.n_items - n_i0,
                "items_reencoded": int(stale_items.sum()) if published_items is not None else data.n_items,
                "users_reencoded": int(stale_users.sum()) if published_users is not None else data.n_users}

    def set_vectors(self, item_vectors: np.ndarray, user_vectors: np.ndarray) -> None:
        """What the update publishes (a multi-interest model also sets its interest counts)."""
        self.item_vectors, self.user_vectors = item_vectors.astype(np.float32), user_vectors.astype(np.float32)
