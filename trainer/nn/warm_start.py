"""Warm starts between nightlies (docs/event_log.md, "Incremental updates"): training checkpoints, ID embedding tables
that grow for new users and items, their optimiser state grown with them, frozen layers, a row-sparse Adam.

An ID table has `n` entity rows followed by `tail` special rows (the unknown user, the padding item): growing it to
`n'` entities copies rows [0, n) bit for bit, puts the new rows at [n, n') and the special rows after them, so
entity indices keep their rows and the special rows keep their meaning at their new position.

Every tower model declares its user- and item-indexed state tensors as `RowTable`s; `WarmStart` then does the rest
the same way for all of them: loads a checkpoint into freshly built (bigger) modules, growing those tensors, freezes
everything but the ID tables, builds the row-sparse optimiser with the grown Adam state, and afterwards says which
rows moved (so only their users' and items' vectors are re-encoded). trainer/channels/warm_tower.py drives it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from trainer.nn.encoding import AttrEncoding, ColumnCodes, codes_from_vocab

CHECKPOINT_META = "__meta__"


def pack_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """`torch.save` bytes of named tensors plus JSON meta (loadable with weights_only: no code runs on load)."""
    buf = io.BytesIO()
    torch.save({**{k: v.detach().cpu().clone() for k, v in tensors.items()},
                CHECKPOINT_META: json.dumps(meta)}, buf)
    return buf.getvalue()


def read_checkpoint(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of `pack_checkpoint` bytes, through torch's weights-only unpickler."""
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get(CHECKPOINT_META), str):
        raise ValueError("not a training checkpoint (no meta)")
    meta = json.loads(state.pop(CHECKPOINT_META))
    return state, meta


def grow_rows(table: torch.Tensor, n_old: int, n_new: int, new_rows: torch.Tensor, tail: int = 1) -> torch.Tensor:
    """`table` ([n_old + tail, ...]) grown to [n_new + tail, ...]: old rows copied, `new_rows` ([n_new − n_old, ...],
    or one row broadcast) after them, the tail rows last."""
    if table.shape[0] != n_old + tail:
        raise ValueError(f"table has {table.shape[0]} rows, expected {n_old} + {tail}")
    if n_new < n_old:
        raise ValueError(f"tables only grow ({n_old} → {n_new})")
    fill = new_rows.to(table.dtype).expand(n_new - n_old, *table.shape[1:])
    return torch.cat([table[:n_old], fill, table[n_old:]], dim=0)


def grow_adam_state(state: dict[str, Any], n_old: int, n_new: int, tail: int = 1) -> dict[str, Any]:
    """Adam moments of a grown table: zeros for the new rows (the optimiser starts fresh on them), step kept."""
    out = dict(state)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            v = state[key]
            out[key] = grow_rows(v, n_old, n_new, torch.zeros((), dtype=v.dtype), tail)
    return out


def freeze(modules: Sequence[nn.Module], trainable: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Every parameter of `modules` but `trainable` stops requiring gradients, and the modules go to eval mode
    (Dropout off, BatchNorm on its running statistics); returns the trainable parameters, each once."""
    keep = {id(p): p for p in trainable}
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(id(p) in keep)
    return list(keep.values())


class LazyAdam(torch.optim.Optimizer):
    """Adam that updates only the rows of a parameter that got a gradient in the step (and only their moments), so a
    row nobody touched stays bit for bit — the step of embedding tables between nightlies. Its state has Adam's keys
    (`step`, `exp_avg`, `exp_avg_sq`), so torch.optim.Adam's state carries over; bias corrections use the
    parameter's global step, as TF's LazyAdam."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:  # an embedding with sparse gradients: the rows it holds are the touched ones
                    g = g.coalesce()
                    idx, gr = g.indices()[0], g.values()
                else:
                    rows = (g != 0).reshape(g.shape[0], -1).any(1) if g.dim() > 1 else g != 0
                    idx = rows.nonzero().squeeze(1)
                    gr = g[idx]
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] = torch.as_tensor(state.get("step", 0.0), dtype=torch.float32) + 1
                if len(idx) == 0:
                    continue
                t = float(state["step"])
                if group["weight_decay"]:
                    gr = gr + group["weight_decay"] * p[idx]
                m = state["exp_avg"][idx].mul_(b1).add_(gr, alpha=1 - b1)
                v = state["exp_avg_sq"][idx].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                state["exp_avg"][idx], state["exp_avg_sq"][idx] = m, v
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(group["eps"])
                p[idx] = p[idx] - (group["lr"] / (1 - b1 ** t)) * m / denom
        return loss


