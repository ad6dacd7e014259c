"""Reading the event log (docs/event_log.md): the Redis stream that POST /events appends to, its consumers' offsets,
the nightly's on-disk archive, the export to the dataset format.

The stream (`Keyspace.event_log`) holds one entry per accepted event, fields `EVENT_LOG_FIELDS` (the dataset's
interaction columns). A consumer keeps the id of the last entry whose output it committed in the offsets hash
(`Keyspace.event_log_offsets`) and reads the entries after it (XRANGE with an exclusive start), so a consumer that
dies before committing re-reads the same entries and one that committed never reads them again.

The nightly job is the consumer that empties the stream: it writes the entries after its offset to a parquet
segment of the archive (`EVENT_ARCHIVE_DIR/after-<offset>-upto-<last id>.parquet`, default `ARTIFACTS_DIR/events`, fsynced, renamed into place), then commits its
offset, then trims the stream below that offset (XTRIM MINID: an entry is deleted only once it is on disk). Every
later nightly reads the whole archive plus the new entries, so an event folded once stays in the training data;
the incremental job reads the same history and trains on the entries after the offset its base version recorded.
A rerun after a crash writes a segment of the same start again (a superset, which replaces the earlier one), and rows
are deduplicated by their stream id on reading, so nothing is read twice or skipped. Segment names never repeat (a
Redis that lost the offsets starts again at 0-0, but its new entries have new, later ids).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.keyspace import EVENT_LOG_FIELDS
from common.redis_conn import RedisStores
from common.settings import Settings
from trainer.data.io import Dataset

log = logging.getLogger(__name__)

NIGHTLY, INCREMENTAL = "nightly", "incremental"  # the consumers
START = "0-0"  # the offset of a consumer that has read nothing
READ_CHUNK = 10_000
LOG_ID = "log_id"  # the stream id column of frames read from the log or the archive
CONTEXT = ("environment", "region")
SEQ_SPAN = 10**6  # id → int key: ms · SEQ_SPAN + seq (a million appends within one millisecond is out of reach)


def id_key(ids: pd.Series | list[str] | np.ndarray) -> np.ndarray:
    """int64 sort keys of stream ids "<ms>-<seq>" (ordered as Redis orders them)."""
    s = pd.Series(ids, dtype="string").astype(str)
    parts = s.str.split("-", n=1, expand=True)
    if parts.shape[1] < 2:
        parts[1] = "0"
    return parts[0].astype(np.int64).to_numpy() * SEQ_SPAN + parts[1].fillna("0").astype(np.int64).to_numpy()


def _decode(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def entries_frame(entries: list[tuple[bytes, dict]]) -> pd.DataFrame:
    """XRANGE entries → a frame with `log_id` and the EVENT_LOG_FIELDS columns (unknown fields ignored; missing
    context fields are ""; event defaults to click)."""
    cols: dict[str, list[str]] = {LOG_ID: [], **{f: [] for f in EVENT_LOG_FIELDS}}
    for eid, fields in entries:
        cols[LOG_ID].append(_decode(eid))
        got = {_decode(k): _decode(v) for k, v in fields.items()}
        for f in EVENT_LOG_FIELDS:
            cols[f].append(got.get(f, ""))
    df = pd.DataFrame(cols)
    df["timestamp"] = pd.to_numeric(df["timestamp"], errors="coerce").fillna(0).astype(np.int64)
    df["event"] = df["event"].replace("", "click")
    return df


def empty_frame() -> pd.DataFrame:
    return entries_frame([])


# -- the stream and the offsets ---------------------------------------------------------------------------------

def read_offset(stores: RedisStores, consumer: str) -> str:
    """The id of the last entry `consumer` committed ("0-0" when it has read nothing)."""
    v = stores("user_features").hget(stores.keyspace.event_log_offsets(), consumer)
    return _decode(v) if v else START


def offsets(stores: RedisStores) -> dict[str, str]:
    """Every consumer's committed offset."""
    raw = stores("user_features").hgetall(stores.keyspace.event_log_offsets())
    return {_decode(k): _decode(v) for k, v in raw.items()}


def commit_offset(stores: RedisStores, consumer: str, entry_id: str) -> None:
    """Record that `consumer`'s output up to `entry_id` is committed; an offset never moves backwards."""
    if id_key([entry_id])[0] > id_key([read_offset(stores, consumer)])[0]:
        stores("user_features").hset(stores.keyspace.event_log_offsets(), consumer, entry_id)


