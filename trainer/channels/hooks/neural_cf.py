"""neural_cf's hooks: the two-stage serving export (faiss over the GMF part, then NeuMF rescoring of the top
`rescore_n`, or of the whole catalogue when it has at most `max_catalog_bruteforce` items: `common.towers.rescore.
two_stage`, run by the vector server and the evaluator), the published query vectors, and the incremental updates
(the mechanism: trainer/channels/warm_tower.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.towers import export_tower, input_meta
from common.towers.rescore import rescore_meta
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.train_data import TrainData
from trainer.nn.user_inputs import encode_in_batches, tower_inputs
from trainer.nn.warm_start import RowTable, WarmState

NO_BRUTEFORCE_LIMIT = 2**62  # the MLP-only variant has no indexable part: always scored whole


class NeuralCFHooks(WarmTowerChannel):
    """Publishing and warm-starting the NeuMF module (`self.net`, set by the channel's `fit`)."""

    def user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent, recent_ts) of common/towers/inputs.py: the items before `end` (training: the
        example's own position, so no leakage; export: one past the user's last interaction)."""
        return tower_inputs(data, users, end, self.params.recent_n, times=True)

    # -- publishing -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """Query vectors from each user's latest `recent_n` items (what the tower computes at request time)."""
        return encode_in_batches(data, users, lambda u: self.net(*self.user_inputs(data, u, data.user_ptr[u + 1]))
                                 .numpy(), self.net.out_dim)

    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "neural_cf", its inputs, and how to rescore with it."""
        p = self.params
        blob, meta = export_tower(self.net, input_meta(data.n_users, data.n_items, p.recent_n, [], {}))
        if p.variant == "mlp":
            meta.update(rescore_meta(max(p.rescore_n, 1), NO_BRUTEFORCE_LIMIT))
        elif p.variant == "neumf" and p.rescore_n > 0:
            meta.update(rescore_meta(p.rescore_n, p.max_catalog_bruteforce))
        return blob, meta

    # -- incremental updates --------------------------------------------------------------------
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def warm_tables(self) -> list[RowTable]:
        """GMF and MLP rows of users and items, the history embeddings, the catalogue (items with a click)."""
        return [RowTable("net.gmf_user.weight", "user", new="unknown"),
                RowTable("net.mlp_user.weight", "user", new="unknown"),
                RowTable("net.trained_user", "user", train=False, derived=True, marks_trained=True),
                RowTable("net.gmf_item.weight", "item", item_vector=True),
                RowTable("net.mlp_item.weight", "item"),  # the rescorer's, published with the tower
                RowTable("net.gmf_hist.weight", "item", history=True),
                RowTable("net.mlp_hist.weight", "item", history=True),
                RowTable("net.catalog", "item", tail=0, train=False, derived=True, item_vector=True)]

    def warm_lr(self) -> float:
        """The step size of the last phase the nightly trained (NeuMF fine-tuning after pre-training)."""
        p = self.params
        return float(p.finetune_lr or p.lr) if p.variant == "neumf" and p.pretrain else float(p.lr)

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.losses = {}

    def warm_build(self, data: TrainData, tensors: dict[str, torch.Tensor]) -> None:
        p = self.params
        self.net = self.new_model(data, gmf=p.variant != "mlp", mlp=p.variant != "gmf")

    def warm_train(self, data: TrainData, rng: np.random.Generator, rows: np.ndarray, opt: torch.optim.Optimizer,
                   tensors: dict[str, torch.Tensor]) -> list[float]:
        self.losses["incremental"] = self._train(self.net, data, rng, 1, "adam", self.warm_lr(), self.progress,
                                                 WarmState(rows, opt, None))
        self.net.set_sparse(False)
        return self.losses["incremental"]

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.net.item_vectors().numpy()[items]

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        return self.encode_users(data, users)
