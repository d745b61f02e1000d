"""Grid reports: a Hydra multirun folder → a Markdown report, JSON numbers and accuracy-vs-cost plots.

``dibs-report sweep=multirun/<grid>/<time>`` or ``python -m dibs.report sweep=...`` (see ``dibs.report.build``).
"""

from __future__ import annotations

from dibs.report.build import build_report, main
from dibs.report.grid import ReportError

__all__ = ["ReportError", "build_report", "main"]
