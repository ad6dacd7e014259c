"""What every user tower is: an `nn.Module` named by an architecture tag and rebuilt from JSON hyper-parameters."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn


class Tower(nn.Module):
    """A user tower: `forward(user_idx, attrs, recent, recent_ts=None)` (common/towers/inputs.py) → float32
    [B, d] (one vector per user) or [B, K, d] (K interests; all-zero rows for dead ones).

    `arch` is its key in `ARCHS` (common/towers/registry.py); `hparams` (JSON: numbers, strings, lists) are the
    keyword arguments of `__init__` that rebuild it, weights aside — set them in `__init__`.
    """

    arch: ClassVar[str] = ""
    hparams: dict[str, Any]

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> Tower:
        return cls(**hparams)
