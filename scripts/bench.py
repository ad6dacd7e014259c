"""`make bench`: every benchmark in turn.

Runs scripts/bench_quality.py, scripts/bench_two_tower.py and scripts/bench_vector.py when they exist,
then scripts/bench_serving.py. Quality, two-tower and serving rewrite their sections of docs/benchmarks.md;
bench_vector prints its figures and writes var/bench/vector_server.json (quoted in docs/vector_server.md). Each runs as its own process (so one failing does not stop the others);
the exit code is non-zero if any failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("bench_quality", "bench_two_tower", "bench_vector", "bench_serving")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = set(argv)
    results: list[tuple[str, str, float]] = []
    for name in BENCHES:
        if only and name not in only:
            continue
        if not (ROOT / "scripts" / f"{name}.py").exists():
            results.append((name, "absent", 0.0))
            continue
        print(f"\n=== {name} ===", flush=True)
        t = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", f"scripts.{name}"], cwd=ROOT).returncode
        results.append((name, "ok" if rc == 0 else f"failed (exit {rc})", time.monotonic() - t))
    print("\n=== benchmarks ===")
    for name, status, secs in results:
        print(f"  {name:<16} {status:<18} {secs:7.0f}s")
    print("results: docs/benchmarks.md")
    return 0 if all(s in ("ok", "absent") for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
