"""``python -m dibs.report sweep=GRID_DIR [out=DIR] [target=ACC] [baseline=LABEL] [axes=[k1,k2]] [fractions=[...]]``
(= ``dibs-report``; ``--help`` lists the keys of ``conf/report.yaml``)."""

from __future__ import annotations

from dibs.report.build import main

main()
