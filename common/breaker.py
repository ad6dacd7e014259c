"""A circuit breaker for the services' Redis calls: fail fast while Redis is known to be down.

Without it, a hung Redis (SIGSTOP, a stalled network) makes every request wait the whole socket timeout, and a
client pool of 64 connections queues behind those waits. After `failures` consecutive connection errors or
timeouts the breaker opens: calls fail at once with `CircuitOpen` (a `redis.exceptions.ConnectionError`, so every
caller already answers it as "Redis unavailable") for `reset_s`. Then one call at a time goes through as a probe:
its success closes the breaker, its failure opens it again. Answers from Redis, errors included
(`ResponseError`), count as success: only an unreachable Redis opens it.
"""

from __future__ import annotations

import time

import redis.exceptions

from common.settings import Settings


class CircuitOpen(redis.exceptions.ConnectionError):
    """Refused without trying: Redis failed recently and the breaker is open."""


# what counts as Redis being unreachable (redis-py's TimeoutError subclasses neither of the first two)
FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError, OSError)


class CircuitBreaker:
    """`check()` before a call, then `success()` or `failure()`; `failures <= 0` disables it."""

    def __init__(self, failures: int = 3, reset_s: float = 1.0, probe_s: float = 1.0, name: str = "Redis"):
        self.threshold, self.reset_s, self.probe_s, self.name = failures, reset_s, probe_s, name
        self.failures = 0
        self.open_until = 0.0  # monotonic time; 0: closed
        self.last_error = ""

    @property
    def is_open(self) -> bool:
        return self.open_until > 0.0

    def check(self) -> None:
        """Raise CircuitOpen while open; after `reset_s`, let one probe through every `probe_s`."""
        if not self.open_until:
            return
        now = time.monotonic()
        if now < self.open_until:
            raise CircuitOpen(f"{self.name} unavailable: {self.failures} calls in a row failed (last: "
                              f"{self.last_error}); failing fast for up to {self.reset_s:g}s before retrying")
        self.open_until = now + self.probe_s  # this call is the probe; the others keep failing fast meanwhile

    def success(self) -> None:
        if self.failures or self.open_until:
            self.failures, self.open_until = 0, 0.0

    def failure(self, exc: BaseException) -> None:
        if isinstance(exc, CircuitOpen) or self.threshold <= 0:
            return
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.reset_s


def redis_breaker(settings: Settings) -> CircuitBreaker:
    """The breaker of a service's Redis clients (REDIS_BREAKER_FAILURES, REDIS_BREAKER_RESET_S)."""
    return CircuitBreaker(settings.redis_breaker_failures, settings.redis_breaker_reset_s,
                          probe_s=settings.redis_timeout_s)
