"""Skip-gram with negative sampling (word2vec SGNS) in torch, shared by the item-sequence models (EGES, Airbnb
listing embeddings, item2vec variants): separate centre and context embeddings, negatives ∝ count^power,
frequent-item subsampling, window pairs built vectorised, extra global-context positives and custom negative pools.

Loss per (centre c, context o) pair, with K sampled negatives n_k and P pool negatives m_k (Mikolov et al. 2013;
Grbovic & Cheng 2018 for the pool term):

    −log σ(z_o·h_c) − Σ_k log σ(−z_{n_k}·h_c) − Σ_k log σ(−z_{m_k}·h_c)

`h_c = centre(c)` is any module mapping item ids int64 [B] → [B, d] (default an `nn.Embedding`; EGES passes its
side-information aggregation), `z = context` a separate `nn.Embedding` (zero-initialised, as word2vec). Negatives
equal to the pair's positive (and, with a pool and `exclude_sequence_items`, any negative found in the pair's own
sequence) are masked out of the loss, not redrawn.

Usage:

    corpus = Corpus.from_padded(walks, pad=-1)            # or Corpus.from_flat(tokens, seq_ids)
    cfg = SkipGramConfig(dim=32, window=5, num_negatives=5, epochs=3, seed=42)
    res = train_skipgram(corpus, n_items, cfg,
                         centre=my_module,                              # optional: [B] → [B, d]
                         extra=ExtraPairs(centre, context, seq),        # optional: global-context positives
                         pool=NegativePool(centre_group, item_group))   # optional: with cfg.pool_negatives > 0
    vectors = res.centre_vectors()                        # float32 [n_items, d]: h_v of every item

Per epoch (`train_skipgram`): each token of the corpus is kept with the word2vec probability
`min(1, √(t/f) + t/f)` (`sample` = t, f = the item's share of the corpus; 0 = off), the kept tokens of a
sequence are closed up, every kept token is a centre with the contexts at most `b` positions away in its
sequence (`b = window`, or with `shrink_window` a uniform draw in [1, window] per centre, word2vec's reduced
window), then the caller's extra pairs are appended (never subsampled), and `trainer.nn.loop.train_loop`
shuffles the pairs into batches of `batch_size`; each batch draws its `num_negatives` per pair ∝ count^power
(the kit's `PowerSampler`, counts = corpus frequencies unless given; with `shared_negatives` one set of
`num_negatives` for the whole batch, scored by one matmul — the same expected loss at a fraction of the cost)
and `pool_negatives` per pair from the centre's pool. Adam (`lr`; with `lr_decay`, decayed linearly to lr·1e-4 over
the run, as word2vec's schedule). Same seed and one thread → bit-identical vectors.

The building blocks are public for tests and other trainers: `epoch_pairs` (= `subsample` → `window_pairs` →
extra pairs), `draw_negatives` (→ `Negatives`: sampler + `NegativePool.sample` + masks), `keep_probability` (the kit's),
`sequence_membership`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from trainer.nn.loop import Batch, History, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import bce_loss
from trainer.nn.negatives import PowerSampler, keep_probability

__all__ = ["Corpus", "ExtraPairs", "NegativePool", "SkipGramConfig", "SkipGramModel", "SkipGramResult",
           "Negatives", "draw_negatives", "epoch_pairs", "keep_probability", "sequence_membership", "subsample",
           "train_skipgram", "window_pairs"]


@dataclass(frozen=True)
class Corpus:
    """Item sequences, flat: `tokens[k]` is an item index, `seq[k]` its sequence (non-decreasing ids)."""

    tokens: np.ndarray  # int64 [N]
    seq: np.ndarray  # int64 [N], sorted

    @classmethod
    def from_padded(cls, seqs: np.ndarray, pad: int = -1) -> Corpus:
        """Rows of `seqs` [S, L] are sequences; entries equal to `pad` or negative are skipped (row = sequence id)."""
        seqs = np.asarray(seqs, np.int64)
        keep = (seqs != pad) & (seqs >= 0)
        rows = np.broadcast_to(np.arange(seqs.shape[0], dtype=np.int64)[:, None], seqs.shape)
        return cls(seqs[keep], rows[keep])

    @classmethod
    def from_flat(cls, tokens: np.ndarray, seq_ids: np.ndarray) -> Corpus:
        """Tokens with their sequence id (the ids must be sorted: a sequence is one contiguous run)."""
        seq = np.asarray(seq_ids, np.int64)
        if len(seq) > 1 and np.any(np.diff(seq) < 0):
            raise ValueError("Corpus.from_flat needs sequence ids in non-decreasing order")
        return cls(np.asarray(tokens, np.int64), seq)

    def __len__(self) -> int:
        return len(self.tokens)

    def counts(self, n_items: int) -> np.ndarray:
        """int64 [n_items]: occurrences of each item in the corpus."""
        return np.bincount(self.tokens, minlength=n_items).astype(np.int64)


@dataclass(frozen=True)
class ExtraPairs:
    """Positives added to every epoch beside the window pairs (e.g. a session's conversion item as context of
    each of its items): `centre[i]` → `context[i]`, from sequence `seq[i]` (−1: none; used for exclusions)."""

    centre: np.ndarray
    context: np.ndarray
    seq: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.centre) != len(self.context) or (self.seq is not None and len(self.seq) != len(self.centre)):
            raise ValueError("ExtraPairs: centre, context (and seq) must have one entry per pair")


@dataclass
class NegativePool:
    """Per-centre negative pools by group: the pool of centre c is every item j with `item_group[j] ==
    centre_group[c]` (e.g. the same market), drawn ∝ count^power within the pool (power 0: uniform). A centre
    with group −1, or whose pool is empty, gets no pool negatives (masked)."""

    centre_group: np.ndarray  # int [n_items]: pool of each centre, -1 = none
    item_group: np.ndarray  # int [n_items]: pool each item belongs to as a candidate, -1 = none
    counts: np.ndarray | None = None  # weights' base (None: uniform within the pool)
    power: float = 0.75
    _order: np.ndarray = field(init=False, repr=False)
    _cum: np.ndarray = field(init=False, repr=False)
    _lo: np.ndarray = field(init=False, repr=False)
    _hi: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ig = np.asarray(self.item_group, np.int64)
        n_groups = int(max(ig.max(initial=-1), np.asarray(self.centre_group).max(initial=-1))) + 1
        members = np.flatnonzero(ig >= 0)
        self._order = members[np.argsort(ig[members], kind="stable")]
        if self.counts is None:
            w = np.ones(len(self._order))
        else:
            c = np.asarray(self.counts, np.float64)[self._order]
            w = np.where(c > 0, c ** self.power, 0.0) if self.power != 0 else np.ones(len(self._order))
        self._cum = np.concatenate([[0.0], np.cumsum(w)])
        bounds = np.searchsorted(ig[self._order], np.arange(n_groups + 1), side="left")
        self._lo, self._hi = self._cum[bounds[:-1]], self._cum[bounds[1:]]

    def sample(self, centres: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(int64 [B, k] draws from each centre's pool, bool [B, k] valid); invalid where the pool is empty."""
        g = np.asarray(self.centre_group, np.int64)[np.asarray(centres)]
        has = g >= 0
        gi = np.where(has, g, 0)
        lo, hi = self._lo[gi], self._hi[gi]
        has &= hi > lo
        u = rng.random((len(g), k))
        target = lo[:, None] + u * (hi - lo)[:, None]
        pos = np.clip(np.searchsorted(self._cum, target, side="right") - 1, 0, max(len(self._order) - 1, 0))
        out = self._order[pos] if len(self._order) else np.zeros((len(g), k), np.int64)
        valid = np.broadcast_to(has[:, None], out.shape).copy()
        return np.where(valid, out, 0).astype(np.int64), valid


