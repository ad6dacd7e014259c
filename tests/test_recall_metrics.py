"""Tallied metrics end up exactly where direct prometheus observations would."""

from __future__ import annotations

from prometheus_client import generate_latest

from services.recall_server.metrics import RecallMetrics


def _observe(m: RecallMetrics, direct: bool) -> None:
    values = [0.0, 0.0005, 0.0004, 0.0021, 0.003, 0.7, 9.0, 0.01]
    for i, v in enumerate(values):
        lat, errors, timeouts, empty, cands = m.channel("itemcf") if not direct else (
            m.channel_latency.labels("itemcf"), m.channel_errors.labels("itemcf"),
            m.channel_timeouts.labels("itemcf"), m.channel_empty.labels("itemcf"),
            m.channel_candidates.labels("itemcf"))
        lat.observe(v)
        cands.observe([0, 1, 300, 301, 5000, 50, 10, 2][i])
        if i % 3 == 0:
            errors.inc()
        if direct:
            m.requests.labels("ok").inc()
            m.latency.observe(v)
        else:
            m.outcome["ok"].inc()
            m.request_latency.observe(v)


def _samples(m: RecallMetrics) -> set[str]:
    return {line for line in generate_latest(m.registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line}


def test_flush_gives_the_direct_observations():
    tallied, direct = RecallMetrics(), RecallMetrics()
    _observe(tallied, direct=False)
    _observe(direct, direct=True)
    assert 'recall_requests_total{outcome="ok"} 0.0' in _samples(tallied)  # nothing before the flush
    tallied.flush()
    assert _samples(tallied) == _samples(direct)
    assert 'recall_channel_seconds_bucket{channel="itemcf",le="0.0005"} 3.0' in _samples(tallied)
    tallied.flush()  # a second flush adds nothing
    assert _samples(tallied) == _samples(direct)
