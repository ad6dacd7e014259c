"""SDM: Sequential Deep Matching (Lv et al., CIKM 2019). A user vector from a short-term session (LSTM →
multi-head self-attention → user attention) and long-term behaviour (attention per attribute subset → dense tanh),
fused by a gate; scored against a separate output item embedding. Exports item vectors, precomputed user vectors
and the user tower (`common.towers` arch "sdm"), which the vector server runs on each request's recent items.

Training is seq2seq-style, as the authors' code: each user's history is cut into windows of ≤ `short_n` items
(at sessions too, with `session_gap_s`; the grid's offset is drawn per user each epoch), the long-term input of a
window is the `recent_n − short_n` items before it, and one forward with a causal mask gives a user vector at
every position of the window, each predicting the next item with a (sampled) softmax over output item vectors: the
separate output id embedding, with `item_attrs` combined with the item's attribute bags (trainer/channels/sdm_train.py;
precomputed, so serving is unchanged). See docs/channels.md ("SDM").
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from common.towers import recent_matrix
from common.towers.sdm import SDMTower
from trainer.channels.hooks.sdm import SDMHooks
from trainer.channels.sdm_train import ItemSide
from trainer.data.sessions import session_bounds, split_sessions
from trainer.data.train_data import TrainData
from trainer.nn.encoding import item_tower_encoding, user_tower_encoding
from trainer.nn.loop import Batch, LoopConfig, adam, seeded, train_loop, unique_parameters
from trainer.nn.losses import FULL_SOFTMAX_UP_TO, SampledSoftmax
from trainer.nn.negatives import PowerSampler
from trainer.nn.user_inputs import drop_user_ids, trained_users
from trainer.nn.warm_start import WarmState

SIDE_FIELDS = ("category", "brand", "market")


class SDMParams(BaseModel):
    """Hyper-parameters of the SDM channel (defaults: chosen on the ml-100k validation split; docs/channels.md,
    "SDM")."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(64, ge=2, le=1024, description="embedding, LSTM, attention and output size")
    short_n: int = Field(10, ge=1, le=200, description="S: items of the short-term window")
    recent_n: int = Field(30, ge=2, le=500, description="R: recent items the tower reads; long-term = R − S before the "
                          "short window")
    session_gap_s: int | None = Field(None, ge=1, description="also cut the short window at a gap longer than this "
                                      "(seconds; 1800 = the 30-minute rule); null = the last short_n items")
    side_fields: list[Literal["category", "brand", "market"]] = Field(
        default_factory=lambda: list(SIDE_FIELDS), description="item side fields (where the data has them): "
        "long-term attribute subsets and short-term input features")
    num_heads: int = Field(2, ge=1, le=64, description="heads of the self-attention")
    lstm_layers: int = Field(1, ge=1, le=4)
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout of the short-term inputs, attention and long-term "
                           "pooling")
    fusion: Literal["gate", "sum"] = Field("gate", description="gate: o = (1−G)⊙p + G⊙s; sum: o = s + p (ablation)")
    use_user_id: bool = True
    use_user_attrs: bool = True
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of windows trained as an unknown user")
    item_attrs: bool = Field(True, description="output item vector = normalise(W [output id emb; the item's "
                             "attribute bags (genres, release date, …)] + b) (precomputed; serving unchanged); off: "
                             "the output id embedding alone")
    normalize: bool = Field(True, description="L2-normalise user and item vectors (logits = cos/τ)")
    temperature: float = Field(0.1, gt=0, le=10)
    negatives: Literal["sampled"] = Field("sampled", description="sampled softmax (full softmax on catalogues of at "
                                          "most full_softmax_up_to items)")
    num_negatives: int = Field(1000, ge=1, le=100_000, description="negatives shared by a batch (sampled softmax)")
    negatives_power: float = Field(0.75, ge=0, le=1, description="negatives ∝ count^negatives_power")
    logq: bool = Field(True, description="logQ correction of the sampled negatives")
    full_softmax_up_to: int = Field(FULL_SOFTMAX_UP_TO, ge=0, description="full softmax up to this many items")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(128, ge=2, le=65536, description="windows per step (each gives up to short_n targets)")
    lr: float = Field(0.006, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")

    @field_validator("recent_n")
    @classmethod
    def _long_part(cls, v: int, info: ValidationInfo) -> int:
        if "short_n" in info.data and v <= info.data["short_n"]:
            raise ValueError(f"must be > short_n ({info.data['short_n']}): the long-term part is recent_n − short_n items")
        return v

    @field_validator("num_heads")
    @classmethod
    def _heads(cls, v: int, info: ValidationInfo) -> int:
        if "dim" in info.data and info.data["dim"] % v:
            raise ValueError(f"must divide dim ({info.data['dim']})")
        return v


def windows(data: TrainData, short_n: int, gap_s: int | None, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """(start, length ≤ short_n) of the training windows: each user's history (each session, with `gap_s`) cut
    every `short_n` positions from a random offset; only windows with a next item of the same user are kept."""
    n = len(data.item_idx)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    user = data.user_idx.astype(np.int64)
    if gap_s is None:
        seg, seg_first = user, data.user_ptr[:-1]
        n_seg = data.n_users
    else:
        seg = split_sessions(data.user_idx, data.ts, gap_s)
        seg_first, _ = session_bounds(seg)
        n_seg = len(seg_first)
    rel = np.arange(n) - seg_first[seg]
    shift = rng.integers(0, short_n, size=n_seg)[seg]
    start = np.flatnonzero((rel == 0) | ((rel + shift) % short_n == 0))
    length = np.diff(np.append(start, n))
    keep = start + 1 < data.user_ptr[user[start] + 1]
    return start[keep], length[keep]


def windows_before(data: TrainData, rows: np.ndarray, short_n: int, gap_s: int | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the window of ≤ `short_n` items (within the session, with `gap_s`) just before each
    interaction at `rows` that has an earlier one of its user (an incremental update's examples)."""
    rows = np.asarray(rows, np.int64)
    user = data.user_idx[rows].astype(np.int64)
    first = data.user_ptr[user]
    if gap_s is not None and len(rows):
        seg = split_sessions(data.user_idx, data.ts, gap_s)
        seg_first, _ = session_bounds(seg)
        first = np.maximum(first, seg_first[seg[np.maximum(rows - 1, 0)]])
    keep = rows > data.user_ptr[user]
    start = np.maximum(first, rows - short_n)[keep]
    return start, rows[keep] - start


class SDMChannel(SDMHooks):
    """SDM u2i channel: the served tower is `common.towers.sdm.SDMTower`."""

    model = "sdm"
    kinds = ("u2i",)
    Params = SDMParams
    warm_min_batch = 1

    # -- features ---------------------------------------------------------------------------------
    def _prepare(self, data: TrainData) -> None:
        p: SDMParams = self.params
        self.user_enc, self.user_attr_codes = user_tower_encoding(data.user_attrs if p.use_user_attrs else None,
                                                                  data.n_users)
        self.side_fields: list[str] = []
        self.side_names: list[list[str]] = []
        codes, sizes = [], []
        for f in p.side_fields:
            c = data.item_field(f)
            names = data.item_field_names(f)
            if c is None or not names or not (c >= 0).any():
                continue
            self.side_fields.append(f)
            self.side_names.append(names)
            codes.append(np.where(c >= 0, c, len(names)).astype(np.int64))  # unknown → the field's size
            sizes.append(len(names))
        self.side_sizes = sizes
        self.item_codes = np.stack(codes, axis=1) if codes else np.zeros((data.n_items, 0), np.int64)
        if p.item_attrs:
            self.item_enc = item_tower_encoding(data.item_attrs, data.n_items, data.category_column)

    def _build_model(self, data: TrainData) -> None:
        p: SDMParams = self.params
        self.tower = SDMTower(data.n_users, data.n_items, self.user_enc.sizes, self.side_sizes, p.dim, p.short_n,
                              p.recent_n - p.short_n, p.num_heads, p.lstm_layers, p.dropout, p.fusion, p.normalize,
                              p.session_gap_s, p.use_user_id)
        with torch.no_grad():
            self.tower.trained_user[: data.n_users] = trained_users(data.user_idx, data.n_users)
            if self.item_codes.shape[1]:
                self.tower.item_codes[: data.n_items] = torch.as_tensor(self.item_codes)
        self.out_emb = torch.nn.Embedding(max(data.n_items, 1), p.dim)  # the separate output item embedding
        torch.nn.init.normal_(self.out_emb.weight, std=0.05)
        self.item_side = ItemSide(self.item_enc.codes, self.item_enc.sizes, p.dim, p.normalize) if p.item_attrs else None

    def item_vectors_of(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.out_emb(ids)
        if self.item_side is not None:
            return self.item_side(v, ids)
        return F.normalize(v, dim=-1) if self.params.normalize else v

    def window_inputs(self, data: TrainData, start: np.ndarray, length: np.ndarray
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user, attrs, short [B, S], long [B, F, L], next item [B, S] or −1) of windows `start`/`length`."""
        p: SDMParams = self.params
        n, pad = len(data.item_idx), data.n_items
        users = data.user_idx[start].astype(np.int64)
        pos = start[:, None] + np.arange(p.short_n)[None, :]
        inside = pos < (start + length)[:, None]
        short = np.where(inside, data.item_idx[np.minimum(pos, n - 1)], pad).astype(np.int64)
        nxt = pos + 1
        has = inside & (nxt < data.user_ptr[users + 1][:, None])
        target = np.where(has, data.item_idx[np.minimum(nxt, n - 1)], -1).astype(np.int64)
        long_items = recent_matrix(data.item_idx, data.user_ptr[users], start, p.recent_n - p.short_n, pad)
        long = self.tower.long_codes(torch.as_tensor(long_items))
        return (torch.as_tensor(users), torch.as_tensor(self.user_attr_codes[users]), torch.as_tensor(short), long,
                torch.as_tensor(target))

    # -- training ---------------------------------------------------------------------------------
    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: SDMParams = self.params
        self.loop_config = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                                      seed=self.seed, num_threads=p.num_threads, min_batch=1, progress=progress,
                                      desc="sdm")
        with seeded(self.seed, p.num_threads) as rng:
            self._artifacts = None
            self._prepare(data)
            self._build_model(data)
            self._train(data, rng)
            self.item_vectors = self.encode_items(data).astype(np.float32)
            self.user_vectors = self.encode_users(data).astype(np.float32)

    def _train(self, data: TrainData, rng: np.random.Generator, warm: WarmState | None = None) -> None:
        """Train on every user's windows; or, with `warm` (an incremental update), once on the windows that end just
        before each new interaction in `warm.examples`, only those interactions as targets, with the carried
        optimiser and the modules as `warm` left them (frozen)."""
        p: SDMParams = self.params
        self.losses: list[float] = []
        self.optimizer = warm.optimizer if warm else adam(unique_parameters(*self.warm_modules().values()),
                                                          self.loop_config)
        if len(data.item_idx) < 2:
            return
        # the sampler's counts (its log q) are those of every interaction so far, new events included
        softmax = SampledSoftmax(PowerSampler(data.item_counts, p.negatives_power), p.num_negatives, p.temperature,
                                 p.logq, p.full_softmax_up_to)
        opt = self.optimizer
        epoch_windows: dict[str, np.ndarray] = {}
        target_ok = None
        if warm is not None:
            epoch_windows["start"], epoch_windows["length"] = windows_before(data, warm.examples, p.short_n,
                                                                             p.session_gap_s)
            target_ok = np.zeros(len(data.item_idx) + 1, bool)
            target_ok[warm.examples] = True

        def examples(r: np.random.Generator) -> np.ndarray:
            if warm is None:
                epoch_windows["start"], epoch_windows["length"] = windows(data, p.short_n, p.session_gap_s, r)
            return np.arange(len(epoch_windows["start"]))

        def batch_loss(b: Batch) -> torch.Tensor:
            start, length = epoch_windows["start"][b.rows], epoch_windows["length"][b.rows]
            uid, attrs, short, long, target = self.window_inputs(data, start, length)
            if target_ok is not None:  # only the new interactions are targets
                nxt = start[:, None] + np.arange(1, p.short_n + 1)[None, :]
                target[~torch.as_tensor(target_ok[np.minimum(nxt, len(target_ok) - 1)])] = -1
            uid = drop_user_ids(uid, p.user_id_dropout, data.n_users, rng)
            o = self.tower.encode(uid, attrs, short=short, long=long)  # [B, S, d], causal
            has = target >= 0
            return softmax(self.tower.output(o[has]), target[has], self.item_vectors_of, rng)

        history = train_loop(batch_loss, examples, opt, self.loop_config, rng,
                             modules=[] if warm else list(self.warm_modules().values()))
        self.losses = history.losses