@dataclass(frozen=True)
class SkipGramConfig:
    """What an SGNS run is (parameter names follow trainer/channels/base.py VOCABULARY)."""

    dim: int = 32
    window: int = 5
    shrink_window: bool = True  # word2vec's per-centre random window in [1, window]
    num_negatives: int = 5  # sampled negatives per pair (per batch when shared), ∝ count^negatives_power
    shared_negatives: bool = False  # one set of K per batch, one of P per pool in the batch (h @ Zᵀ: much cheaper)
    negatives_power: float = 0.75
    pool_negatives: int = 0  # extra negatives per pair from the centre's NegativePool
    exclude_sequence_items: bool = True  # with a pool: negatives that occur in the pair's own sequence are masked
    sample: float = 1e-3  # subsampling threshold t (0 = off)
    epochs: int = 5
    batch_size: int = 4096
    lr: float = 0.01
    lr_decay: bool = False  # lr decayed linearly to lr·1e-4 over the run (word2vec's schedule)
    init_scale: float = 0.5  # default centre table ~ U(−s/d, s/d) (word2vec); context starts at 0
    seed: int = 42
    num_threads: int = 1
    progress: bool = False
    desc: str = "skipgram"


def subsample(corpus: Corpus, keep_prob: np.ndarray, rng: np.random.Generator) -> Corpus:
    """Drop each token with probability 1 − keep_prob[item] (one `rng.random(N)`); a sequence's kept tokens close up."""
    if len(corpus) == 0:
        return corpus
    keep = rng.random(len(corpus)) < np.asarray(keep_prob)[corpus.tokens]
    return Corpus(corpus.tokens[keep], corpus.seq[keep])


