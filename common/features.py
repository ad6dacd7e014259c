"""User/item feature records: their format, and the merged view (batch features + real-time events).

Batch record (orjson at `keyspace.user_features(version, user_id)`), written by the feature build:
    {"user_id", "clicks", "recent": [[item_id, ts], ...] newest first, "top_categories": [[cat, n], ...],
     "environment", "region", "first_ts", "last_ts", "attrs": {column: value},
     "seen": [every distinct clicked item id, newest first, capped at 5000]}
Real-time state (unversioned, survives rebuilds), written by POST /events:
    list `realtime_recent(user)`: orjson [item_id, ts, environment, region], newest first, capped;
    hash `realtime_counters(user)`: clicks, first_ts, last_ts, env:<e>, region:<r>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.redis_reads import pairs


@dataclass
class UserState:
    """What serving needs about a user right now."""

    user_id: str
    known: bool  # has a batch record or real-time events
    recent: list[tuple[str, int]] = field(default_factory=list)  # (item_id, ts), newest first, deduplicated
    seen: set[str] = field(default_factory=set)  # every item the user is known to have clicked
    features: dict[str, Any] = field(default_factory=dict)  # the merged feature record

    @property
    def recent_items(self) -> list[str]:
        return [i for i, _ in self.recent]


def merge_user_state(user_id: str, batch: bytes | None, rt_events: list[bytes], rt_counters: dict,
                     recent_n: int) -> UserState:
    """Combine a batch record with real-time events (events newer than the batch come first)."""
    rec: dict[str, Any] = orjson.loads(batch) if batch else {}
    events = [orjson.loads(e) for e in rt_events]
    counters = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in (rt_counters or {}).items()}
    merged: list[tuple[str, int]] = [(str(e[0]), int(e[1])) for e in events]
    merged += [(str(i), int(t)) for i, t in rec.get("recent", [])]
    merged.sort(key=lambda x: -x[1])  # stable: real-time first among equal timestamps
    seen_order: dict[str, int] = {}
    for item, ts in merged:
        seen_order.setdefault(item, ts)
    recent = list(seen_order.items())[:recent_n]
    seen = set(seen_order) | set(rec.get("seen", []))
    feats = dict(rec)
    feats.pop("seen", None)
    feats["user_id"] = user_id
    rt_clicks = int(counters.get("clicks", 0))
    feats["clicks"] = int(rec.get("clicks", 0)) + rt_clicks
    feats["recent"] = [[i, t] for i, t in recent]
    if rt_clicks:
        feats["last_ts"] = max(int(rec.get("last_ts") or 0), int(counters.get("last_ts", 0)))
        feats["first_ts"] = int(rec.get("first_ts") or counters.get("first_ts", 0))
        feats["realtime_clicks"] = rt_clicks
        if events:
            feats["environment"] = feats.get("environment") or events[0][2]
            feats["region"] = feats.get("region") or events[0][3]
    return UserState(user_id=user_id, known=bool(rec) or rt_clicks > 0 or bool(events), recent=recent, seen=seen,
                     features=feats)


def feature_version_key(ks: Keyspace) -> str:
    return ks.current(FEATURES_CHANNEL)


async def fetch_user_states(astores, user_ids: list[str], features_version: str | None, recent_n: int) -> list[UserState]:
    """Batch + real-time state of several users in one pipelined round trip to the user store."""
    ks: Keyspace = astores.keyspace
    commands: list[tuple] = []
    for u in user_ids:
        if features_version:
            commands.append(("GET", ks.user_features(features_version, u)))
        commands.append(("LRANGE", ks.realtime_recent(u), 0, recent_n - 1))
        commands.append(("HGETALL", ks.realtime_counters(u)))
    res = await astores.reads("user_features").execute(commands)
    step = 3 if features_version else 2
    out = []
    for j, u in enumerate(user_ids):
        part = res[j * step:(j + 1) * step]
        batch = part[0] if features_version else None
        out.append(merge_user_state(u, batch, part[-2], pairs(part[-1]), recent_n))
    return out


async def fetch_item_records(astores, item_ids: list[str], features_version: str | None) -> list[dict[str, Any] | None]:
    """Item feature records of several items in one pipelined read: the batch record, its `clicks` plus the
    real-time click counter, and `registered: True` for items registered through POST /items (their attributes
    until a build); None for an item with none of the three."""
    ks: Keyspace = astores.keyspace
    commands: list[tuple] = []
    for i in item_ids:
        if features_version:
            commands.append(("GET", ks.item_features(features_version, i)))
        commands += [("GET", ks.realtime_item_clicks(i)), ("HGET", ks.registered_items(), i)]
    res = await astores.reads("item_features").execute(commands) if commands else []
    step = 3 if features_version else 2
    out: list[dict[str, Any] | None] = []
    for j, i in enumerate(item_ids):
        part = res[j * step:(j + 1) * step]
        batch = orjson.loads(part[0]) if features_version and part[0] else None
        rt, registered = int(part[-2] or 0), (orjson.loads(part[-1]) if part[-1] else None)
        if batch is None and rt == 0 and registered is None:
            out.append(None)
            continue
        rec = batch or {"item_id": i, "clicks": 0, "created_ts": None, "category": None, "attrs": registered or {}}
        if registered is not None:
            rec["registered"] = True
        rec["clicks"] = int(rec.get("clicks", 0)) + rt
        rec["realtime_clicks"] = rt
        out.append(rec)
    return out
