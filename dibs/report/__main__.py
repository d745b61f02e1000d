"""``python -m dibs.report GRID_DIR [--out DIR] [--target ACC] [--baseline LABEL] [--axes k1,k2] [--fractions ...]``."""

from __future__ import annotations

from dibs.report.build import main

raise SystemExit(main())
