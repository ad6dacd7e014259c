"""Airbnb listing embeddings (Grbovic & Cheng, KDD 2018): skip-gram over click sessions with the session's
conversion as a global context and same-market negatives, trained by the shared SGNS trainer
(trainer/nn/skipgram.py); the published artifact is the items' cosine neighbour lists.

- Sessions: trainer.data.sessions (30-minute rule), sessions of ≥ `min_session_len` (2) items; converted sessions
  (Sessions.conversion: the last liked / purchased item) appear `conversion_oversample` times per epoch. With
  `ties: shuffle` the items of one user's same-second group (no order: the log lists them by item id) are put
  in a seeded random order in every session copy.
- Global context (`conversion_context`): the conversion item b is a positive context of every other item l of its
  session, beyond the window: the term log σ(v'_b·v_l) (the trainer's ExtraPairs).
- Negatives: `num_negatives` random (∝ count^negatives_power) plus `market_negatives` from the centre's market
  (the item's `market` column, else its primary category): the term Σ log σ(−v'_m·v_l). Neither may be an item of
  the pair's own session (masked by the trainer, `exclude_sequence_items`). `negatives: shared` (default) draws the
  random ones once per batch and the market ones once per market per batch, scored by one matmul (same expected
  loss, a fraction of the cost of per-pair draws).
- Cold start (`cold_start`): an item without a trained vector (no session of ≥ 2 items in the training data) but
  with side information gets the mean vector of its `cold_k` nearest trained items by side information (cosine of
  the one-hot attribute codes; ties: more training clicks first), then gets and serves an i2i list like any item.
See docs/channels.md ("Airbnb listing embeddings").
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from trainer.channels.embedding import EmbeddingChannel
from trainer.data.sessions import Sessions, shuffle_within_groups, tie_groups
from trainer.data.train_data import TrainData
from trainer.nn.encoding import encode_attrs
from trainer.nn.skipgram import Corpus, ExtraPairs, NegativePool, SkipGramConfig, train_skipgram

log = logging.getLogger(__name__)


class AirbnbParams(BaseModel):
    """Hyper-parameters of the Airbnb listing-embedding channel (defaults: chosen on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(32, ge=2, le=1024)
    window: int = Field(60, ge=1, le=1000, description="context positions on each side within a session "
                        "(60: ml-100k validation pick over 20)")
    shrink_window: bool = Field(True, description="word2vec's random effective window in [1, window]")
    negatives: Literal["per_pair", "shared"] = Field("shared", description="shared: the random negatives are one "
                                                     "set per batch and the market ones one set per market per "
                                                     "batch, all scored by one matmul; per_pair: drawn per pair")
    num_negatives: int = Field(20, ge=0, le=10_000, description="random negatives per pair (∝ count^negatives_power)")
    market_negatives: int = Field(0, ge=0, le=1000, description="same-market negatives per pair (0 = off: "
                                  "they hurt on ml-100k, whose market is the primary genre)")
    negatives_power: float = Field(0.75, ge=-2, le=2, description="negatives drawn ∝ count^negatives_power")
    conversion_context: bool = Field(True, description="the session's conversion as a global context of its items")
    conversion_oversample: int = Field(3, ge=1, le=100, description="copies of each converted session per epoch")
    sample: float = Field(1e-3, ge=0, le=1, description="frequent-item subsampling threshold (0 = off)")
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(8192, ge=2, le=1 << 20)
    lr: float = Field(0.02, gt=0, le=1, description="Adam learning rate")
    session_gap_s: int | None = Field(1800, ge=0, description="gap that starts a new session; null = whole history")
    ties: Literal["ordered", "shuffle"] = Field("ordered", description="interactions of one user in the same "
                                               "second: ordered = as the log lists them (by item id), shuffle = "
                                               "a seeded random order per session copy (they have no order)")
    min_session_len: int = Field(2, ge=2, le=1000)
    cold_start: bool = Field(True, description="items without a trained vector get the mean of their nearest "
                             "items by side information")
    cold_k: int = Field(3, ge=1, le=100, description="nearest items averaged for a cold item")
    min_count_ratio: float = Field(0.1, ge=0, le=100, description="trained items with fewer session clicks than "
                                   "this × the mean of the trained items get no list and are nobody's neighbour")
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")
    top_k: int = Field(200, ge=1, le=2000, description="neighbours published per item")


def item_market(data: TrainData) -> tuple[np.ndarray, str]:
    """(int code per item, -1 unknown; which field): the `market` column, else the primary category."""
    mk = data.item_field("market")
    if mk is not None:
        return mk.astype(np.int64), "market"
    return data.item_category[0].astype(np.int64), "category"


def session_corpus(sessions: Sessions, item_idx: np.ndarray, min_len: int, oversample: int,
                   conversion_context: bool, tie_group: np.ndarray | None = None,
                   rng: np.random.Generator | None = None) -> tuple[Corpus, ExtraPairs | None, dict[str, int]]:
    """(corpus of the kept sessions, converted ones `oversample` times; global-context pairs; counts).

    Sequence ids of the corpus are copy ids (a converted session's copies are separate sequences, each with its
    own global-context pairs): every item l ≠ b of a copy whose session converted on b gives the pair (l, b).
    With `tie_group` (the tie group of each interaction, `trainer.data.sessions.tie_groups`) and `rng`, the
    items of every tie group are put in a random order, drawn afresh for each copy (`ties: shuffle`)."""
    keep = np.flatnonzero(sessions.lengths >= min_len)
    conv = sessions.conversion[keep]
    reps = np.where(conv >= 0, oversample, 1)
    copy_sess = np.repeat(keep, reps)  # session of each copy, in order
    lengths = sessions.lengths[copy_sess]
    copy_id = np.repeat(np.arange(len(copy_sess), dtype=np.int64), lengths)
    offset = np.arange(len(copy_id)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = sessions.starts[copy_sess][copy_id] + offset  # interaction behind each token
    if tie_group is not None and len(pos):
        if rng is None:
            raise ValueError("session_corpus: shuffling tie groups needs an rng")
        g = np.asarray(tie_group, np.int64)[pos]
        run = np.cumsum(np.r_[True, (copy_id[1:] != copy_id[:-1]) | (g[1:] != g[:-1])])  # (copy, group) runs
        pos = pos[shuffle_within_groups(run, rng)]
    tokens = np.asarray(item_idx, np.int64)[pos]
    corpus = Corpus.from_flat(tokens, copy_id)
    extra = None
    n_extra = 0
    if conversion_context:
        b = sessions.conversion[copy_sess][copy_id]  # conversion of each token's session
        sel = (b >= 0) & (tokens != b)
        extra = ExtraPairs(centre=tokens[sel], context=b[sel], seq=copy_id[sel])
        n_extra = int(sel.sum())
    stats = {"sessions": int(len(keep)), "converted_sessions": int((conv >= 0).sum()),
             "sequences": int(len(copy_sess)), "tokens": int(len(tokens)), "global_context_pairs": n_extra}
    return corpus, extra, stats


def side_info_neighbors(codes: np.ndarray, sizes: list[int], query: np.ndarray, candidates: np.ndarray,
                        counts: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [Q, k] nearest candidates, -1 pads; float32 scores) of each query item by side information: cosine of
    the items' one-hot attribute codes (a bag column's values weigh 1/n each), only candidates sharing ≥ 1 value;
    ties broken by more `counts`, then the lower index."""
    n, n_cols, width = codes.shape
    if n_cols == 0 or len(query) == 0 or len(candidates) == 0:
        return np.full((len(query), k), -1, np.int64), np.zeros((len(query), k), np.float32)
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    filled = codes >= 0
    nfill = np.maximum(filled.sum(2, keepdims=True), 1)
    w = np.where(filled, 1.0 / nfill, 0.0)
    rows = np.broadcast_to(np.arange(n)[:, None, None], codes.shape)[filled]
    cols = (codes + offs[None, :, None])[filled]
    x = sp.csr_matrix((w[filled], (rows, cols)), shape=(n, int(np.sum(sizes))))
    norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = sp.diags(1.0 / np.maximum(norm, 1e-12)) @ x
    xc = x[candidates].T.tocsc()
    tie = np.argsort(np.lexsort((candidates, -np.asarray(counts)[candidates])))  # rank of each candidate
    out = np.full((len(query), k), -1, np.int64)
    score = np.zeros((len(query), k), np.float32)
    kk = min(k, len(candidates))
    for a in range(0, len(query), chunk):
        s = (x[query[a:a + chunk]] @ xc).toarray()
        key = s - 1e-9 * tie[None, :] / len(candidates)  # equal similarity: the better tie rank first
        top = np.argpartition(-key, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(key, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)
        sc = np.take_along_axis(s, top, 1)
        ok = sc > 1e-9
        out[a:a + chunk, :kk] = np.where(ok, candidates[top], -1)
        score[a:a + chunk, :kk] = np.where(ok, sc, 0.0)
    return out, score


class AirbnbChannel(EmbeddingChannel):
    """Session skip-gram with conversion context and market negatives → cosine i2i lists."""

    model = "airbnb"
    kinds = ("i2i",)
    Params = AirbnbParams

    def training_setup(self, data: TrainData, progress: bool = False
                       ) -> tuple[Corpus, ExtraPairs | None, NegativePool, SkipGramConfig]:
        """What `fit` hands the SGNS trainer: the session corpus, the global-context pairs, the negative pool
        (random + same market, session items excluded by the trainer) and the config."""
        p: AirbnbParams = self.params
        sessions = Sessions.build(data.user_idx, data.item_idx, data.ts, data.event, p.session_gap_s)
        shuffle = p.ties == "shuffle"
        corpus, extra, self.corpus_stats = session_corpus(
            sessions, data.item_idx, p.min_session_len, p.conversion_oversample, p.conversion_context,
            tie_groups(data.user_idx, data.ts) if shuffle else None,
            np.random.default_rng([self.seed, 2]) if shuffle else None)
        counts = corpus.counts(data.n_items)
        market, self.market_field = item_market(data)
        pool = NegativePool(centre_group=market, item_group=market, counts=counts, power=p.negatives_power)
        cfg = SkipGramConfig(dim=p.dim, window=p.window, shrink_window=p.shrink_window, num_negatives=p.num_negatives,
                             shared_negatives=p.negatives == "shared", negatives_power=p.negatives_power,
                             pool_negatives=p.market_negatives,
                             exclude_sequence_items=True, sample=p.sample, epochs=p.epochs, batch_size=p.batch_size,
                             lr=p.lr, seed=self.seed, num_threads=p.num_threads, progress=progress, desc="airbnb")
        return corpus, extra, pool, cfg

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: AirbnbParams = self.params
        t0 = time.perf_counter()
        self._artifacts = None
        corpus, extra, pool, cfg = self.training_setup(data, progress)
        n = data.n_items
        counts = corpus.counts(n)
        self.item_vectors = np.zeros((n, p.dim), np.float32)
        trained = counts > 0
        self.losses: list[float] = []
        if len(corpus):
            res = train_skipgram(corpus, n, cfg, extra=extra, pool=pool, counts=counts)
            self.losses = res.history.losses
            self.item_vectors[trained] = res.centre_vectors()[trained]
        self.cold_items = np.zeros(0, np.int64)
        if p.cold_start and trained.any():
            self.cold_items = self._cold_start(data, trained, counts)
        self.has_vector = trained.copy()
        self.has_vector[self.cold_items] = True
        # a trained item seen only a few times has a noisy vector close to many items: no list, no neighbour
        min_count = p.min_count_ratio * counts[trained].mean() if trained.any() else 0.0
        self.valid_items = self.has_vector & ~(trained & (counts < min_count))
        self.metrics = {"fit_s": time.perf_counter() - t0, "loss": self.losses[-1] if self.losses else None,
                        **self.corpus_stats, "trained_items": int(trained.sum()),
                        "valid_items": int(self.valid_items.sum()),
                        "cold_items": int(len(self.cold_items)), "market_field": self.market_field}
        log.info("airbnb: %d sessions (%d converted), %d global-context pairs/epoch, market = %s, %d trained items, "
                 "%d cold-start items, fit %.1fs", self.corpus_stats["sessions"],
                 self.corpus_stats["converted_sessions"], self.corpus_stats["global_context_pairs"],
                 self.market_field, trained.sum(), len(self.cold_items), self.metrics["fit_s"])

    def _cold_start(self, data: TrainData, trained: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Give each untrained item with side information the mean vector of its `cold_k` nearest trained items
        by side information; returns the items that got one."""
        enc = encode_attrs(data.item_attrs, data.n_items, multi_valued=True,
                           categorical=(data.category_column or "",))
        if not enc.fields:
            return np.zeros(0, np.int64)
        codes = enc.codes
        codes = np.where(codes > 0, codes, -1)  # code 0 = unknown / rare: not a shared value
        cold = np.flatnonzero(~trained & (codes >= 0).any((1, 2)))
        nb, _ = side_info_neighbors(codes, enc.sizes, cold, np.flatnonzero(trained), counts, self.params.cold_k)
        has = nb >= 0
        got = has.any(1)
        vecs = self.item_vectors[np.where(has, nb, 0)] * has[:, :, None]
        self.item_vectors[cold[got]] = (vecs.sum(1) / np.maximum(has.sum(1), 1)[:, None])[got]
        return cold[got]
