"""The recall server's answers as pydantic models, for its OpenAPI document only (services/openapi.py): the
endpoints write their JSON themselves (orjson, common/fast_path.py), so nothing here runs per request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RecallItem(BaseModel):
    item_id: str
    score: float = Field(description="the merged score (rounded to 6 decimals)")
    channels: dict[str, int] | None = Field(default=None, description="explain=true: channel → rank in it (1-based)")


class ChannelStatus(BaseModel):
    status: Literal["ok", "empty", "timeout", "error", "skipped"]
    count: int = Field(ge=0, description="candidates the channel gave")
    latency_ms: float = Field(ge=0)
    detail: str | None = Field(default=None, description="why the channel gave nothing (or failed)")


class RecallAnswer(BaseModel):
    user_id: str
    k: int
    items: list[RecallItem] = Field(description="at most k candidates, best first")
    channels: dict[str, ChannelStatus] = Field(description="every channel asked, in config order")
    versions: dict[str, str | None] = Field(description="the version each channel (and `features`) answered from")
    cold_start: bool = Field(description="the user has no history: only cold-start channels answered")


class RecallHealth(BaseModel):
    """200 `ok`; 503 `degraded` (Redis lost published versions: answers come from those held in memory) or
    `unavailable` (Redis does not answer; only `status` and `detail` then)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded", "unavailable"]
    detail: str | None = None
    redis: str | None = None
    pid: int | None = None
    vector_mode: str | None = None
    versions: dict[str, str | None] | None = None
    channels: dict[str, str] | None = Field(default=None, description="channel → ok, or why it is unavailable")
    warming: list[str] | None = None
    list_cache: dict[str, Any] | None = None
    vector: dict[str, Any] | None = None
    missing: list[str] | None = None


class Overview(BaseModel):
    """The inspector's overview page: every channel's versions, artifacts, last nightly and serving health."""

    model_config = ConfigDict(extra="allow")

    versions: dict[str, str | None]
    redis: str
    feature_server: dict[str, Any]
    vector_server: dict[str, Any]
    vector_mode: str
    channels: list[dict[str, Any]]
    nightly: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    evaluation_plot: str | None
    features: dict[str, Any]
    items_in_id_map: int
    users_in_id_map: int


class UserPage(BaseModel):
    """The inspector's user page: features, recent clicks, the traced /recall and every channel's own list."""

    model_config = ConfigDict(extra="allow")

    user_id: str
    k: int
    known: bool
    message: str | None
    features: dict[str, Any]
    recent: list[dict[str, Any]]
    recall: RecallAnswer
    columns: list[dict[str, Any]]
    overlap: dict[str, Any]
    degraded: dict[str, str]
    items: dict[str, dict[str, Any] | None]


class ItemPage(BaseModel):
    """The inspector's item page: features, popularity and neighbours in every i2i channel."""

    model_config = ConfigDict(extra="allow")

    item_id: str
    index: int | None
    features: dict[str, Any]
    cold_start: bool
    notes: list[str]
    popularity: dict[str, Any]
    neighbours: list[dict[str, Any]]
    items: dict[str, dict[str, Any] | None]


class ClickAnswer(BaseModel):
    """The feature server's answer to the forwarded event, with where it went and what was sent (only `detail`
    when the inspector refuses the body itself)."""

    model_config = ConfigDict(extra="allow")

    feature_server: str | None = None
    event: dict[str, str] | None = None
    accepted: int | None = None
    duplicates: int | None = None
    detail: Any = None
