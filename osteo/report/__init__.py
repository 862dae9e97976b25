"""The comparison report: ``osteo report [RUNS ...] [--out DIR] [--all]`` (``make report``).

Writes to ``DIR`` (default ``reports/``):

- ``comparison.csv``: one row per run, headline metrics with 95% bootstrap
  intervals, the majority-class baseline, speed, size, and McNemar's test (clustered
  where images come in groups) against the best run (by balanced accuracy) on the same
  validation images;
- ``per_class.csv``: long form (model, run_id, class, metric, value, lo, hi);
- ``plots/*.png``: training curves, confusion matrices, ROC curves, reliability
  diagrams, sample predictions, and a bar chart of the headline metrics;
- ``index.html``: one self-contained page (images embedded, no network) with all of
  it, the data audit, and each run's recipe and environment. Every file name and
  label on the page is HTML-escaped.

Metrics are recomputed from each run's ``predictions.csv``, so the report never
trusts a stale ``metrics.json``. Runs scored on different images (other splits,
contents or labels) are reported, each set with its own best, and never paired.

``load`` reads the runs, ``tables`` makes the CSV rows, ``plots`` the figures, and
``page`` the HTML page and :func:`write_report`.
"""

from osteo.report.load import collect_runs
from osteo.report.page import write_report

__all__ = ["collect_runs", "write_report"]