def window_pairs(corpus: Corpus, window: int, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, context, seq) int64 arrays of every ordered pair of tokens of one sequence at most `b` positions
    apart (b = window; with `rng`, b ~ U{1..window} drawn per centre), centre-major, contexts in position order."""
    n = len(corpus)
    if n == 0 or window < 1:
        e = np.zeros(0, np.int64)
        return e, e, e
    seq = corpus.seq
    k = np.arange(n, dtype=np.int64)
    first = np.searchsorted(seq, seq, side="left")  # flat position of the sequence's first token
    last = np.searchsorted(seq, seq, side="right") - 1
    b = np.full(n, window, np.int64) if rng is None else rng.integers(1, window + 1, size=n)
    lo, hi = np.maximum(first, k - b), np.minimum(last, k + b)
    span = hi - lo + 1  # includes the centre itself
    centre_pos = np.repeat(k, span)
    start = np.repeat(np.cumsum(span) - span, span)
    ctx_pos = np.repeat(lo, span) + (np.arange(len(centre_pos), dtype=np.int64) - start)
    other = ctx_pos != centre_pos
    centre_pos, ctx_pos = centre_pos[other], ctx_pos[other]
    return corpus.tokens[centre_pos], corpus.tokens[ctx_pos], seq[centre_pos]


def sequence_membership(corpus: Corpus, n_items: int) -> np.ndarray:
    """Sorted unique keys seq·n_items + item of the corpus: `np.isin`-style lookups of "item j is in sequence s"."""
    return np.unique(corpus.seq * np.int64(n_items) + corpus.tokens)


def _member(keys: np.ndarray, seq: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """bool, shape of `items`: item in sequence `seq` (broadcast over the last axis); seq −1 → False."""
    q = seq[:, None] * np.int64(n_items) + items
    if len(keys) == 0:
        return np.zeros(q.shape, bool)
    pos = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
    return (keys[pos] == q) & (seq[:, None] >= 0)


def epoch_pairs(corpus: Corpus, config: SkipGramConfig, rng: np.random.Generator, keep_prob: np.ndarray | None = None,
                extra: ExtraPairs | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's (centre, context, seq) pairs: subsampled corpus (when `keep_prob` is given and `sample` > 0) →
    window pairs (shrunk windows if configured) → the extra pairs appended as they are."""
    kept = subsample(corpus, keep_prob, rng) if (keep_prob is not None and config.sample > 0) else corpus
    c, o, s = window_pairs(kept, config.window, rng if config.shrink_window else None)
    if extra is not None and len(extra.centre):
        es = extra.seq if extra.seq is not None else np.full(len(extra.centre), -1)
        c = np.concatenate([c, np.asarray(extra.centre, np.int64)])
        o = np.concatenate([o, np.asarray(extra.context, np.int64)])
        s = np.concatenate([s, np.asarray(es, np.int64)])
    return c, o, s


