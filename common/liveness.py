"""Is a process, or a job's lease, still alive? (trainer/runs.py writes the leases; common/publish.py reads them.)"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def holder_dead(holder: dict[str, Any]) -> bool:
    """A lease or lock holder on this host whose process is gone is dead, even before its TTL runs out."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def lease_alive(raw: bytes | str | None) -> bool:
    """Whether a lease value (JSON of run_id, pid, host; absent once its TTL ran out) names a live run."""
    if not raw:
        return False
    try:
        holder = json.loads(raw)
    except ValueError:
        return True  # not ours to judge: the TTL decides
    return not (isinstance(holder, dict) and holder_dead(holder))
