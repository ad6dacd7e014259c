"""The inspector: a debugging web page served by the recall server under /ui/ (docs/inspector.md).

Plain HTML, JavaScript and CSS shipped in `static/` (no build step, nothing fetched from the internet), fed by a
few JSON endpoints under /ui/api/ that read the recall server's own state: its serving snapshot, its metrics, a
traced /recall, the nightly run summaries and the latest offline evaluation report.
"""

from services.recall_server.inspector.routes import mount_inspector

__all__ = ["mount_inspector"]
