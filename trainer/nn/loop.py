"""One training loop for the neural models: epochs of shuffled mini-batches, the optimiser step, a tqdm bar,
optional early stopping on a validation score, reproducible with a seed.

A model supplies `batch_loss(batch) -> loss` (a scalar tensor, over the example indices `batch.rows`); the loop
owns everything else. Per epoch: the examples (an array, or a callable drawing them from the generator, e.g. a
down-sampling of popular positives) in `rng.permutation` order, batches of `batch_size` (a batch smaller than
`min_batch` is skipped), `zero_grad → backward → step` of every optimiser, the mean of `loss.item()` per epoch.

    cfg = LoopConfig(epochs=7, batch_size=512, lr=0.003, seed=self.seed, num_threads=1, progress=progress)
    with seeded(cfg.seed, cfg.num_threads) as rng:       # torch.manual_seed, numpy Generator, threads
        model = build()                                    # initialised under the seed
        history = train_loop(batch_loss, np.arange(n), adam(model.parameters(), cfg), cfg, rng, modules=[model])

Same seed and thread count → bit-identical weights (one thread: no reduction-order noise).

Data-parallel (`with data_parallel(seed):` in each process of an initialised torch.distributed group, e.g. Ray
Train's gloo workers; trainer/engine/ray_train.py): every loop inside runs the same global batches in the same order
on every rank, each rank takes its share of each batch, and the gradients are averaged across ranks before every
step (what DDP does), so N ranks train one model with the single-process batch size and step count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class LoopConfig:
    """What a training run is: the optimiser's step and decay, epochs, batches, seed and threads, early stop."""

    epochs: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0  # the optimiser's L2 term (a model's own penalty in its loss is `reg`)
    seed: int = 42
    num_threads: int = 1  # torch intra-op threads while fitting (1: bit-reproducible)
    min_batch: int = 2  # smaller batches (the epoch's tail) are skipped
    patience: int | None = None  # stop after this many epochs without a better validation score (None: never)
    higher_is_better: bool = True  # the validation score's direction
    progress: bool = False
    desc: str = "train"


@contextmanager
def seeded(seed: int, num_threads: int | None = 1) -> Iterator[np.random.Generator]:
    """Seed torch, set torch's thread count (None: leave it), and give the run's numpy Generator; the previous
    thread count is restored on exit."""
    prev = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        yield np.random.default_rng(seed)
    finally:
        torch.set_num_threads(prev)


