"""Where the nightly's heavy stages run: `local` (this process, the default) or `ray` (a Ray cluster: sharded
co-occurrence, session building, data-parallel tower training, sharded batch precompute; docs/scaling.md).

An engine fits a channel and returns its artifacts; the nightly does nothing else differently.

    engine = make_engine("ray", address="ray-head:6379")     # or make_engine("local")
    artifacts = engine.fit(channel, data, progress=False)      # {kind: artifact}, as channel.artifacts(data)
    engine.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the nightly imports the engines before its `config` stage: keep torch out of that import
    from trainer.channels.base import Artifacts, Channel
    from trainer.data.train_data import TrainData

ENGINES = ("local", "ray")


class Engine(Protocol):
    """Fits channels; `stats` holds what the last fit did on the engine (summary.json, per channel)."""

    name: str
    stats: dict[str, Any]

    def fit(self, ch: Channel, data: TrainData, progress: bool = False) -> Artifacts:
        """Fit `ch` on `data` and return its artifacts."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the engine runs on (for the run summary)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a Ray connection it opened)."""
        ...


def make_engine(name: str = "local", address: str | None = None, train_workers: int = 2, workers: int = 1) -> Engine:
    """The engine called `name`: local (`workers` channel jobs at once), or ray (`address` of a running cluster; None
    starts a local Ray)."""
    if name == "local":
        from trainer.engine.local import LocalEngine

        return LocalEngine(workers=workers)
    if name == "ray":
        from trainer.engine.ray_engine import RayEngine

        return RayEngine(address=address, train_workers=train_workers)
    raise ValueError(f"unknown engine {name!r} (one of {', '.join(ENGINES)})")
