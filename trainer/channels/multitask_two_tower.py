"""Multi-task two-tower retrieval: one shared user-tower bottom with a head per task ("interacted" = every
interaction, "liked" = LIKE events — ml-100k ratings ≥ 4 —, "purchased" = PURCHASE events), a shared item tower or
one per task, trained with loss Σ_t w_t · in-batch softmax_t, where task t's softmax runs over the batch's
t-positives and is corrected by a **per-task** logQ (each task its own streaming frequency estimator over its own
positives: liked items have another popularity curve than clicked ones).

What a channel publishes is chosen by `head` (one task's vectors) or `blend` ({task: weight}: score =
Σ_t w_t <u_t, v_t>, realised as [√w_t·u_t] · [√w_t·v_t], or Σ_t w_t·u_t against the shared item vectors). Two
config entries (e.g. `mt_click` with head interacted, `mt_liked` with head liked) train the model once per process:
the second entry with the same training params reuses the first one's fit (`share_fit`; see docs/channels.md).
Served at request time by the tower `common/towers/multitask.py` (arch "multitask_user").
"""

from __future__ import annotations

import json
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from common.towers import export_tower, history_inputs, input_meta
from common.towers.multitask import Combine, MultiTaskUserTower, combine_vectors
from trainer.channels.warm_tower import WarmTowerChannel
from trainer.data.events import LIKE, PURCHASE
from trainer.data.train_data import TrainData
from trainer.nn.encoding import AttrEncoding, encode_attrs
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import logits, pair_logits, softmax_loss
from trainer.nn.negatives import (
    PowerSampler,
    StreamingFrequencyEstimator,
    candidate_log_q,
    log_frequencies,
    relative_log_q,
)
from trainer.nn.towers import ItemTower
from trainer.nn.warm_start import (
    RowTable,
    WarmState,
    encoding_meta,
    estimator_tensors,
    extend_codes,
    load_estimator,
    restore_encoding,
)

Task = Literal["interacted", "liked", "purchased"]
TASK_EVENTS: dict[str, tuple[int, ...] | None] = {"interacted": None, "liked": (LIKE,), "purchased": (PURCHASE,)}
MIN_TASK_POSITIVES = 2  # a task with fewer positives in the data is not trained (e.g. "purchased" on ml-100k)
DEFAULT_SUBTASK_WEIGHT = 0.5  # loss weight of liked/purchased (ml-100k validation: 0.25, 0.5, 1, 2 → 0.5 best for both heads)


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


def task_labels(data: TrainData, task: str) -> np.ndarray:
    """bool per interaction: is it a positive of `task`?"""
    events = TASK_EVENTS[task]
    return np.ones(len(data.item_idx), bool) if events is None else np.isin(data.event, events)


@dataclass
class FittedMultiTask:
    """A trained model: encoders, the user tower (all heads) and the item tower(s); shared by channels."""

    tasks: list[str]
    positives: dict[str, int]
    user_enc: AttrEncoding
    user_attr_codes: np.ndarray
    user_tower: MultiTaskUserTower
    item_towers: list[ItemTower]  # one (shared) or one per task
    losses: list[float] = field(default_factory=list)
    task_losses: dict[str, list[float]] = field(default_factory=dict)
    train_s: float = 0.0
    estimators: dict[str, StreamingFrequencyEstimator] = field(default_factory=dict)  # the q_t each task used
    item_enc: AttrEncoding | None = None
    optimizer: torch.optim.Optimizer | None = None  # its Adam state goes into the training checkpoint

    def item_tower(self, t: int) -> ItemTower:
        return self.item_towers[t if len(self.item_towers) > 1 else 0]


@dataclass
class _CacheEntry:
    data: weakref.ref
    consumers: set[str]
    fitted: FittedMultiTask


_FITS: OrderedDict[str, _CacheEntry] = OrderedDict()  # training key → the latest fit (at most _MAX_FITS kept)
_MAX_FITS = 2


