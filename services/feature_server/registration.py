"""Item registration: a new item with attributes and no events yet, recorded so that the next nightly run gives it
an item index, item features and, in the side-information channels (EGES, Airbnb), a cold-start vector and i2i
lists (docs/feature_server.md, "Registering new items").

Registered items live in one unversioned Redis hash of the item-features store: field = item id, value = the packed
JSON attributes. The service writes it (`POST /items`); the nightly reads it (`common.registered_items`). This module
imports only `common`, so both sides share the key and the encoding.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from common.id_rule import MAX_ID_LEN, check_id
from common.keyspace import Keyspace, pack_json

MAX_ATTRS = 64
AttrValue = str | int | float | bool | None | list[str | int]


def registered_items_key(ks: Keyspace) -> str:
    """Hash item_id → packed JSON attributes of the registered items (store `item_features`, unversioned)."""
    return ks.registered_items()


class ItemRegistration(BaseModel):
    """One item to register: its id and its attributes as in the items table (a bag value `a|b` or a list)."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    attrs: dict[str, AttrValue] = Field(min_length=1, max_length=MAX_ATTRS)

    @field_validator("item_id", mode="before")
    @classmethod
    def _item_id(cls, v: Any) -> str:
        return check_id(v)  # the one id rule (common/id_rule.py); its IdError is a ValueError

    @field_validator("attrs")
    @classmethod
    def _attrs(cls, v: dict[str, AttrValue]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, x in v.items():
            if not k.strip() or len(k) > MAX_ID_LEN or k == "item_id":
                raise ValueError(f"bad attribute name {k!r}")
            out[k] = "|".join(str(e) for e in x) if isinstance(x, list) else x  # a list is a bag: the `a|b` form
        return out


REGISTRATIONS = TypeAdapter(list[ItemRegistration])


def registration_mapping(items: list[ItemRegistration]) -> dict[str, bytes]:
    """The hash fields written for `items` (a later entry for the same id wins)."""
    return {it.item_id: pack_json(it.attrs) for it in items}