def last_id(stores: RedisStores) -> str | None:
    """The id of the newest entry in the stream (None when it is empty)."""
    got = stores("user_features").xrevrange(stores.keyspace.event_log(), count=1)
    return _decode(got[0][0]) if got else None


def log_length(stores: RedisStores) -> int:
    return int(stores("user_features").xlen(stores.keyspace.event_log()))


def read_entries(stores: RedisStores, after: str = START, until: str | None = None,
                 chunk: int = READ_CHUNK) -> Iterator[pd.DataFrame]:
    """The entries after `after` up to `until` (inclusive; None: the stream's end now), as frames of ≤ `chunk`."""
    client, key = stores("user_features"), stores.keyspace.event_log()
    until = until or last_id(stores)
    if until is None:
        return
    start = after
    while True:
        got = client.xrange(key, min=f"({start}", max=until, count=chunk)
        if not got:
            return
        yield entries_frame(got)
        start = _decode(got[-1][0])
        if len(got) < chunk:
            return


def read_frame(stores: RedisStores, after: str = START, until: str | None = None) -> pd.DataFrame:
    parts = list(read_entries(stores, after, until))
    return pd.concat(parts, ignore_index=True) if parts else empty_frame()


def append_events(stores: RedisStores, frame: pd.DataFrame, chunk: int = 5_000) -> list[str]:
    """XADD the rows of an interactions frame (user_id, item_id, timestamp[, event, environment, region]) in the
    feature server's entry format; for imports, tests and benchmarks (the real-time user state is not touched)."""
    client, key = stores("user_features"), stores.keyspace.event_log()
    ids: list[str] = []
    records = frame.to_dict("records")
    for b0 in range(0, len(records), chunk):
        pipe = client.pipeline(transaction=False)
        for r in records[b0:b0 + chunk]:
            fields = {"user_id": str(r["user_id"]), "item_id": str(r["item_id"]), "timestamp": int(r["timestamp"]),
                      "event": str(r.get("event") or "click")}
            for c in CONTEXT:
                v = r.get(c)
                if v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != "":
                    fields[c] = str(v)
            pipe.xadd(key, fields)
        ids += [_decode(x) for x in pipe.execute()]
    return ids


def trim(stores: RedisStores, below: str) -> int:
    """Delete the entries older than `below` (XTRIM MINID, exact); returns how many went."""
    return int(stores("user_features").xtrim(stores.keyspace.event_log(), minid=below, approximate=False))


# -- the archive ------------------------------------------------------------------------------------------------

def archive_dir(settings: Settings) -> Path:
    """EVENT_ARCHIVE_DIR, else ARTIFACTS_DIR/events."""
    return Path(settings.event_archive_dir or Path(settings.artifacts_dir) / "events")


class EventArchive:
    """The nightly's parquet segments of archived log entries (with their stream ids)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def segment(self, after: str, last: str) -> Path:
        return self.dir / f"after-{after}-upto-{last}.parquet"

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("after-*-upto-*.parquet")) if self.dir.is_dir() else []

    def write(self, after: str, frame: pd.DataFrame) -> Path:
        """The entries read after offset `after` (stream order), durably: a temp file fsynced and renamed into place;
        then an earlier try's segment from the same offset (a crash before the commit), now a subset, is removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        last = str(frame[LOG_ID].iloc[-1])
        path = self.segment(after, last)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        frame.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in self.dir.glob(f"after-{after}-upto-*.parquet"):
            if old != path and id_key([old.stem.rsplit("-upto-", 1)[1]])[0] <= id_key([last])[0]:
                old.unlink()
        return path

    def load(self) -> pd.DataFrame:
        """Every archived entry once (deduplicated by stream id), in stream order."""
        parts = [pd.read_parquet(p) for p in self.segments()]
        return dedupe_entries(pd.concat(parts, ignore_index=True)) if parts else empty_frame()


def dedupe_entries(frame: pd.DataFrame) -> pd.DataFrame:
    """Each stream id once, in stream order."""
    if frame.empty:
        return frame.reset_index(drop=True)
    out = frame.drop_duplicates(LOG_ID).copy()
    out = out.iloc[np.argsort(id_key(out[LOG_ID]), kind="stable")]
    return out.reset_index(drop=True)


