"""The vector server's answers as pydantic models, for its OpenAPI document only (services/openapi.py): the
endpoints write their JSON themselves (orjson, common/fast_path.py), so nothing here runs per request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Source = Literal["tower", "precomputed", "vector"]


class SearchAnswer(BaseModel):
    channel: str
    version: str
    source: Source = Field(description="where the query vector came from")
    ids: list[int] = Field(description="internal item indices, best first")
    item_ids: list[str | None] = Field(description="external item ids of `ids`")
    scores: list[float]


class ChannelResult(BaseModel):
    """One channel of a /search/user answer: `status` 200 with the results, or 404/503 with `detail`."""

    status: Literal[200, 404, 503]
    detail: str | None = None
    version: str | None = None
    source: Source | None = None
    ids: list[int] | None = None
    item_ids: list[str | None] | None = Field(default=None, description="with item_ids=true (the default)")
    scores: list[float] | None = None


class UserSearchAnswer(BaseModel):
    user_id: str
    results: dict[str, ChannelResult] = Field(description="every channel asked, in the order asked")


class VectorHealth(BaseModel):
    """200 `ok`; 503 `degraded` (Redis lost published versions: the versions held keep answering) or
    `unavailable` (Redis does not answer)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded", "unavailable"]
    channels: dict[str, dict[str, Any]] = Field(description="loaded channels: version, index, tower, ...")
    not_loaded: dict[str, str] = Field(description="channel → why it is not loaded (yet)")
    precomputing: list[str]
    features_version: str | None
    missing: list[str] | None = None
    detail: str | None = None