def _cached_fit(key: str, data: TrainData, channel: str) -> FittedMultiTask | None:
    """The fit with this key on this very `data` object, unless `channel` already used it (a channel fitting
    again — e.g. the evaluator's timing repeats — trains afresh)."""
    entry = _FITS.get(key)
    if entry is None or entry.data() is not data or channel in entry.consumers:
        return None
    entry.consumers.add(channel)
    return entry.fitted


def _store_fit(key: str, data: TrainData, channel: str, fitted: FittedMultiTask) -> None:
    _FITS[key] = _CacheEntry(weakref.ref(data), {channel}, fitted)
    _FITS.move_to_end(key)
    while len(_FITS) > _MAX_FITS:
        _FITS.popitem(last=False)


class MultiTaskTwoTowerChannel(WarmTowerChannel):
    """Shared-bottom multi-task two-tower u2i channel; publishes one task head or a blend."""

    model = "multitask_two_tower"
    kinds = ("u2i",)
    Params = MultiTaskTwoTowerParams

    fitted: FittedMultiTask | None = None
    metrics: dict[str, Any] | None = None

    # -- training -------------------------------------------------------------------------------
    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: MultiTaskTwoTowerParams = self.params
        t0 = time.perf_counter()
        key = f"{p.training_key()}|seed={self.seed}"
        self._artifacts = None
        fitted = _cached_fit(key, data, self.spec.name) if p.share_fit else None
        reused = fitted is not None
        if fitted is None:
            fitted = self._train(data, progress)
            if p.share_fit:
                _store_fit(key, data, self.spec.name, fitted)
        self.fitted = fitted
        weights = self.publish_weights(fitted)
        self.item_vectors = self.encode_items(data, weights)
        self.user_vectors = self.encode_users(data, weights=weights)
        self.metrics = {"fit_s": round(time.perf_counter() - t0, 3), "reused_fit": reused,
                        "train_s": round(fitted.train_s, 3), "tasks": fitted.tasks, "positives": fitted.positives,
                        "published": dict(zip(fitted.tasks, weights, strict=True)),
                        "loss": fitted.losses[-1] if fitted.losses else None,
                        "task_loss": {t: v[-1] for t, v in fitted.task_losses.items() if v}}

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
                self._loop(data, fitted, labels, examples, cfg, rng)
        fitted.train_s = time.perf_counter() - t0
        return fitted

    def _build(self, data: TrainData, tasks: list[str], positives: dict[str, int],
               encodings: tuple[AttrEncoding, np.ndarray, AttrEncoding] | None = None) -> FittedMultiTask:
        """Fresh modules for `data`; `encodings` (user encoding, user codes with the unknown row, item encoding)
        replace the ones fitted on `data` (an incremental update's published ones)."""
        p: MultiTaskTwoTowerParams = self.params
        if encodings is not None:
            user_enc, user_attr_codes, item_enc = encodings
        else:
            user_enc = encode_attrs(data.user_attrs if p.use_user_attrs else None, data.n_users, multi_valued=False,
                                    max_numeric_values=2000)
            item_enc = encode_attrs(data.item_attrs if p.use_item_attrs else None, data.n_items, multi_valued=True,
                                    categorical=(data.category_column or "",))
            ua = user_enc.codes[:, :, 0] if user_enc.columns else np.zeros((data.n_users, 1), np.int64)
            user_attr_codes = np.vstack([ua, np.zeros((1, ua.shape[1]), np.int64)])  # row n_users: unknown user
        item_emb = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
        torch.nn.init.normal_(item_emb.weight, std=0.05)
        with torch.no_grad():
            item_emb.weight[data.n_items].zero_()
        tower = MultiTaskUserTower(data.n_users, data.n_items, user_enc.sizes, p.emb_dim, p.dim, p.hidden,
                                   p.head_hidden, p.dropout, p.senet, p.use_user_id, tasks,
                                   recent_last=p.recent_last, item_emb=item_emb)
        with torch.no_grad():
            tower.trained_user[: data.n_users] = torch.as_tensor(
                np.bincount(data.user_idx, minlength=data.n_users)[: data.n_users] > 0)
        n_item_towers = len(tasks) if p.item_heads == "per_task" else 1
        items = [ItemTower(data.n_items, item_enc.codes, item_enc.sizes, p.emb_dim, p.dim, p.hidden, p.dropout,
                           p.senet, item_emb) for _ in range(n_item_towers)]
        return FittedMultiTask(tasks, positives, user_enc, user_attr_codes, tower, items, item_enc=item_enc)

    def schemes(self, tasks: list[str]) -> list[str]:
        """Each task's negatives: in_batch, or mixed (in-batch + `num_negatives` drawn ∝ count^negatives_power over
        the catalogue); `auto` = in-batch for interacted, mixed for the other tasks, whose positives miss items."""
        p: MultiTaskTwoTowerParams = self.params
        if p.negatives == "auto":
            return ["in_batch" if t == "interacted" else "mixed" for t in tasks]
        return [p.negatives] * len(tasks)

    def _loop(self, data: TrainData, fitted: FittedMultiTask, labels: np.ndarray, examples: np.ndarray,
              cfg: LoopConfig, rng: np.random.Generator, warm: WarmState | None = None) -> None:
        """Train on `examples`; with `warm` (an incremental update) with its optimiser and per-task estimators
        (`warm.estimator`, carried from the nightly) and the modules as `warm` left them (frozen)."""
        p: MultiTaskTwoTowerParams = self.params
        tasks, n_items, tower = fitted.tasks, data.n_items, fitted.user_tower
        weights = [p.loss_weights.get(t, 1.0 if t == "interacted" else DEFAULT_SUBTASK_WEIGHT) for t in tasks]
        schemes = self.schemes(tasks)
        sampler = PowerSampler(data.item_counts, p.negatives_power)
        n_random = p.num_negatives if "mixed" in schemes else 0
        # task t's in-batch candidates are the batch's t-positives, so q_t is the frequency among t-positives
        new_est = lambda: StreamingFrequencyEstimator(p.freq_hash_size, p.freq_hashes, p.freq_alpha,  # noqa: E731
                                                      seed=self.seed)
        per_task = p.logq_per_task
        if warm is not None:
            estimators = warm.estimator
        else:
            estimators = [new_est() for _ in tasks] if per_task else [new_est()]
        fitted.estimators = {t: estimators[j if per_task else 0] for j, t in enumerate(tasks)}
        exact = ([log_frequencies(np.bincount(data.item_idx[lab], minlength=n_items)) for lab in labels]
                 if per_task else [log_frequencies(data.item_counts)]) if p.logq_source == "exact" else None
        sums = np.zeros(len(tasks))
        counts = np.zeros(len(tasks))

        def batch_loss(b: Batch) -> torch.Tensor:
            g = b.rows
            pos = data.item_idx[g].astype(np.int64)
            uid, attrs, rec = self._user_inputs(data, fitted, data.user_idx[g], g)
            if p.user_id_dropout > 0:
                drop = torch.as_tensor(rng.random(len(g)) < p.user_id_dropout)
                uid = torch.where(drop, torch.full_like(uid, data.n_users), uid)
            lab = labels[:, g]
            if p.logq and p.logq_source == "stream":
                if per_task:
                    for t in range(len(tasks)):  # a few tasks, each fed its own positives in stream order
                        estimators[t].update(pos[lab[t]])
                else:
                    estimators[0].update(pos[lab.any(0)])
            rand = sampler.sample(rng, n_random) if n_random else np.empty(0, np.int64)  # shared by the tasks
            u_all = tower.task_vectors(uid, attrs, rec)  # [B, T, d]
            if len(fitted.item_towers) == 1:  # shared item tower: every candidate of every task in one pass
                every = np.unique(np.concatenate([pos, rand]))
                every_vecs = fitted.item_towers[0](torch.as_tensor(every))
            total = u_all.sum() * 0.0
            for t in range(len(tasks)):
                rows = np.flatnonzero(lab[t])
                if len(rows) < 2:
                    continue
                items = pos[rows]
                k = n_random if schemes[t] == "mixed" else 0
                cands = np.concatenate([items, rand[:k]])
                uniq, inv = np.unique(cands, return_inverse=True)
                ids = torch.as_tensor(uniq)
                if len(fitted.item_towers) == 1:
                    vu = every_vecs[torch.as_tensor(np.searchsorted(every, uniq))]
                else:
                    vu = fitted.item_tower(t)(ids)
                lq = None
                if p.logq:
                    j = t if per_task else 0
                    lq = candidate_log_q(schemes[t], ids, len(items), k, sampler, estimators[j],
                                         None if exact is None else exact[j])
                    lq = relative_log_q(lq, n_items, p.logq_weight)[torch.as_tensor(inv)]
                v = vu[torch.as_tensor(inv)]
                u = u_all[torch.as_tensor(rows), t]
                n = len(items)
                pos_logit = pair_logits(u, v[:n], p.temperature, None if lq is None else lq[:n])
                neg = logits(u, v, p.temperature, lq)  # every candidate; the row's own item (and its copies) masked
                valid = torch.as_tensor(cands[None, :] != items[:, None])
                loss_t = softmax_loss(pos_logit, neg, valid)
                sums[t] += float(loss_t.detach())
                counts[t] += 1
                total = total + weights[t] * loss_t
            return total

        def on_epoch_end(epoch: int, mean_loss: float) -> dict[str, str]:
            out = {}
            for t, name in enumerate(tasks):
                fitted.task_losses[name].append(float(sums[t] / max(counts[t], 1)))
                out[name] = f"{fitted.task_losses[name][-1]:.3f}"
            sums[:] = 0.0
            counts[:] = 0.0
            return out

        fitted.optimizer = warm.optimizer if warm else adam(unique_parameters(tower, *fitted.item_towers), cfg)
        hist = train_loop(batch_loss, examples, fitted.optimizer, cfg, rng, on_epoch_end=on_epoch_end,
                          modules=[] if warm else [tower, *fitted.item_towers])  # eval mode when it returns
        fitted.losses = hist.losses

    def _user_inputs(self, data: TrainData, fitted: FittedMultiTask, users: np.ndarray, end: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user, attrs, recent) of common/towers/inputs.py (what serving builds): the items before `end`."""
        users = np.asarray(users, np.int64)
        x = history_inputs(users, fitted.user_attr_codes[users], data.item_idx, data.user_ptr[users], end,
                           self.params.recent_n, data.n_items)
        return torch.as_tensor(x.user), torch.as_tensor(x.attrs), torch.as_tensor(x.recent)

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
        tower = self.served_tower(weights)
        users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        out = [tower(*self._user_inputs(data, self.fitted, u, data.user_ptr[u + 1])).numpy()
               for u in (users[b:b + 4096] for b in range(0, len(users), 4096))]
        if out:
            return np.concatenate(out).astype(np.float32)
        w = self.publish_weights(self.fitted) if weights is None else weights
        width = self.params.dim * (1 if self.combine == "sum" else sum(x > 0 for x in w))
        return np.zeros((0, width), np.float32)

    # -- incremental updates between nightlies (docs/event_log.md; the mechanism: trainer/channels/warm_tower.py) --
    # Each published channel (head or blend) updates its own copy of the model: two heads of one nightly fit
    # diverge slightly until the next nightly.
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
        p: MultiTaskTwoTowerParams = self.params
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
            self._loop(data, f, labels, examples, self.incremental_loop_config(self.progress), rng,
                       WarmState(examples, opt, estimators))
        f.train_s = time.perf_counter() - t0
        return f.losses

    def encode_item_rows(self, data: TrainData, items: np.ndarray) -> np.ndarray:
        return self.encode_items(data, self.publish_weights(self.fitted), items)

    def encode_user_rows(self, data: TrainData, users: np.ndarray) -> np.ndarray:
        return self.encode_users(data, users)