def history(stores: RedisStores, settings: Settings) -> pd.DataFrame:
    """Every event the system holds: the archive plus the stream's entries (each stream id once, stream order)."""
    archived = EventArchive(archive_dir(settings)).load()
    return dedupe_entries(pd.concat([archived, read_frame(stores)], ignore_index=True))


# -- consumers --------------------------------------------------------------------------------------------------

@dataclass
class Folded:
    """What the nightly took from the log: the new entries, the whole history, the offsets read between."""

    new: pd.DataFrame
    history: pd.DataFrame
    after: str
    to: str
    trimmed: int

    def summary(self) -> dict:
        return {"folded": int(len(self.new)), "total": int(len(self.history)), "from": self.after, "to": self.to,
                "trimmed": self.trimmed}


def archive_new_events(stores: RedisStores, settings: Settings) -> Folded:
    """The nightly consumer: archive the entries after its offset, commit the offset, trim the stream below it."""
    archive = EventArchive(archive_dir(settings))
    after = read_offset(stores, NIGHTLY)
    end = last_id(stores)
    new = read_frame(stores, after, end) if end else empty_frame()
    trimmed = 0
    if len(new):
        archive.write(after, new)
        end = str(new[LOG_ID].iloc[-1])
        commit_offset(stores, NIGHTLY, end)
    else:
        end = after
    if end != START:
        trimmed = trim(stores, end)
    log.info("event log: %d new events archived (after %s up to %s), %d trimmed from the stream", len(new), after, end,
             trimmed)
    return Folded(new=new, history=archive.load(), after=after, to=end, trimmed=trimmed)


def as_interactions(events: pd.DataFrame) -> pd.DataFrame:
    """Log entries as dataset interaction rows (the stream id dropped)."""
    return events.drop(columns=[LOG_ID]).reset_index(drop=True)


def fold_into(dataset: Dataset, events: pd.DataFrame) -> Dataset:
    """The dataset with the events appended to its interactions (the protocol's dedupe happens downstream).

    Dataset rows keep their event types (a `rating` ≥ 4 without an `event` column is a like, as when loaded);
    absent context is ""; where the dataset has ratings, an event (which has none) gets the dataset's mean."""
    if events.empty:
        return dataset
    from trainer.data.events import EVENT_TYPES, event_codes, event_column

    base = dataset.interactions.copy()
    if "event" not in base.columns:
        base["event"] = event_column(event_codes(base))
    add = as_interactions(events)
    add["event"] = pd.Categorical(add["event"], categories=list(EVENT_TYPES))
    if "rating" in base.columns:
        add["rating"] = np.float32(base["rating"].mean())
    rows = pd.concat([base, add], ignore_index=True)
    rows["event"] = pd.Categorical(rows["event"], categories=list(EVENT_TYPES))
    for c in rows.columns:
        if c not in ("user_id", "item_id", "timestamp", "rating", "event"):
            rows[c] = rows[c].fillna("").astype(str)
    return Dataset(interactions=rows, users=dataset.users, items=dataset.items, name=dataset.name)


def export_events(stores: RedisStores, settings: Settings, out: str | Path) -> tuple[Path, int]:
    """Write every event (archive + stream) to OUT/interactions.parquet in the dataset format."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = as_interactions(history(stores, settings))
    path = out / "interactions.parquet"
    tmp = path.with_suffix(".tmp")
    rows.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path, len(rows)


def run_export_cli(out: Path, redis_url: str | None = None, artifacts: Path | None = None) -> int:
    """CLI entry of `python -m trainer export-events`: 0 ok, 2 no Redis configured."""
    import sys

    from common.keyspace import Keyspace
    from common.settings import get_settings

    update: dict = {k: v for k, v in (("redis_url", redis_url), ("artifacts_dir", artifacts)) if v}
    settings = get_settings().model_copy(update=update)
    if not settings.redis_url:
        print("error: no Redis configured: set REDIS_URL or pass --redis-url", file=sys.stderr)
        return 2
    stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
    try:
        path, n = export_events(stores, settings, out)
    finally:
        stores.close()
    print(f"{n} events written to {path}", file=sys.stderr)
    return 0
