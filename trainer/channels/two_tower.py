"""Two-tower (DSSM) retrieval: a user tower and an item tower trained so that cos(user, item)/τ ranks the
next clicked item first; exports item vectors, precomputed user vectors and the user tower (TorchScript).

Training example = one interaction (u, i_t); the user side sees only the `recent_n` items *before* t
(no leakage). Losses: listwise softmax, pointwise BCE (1:k), pairwise hinge / logistic. Negatives:
in-batch (with logQ correction from a streaming frequency estimator), random ∝ count^0.75, mixed
(in-batch + random), hard (part random, part items ranked just below the top by the current model),
or the full catalog (small catalogs). See docs/channels.md ("Two-tower") for the choices and figures.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from trainer.channels._tower_model import (
    ItemTower,
    UserTower,
    encode_attrs,
    logits,
    ranking_loss,
    recent_matrix,
    row_logits,
)
from trainer.channels.base import Artifacts, Channel, VectorArtifact
from trainer.data.train_data import TrainData
from trainer.freq_estimator import StreamingFrequencyEstimator


class TwoTowerParams(BaseModel):
    """Hyper-parameters of the two-tower channel (defaults: best found on the ml-100k validation split)."""

    model_config = ConfigDict(extra="forbid")
    emb_dim: int = Field(64, ge=2, le=1024, description="embedding size of every input field")
    dim: int = Field(64, ge=2, le=1024, description="output (retrieval) vector size")
    hidden: list[int] = Field(default_factory=lambda: [128], description="hidden layer sizes of each tower's MLP")
    dropout: float = Field(0.0, ge=0, lt=1)
    recent_n: int = Field(10, ge=1, le=500, description="recent items pooled in the user tower")
    use_user_id: bool = True
    use_user_attrs: bool = True
    use_item_attrs: bool = True
    recent_last: bool = Field(True, description="also feed the newest recent item's embedding as its own field")
    share_item_emb: bool = Field(True, description="recent-item embeddings = item tower's id embeddings")
    user_id_dropout: float = Field(0.3, ge=0, le=1, description="share of examples trained as an unknown user")
    senet: bool = Field(False, description="SENet re-weighting of each tower's field embeddings")
    loss: Literal["listwise", "pointwise", "hinge", "logistic"] = "listwise"
    negatives: Literal["in_batch", "random", "mixed", "hard", "full"] = "in_batch"
    n_neg: int = Field(64, ge=1, le=100_000, description="negatives per positive (pointwise ratio 1:k; random/"
                       "hard/mixed sample size)")
    logq: bool = Field(True, description="sampling-bias correction s(x,y) − log q(y)")
    logq_weight: float = Field(1.25, ge=0, le=2, description="β in s(x,y) − β·log q(y)")
    logq_source: Literal["stream", "exact"] = Field("stream", description="in-batch q: streaming estimator or counts")
    temperature: float = Field(0.05, gt=0, le=10)
    margin: float = Field(0.2, ge=0, le=2, description="hinge margin (cosine units)")
    hard_fraction: float = Field(0.5, ge=0, le=1, description="hard share of the negatives (negatives='hard')")
    hard_from: int = Field(10, ge=0, description="hard negatives: model ranks [hard_from, hard_to)")
    hard_to: int = Field(100, ge=1)
    hard_refresh: int = Field(20, ge=1, description="steps between refreshes of the item vectors used for mining")
    pos_subsample: float = Field(0.0, ge=0, le=1, description="word2vec-style down-sampling of popular positives "
                                 "(threshold on item frequency; 0 = off)")
    epochs: int = Field(7, ge=1, le=1000)
    batch_size: int = Field(512, ge=2, le=65536)
    lr: float = Field(0.003, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    freq_hash_size: int = Field(1 << 16, ge=16)
    freq_hashes: int = Field(2, ge=1, le=8)
    freq_alpha: float = Field(0.01, gt=0, le=1)
    num_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads while fitting")

    @model_validator(mode="after")
    def _check(self) -> TwoTowerParams:
        if self.hard_to <= self.hard_from:
            raise ValueError("hard_to must be > hard_from")
        return self


class TwoTowerChannel(Channel):
    """DSSM-style two-tower u2i channel."""

    model = "two_tower"
    kinds = ("u2i",)
    Params = TwoTowerParams

    # -- features ---------------------------------------------------------------------------------
    def _prepare(self, data: TrainData) -> None:
        p: TwoTowerParams = self.params
        self.user_enc = encode_attrs(data.user_attrs if p.use_user_attrs else None, data.n_users, multi_valued=False,
                                     max_numeric_values=2000)
        self.item_enc = encode_attrs(data.item_attrs if p.use_item_attrs else None, data.n_items, multi_valued=True,
                                     categorical=(data.category_column or "",))
        # unknown user (row n_users) has all-unknown attributes
        ua = self.user_enc.codes[:, :, 0] if self.user_enc.columns else np.zeros((data.n_users, 1), np.int64)
        self.user_attr_codes = np.vstack([ua, np.zeros((1, ua.shape[1]), np.int64)])

    def _build_model(self, data: TrainData) -> None:
        p: TwoTowerParams = self.params
        item_emb_item = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
        torch.nn.init.normal_(item_emb_item.weight, std=0.05)
        with torch.no_grad():
            item_emb_item.weight[data.n_items].zero_()
        if p.share_item_emb:
            item_emb_user = item_emb_item
        else:
            item_emb_user = torch.nn.Embedding(data.n_items + 1, p.emb_dim, padding_idx=data.n_items)
            torch.nn.init.normal_(item_emb_user.weight, std=0.05)
            with torch.no_grad():
                item_emb_user.weight[data.n_items].zero_()
        self.user_tower = UserTower(data.n_users, data.n_items, self.user_enc.sizes, p.emb_dim, p.dim, p.hidden,
                                    p.dropout, p.senet, p.use_user_id, item_emb_user, p.recent_last)
        with torch.no_grad():
            self.user_tower.trained_user[: data.n_users] = torch.as_tensor(
                np.bincount(data.user_idx, minlength=data.n_users)[: data.n_users] > 0)
        self.item_tower = ItemTower(data.n_items, self.item_enc.codes, self.item_enc.sizes, p.emb_dim, p.dim,
                                    p.hidden, p.dropout, p.senet, item_emb_item)
        self.bias = torch.nn.Parameter(torch.zeros(()))  # pointwise BCE offset

    def _user_inputs(self, data: TrainData, users: np.ndarray, end: np.ndarray) -> tuple[torch.Tensor, ...]:
        rec = recent_matrix(data.item_idx, data.user_ptr[users], end, self.params.recent_n, data.n_items)
        return (torch.as_tensor(users, dtype=torch.int64), torch.as_tensor(self.user_attr_codes[users]),
                torch.as_tensor(rec))

    # -- training ---------------------------------------------------------------------------------
    def fit(self, data: TrainData, progress: bool = False) -> None:
        p: TwoTowerParams = self.params
        t0 = time.perf_counter()
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(p.num_threads)
        try:
            torch.manual_seed(self.seed)
            rng = np.random.default_rng(self.seed)
            self._artifacts = None
            self._prepare(data)
            self._build_model(data)
            self._train(data, rng, progress)
        finally:
            torch.set_num_threads(prev_threads)
        self.fit_s = time.perf_counter() - t0

    def _train(self, data: TrainData, rng: np.random.Generator, progress: bool) -> None:
        p: TwoTowerParams = self.params
        n_ex, n_items = len(data.item_idx), data.n_items
        if n_ex == 0:
            return
        counts = data.item_counts.astype(np.float64)
        q = counts ** 0.75
        q = q / q.sum()  # global negative sampler ∝ count^0.75
        log_q_sampler = torch.as_tensor(np.log(np.maximum(q, 1e-12)), dtype=torch.float32)
        log_p_exact = torch.as_tensor(np.log(np.maximum(counts / counts.sum(), 1e-12)), dtype=torch.float32)
        cum_q = np.cumsum(q)
        estimator = StreamingFrequencyEstimator(p.freq_hash_size, p.freq_hashes, p.freq_alpha, seed=self.seed)
        keep_prob = np.ones(n_items)
        if p.pos_subsample > 0:
            f = counts / counts.sum()
            with np.errstate(divide="ignore"):
                keep_prob = np.minimum(1.0, np.sqrt(p.pos_subsample / f) + p.pos_subsample / f)
        positions = np.arange(n_ex, dtype=np.int64)
        params = list(self.user_tower.parameters()) + [x for x in self.item_tower.parameters()
                                                        if all(x is not y for y in self.user_tower.parameters())]
        if p.loss == "pointwise":
            params.append(self.bias)
        opt = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
        all_items = torch.arange(n_items, dtype=torch.int64)
        item_cache: torch.Tensor | None = None
        step = 0
        self.user_tower.train()
        self.item_tower.train()
        self.losses: list[float] = []
        bar = tqdm(range(p.epochs), desc="two_tower", disable=not progress, leave=False)
        for _ in bar:
            ex = positions[rng.random(n_ex) < keep_prob[data.item_idx]] if p.pos_subsample > 0 else positions
            ex = rng.permutation(ex)
            total, nb = 0.0, 0
            for b0 in range(0, len(ex), p.batch_size):
                g = ex[b0:b0 + p.batch_size]
                if len(g) < 2:
                    continue
                users = data.user_idx[g].astype(np.int64)
                pos_np = data.item_idx[g].astype(np.int64)
                uid, attrs, rec = self._user_inputs(data, users, g)
                if p.user_id_dropout > 0:
                    drop = torch.as_tensor(rng.random(len(g)) < p.user_id_dropout)
                    uid = torch.where(drop, torch.full_like(uid, data.n_users), uid)
                estimator.update(pos_np)
                pos = torch.as_tensor(pos_np)
                u = self.user_tower(uid, attrs, rec)
                shared, row = self._negatives(p, pos_np, rng, cum_q, n_items, len(g))
                if row is not None and (item_cache is None or step % p.hard_refresh == 0):
                    with torch.no_grad():
                        self.item_tower.eval()
                        item_cache = self.item_tower(all_items)
                        self.item_tower.train()
                if row is not None:
                    row = self._hard(u.detach(), item_cache, row, rng)
                ids = [pos, shared] + ([row.ravel()] if row is not None else [])
                uniq, inv = torch.unique(torch.cat(ids), return_inverse=True)
                vecs = self.item_tower(uniq)
                log_q = self._log_q(p, estimator, log_q_sampler, log_p_exact, uniq, len(g), len(shared) - (
                    len(g) if p.negatives == "mixed" else 0))
                # log q relative to a uniform catalog: a constant shift that cancels in the softmax and pairwise
                # losses and spares the pointwise bias from having to learn −log(1/n_items)
                lq = None if log_q is None else p.logq_weight * (log_q[inv] + float(np.log(n_items)))
                n_pos, n_sh = len(pos), len(shared)
                v_pos, v_sh = vecs[inv[:n_pos]], vecs[inv[n_pos:n_pos + n_sh]]
                pos_logit = (u * v_pos).sum(1) / p.temperature
                if lq is not None:
                    pos_logit = pos_logit - lq[:n_pos]
                neg = logits(u, v_sh, p.temperature, None if lq is None else lq[n_pos:n_pos + n_sh])
                valid = torch.as_tensor(shared.numpy()[None, :] != pos_np[:, None])
                if row is not None:
                    v_row = vecs[inv[n_pos + n_sh:]].view(len(g), row.shape[1], -1)
                    lq_row = None if lq is None else lq[n_pos + n_sh:].view(len(g), -1)
                    neg = torch.cat([neg, row_logits(u, v_row, p.temperature, lq_row)], dim=1)
                    valid = torch.cat([valid, row != pos.unsqueeze(1)], dim=1)
                loss = ranking_loss(pos_logit, neg, valid, p.loss, p.temperature, p.margin, self.bias)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                nb += 1
                step += 1
            self.losses.append(total / max(nb, 1))
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
        self.user_tower.eval()
        self.item_tower.eval()

    def _negatives(self, p: TwoTowerParams, pos: np.ndarray, rng: np.random.Generator, cum_q: np.ndarray,
                   n_items: int, b: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """(shared negative ids [C], per-row hard slots [B, K_hard] or None) for one batch."""

        def sample(k: int) -> np.ndarray:
            return np.minimum(np.searchsorted(cum_q, rng.random(k) * cum_q[-1], side="right"), n_items - 1)

        row = None
        if p.negatives == "full":
            shared = np.arange(n_items)
        elif p.negatives == "in_batch":
            shared = pos if p.loss != "pointwise" else pos[rng.permutation(b)[: p.n_neg]]
        elif p.negatives == "random":
            shared = sample(p.n_neg)
        elif p.negatives == "mixed":
            shared = np.concatenate([pos, sample(p.n_neg)])
        else:  # hard
            n_hard = int(round(p.n_neg * p.hard_fraction))
            shared = sample(p.n_neg - n_hard) if p.n_neg - n_hard > 0 else np.empty(0, np.int64)
            row = np.zeros((b, n_hard), np.int64) if n_hard > 0 else None
        return torch.as_tensor(np.asarray(shared, np.int64)), row

    def _hard(self, u: torch.Tensor, item_cache: torch.Tensor, row: np.ndarray,
              rng: np.random.Generator) -> torch.Tensor:
        """Per-row hard negatives: uniform draws among each user's model ranks [hard_from, hard_to)."""
        p: TwoTowerParams = self.params
        hi = min(p.hard_to, item_cache.shape[0])
        lo = min(p.hard_from, hi - 1)
        top = torch.topk(u @ item_cache.T, hi, dim=1).indices[:, lo:]
        pick = torch.as_tensor(rng.integers(0, top.shape[1], size=row.shape))
        return torch.gather(top, 1, pick)

    @staticmethod
    def _log_q(p: TwoTowerParams, estimator: StreamingFrequencyEstimator, log_q_sampler: torch.Tensor,
               log_p_exact: torch.Tensor, ids: torch.Tensor, b: int, k_random: int) -> torch.Tensor | None:
        """log of each candidate's sampling probability under the batch's negative scheme (None: no correction)."""
        if not p.logq or p.negatives == "full":
            return None
        if p.negatives in ("in_batch", "mixed"):
            if p.logq_source == "exact":
                lp = log_p_exact[ids]
            else:
                lp = torch.as_tensor(estimator.log_probability(ids.numpy()), dtype=torch.float32)
            if p.negatives == "in_batch":
                return lp
            # mixed: expected copies of y among the candidates = B·p(y) + K·q(y)
            return torch.logaddexp(lp + float(np.log(b)), log_q_sampler[ids] + float(np.log(max(k_random, 1))))
        return log_q_sampler[ids]

    # -- export -----------------------------------------------------------------------------------
    def user_tower_meta(self, data: TrainData) -> dict:
        return {"n_users": data.n_users, "n_items": data.n_items, "recent_n": self.params.recent_n,
                "attr_columns": list(self.user_enc.columns), "attr_vocab": self.user_enc.vocab}

    def scripted_user_tower(self) -> torch.jit.ScriptModule:
        with warnings.catch_warnings():  # torch ≥ 2.9 marks TorchScript deprecated; it is our serving contract
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(copy.deepcopy(self.user_tower).eval())

    def user_tower_bytes(self) -> bytes:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(self.scripted_user_tower(), buf)
        return buf.getvalue()

    @torch.no_grad()
    def encode_users(self, data: TrainData, users: np.ndarray | None = None) -> np.ndarray:
        """User vectors from each user's latest `recent_n` items (what serving computes)."""
        users = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        out = []
        for b0 in range(0, len(users), 4096):
            u = users[b0:b0 + 4096]
            out.append(self.user_tower(*self._user_inputs(data, u, data.user_ptr[u + 1])).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.params.dim), np.float32)

    @torch.no_grad()
    def encode_items(self, data: TrainData) -> np.ndarray:
        return self.item_tower(torch.arange(data.n_items, dtype=torch.int64)).numpy()

    def build_artifacts(self, data: TrainData) -> Artifacts:
        if not hasattr(self, "user_tower"):
            raise RuntimeError("two_tower: fit() must run before build_artifacts()")
        art = VectorArtifact(item_vectors=self.encode_items(data).astype(np.float32),
                             user_vectors=self.encode_users(data).astype(np.float32), metric="ip",
                             user_tower=self.user_tower_bytes(), user_tower_meta=self.user_tower_meta(data))
        return {"u2i": art}
