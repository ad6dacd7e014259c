"""Towers as published artifacts: a state dict (`torch.save` bytes, read back with `weights_only=True`) plus
`user_tower_meta` in the manifest, from which the serving side rebuilds the module out of this package.

    user_tower_meta = {"arch": "two_tower_user", "hparams": {...},            # which module, built how
                       "n_users": U, "n_items": I, "recent_n": R,              # its inputs (common/towers/inputs.py)
                       "attr_columns": [...], "attr_vocab": {...}}

Adding an architecture = a `Tower` subclass (common/towers/base.py) and one entry in `ARCHS` (and, optionally,
a numpy twin in `common/towers/numpy_twin.TWINS`). No TorchScript, no pickled code: loading runs no code from
the artifact, and the weights must fit the rebuilt module exactly (keys, shapes, dtypes, finite values).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.towers.base import Tower
from common.towers.mind import MindTower
from common.towers.multitask import MultiTaskUserTower
from common.towers.neural_cf import NeuMFTower
from common.towers.recent_decay import RecentDecayTower
from common.towers.sdm import SDMTower
from common.towers.two_tower_user import UserTower
from common.towers.youtube_dnn import YouTubeDNNTower

ARCHS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    NeuMFTower.arch: NeuMFTower.from_hparams,
    UserTower.arch: UserTower.from_hparams,
    RecentDecayTower.arch: RecentDecayTower.from_hparams,
    YouTubeDNNTower.arch: YouTubeDNNTower.from_hparams,
    MindTower.arch: MindTower.from_hparams,
    MultiTaskUserTower.arch: MultiTaskUserTower.from_hparams,
    SDMTower.arch: SDMTower.from_hparams,
}

# keys that the inputs half of the meta and the hyper-parameters both state: they must agree
_SHARED_KEYS = ("n_users", "n_items", "recent_n")


class TowerError(ValueError):
    """A published tower that cannot be rebuilt: unknown architecture, bad hyper-parameters or weights."""


def tower_bytes(module: nn.Module) -> bytes:
    """The module's state dict as `torch.save` bytes (tensors only)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    return buf.getvalue()


def tower_meta(module: Tower, inputs: dict[str, Any]) -> dict[str, Any]:
    """`user_tower_meta` of a tower: its architecture and hyper-parameters plus the input meta
    (`common.towers.inputs.input_meta`)."""
    if ARCHS.get(module.arch) is None:
        raise TowerError(f"tower architecture {module.arch!r} is not registered in common/towers ARCHS")
    return {"arch": module.arch, "hparams": dict(module.hparams), **inputs}


def export_tower(module: Tower, inputs: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(bytes, meta) to publish as `VectorArtifact.user_tower` / `user_tower_meta`."""
    return tower_bytes(module), tower_meta(module, inputs)


def build_tower(meta: dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """The module that `meta` describes, freshly initialised (weights not loaded)."""
    arch = meta.get("arch")
    builder = ARCHS.get(arch) if isinstance(arch, str) else None
    if builder is None:
        raise TowerError(f"unknown tower architecture {arch!r} (known: {', '.join(sorted(ARCHS))}); "
                         "a TorchScript tower from before the state-dict contract must be re-published")
    hparams = meta.get("hparams")
    if not isinstance(hparams, dict):
        raise TowerError(f"tower {arch!r}: user_tower_meta has no 'hparams' object")
    for key in _SHARED_KEYS:
        if key in hparams and key in meta and hparams[key] != meta[key]:
            raise TowerError(f"tower {arch!r}: hparams {key}={hparams[key]!r} but the inputs meta says {meta[key]!r}")
    try:
        if device is None:
            return builder(hparams)
        with torch.device(device):
            return builder(hparams)
    except Exception as exc:
        raise TowerError(f"tower {arch!r}: hyper-parameters rejected ({type(exc).__name__}: {exc})") from exc


def read_state(blob: bytes) -> dict[str, torch.Tensor]:
    """A state dict from bytes, through torch's weights-only unpickler: tensors and plain containers only, so a
    crafted pickle (one that would call a function on load) is refused before anything runs."""
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TowerError(f"tower weights refused (a torch.save'd state dict of tensors is expected): "
                         f"{type(exc).__name__}: {first[:300]}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TowerError("tower weights are not a state dict (a dict of parameter name → tensor)")
    return state


def load_tower(blob: bytes, meta: dict[str, Any]) -> nn.Module:
    """Rebuild the tower `meta` names and load `blob` into it, strictly; eval mode, no gradients.

    The weights are checked against a skeleton built on the meta device (no memory) before the real module is
    built: same keys, shapes and dtypes, finite values. Raises TowerError."""
    skeleton = build_tower(meta, device="meta")
    want = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    state = read_state(blob)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise TowerError(f"tower {meta.get('arch')!r}: weights do not fit the architecture (missing "
                         f"{missing[:5]}, unexpected {extra[:5]})")
    for k, (shape, dtype) in want.items():
        v = state[k]
        if tuple(v.shape) != shape or v.dtype != dtype:
            raise TowerError(f"tower {meta.get('arch')!r}: {k} is {v.dtype} {tuple(v.shape)}; the architecture "
                             f"with these hparams has {dtype} {shape}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TowerError(f"tower {meta.get('arch')!r}: {k} holds non-finite values")
    module = build_tower(meta)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TowerError(f"tower {meta.get('arch')!r}: {exc}") from exc
    return module.eval().requires_grad_(False)
