"""`python -m services.recall_server serve [--port 8000] [--host 127.0.0.1] [--workers N]`."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run uvicorn (settings come from the environment, see docs/settings.md)."""
    from common.settings import get_settings

    settings = get_settings()
    ap = argparse.ArgumentParser(prog="python -m services.recall_server", description="The recall server.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="serve GET /recall, /healthz, /metrics, /docs")
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.recall_port)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (one per core)")
    serve.add_argument("--log-level", default=settings.log_level)
    args = ap.parse_args(argv)

    # one OpenMP/BLAS thread per worker: the endpoint is CPU-bound and scales by processes
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(settings.omp_threads))
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        prom_dir = settings.run_dir / f"prometheus-recall-{args.port}"
        shutil.rmtree(prom_dir, ignore_errors=True)
        prom_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir.resolve())

    import uvicorn

    from services.http_protocol import uvicorn_options
    from services.recall_server import workers

    kwargs = dict(access_log=settings.access_log, log_level=args.log_level.lower(), timeout_graceful_shutdown=5,
                  **uvicorn_options(settings))
    if args.workers > 1 and workers.supported():  # one SO_REUSEPORT socket per worker: connections spread evenly
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return workers.serve(args.workers, args.host, args.port, kwargs)
        except OSError as exc:
            print(f"recall server: {exc}", file=sys.stderr)
            return 1
    uvicorn.run(workers.APP, factory=True, host=args.host, port=args.port, workers=args.workers, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
