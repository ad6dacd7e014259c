"""youtube_dnn's hooks: the served tower's inputs and export, the published user vectors (example age 0), and the
incremental updates (the mechanism: trainer/channels/warm_tower.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.towers import export_tower, input_meta
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.examples import next_item_positions
from trainer.data.train_data import TrainData
from trainer.nn.user_inputs import encode_in_batches, tower_inputs
from trainer.nn.warm_start import RowTable, extend_codes
from trainer.nn.youtube_inputs import extend_item_tokens


class YouTubeDNNHooks(WarmTowerChannel):
    """Publishing and warm-starting the YouTubeDNN tower (`self.tower`) and softmax output rows (`item_out`,
    `item_b`), set by the channel's `fit`."""

    def user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(user, attrs, recent, recent_ts): the encoding of common/towers/inputs.py (the one serving uses)."""
        return tower_inputs(data, users, end, self.params.recent_n, self.user_attr_codes, times=True)

    def set_candidates(self, data: TrainData) -> None:
        """Training candidates: every position with at least one earlier item of the same user; the cut-off time."""
        self.cand, self.cand_user = next_item_positions(data)
        self.cutoff = int(data.ts.max()) if len(data.ts) else 0

    # -- publishing -----------------------------------------------------------------------------
    def export_user_tower(self, data: TrainData) -> tuple[bytes, dict[str, Any]]:
        """(state-dict bytes, user_tower_meta): arch "youtube_dnn", its hparams and the input meta."""
        return export_tower(self.tower, input_meta(data.n_users, data.n_items, self.params.recent_n,
                                                   self.attr_columns, self.attr_vocab))

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """Served user vectors (example age 0) from each user's latest `recent_n` items and their times."""
        return encode_in_batches(data, users, lambda u: self.tower(*self.user_inputs(data, u, data.user_ptr[u + 1]))
                                 .numpy(), self.params.dim + int(self.params.item_bias))

    # -- incremental updates --------------------------------------------------------------------
    def warm_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"tower": self.tower, "age_proj": self.age_proj, "item_b": self.item_b,
                "item_out": None if self.params.share_item_emb else self.item_out}
        return {k: m for k, m in mods.items() if m is not None}

    def warm_tables(self) -> list[RowTable]:
        """The history embeddings and token codes of the items, the softmax's output rows (and biases) — which grow
        like the item table —, the user rows (use_user_id)."""
        shared = self.params.share_item_emb
        return [RowTable("tower.item_emb.weight", "item", history=True, item_vector=shared),
                RowTable("tower.item_tokens", "item", train=False),
                RowTable("tower.user_emb.weight", "user", new="unknown"),
                RowTable("tower.trained_user", "user", train=False, derived=True, marks_trained=True),
                RowTable("item_out.weight", "item", tail=0, item_vector=True),
                RowTable("item_b.weight", "item", tail=0, item_vector=True)]

    def warm_extra(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The user attribute codes and vocabularies, the token fields' vocabularies, the example-age quantiles."""
        return {"user_attr_codes": torch.as_tensor(self.user_attr_codes)}, {
            "attr_columns": self.attr_columns, "attr_vocab": self.attr_vocab, "attr_sizes": self.attr_sizes,
            "token_vocab": self.token_vocab, "token_size": self.token_size, "age_edges": self.age_edges.tolist()}

    def warm_prepare(self, data: TrainData, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        n_u0, n_i0 = int(meta["n_users"]), int(meta["n_items"])
        self.attr_columns, self.attr_vocab, self.attr_sizes = meta["attr_columns"], meta["attr_vocab"], meta["attr_sizes"]
        fields = [{"name": c, "vocab": self.attr_vocab[c], "kind": "categorical"} for c in self.attr_columns]
        self.user_attr_codes = extend_codes(tensors["user_attr_codes"].numpy(), n_u0, data.n_users,
                                            data.user_attrs if self.params.use_user_attrs else None, fields)
        self.token_vocab, self.token_size = meta["token_vocab"], int(meta["token_size"])
        self.token_fields_used = [f["column"] for f in self.token_vocab]
        self.item_tokens = extend_item_tokens(tensors["tower.item_tokens"].numpy(), self.token_vocab, data, n_i0)
        self.cont_edges = tensors["tower.cont_edges"].numpy()
        self.age_edges = np.asarray(meta["age_edges"], np.float32)
        self.set_candidates(data)  # the cut-off moves to the newest event: the new examples are the youngest

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.item_vectors_of(torch.as_tensor(items, dtype=torch.int64)).numpy()
