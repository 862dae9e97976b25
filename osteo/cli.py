"""The ``osteo`` command. The only module that parses arguments and prints for people.

    osteo data phantom OUT [--n N] [--size PX] [--seed S] [--proportions 780,374,793] [--bit-depth 8|16]
    osteo data audit DATA [--out DIR]
    osteo data split DATA --out split.csv [--val 0.3] [--test 0] [--folds K --fold I] [--seed S]
    osteo train RECIPE_OR_MODEL [--data DIR] [--set key=value ...] [--resume RUN_DIR|latest]
    osteo eval RUN_DIR [--split val|test]
    osteo report [RUNS ...] [--out DIR] [--all]

User errors print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from osteo import CLASSES
from osteo.errors import OsteoError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"osteo: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 780,374,793, got {text!r}") from None


# --------------------------------------------------------------------------- data


def cmd_phantom(args) -> int:
    from rich.progress import Progress

    from osteo.data.phantom import class_counts, write_phantom

    total = sum(class_counts(args.n, args.proportions))
    t0 = time.perf_counter()
    with Progress(console=_console(), transient=True) as bar:
        task = bar.add_task("phantom", total=total)
        counts = write_phantom(
            args.out, n=args.n, size=args.size, seed=args.seed, proportions=args.proportions,
            bit_depth=args.bit_depth, progress=lambda k: bar.update(task, completed=k),
        )
    dt = time.perf_counter() - t0
    summary = ", ".join(f"{c} {k}" for c, k in counts.items())
    print(f"wrote {total} phantom images ({summary}) to {args.out} in {dt:.1f}s")
    return 0


def print_audit(result, console=None) -> None:
    from rich.table import Table

    console = console or _console()
    info = result.to_json()
    table = Table(title=f"audit of {info['data_dir']}")
    table.add_column("class")
    table.add_column("readable images", justify="right")
    table.add_column("in duplicate groups", justify="right")
    table.add_column("in conflicts", justify="right")
    ok = result.ok()
    for c in CLASSES:
        rows = [r for r in ok if r.label == c]
        table.add_row(c, str(len(rows)), str(sum(bool(r.dup_group) for r in rows)), str(sum(r.conflict for r in rows)))
    console.print(table)
    groups = info["duplicate_groups"]
    console.print(
        f"{info['n_files']} files: {info['n_ok']} readable, {len(info['unreadable'])} unreadable, "
        f"{len(info['ignored'])} ignored; {len(groups)} duplicate groups "
        f"({sum(g['kind'] == 'exact' for g in groups)} exact, {sum(g['kind'] == 'near' for g in groups)} near), "
        f"{sum(g['conflict'] for g in groups)} with conflicting labels"
    )
    for u in info["unreadable"][:10]:
        console.print(f"  unreadable: {u['path']}: {u['reason']}", markup=False)
    for g in [g for g in groups if g["conflict"]][:10]:
        console.print(f"  conflict {g['id']} ({g['kind']}): {', '.join(g['paths'])}", markup=False)


def cmd_audit(args) -> int:
    from rich.progress import Progress

    from osteo.data.scan import audit, write_audit

    t0 = time.perf_counter()
    with Progress(console=_console(), transient=True) as bar:
        task = bar.add_task("audit", total=None)
        result = audit(args.data, progress=lambda k, n: bar.update(task, completed=k, total=n))
    dt = time.perf_counter() - t0
    manifest, report = write_audit(result, args.out)
    print_audit(result)
    print(f"wrote {manifest} and {report} ({dt:.1f}s)")
    return 0


def cmd_split(args) -> int:
    from osteo.data.scan import audit
    from osteo.data.split import read_groups_csv, split_rows, write_split

    rows = audit(args.data).manifest_rows()
    split, excluded = split_rows(
        rows, val_fraction=args.val, test_fraction=args.test, folds=args.folds, fold=args.fold,
        seed=args.seed, group_regex=args.group_regex,
        groups=read_groups_csv(args.groups) if args.groups else None, conflicts=args.conflicts,
    )
    write_split(args.out, split)
    counts = {s: sum(r["split"] == s for r in split) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val, {counts['test']} test, "
          f"{len(excluded)} excluded (conflicting labels)")
    return 0


def _add_split_options(p: argparse.ArgumentParser) -> None:
    from osteo.data.split import CONFLICT_POLICIES

    p.add_argument("--val", type=float, default=0.3, help="validation fraction (default 0.3)")
    p.add_argument("--test", type=float, default=0.0, help="test fraction (default 0)")
    p.add_argument("--folds", type=int, default=0, help="k for k-fold cross-validation")
    p.add_argument("--fold", type=int, default=0, help="which fold is validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-regex", help="regex on the file name; group 1 is the patient id")
    p.add_argument("--groups", help="CSV with path,group columns")
    p.add_argument("--conflicts", choices=CONFLICT_POLICIES, default="exclude")


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="osteo", description="Train, compare and audit knee X-ray classifiers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="phantom dataset, audit and splits")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = dsub.add_parser("phantom", help="write the synthetic knee-radiograph dataset")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1947, help="number of images (default 1947)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proportions", type=_int_list, default=(780, 374, 793))
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.set_defaults(func=cmd_phantom)

    p = dsub.add_parser("audit", help="find unreadable files, duplicates and label conflicts")
    p.add_argument("data")
    p.add_argument("--out", default="reports/audit", help="folder for audit.json and manifest.csv")
    p.set_defaults(func=cmd_audit)

    p = dsub.add_parser("split", help="write a leakage-safe split.csv")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    _add_split_options(p)
    p.set_defaults(func=cmd_split)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except OsteoError as e:
        if args.debug:
            raise
        print(f"osteo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("osteo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
