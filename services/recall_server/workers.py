"""Several recall-server worker processes on one port, each with its own SO_REUSEPORT listening socket.

uvicorn's multi-worker mode shares one listening socket between the workers: whichever accepts first takes a
burst of new connections, and long-lived keep-alive connections stay where they landed (a load generator's 64
connections were seen split 19/45 between two workers; the busier worker then sets the tail latency). With one
socket per worker bound with SO_REUSEPORT, the kernel spreads connections over the workers by a hash of the
client's address and port. The supervisor holds no listening socket itself, restarts a worker that dies, and
stops them all on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from typing import Any

log = logging.getLogger("recall_server.workers")

APP = "services.recall_server.app:uvicorn_factory"


def supported() -> bool:
    """SO_REUSEPORT with load balancing (Linux)."""
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """Raise OSError naming the address when anything already listens on it (even with SO_REUSEPORT: a bind
    without it fails then), so two servers never share a port by accident."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies, even by SIGKILL (no orphan keeps the port)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(host: str, port: int, uvicorn_kwargs: dict[str, Any]) -> None:
    import uvicorn

    _die_with_parent()

    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    config = uvicorn.Config(APP, factory=True, host=host, port=port, **uvicorn_kwargs)
    uvicorn.Server(config).run(sockets=[sock])


def serve(workers: int, host: str, port: int, uvicorn_kwargs: dict[str, Any]) -> int:
    """Run `workers` processes until SIGTERM/SIGINT; 1 if every worker exits on its own (e.g. a start-up error)."""
    check_port_free(host, port)
    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def start() -> multiprocessing.Process:
        p = ctx.Process(target=_worker, args=(host, port, uvicorn_kwargs), name="recall-worker")
        p.start()
        return p

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("recall server: %d workers on %s:%d (SO_REUSEPORT)", workers, host, port)
    procs = [start() for _ in range(workers)]
    started = time.monotonic()
    try:
        while not stop.wait(0.5):
            dead = [i for i, p in enumerate(procs) if not p.is_alive()]
            if len(dead) == len(procs) and time.monotonic() - started < 120:
                log.error("every worker exited during start-up (exit codes %s)", [p.exitcode for p in procs])
                return 1
            for i in dead:
                log.warning("worker pid %s exited with %s; starting another", procs[i].pid, procs[i].exitcode)
                procs[i] = start()
        return 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
