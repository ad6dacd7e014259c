"""Multi-task two-tower retrieval: one shared user-tower bottom with a head per task ("interacted" = every
interaction, "liked" = LIKE events — ml-100k ratings ≥ 4 —, "purchased" = PURCHASE events), a shared item tower or
one per task, trained with Σ_t w_t · in-batch softmax_t under a per-task logQ (trainer/nn/multitask.py).

What a channel publishes is chosen by `head` (one task's vectors) or `blend` ({task: weight}: score =
Σ_t w_t <u_t, v_t>, realised as [√w_t·u_t] · [√w_t·v_t], or Σ_t w_t·u_t against the shared item vectors). Two
config entries (e.g. `mt_click` with head interacted, `mt_liked` with head liked) train the model once per process
(`share_fit`: trainer/channels/fit_cache.py; docs/channels.md). Served at request time by the tower
`common/towers/multitask.py` (arch "multitask_user"); publishing and incremental updates:
trainer/channels/hooks/multitask_two_tower.py.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from common.towers.multitask import MultiTaskUserTower
from trainer.channels.fit_cache import cached_fit, store_fit
from trainer.channels.hooks.multitask_two_tower import MultiTaskTwoTowerHooks
from trainer.data.train_data import TrainData
from trainer.nn.encoding import AttrEncoding, item_tower_encoding, user_tower_encoding
from trainer.nn.loop import LoopConfig, seeded
from trainer.nn.multitask import MIN_TASK_POSITIVES, FittedMultiTask, Task, task_labels, train_multitask
from trainer.nn.towers import ItemTower
from trainer.nn.user_inputs import trained_users


class MultiTaskTwoTowerParams(BaseModel):
    """Hyper-parameters (defaults: two_tower's, plus the multi-task choices picked on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    emb_dim: int = Field(64, ge=2, le=1024, description="embedding size of every input field")
    dim: int = Field(64, ge=2, le=1024, description="vector size of each task head")
    hidden: list[int] = Field(default_factory=lambda: [128], description="shared bottom of the user tower; also "
                              "each item tower's hidden layers")
    head_hidden: list[int] = Field(default_factory=list, description="hidden layers of each task head")
    dropout: float = Field(0.0, ge=0, lt=1)
    recent_n: int = Field(10, ge=1, le=500, description="recent items pooled in the user tower")
    recent_last: bool = Field(True, description="also feed the newest recent item's embedding as its own field")
    use_user_id: bool = True
    use_user_attrs: bool = True
    use_item_attrs: bool = True
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of examples trained as an unknown user")
    senet: bool = False
    tasks: list[Task] = Field(default_factory=lambda: ["interacted", "liked", "purchased"],
                              description="tasks trained where the data has their positives")
    loss_weights: dict[Task, float] = Field(default_factory=dict, description="w_t of each task's loss (default: 1 "
                                            "for interacted, 0.5 for the others)")
    item_heads: Literal["shared", "per_task"] = Field("shared", description="one item tower, or one per task "
                                                      "(sharing the item id embeddings)")
    head: Task | None = Field(None, description="publish this task's head (default 'interacted' unless `blend`)")
    blend: dict[Task, float] | None = Field(None, description="publish Σ_t w_t <u_t, v_t> for these weights")
    negatives: Literal["in_batch", "mixed", "auto"] = Field(
        "auto", description="each task's candidates: its in-batch positives (in_batch), plus num_negatives shared "
        "draws ∝ count^negatives_power (mixed); auto = in_batch for interacted, mixed for the other tasks")
    num_negatives: int = Field(64, ge=1, le=100_000, description="random negatives per batch (mixed)")
    negatives_power: float = Field(0.75, ge=0, le=1, description="random negatives ∝ count^negatives_power")
    logq: bool = Field(True, description="sampling-bias correction s(x,y) − β·log q_t(y)")
    logq_per_task: bool = Field(True, description="each task its own frequency estimate (false: every task uses "
                                "the interactions' estimate — the ablation)")
    logq_weight: float = Field(1.25, ge=0, le=2, description="β")
    logq_source: Literal["stream", "exact"] = Field("stream", description="q: streaming estimator or exact counts")
    temperature: float = Field(0.05, gt=0, le=10)
    epochs: int = Field(7, ge=1, le=1000)
    batch_size: int = Field(512, ge=2, le=65536)
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    freq_hash_size: int = Field(1 << 16, ge=16)
    freq_hashes: int = Field(2, ge=1, le=8)
    freq_alpha: float = Field(0.01, gt=0, le=1)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")
    share_fit: bool = Field(True, description="reuse the fit of another channel with the same training params on "
                            "the same data in this process (one training for several published heads)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"tasks must be distinct and not empty: {v}")
        return v

    @field_validator("loss_weights", "blend")
    @classmethod
    def _weights(cls, v: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        if v is None:
            return v
        if any(w < 0 for w in v.values()):
            raise ValueError("weights must be ≥ 0")
        unknown = sorted(set(v) - set(info.data.get("tasks") or ()))
        if unknown:
            raise ValueError(f"{unknown} not among tasks {info.data.get('tasks')}")
        if info.field_name == "blend":
            if not any(w > 0 for w in v.values()):
                raise ValueError("at least one weight must be > 0")
            if info.data.get("head") is not None:
                raise ValueError("set either head or blend, not both")
        return v

    @field_validator("head")
    @classmethod
    def _head(cls, v: str | None, info: ValidationInfo) -> str | None:
        tasks = info.data.get("tasks") or ()
        if v is not None and v not in tasks:
            raise ValueError(f"head {v!r} is not among tasks {list(tasks)}")
        return v

    @model_validator(mode="after")
    def _published(self) -> MultiTaskTwoTowerParams:
        if self.head is None and self.blend is None and "interacted" not in self.tasks:
            raise ValueError("without 'interacted' among tasks, set `head` or `blend`")
        return self

    def publish_weights(self) -> dict[str, float]:
        """{task: weight} of what the channel publishes (a head is weight 1)."""
        if self.blend is not None:
            return {t: float(w) for t, w in self.blend.items() if w > 0}
        return {self.head or "interacted": 1.0}

    def training_key(self) -> str:
        """The params that determine the fitted model (what to publish aside)."""
        return json.dumps(self.model_dump(exclude={"head", "blend", "share_fit"}), sort_keys=True)


class MultiTaskTwoTowerChannel(MultiTaskTwoTowerHooks):
    """Shared-bottom multi-task two-tower u2i channel; publishes one task head or a blend."""

    model = "multitask_two_tower"
    kinds = ("u2i",)
    Params = MultiTaskTwoTowerParams

    metrics: dict[str, Any] | None = None

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: MultiTaskTwoTowerParams = self.params
        t0 = time.perf_counter()
        key = f"{p.training_key()}|seed={self.seed}"
        self._artifacts = None
        fitted = cached_fit(key, data, self.spec.name) if p.share_fit else None
        reused = fitted is not None
        if fitted is None:
            fitted = self._train(data, progress)
            if p.share_fit:
                store_fit(key, data, self.spec.name, fitted)
        self.fitted = fitted
        weights = self.publish_weights(fitted)
        self.item_vectors = self.encode_items(data, weights)
        self.user_vectors = self.encode_users(data, weights=weights)
        self.metrics = {"fit_s": round(time.perf_counter() - t0, 3), "reused_fit": reused,
                        "train_s": round(fitted.train_s, 3), "tasks": fitted.tasks, "positives": fitted.positives,
                        "published": dict(zip(fitted.tasks, weights, strict=True)),
                        "loss": fitted.losses[-1] if fitted.losses else None,
                        "task_loss": {t: v[-1] for t, v in fitted.task_losses.items() if v}}

    def _train(self, data: TrainData, progress: bool) -> FittedMultiTask:
        p: MultiTaskTwoTowerParams = self.params
        t0 = time.perf_counter()
        labels_all = {t: task_labels(data, t) for t in p.tasks}
        positives = {t: int(v.sum()) for t, v in labels_all.items()}
        tasks = [t for t in p.tasks if positives[t] >= MIN_TASK_POSITIVES] or [p.tasks[0]]
        labels = np.stack([labels_all[t] for t in tasks])  # [T, n_interactions]
        cfg = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                         seed=self.seed, num_threads=p.num_threads, min_batch=2, progress=progress,
                         desc="multitask_two_tower")
        with seeded(self.seed, p.num_threads) as rng:
            fitted = self._build(data, tasks, positives)
            fitted.task_losses = {t: [] for t in tasks}
            examples = np.flatnonzero(labels.any(0)).astype(np.int64)
            if len(examples):
                train_multitask(p, self.seed, data, fitted, labels, examples, cfg, rng)
        fitted.train_s = time.perf_counter() - t0
        return fitted

    def _build(self, data: TrainData, tasks: list[str], positives: dict[str, int],
               encodings: tuple[AttrEncoding, np.ndarray, AttrEncoding] | None = None) -> FittedMultiTask:
        """Fresh towers for `data`: the user tower (shared bottom, a head per task) and one item tower or one per
        task, sharing the item id embeddings; `encodings` (user encoding, user codes with the unknown row, item
        encoding) replace the ones fitted on `data` (an incremental update's published ones)."""
        p: MultiTaskTwoTowerParams = self.params
        if encodings is not None:
            user_enc, user_attr_codes, item_enc = encodings
        else:
            user_enc, user_attr_codes = user_tower_encoding(data.user_attrs if p.use_user_attrs else None,
                                                            data.n_users)
            item_enc = item_tower_encoding(data.item_attrs if p.use_item_attrs else None, data.n_items,
                                           data.category_column)
        item_emb = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
        torch.nn.init.normal_(item_emb.weight, std=0.05)
        with torch.no_grad():
            item_emb.weight[data.n_items].zero_()
        user_tower = MultiTaskUserTower(data.n_users, data.n_items, user_enc.sizes, p.emb_dim, p.dim, p.hidden,
                                        p.head_hidden, p.dropout, p.senet, p.use_user_id, tasks,
                                        recent_last=p.recent_last, item_emb=item_emb)
        with torch.no_grad():
            user_tower.trained_user[: data.n_users] = trained_users(data.user_idx, data.n_users)
        n_item_towers = len(tasks) if p.item_heads == "per_task" else 1
        item_towers = [ItemTower(data.n_items, item_enc.codes, item_enc.sizes, p.emb_dim, p.dim, p.hidden, p.dropout,
                                 p.senet, item_emb) for _ in range(n_item_towers)]
        return FittedMultiTask(tasks, positives, user_enc, user_attr_codes, user_tower, item_towers,
                               item_enc=item_enc)
