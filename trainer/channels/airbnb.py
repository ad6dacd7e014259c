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
from pydantic import BaseModel, ConfigDict, Field

from trainer.channels.embedding import EmbeddingChannel
from trainer.channels.neighbors import side_info_neighbors
from trainer.data.sessions import Sessions, tie_groups
from trainer.data.train_data import TrainData
from trainer.nn.encoding import item_tower_encoding
from trainer.nn.session_corpus import session_corpus
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
        enc = item_tower_encoding(data.item_attrs, data.n_items, data.category_column)
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
