"""The local engine: every channel fits in this process (the default), on `workers` threads at once.

With several workers the nightly's channel jobs (fit + publish of one channel) run on a bounded pool of threads
that share the loaded data (docs/scaling.md, "The local engine's workers"): longest expected job first, each
worker's OpenMP libraries (torch, implicit, faiss) and BLAS pinned to one thread, and the models that draw from
torch's process-wide random generator one at a time, so every channel's artifacts equal the sequential run's.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.channels.base import Artifacts, Channel
    from trainer.data.train_data import TrainData

log = logging.getLogger(__name__)

# Expected cost of a model's fit + publish, relative (CPU seconds at 1M clicks, docs/benchmarks.md): the pool starts
# the longest jobs first. Models not listed (the neural ones) count as the longest.
EXPECTED_COST = {"popular": 0.1, "usercf": 5.0, "itemcf": 8.0, "item2vec": 11.0, "mf": 27.0, "fm": 60.0}
UNLISTED_COST = 170.0
# Models whose fit draws nothing from torch's process-wide generator (numpy Generators, gensim, implicit, their own
# torch.Generator): they may run beside anything. Every other model may seed and draw from it (trainer/nn/loop.py's
# `seeded`), so two of those never run at the same time.
TORCH_RNG_FREE = frozenset({"popular", "itemcf", "usercf", "item2vec", "mf"})


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup quotas are not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class LocalEngine:
    """`channel.fit` then `channel.artifacts`, here; `workers` channel jobs at once (1: one after another)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self.stats: dict[str, Any] = {}

    def fit(self, ch: Channel, data: TrainData, progress: bool = False) -> Artifacts:
        ch.fit(data, progress=progress)
        return ch.artifacts(data)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.workers}

    def close(self) -> None:
        return None


@dataclass
class Job:
    """One unit of pool work; jobs of one `group` never run at the same time."""

    name: str
    run: Callable[[], None]
    cost: float = 0.0
    group: str | None = None


def channel_job(name: str, model: str, run: Callable[[], None]) -> Job:
    """The pool job fitting and publishing channel `name` of `model`."""
    return Job(name, run, EXPECTED_COST.get(model, UNLISTED_COST), None if model in TORCH_RNG_FREE else "torch-rng")


class JobPool:
    """Runs jobs on `workers` daemon threads, longest expected first. `tick` is called every `tick_s` while waiting.

    A BaseException raised in the waiting thread (Terminated, from the SIGTERM handler) stops the pool: no new job
    starts, the same exception is raised inside every running job (at its next Python instruction, as a signal would
    be), the workers are waited for (up to `kill_wait_s`), and it propagates."""

    def __init__(self, workers: int, tick: Callable[[], None] | None = None, tick_s: float = 0.25,
                 kill_wait_s: float = 120.0) -> None:
        self.workers, self.tick, self.tick_s, self.kill_wait_s = max(1, workers), tick, tick_s, kill_wait_s
        self._cv = threading.Condition()
        self._queue: list[Job] = []
        self._running: dict[int, Job] = {}  # thread ident → its job
        self._errors: list[BaseException] = []
        self._stopping = False

    def run(self, jobs: list[Job]) -> None:
        self._queue = sorted(jobs, key=lambda j: -j.cost)  # stable: equal costs keep their order
        threads = [threading.Thread(target=self._work, name=f"nightly-worker-{i}", daemon=True)
                   for i in range(min(self.workers, len(jobs)))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(self.tick_s)
                    if self.tick:
                        self.tick()
        except BaseException as exc:
            self._kill(exc, threads)
            raise
        if self._errors:
            raise self._errors[0]

    def _take(self) -> Job | None:
        with self._cv:
            while self._queue and not self._stopping:
                busy = {j.group for j in self._running.values() if j.group}
                job = next((j for j in self._queue if j.group is None or j.group not in busy), None)
                if job is not None:
                    self._queue.remove(job)
                    self._running[threading.get_ident()] = job
                    return job
                self._cv.wait()
            return None

    def _work(self) -> None:
        try:
            pin_threads(1)
            while (job := self._take()) is not None:
                try:
                    job.run()
                except BaseException as exc:  # a job records its own failures: this is a bug, or the kill
                    if not self._stopping:
                        log.exception("pool job %s raised", job.name)
                        self._errors.append(exc)
                finally:
                    with self._cv:
                        self._running.pop(threading.get_ident(), None)
                        self._cv.notify_all()
        except BaseException:  # the kill, landing between two jobs
            if not self._stopping:
                raise

    def _kill(self, exc: BaseException, threads: list[threading.Thread]) -> None:
        with self._cv:
            self._stopping = True
            self._queue.clear()
            self._cv.notify_all()
            running = list(self._running)
        cls = _raisable(exc)
        for ident in running:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(cls))
        deadline = time.monotonic() + self.kill_wait_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s still running %.0fs after the kill", t.name, self.kill_wait_s)