def named_unique_parameters(**modules: nn.Module) -> dict[str, nn.Parameter]:
    """'<module>.<parameter>' → parameter, each parameter once (under its first name; towers share embeddings)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, m in modules.items():
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{prefix}.{name}"] = p
    return out


def optimizer_tensors(opt: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                      named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The Adam state of the named parameters as flat tensors 'adam.<name>.<key>' (of several optimisers, e.g.
    SparseAdam for the tables and Adam for the rest; an int step becomes a tensor). SGD has none."""
    out: dict[str, torch.Tensor] = {}
    for o in [opt] if isinstance(opt, torch.optim.Optimizer) else opt:
        for name, p in named.items():
            for key, v in o.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) or (key == "step" and isinstance(v, int | float)):
                    out[f"adam.{name}.{key}"] = torch.as_tensor(v, dtype=torch.float32) if key == "step" else v
    return out


def adam_state_of(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The saved Adam state of parameter `name` (empty when it had none)."""
    prefix = f"adam.{name}."
    return {k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class WarmState:
    """What a model's training loop needs for an incremental pass: the examples (positions in the TrainData), the
    carried optimiser and logQ frequency estimator."""

    examples: np.ndarray
    optimizer: torch.optim.Optimizer
    estimator: Any


@dataclass
class BaseVersion:
    """The published version an incremental update starts from: its manifest (Redis) and its artifacts dir (disk)."""

    channel: str
    version: str
    manifest: dict[str, Any]

    @property
    def directory(self) -> Path | None:
        d = self.manifest.get("artifacts_dir")
        return Path(d) if d else None

    def checkpoint(self) -> bytes:
        """The training checkpoint published with the version; FileNotFoundError saying what to do without one."""
        path = self.directory / "checkpoint.pt" if self.directory else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"channel {self.channel!r} version {self.version} has no training checkpoint "
                                    f"({path}); it was published before incremental updates existed or its "
                                    "artifacts dir is gone: the next nightly run publishes one")
        return path.read_bytes()

    def array(self, name: str) -> np.ndarray | None:
        """A published .npy array (item_vectors, user_vectors), or None when absent."""
        path = self.directory / f"{name}.npy" if self.directory else None
        return np.load(path) if path is not None and path.is_file() else None


def estimator_tensors(est: Any) -> dict[str, torch.Tensor]:
    """A StreamingFrequencyEstimator's state (its hash functions and per-bucket statistics) as tensors."""
    return {"freq.A": torch.as_tensor(est.A), "freq.B": torch.as_tensor(est.B), "freq.n": torch.as_tensor(est.n),
            "freq.a": torch.as_tensor(est._a), "freq.b": torch.as_tensor(est._b),
            "freq.t": torch.tensor(est.t, dtype=torch.int64)}


def load_estimator(est: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Carry a saved estimator state on into `est` (built with the same hash size and count)."""
    if tuple(tensors["freq.A"].shape) != est.A.shape:
        raise ValueError(f"frequency estimator shape {tuple(tensors['freq.A'].shape)} ≠ {est.A.shape}")
    est.A, est.B, est.n = (tensors[f"freq.{k}"].numpy().copy() for k in ("A", "B", "n"))
    est._a, est._b = tensors["freq.a"].numpy().copy(), tensors["freq.b"].numpy().copy()
    est.t = int(tensors["freq.t"])
    return est


def encoding_meta(enc: Any) -> list[dict[str, Any]]:
    """The fitted columns of an AttrEncoding without their codes: name, vocabulary, labels, kind."""
    return [{"name": f.name, "vocab": f.vocab, "labels": f.labels, "kind": f.kind} for f in enc.fields]


def stale_users(user_idx: np.ndarray, item_idx: np.ndarray, user_ptr: np.ndarray, recent_n: int, n_users_old: int,
                new_rows: np.ndarray, changed_users: np.ndarray, changed_items: np.ndarray) -> np.ndarray:
    """bool [n_users]: users whose vector must be re-encoded — new users, users with new interactions or a changed
    embedding row, and users whose latest `recent_n` items include an item whose embedding changed."""
    n_users = len(user_ptr) - 1
    stale = np.zeros(n_users, bool)
    stale[n_users_old:] = True
    stale[: len(changed_users)] |= changed_users[:n_users]
    stale[np.unique(user_idx[new_rows])] = True
    in_window = np.arange(len(user_idx)) >= user_ptr[user_idx.astype(np.int64) + 1] - recent_n
    hit = in_window & changed_items[item_idx]
    stale[np.unique(user_idx[hit])] = True
    return stale


def reuse_rows(published: np.ndarray | None, stale: np.ndarray, encode: Callable[[np.ndarray], np.ndarray]
               ) -> np.ndarray:
    """The published vectors ([n_old, ...]) with the `stale` rows (and every row past n_old) re-encoded by
    `encode(rows)`; all re-encoded when nothing usable was published."""
    rows = np.flatnonzero(stale)
    if published is None or published.ndim < 2 or len(published) > len(stale):
        return encode(np.arange(len(stale))).astype(np.float32)
    out = np.empty((len(stale), *published.shape[1:]), np.float32)
    out[:len(published)] = published
    rows = np.union1d(rows, np.arange(len(published), len(stale)))
    if len(rows):
        out[rows] = encode(rows)
    return out


# -- published encodings, extended to new users and items -----------------------------------------------------

def extend_codes(codes: np.ndarray, n_old: int, n_new: int, frame: pd.DataFrame | None, fields: list[dict[str, Any]],
                 tail: int = 0) -> np.ndarray:
    """Attribute codes ([n_old + tail, A] per user, or [n_old + tail, A, W] bags per item) grown to n_new rows:
    old rows kept, the new rows' values (`frame`, its rows n_old.. are the new entities) looked up in each field's
    published vocabulary (`fields`: name, vocab, kind) — an unseen value is the rare code 0 until the next nightly,
    as at request time —, the tail rows last."""
    k = n_new - n_old
    width = codes.shape[2] if codes.ndim == 3 else 1
    new = np.full((k, len(fields), width), -1, np.int64)
    new[:, :, 0] = 0
    rows = frame.iloc[n_old:n_new] if frame is not None else None
    for j, f in enumerate(fields):
        if rows is not None and f["name"] in rows.columns and k:
            new[:, j] = codes_from_vocab(rows[f["name"]], f["vocab"], f.get("kind") == "bag", width)
    if codes.ndim == 2:
        new = new[:, :, 0]
    if new.shape[1:] != codes.shape[1:]:  # no attribute column: one dummy column of zeros
        new = np.zeros((k, *codes.shape[1:]), codes.dtype)
    return np.concatenate([codes[:n_old], new.astype(codes.dtype), codes[n_old:]])


def restore_encoding(fields: list[dict[str, Any]], codes: np.ndarray, n_rows: int) -> AttrEncoding:
    """The AttrEncoding of `encoding_meta` fields over (extended) codes [n_rows(+tail), A(, W)]: what the towers'
    sizes and the published input meta (columns, vocab) are read from."""
    cols = [codes[:n_rows, j] if codes.ndim == 3 else codes[:n_rows, j:j + 1] for j in range(len(fields))]
    return AttrEncoding([ColumnCodes(f["name"], c, f["vocab"], f["labels"], f["kind"])
                         for f, c in zip(fields, cols, strict=True)], n_rows)


# -- the generic warm start over named tables ---------------------------------------------------------------------

@dataclass(frozen=True)
class RowTable:
    """A state tensor ('<module>.<state-dict key>') whose first axis is indexed by user or item: `n` entity rows, then
    `tail` special rows (the unknown user, the padding item; 0 for a softmax output table)."""

    key: str
    entity: Literal["user", "item"]
    tail: int = 1
    train: bool = True  # an ID embedding the incremental pass trains; False: a buffer (item codes) kept as published
    new: Literal["fresh", "unknown"] = "fresh"  # new rows: the freshly built module's (its init draws, or codes from
    # the published vocabularies), or a copy of the unknown-user row (what serving gave the user so far)
    derived: bool = False  # recomputed from the data whole (trained_user, catalog): the fresh module's value
    item_vector: bool = False  # an item's row feeds its published vector
    history: bool = False  # an item's row feeds the vector of users who have it among their recent items
    marks_trained: bool = False  # the bool [n_users + 1] buffer of users with a trained row of their own


class WarmStart:
    """One published checkpoint going into freshly built modules at the extended sizes (module docstring)."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_users_old: int, n_items_old: int, n_users: int,
                 n_items: int):
        if n_users < n_users_old or n_items < n_items_old:
            raise ValueError(f"the id maps shrank ({n_users_old} users, {n_items_old} items published; {n_users}, "
                             f"{n_items} now): incremental updates need the append-only maps")
        self.tensors = tensors
        self.sizes = {"user": (n_users_old, n_users), "item": (n_items_old, n_items)}
        self.tables: dict[str, RowTable] = {}
        self.modules: dict[str, nn.Module] = {}

    def load(self, modules: dict[str, nn.Module], tables: Sequence[RowTable]) -> None:
        """The checkpoint's weights into `modules` ('<prefix>' → module, the prefixes of the checkpoint): the row
        `tables` (those the modules have) grown, everything else as published (shapes checked). A user training for
        the first time — new, or known but without a trained row so far — starts from the unknown-user row
        (`new="unknown"` tables)."""
        self.modules = dict(modules)
        states = {prefix: m.state_dict() for prefix, m in modules.items()}
        fresh = {f"{prefix}.{k}": v for prefix, st in states.items() for k, v in st.items()}
        self.tables = {t.key: t for t in tables if t.key in fresh}
        first = self._first_time(fresh)
        for prefix, state in states.items():
            for k, now in state.items():
                key = f"{prefix}.{k}"
                if key not in self.tensors:
                    raise ValueError(f"the checkpoint has no {key!r}: it was written by another version of the model")
                old, t = self.tensors[key], self.tables.get(key)
                if t is None:
                    grown = old
                elif t.derived:
                    grown = now
                else:
                    n0, n1 = self.sizes[t.entity]
                    fill = old[n0] if t.new == "unknown" else now[n0:n1]
                    grown = grow_rows(old, n0, n1, fill, t.tail)
                    if t.new == "unknown" and first is not None:
                        grown[first] = old[n0]
                if grown.shape != now.shape:
                    raise ValueError(f"checkpoint {key} has shape {tuple(grown.shape)}, the model {tuple(now.shape)}")
                state[k] = grown
            modules[prefix].load_state_dict(state)

    def _first_time(self, fresh: dict[str, torch.Tensor]) -> torch.Tensor | None:
        for key, t in self.tables.items():
            if t.marks_trained:
                n0, n1 = self.sizes["user"]
                first = torch.zeros(n1 + 1, dtype=torch.bool)
                first[:n0] = fresh[key][:n0] & ~self.tensors[key][:n0]
                first[n0:n1] = True
                return first
        return None

    def optimizer(self, lr: float, weight_decay: float = 0.0) -> LazyAdam:
        """Freeze every module (eval mode) but the trainable ID tables and return their row-sparse Adam, its state
        the published one grown with the tables (zeros for new rows, the step carried on)."""
        named = named_unique_parameters(**self.modules)
        table_of = {id(p): self.tables[k] for k, p in self._all_named().items()
                    if k in self.tables and self.tables[k].train and not self.tables[k].derived}
        params = freeze(list(self.modules.values()), [p for p in named.values() if id(p) in table_of])
        opt = LazyAdam(params, lr=lr, weight_decay=weight_decay)
        for name, p in named.items():
            state = adam_state_of(self.tensors, name)
            if id(p) in table_of and "exp_avg" in state:
                t = table_of[id(p)]
                n0, n1 = self.sizes[t.entity]
                opt.state[p] = grow_adam_state(state, n0, n1, t.tail)
        return opt

    def _all_named(self) -> dict[str, nn.Parameter]:
        """Every name of every parameter ('<prefix>.<name>'), shared ones under each of their names."""
        return {f"{prefix}.{n}": p for prefix, m in self.modules.items()
                for n, p in m.named_parameters(remove_duplicate=False)}

    def changed(self) -> dict[str, np.ndarray]:
        """key → bool per entity row: the row differs from the published one (new rows always)."""
        out: dict[str, np.ndarray] = {}
        current = {f"{prefix}.{k}": v for prefix, m in self.modules.items() for k, v in m.state_dict().items()}
        for key, t in self.tables.items():
            n0, n1 = self.sizes[t.entity]
            now, old = current[key].detach(), self.tensors[key]
            moved = (now[:n0] != old[:n0]).reshape(n0, -1).any(1).numpy() if n0 else np.zeros(0, bool)
            tail_moved = bool((now[n1:] != old[n0:]).any()) if t.tail else False
            out[key] = np.r_[moved, np.ones(n1 - n0, bool), np.full(t.tail, tail_moved)]
        return out

    def stale(self, changed: dict[str, np.ndarray], data: Any, rows: np.ndarray, recent_n: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """(items whose published vector must be re-encoded, users likewise) from the changed rows: items whose
        row of an item-vector table moved; users who are new, have new interactions, a moved row, a moved
        unknown-user row while served as unknown, or a moved history item among their latest `recent_n`."""
        n_u0, n_users = self.sizes["user"]
        n_items = self.sizes["item"][1]
        items = np.zeros(n_items, bool)
        history = np.zeros(n_items, bool)
        users = np.zeros(n_users, bool)
        trained = np.ones(n_users + 1, bool)
        for key, t in self.tables.items():
            c = changed[key]
            if t.marks_trained:
                trained = self._current(key).numpy().astype(bool)
            if t.entity == "user":
                users |= c[:n_users]
            if t.entity == "item" and t.item_vector:
                items |= c[:n_items]
            if t.entity == "item" and t.history:
                history |= c[:n_items]
        for key, t in self.tables.items():
            if t.entity == "user" and not t.derived and t.tail and changed[key][n_users]:
                users |= ~trained[:n_users]  # every user served as unknown moves with the unknown row
        items[self.sizes["item"][0]:] = True
        return items, stale_users(data.user_idx, data.item_idx, data.user_ptr, recent_n, n_u0, rows, users, history)

    def _current(self, key: str) -> torch.Tensor:
        prefix, k = key.split(".", 1)
        return self.modules[prefix].state_dict()[k]