@dataclass(frozen=True)
class Negatives:
    """A batch's negatives: `shared` [S] ids scored against the whole batch by one matmul (empty unless
    `shared_negatives`), `per_row` [B, K'] per-pair draws, `valid` [B, C + K'] in `columns()` order. Row b's
    shared columns are `shared[cols[b]]` (`cols` [B, C]; None: all S, in order)."""

    shared: np.ndarray
    per_row: np.ndarray
    valid: np.ndarray
    cols: np.ndarray | None = None

    def columns(self) -> np.ndarray:
        """int64 [B, C + K']: every row's negatives in `valid`'s column order."""
        b = len(self.valid)
        sh = self.shared[self.cols] if self.cols is not None else np.broadcast_to(self.shared[None, :],
                                                                                  (b, len(self.shared)))
        return np.concatenate([sh, self.per_row], 1)


def draw_negatives(sampler: PowerSampler, centres: np.ndarray, contexts: np.ndarray, seq: np.ndarray,
                   config: SkipGramConfig, rng: np.random.Generator, pool: NegativePool | None = None,
                   members: np.ndarray | None = None) -> Negatives:
    """A batch's negatives: K = `num_negatives` draws ∝ count^power per pair, then P = `pool_negatives` per pair
    from its centre's pool; with `shared_negatives` the K are one set for the whole batch and the P one set per
    pool present in the batch (so every negative is scored by one matmul). A draw equal to the pair's context is
    invalid, and so is any draw found in the pair's own sequence (`members`, from `sequence_membership`)."""
    b, k, p = len(centres), config.num_negatives, config.pool_negatives
    if p > 0 and pool is None:
        raise ValueError("pool_negatives > 0 needs a NegativePool")
    cols = None
    if config.shared_negatives:
        shared, per_row = sampler.sample(rng, k), np.zeros((b, 0), np.int64)
        valid = np.ones((b, k), bool)
        if p > 0:
            groups = np.asarray(pool.centre_group, np.int64)[np.asarray(centres)]
            _, first, inv = np.unique(groups, return_index=True, return_inverse=True)
            table, tvalid = pool.sample(np.asarray(centres)[first], p, rng)  # [G, P]: one set per pool
            cols = np.concatenate([np.broadcast_to(np.arange(k), (b, k)),
                                   k + inv.reshape(-1)[:, None] * p + np.arange(p)[None, :]], 1)
            shared, valid = np.concatenate([shared, table.ravel()]), np.concatenate([valid, tvalid[inv.reshape(-1)]], 1)
    else:
        shared, per_row = np.zeros(0, np.int64), sampler.sample(rng, b * k).reshape(b, k)
        valid = np.ones((b, k), bool)
        if p > 0:
            pneg, pvalid = pool.sample(centres, p, rng)
            per_row, valid = np.concatenate([per_row, pneg], 1), np.concatenate([valid, pvalid], 1)
    neg = Negatives(shared, per_row, valid, cols)
    ids = neg.columns()
    valid &= ids != np.asarray(contexts)[:, None]
    if members is not None:
        valid &= ~_member(members, np.asarray(seq, np.int64), ids, sampler.n_items)
    return Negatives(shared, per_row, valid, cols)