def _raisable(exc: BaseException) -> type[BaseException]:
    """A subclass of exc's class whose no-argument instances equal `exc` (an async exception is raised as a class)."""
    def init(self: BaseException) -> None:
        BaseException.__init__(self, *exc.args)
        self.__dict__.update(vars(exc))

    return type(type(exc).__name__, (type(exc),), {"__init__": init})


def pin_threads(n: int) -> None:
    """This thread's OpenMP teams (torch, implicit, faiss: libgomp's count is per calling thread) to `n` threads."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="openmp")


class CpuMeter:
    """CPU seconds per stage while stages run on several threads: each stage's own thread's CPU clock, plus a share
    of the process CPU that no stage thread (nor the main thread) accounts for — helper threads such as gensim's
    workers — split among the stages running at the time in proportion to how long each one's thread was blocked
    (waiting for its helpers: neither running nor waiting for a CPU, from the kernel's schedstat)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._open: dict[int, list[float]] = {}  # token → [clock id, native id, CPU, run-queue wait, CPU so far]
        self._main = time.pthread_getcpuclockid(threading.main_thread().ident)
        self._last = self._now()

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), time.clock_gettime(self._main)

    def start(self) -> int:
        clock, tid = time.pthread_getcpuclockid(threading.get_ident()), threading.get_native_id()
        with self._lock:
            self._tick()
            token = next(self._ids)
            self._open[token] = [clock, tid, time.clock_gettime(clock), _runq_wait(tid), 0.0]
        return token

    def stop(self, token: int) -> float:
        with self._lock:
            self._tick()
            return self._open.pop(token)[4]

    def tick(self) -> None:
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        (w0, p0, m0), (w1, p1, m1) = self._last, self._now()
        self._last = (w1, p1, m1)
        own: dict[int, float] = {}
        blocked: dict[int, float] = {}
        for token, st in self._open.items():
            c, q = time.clock_gettime(int(st[0])), _runq_wait(int(st[1]))
            own[token], wait = c - st[2], q - st[3]
            st[2], st[3] = c, q
            st[4] += own[token]
            blocked[token] = max(0.0, (w1 - w0) - own[token] - wait)
        rest = (p1 - p0) - (m1 - m0) - sum(own.values())
        if rest <= 0 or not own:
            return
        total = sum(blocked.values())
        for t in own:
            self._open[t][4] += rest * (blocked[t] / total if total > 0 else 1 / len(own))


def _runq_wait(tid: int) -> float:
    """Seconds thread `tid` of this process has spent runnable but waiting for a CPU (0 where the kernel does not
    say)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class ProcessCpu:
    """CPU seconds of the whole process (all its threads) over a stage: the measure when stages run one at a time."""

    def start(self) -> float:
        return time.process_time()

    def stop(self, token: float) -> float:
        return time.process_time() - token
