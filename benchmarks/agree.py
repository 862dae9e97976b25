"""Do two runs of ``benchmarks/models.py`` give the same answer? (issue 20, point 2)

    python benchmarks/agree.py results/A.json results/B.json [--margin 0.10]

For every osteo row that both runs measured (same backbone, image size, batch and row),
the median ratio to timm's best of each run, as ``models.summarize`` computes it from the
rounds kept in the JSON, and their difference relative to the two ratios' mean:

- ``agree``: both runs reported a ratio and the two differ by at most ``--margin``, the
  margin within which one run's rounds must agree before it reports a ratio at all
  (``models.FLAG_SPREAD``, 10%);
- ``DISAGREE``: both reported a ratio, further apart than the margin: each run was
  self-consistent and still the answer changed, which the flag inside one run cannot see;
- ``not compared``: a run flagged the row (or measured no ratio); the flag already says
  that run gave no answer.

Prints one table; exit status 1 when a row disagrees, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models


def summaries(report: dict) -> dict[tuple, dict]:
    """(model, size, batch, row) -> the summary of each osteo row of a models.py report."""
    out = {}
    for group in report.get("groups", ()):
        for s in models.summarize(group):
            if s["kind"] == "osteo":
                out[(group["model"], group["size"], group["batch"], s["row"])] = s
    return out


def compare(a: dict, b: dict, margin: float = models.FLAG_SPREAD) -> list[dict]:
    """One entry per osteo row measured by both reports, in ``a``'s order."""
    ra, rb = summaries(a), summaries(b)
    out = []
    for key, sa in ra.items():
        sb = rb.get(key)
        if sb is None:
            continue
        entry = {"model": key[0], "size": key[1], "batch": key[2], "row": key[3],
                 "a": sa.get("ratio"), "a_status": sa["status"], "b": sb.get("ratio"), "b_status": sb["status"]}
        if sa["status"] == "ok" and sb["status"] == "ok":
            entry["difference"] = abs(sa["ratio"] - sb["ratio"]) / ((sa["ratio"] + sb["ratio"]) / 2)
            entry["verdict"] = "agree" if entry["difference"] <= margin else "DISAGREE"
        else:
            entry["verdict"] = "not compared"
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="a models.py results JSON")
    p.add_argument("b", type=Path, help="another run's results JSON")
    p.add_argument("--margin", type=float, default=models.FLAG_SPREAD,
                   help="largest relative difference of two ratios that still agree (default: the flag's 0.10)")
    args = p.parse_args(argv)
    reports = []
    for path in (args.a, args.b):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            print(f"agree.py: cannot read {path}: {e}; give two JSON files that benchmarks/models.py wrote",
                  file=sys.stderr)
            return 2
    rows = compare(*reports, margin=args.margin)
    if not rows:
        print(f"agree.py: {args.a.name} and {args.b.name} share no osteo row (backbone, size, batch); "
              "compare two runs of the same groups", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.table import Table

    def shown(ratio, status):
        return f"{ratio:.3f}" if status == "ok" else f"{status} ({ratio:.3f})" if ratio else status

    table = Table(title=f"auto / timm's best: {args.a.name} against {args.b.name} (margin {args.margin:.0%})")
    for col in ("backbone", "px", "row", "A", "B", "difference", "verdict"):
        table.add_column(col, justify="right" if col in ("px", "A", "B", "difference") else "left")
    for r in rows:
        diff = f"{r['difference']:.1%}" if "difference" in r else ""
        table.add_row(r["model"], str(r["size"]), r["row"], shown(r["a"], r["a_status"]), shown(r["b"], r["b_status"]),
                      diff, r["verdict"])
    console = Console(width=140)
    console.print(table)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("agree", "DISAGREE", "not compared")}
    console.print(f"{counts['agree']} of {len(rows)} rows agree within {args.margin:.0%}, "
                  f"{counts['DISAGREE']} disagree, {counts['not compared']} not compared (flagged in a run)")
    return 1 if counts["DISAGREE"] else 0


if __name__ == "__main__":
    sys.exit(main())
