"""Quality and nightly benchmarks; writes their figures into docs/benchmarks.md.

    python -m scripts.bench_quality                     # everything (ml-100k evaluation, nightly on ml-100k, 1M/3M/10M)
    python -m scripts.bench_quality --only quality      # or: nightly-ml100k, nightly
    python -m scripts.bench_quality --sizes 1000000     # nightly on a subset of synthetic sizes

The evaluator runs on shared ml-100k with `--repeats 3` (PROTOCOL.md); the nightly job runs in its own
process per dataset against a private Redis, and its peak RSS is measured by the kernel (wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
WORK = ROOT / "var" / "bench"
SIZES = [1_000_000, 3_000_000, 10_000_000]
MEMORY_BUDGET_GB = 24.0
CLASSIC_MODELS = ("popular", "itemcf", "usercf", "mf", "fm")


def classic_config(config: Path | None) -> Path:
    """The channel config with every classic channel enabled (FM too, which the shipped config leaves off) and
    every other one disabled."""
    import yaml

    src = config or ROOT / "config" / "channels.yaml"
    raw = yaml.safe_load(src.read_text())
    chans = raw["channels"]
    for entry in chans.values():
        model = entry.get("model") or chans.get(entry.get("from"), {}).get("model")
        entry["enabled"] = model in CLASSIC_MODELS
    out = WORK / "classic_channels.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def synth_shape(n_clicks: int) -> tuple[int, int]:
    """(users, items) for a synthetic log of n_clicks: ~20 clicks per user, ~100 per item (news-like)."""
    return max(1000, n_clicks // 20), max(500, n_clicks // 100)


def ensure_synth(n_clicks: int) -> Path:
    from trainer.synth import write_synthetic

    users, items = synth_shape(n_clicks)
    path = WORK / f"synth-{n_clicks // 1_000_000}M"
    meta = path / "synth.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if (m.get("n_clicks"), m.get("n_users"), m.get("n_items")) == (n_clicks, users, items):
            return path
    print(f"generating {n_clicks:,} clicks ({users:,} users, {items:,} items) → {path}", flush=True)
    return write_synthetic(path, n_users=users, n_items=items, n_clicks=n_clicks)


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[int, float, float]:
    """Run a child; (exit code, wall seconds, peak RSS in MB of that child, from wait4)."""
    t = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t, usage.ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------

def _liked(row: dict) -> str:
    """HR@50 over the users whose target is liked (rating ≥ 4), where the evaluator reports it."""
    return f"{row['hr@50_liked']:.3f}" if row.get("hr@50_liked") is not None else ""


def bench_quality(repeats: int, config: Path | None) -> str:
    out = WORK / "eval-ml100k"
    cmd = [sys.executable, "-m", "trainer", "evaluate", "--data", str(ML100K), "--out", str(out),
           "--repeats", str(repeats)]
    if config:
        cmd += ["--config", str(config)]
    # every channel of the config is trained and scored, the disabled ones too; the merged row uses the enabled ones
    from common.channel_config import load_config

    cfg = load_config(config or ROOT / "config" / "channels.yaml")
    cmd += ["--channels", ",".join(c.name for c in cfg.channels)]
    print("running:", " ".join(cmd[1:]), flush=True)
    rc, wall, rss = run_measured(cmd, {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                                 WORK / "eval-ml100k.log", 3600)
    if rc != 0:
        raise SystemExit(f"evaluate failed ({rc}); see {WORK / 'eval-ml100k.log'}")
    rep = json.loads((out / "report.json").read_text())
    how = (f"by `python -m scripts.bench_quality` (`python -m trainer evaluate --data ../shared/data/ml-100k "
           f"--repeats {repeats}`, config `{config or 'config/channels.yaml'}`; whole run {wall:.0f} s, peak RSS "
           f"{rss:.0f} MB)")
    return render_quality(rep, how)


def render_quality(rep: dict, how: str) -> str:
    """The quality table of docs/benchmarks.md from an evaluator report (report.json); `how` says how it was run."""
    from trainer.evaluate import REFERENCE_ML100K

    calib = rep["calib_s"]
    lines = [
        f"Measured {datetime.now():%Y-%m-%d} {how}. "
        f"{rep['n_eval_users']} evaluated users, catalog {rep['catalog_size']:,} items. Timings are the median of "
        f"{rep['repeats']} fits/passes; calib_s {calib['start']:.3f} s (start) / {calib['end']:.3f} s (end), "
        f"1-min load average {rep['load_avg_1m']['start']:.2f} / {rep['load_avg_1m']['end']:.2f} "
        "(a shared 2-vCPU machine: compare timings as `fit_s / calib_s`).",
        "",
        "| row | HR@50 | HR@200 | NDCG@50 | Coverage@50 | HR@50 liked targets | fit s | fit s / calib_s | "
        "rec ms/user (batch) | rec ms (single) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(rep["channels"].items()) + [("**merged**", rep["merged"])]
    for name, r in rows:
        label = name if name.startswith("**") else (
            f"ours: {name} ({r['kind']}{', from ' + r['from'] if 'from' in r else ''}"
            f"{'' if r.get('enabled', True) else ', not in the merge'})")
        lines.append(f"| {label} | {r['hr@50']:.3f} | {r['hr@200']:.3f} | {r['ndcg@50']:.3f} | {r['coverage@50']:.3f} | "
                     f"{_liked(r)} | "
                     f"{r['fit_s']:.2f} | {r['fit_s'] / calib['start']:.1f} | {r['rec_ms_batch']:.3f} | "
                     f"{r['rec_ms_single']:.3f} |")
    for name, a, b, c, d, e in REFERENCE_ML100K:
        lines.append(f"| reference: {name} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} | | {e:.2f} | | | |")
    m = rep["merged"]
    lines += ["", f"Merged list: channels {', '.join(m['channels'])}; merge `{m['merge']['normalize']}` "
              f"(rank_offset {m['merge']['rank_offset']:g}); weights "
              + ", ".join(f"{k} {v:g}" for k, v in m["merge"]["weights"].items())
              + "; quotas " + ", ".join(f"{k} {v}" for k, v in m["merge"]["quotas"].items()) + ".",
              "Reference rows are PROTOCOL.md §8 (same split and metrics, measured in an earlier run: compare "
              "their fit s only roughly). Full report: `var/bench/eval-ml100k/report.md`, curve "
              "`var/bench/eval-ml100k/recall_at_k.png`."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# nightly
# ---------------------------------------------------------------------------------------------

def bench_nightly(data: Path, label: str, config: Path | None, timeout_s: float) -> dict:
    """One nightly run on `data` in a child process against a fresh private Redis."""
    from common.local_redis import LocalRedis

    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    art = WORK / f"artifacts-{slug}"
    with LocalRedis(databases=16) as redis_server:
        cmd = [sys.executable, "-m", "trainer", "nightly", "--data", str(data), "--redis-url", redis_server.url,
               "--artifacts", str(art)]
        if config:
            cmd += ["--config", str(config)]
        print(f"nightly on {label}:", " ".join(cmd[1:]), flush=True)
        rc, wall, rss = run_measured(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, WORK / f"nightly-{slug}.log", timeout_s)
        import redis

        info = redis.Redis.from_url(redis_server.url).info("memory")
        redis_mb = info.get("used_memory_peak", 0) / 2**20
    runs = sorted((art / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(runs[-1].read_text()) if runs else {}
    return {"label": label, "rc": rc, "wall_s": wall, "peak_rss_mb": rss, "redis_peak_mb": redis_mb,
            "summary": summary, "timed_out": wall >= timeout_s}


def nightly_table(results: list[dict]) -> str:
    stages: list[str] = []
    for r in results:
        for s in r["summary"].get("stages", []):
            if s["stage"] not in stages:
                stages.append(s["stage"])
    head = "| stage: seconds (peak RSS of the process so far) | " + " | ".join(r["label"] for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for st in stages:
        cells = []
        for r in results:
            rec = next((s for s in r["summary"].get("stages", []) if s["stage"] == st), None)
            cells.append("" if rec is None else f"{rec.get('seconds', 0):.1f} s ({rec.get('peak_rss_mb', 0) / 1024:.1f} GB)"
                         + ("" if rec["status"] == "ok" else " ✗ failed"))
        lines.append(f"| {st} | " + " | ".join(cells) + " |")

    def row(name: str, f) -> str:
        return f"| {name} | " + " | ".join(f(r) for r in results) + " |"

    lines += [
        row("**total wall s** (process, incl. start-up)", lambda r: f"**{r['wall_s']:.1f}**"),
        row("status", lambda r: ("timed out" if r["timed_out"] else r["summary"].get("status", f"exit {r['rc']}"))),
        row("peak RSS, nightly process (MB, wait4)", lambda r: f"{r['peak_rss_mb']:,.0f}"),
        row("peak Redis memory (MB)", lambda r: f"{r['redis_peak_mb']:,.0f}"),
        row("interactions / users / items", lambda r: "{:,} / {:,} / {:,}".format(
            r["summary"].get("counts", {}).get("n_interactions", 0), r["summary"].get("counts", {}).get("n_users", 0),
            r["summary"].get("counts", {}).get("n_items", 0))),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# docs/benchmarks.md sections
# ---------------------------------------------------------------------------------------------

def replace_section(name: str, body: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in docs/benchmarks.md."""
    text = DOC.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text:
        raise SystemExit(f"{DOC}: marker {start} missing")
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    DOC.write_text(pat.sub(lambda _: f"{start}\n{body}\n{end}", text))
    print(f"updated section {name!r} of {DOC}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["quality", "nightly-ml100k", "nightly"], action="append",
                    help="run only these parts (repeatable); default all")
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="synthetic click counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", type=Path, default=None, help="channel config (default config/channels.yaml)")
    ap.add_argument("--nightly-config", type=Path, default=None,
                    help="channel config for the synthetic nightly runs (default: the same as --config)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a size's result from an earlier run (var/bench/nightly-result-*.json) instead of re-running it")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds allowed per nightly run")
    args = ap.parse_args(argv)
    parts = set(args.only or ["quality", "nightly-ml100k", "nightly"])
    WORK.mkdir(parents=True, exist_ok=True)
    if ("quality" in parts or "nightly-ml100k" in parts) and not (ML100K / "interactions.csv").exists():
        print(f"{ML100K} not found: skipping the ml-100k parts", flush=True)
        parts -= {"quality", "nightly-ml100k"}
    if "quality" in parts:
        replace_section("quality", bench_quality(args.repeats, args.config))
    if "nightly-ml100k" in parts:
        shipped = bench_nightly(ML100K, "ml-100k, shipped config", args.config, args.timeout)
        classic_cfg = classic_config(args.config)
        classic = bench_nightly(ML100K, "ml-100k, classic channels", classic_cfg, args.timeout)
        lines = [nightly_table([shipped, classic]), ""]
        for r, what in ((shipped, f"every enabled channel of `{args.config or 'config/channels.yaml'}`"),
                        (classic, "its classic channels only (" + ", ".join(CLASSIC_MODELS) + " enabled, FM's three entries included; others disabled)")):
            verdict = "within" if r["wall_s"] < 60 and r["rc"] == 0 else "NOT within"
            lines.append(f"- {what}: {r['wall_s']:.1f} s end to end ({verdict} the 60 s target).")
        lines.append(f"\nMeasured {datetime.now():%Y-%m-%d %H:%M}.")
        replace_section("nightly-ml100k", "\n".join(lines))
    if "nightly" in parts:
        results = []
        for n in [int(x) for x in args.sizes.split(",") if x]:
            label = f"{n // 1_000_000}M clicks"
            cache = WORK / f"nightly-result-{n // 1_000_000}M.json"
            if args.reuse and cache.exists():
                results.append(json.loads(cache.read_text()))
                print(f"{label}: reusing {cache}", flush=True)
            else:
                data = ensure_synth(n)
                results.append(bench_nightly(data, label, args.nightly_config or args.config, args.timeout))
                cache.write_text(json.dumps(results[-1], default=str))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "summary"}), flush=True)
            replace_section("nightly", nightly_table(results) + _nightly_note(results, args))
    return 0


def _nightly_note(results: list[dict], args) -> str:
    shapes = ", ".join(f"{r['label']}: {synth_shape(int(r['label'].split('M')[0]) * 1_000_000)[0]:,} users × "
                       f"{synth_shape(int(r['label'].split('M')[0]) * 1_000_000)[1]:,} items" for r in results)
    worst = max(r["peak_rss_mb"] + r["redis_peak_mb"] for r in results) / 1024
    return (f"\n\nSynthetic logs from `trainer.synth` ({shapes}); config "
            f"`{args.nightly_config or args.config or 'config/channels.yaml'}`; one process per size against a fresh "
            f"private Redis; stage seconds from the run's summary.json. Largest nightly-process + Redis peak: "
            f"{worst:.1f} GB (budget {MEMORY_BUDGET_GB:.0f} GB). Measured {datetime.now():%Y-%m-%d}.")


if __name__ == "__main__":
    raise SystemExit(main())
