"""`python -m services.vector_server serve [--port 8002] [--host 127.0.0.1] [--workers 1] [--poll-s 1.0]`."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run uvicorn (blocking)."""
    from common.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m services.vector_server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve POST /search, GET /healthz, GET /metrics")
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.vector_port)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads every index)")
    serve.add_argument("--poll-s", type=float, default=None, help="version/id-map poll interval (env VECTOR_POLL_S)")
    args = parser.parse_args(argv)

    from common.channel_config import ConfigError, load_config

    try:  # fail here with one clear line rather than in every worker
        load_config(settings.channels_config)
    except ConfigError as exc:
        print(f"vector_server: {exc}", file=sys.stderr)
        return 2
    if not settings.redis_url:
        print("vector_server: REDIS_URL is not set (the server reads published channels from Redis)", file=sys.stderr)
        return 2
    # before faiss/torch are imported by the app: one OpenMP thread per worker process
    os.environ["OMP_NUM_THREADS"] = str(settings.omp_threads)
    if args.poll_s is not None:
        os.environ["VECTOR_POLL_S"] = str(args.poll_s)
    import uvicorn

    from services.http_protocol import uvicorn_options

    uvicorn.run("services.vector_server.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, access_log=settings.access_log, log_level=settings.log_level.lower(),
                **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
