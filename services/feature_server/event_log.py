"""The feature server's watch on the event log's bound (docs/event_log.md): gauges, warnings, the refusal message.

POST /events appends to the log in the script that updates the real-time state; the log holds what the nightly job
has not archived yet. Nothing is ever trimmed unread: a batch that would pass `event_log_max_len` is refused whole
(503), and from `event_log_warn_ratio` of the bound on, every answer and scrape says so.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Gauge

from common.settings import Settings

log = logging.getLogger(__name__)

WARN_EVERY_S = 60.0  # at most one warning line a minute while the backlog stays above the warning level


class EventLogWatch:
    """Gauges of the log's backlog plus rate-limited warning lines; `observe` after every append or scrape."""

    def __init__(self, registry: CollectorRegistry, settings: Settings):
        self.max_len, self.warn_ratio = settings.event_log_max_len, settings.event_log_warn_ratio
        self.entries = Gauge("feature_server_event_log_entries", "Events in the log not yet archived by the nightly "
                             "job (its un-read backlog)", registry=registry)
        self.fill = Gauge("feature_server_event_log_fill_ratio", "Event-log backlog / EVENT_LOG_MAX_LEN (POST /events "
                          "is refused at 1)", registry=registry)
        self.bound = Gauge("feature_server_event_log_max_len", "EVENT_LOG_MAX_LEN", registry=registry)
        self.bound.set(self.max_len)
        self._last_warning = float("-inf")

    def observe(self, length: int) -> None:
        """Record the log's length; a warning line when it is past the warning level (once a minute at most)."""
        self.entries.set(length)
        ratio = length / self.max_len
        self.fill.set(ratio)
        now = time.monotonic()
        if ratio >= self.warn_ratio and now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("event log at %d of %d entries (%.0f%%, warning level %.0f%%): the nightly job has not archived "
                        "them yet; POST /events is refused at the bound (run `python -m trainer nightly`, or raise "
                        "EVENT_LOG_MAX_LEN)", length, self.max_len, 100 * ratio, 100 * self.warn_ratio)

    def full_message(self, length: int, batch: int) -> str:
        """The 503 detail of a batch refused at the bound."""
        return (f"event log full: {length} of EVENT_LOG_MAX_LEN={self.max_len} entries are not archived by the "
                f"nightly job yet, so this batch of {batch} was not recorded (nothing was changed); retry after the "
                f"next nightly run")
