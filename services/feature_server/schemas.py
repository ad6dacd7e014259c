"""The feature server's answers as pydantic models, for its OpenAPI document only (services/openapi.py): the
endpoints write their JSON themselves (orjson), so nothing here runs per request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class UserFeatures(BaseModel):
    """The merged feature record of a user: the batch record of the published features version (when there is
    one) plus the real-time events since (common/features.py); other batch columns appear as they are."""

    model_config = ConfigDict(extra="allow")

    user_id: str
    clicks: int
    recent: list[list[str | int]] = Field(description="[item_id, timestamp] pairs, newest first")
    realtime_clicks: int | None = None
    first_ts: int | None = None
    last_ts: int | None = None
    environment: str | None = None
    region: str | None = None
    attrs: dict[str, Any] | None = None


class ItemRecord(BaseModel):
    """The feature record of an item, its click count including real-time clicks, and `registered` for an item
    registered through POST /items; other batch columns appear as they are."""

    model_config = ConfigDict(extra="allow")

    item_id: str
    clicks: int
    realtime_clicks: int
    category: str | int | None = None
    created_ts: int | float | None = None
    attrs: dict[str, Any] | None = None
    registered: bool | None = None


class EventsAnswer(BaseModel):
    accepted: int = Field(ge=0, description="events written")
    duplicates: int | None = Field(default=None, ge=1, description="events whose event_id was already counted")


class ItemsAnswer(BaseModel):
    registered: int = Field(ge=0)


class FeatureHealth(BaseModel):
    """200 `ok`; 503 `degraded` (Redis has no published features version) or `error` (Redis does not answer)."""

    status: Literal["ok", "degraded", "error"]
    redis: str = Field(description="ok, or why Redis is unavailable")
    features_version: str | None = None
    missing: list[str] | None = None
    detail: str | None = None
