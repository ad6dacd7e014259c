"""Finds every Channel subclass in `trainer/channels/` by its `model` name (no list to maintain)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from pydantic import ValidationError

from common.channel_config import ChannelConfig, ConfigError
from trainer.channels.base import Channel, RenamedParamError


@lru_cache(maxsize=1)
def models() -> dict[str, type[Channel]]:
    """model name → Channel class, discovered by importing every module of this package."""
    import trainer.channels as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "registry", "neighbors", "embedding"):
            importlib.import_module(f"trainer.channels.{mod.name}")
    found: dict[str, type[Channel]] = {}
    stack = list(Channel.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "model", None):
            found[cls.model] = cls
    return found


def validate_params(cfg: ChannelConfig, source: str = "<config>") -> None:
    """Check every trained channel's model exists, emits the configured kind, and accepts its params."""
    known = models()
    for spec in cfg.channels:
        owner = spec if spec.trained else cfg.get(spec.publisher)
        cls = known.get(owner.model)
        if cls is None:
            raise ConfigError(f"{source}: channel {owner.name!r}, key 'model': unknown model {owner.model!r}; "
                              f"known: {sorted(known)}")
        if spec.kind not in cls.kinds:
            raise ConfigError(f"{source}: channel {spec.name!r}, key 'kind': model {owner.model!r} emits {list(cls.kinds)}, "
                              f"not {spec.kind!r}")
        if spec.trained:
            try:
                cls.check_renamed(spec.params)
            except RenamedParamError as exc:
                raise ConfigError(f"{source}: channel {spec.name!r}, key '{str(exc).split(':')[0]}': "
                                  f"{str(exc).split(': ', 1)[1]}") from None
            try:
                cls.Params(**spec.params)
            except ValidationError as exc:
                e = exc.errors()[0]
                key = ".".join(str(x) for x in e["loc"])
                raise ConfigError(f"{source}: channel {spec.name!r}, key 'params.{key}': {e['msg']}") from None


def build(spec, seed: int = 42) -> Channel:
    return models()[spec.model](spec, seed=seed)
