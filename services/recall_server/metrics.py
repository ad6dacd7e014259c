"""Prometheus metrics of the recall server (multi-process aware: see `metrics_payload`)."""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COUNT_BUCKETS = (0, 1, 10, 50, 100, 200, 300, 500, 1000, 2000)


class Tally:
    """Observations of one Histogram (or Counter) child, counted in plain Python and added to it by `flush()`.

    With several workers (multi-process mode) every prometheus observe writes two mmap'd values under a lock,
    ≈ 2 µs; a /recall makes ~17 of them. Counting here and flushing a few times a second costs a tenth of that.
    Falls back to updating the child directly if prometheus_client's layout is not the one expected."""

    def __init__(self, child):
        self.child = child
        self.bounds = list(getattr(child, "_upper_bounds", ()))  # a Histogram's, +Inf last; [] for a Counter
        # a Counter is flushed through its public inc(); a Histogram needs its bucket values
        self.direct = bool(self.bounds) and not (hasattr(child, "_buckets") and hasattr(child, "_sum"))
        self.counts = [0] * max(1, len(self.bounds))
        self.total = 0.0
        self.dirty = False

    def observe(self, value: float) -> None:
        if self.direct:
            self.child.observe(value)
            return
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        self.total += value
        self.dirty = True

    def inc(self, amount: float = 1.0) -> None:
        if self.direct:
            self.child.inc(amount)
            return
        self.total += amount
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        counts, total = self.counts, self.total
        self.counts, self.total, self.dirty = [0] * len(counts), 0.0, False
        if not self.bounds:
            self.child.inc(total)
            return
        self.child._sum.inc(total)
        for bucket, n in zip(self.child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


class RecallMetrics:
    """Every metric the recall server exports. The request path updates `Tally`s (label children cached per
    channel); `flush()` moves them into the prometheus metrics (the server does it every `FLUSH_S` and before
    answering /metrics)."""

    FLUSH_S = 0.5

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter("recall_requests_total", "GET /recall answers by outcome",
                                ["outcome"], **kw)
        self.latency = Histogram("recall_request_seconds", "GET /recall latency (server side)",
                                 buckets=LATENCY_BUCKETS, **kw)
        self.channel_latency = Histogram("recall_channel_seconds", "Per-channel retrieval latency",
                                         ["channel"], buckets=LATENCY_BUCKETS, **kw)
        self.channel_errors = Counter("recall_channel_errors_total", "Channel retrievals that failed", ["channel"], **kw)
        self.channel_timeouts = Counter("recall_channel_timeouts_total", "Channel retrievals past timeout_ms",
                                        ["channel"], **kw)
        self.channel_empty = Counter("recall_channel_empty_total", "Channel retrievals with no candidate",
                                     ["channel"], **kw)
        self.channel_candidates = Histogram("recall_channel_candidates", "Candidates returned by a channel",
                                            ["channel"], buckets=COUNT_BUCKETS, **kw)
        self.returned = Histogram("recall_returned_items", "Items returned per /recall answer",
                                  buckets=COUNT_BUCKETS, **kw)
        self.versions = Gauge("recall_channel_version_info", "1 for the version each channel serves",
                              ["channel", "version"], multiprocess_mode="liveall", **kw)
        self._children: dict[str, tuple[Tally, ...]] = {}
        self._version_labels: dict[str, str] = {}
        self._tallies: list[Tally] = []
        self.outcome = {o: self._tally(self.requests.labels(o))
                        for o in ("ok", "cold_start", "client_error", "unavailable", "error")}
        self.request_latency = self._tally(self.latency)
        self.returned_items = self._tally(self.returned)

    def _tally(self, child) -> Tally:
        t = Tally(child)
        self._tallies.append(t)
        return t

    def channel(self, name: str) -> tuple[Tally, ...]:
        """(latency, errors, timeouts, empty, candidates) tallies for one channel."""
        c = self._children.get(name)
        if c is None:
            c = tuple(self._tally(m.labels(name)) for m in (
                self.channel_latency, self.channel_errors, self.channel_timeouts, self.channel_empty,
                self.channel_candidates))
            self._children[name] = c
        return c

    def flush(self) -> None:
        """Add everything tallied since the last flush to the prometheus metrics."""
        for t in self._tallies:
            t.flush()

    def set_versions(self, versions: dict[str, str | None]) -> None:
        """Publish the versions gauge: 1 for the served version, 0 for replaced ones."""
        for ch, v in versions.items():
            old = self._version_labels.get(ch)
            if old == (v or "none"):
                continue
            if old is not None:  # kept at 0 rather than removed: multi-process files cannot forget a label set
                self.versions.labels(ch, old).set(0)
            self.versions.labels(ch, v or "none").set(1)
            self._version_labels[ch] = v or "none"


def readable_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """`registry`, or one aggregating every worker's metrics when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return registry


def metrics_payload(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Exposition text of `registry`, aggregated over all workers when PROMETHEUS_MULTIPROC_DIR is set."""
    return generate_latest(readable_registry(registry)), CONTENT_TYPE_LATEST


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets, +Inf last: linear inside the
    bucket holding the q-th observation (the last finite bound when it falls in +Inf); None without observations."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * ((rank - below) / (cum - below) if cum > below else 1.0)
        lo, below = le, cum
    return lo


def channel_stats(registry: CollectorRegistry) -> dict[str, dict[str, float | None]]:
    """Per channel, since the process started (all workers): retrievals, errors, timeouts, empty answers,
    p50/p99 latency (ms, from the histogram buckets) and mean candidates."""
    hist: dict[str, dict[str, list[tuple[float, float]] | float]] = {}
    out: dict[str, dict[str, float | None]] = {}
    counters = {"recall_channel_errors": "errors", "recall_channel_timeouts": "timeouts",
                "recall_channel_empty": "empty"}
    for metric in readable_registry(registry).collect():
        for s in metric.samples:
            ch = s.labels.get("channel")
            if ch is None or not s.name.startswith(("recall_channel_seconds", "recall_channel_candidates_sum",
                                                     *counters)):
                continue
            row = out.setdefault(ch, {"requests": 0.0, "errors": 0.0, "timeouts": 0.0, "empty": 0.0})
            if s.name == "recall_channel_seconds_bucket":
                hist.setdefault(ch, {}).setdefault("buckets", []).append((float(s.labels["le"]), s.value))
            elif s.name == "recall_channel_seconds_count":
                row["requests"] += s.value
            elif s.name == "recall_channel_candidates_sum":
                hist.setdefault(ch, {})["candidates"] = s.value
            elif s.name.removesuffix("_total") in counters:
                row[counters[s.name.removesuffix("_total")]] += s.value
    for ch, row in out.items():
        h = hist.get(ch, {})
        buckets = sorted(h.get("buckets", []))
        for q in (0.5, 0.99):
            v = histogram_quantile(q, buckets)
            row[f"p{round(q * 100)}_ms"] = None if v is None else round(1000.0 * v, 3)
        row["mean_candidates"] = round(h["candidates"] / row["requests"], 1) if row["requests"] and "candidates" in h else None
    return out
