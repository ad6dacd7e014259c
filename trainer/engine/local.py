"""The local engine: every channel fits in this process (the default)."""

from __future__ import annotations

from typing import Any

from trainer.channels.base import Artifacts, Channel
from trainer.data.train_data import TrainData


class LocalEngine:
    """`channel.fit` then `channel.artifacts`, here."""

    name = "local"

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def fit(self, ch: Channel, data: TrainData, progress: bool = False) -> Artifacts:
        ch.fit(data, progress=progress)
        return ch.artifacts(data)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def close(self) -> None:
        return None
