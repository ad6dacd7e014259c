"""What the offline side leaves on disk, as the inspector shows it: the latest nightly run summary
(ARTIFACTS_DIR/runs/<run id>/summary.json, trainer/nightly.py), the latest offline evaluation report (the newest
report.json under EVAL_DIR, trainer/evaluate.py) and the size of a published version's artifact directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVAL_COLUMNS = ("hr@50", "hr@200", "ndcg@50", "coverage@50", "hr@50_liked", "fit_s", "rec_ms_single")
MAX_EVAL_SCAN = 2000  # report.json files looked at under EVAL_DIR (a huge tree must not stall a page)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def latest_nightly(artifacts_dir: Path) -> dict[str, Any] | None:
    """The newest readable nightly summary (run ids sort by time), trimmed to what the page shows; None if none."""
    runs = Path(artifacts_dir) / "runs"
    try:
        candidates = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    except OSError:
        return None
    for run in candidates:
        summary = _read_json(run / "summary.json")
        if summary is not None:
            keep = ("run_id", "started_at", "status", "seconds", "peak_rss_mb", "data", "config", "counts",
                    "stages", "failed", "channels", "versions")
            return {**{k: summary.get(k) for k in keep}, "path": str((run / "summary.json").resolve())}
    return None


def latest_evaluation_dir(eval_dir: Path) -> Path | None:
    """The directory of the newest report.json under `eval_dir` (by modification time), or None."""
    root = Path(eval_dir)
    if not root.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for n, path in enumerate(root.rglob("report.json")):
        if n >= MAX_EVAL_SCAN:
            break
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, path.parent)
    return best[1] if best else None


def latest_evaluation(eval_dir: Path) -> dict[str, Any] | None:
    """The newest evaluation report: dataset, protocol, one row per channel plus merged (EVAL_COLUMNS), whether
    its HR@K plot exists; None if there is none."""
    out = latest_evaluation_dir(eval_dir)
    report = _read_json(out / "report.json") if out else None
    if report is None:
        return None
    rows = []
    channels = report.get("channels") if isinstance(report.get("channels"), dict) else {}
    for name, row in [*channels.items(), ("merged", report.get("merged"))]:
        if isinstance(row, dict):
            rows.append({"name": name, "kind": row.get("kind", "merged" if name == "merged" else None),
                         **{c: row.get(c) for c in EVAL_COLUMNS}})
    return {"path": str(out.resolve()), "dataset": report.get("dataset"), "protocol": report.get("protocol"),
            "n_eval_users": report.get("n_eval_users"), "catalog_size": report.get("catalog_size"),
            "command": report.get("command"), "columns": list(EVAL_COLUMNS), "rows": rows,
            "has_plot": (out / "recall_at_k.png").is_file()}


def dir_size(path: str | Path | None) -> dict[str, Any] | None:
    """{"path", "bytes", "files"} of a directory on this machine (the artifact dir of a version), None when it is
    not there (e.g. the recall server runs on another machine than the nightly)."""
    if not path:
        return None
    root = Path(path)
    if not root.is_dir():
        return None
    total = files = 0
    for p in root.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
                files += 1
        except OSError:
            continue
    return {"path": str(root), "bytes": total, "files": files}
