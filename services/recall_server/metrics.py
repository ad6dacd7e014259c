"""Prometheus metrics of the recall server (multi-process aware: see `metrics_payload`)."""

from __future__ import annotations

import os

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


class RecallMetrics:
    """Every metric the recall server exports; label children are cached per channel (cheap to update)."""

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
        self._children: dict[str, tuple] = {}
        self._version_labels: dict[str, str] = {}

    def channel(self, name: str) -> tuple:
        """(latency, errors, timeouts, empty, candidates) children for one channel."""
        c = self._children.get(name)
        if c is None:
            c = (self.channel_latency.labels(name), self.channel_errors.labels(name),
                 self.channel_timeouts.labels(name), self.channel_empty.labels(name),
                 self.channel_candidates.labels(name))
            self._children[name] = c
        return c

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


def metrics_payload(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Exposition text of `registry`, aggregated over all workers when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