def unique_parameters(*groups: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters of modules / iterables in order, each once (shared embeddings appear in several towers)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for g in groups:
        for p in (g.parameters() if isinstance(g, nn.Module) else g):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def adam(params: Iterable[nn.Parameter], config: LoopConfig) -> torch.optim.Adam:
    """Adam with the run's lr and weight decay."""
    return torch.optim.Adam(list(params), lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class Batch:
    """One mini-batch: the example indices, their offset in the epoch's order, the steps already taken, the epoch."""

    rows: np.ndarray
    start: int
    step: int
    epoch: int


@dataclass
class History:
    """What a run did: mean loss and validation score per epoch, steps, the best epoch, whether it stopped early."""

    losses: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    steps: int = 0
    best_epoch: int | None = None
    best_score: float | None = None
    stopped_early: bool = False


@dataclass(frozen=True)
class DataParallel:
    """This process is `rank` of `world` in the default torch.distributed group; `seed` orders the batches."""

    rank: int
    world: int
    seed: int

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's share of a global batch (sizes differ by at most one)."""
        return np.array_split(rows, self.world)[self.rank]

    def broadcast(self, params: Sequence[nn.Parameter]) -> None:
        """Rank 0's weights to every rank (DDP's start)."""
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def average_gradients(self, params: Sequence[nn.Parameter], loss: torch.Tensor) -> float:
        """Average every gradient (and the loss) across ranks: dense gradients in one all-reduce, row-sparse ones
        (embeddings with `sparse=True`) by all-gathering the rows each rank touched, so a step moves O(batch) rows,
        not whole ID tables. Four collectives per step whatever the number of parameters (what they are and how
        many rows each rank has; the dense all-reduce; the rows; their values). A parameter without a gradient on
        every rank keeps none (the optimiser skips it, as in one process). Returns the mean loss."""
        import torch.distributed as dist

        n = len(params)
        grads = [None if p.grad is None else p.grad.coalesce() if p.grad.is_sparse else p.grad for p in params]
        meta = torch.tensor([0 if g is None else 2 if g.is_sparse else 1 for g in grads]
                            + [g._nnz() if g is not None and g.is_sparse else 0 for g in grads], dtype=torch.int64)
        every = [torch.empty_like(meta) for _ in range(self.world)]
        dist.all_gather(every, meta)
        table = torch.stack(every)  # ranks × (kinds, row counts)
        kind = table[:, :n].max(0).values.tolist()
        counts = table[:, n:]
        dense = [j for j in range(n) if kind[j] == 1]
        flat = torch.cat([(grads[j] if grads[j] is not None else torch.zeros_like(params[j])).reshape(-1)
                          for j in dense] + [loss.detach().reshape(1).to(torch.float32)])
        dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for j in dense:
            size = params[j].numel()
            params[j].grad = flat[at:at + size].view_as(params[j]).clone()
            at += size
        sparse = [j for j in range(n) if kind[j] == 2]
        if sparse:
            self._average_sparse([params[j] for j in sparse], [grads[j] for j in sparse], counts[:, sparse])
        return float(flat[-1])

    def _average_sparse(self, params: Sequence[nn.Parameter], grads: list, counts: torch.Tensor) -> None:
        """Row-sparse gradients: every rank's rows and values (each parameter padded to its longest rank) in one
        all-gather each, summed per row, / world. `counts`: ranks × params, the rows each rank holds."""
        import torch.distributed as dist

        most = counts.max(0).values.tolist()
        idx, val = [], []
        for p, g, m in zip(params, grads, most, strict=True):
            row = p[0].numel()
            i = g.indices()[0] if g is not None else torch.zeros(0, dtype=torch.int64)
            v = g.values().reshape(-1) if g is not None else p.new_zeros(0)
            idx += [i, i.new_zeros(m - len(i))]
            val += [v.to(torch.float32), v.new_zeros((m - len(i)) * row, dtype=torch.float32)]
        idx_t, val_t = torch.cat(idx), torch.cat(val)
        idxs = [torch.empty_like(idx_t) for _ in range(self.world)]
        vals = [torch.empty_like(val_t) for _ in range(self.world)]
        dist.all_gather(idxs, idx_t)
        dist.all_gather(vals, val_t)
        at_i = at_v = 0
        for j, (p, m) in enumerate(zip(params, most, strict=True)):
            row = p[0].numel()
            keep = counts[:, j].tolist()
            rows = torch.cat([r[at_i:at_i + k] for r, k in zip(idxs, keep, strict=True)])
            values = torch.cat([v[at_v:at_v + k * row] for v, k in zip(vals, keep, strict=True)])
            p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), (values / self.world).to(p.dtype).view(-1, *p.shape[1:]),
                                             p.shape, check_invariants=False).coalesce()
            at_i += m
            at_v += m * row


_DATA_PARALLEL: ContextVar[DataParallel | None] = ContextVar("data_parallel", default=None)


def in_data_parallel() -> bool:
    """Whether `train_loop` runs data-parallel here (inside `data_parallel`): gradients are then averaged across
    ranks (`DataParallel.average_gradients`)."""
    return _DATA_PARALLEL.get() is not None


@contextmanager
def data_parallel(seed: int) -> Iterator[DataParallel]:
    """Run every `train_loop` inside data-parallel over the initialised default torch.distributed group."""
    import torch.distributed as dist

    dp = DataParallel(dist.get_rank(), dist.get_world_size(), seed)
    token = _DATA_PARALLEL.set(dp)
    try:
        yield dp
    finally:
        _DATA_PARALLEL.reset(token)


