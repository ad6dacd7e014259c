"""Multi-task retrieval (the multitask_two_tower channel): the tasks and their positives, the fitted model that
several channels publish from, and its training loss Σ_t w_t · in-batch softmax_t, where task t's softmax runs over
the batch's t-positives (plus shared random draws for `mixed` tasks) and is corrected by a per-task logQ: each task
its own streaming frequency estimator over its own positives (liked items have another popularity curve)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from common.towers.multitask import MultiTaskUserTower
from trainer.data.events import LIKE, PURCHASE
from trainer.data.train_data import TrainData
from trainer.nn.encoding import AttrEncoding
from trainer.nn.loop import Batch, LoopConfig, adam, train_loop, unique_parameters
from trainer.nn.losses import candidate_softmax_loss
from trainer.nn.negatives import (
    PowerSampler,
    StreamingFrequencyEstimator,
    candidate_log_q,
    log_frequencies,
    relative_log_q,
)
from trainer.nn.towers import ItemTower
from trainer.nn.user_inputs import drop_user_ids, tower_inputs
from trainer.nn.warm_start import WarmState

Task = Literal["interacted", "liked", "purchased"]
TASK_EVENTS: dict[str, tuple[int, ...] | None] = {"interacted": None, "liked": (LIKE,), "purchased": (PURCHASE,)}
MIN_TASK_POSITIVES = 2  # a task with fewer positives in the data is not trained (e.g. "purchased" on ml-100k)
DEFAULT_SUBTASK_WEIGHT = 0.5  # loss weight of liked/purchased (ml-100k validation: 0.25, 0.5, 1, 2 → 0.5 best for both heads)


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


def task_schemes(negatives: str, tasks: list[str]) -> list[str]:
    """Each task's negatives: in_batch, or mixed (in-batch + `num_negatives` drawn ∝ count^negatives_power over the
    catalogue); `auto` = in-batch for interacted, mixed for the other tasks, whose positives miss items."""
    if negatives == "auto":
        return ["in_batch" if t == "interacted" else "mixed" for t in tasks]
    return [negatives] * len(tasks)


def train_multitask(p: Any, seed: int, data: TrainData, fitted: FittedMultiTask, labels: np.ndarray,
                    examples: np.ndarray, cfg: LoopConfig, rng: np.random.Generator,
                    warm: WarmState | None = None) -> None:
    """Train `fitted` (params `p` of the channel) on `examples` with labels [T, n_interactions]; with `warm` (an
    incremental update) with its optimiser and per-task estimators and the modules as `warm` left them (frozen)."""
    tasks, n_items, tower = fitted.tasks, data.n_items, fitted.user_tower
    weights = [p.loss_weights.get(t, 1.0 if t == "interacted" else DEFAULT_SUBTASK_WEIGHT) for t in tasks]
    schemes = task_schemes(p.negatives, tasks)
    sampler = PowerSampler(data.item_counts, p.negatives_power)
    n_random = p.num_negatives if "mixed" in schemes else 0
    # task t's in-batch candidates are the batch's t-positives, so q_t is the frequency among t-positives
    per_task = p.logq_per_task
    if warm is not None:
        estimators = warm.estimator
    else:
        estimators = [StreamingFrequencyEstimator(p.freq_hash_size, p.freq_hashes, p.freq_alpha, seed=seed)
                      for _ in (tasks if per_task else tasks[:1])]
    fitted.estimators = {t: estimators[j if per_task else 0] for j, t in enumerate(tasks)}
    exact = ([log_frequencies(np.bincount(data.item_idx[lab], minlength=n_items)) for lab in labels]
             if per_task else [log_frequencies(data.item_counts)]) if p.logq_source == "exact" else None
    sums = np.zeros(len(tasks))
    counts = np.zeros(len(tasks))

    def batch_loss(b: Batch) -> torch.Tensor:
        g = b.rows
        pos = data.item_idx[g].astype(np.int64)
        uid, attrs, rec = tower_inputs(data, data.user_idx[g].astype(np.int64), g, p.recent_n,
                                       fitted.user_attr_codes)
        uid = drop_user_ids(uid, p.user_id_dropout, data.n_users, rng)
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
            # every candidate; the row's own item (and its copies) masked
            loss_t = candidate_softmax_loss(u_all[torch.as_tensor(rows), t], vu[torch.as_tensor(inv)], cands,
                                            p.temperature, lq)
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