class SkipGramModel(nn.Module):
    """Centre module (ids → [B, d]) and a separate context table z (registered submodules, so both are trained)."""

    def __init__(self, n_items: int, dim: int, centre: nn.Module | None = None, init_scale: float = 0.5):
        super().__init__()
        if centre is None:
            centre = nn.Embedding(n_items, dim)
            nn.init.uniform_(centre.weight, -init_scale / dim, init_scale / dim)
        self.centre = centre
        self.context = nn.Embedding(n_items, dim)
        nn.init.zeros_(self.context.weight)

    def forward(self, centres: torch.Tensor, contexts: torch.Tensor, shared: torch.Tensor,
                per_row: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive logits [B], negative logits [B, C + K']) of z_o·h_c and z_n·h_c, for negatives `shared` [S]
        scored by one matmul (row b keeps columns `cols[b]`, default all) and `per_row` [B, K']."""
        uc, inv_c = torch.unique(centres, return_inverse=True)  # each distinct centre is encoded once
        h = self.centre(uc)[inv_c]
        ids = torch.cat([contexts, shared, per_row.reshape(-1)])
        uz, inv_z = torch.unique(ids, return_inverse=True)
        z = self.context(uz)[inv_z]
        b, k = len(contexts), len(shared)
        pos = (h * z[:b]).sum(-1)
        parts = []
        if k:
            sh = h @ z[b:b + k].T
            parts.append(sh if cols is None else torch.gather(sh, 1, cols))
        if per_row.shape[1]:
            parts.append(torch.einsum("bd,bkd->bk", h, z[b + k:].reshape(b, per_row.shape[1], -1)))
        return pos, torch.cat(parts, 1) if parts else h.new_zeros(len(h), 0)


@dataclass
class SkipGramResult:
    """The trained model, the loop's history, and the size of the last epoch's pair set."""

    model: SkipGramModel
    history: History
    n_items: int
    pairs_last_epoch: int

    def centre_vectors(self, batch: int = 65536) -> np.ndarray:
        """float32 [n_items, d]: h_v of every item from the centre module."""
        with torch.no_grad():
            out = [self.model.centre(torch.arange(a, min(a + batch, self.n_items)))
                   for a in range(0, self.n_items, batch)]
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def context_vectors(self) -> np.ndarray:
        """float32 [n_items, d]: the context (output) table z."""
        return self.model.context.weight.detach().numpy().astype(np.float32).copy()


def train_skipgram(corpus: Corpus, n_items: int, config: SkipGramConfig, centre: nn.Module | None = None,
                   extra: ExtraPairs | None = None, pool: NegativePool | None = None,
                   counts: np.ndarray | None = None,
                   build_centre: Callable[[], nn.Module] | None = None) -> SkipGramResult:
    """Train SGNS on `corpus` (see the module docstring). `counts`: the item counts behind the negative sampler
    and the subsampling (default: corpus frequencies). `build_centre()` (called under the seed, so its
    initialisation is reproducible) may replace `centre`."""
    cfg = config
    freq = corpus.counts(n_items) if counts is None else np.asarray(counts, np.int64)
    if len(freq) != n_items:
        raise ValueError(f"counts has {len(freq)} entries, expected n_items = {n_items}")
    keep = keep_probability(freq, cfg.sample) if cfg.sample > 0 else np.ones(n_items)
    sampler = PowerSampler(freq, cfg.negatives_power)
    if cfg.pool_negatives > 0 and pool is None:
        raise ValueError("pool_negatives > 0 needs a NegativePool")
    members = sequence_membership(corpus, n_items) if (pool is not None and cfg.exclude_sequence_items) else None
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                      num_threads=cfg.num_threads, progress=cfg.progress, desc=cfg.desc)
    state: dict[str, np.ndarray] = {}
    with seeded(cfg.seed, cfg.num_threads) as rng:
        model = SkipGramModel(n_items, cfg.dim, build_centre() if build_centre is not None else centre,
                              cfg.init_scale)

        def examples(g: np.random.Generator) -> np.ndarray:
            c, o, s = epoch_pairs(corpus, cfg, g, keep, extra)
            state.update(c=c, o=o, s=s)
            return np.arange(len(c), dtype=np.int64)

        def batch_loss(batch: Batch) -> torch.Tensor:
            r = batch.rows
            c, o, s = state["c"][r], state["o"][r], state["s"][r]
            neg = draw_negatives(sampler, c, o, s, cfg, rng, pool, members)
            pos_l, neg_l = model(torch.as_tensor(c), torch.as_tensor(o), torch.as_tensor(neg.shared),
                                 torch.as_tensor(neg.per_row), None if neg.cols is None else torch.as_tensor(neg.cols))
            if cfg.lr_decay:
                done = (batch.epoch + batch.start / max(len(state["c"]), 1)) / cfg.epochs
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * max(1e-4, 1.0 - done)
            # word2vec's per-pair sum over the positive and its negatives, averaged over the batch
            return bce_loss(pos_l, neg_l, torch.as_tensor(neg.valid), balance=False, reduction="sum") / len(r)

        opt = adam(unique_parameters(model), loop)
        hist = train_loop(batch_loss, examples, opt, loop, rng, modules=[model])
    return SkipGramResult(model, hist, n_items, len(state.get("c", ())))
