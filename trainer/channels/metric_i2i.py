"""Metric-learning I2I (EasyRec's CoMetricLearningI2I): an item tower over the item id and its attributes,
L2-normalised, trained on N-way K-shot session batches (trainer/data/batches.py) with circle or
multi-similarity loss; the published artifact is the items' cosine neighbour lists.

Positives are two distinct positive items of one session (`positives: all` — every session item counts as
clicked, since our logs hold clicks only — or `like`: like / cart / purchase events, the others of the session
then serve as its negatives); every other item of the batch is a negative; the same item id in two sessions is
masked (trainer/nn/pair_losses.py). Anchors without a positive pair are counted, logged and kept in
`self.metrics["anchors_without_positive"]`. See docs/channels.md ("Metric-learning I2I").
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from trainer.channels.embedding import EmbeddingChannel
from trainer.data.batches import KShotBatch, SessionBatcher
from trainer.data.events import LIKE
from trainer.data.sessions import Sessions
from trainer.data.train_data import TrainData
from trainer.nn.encoding import encode_attrs
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop
from trainer.nn.pair_losses import metric_loss
from trainer.nn.towers import ItemTower

log = logging.getLogger(__name__)
COUNT_COLUMN = "_count_bucket"


class MetricI2IParams(BaseModel):
    """Hyper-parameters of the metric-learning i2i channel (defaults: chosen on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(64, ge=2, le=1024, description="output (retrieval) vector size")
    emb_dim: int = Field(64, ge=2, le=1024, description="embedding size of the id and each attribute field")
    hidden: list[int] = Field(default_factory=lambda: [128], description="hidden layers of the item tower's MLP")
    dropout: float = Field(0.0, ge=0, lt=1)
    senet: bool = Field(False, description="SENet re-weighting of the tower's fields")
    use_item_attrs: bool = Field(True, description="item attributes as tower inputs (else the id only)")
    count_feature: bool = Field(True, description="the item's training-click count bucket ⌊log2(1 + n)⌋ as a tower input")
    loss: Literal["circle", "multi_similarity"] = "circle"
    margin: float = Field(0.25, ge=0, le=1, description="circle loss m")
    gamma: float = Field(1.0, gt=0, le=1024, description="circle loss γ (scale; EasyRec's default is 32)")
    ms_alpha: float = Field(2.0, gt=0, le=100, description="multi-similarity α (positive scale)")
    ms_beta: float = Field(5.0, gt=0, le=1000, description="multi-similarity β (negative scale; paper 50)")
    ms_lambda: float = Field(0.7, ge=-1, le=1, description="multi-similarity λ (similarity threshold; paper 0.5–1)")
    ms_eps: float = Field(0.1, ge=0, le=2, description="multi-similarity mining margin ε")
    ms_mining: bool = Field(False, description="multi-similarity pair mining")
    positives: Literal["all", "like"] = Field("all", description="positive label: every session item, or like/cart/"
                                              "purchase events only")
    n_way: int = Field(128, ge=2, le=4096, description="sessions per batch (N)")
    k_shot: int = Field(8, ge=2, le=256, description="items drawn per session (K)")
    max_draws: int = Field(4, ge=1, le=1000, description="K-item draws per session per epoch: ceil(len/K) capped here")
    session_gap_s: int | None = Field(1800, ge=0, description="gap that starts a new session; null = whole history")
    epochs: int = Field(5, ge=1, le=1000)
    lr: float = Field(0.006, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")
    min_count_ratio: float = Field(0.33, ge=0, le=100, description="items with fewer training interactions than "
                                   "this × the mean of the trained items get no list and are nobody's neighbour")
    top_k: int = Field(200, ge=1, le=2000, description="neighbours published per item")


class MetricI2IChannel(EmbeddingChannel):
    """Item tower trained with circle / multi-similarity loss on session batches → cosine i2i lists."""

    model = "metric_i2i"
    kinds = ("i2i",)
    Params = MetricI2IParams

    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: MetricI2IParams = self.params
        t0 = time.perf_counter()
        self._artifacts = None
        sessions = Sessions.build(data.user_idx, data.item_idx, data.ts, data.event, p.session_gap_s)
        positive = np.ones(len(data.item_idx), bool) if p.positives == "all" else data.event >= LIKE
        self.batcher = SessionBatcher(sessions, data.item_idx, positive, p.n_way, p.k_shot, min_positives=2)
        draws = self.batcher.default_draws(p.max_draws)
        cfg = LoopConfig(epochs=p.epochs, batch_size=1, lr=p.lr, weight_decay=p.weight_decay, seed=self.seed,
                         num_threads=p.num_threads, min_batch=1, progress=progress, desc="metric_i2i")
        with seeded(self.seed, p.num_threads) as rng:
            enc = encode_attrs(self._item_table(data), data.n_items, multi_valued=True,
                               categorical=(data.category_column or "", COUNT_COLUMN))
            item_emb = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
            torch.nn.init.normal_(item_emb.weight, std=0.05)
            with torch.no_grad():
                item_emb.weight[data.n_items].zero_()
            self.tower = ItemTower(data.n_items, enc.codes, enc.sizes, p.emb_dim, p.dim, p.hidden, p.dropout,
                                   p.senet, item_emb)
            self.losses, self.epoch_stats = self._train(cfg, draws, rng)
            trained = np.zeros(data.n_items, bool)
            trained[self.batcher.item_idx[np.isin(sessions.ids, self.batcher.eligible)]] = True
            with torch.no_grad():  # items never in a batch: attributes only (their id embedding was never trained)
                item_emb.weight[torch.as_tensor(np.flatnonzero(~trained))] = 0.0
                self.item_vectors = self.tower(torch.arange(data.n_items)).numpy().astype(np.float32)
        # items trained in a batch and seen ≥ min_count times get and can be neighbours: an item seen a few times
        # keeps a vector near its attributes' (or the MLP bias') direction, close to many items (a hub)
        min_count = p.min_count_ratio * data.item_counts[trained].mean() if trained.any() else 0.0
        self.valid_items = trained & (data.item_counts >= min_count)
        anchors = sum(s[0] for s in self.epoch_stats)
        no_pos = sum(s[1] for s in self.epoch_stats)
        self.anchors_without_positive = no_pos
        self.metrics = {"fit_s": time.perf_counter() - t0, "loss": self.losses[-1] if self.losses else None,
                        "sessions": int(len(self.batcher.eligible)), "valid_items": int(self.valid_items.sum()),
                        "anchors": int(anchors),
                        "anchors_without_positive": int(no_pos),
                        "no_positive_fraction": no_pos / anchors if anchors else 0.0}
        log.info("metric_i2i: %d eligible sessions, %d anchors over %d epochs, %d without a positive (%.1f%%), "
                 "fit %.1fs", len(self.batcher.eligible), anchors, len(self.losses), no_pos,
                 100.0 * self.metrics["no_positive_fraction"], self.metrics["fit_s"])

    def _item_table(self, data: TrainData) -> pd.DataFrame | None:
        """The tower's item attribute table: the items' columns (`use_item_attrs`) and the count bucket."""
        p: MetricI2IParams = self.params
        table = data.item_attrs.reset_index(drop=True) if (p.use_item_attrs and data.item_attrs is not None) else None
        if p.count_feature:
            bucket = pd.DataFrame({COUNT_COLUMN: np.floor(np.log2(1 + data.item_counts)).astype(np.int64)})
            table = bucket if table is None else pd.concat([table, bucket], axis=1)
        return table

    def _train(self, cfg: LoopConfig, draws: np.ndarray,
               rng: np.random.Generator) -> tuple[list[float], list[tuple[int, int]]]:
        p: MetricI2IParams = self.params
        if len(self.batcher.eligible) == 0:
            return [], []
        kw = dict(margin=p.margin, gamma=p.gamma, alpha=p.ms_alpha, beta=p.ms_beta, lam=p.ms_lambda, eps=p.ms_eps,
                  mining=p.ms_mining)
        state: dict = {"batches": [], "stats": []}

        def examples(r: np.random.Generator) -> np.ndarray:
            state["batches"] = self.batcher.epoch(r, draws)
            state["stats"].append([0, 0])
            return np.arange(len(state["batches"]))

        def batch_loss(b: Batch) -> torch.Tensor:
            kb: KShotBatch = state["batches"][int(b.rows[0])]
            items, positive, session = (torch.as_tensor(x) for x in kb.flat())
            uniq, inv = torch.unique(items, return_inverse=True)
            emb = self.tower(uniq)[inv]
            loss, st = metric_loss(emb, items, positive, session, p.loss, **kw)
            state["stats"][-1][0] += st.anchors
            state["stats"][-1][1] += st.no_positive
            return loss

        def on_epoch_end(epoch: int, mean_loss: float) -> dict[str, str]:
            a, n = state["stats"][-1]
            log.debug("metric_i2i epoch %d: loss %.4f, %d/%d anchors without a positive", epoch, mean_loss, n, a)
            return {"no_pos": f"{n}/{a}"}

        hist = train_loop(batch_loss, examples, adam(self.tower.parameters(), cfg), cfg, rng,
                          on_epoch_end=on_epoch_end, modules=[self.tower])
        return hist.losses, [tuple(s) for s in state["stats"]]