def train_loop(batch_loss: Callable[[Batch], torch.Tensor],
               examples: np.ndarray | Callable[[np.random.Generator], np.ndarray],
               optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], config: LoopConfig,
               rng: np.random.Generator | None = None, *,
               on_epoch_start: Callable[[int, np.ndarray], None] | None = None,
               on_epoch_end: Callable[[int, float], dict[str, str] | None] | None = None,
               validate: Callable[[int], float] | None = None, metric: str = "val",
               modules: Sequence[nn.Module] = (), restore_best: bool = True) -> History:
    """Train for `config.epochs` epochs (fewer when early stopping triggers); see the module docstring.

    rng: the run's generator (from `seeded`, under which the model was built); None → the loop seeds itself.
    on_epoch_start(epoch, order): after the shuffle (e.g. draw the epoch's negatives, aligned with `order`).
    on_epoch_end(epoch, mean_loss) → extra progress-bar fields (they replace the loop's own of the same name).
    validate(epoch) → score, after each epoch with `modules` in eval mode; with `config.patience` it stops the
    run after `patience` epochs without a better score, and (`restore_best`) the modules get back the weights
    of the best epoch. `modules` are in train mode while training and in eval mode when the loop returns.
    """
    if rng is None:
        with seeded(config.seed, config.num_threads) as own:
            return train_loop(batch_loss, examples, optimizer, config, own, on_epoch_start=on_epoch_start,
                              on_epoch_end=on_epoch_end, validate=validate, metric=metric, modules=modules,
                              restore_best=restore_best)
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    dp = _DATA_PARALLEL.get()
    order_rng = rng
    if dp is not None:
        params = unique_parameters(*[[p for g in opt.param_groups for p in g["params"]] for opt in opts])
        dp.broadcast(params)
        order_rng = np.random.default_rng([dp.seed, 0])  # the same batches on every rank
        # the model's own draws (negatives, dropout of ids) differ per rank, as separate sub-batches should
        rng.bit_generator.state = np.random.default_rng([dp.seed, dp.rank + 1]).bit_generator.state
        torch.manual_seed(dp.seed * 1009 + dp.rank + 1)
    hist = History()
    best_state: list[dict] | None = None
    for m in modules:
        m.train()
    bar = tqdm(range(config.epochs), desc=config.desc, disable=not config.progress, leave=False)
    for epoch in bar:
        ex = examples(order_rng) if callable(examples) else examples
        order = order_rng.permutation(ex)
        if on_epoch_start is not None:
            on_epoch_start(epoch, order)
        total, nb = 0.0, 0
        for b0 in range(0, len(order), config.batch_size):
            rows = order[b0:b0 + config.batch_size]
            if len(rows) < config.min_batch * (dp.world if dp else 1):
                continue
            loss = batch_loss(Batch(dp.shard(rows) if dp else rows, b0, hist.steps, epoch))
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            value = dp.average_gradients(params, loss) if dp else loss.item()
            for opt in opts:
                opt.step()
            total += value
            nb += 1
            hist.steps += 1
        hist.losses.append(total / max(nb, 1))
        postfix = {"loss": f"{hist.losses[-1]:.4f}"}
        if validate is not None:
            for m in modules:
                m.eval()
            score = float(validate(epoch))
            for m in modules:
                m.train()
            hist.scores.append(score)
            postfix[metric] = f"{score:.4f}"
            better = hist.best_score is None or (score > hist.best_score if config.higher_is_better
                                                 else score < hist.best_score)
            if better:
                hist.best_epoch, hist.best_score = epoch, score
                if config.patience is not None and restore_best and modules:
                    best_state = [copy.deepcopy(m.state_dict()) for m in modules]
        if on_epoch_end is not None:
            postfix.update(on_epoch_end(epoch, hist.losses[-1]) or {})
        bar.set_postfix(postfix)
        if config.patience is not None and hist.best_epoch is not None and epoch - hist.best_epoch >= config.patience:
            hist.stopped_early = epoch < config.epochs - 1
            break
    if best_state is not None and hist.best_epoch != len(hist.losses) - 1:
        for m, state in zip(modules, best_state, strict=True):
            m.load_state_dict(state)
    for m in modules:
        m.eval()
    return hist
