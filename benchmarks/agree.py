"""Do two runs of a benchmark give the same answer? (issue 20, point 2)

    python benchmarks/agree.py results/A.json results/B.json [--margin 0.10]

Two runs of ``benchmarks/models.py``: for every osteo row that both measured (same
backbone, image size, batch and row), the median ratio to timm's best of each run, as
``models.summarize`` computes it from the rounds kept in the JSON. Two runs of
``benchmarks/input_pipeline.py``: for every set both measured, osteo's audit + first epoch
over each of Keras' loaders, as ``input_pipeline.round_ratios`` computes it. Then the two
ratios' difference relative to their mean:

- ``agree``: both runs reported a ratio and the two differ by at most ``--margin``, the
  margin within which one run's rounds must agree before it reports a ratio at all
  (``models.FLAG_SPREAD``, 10%);
- ``DISAGREE``: both reported a ratio, further apart than the margin: each run was
  self-consistent and still the answer changed, which the flag inside one run cannot see;
- ``not compared``: a run flagged the row (its rounds spread: FLAGGED; other processes
  took more than ``models.BUSY_SHARE`` of the CPU: BUSY) or measured no ratio; the flag
  already says that run gave no answer.

Prints one table; exit status 1 when a row disagrees, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import input_pipeline
import models

# what names a compared row, per kind of report
FIELDS = {"models": ("model", "size", "batch", "row"), "input_pipeline": ("set", "peer")}


def kind(report: dict) -> str | None:
    """``models`` or ``input_pipeline`` (which script wrote the report), else None."""
    return "models" if "groups" in report else "input_pipeline" if "rows" in report else None


def summaries(report: dict) -> dict[tuple, dict]:
    """Each compared row of a report -> its summary: a models.py report's osteo rows by
    (model, size, batch, row); an input_pipeline.py report's first epochs by (set, peer)."""
    out = {}
    for group in report.get("groups", ()):
        for s in models.summarize(group):
            if s["kind"] == "osteo":
                out[(group["model"], group["size"], group["batch"], s["row"])] = s
    for s in input_pipeline.round_ratios(report.get("rows", {})).values():
        if s["row"] == input_pipeline.OSTEO_FIRST:
            out[(s["set"], s["peer"])] = s
    return out


def compare(a: dict, b: dict, margin: float = models.FLAG_SPREAD) -> list[dict]:
    """One entry per compared row measured by both reports (of one kind), in ``a``'s order."""
    ra, rb = summaries(a), summaries(b)
    fields = FIELDS.get(kind(a), ())
    out = []
    for key, sa in ra.items():
        sb = rb.get(key)
        if sb is None:
            continue
        entry = {**dict(zip(fields, key)),
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
    p.add_argument("a", type=Path, help="a results JSON of models.py or of input_pipeline.py")
    p.add_argument("b", type=Path, help="another run's results JSON, of the same script")
    p.add_argument("--margin", type=float, default=models.FLAG_SPREAD,
                   help="largest relative difference of two ratios that still agree (default: the flag's 0.10)")
    args = p.parse_args(argv)
    reports = []
    for path in (args.a, args.b):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            print(f"agree.py: cannot read {path}: {e}; give two JSON files that benchmarks/models.py or "
                  "benchmarks/input_pipeline.py wrote", file=sys.stderr)
            return 2
    kinds = [kind(r) if isinstance(r, dict) else None for r in reports]
    if None in kinds or kinds[0] != kinds[1]:
        print(f"agree.py: {args.a.name} and {args.b.name} are not two reports of one benchmark "
              f"({kinds[0] or 'unknown'}, {kinds[1] or 'unknown'}); give two results JSON files of "
              "benchmarks/models.py, or two of benchmarks/input_pipeline.py", file=sys.stderr)
        return 2
    rows = compare(*reports, margin=args.margin)
    if not rows:
        what = "osteo row (backbone, size, batch)" if kinds[0] == "models" else "set with a Keras loader"
        print(f"agree.py: {args.a.name} and {args.b.name} share no {what}; compare two runs of the same "
              "groups or sets", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.table import Table

    def shown(ratio, status):
        return f"{ratio:.3f}" if status == "ok" else f"{status} ({ratio:.3f})" if ratio else status

    if kinds[0] == "models":
        ratio, columns = "auto / timm's best", {"backbone": "model", "px": "size", "row": "row"}
    else:
        ratio, columns = f"{input_pipeline.OSTEO_FIRST} / Keras' loader", {"set": "set", "against": "peer"}
    table = Table(title=f"{ratio}: {args.a.name} against {args.b.name} (margin {args.margin:.0%})")
    for col in (*columns, "A", "B", "difference", "verdict"):
        table.add_column(col, justify="right" if col in ("px", "A", "B", "difference") else "left")
    for r in rows:
        diff = f"{r['difference']:.1%}" if "difference" in r else ""
        table.add_row(*(str(r[f]) for f in columns.values()), shown(r["a"], r["a_status"]),
                      shown(r["b"], r["b_status"]), diff, r["verdict"])
    console = Console(width=140)
    console.print(table)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("agree", "DISAGREE", "not compared")}
    console.print(f"{counts['agree']} of {len(rows)} rows agree within {args.margin:.0%}, "
                  f"{counts['DISAGREE']} disagree, {counts['not compared']} not compared (FLAGGED or BUSY in a run)")
    return 1 if counts["DISAGREE"] else 0


if __name__ == "__main__":
    sys.exit(main())
