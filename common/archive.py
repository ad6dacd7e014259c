"""Published versions on disk, and the digests the manifest carries.

A publish tees every (key, value) it writes into `<ARTIFACTS_DIR>/<channel>/<version>/<store>.kv`; after the flip,
`published.json` records the manifest as committed and the sha256 of every `.kv` file. `python -m trainer republish`
replays those files when Redis has lost the versions (docs/reliability.md).

The manifest's `digests` are sha256 over the values of one artifact, in the order they were written, each value
prefixed by its length (`value_digest`); a service recomputes them at load and refuses a version that differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

KV_SUFFIX = ".kv"
PUBLISHED = "published.json"  # written after the flip: the directory holds a complete, committed version
VERSION_RE = re.compile(r"^\d{8}T\d{9}-[0-9a-f]{4}$")  # common.publish.new_version()
_LEN = 4


class DigestMismatch(ValueError):
    """An artifact read back does not match the digest its manifest carries."""


def new_digest() -> hashlib._Hash:
    return hashlib.sha256()


def update_digest(h: hashlib._Hash, value: bytes) -> None:
    """Add one value (length-prefixed, so a missing or split value changes the digest)."""
    h.update(len(value).to_bytes(_LEN, "little"))
    h.update(value)


def update_digest_many(h: hashlib._Hash, values: list[bytes]) -> None:
    """`update_digest` of each value in order, hashed in one call."""
    h.update(b"".join(b for v in values for b in (len(v).to_bytes(_LEN, "little"), v)))


def value_digest(values: Iterable[bytes | None]) -> str:
    """'sha256:<hex>' of the present values in order (None, a key not in Redis, is skipped)."""
    h = new_digest()
    for v in values:
        if v is not None:
            update_digest(h, v)
    return "sha256:" + h.hexdigest()


def hexdigest(h: hashlib._Hash) -> str:
    return "sha256:" + h.hexdigest()


def check_digest(manifest: dict[str, Any] | None, artifact: str, got: str, what: str) -> None:
    """Raise DigestMismatch when the manifest carries a digest for `artifact` and `got` differs (manifests
    published before digests existed carry none: nothing to check)."""
    want = ((manifest or {}).get("digests") or {}).get(artifact)
    if want is not None and want != got:
        raise DigestMismatch(f"{what}: {artifact} digest mismatch (manifest {want[:23]}…, Redis {got[:23]}…): "
                             f"refused, not loaded")


class KvWriter:
    """Appends (key, value) records to one file: u32 key length, u32 value length, key (UTF-8), value."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: BinaryIO = path.open("wb")
        self._h = new_digest()
        self.records = 0

    def write(self, key: str, value: bytes) -> None:
        k = key.encode()
        rec = len(k).to_bytes(_LEN, "little") + len(value).to_bytes(_LEN, "little") + k + value
        self._fh.write(rec)
        self._h.update(rec)
        self.records += 1

    def write_many(self, pairs: list[tuple[str, bytes]]) -> None:
        """`write` each (key, value) in order, as one write."""
        recs = []
        for key, value in pairs:
            k = key.encode()
            recs += (len(k).to_bytes(_LEN, "little"), len(value).to_bytes(_LEN, "little"), k, value)
        block = b"".join(recs)
        self._fh.write(block)
        self._h.update(block)
        self.records += len(pairs)

    def close(self) -> dict[str, Any]:
        """Flush to disk; the file's record count, size and sha256."""
        self._fh.flush()
        self._fh.close()
        return {"records": self.records, "bytes": self.path.stat().st_size, "sha256": hexdigest(self._h)}


def read_kv(path: Path, chunk: int = 1 << 20) -> Iterator[tuple[str, bytes]]:
    """The records of a `.kv` file, in order."""
    with path.open("rb") as fh:
        while True:
            head = fh.read(2 * _LEN)
            if not head:
                return
            if len(head) < 2 * _LEN:
                raise ValueError(f"{path}: truncated record header")
            nk, nv = int.from_bytes(head[:_LEN], "little"), int.from_bytes(head[_LEN:], "little")
            body = fh.read(nk + nv)
            if len(body) < nk + nv:
                raise ValueError(f"{path}: truncated record")
            yield body[:nk].decode(), body[nk:]


def file_sha256(path: Path) -> str:
    h = new_digest()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return hexdigest(h)


def write_published(directory: Path, record: dict[str, Any]) -> None:
    """Mark a version directory complete (atomically: a reader sees no file or the whole file)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (PUBLISHED + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(directory / PUBLISHED)


def read_published(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / PUBLISHED).read_text())
    except (OSError, ValueError):
        return None


def version_dirs(channel_dir: Path) -> list[Path]:
    """Version directories of one channel, newest first (names that are not version ids are ignored)."""
    if not channel_dir.is_dir():
        return []
    return sorted((p for p in channel_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)),
                  key=lambda p: p.name, reverse=True)


def verify_files(directory: Path, record: dict[str, Any]) -> str | None:
    """None when every `.kv` file the record names is there with its sha256, else what is wrong."""
    for name, info in (record.get("files") or {}).items():
        path = directory / name
        if not path.exists():
            return f"{path} is missing"
        got = file_sha256(path)
        if got != info.get("sha256"):
            return f"{path}: sha256 {got[:23]}… differs from {str(info.get('sha256'))[:23]}… in {PUBLISHED}"
    return None
