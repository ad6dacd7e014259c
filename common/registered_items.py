"""Items registered through the feature server's POST /items (attributes, no events yet): one unversioned Redis hash
of the item-features store, field = item id, value = the packed JSON attributes. The feature server writes it; the
nightly reads it here (docs/feature_server.md, "POST /items")."""

from __future__ import annotations

from typing import Any

from common.keyspace import Keyspace, unpack_json


def read_registered_items(client: Any, ks: Keyspace) -> dict[str, dict[str, Any]]:
    """{item_id: attrs} of every registered item (`client`: a sync redis client of the item-features store)."""
    raw = client.hgetall(ks.registered_items())
    return {(k.decode() if isinstance(k, bytes) else k): unpack_json(v) for k, v in raw.items()}
