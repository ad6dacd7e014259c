"""The channel config (`config/channels.yaml`): one file read by the nightly job, the evaluator and the
recall server. Generic fields are validated here; model `params` are validated by the trainer's model
class (see `trainer.channels.registry.validate_params`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ArtifactKind = Literal["i2i", "u2u", "u2i", "list"]
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ConfigError(ValueError):
    """The channel config is invalid; the message names the file, channel and key."""


class ServeParams(BaseModel):
    """How the serving side turns a channel's artifact into candidates."""

    model_config = ConfigDict(extra="forbid")
    recent_n: int = Field(20, ge=1, le=500, description="i2i/u2u: how many of the user's recent items are anchors")
    recency_decay: float = Field(0.9, gt=0, le=1, description="i2i: anchor weight = decay**position (newest first)")
    per_anchor: int = Field(100, ge=1, le=2000, description="i2i/u2u: neighbours used per anchor")
    neighbor_items: int = Field(20, ge=1, le=500, description="u2u: recent items taken from each neighbour")
    lists: list[str] = Field(default_factory=lambda: ["global"], description="list: which lists to serve, in order")


class IndexParams(BaseModel):
    """u2i: the faiss index the vector server builds over the channel's item vectors."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["hnsw", "ivf", "flat"] = Field("hnsw", description="hnsw (default), ivf (IndexIVFFlat) or flat (exact)")
    M: int = Field(32, ge=4, le=256, description="hnsw: graph degree")
    ef_construction: int = Field(200, ge=8, le=4096, description="hnsw: build-time beam width")
    ef_search: int = Field(64, ge=1, le=100_000, description="hnsw: smallest search beam width")
    ef_factor: float = Field(2.0, ge=1.0, le=64.0, description="hnsw: beam = max(ef_search, ef_factor · (k + excluded)) per query")
    nlist: int | None = Field(None, ge=1, description="ivf: number of lists (default 4·sqrt(n))")
    nprobe: int = Field(16, ge=1, description="ivf: lists visited per query")
    precompute_k: int = Field(100, ge=0, le=10_000, description="channels without a user tower: each user's top "
                              "precompute_k items are searched once when a version loads (within VECTOR_PRECOMPUTE_MB) "
                              "and requests are answered from them; 0: search on every request")


class ChannelSpec(BaseModel):
    """One channel entry."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: ArtifactKind
    model: str | None = Field(None, description="trainer model name; omit with `from`")
    source: str | None = Field(None, alias="from", description="serve another channel's artifact of this kind")
    enabled: bool = True
    weight: float = Field(1.0, ge=0)
    quota: int = Field(200, ge=1, le=5000)
    timeout_ms: float = Field(80.0, gt=0, le=10_000)
    store: str | None = Field(None, description="Redis store for neighbour lists (default by model)")
    serve: ServeParams = Field(default_factory=ServeParams)
    index: IndexParams = Field(default_factory=IndexParams, description="u2i: vector server index settings")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _model_or_source(self) -> ChannelSpec:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must match {NAME_RE.pattern}")
        if (self.model is None) == (self.source is None):
            raise ValueError("exactly one of 'model' or 'from' must be set")
        if self.source is not None and self.params:
            raise ValueError("'params' belong to the source channel, not to a 'from' channel")
        return self

    @property
    def trained(self) -> bool:
        return self.source is None

    @property
    def publisher(self) -> str:
        """The channel whose published version holds this channel's artifact."""
        return self.source or self.name


class MergeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: Literal["rank", "minmax"] = "rank"
    rank_offset: float = Field(20.0, gt=0, description="rank normalisation: score = 1 / (offset + rank)")


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge: MergeParams = Field(default_factory=MergeParams)
    default_k: int = Field(300, ge=1)
    channels: list[ChannelSpec]

    def enabled(self) -> list[ChannelSpec]:
        return [c for c in self.channels if c.enabled]

    def get(self, name: str) -> ChannelSpec:
        for c in self.channels:
            if c.name == name:
                return c
        raise KeyError(f"unknown channel {name!r}; known: {[c.name for c in self.channels]}")


def _loc(err: dict, channels: list[str]) -> str:
    loc = list(err["loc"])
    if len(loc) >= 2 and loc[0] == "channels" and isinstance(loc[1], int) and loc[1] < len(channels):
        where = f"channel {channels[loc[1]]!r}"
        key = ".".join(str(x) for x in loc[2:]) or "(entry)"
        return f"{where}, key {key!r}"
    return "key " + repr(".".join(str(x) for x in loc))


def parse_config(raw: dict, source: str = "<config>") -> ChannelConfig:
    """Validate a config mapping; channels are given as a mapping name → entry."""
    if not isinstance(raw, dict) or not isinstance(raw.get("channels"), dict) or not raw["channels"]:
        raise ConfigError(f"{source}: expected a top-level 'channels:' mapping of channel name → entry")
    names = list(raw["channels"])
    entries = []
    for name, entry in raw["channels"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: channel {name!r}: entry must be a mapping")
        entries.append({"name": name, **entry})
    try:
        cfg = ChannelConfig(**{**raw, "channels": entries})
    except ValidationError as exc:
        msgs = [f"{_loc(e, names)}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(msgs)) from None
    for c in cfg.channels:
        if c.source is not None:
            if c.source not in names:
                raise ConfigError(f"{source}: channel {c.name!r}, key 'from': unknown channel {c.source!r}")
            if cfg.get(c.source).source is not None:
                raise ConfigError(f"{source}: channel {c.name!r}, key 'from': {c.source!r} is itself a 'from' channel")
    return cfg


def load_config(path: str | Path) -> ChannelConfig:
    """Read and validate a channel config file (YAML)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: channel config not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_config(raw, str(p))
