"""The one place that names every Redis DB, key and value encoding.

Layout (default 'db' mode): db0 meta (version pointers, id maps), db1 user features, db2 item features,
db3 MF i2i, db4 ItemCF i2i, db5 UserCF u2u, db6 FM i2i, db7 item embeddings, db8 user embeddings,
db9 other i2i/u2u lists, db10 non-personalised lists. In 'prefix' mode every store lives in db0 under
`{prefix}:{store}:` so the same code runs on Redis Cluster (`cluster=True`, docs/redis_cluster.md), and the part
of a key that decides its hash slot is wrapped in a hash tag: every meta key shares `{meta}` (transactions and
the MGET of `current` pointers stay single-slot), a user's keys share `{u:<user_id>}` (batch record, real-time
list and counters, u2u list, vector: one node per user), an item's share `{i:<item_id>}`, and the event log,
its offsets and the event-id markers share `{log}` (one script appends and dedupes). Db-mode keys carry no tags.

Every versioned key has the shape `{kind}:{channel}:{version}:{rest}`, so one SCAN pattern finds a
version's keys for garbage collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

DEFAULT_STORES: dict[str, int] = {
    "meta": 0,
    "user_features": 1,
    "item_features": 2,
    "mf_i2i": 3,
    "itemcf_i2i": 4,
    "usercf_u2u": 5,
    "fm_i2i": 6,
    "item_emb": 7,
    "user_emb": 8,
    "other_nn": 9,
    "lists": 10,
}

# Which store a channel's neighbour lists go to when the channel config does not say.
DEFAULT_NN_STORE_BY_MODEL = {"mf": "mf_i2i", "itemcf": "itemcf_i2i", "usercf": "usercf_u2u", "fm": "fm_i2i"}

FEATURES_CHANNEL = "features"  # the pseudo-channel under which user/item features are versioned
REALTIME_RECENT_FIELDS = ("item_id", "ts", "environment", "region")
# fields of an event-log stream entry (the dataset's interaction columns; empty context fields are left out; a
# reader ignores fields it does not know, so an entry may carry more, e.g. a client's event id)
EVENT_LOG_FIELDS = ("user_id", "item_id", "timestamp", "event", "environment", "region")


@dataclass(frozen=True)
class Keyspace:
    """Key names and DB numbers; construct from settings with `Keyspace.from_settings`."""

    mode: str = "db"
    prefix: str = "mr"
    stores: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_STORES))
    cluster: bool = False  # REDIS_URL names a node of a Redis Cluster (prefix mode only; common/redis_cluster.py)

    def __post_init__(self) -> None:
        if self.mode == "prefix" and ("{" in self.prefix or "}" in self.prefix):
            raise ValueError(f"REDIS_PREFIX {self.prefix!r} must not contain braces (they would set the hash tag)")
        if self.cluster and self.mode != "prefix":
            raise ValueError("a Redis Cluster needs REDIS_KEY_MODE=prefix (a cluster has only db0)")

    @classmethod
    def from_settings(cls, settings) -> Keyspace:
        stores = dict(DEFAULT_STORES)
        stores.update(settings.redis_stores or {})
        return cls(mode=settings.redis_key_mode, prefix=settings.redis_prefix, stores=stores,
                   cluster=settings.redis_cluster)

    # -- where ----------------------------------------------------------------------------------
    def db(self, store: str) -> int:
        """Redis DB number holding `store` (always 0 in prefix mode)."""
        if store not in self.stores:
            raise KeyError(f"unknown Redis store {store!r}; known: {sorted(self.stores)}")
        return 0 if self.mode == "prefix" else self.stores[store]

    def _k(self, store: str, *parts: object) -> str:
        key = ":".join(str(p) for p in parts)
        if self.mode != "prefix":
            return key
        return f"{self.prefix}:{{meta}}:{key}" if store == "meta" else f"{self.prefix}:{store}:{key}"

    def _tag(self, kind: str, value: object) -> str:
        """`value` as a hash tag in prefix mode (`{u:42}`: keys with the same tag share a Cluster slot); as is in
        db mode. The kind keeps the tag non-empty whatever the id holds (an empty `{}` tags nothing)."""
        return f"{{{kind}:{value}}}" if self.mode == "prefix" else str(value)

    @property
    def layout(self) -> int:
        """Version of the key names (archives record it; `trainer republish` replays only matching ones): 1 = db
        mode, or prefix mode before hash tags; 2 = prefix mode with hash tags."""
        return 2 if self.mode == "prefix" else 1

    def all_dbs(self) -> list[int]:
        return sorted({self.db(s) for s in self.stores})

    def version_pattern(self, store: str, channel: str, version: str) -> str:
        """SCAN pattern matching every key of one channel version in `store`."""
        return self._k(store, "*", channel, version, "*")

    # -- meta: versions and id maps (store 'meta') ------------------------------------------------
    def current(self, channel: str) -> str:
        return self._k("meta", "current", channel)

    def manifest(self, channel: str, version: str) -> str:
        return self._k("meta", "manifest", channel, version)

    def versions(self, channel: str) -> str:
        """Sorted set: published version → publish time."""
        return self._k("meta", "versions", channel)

    def retired(self, channel: str) -> str:
        """Sorted set: replaced version → time it stopped being current."""
        return self._k("meta", "retired", channel)

    def pending(self, channel: str) -> str:
        """Sorted set: version being written → start time (left behind if the writer dies)."""
        return self._k("meta", "pending", channel)

    def channels_index(self) -> str:
        """Set of every channel name that has ever been published."""
        return self._k("meta", "channels")

    # -- jobs: who is writing (docs/reliability.md, "Killed jobs") --------------------------------------
    def pending_owner(self, channel: str) -> str:
        """Hash: pending version → run id of the job writing it (dead once that run's lease is gone)."""
        return self._k("meta", "pending_owner", channel)

    def run_lease(self, run_id: str) -> str:
        """A running job's heartbeat (short TTL, refreshed while it runs): absent means the run is dead."""
        return self._k("meta", "run", run_id)

    def job_lock(self) -> str:
        """The lock a nightly or republish run holds (one at a time): JSON of its run id, pid and host; TTL."""
        return self._k("meta", "lock", "jobs")

    def id_map(self, entity: str) -> str:
        """Stable external-id list (orjson array, index = internal id) for 'item' or 'user'."""
        return self._k("meta", "ids", entity)

    def id_map_len(self, entity: str) -> str:
        return self._k("meta", "ids", entity, "n")

    # -- features --------------------------------------------------------------------------------
    def user_features(self, version: str, user_id: str) -> str:
        return self._k("user_features", "uf", FEATURES_CHANNEL, version, self._tag("u", user_id))

    def item_features(self, version: str, item_id: str) -> str:
        return self._k("item_features", "if", FEATURES_CHANNEL, version, self._tag("i", item_id))

    def registered_items(self) -> str:
        """Hash item_id → packed JSON attributes of items registered through POST /items (unversioned)."""
        return self._k("item_features", "reg", "items")

    def realtime_recent(self, user_id: str) -> str:
        """List of packed real-time click events, newest first (unversioned: survives rebuilds; expires
        REALTIME_TTL_S after the user's last event, the only kind of key Redis's volatile-lru may evict)."""
        return self._k("user_features", "rt", "recent", self._tag("u", user_id))

    def realtime_counters(self, user_id: str) -> str:
        """Hash of real-time counters: clicks, last_ts, per-environment/region counts."""
        return self._k("user_features", "rt", "cnt", self._tag("u", user_id))

    def realtime_item_clicks(self, item_id: str) -> str:
        return self._k("item_features", "rt", "clicks", self._tag("i", item_id))

    def realtime_event_id(self, event_id: str) -> str:
        """Marker of an event id already counted by POST /events (expires after EVENT_ID_TTL_S)."""
        return self._k("user_features", "rt", "evid", *self._log_tag(), event_id)

    # -- event log (docs/event_log.md) -------------------------------------------------------------
    def event_log(self) -> str:
        """Stream of every accepted event (fields EVENT_LOG_FIELDS), appended by POST /events in the script that
        updates the real-time state (so it lives in the user store); trimmed only below what the nightly archived."""
        return self._k("user_features", "log", *self._log_tag(), "events")

    def event_log_offsets(self) -> str:
        """Hash consumer name → id of the last stream entry whose output that consumer committed."""
        return self._k("user_features", "log", *self._log_tag(), "offsets")

    def _log_tag(self) -> tuple[str, ...]:
        """What keeps the event log, its offsets and the event-id markers in one slot (nothing in db mode)."""
        return ("{log}",) if self.mode == "prefix" else ()

    # -- channel artifacts -------------------------------------------------------------------------
    def i2i(self, store: str, channel: str, version: str, item_idx: int) -> str:
        return self._k(store, "i2i", channel, version, item_idx)

    def u2u(self, store: str, channel: str, version: str, user_id: str) -> str:
        return self._k(store, "u2u", channel, version, self._tag("u", user_id))

    def item_vector(self, channel: str, version: str, item_idx: int) -> str:
        return self._k("item_emb", "iv", channel, version, item_idx)

    def user_vector(self, channel: str, version: str, user_id: str) -> str:
        return self._k("user_emb", "uv", channel, version, self._tag("u", user_id))

    def user_tower(self, channel: str, version: str) -> str:
        """User tower of an embedding channel: state-dict bytes (common/towers; arch in the manifest)."""
        return self._k("item_emb", "tower", channel, version, "ts")

    def item_list(self, channel: str, version: str, name: str) -> str:
        """A non-personalised list ('global', 'recent', 'cat:<category>')."""
        return self._k("lists", "list", channel, version, name)


# -- value encodings ------------------------------------------------------------------------------
# Neighbour lists: n int32 ids followed by n float32 scores, little-endian, sorted by score desc.

def pack_neighbors(ids: np.ndarray, scores: np.ndarray) -> bytes:
    """Pack a neighbour list (ids int32, scores float32) into one binary value."""
    ids = np.ascontiguousarray(ids, dtype="<i4")
    scores = np.ascontiguousarray(scores, dtype="<f4")
    if ids.shape != scores.shape:
        raise ValueError("ids and scores must have the same length")
    return ids.tobytes() + scores.tobytes()


def unpack_neighbors(value: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_neighbors`; None/empty gives two empty arrays."""
    if not value:
        return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32)
    n = len(value) // 8
    ids = np.frombuffer(value, dtype="<i4", count=n)
    scores = np.frombuffer(value, dtype="<f4", count=n, offset=4 * n)
    return ids, scores


def pack_vector(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def unpack_vector(value: bytes | None) -> np.ndarray | None:
    return None if value is None else np.frombuffer(value, dtype="<f4")


def pack_json(obj) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def unpack_json(value: bytes | None):
    return None if value is None else orjson.loads(value)
