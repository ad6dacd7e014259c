"""`python -m trainer republish`: put back the last good versions from the artifacts on disk, without retraining.

For each channel that Redis lost (no `current`, no manifest, or a store's keys gone: common.publish.missing_versions),
the newest committed version directory under ARTIFACTS_DIR/<channel>/ whose files match their sha256 in
`published.json` is replayed into Redis under the same version id (same keys, same manifest), then `current` flips
to it; the id maps are restored first. Takes the job lock like the nightly. See docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common.archive import KV_SUFFIX, read_kv, read_published, verify_files, version_dirs
from common.ids import IdMap, load_id_map, publish_id_map
from common.keyspace import FEATURES_CHANNEL, Keyspace
from common.publish import Publisher, missing_versions
from common.redis_conn import RedisStores
from common.settings import Settings, get_settings
from trainer.runs import JobRunning, RunLease, known_channels

log = logging.getLogger(__name__)

# manifest fields the Publisher sets itself at commit
_COMMIT_FIELDS = ("channel", "version", "stores_used", "published_at")


def archived_channels(artifacts_dir: Path) -> list[str]:
    """Channels with at least one committed version on disk."""
    if not artifacts_dir.is_dir():
        return []
    return sorted(d.name for d in artifacts_dir.iterdir()
                  if d.is_dir() and any(read_published(v) for v in version_dirs(d)))


def last_good(artifacts_dir: Path, channel: str, ks: Keyspace) -> tuple[Path, dict[str, Any]] | tuple[None, str]:
    """The newest committed version directory of `channel` whose files check out, and its record; or
    (None, why not)."""
    why = f"no committed version of {channel!r} under {artifacts_dir / channel}"
    for d in version_dirs(artifacts_dir / channel):
        rec = read_published(d)
        if rec is None:
            continue
        if (rec.get("key_mode"), rec.get("prefix")) != (ks.mode, ks.prefix):
            why = (f"{d} was published with REDIS_KEY_MODE={rec.get('key_mode')} prefix {rec.get('prefix')!r}, "
                   f"Redis now uses {ks.mode} {ks.prefix!r}")
            continue
        if rec.get("key_layout", 1) != ks.layout:  # prefix-mode keys gained hash tags (docs/redis_cluster.md)
            why = (f"{d} was published with key layout {rec.get('key_layout', 1)}, this version names keys with "
                   f"layout {ks.layout}: run the nightly job")
            continue
        bad = verify_files(d, rec)
        if bad:
            log.error("republish: skipping %s: %s", d, bad)
            why = bad
            continue
        return d, rec
    return None, why


def restore_version(stores: RedisStores, channel: str, directory: Path, record: dict[str, Any], owner: str) -> str:
    """Replay one archived version into Redis under its own id and make it current; returns the version."""
    manifest = dict(record["manifest"])
    version = manifest["version"]
    pub = Publisher(stores, channel, owner=owner)  # no archive_root: the files are already there
    pub.begin(version)
    for name in sorted(record.get("files") or {}):
        store = name.removesuffix(KV_SUFFIX)
        pub.write(store, read_kv(directory / name), chunk=5000)
    for f in _COMMIT_FIELDS:
        manifest.pop(f, None)
    manifest["republished"] = {"at": time.time(), "from": str(directory)}

    def verify() -> None:
        for store, key in (manifest.get("probes") or {}).items():
            if not stores(store).exists(key):
                raise RuntimeError(f"key {key!r} missing in store {store!r} after the replay")

    return pub.commit(manifest, verify=verify)


def restore_id_maps(stores: RedisStores, artifacts_dir: Path, channels: list[str]) -> dict[str, int]:
    """Extend the published id maps (append-only) with the longest maps kept next to the archived versions."""
    out = {}
    for entity in ("item", "user"):
        best = IdMap()
        for channel in channels:
            for d in version_dirs(artifacts_dir / channel)[:1]:
                path = d / f"{entity}_ids.json"
                if path.exists():
                    m = IdMap.load(path)
                    if len(m) > len(best):
                        best = m
        published = load_id_map(stores, entity)
        if len(best) > len(published):
            publish_id_map(stores, entity, best)  # refuses a map that does not extend the published one
            out[entity] = len(best)
    return out


def served_channels(settings: Settings, stores: RedisStores, on_disk: list[str]) -> list[str]:
    """What the stack serves: the features and the channels the config trains (those Redis knows too); every
    channel on disk when the config cannot be read."""
    from common.channel_config import load_config
    from trainer.nightly import channels_to_train

    try:
        names = {s.name for s in channels_to_train(load_config(settings.channels_config))}
    except Exception as exc:  # an unreadable config must not stop a restore
        log.warning("republish: channel config %s unreadable (%s): restoring every channel on disk",
                    settings.channels_config, exc)
        names = set(on_disk)
    return sorted(names | set(known_channels(stores)) | {FEATURES_CHANNEL})


def republish(settings: Settings, channels: list[str] | None = None, force: bool = False,
              run_id: str | None = None) -> dict[str, Any]:
    """Restore every channel Redis is missing (or `channels`; `force`: even those it has) from disk. Returns a
    report: restored (channel → version), failed (channel → why), ids (entity → length restored)."""
    t0 = time.perf_counter()
    run_id = run_id or f"republish-{time.strftime('%Y%m%dT%H%M%S')}{int(time.time() * 1000) % 1000:03d}"
    artifacts_dir = Path(settings.artifacts_dir)
    stores = RedisStores(settings.redis_url, Keyspace.from_settings(settings))
    report: dict[str, Any] = {"run_id": run_id, "restored": {}, "failed": {}, "ids": {}, "skipped": []}
    try:
        with RunLease(stores, run_id, "republish"):
            on_disk = archived_channels(artifacts_dir)
            wanted = channels or served_channels(settings, stores, on_disk)
            missing = missing_versions(stores, wanted)
            todo = wanted if force else [c for c in wanted if c in missing]
            if "ids" in missing or todo:
                try:
                    report["ids"] = restore_id_maps(stores, artifacts_dir, on_disk)
                except ValueError as exc:  # Redis holds other maps than the disk: leave them
                    report["failed"]["ids"] = str(exc)
            # features first: the services show a user's history as soon as their channels are back
            for channel in sorted(todo, key=lambda c: c != FEATURES_CHANNEL):
                directory, rec = last_good(artifacts_dir, channel, stores.keyspace)
                if directory is None:
                    report["failed"][channel] = rec
                    continue
                try:
                    report["restored"][channel] = restore_version(stores, channel, directory, rec, run_id)
                except Exception as exc:  # one channel failing never stops the others
                    report["failed"][channel] = f"{type(exc).__name__}: {exc}"
                    log.error("republish %s from %s failed: %s", channel, directory, report["failed"][channel])
            report["skipped"] = [c for c in wanted if c not in todo]
    finally:
        stores.close()
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def run_republish_cli(channels: str | None, force: bool) -> int:
    """CLI entry: 0 everything asked for is whole, 1 some channel could not be restored from disk (run the nightly),
    2 no Redis configured, 3 another nightly/republish holds the job lock."""
    settings = get_settings()
    if not settings.redis_url:
        print("error: no Redis configured: set REDIS_URL", file=sys.stderr)
        return 2
    names = [c.strip() for c in channels.split(",") if c.strip()] if channels else None
    try:
        report = republish(settings, names, force)
    except JobRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(report, indent=1))
    for channel, version in report["restored"].items():
        log.info("republished %s version %s", channel, version)
    if report["failed"]:
        for channel, why in report["failed"].items():
            print(f"error: {channel}: {why}", file=sys.stderr)
        return 1
    return 0
